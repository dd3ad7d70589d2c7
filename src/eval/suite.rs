//! A run's tasks as one scorer: the built-in JSONL tasks of all skills are scored together in
//! one batched pass over a model already on its backend (a child written in place by a worker,
//! or host tensors of a merge or a final-model candidate); tasks with an external evaluator get
//! an exported copy of the model in a work folder. A model is never re-read from disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::llama::LlamaModel;
use crate::model::export::export_tensors;
use crate::model::{HostTensor, LlamaConfig, Tokenizer};

use super::external::ModelAt;
use super::racing;
use super::score::evaluate_some;
use super::{ExternalEvaluator, PreparedTask};

/// A model's evaluation: a score per task and, for the built-in tasks, what each example gave.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// Per task, in task order. With `stopped_early`, the mean of the examples scored.
    pub scores: Vec<f64>,
    /// Per task: each example's score in the file's order, `None` where it was not scored
    /// (racing stopped first); empty for a task scored by an external evaluator (and for
    /// evaluations made without per-example results).
    pub examples: Vec<Vec<Option<f64>>>,
    /// Racing showed the final scores could not matter, and stopped.
    pub stopped_early: bool,
    /// Tasks (by index) whose evaluator reached the model over HTTP (`serve = true`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served: Vec<usize>,
    /// A checkpoint of the model was written for the other external evaluators.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exported: bool,
}

impl Evaluation {
    /// Scores alone (an external evaluator, a simulated device).
    pub fn scores(scores: Vec<f64>) -> Evaluation {
        Evaluation {
            scores,
            ..Evaluation::default()
        }
    }

    /// Per task, the examples scored and the task's examples (0 and 0 without per-example
    /// results).
    pub fn examples_scored(&self) -> Vec<(usize, usize)> {
        (0..self.scores.len())
            .map(|t| match self.examples.get(t) {
                Some(e) => (e.iter().filter(|x| x.is_some()).count(), e.len()),
                None => (0, 0),
            })
            .collect()
    }
}

impl From<Vec<f64>> for Evaluation {
    fn from(scores: Vec<f64>) -> Evaluation {
        Evaluation::scores(scores)
    }
}

/// A model's evaluation, or why it could not be had (an external evaluator failed, the
/// model's outputs were not finite: the child is marked failed and the run goes on).
pub type Scored = std::result::Result<Evaluation, String>;

/// How to race an evaluation (see [`super::racing`]).
pub struct Racing<'a> {
    /// Examples per raced task in the first round.
    pub batch: usize,
    /// How much each round grows over the one before (see [`racing::round_size`]).
    pub growth: f64,
    /// Seed of the examples' order.
    pub seed: u64,
    /// Miscoverage of each task's interval (the caller's confidence, split over the tasks and
    /// rounds it may look at).
    pub delta: f64,
    /// Per task: raced, or scored whole in the first round.
    pub raced: Vec<bool>,
    /// What to do given final scores within these intervals (one per task).
    pub decide: &'a Decide<'a>,
}

/// What racing does after a round, given intervals of the final scores (one per task).
pub type Decide<'a> = dyn Fn(&[(f64, f64)]) -> RaceDecision + 'a;

/// The next step of a raced evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaceDecision {
    /// The final scores cannot matter: stop here.
    Stop,
    /// They may or may not: score the next round.
    Continue,
    /// They will matter (the model will be scored whole): every remaining example in one
    /// round.
    Finish,
}

/// How one task is scored.
pub enum TaskScorer {
    Builtin(Box<PreparedTask>),
    External(ExternalEvaluator),
}

/// The tasks of one split (fitness or held-out), in task order.
pub struct TaskSuite {
    pub names: Vec<String>,
    pub scorers: Vec<TaskScorer>,
    pub config: LlamaConfig,
    /// config.json of exported copies.
    pub config_json: Value,
    /// Where tokenizer and companion files of exported copies come from (the base).
    pub companions: PathBuf,
    pub tokenizer: Option<Tokenizer>,
    pub work_dir: PathBuf,
    pub batch: usize,
}

impl TaskSuite {
    /// Whether some task needs an exported copy of the model.
    pub fn has_external(&self) -> bool {
        self.scorers
            .iter()
            .any(|s| matches!(s, TaskScorer::External(_)))
    }

    /// Scores `model` (on `backend`) on every task. `export` writes the model as a checkpoint
    /// directory; it is called only when a task has an external evaluator.
    pub fn score_model<B: Backend>(
        &self,
        backend: &B,
        model: &LlamaModel<B>,
        label: &str,
        export: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<Scored>
    where
        B::Buf: Default,
    {
        self.score_model_raced(backend, model, label, export, None)
    }

    /// [`TaskSuite::score_model`], racing the built-in tasks `racing` marks: their examples
    /// are scored in rounds in a seeded order, and the evaluation stops as soon as the final
    /// scores' intervals show they cannot matter (then the external evaluators are not run:
    /// the model enters nothing).
    pub fn score_model_raced<B: Backend>(
        &self,
        backend: &B,
        model: &LlamaModel<B>,
        label: &str,
        export: &mut dyn FnMut(&Path) -> Result<()>,
        racing: Option<&Racing>,
    ) -> Result<Scored>
    where
        B::Buf: Default,
    {
        let k = self.scorers.len();
        let mut ev = Evaluation {
            scores: vec![f64::NAN; k],
            examples: vec![vec![]; k],
            ..Evaluation::default()
        };
        let builtin: Vec<(usize, &PreparedTask)> = self
            .scorers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                TaskScorer::Builtin(t) => Some((i, t.as_ref())),
                TaskScorer::External(_) => None,
            })
            .collect();
        if !builtin.is_empty() {
            let tok = self
                .tokenizer
                .as_ref()
                .ok_or_else(|| Error::invalid("built-in tasks need the base's tokenizer.json"))?;
            let tasks: Vec<&PreparedTask> = builtin.iter().map(|(_, t)| *t).collect();
            for (i, t) in &builtin {
                ev.examples[*i] = vec![None; t.len()];
            }
            // Each built-in task's examples in rounds: a raced task's in its seeded order, in
            // rounds that grow from `batch`, the others whole in the first round.
            let orders: Vec<Vec<usize>> = builtin
                .iter()
                .map(|(i, t)| match racing {
                    Some(r) if r.raced[*i] => racing::order(t.len(), r.seed, *i),
                    _ => (0..t.len()).collect(),
                })
                .collect();
            let mut step: Vec<usize> = builtin
                .iter()
                .map(|(i, t)| match racing {
                    Some(r) if r.raced[*i] => racing::round_size(r.batch, r.growth, 0),
                    _ => t.len(),
                })
                .collect();
            let mut done = vec![0usize; builtin.len()];
            let mut round = 0;
            loop {
                let mut include: Vec<Vec<bool>> =
                    tasks.iter().map(|t| vec![false; t.len()]).collect();
                let mut any = false;
                for b in 0..builtin.len() {
                    let next = done[b].saturating_add(step[b]).min(orders[b].len());
                    for &e in &orders[b][done[b]..next] {
                        include[b][e] = true;
                        any = true;
                    }
                    done[b] = next;
                }
                if !any {
                    break;
                }
                let results = match evaluate_some(model, backend, tok, &tasks, self.batch, &include)
                {
                    // The model, not the machine, is at fault: the child failed.
                    Err(Error::NonFiniteOutput(why)) => return Ok(Err(why)),
                    r => r?,
                };
                for (b, r) in results.iter().enumerate() {
                    let i = builtin[b].0;
                    for (e, &v) in r.per_example.iter().enumerate() {
                        if include[b][e] {
                            ev.examples[i][e] = Some(v);
                        }
                    }
                }
                let Some(race) = racing else { continue };
                if done.iter().zip(&orders).all(|(d, o)| *d == o.len()) {
                    break;
                }
                // Intervals of the final scores: raced tasks from their examples so far,
                // the rest exact (external tasks: anything, they are not scored yet).
                let intervals: Vec<(f64, f64)> = (0..k)
                    .map(|i| match builtin.iter().position(|(j, _)| *j == i) {
                        Some(b) => {
                            let seen: Vec<f64> = ev.examples[i].iter().flatten().copied().collect();
                            let sum: f64 = seen.iter().sum();
                            racing::interval(
                                sum,
                                seen.len(),
                                tasks[b].len(),
                                race.delta,
                                tasks[b].binary(),
                            )
                        }
                        None => (f64::NEG_INFINITY, f64::INFINITY),
                    })
                    .collect();
                round += 1;
                match (race.decide)(&intervals) {
                    RaceDecision::Stop => {
                        ev.stopped_early = true;
                        break;
                    }
                    RaceDecision::Finish => step.iter_mut().for_each(|s| *s = usize::MAX),
                    RaceDecision::Continue => {
                        for (b, (i, _)) in builtin.iter().enumerate() {
                            if race.raced[*i] {
                                step[b] = racing::round_size(race.batch, race.growth, round);
                            }
                        }
                    }
                }
            }
            for (i, _) in &builtin {
                let seen: Vec<f64> = ev.examples[*i].iter().flatten().copied().collect();
                ev.scores[*i] = seen.iter().sum::<f64>() / seen.len().max(1) as f64;
            }
            if ev.stopped_early {
                return Ok(Ok(ev));
            }
        }
        // Served evaluators talk to the model where it is; the others get an exported copy.
        for (i, s) in self.scorers.iter().enumerate() {
            if let TaskScorer::External(evaluator) = s {
                if !evaluator.serve {
                    continue;
                }
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    Error::invalid("a served evaluator needs the base's tokenizer.json")
                })?;
                let opts = crate::serve::ServeOptions {
                    model_name: label.to_string(),
                    ..crate::serve::ServeOptions::default()
                };
                let chat = tok.chat_template()?.cloned();
                let name = &self.names[i];
                let scored = crate::serve::serve_model(backend, model, tok, chat, &opts, |url| {
                    evaluator.score_at(
                        ModelAt::Served {
                            base_url: url,
                            model_name: label,
                        },
                        name,
                    )
                })?;
                ev.served.push(i);
                match scored {
                    Ok(x) => ev.scores[i] = x,
                    Err(reason) => return Ok(Err(format!("task {name}: {reason}"))),
                }
            }
        }
        let exported = self
            .scorers
            .iter()
            .any(|s| matches!(s, TaskScorer::External(e) if !e.serve));
        if exported {
            let dir = self.work_dir.join(label);
            export(&dir)?;
            ev.exported = true;
            let outcome = self.score_external(&dir, &mut ev.scores);
            remove_quietly(&dir);
            if let Err(reason) = outcome {
                return Ok(Err(reason));
            }
        }
        Ok(Ok(ev))
    }

    /// Scores host tensors (a merge, a final-model candidate, a checkpoint's views) on
    /// `backend`: the weights are uploaded there for the built-in tasks.
    pub fn score_tensors<B: Backend>(
        &self,
        backend: &B,
        tensors: &[(String, HostTensor)],
        label: &str,
    ) -> Result<Scored>
    where
        B::Buf: Default,
    {
        let map: BTreeMap<&str, &HostTensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let model = LlamaModel::from_tensors(backend, self.config.clone(), |name| {
            map.get(name)
                .map(|t| (*t).clone())
                .ok_or_else(|| Error::tensor(name, "missing from the model being scored"))
        })?;
        self.score_model(backend, &model, label, &mut |dir| self.export(dir, tensors))
    }

    /// Writes `tensors` as a checkpoint directory an external evaluator can load.
    pub fn export(&self, dir: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
        export_tensors(
            dir,
            tensors,
            &self.config_json,
            Some(&self.companions),
            u64::MAX,
        )
    }

    fn score_external(&self, dir: &Path, scores: &mut [f64]) -> std::result::Result<(), String> {
        for (i, s) in self.scorers.iter().enumerate() {
            if let TaskScorer::External(ev) = s {
                if ev.serve {
                    continue;
                }
                scores[i] = ev
                    .score(dir, &self.names[i])
                    .map_err(|e| format!("task {}: {e}", self.names[i]))?;
            }
        }
        Ok(())
    }
}

fn remove_quietly(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
