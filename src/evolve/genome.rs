//! Genomes: every individual CycleQD produces, as coefficients over the experts' factored task
//! vectors (`cycleqd.md` §7). Per 2-D tensor,
//! `θ = θ_b + Σ_e [a_e·R_e + U_e·diag(γ_e)·V_eᵀ]` with `R_e = τ_e − U_e diag(S_e) V_eᵀ`;
//! per 1-D (or `norm`) tensor, `θ = θ_b + Σ_e a_e·τ_e`. Crossover, SVD mutation and the final
//! merge are linear in these coefficients, so they act on genomes (KBs–MBs) and weights are
//! materialised only to evaluate a child.

use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use std::path::Path;
use std::sync::Arc;

use super::cache;
use super::factorize::{exact_svd, randomized_svd, Factors, RandomizedSvd};
use super::materialize::LowRank;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{HostTensor, ModelStore, TensorBytes};

/// Rank of the task-vector factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rank {
    /// Exact thin SVD: genomes reproduce the dense algorithm exactly.
    Full,
    /// Randomized truncated SVD of this rank (at most every factorised matrix's min(m, n)).
    Truncated(usize),
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
    /// Per expert: `Vᵀ` `[r, n]` row-major, so each low-rank update is a contiguous row AXPY
    /// (kept beside the factors: materialisation runs once per child).
    pub vt: Vec<Vec<f32>>,
}

impl TensorFactors {
    fn fill_vt(&mut self) {
        self.vt = self
            .factors
            .iter()
            .map(|f| {
                let r = f.rank();
                (0..r)
                    .flat_map(|k| (0..f.n).map(move |j| f.v[j * r + k]))
                    .collect()
            })
            .collect();
    }
}

/// The base, the experts and their factored task vectors.
pub struct ExpertSet {
    pub base: ModelStore,
    pub experts: Vec<ModelStore>,
    pub tensors: Vec<TensorFactors>,
    pub rank: Rank,
    pub cache_status: CacheStatus,
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

/// Whether SVD mutation (and so factorisation) applies to a tensor, as in CycleQD's code.
pub fn is_factorised(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.contains("norm")
}

impl ExpertSet {
    /// Checks the experts against the base and factorises every mutated tensor's task vector.
    pub fn build(
        base: ModelStore,
        experts: Vec<ModelStore>,
        rank: Rank,
        seed: u64,
    ) -> Result<Self> {
        Self::build_cached(base, experts, rank, seed, None)
    }

    /// [`ExpertSet::build`], reusing factors cached under `cache_dir` when the inputs, rank and
    /// seed are unchanged (and writing them there otherwise).
    pub fn build_cached(
        base: ModelStore,
        experts: Vec<ModelStore>,
        rank: Rank,
        seed: u64,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        if experts.len() < 2 {
            return Err(Error::invalid(format!(
                "CycleQD needs at least 2 experts, got {}",
                experts.len()
            )));
        }
        for e in &experts {
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
            for e in &experts {
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
                if !all_finite(&t) {
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
                vt: vec![],
            });
        }

        let rank_tag = format!("{rank:?}");
        let path = cache_dir
            .map(|d| cache::cache_path(d, &base, &experts, &rank_tag, seed))
            .transpose()?;
        let mut cache_status = CacheStatus::Disabled;
        if let Some(p) = &path {
            cache_status = match cache::load(p, &mut tensors, experts.len()) {
                Ok(true) => CacheStatus::Hit,
                Ok(false) => CacheStatus::Miss,
                Err(e) => CacheStatus::Rebuilt(e.to_string()),
            };
        }
        if cache_status != CacheStatus::Hit {
            factorise_all(&base, &experts, &mut tensors, rank, seed)?;
            if let Some(p) = &path {
                cache::save(p, &tensors)?;
            }
        }
        tensors.iter_mut().for_each(TensorFactors::fill_vt);
        Ok(ExpertSet {
            base,
            experts,
            tensors,
            rank,
            cache_status,
        })
    }

    /// Materialises one tensor of `genome` on the CPU backend:
    /// `θ = (1 − Σ a_e)·θ_b + Σ a_e·θ_e + Σ_e U_e·diag(γ_e − a_e S_e)·V_eᵀ`, in the base dtype.
    pub fn materialize_tensor(&self, genome: &Genome, t: usize) -> Result<HostTensor> {
        self.materialize_tensor_with(&crate::backend::cpu::CpuBackend, genome, t)
    }

    /// Every tensor of `genome`, in the expert set's order, in freshly allocated buffers.
    pub fn materialize_model<B: Backend>(
        &self,
        backend: &B,
        genome: &Genome,
    ) -> Result<Vec<(String, HostTensor)>> {
        let mut child = ChildWeights::default();
        self.materialize_into(backend, genome, &mut child)?;
        Ok(child.tensors)
    }

    /// Materialises `genome` into `child`'s buffers, reusing them from the previous child
    /// (the loop's steady state allocates nothing). A buffer still shared with a model built
    /// over the previous child is replaced, never written under it.
    pub fn materialize_into<B: Backend>(
        &self,
        backend: &B,
        genome: &Genome,
        child: &mut ChildWeights,
    ) -> Result<()> {
        if child.tensors.len() != self.tensors.len() {
            child.tensors = self
                .tensors
                .iter()
                .map(|tf| {
                    let (dtype, _) = self.base.meta(&tf.name)?;
                    let bytes = vec![0u8; tf.shape.iter().product::<usize>() * dtype.size()];
                    Ok((
                        tf.name.clone(),
                        HostTensor {
                            dtype,
                            shape: tf.shape.clone(),
                            bytes: TensorBytes::Owned(Arc::new(bytes)),
                        },
                    ))
                })
                .collect::<Result<_>>()?;
        }
        for (t, (_, out)) in child.tensors.iter_mut().enumerate() {
            let TensorBytes::Owned(arc) = &mut out.bytes else {
                unreachable!("child buffers are owned")
            };
            if Arc::get_mut(arc).is_none() {
                *arc = Arc::new(vec![0u8; arc.len()]);
            }
            let buf = Arc::get_mut(arc).expect("a fresh Arc is unique");
            self.materialize_tensor_into(backend, genome, t, buf)?;
        }
        Ok(())
    }

    /// [`ExpertSet::materialize_tensor`] through a backend's `materialize`.
    pub fn materialize_tensor_with<B: Backend>(
        &self,
        backend: &B,
        genome: &Genome,
        t: usize,
    ) -> Result<HostTensor> {
        let (dtype, _) = self.base.meta(&self.tensors[t].name)?;
        let mut out = vec![0u8; self.tensors[t].shape.iter().product::<usize>() * dtype.size()];
        self.materialize_tensor_into(backend, genome, t, &mut out)?;
        Ok(HostTensor {
            dtype,
            shape: self.tensors[t].shape.clone(),
            bytes: TensorBytes::Owned(Arc::new(out)),
        })
    }

    /// Tensor `t` of `genome` into `out` (its size in the base dtype).
    fn materialize_tensor_into<B: Backend>(
        &self,
        backend: &B,
        genome: &Genome,
        t: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let tf = &self.tensors[t];
        let genes = &genome.tensors[t];
        let b = self.base.tensor(&tf.name)?;
        let xs: Vec<HostTensor> = self
            .experts
            .iter()
            .map(|e| e.tensor(&tf.name))
            .collect::<Result<_>>()?;
        let (m, n) = match tf.shape[..] {
            [m, n] => (m, n),
            _ => (1, b.numel()),
        };
        let low_rank: Vec<LowRank> = tf
            .factors
            .iter()
            .zip(&tf.vt)
            .zip(genes.gamma.iter().zip(&genes.a))
            .map(|((f, vt), (gamma, &a))| LowRank {
                u: &f.u,
                vt,
                coef: gamma.iter().zip(&f.s).map(|(g, s)| g - a * s).collect(),
            })
            .collect();
        let refs: Vec<&HostTensor> = xs.iter().collect();
        backend.materialize(out, b.dtype, &b, &refs, &genes.a, &low_rank, m, n)
    }
}

/// Factorises every (mutated tensor, expert) task vector, in parallel across the pairs: most
/// matrices are too small for one SVD to occupy the machine, and the pairs are independent.
fn factorise_all(
    base: &ModelStore,
    experts: &[ModelStore],
    tensors: &mut [TensorFactors],
    rank: Rank,
    seed: u64,
) -> Result<()> {
    let jobs: Vec<(usize, usize)> = tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| is_factorised(&t.name, &t.shape))
        .flat_map(|(t, _)| (0..experts.len()).map(move |e| (t, e)))
        .collect();
    let done: Vec<(Factors, f64)> = jobs
        .par_iter()
        .map(|&(t, e)| {
            let tf = &tensors[t];
            let (m, n) = (tf.shape[0], tf.shape[1]);
            let b = base.tensor(&tf.name)?.to_f32();
            let mut tau = experts[e].tensor(&tf.name)?.to_f32();
            tau.iter_mut().zip(&b).for_each(|(x, b)| *x -= b);
            drop(b);
            let f = match rank {
                Rank::Full => exact_svd(&tau, m, n, m.min(n))?,
                Rank::Truncated(r) => {
                    let opts = RandomizedSvd {
                        seed: seed ^ e as u64,
                        ..RandomizedSvd::default()
                    };
                    randomized_svd(&tau, m, n, r, opts)?
                }
            };
            let err = f.relative_error(&tau);
            Ok((f, err))
        })
        .collect::<Result<_>>()?;
    for tf in tensors.iter_mut() {
        tf.factors.clear();
        tf.relative_error.clear();
    }
    // Jobs are ordered by (tensor, expert), so each tensor's factors land in expert order.
    for ((t, _), (f, err)) in jobs.into_iter().zip(done) {
        tensors[t].factors.push(f);
        tensors[t].relative_error.push(err);
    }
    Ok(())
}

/// Whether every value of `t` is finite, checked chunk by chunk (no whole-tensor f32 copy).
fn all_finite(t: &HostTensor) -> bool {
    const CHUNK: usize = 1 << 16;
    let size = t.dtype.size();
    t.data().par_chunks(CHUNK * size).all(|bytes| {
        let mut vals = vec![0.0f32; bytes.len() / size];
        crate::model::dtype::to_f32(t.dtype, bytes, &mut vals);
        vals.iter().all(|v| v.is_finite())
    })
}

/// A child's dense weights in the expert set's tensor order: buffers allocated once and
/// rewritten for every child by [`ExpertSet::materialize_into`]. Inference reads them in place.
#[derive(Default)]
pub struct ChildWeights {
    pub tensors: Vec<(String, HostTensor)>,
}

/// Coefficients of one tensor: `a[e]` and `gamma[e][k]` (empty for unfactorised tensors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorGenes {
    pub a: Vec<f32>,
    pub gamma: Vec<Vec<f32>>,
}

/// An individual, as coefficients per tensor in the expert set's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Genome {
    pub tensors: Vec<TensorGenes>,
}

impl Genome {
    /// Expert `e` itself: `a_e = 1, γ_e = S_e`, every other expert 0.
    pub fn seed(set: &ExpertSet, e: usize) -> Genome {
        let k = set.experts.len();
        Genome {
            tensors: set
                .tensors
                .iter()
                .map(|tf| TensorGenes {
                    a: (0..k).map(|i| if i == e { 1.0 } else { 0.0 }).collect(),
                    gamma: tf
                        .factors
                        .iter()
                        .enumerate()
                        .map(|(i, f)| {
                            if i == e {
                                f.s.clone()
                            } else {
                                vec![0.0; f.rank()]
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// `Σ_k w_k · g_k` over genomes with weights `w` (each coefficient).
    pub fn weighted_sum(genomes: &[&Genome], w: &[f32]) -> Genome {
        let mut out = genomes[0].clone();
        for (t, tg) in out.tensors.iter_mut().enumerate() {
            for (e, a) in tg.a.iter_mut().enumerate() {
                *a = genomes
                    .iter()
                    .zip(w)
                    .map(|(g, &w)| w * g.tensors[t].a[e])
                    .sum();
            }
            for (e, gamma) in tg.gamma.iter_mut().enumerate() {
                for (k, v) in gamma.iter_mut().enumerate() {
                    *v = genomes
                        .iter()
                        .zip(w)
                        .map(|(g, &w)| w * g.tensors[t].gamma[e][k])
                        .sum();
                }
            }
        }
        out
    }

    /// CycleQD crossover (model-wise coefficients): `(ω₁ g₁ + ω₂ g₂) / (ω₁ + ω₂)`.
    pub fn crossover(p1: &Genome, p2: &Genome, w1: f32, w2: f32) -> Genome {
        let s = w1 + w2;
        Genome::weighted_sum(&[p1, p2], &[w1 / s, w2 / s])
    }

    /// Crossover with one coefficient pair per tensor (`w1[t]`, `w2[t]`): the per-layer and
    /// per-tensor options; equal to [`Genome::crossover`] when all pairs are equal.
    pub fn crossover_per_tensor(p1: &Genome, p2: &Genome, w1: &[f32], w2: &[f32]) -> Genome {
        let mut out = p1.clone();
        for (t, tg) in out.tensors.iter_mut().enumerate() {
            let s = w1[t] + w2[t];
            let (c1, c2) = (w1[t] / s, w2[t] / s);
            let (g1, g2) = (&p1.tensors[t], &p2.tensors[t]);
            for (e, a) in tg.a.iter_mut().enumerate() {
                *a = c1 * g1.a[e] + c2 * g2.a[e];
            }
            for (e, gamma) in tg.gamma.iter_mut().enumerate() {
                for (k, v) in gamma.iter_mut().enumerate() {
                    *v = c1 * g1.gamma[e][k] + c2 * g2.gamma[e][k];
                }
            }
        }
        out
    }

    /// All coefficients in order (per tensor: `a`, then each expert's `γ`): the genome's
    /// on-disk form (an f32 tensor in checkpoints and archives).
    pub fn to_flat(&self) -> Vec<f32> {
        let mut v = vec![];
        for t in &self.tensors {
            v.extend_from_slice(&t.a);
            t.gamma.iter().for_each(|g| v.extend_from_slice(g));
        }
        v
    }

    /// Inverse of [`Genome::to_flat`] for genomes of `set` (the layout comes from its factors).
    pub fn from_flat(set: &ExpertSet, flat: &[f32]) -> Result<Genome> {
        let k = set.experts.len();
        let want: usize = set
            .tensors
            .iter()
            .map(|tf| k + tf.factors.iter().map(|f| f.rank()).sum::<usize>())
            .sum();
        if flat.len() != want {
            return Err(Error::invalid(format!(
                "genome has {} coefficients, the expert set needs {want}",
                flat.len()
            )));
        }
        let mut it = flat.iter().copied();
        let mut take = |n: usize| -> Vec<f32> { it.by_ref().take(n).collect() };
        Ok(Genome {
            tensors: set
                .tensors
                .iter()
                .map(|tf| TensorGenes {
                    a: take(k),
                    gamma: tf.factors.iter().map(|f| take(f.rank())).collect(),
                })
                .collect(),
        })
    }

    /// SVD mutation toward expert `q` (the code's form): `γ_q += w ⊙ S_q` on every factorised
    /// tensor, with `w[t][k]` drawn by the caller; with truncated factors the residual gets its
    /// expected share, `a_q += E[w] = w_max / 2`.
    pub fn mutate(&mut self, set: &ExpertSet, q: usize, w: &[Vec<f32>], w_max: f32) {
        for ((tg, tf), wt) in self.tensors.iter_mut().zip(&set.tensors).zip(w) {
            if tf.factors.is_empty() {
                continue;
            }
            let s = &tf.factors[q].s;
            tg.gamma[q]
                .iter_mut()
                .zip(s)
                .zip(wt)
                .for_each(|((g, s), w)| *g += w * s);
            if set.rank != Rank::Full {
                tg.a[q] += w_max / 2.0;
            }
        }
    }

    /// The final model of CycleQD (§6): `Σ_k softmax(f)_k · g_k` over the best elite of each
    /// archive, `f` their objectives.
    pub fn softmax_merge(genomes: &[&Genome], objectives: &[f64]) -> Genome {
        let max = objectives.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = objectives.iter().map(|f| (f - max).exp()).collect();
        let z: f64 = e.iter().sum();
        let beta: Vec<f32> = e.iter().map(|x| (x / z) as f32).collect();
        Genome::weighted_sum(genomes, &beta)
    }

    /// A stable content id: FNV-1a (64-bit) over the little-endian coefficients in order.
    pub fn content_id(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: f32| {
            for b in x.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for t in &self.tensors {
            t.a.iter().copied().for_each(&mut eat);
            t.gamma.iter().flatten().copied().for_each(&mut eat);
        }
        format!("{h:016x}")
    }

    /// Draws the mutation weights `w ~ U[0, w_max)` for every factorised tensor.
    pub fn draw_mutation(
        set: &ExpertSet,
        q: usize,
        w_max: f32,
        rng: &mut impl Rng,
    ) -> Vec<Vec<f32>> {
        set.tensors
            .iter()
            .map(|tf| match tf.factors.get(q) {
                Some(f) => (0..f.rank()).map(|_| rng.random::<f32>() * w_max).collect(),
                None => vec![],
            })
            .collect()
    }
}
