//! The CycleQD loop's state and operators (`cycleqd.md` §1), on genomes: one archive per task;
//! child `n` takes the quality task `n mod K`, draws two parents from that archive by elite
//! sampling, crosses them over and mutates along the quality expert's singular directions
//! ([`Population::breed`]); its scores on every task are offered to every archive
//! ([`Population::apply`]). All randomness of child `n` comes from an RNG seeded by
//! `(run seed, n)`, so a child bred from the same archives is the same child: a run replays
//! exactly and resumes from any checkpoint. Who evaluates children, and when results are
//! applied, is the coordinator's business (`crate::run`).

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::archive::{AddStatus, ArchiveStats, EliteSampling, GridArchive};
use super::racing::RaceBounds;
use crate::error::{Error, Result};
use crate::eval::Evaluation;
use crate::evolve::{ExpertSet, Genome};

/// The operators' parameters.
#[derive(Clone, Debug)]
pub struct Operators {
    pub seed: u64,
    pub crossover_mean: f32,
    pub crossover_std: f32,
    /// Coefficient group of each tensor (all 0: model-wise; per layer; or one per tensor).
    pub groups: Vec<usize>,
    pub mutation_w_max: f32,
    pub sampling: EliteSampling,
}

/// An evaluated individual; its genome is kept beside it while some archive holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Individual {
    pub id: String,
    /// Fitness per task, in task order.
    pub fitness: Vec<f64>,
    /// Per task, what each example gave (empty for tasks without per-example results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<ExampleScores>,
}

/// One task's per-example results, compact: `"10.1"` (each example right, wrong, or not
/// scored) when every score is 0 or 1, else the scores (null: not scored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExampleScores {
    Bits(String),
    Values(Vec<Option<f64>>),
}

impl ExampleScores {
    pub fn of(values: &[Option<f64>]) -> ExampleScores {
        if values.iter().flatten().all(|&v| v == 0.0 || v == 1.0) {
            ExampleScores::Bits(
                values
                    .iter()
                    .map(|v| match v {
                        Some(x) if *x == 1.0 => '1',
                        Some(_) => '0',
                        None => '.',
                    })
                    .collect(),
            )
        } else {
            ExampleScores::Values(values.to_vec())
        }
    }

    /// Each example's score, `None` where not scored.
    pub fn values(&self) -> Vec<Option<f64>> {
        match self {
            ExampleScores::Bits(b) => b
                .chars()
                .map(|c| match c {
                    '1' => Some(1.0),
                    '0' => Some(0.0),
                    _ => None,
                })
                .collect(),
            ExampleScores::Values(v) => v.clone(),
        }
    }
}

impl Individual {
    pub fn mean_fitness(&self) -> f64 {
        self.fitness.iter().sum::<f64>() / self.fitness.len().max(1) as f64
    }
}

/// The archives' statistics after some number of evaluations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub evaluations: u64,
    pub stats: Vec<ArchiveStats>,
}

/// Everything the loop owns: the archives, the individuals they hold, and the history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Population {
    pub tasks: Vec<String>,
    /// Children evaluated and applied so far (child numbers are 1-based; with several
    /// workers they need not have been applied in number order).
    pub children_done: u64,
    pub failed: u64,
    pub archives: Vec<GridArchive<String>>,
    /// Individuals held by at least one archive, by id.
    pub individuals: BTreeMap<String, Individual>,
    #[serde(skip)]
    pub genomes: BTreeMap<String, Arc<Genome>>,
    /// The experts as first evaluated (kept for the report even once displaced).
    pub experts: Vec<Individual>,
    /// The archives' statistics after every evaluation. Not checkpointed (it grows with the
    /// run): [`Population::replay_history`] rebuilds it from the event log.
    #[serde(skip)]
    pub history: Vec<HistoryPoint>,
    /// Examples scored over all children applied, and what full evaluations would have
    /// scored (they differ when racing stops children early).
    #[serde(default)]
    pub examples_scored: u64,
    #[serde(default)]
    pub examples_full: u64,
    /// Children whose evaluation racing stopped early.
    #[serde(default)]
    pub stopped_early: u64,
}

/// A child to evaluate: what [`Population::breed`] made of child number `child`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildSpec {
    pub child: u64,
    /// Index of the quality task.
    pub quality_task: usize,
    /// Index of the archive the parents came from (the quality task's, unless it had < 2
    /// elites).
    pub parents_from: usize,
    pub parents: [String; 2],
    /// `[ω₁, ω₂]` per coefficient group.
    pub crossover_weights: Vec<[f32; 2]>,
    /// The RNG of this child is seeded by `(run seed, child)`.
    pub seed: [u64; 2],
    /// Stored beside the spec in checkpoints (as an f32 tensor), not in its JSON. Shared:
    /// the archives keep the same genome when the child enters them.
    #[serde(skip)]
    pub genome: Arc<Genome>,
    /// With racing: what the child must beat (shared by the children bred from one
    /// snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub race: Option<Arc<RaceBounds>>,
}

impl ChildSpec {
    /// The child's id: `child-{n}`.
    pub fn id(&self) -> String {
        child_id(self.child)
    }
}

/// The id of child `n`.
pub fn child_id(n: u64) -> String {
    format!("child-{n}")
}

/// What evaluating a child gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A score per task, in task order, with the examples' results (a child stopped early by
    /// racing enters no archive).
    Scored(Evaluation),
    /// The reason the child could not be scored (it enters no archive).
    Failed(String),
}

/// One line of `events.jsonl`: a child as it was told to the archives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildEvent {
    pub child: u64,
    pub id: String,
    pub quality_task: String,
    /// The archive the parents came from (the quality task's, unless it had < 2 elites).
    pub parents_from: String,
    pub parents: [String; 2],
    /// `[ω₁, ω₂]` per coefficient group.
    pub crossover_weights: Vec<[f32; 2]>,
    /// The RNG of this child is seeded by `(run seed, child)`.
    pub seed: [u64; 2],
    pub scores: Option<Vec<f64>>,
    pub failed: Option<String>,
    /// Archives the child entered, with how.
    pub entered: BTreeMap<String, AddStatus>,
    /// Seconds the worker spent on it.
    pub seconds: f64,
    /// The worker that ran it (the last one, when it was retried).
    #[serde(default)]
    pub worker: String,
    /// Evaluations it took (2 when a failing worker's child was retried on another).
    #[serde(default = "one_attempt")]
    pub attempts: u32,
    /// Racing stopped it early: the means of the examples it was scored on (it entered
    /// nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimates: Option<Vec<f64>>,
    /// Per task, what each example gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<BTreeMap<String, ExampleScores>>,
    /// Per task, the examples scored and the task's examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples_scored: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples_full: Option<Vec<usize>>,
    /// With external evaluators: the tasks whose evaluator reached the child over HTTP
    /// (`serve = true`), and whether a checkpoint of it was written for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_written: Option<bool>,
}

fn one_attempt() -> u32 {
    1
}

/// The RNG of child `n` of a run.
pub fn child_rng(seed: u64, n: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&n.to_le_bytes());
    s[16..24].copy_from_slice(b"cycleqd!");
    ChaCha8Rng::from_seed(s)
}

/// Coefficient groups for crossover: `model` → one, `layer` → one per `model.layers.{i}` plus
/// one for all other tensors, `tensor` → one per tensor.
pub fn coefficient_groups(names: &[&str], granularity: super::config::Granularity) -> Vec<usize> {
    use super::config::Granularity::*;
    match granularity {
        Model => vec![0; names.len()],
        Tensor => (0..names.len()).collect(),
        Layer => names
            .iter()
            .map(|n| {
                n.strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
                    .map_or(0, |i| i + 1)
            })
            .collect(),
    }
}

impl Population {
    /// Archives for `tasks` (measure ranges per task, `bins` per measure), seeded with the
    /// experts: expert `k` has `fitness[k]` and genome [`Genome::seed`]`(k)`.
    pub fn new(
        set: &ExpertSet,
        tasks: Vec<String>,
        ranges: &[(f64, f64)],
        bins: usize,
        expert_fitness: Vec<impl Into<Evaluation>>,
    ) -> Result<Population> {
        let k = tasks.len();
        if set.experts.len() != k || ranges.len() != k || expert_fitness.len() != k {
            return Err(Error::invalid(format!(
                "{k} tasks need {k} experts, ranges and expert scores"
            )));
        }
        let archives = (0..k)
            .map(|q| {
                let r = (0..k).filter(|&d| d != q).map(|d| ranges[d]).collect();
                GridArchive::new(bins, r, 0.0)
            })
            .collect::<Result<_>>()?;
        let mut pop = Population {
            tasks,
            children_done: 0,
            failed: 0,
            archives,
            individuals: BTreeMap::new(),
            genomes: BTreeMap::new(),
            experts: vec![],
            history: vec![],
            examples_scored: 0,
            examples_full: 0,
            stopped_early: 0,
        };
        for (e, ev) in expert_fitness.into_iter().enumerate() {
            let ev: Evaluation = ev.into();
            let ind = Individual {
                id: format!("expert-{}", pop.tasks[e]),
                fitness: ev.scores,
                examples: if ev.examples.iter().all(Vec::is_empty) {
                    vec![]
                } else {
                    ev.examples.iter().map(|x| ExampleScores::of(x)).collect()
                },
            };
            pop.experts.push(ind.clone());
            pop.offer(ind, Arc::new(Genome::seed(set, e)))?;
        }
        pop.record(k as u64);
        Ok(pop)
    }

    /// Offers an evaluated individual to every archive (objective `f[k]`, measures the other
    /// scores); keeps it if any archive took it and drops individuals no archive holds.
    pub fn offer(
        &mut self,
        ind: Individual,
        genome: Arc<Genome>,
    ) -> Result<BTreeMap<String, AddStatus>> {
        let mut entered = BTreeMap::new();
        let mut displaced = vec![];
        for (k, archive) in self.archives.iter_mut().enumerate() {
            let measures: Vec<f64> = (0..ind.fitness.len())
                .filter(|&d| d != k)
                .map(|d| ind.fitness[d])
                .collect();
            let (status, old) = archive.insert(ind.id.clone(), ind.fitness[k], &measures)?;
            if status != AddStatus::NotAdded {
                entered.insert(self.tasks[k].clone(), status);
            }
            displaced.extend(old);
        }
        if !entered.is_empty() {
            self.genomes.insert(ind.id.clone(), genome);
            self.individuals.insert(ind.id.clone(), ind);
        }
        // An individual leaves with its last cell.
        for id in displaced {
            if !self
                .archives
                .iter()
                .any(|a| a.elites().any(|e| e.solution == id))
            {
                self.individuals.remove(&id);
                self.genomes.remove(&id);
            }
        }
        Ok(entered)
    }

    /// The history of a run whose applied children are `events` (in the order they were
    /// applied): the experts, then each scored child offered to fresh archives of the same
    /// grids, exactly as the run did.
    pub fn replay_history<'a>(
        &self,
        events: impl IntoIterator<Item = &'a ChildEvent>,
    ) -> Result<Vec<HistoryPoint>> {
        let k = self.tasks.len();
        let mut archives: Vec<GridArchive<()>> =
            self.archives.iter().map(|a| a.empty_like()).collect();
        let offer = |archives: &mut Vec<GridArchive<()>>, f: &[f64]| -> Result<()> {
            for (q, a) in archives.iter_mut().enumerate() {
                let measures: Vec<f64> = (0..f.len()).filter(|&d| d != q).map(|d| f[d]).collect();
                a.add((), f[q], &measures)?;
            }
            Ok(())
        };
        for e in &self.experts {
            offer(&mut archives, &e.fitness)?;
        }
        let stats = |archives: &[GridArchive<()>]| archives.iter().map(|a| a.stats()).collect();
        let mut history = vec![HistoryPoint {
            evaluations: k as u64,
            stats: stats(&archives),
        }];
        for (i, ev) in events.into_iter().enumerate() {
            if let Some(f) = &ev.scores {
                offer(&mut archives, f)?;
            }
            history.push(HistoryPoint {
                evaluations: (k + i + 1) as u64,
                stats: stats(&archives),
            });
        }
        Ok(history)
    }

    /// The population a run whose applied children are `events` holds (archives, individuals,
    /// counts, history), rebuilt from this one's grids and experts without genomes: what
    /// `report` draws for a run whose log runs past its last checkpoint.
    pub fn replayed<'a>(
        &self,
        events: impl IntoIterator<Item = &'a ChildEvent> + Clone,
    ) -> Result<Population> {
        let mut pop = Population {
            tasks: self.tasks.clone(),
            children_done: 0,
            failed: 0,
            archives: self.archives.iter().map(|a| a.empty_like()).collect(),
            individuals: BTreeMap::new(),
            genomes: BTreeMap::new(),
            experts: self.experts.clone(),
            history: vec![],
            examples_scored: self.examples_scored,
            examples_full: self.examples_full,
            stopped_early: self.stopped_early,
        };
        let none = Arc::new(Genome::default());
        for e in &self.experts {
            pop.offer(e.clone(), none.clone())?;
        }
        for ev in events.clone() {
            pop.children_done += 1;
            match &ev.scores {
                Some(f) => {
                    let ind = Individual {
                        id: ev.id.clone(),
                        fitness: f.clone(),
                        examples: vec![],
                    };
                    pop.offer(ind, none.clone())?;
                }
                None => pop.failed += u64::from(ev.failed.is_some()),
            }
        }
        pop.genomes.clear();
        pop.history = pop.replay_history(events)?;
        Ok(pop)
    }

    fn record(&mut self, evaluations: u64) {
        self.history.push(HistoryPoint {
            evaluations,
            stats: self.archives.iter().map(|a| a.stats()).collect(),
        });
    }

    /// A copy of everything a checkpoint records (the history is not: it is replayed from the
    /// log). Cheap: genomes are shared, not copied.
    pub fn snapshot(&self) -> Population {
        Population {
            tasks: self.tasks.clone(),
            children_done: self.children_done,
            failed: self.failed,
            archives: self.archives.clone(),
            individuals: self.individuals.clone(),
            genomes: self.genomes.clone(),
            experts: self.experts.clone(),
            history: vec![],
            examples_scored: self.examples_scored,
            examples_full: self.examples_full,
            stopped_early: self.stopped_early,
        }
    }

    /// Evaluations so far (experts included).
    pub fn evaluations(&self) -> u64 {
        self.tasks.len() as u64 + self.children_done
    }

    /// Breeds child `n` from the archives as they are now: parents by elite sampling from
    /// the quality task's archive (else the fullest archive that can breed), crossover and
    /// SVD mutation, every draw from the child's own RNG. Changes nothing.
    pub fn breed(&self, n: u64, set: &ExpertSet, ops: &Operators) -> Result<ChildSpec> {
        let k = self.tasks.len();
        let q = ((n - 1) % k as u64) as usize;
        let mut rng = child_rng(ops.seed, n);

        let from = if self.archives[q].len() >= 2 {
            q
        } else {
            (0..k)
                .filter(|&a| self.archives[a].len() >= 2)
                .max_by_key(|&a| (self.archives[a].len(), std::cmp::Reverse(a)))
                .ok_or_else(|| Error::invalid("no archive has 2 elites to breed from"))?
        };
        let (i1, i2) = ops.sampling.sample_pair(&self.archives[from], &mut rng)?;
        let elites: Vec<&String> = self.archives[from].elites().map(|e| &e.solution).collect();
        let (p1, p2) = (elites[i1].clone(), elites[i2].clone());

        let groups = ops.groups.iter().copied().max().map_or(0, |g| g + 1);
        let normal = Normal::new(ops.crossover_mean, ops.crossover_std)
            .map_err(|e| Error::invalid(format!("crossover coefficients: {e}")))?;
        let weights: Vec<[f32; 2]> = (0..groups)
            .map(|_| {
                // ω ≤ 0 would flip or blow up the normalised merge: redraw (never happens at
                // the default σ = 0.01).
                let mut draw = || loop {
                    let w = normal.sample(&mut rng);
                    if w > 0.0 {
                        break w;
                    }
                };
                [draw(), draw()]
            })
            .collect();
        let (g1, g2) = (&self.genomes[&p1], &self.genomes[&p2]);
        let w1: Vec<f32> = ops.groups.iter().map(|&g| weights[g][0]).collect();
        let w2: Vec<f32> = ops.groups.iter().map(|&g| weights[g][1]).collect();
        let mut genome = Genome::crossover_per_tensor(g1, g2, &w1, &w2);
        let w = Genome::draw_mutation(set, q, ops.mutation_w_max, &mut rng);
        genome.mutate(set, q, &w, ops.mutation_w_max);
        Ok(ChildSpec {
            child: n,
            quality_task: q,
            parents_from: from,
            parents: [p1, p2],
            crossover_weights: weights,
            seed: [ops.seed, n],
            genome: Arc::new(genome),
            race: None,
        })
    }

    /// Applies an evaluated child: a scored one is offered to every archive (scores that are
    /// not one finite value per task mark it failed). Returns the child's event without its
    /// timing (the caller fills `seconds`, `worker` and `attempts`).
    pub fn apply(&mut self, spec: &ChildSpec, outcome: Outcome) -> Result<ChildEvent> {
        let k = self.tasks.len();
        let id = spec.id();
        self.children_done += 1;
        let mut estimates = None;
        let (mut examples, mut scored, mut full) = (None, None, None);
        let (mut served, mut checkpoint_written) = (None, None);
        let (scores, failed, entered) = match outcome {
            Outcome::Scored(ev)
                if ev.scores.len() == k && ev.scores.iter().all(|x| x.is_finite()) =>
            {
                if !ev.served.is_empty() || ev.exported {
                    served = Some(ev.served.iter().map(|&t| self.tasks[t].clone()).collect());
                    checkpoint_written = Some(ev.exported);
                }
                let counts = ev.examples_scored();
                self.examples_scored += counts.iter().map(|c| c.0 as u64).sum::<u64>();
                self.examples_full += counts.iter().map(|c| c.1 as u64).sum::<u64>();
                let compact: Vec<ExampleScores> = if ev.examples.iter().all(Vec::is_empty) {
                    vec![]
                } else {
                    ev.examples.iter().map(|e| ExampleScores::of(e)).collect()
                };
                if !compact.is_empty() {
                    examples = Some(
                        self.tasks
                            .iter()
                            .cloned()
                            .zip(compact.iter().cloned())
                            .filter(|(_, e)| !matches!(e, ExampleScores::Bits(b) if b.is_empty()))
                            .collect(),
                    );
                    scored = Some(counts.iter().map(|c| c.0).collect());
                    full = Some(counts.iter().map(|c| c.1).collect());
                }
                if ev.stopped_early {
                    self.stopped_early += 1;
                    estimates = Some(ev.scores);
                    (None, None, BTreeMap::new())
                } else {
                    let entered = self.offer(
                        Individual {
                            id: id.clone(),
                            fitness: ev.scores.clone(),
                            examples: compact,
                        },
                        spec.genome.clone(),
                    )?;
                    (Some(ev.scores), None, entered)
                }
            }
            Outcome::Scored(ev) => {
                let f = ev.scores;
                self.failed += 1;
                (
                    None,
                    Some(format!(
                        "evaluator returned {} scores for {k} tasks, or a non-finite one ({f:?})",
                        f.len()
                    )),
                    BTreeMap::new(),
                )
            }
            Outcome::Failed(reason) => {
                self.failed += 1;
                (None, Some(reason), BTreeMap::new())
            }
        };
        self.record(self.evaluations());
        Ok(ChildEvent {
            child: spec.child,
            id,
            quality_task: self.tasks[spec.quality_task].clone(),
            parents_from: self.tasks[spec.parents_from].clone(),
            parents: spec.parents.clone(),
            crossover_weights: spec.crossover_weights.clone(),
            seed: spec.seed,
            scores,
            failed,
            entered,
            seconds: 0.0,
            worker: String::new(),
            attempts: 1,
            estimates,
            examples,
            examples_scored: scored,
            examples_full: full,
            served,
            checkpoint_written,
        })
    }

    /// Each archive's best elite (highest objective; the first cell on ties).
    pub fn best_per_archive(&self) -> Vec<&Individual> {
        self.archives
            .iter()
            .map(|a| &self.individuals[&a.best().expect("archives hold the experts").solution])
            .collect()
    }

    /// The held individual with the highest mean fitness (the lowest id on ties).
    pub fn best_mean(&self) -> &Individual {
        let mut best: Option<&Individual> = None;
        for ind in self.individuals.values() {
            if best.is_none_or(|b| ind.mean_fitness() > b.mean_fitness()) {
                best = Some(ind);
            }
        }
        best.expect("archives hold the experts")
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::Granularity;
    use super::*;

    #[test]
    fn coefficient_groups_follow_the_granularity() {
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.mlp.up_proj.weight",
            "lm_head.weight",
        ];
        assert_eq!(coefficient_groups(&names, Granularity::Model), [0; 5]);
        assert_eq!(
            coefficient_groups(&names, Granularity::Layer),
            [0, 1, 1, 2, 0]
        );
        assert_eq!(
            coefficient_groups(&names, Granularity::Tensor),
            [0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn child_rngs_differ_by_child_and_by_run_seed() {
        use rand::Rng;
        let draw = |s, n| child_rng(s, n).random::<u64>();
        assert_ne!(draw(7, 3), draw(7, 4));
        assert_ne!(draw(7, 3), draw(8, 3));
        // The seed bytes are (seed, n) little-endian: swapping them is another stream.
        assert_ne!(draw(3, 7), draw(7, 3));
    }
}
