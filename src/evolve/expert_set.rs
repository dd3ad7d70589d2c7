//! The expert set: the base, one expert per skill, and the factored task vectors
//! `τ_e = θ_e − θ_b ≈ U_e diag(S_e) V_eᵀ` of every mutated tensor (`cycleqd.md` §5, §7),
//! computed once per run (batched, on whichever [`BatchedLinalg`] device is given) and cached.
//! It is also where a genome meets weights: the materialisation sources of each tensor and a
//! genome's coefficients for them.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::batched_svd::{randomized_svd_concat, BatchedLinalg, CpuLinalg};
use super::cache;
use super::crossover::{tensor_seed, CrossoverMethod};
use super::factorize::{exact_svd, Factors, RandomizedSvd};
use super::genome::Genome;
use crate::backend::{Backend, TensorCoefficients, TensorSources};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor, ModelStore, TensorBytes};

/// Rank of the task-vector factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rank {
    /// Exact thin SVD: genomes reproduce the dense algorithm exactly.
    Full,
    /// Randomized truncated SVD of this rank (at most every factorised matrix's min(m, n)).
    Truncated(usize),
}

impl std::fmt::Display for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rank::Full => f.write_str("full rank"),
            Rank::Truncated(r) => write!(f, "rank {r}"),
        }
    }
}

/// One tensor of the expert set: its shape and, when it is mutated (2-D, no `norm` in the
/// name), each expert's task-vector factors.
#[derive(Clone, Debug)]
pub struct TensorFactors {
    pub name: String,
    pub shape: Vec<usize>,
    /// Per expert; empty for tensors that are not factorised.
    pub factors: Vec<Factors>,
    /// Per expert: `‖τ − U S Vᵀ‖ / ‖τ‖`.
    pub relative_error: Vec<f64>,
}

/// The base, the experts and their factored task vectors.
pub struct ExpertSet {
    pub base: ModelStore,
    pub experts: Vec<ModelStore>,
    pub tensors: Vec<TensorFactors>,
    pub rank: Rank,
    pub cache_status: CacheStatus,
    /// Content fingerprint of everything a child is made of: the base's and the experts'
    /// tensors, the factorisation and the factors' bytes. Two processes with the same
    /// fingerprint materialise bit-identical children from the same genome.
    pub fingerprint: u64,
    /// How a genome's experts are combined (`None`: linearly, CycleQD's materialisation; see
    /// [`super::crossover`]).
    pub crossover: Option<CrossoverMethod>,
}

/// What the factor cache did for this build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// No cache directory was given.
    Disabled,
    /// Factors were read from a valid cache file.
    Hit,
    /// No cache file for these inputs: factorised and written.
    Miss,
    /// A cache file was invalid (the reason): factorised and rewritten.
    Rebuilt(String),
}

impl std::fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheStatus::Disabled => f.write_str("computed (no cache)"),
            CacheStatus::Hit => f.write_str("read from the cache"),
            CacheStatus::Miss => f.write_str("computed and cached"),
            CacheStatus::Rebuilt(why) => write!(f, "recomputed (the cache was invalid: {why})"),
        }
    }
}

/// Whether SVD mutation (and so factorisation) applies to a tensor, as in CycleQD's code.
pub fn is_factorised(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.contains("norm")
}

/// Task vectors factorised per batch, at most this many bytes of f32 at a time.
const BATCH_BYTES: usize = 1 << 30;

impl ExpertSet {
    /// Checks the experts against the base and factorises every mutated tensor's task vector
    /// on the CPU.
    pub fn build(base: ModelStore, experts: Vec<ModelStore>, rank: Rank) -> Result<Self> {
        Self::build_with(base, experts, rank, None, &CpuLinalg)
    }

    /// [`ExpertSet::build`], reusing factors cached under `cache_dir` when the inputs and the
    /// factorisation are unchanged (and writing them there otherwise).
    pub fn build_cached(
        base: ModelStore,
        experts: Vec<ModelStore>,
        rank: Rank,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        Self::build_with(base, experts, rank, cache_dir, &CpuLinalg)
    }

    /// [`ExpertSet::build_cached`] with truncated ranks factorised on `linalg` (the GPU's
    /// batched GEMMs, or the CPU's).
    pub fn build_with<L: BatchedLinalg>(
        base: ModelStore,
        experts: Vec<ModelStore>,
        rank: Rank,
        cache_dir: Option<&Path>,
        linalg: &L,
    ) -> Result<Self> {
        let mut tensors = validate(&base, &experts, rank)?;
        let algorithm = algorithm_tag(rank);
        let inputs = cache::inputs_fingerprint(&base, &experts)?;
        let path = cache_dir.map(|d| cache::cache_path(d, inputs, &algorithm));
        let mut cache_status = CacheStatus::Disabled;
        if let Some(p) = &path {
            cache_status = match cache::load(p, &mut tensors, experts.len()) {
                Ok(true) => CacheStatus::Hit,
                Ok(false) => CacheStatus::Miss,
                Err(e) => CacheStatus::Rebuilt(e.to_string()),
            };
        }
        if cache_status != CacheStatus::Hit {
            match rank {
                Rank::Full => factorise_exact(&base, &experts, &mut tensors)?,
                Rank::Truncated(r) => {
                    factorise_randomized(&base, &experts, &mut tensors, r, linalg)?
                }
            }
            if let Some(p) = &path {
                cache::save(p, &tensors, &algorithm)?;
            }
        }
        let fingerprint = factors_fingerprint(
            crate::durable::mix(inputs, crate::durable::fnv1a(algorithm.as_bytes())),
            &tensors,
        );
        Ok(ExpertSet {
            base,
            experts,
            tensors,
            rank,
            cache_status,
            fingerprint,
            crossover: None,
        })
    }

    /// The set with `crossover` combining its genomes' experts (`None`: linearly). The method
    /// is part of what a child is made of, so it enters the fingerprint (unchanged for linear).
    pub fn with_crossover(mut self, crossover: Option<CrossoverMethod>) -> Self {
        if let Some(c) = &crossover {
            self.fingerprint =
                crate::durable::mix(self.fingerprint, crate::durable::fnv1a(c.tag().as_bytes()));
        }
        self.crossover = crossover;
        self
    }

    /// The largest relative reconstruction error of any factor (0 at full rank).
    pub fn worst_relative_error(&self) -> f64 {
        self.tensors
            .iter()
            .flat_map(|t| t.relative_error.iter().copied())
            .fold(0.0, f64::max)
    }

    /// Tensors with factors.
    pub fn factorised_tensors(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| !t.factors.is_empty())
            .count()
    }

    /// What tensor `t`'s materialisation reads: views of the mapped checkpoints and of the
    /// factors (no weight is copied).
    pub fn tensor_sources(&self, t: usize) -> Result<TensorSources> {
        let tf = &self.tensors[t];
        let base = self.base.tensor(&tf.name)?;
        let (m, n) = match tf.shape[..] {
            [m, n] => (m, n),
            _ => (1, base.numel()),
        };
        Ok(TensorSources {
            name: tf.name.clone(),
            experts: self
                .experts
                .iter()
                .map(|e| e.tensor(&tf.name))
                .collect::<Result<_>>()?,
            base,
            factors: tf.factors.iter().map(Factors::low_rank).collect(),
            m,
            n,
        })
    }

    /// Tensor `t`'s coefficients in `genome`, written into `out` (its buffers reused):
    /// `a_e`, and `c_e = γ_e − a_e·S_e` concatenated over the experts.
    pub fn coefficients_into(&self, genome: &Genome, t: usize, out: &mut TensorCoefficients) {
        let genes = &genome.tensors[t];
        out.a.clear();
        out.a.extend_from_slice(&genes.a);
        out.c.clear();
        for ((f, gamma), &a) in self.tensors[t]
            .factors
            .iter()
            .zip(&genes.gamma)
            .zip(&genes.a)
        {
            out.c.extend(gamma.iter().zip(&f.s).map(|(g, s)| g - a * s));
        }
    }

    /// Tensor `t` of `genome` as a host tensor in the base dtype, through `backend`.
    pub fn materialize_tensor_with<B: Backend>(
        &self,
        backend: &B,
        genome: &Genome,
        t: usize,
    ) -> Result<HostTensor> {
        let src = self.tensor_sources(t)?;
        let mut coef = TensorCoefficients::default();
        self.coefficients_into(genome, t, &mut coef);
        let dtype = src.base.dtype;
        let mut out = vec![0u8; src.numel() * dtype.size()];
        match &self.crossover {
            None => backend.materialize(&mut out, dtype, &src, &coef)?,
            Some(method) => {
                let seed = if method.is_random() {
                    tensor_seed(&genome.content_id(), &src.name)
                } else {
                    0
                };
                merge_experts(backend, method, seed, &src, &coef, &mut out)?
            }
        }
        Ok(HostTensor {
            dtype,
            shape: self.tensors[t].shape.clone(),
            bytes: TensorBytes::Owned(Arc::new(out)),
        })
    }

    /// [`ExpertSet::materialize_tensor_with`] on the CPU.
    pub fn materialize_tensor(&self, genome: &Genome, t: usize) -> Result<HostTensor> {
        self.materialize_tensor_with(&crate::backend::cpu::CpuBackend, genome, t)
    }

    /// Every tensor of `genome`, in the expert set's order, in fresh host buffers (export and
    /// the final table; the loop writes children in place instead).
    pub fn materialize_model<B: Backend>(
        &self,
        backend: &B,
        genome: &Genome,
    ) -> Result<Vec<(String, HostTensor)>> {
        (0..self.tensors.len())
            .map(|t| {
                Ok((
                    self.tensors[t].name.clone(),
                    self.materialize_tensor_with(backend, genome, t)?,
                ))
            })
            .collect()
    }
}

/// One tensor of a child under a merge `method` (see [`super::crossover`]): each expert with
/// a non-zero coefficient `a_e` becomes a model `θ_b + τ'_e` (materialised in f32 with
/// coefficient 1 and low-rank coefficients `c_e/a_e`), and the method merges those over the
/// base with weights `a_e`, writing `out` in the base's dtype.
pub fn merge_experts<B: Backend>(
    backend: &B,
    method: &CrossoverMethod,
    seed: u64,
    src: &TensorSources,
    coef: &TensorCoefficients,
    out: &mut [u8],
) -> Result<()> {
    let dtype = src.base.dtype;
    let mut models = vec![];
    let mut weights = vec![];
    let mut offset = 0;
    for (e, &a) in coef.a.iter().enumerate() {
        let rank = src.factors.get(e).map_or(0, |f| f.rank);
        let block = &coef.c[offset..offset + rank];
        offset += rank;
        // An expert the genome does not use (a_e = 0 leaves γ_e = 0 under crossover and
        // mutation) takes no part, as a model of weight 0 would not.
        if a == 0.0 {
            continue;
        }
        let mut one = TensorCoefficients {
            a: vec![0.0; coef.a.len()],
            c: vec![0.0; coef.c.len()],
        };
        one.a[e] = 1.0;
        for (c, &x) in one.c[offset - rank..offset].iter_mut().zip(block) {
            *c = x / a;
        }
        let mut model = vec![0u8; src.numel() * 4];
        backend.materialize(&mut model, DType::F32, src, &one)?;
        models.push(HostTensor {
            dtype: DType::F32,
            shape: src.base.shape.clone(),
            bytes: TensorBytes::Owned(Arc::new(model)),
        });
        weights.push(a);
    }
    if models.is_empty() {
        // No expert at all: the base itself.
        out.copy_from_slice(src.base.data());
        return Ok(());
    }
    let op = method.op(weights, seed);
    let out = std::sync::Mutex::new(out);
    let sink = |off: usize, bytes: &[u8]| -> Result<()> {
        out.lock().expect("merge sink")[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    };
    let refs: Vec<&HostTensor> = models.iter().collect();
    backend.merge(&src.name, &op, Some(&src.base), &refs, dtype, &sink)
}

/// The algorithm (and every setting its result depends on) that the factor cache records.
fn algorithm_tag(rank: Rank) -> String {
    match rank {
        Rank::Full => "exact thin svd (faer, f64)".into(),
        Rank::Truncated(r) => format!("rank {r}, {}", RandomizedSvd::default().tag()),
    }
}

/// The set's tensors (names and shapes, no factors yet), after checking the experts against
/// the base: the same tensors, shapes and dtypes, finite values, and a rank every factorised
/// tensor allows.
fn validate(base: &ModelStore, experts: &[ModelStore], rank: Rank) -> Result<Vec<TensorFactors>> {
    if experts.len() < 2 {
        return Err(Error::invalid(format!(
            "CycleQD needs at least 2 experts, got {}",
            experts.len()
        )));
    }
    for e in experts {
        if let Some(extra) = e.names().find(|n| !base.contains(n)) {
            return Err(Error::invalid(format!(
                "expert {}: tensor `{extra}` is not in the base model",
                e.dir().display()
            )));
        }
    }
    let mut tensors = vec![];
    for name in base.names() {
        let b = base.tensor(name)?;
        if b.first_non_finite().is_some() {
            return Err(Error::invalid(format!(
                "base {}: tensor `{name}`: holds NaN or Inf",
                base.dir().display()
            )));
        }
        for e in experts {
            let where_ = || format!("expert {}: tensor `{name}`", e.dir().display());
            let t = e
                .tensor(name)
                .map_err(|_| Error::invalid(format!("{}: missing", where_())))?;
            if t.shape != b.shape || t.dtype != b.dtype {
                return Err(Error::invalid(format!(
                    "{}: {} {:?} differs from the base's {} {:?}",
                    where_(),
                    t.dtype,
                    t.shape,
                    b.dtype,
                    b.shape
                )));
            }
            if t.first_non_finite().is_some() {
                return Err(Error::invalid(format!("{}: holds NaN or Inf", where_())));
            }
        }
        if let (Rank::Truncated(r), true) = (rank, is_factorised(name, &b.shape)) {
            let (m, n) = (b.shape[0], b.shape[1]);
            if r == 0 || r > m.min(n) {
                return Err(Error::invalid(format!(
                    "rank {r} is outside 1..={} for tensor `{name}` ({m}×{n})",
                    m.min(n)
                )));
            }
        }
        tensors.push(TensorFactors {
            name: name.to_string(),
            shape: b.shape.clone(),
            factors: vec![],
            relative_error: vec![],
        });
    }
    Ok(tensors)
}

/// `τ = θ_e − θ_b` of one tensor, in f32.
fn task_vector(base: &ModelStore, expert: &ModelStore, name: &str) -> Result<Vec<f32>> {
    let mut tau = vec![0.0f32; base.tensor(name)?.numel()];
    task_vector_into(base, expert, name, &mut tau)?;
    Ok(tau)
}

/// [`task_vector`] into `dst`, a block at a time (no f32 copy of either tensor).
fn task_vector_into(
    base: &ModelStore,
    expert: &ModelStore,
    name: &str,
    dst: &mut [f32],
) -> Result<()> {
    const BLOCK: usize = 1 << 14;
    let (b, x) = (base.tensor(name)?, expert.tensor(name)?);
    let size = b.dtype.size();
    let mut tmp = vec![0.0f32; BLOCK];
    for (i, out) in dst.chunks_mut(BLOCK).enumerate() {
        let (lo, hi) = (i * BLOCK * size, (i * BLOCK + out.len()) * size);
        crate::model::dtype::to_f32(x.dtype, &x.data()[lo..hi], out);
        let tmp = &mut tmp[..out.len()];
        crate::model::dtype::to_f32(b.dtype, &b.data()[lo..hi], tmp);
        out.iter_mut().zip(tmp.iter()).for_each(|(o, b)| *o -= b);
    }
    Ok(())
}

/// Every (factorised tensor, expert) pair, in (tensor, expert) order.
fn jobs(tensors: &[TensorFactors], experts: usize) -> Vec<(usize, usize)> {
    tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| is_factorised(&t.name, &t.shape))
        .flat_map(|(t, _)| (0..experts).map(move |e| (t, e)))
        .collect()
}

/// Stores factors computed for `jobs`, in job order (so each tensor's land in expert order).
fn store(tensors: &mut [TensorFactors], jobs: &[(usize, usize)], done: Vec<(Factors, f64)>) {
    for tf in tensors.iter_mut() {
        tf.factors.clear();
        tf.relative_error.clear();
    }
    for (&(t, _), (f, err)) in jobs.iter().zip(done) {
        tensors[t].factors.push(f);
        tensors[t].relative_error.push(err);
    }
}

/// Exact thin SVDs of every task vector, in parallel across the pairs: most matrices are too
/// small for one SVD to occupy the machine, and the pairs are independent.
fn factorise_exact(
    base: &ModelStore,
    experts: &[ModelStore],
    tensors: &mut [TensorFactors],
) -> Result<()> {
    let jobs = jobs(tensors, experts.len());
    let done: Vec<(Factors, f64)> = jobs
        .par_iter()
        .map(|&(t, e)| {
            let tf = &tensors[t];
            let (m, n) = (tf.shape[0], tf.shape[1]);
            let tau = task_vector(base, &experts[e], &tf.name)?;
            let f = exact_svd(&tau, m, n, m.min(n))?;
            let err = f.relative_error(&tau);
            Ok((f, err))
        })
        .collect::<Result<_>>()?;
    store(tensors, &jobs, done);
    Ok(())
}

/// Rank-`rank` randomized SVDs of every task vector, batched over the matrices of one shape
/// (at most [`BATCH_BYTES`] of them at a time) on `linalg`. Each matrix's sketch comes from a
/// seed of its tensor name and expert, so factors do not depend on a run's seed or on how the
/// batches fall.
fn factorise_randomized<L: BatchedLinalg>(
    base: &ModelStore,
    experts: &[ModelStore],
    tensors: &mut [TensorFactors],
    rank: usize,
    linalg: &L,
) -> Result<()> {
    let jobs = jobs(tensors, experts.len());
    let mut by_shape: std::collections::BTreeMap<(usize, usize), Vec<usize>> = Default::default();
    for (j, &(t, _)) in jobs.iter().enumerate() {
        let s = &tensors[t].shape;
        by_shape.entry((s[0], s[1])).or_default().push(j);
    }
    let mut done: Vec<Option<(Factors, f64)>> = jobs.iter().map(|_| None).collect();
    for ((m, n), members) in by_shape {
        let per_batch = (BATCH_BYTES / (m * n * 4).max(1)).max(1);
        for chunk in members.chunks(per_batch) {
            // The chunk's task vectors, written straight into one buffer.
            let mut taus = vec![0.0f32; chunk.len() * m * n];
            taus.par_chunks_mut(m * n)
                .zip(chunk)
                .try_for_each(|(dst, &j)| {
                    let (t, e) = jobs[j];
                    task_vector_into(base, &experts[e], &tensors[t].name, dst)
                })?;
            let seeds: Vec<u64> = chunk
                .iter()
                .map(|&j| {
                    let (t, e) = jobs[j];
                    crate::durable::hash_bytes(format!("{}::{e}", tensors[t].name).as_bytes())
                })
                .collect();
            let factors =
                randomized_svd_concat(linalg, &taus, m, n, rank, RandomizedSvd::default(), &seeds)?;
            let taus: Vec<&[f32]> = taus.chunks(m * n).collect();
            let errors: Vec<f64> = factors
                .par_iter()
                .zip(&taus)
                .map(|(f, tau)| f.relative_error(tau))
                .collect();
            for ((&j, f), err) in chunk.iter().zip(factors).zip(errors) {
                done[j] = Some((f, err));
            }
        }
    }
    let done = done
        .into_iter()
        .map(|d| d.expect("every job is in one shape batch"))
        .collect();
    store(tensors, &jobs, done);
    Ok(())
}

/// `h` mixed with every factor's bytes, in tensor and expert order.
fn factors_fingerprint(mut h: u64, tensors: &[TensorFactors]) -> u64 {
    use crate::durable::{hash_bytes, mix};
    for t in tensors {
        for f in &t.factors {
            for part in [&f.u[..], &f.s[..], &f.vt[..]] {
                h = mix(h, hash_bytes(bytemuck::cast_slice(part)));
            }
        }
    }
    h
}
