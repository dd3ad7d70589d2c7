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

use super::{evaluate, ExternalEvaluator, PreparedTask};

/// A model's scores in task order, or why they could not be had (an external evaluator
/// failed: the child is marked failed and the run goes on).
pub type Scored = std::result::Result<Vec<f64>, String>;

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
        let mut scores = vec![f64::NAN; self.scorers.len()];
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
            let results = match evaluate(model, backend, tok, &tasks, self.batch) {
                // The model, not the machine, is at fault: the child failed.
                Err(Error::NonFiniteOutput(why)) => return Ok(Err(why)),
                r => r?,
            };
            for ((i, _), r) in builtin.iter().zip(results) {
                scores[*i] = r.score;
            }
        }
        if self.has_external() {
            let dir = self.work_dir.join(label);
            export(&dir)?;
            let outcome = self.score_external(&dir, &mut scores);
            remove_quietly(&dir);
            if let Err(reason) = outcome {
                return Ok(Err(reason));
            }
        }
        Ok(Ok(scores))
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
