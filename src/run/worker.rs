//! Workers: one per device, each turning genomes into scores. A [`ModelWorker`] owns its
//! device's copy of the materialisation sources (base, experts, factors: placed once, resident
//! or streamed) and one child model whose weights every child is written into in place, so a
//! child costs a materialisation pass and its evaluation, with no upload of weights and no
//! allocation of them. The [`Worker`] trait is the seam the coordinator drives (and tests use
//! to inject failures).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{Backend, Placement, TensorCoefficients};
use crate::error::{Error, Result};
use crate::eval::{RaceDecision, Racing, Scored, TaskScorer, TaskSuite};
use crate::evolve::{ExpertSet, Genome};
use crate::llama::LlamaModel;
use crate::model::HostTensor;
use crate::qd::RaceBounds;

/// Which split of the tasks to score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Fitness,
    Heldout,
}

/// A run's tasks: the fitness split (selection) and the held-out one (the final table), and
/// per task which split the table shows (`heldout`, or `fitness`/`external` without one).
pub struct Suites {
    pub fitness: TaskSuite,
    pub heldout: TaskSuite,
    pub table_split: Vec<&'static str>,
}

impl Suites {
    pub fn get(&self, split: Split) -> &TaskSuite {
        match split {
            Split::Fitness => &self.fitness,
            Split::Heldout => &self.heldout,
        }
    }

    /// The longest sequence any built-in task puts in a KV cache slot.
    pub fn longest_sequence(&self) -> usize {
        [&self.fitness, &self.heldout]
            .iter()
            .flat_map(|s| s.scorers.iter())
            .filter_map(|s| match s {
                TaskScorer::Builtin(t) => Some(t.longest_sequence()),
                TaskScorer::External(_) => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Turns genomes into scores on one device.
pub trait Worker: Send {
    /// Its name in logs and events (`cpu:0`, `cuda:3 NVIDIA H100`).
    fn name(&self) -> String;
    /// Where its materialisation sources live, for the log.
    fn placement(&self) -> Option<String> {
        None
    }
    /// Materialises `genome` and scores it on every fitness task. `Ok(Err(reason))`: the
    /// child failed (an external evaluator crashed); `Err`: this worker failed (the child may
    /// be retried elsewhere).
    /// With `race`, the evaluation may stop early once the child cannot enter an archive.
    fn evaluate(
        &mut self,
        genome: &Genome,
        label: &str,
        race: Option<&RaceBounds>,
    ) -> Result<Scored>;
    /// Scores host tensors (a baseline merge, a final-model candidate) on a split.
    fn score_tensors(
        &mut self,
        tensors: &[(String, HostTensor)],
        split: Split,
        label: &str,
    ) -> Result<Scored>;
}

/// A worker over a backend: sources placed on it once, one child model rewritten per child.
pub struct ModelWorker<B: Backend> {
    name: String,
    backend: B,
    set: Arc<ExpertSet>,
    suites: Arc<Suites>,
    sources: B::Sources,
    /// The expert-set tensor of each model weight, in the model's weight order.
    placed: Vec<usize>,
    model: LlamaModel<B>,
    /// Reused for every child.
    coefs: Vec<TensorCoefficients>,
    /// The threads of a CPU worker that shares the machine with others (`None`: the global
    /// pool).
    pool: Option<rayon::ThreadPool>,
}

impl<B: Backend> ModelWorker<B>
where
    B::Buf: Default,
{
    /// Places the set's sources on `backend` and allocates the child model. With
    /// [`Placement::Auto`], the reserve left free is estimated here from the model and the
    /// tasks (the child's weights, then a KV cache for a full batch of the longest task).
    pub fn new(
        name: String,
        backend: B,
        set: Arc<ExpertSet>,
        suites: Arc<Suites>,
        placement: Option<Placement>,
        pool: Option<rayon::ThreadPool>,
    ) -> Result<Self> {
        let config = set.base.config().clone();
        let names = LlamaModel::<B>::weight_names(&config);
        let index: HashMap<&str, usize> = set
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let placed: Vec<usize> = names
            .iter()
            .map(|n| {
                index
                    .get(n.as_str())
                    .copied()
                    .ok_or_else(|| Error::tensor(n, "the model needs it and the base lacks it"))
            })
            .collect::<Result<_>>()?;
        // The child's weights first: they are what every placement must leave room for.
        let model = LlamaModel::from_weights(config, |name| {
            let (dtype, shape) = set.base.meta(name)?;
            backend.zeros_weight(shape, dtype)
        })?;
        let placement = placement.unwrap_or(Placement::Auto {
            reserve_bytes: inference_reserve(&set, &suites),
        });
        let sources = backend.place_sources(
            placed
                .iter()
                .map(|&t| set.tensor_sources(t))
                .collect::<Result<_>>()?,
            placement,
        )?;
        let coefs = vec![TensorCoefficients::default(); placed.len()];
        Ok(ModelWorker {
            name,
            backend,
            set,
            suites,
            sources,
            placed,
            model,
            coefs,
            pool,
        })
    }

    /// The child model (its weights hold the last child materialised).
    pub fn model(&self) -> &LlamaModel<B> {
        &self.model
    }

    /// Writes `genome` into the child model's weights.
    pub fn materialize(&mut self, genome: &Genome) -> Result<()> {
        Self::in_pool(&self.pool, || {
            write_child(
                &self.backend,
                &self.set,
                &self.placed,
                &mut self.coefs,
                &mut self.model,
                &mut self.sources,
                genome,
            )
        })
    }

    fn in_pool<T: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
        match pool {
            Some(p) => p.install(f),
            None => crate::backend::on_compute_threads::<B, T>(f),
        }
    }
}

/// Writes `genome` into `model`'s weights from the placed sources.
fn write_child<B: Backend>(
    backend: &B,
    set: &ExpertSet,
    placed: &[usize],
    coefs: &mut [TensorCoefficients],
    model: &mut LlamaModel<B>,
    sources: &mut B::Sources,
    genome: &Genome,
) -> Result<()> {
    if set.crossover.is_some() {
        // A merge method's child is made on the host, tensor by tensor, and uploaded (see
        // `evolve::crossover`): no backend has the methods as a fused kernel.
        for (w, &t) in model.weights_mut().into_iter().zip(placed) {
            *w = backend.upload_weight(&set.materialize_tensor(genome, t)?)?;
        }
        return Ok(());
    }
    for (coef, &t) in coefs.iter_mut().zip(placed) {
        set.coefficients_into(genome, t, coef);
    }
    backend.materialize_into(&mut model.weights_mut(), sources, coefs)
}

/// The child as host tensors in the set's order, for an external evaluator's export: the
/// model's weights downloaded (no copy on the CPU), any tensor the model does not use
/// materialised on the host.
fn child_tensors<B: Backend>(
    backend: &B,
    set: &ExpertSet,
    placed: &[usize],
    model: &LlamaModel<B>,
    genome: &Genome,
) -> Result<Vec<(String, HostTensor)>> {
    let weights = model.weights();
    let by_tensor: HashMap<usize, usize> =
        placed.iter().enumerate().map(|(w, &t)| (t, w)).collect();
    (0..set.tensors.len())
        .map(|t| {
            let tensor = match by_tensor.get(&t) {
                Some(&w) => backend.download_weight(weights[w])?,
                None => set.materialize_tensor(genome, t)?,
            };
            Ok((set.tensors[t].name.clone(), tensor))
        })
        .collect()
}

/// Bytes a device keeps free beside the sources: a KV cache (keys and values of every layer,
/// counted as f32, the wider of a cache's dtypes) for a full scoring batch of the longest
/// task's sequences, plus activations.
fn inference_reserve(set: &ExpertSet, suites: &Suites) -> usize {
    let c = set.base.config();
    let per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4;
    let seqs = suites.fitness.batch.max(suites.heldout.batch);
    let kv = per_token
        .saturating_mul(suites.longest_sequence().max(1))
        .saturating_mul(seqs);
    let activations = seqs
        .saturating_mul(suites.longest_sequence().max(1))
        .saturating_mul(c.hidden_size.max(c.intermediate_size) * 4 * 4);
    kv.saturating_add(activations).saturating_add(1 << 30)
}

impl<B: Backend> Worker for ModelWorker<B>
where
    B::Buf: Default,
{
    fn name(&self) -> String {
        self.name.clone()
    }

    fn placement(&self) -> Option<String> {
        Some(self.backend.describe_sources(&self.sources))
    }

    fn evaluate(
        &mut self,
        genome: &Genome,
        label: &str,
        race: Option<&RaceBounds>,
    ) -> Result<Scored> {
        let ModelWorker {
            backend,
            set,
            suites,
            sources,
            placed,
            model,
            coefs,
            pool,
            ..
        } = self;
        Self::in_pool(pool, || {
            write_child(backend, set, placed, coefs, model, sources, genome)?;
            let suite = &suites.fitness;
            let mut export = |dir: &Path| -> Result<()> {
                suite.export(dir, &child_tensors(backend, set, placed, model, genome)?)
            };
            let decide = |iv: &[(f64, f64)]| match race {
                Some(r) => r.decide(iv),
                None => RaceDecision::Finish,
            };
            let racing = race.map(|r| Racing {
                batch: r.batch,
                growth: r.growth,
                seed: r.seed,
                delta: r.delta,
                raced: r.raced.clone(),
                decide: &decide,
            });
            suite.score_model_raced(backend, model, label, &mut export, racing.as_ref())
        })
    }

    fn score_tensors(
        &mut self,
        tensors: &[(String, HostTensor)],
        split: Split,
        label: &str,
    ) -> Result<Scored> {
        let (backend, suites) = (&self.backend, &self.suites);
        Self::in_pool(&self.pool, || {
            suites.get(split).score_tensors(backend, tensors, label)
        })
    }
}
