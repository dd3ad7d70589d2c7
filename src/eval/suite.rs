//! A run's tasks as one scorer: the built-in JSONL tasks of all skills are scored together in
//! one batched pass over the in-memory model; tasks with an external evaluator get an exported
//! copy of the model in a work folder. A model is given as its tensors (a materialised child,
//! a merge, a checkpoint's views), never re-read from disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::llama::LlamaModel;
use crate::model::export::export_tensors;
use crate::model::{HostTensor, LlamaConfig, Tokenizer};

use super::{evaluate, ExternalEvaluator, PreparedTask};

/// How one task is scored.
pub enum TaskScorer {
    Builtin(PreparedTask),
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
    /// Where built-in tasks run: a CUDA device, or the CPU when `None`.
    pub device: Option<Arc<CudaBackend>>,
}

impl TaskSuite {
    /// The built-in tasks on `backend`, with the model's weights uploaded there.
    fn score_builtin<B: Backend>(
        &self,
        backend: &B,
        tensors: &[(String, HostTensor)],
        tok: &Tokenizer,
        tasks: &[&PreparedTask],
    ) -> Result<Vec<super::TaskResult>>
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
        evaluate(&model, backend, tok, tasks, self.batch)
    }

    /// Scores a model on every task: `Ok(Err(reason))` when an external evaluator failed.
    pub fn score(
        &self,
        tensors: &[(String, HostTensor)],
        label: &str,
    ) -> Result<std::result::Result<Vec<f64>, String>> {
        let mut scores = vec![f64::NAN; self.scorers.len()];
        let builtin: Vec<(usize, &PreparedTask)> = self
            .scorers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                TaskScorer::Builtin(t) => Some((i, t)),
                TaskScorer::External(_) => None,
            })
            .collect();
        if !builtin.is_empty() {
            let tok = self
                .tokenizer
                .as_ref()
                .ok_or_else(|| Error::invalid("built-in tasks need the base's tokenizer.json"))?;
            let tasks: Vec<&PreparedTask> = builtin.iter().map(|(_, t)| *t).collect();
            let results = match &self.device {
                Some(gpu) => self.score_builtin(gpu.as_ref(), tensors, tok, &tasks)?,
                None => self.score_builtin(&CpuBackend, tensors, tok, &tasks)?,
            };
            for ((i, _), r) in builtin.iter().zip(results) {
                scores[*i] = r.score;
            }
        }
        if self
            .scorers
            .iter()
            .any(|s| matches!(s, TaskScorer::External(_)))
        {
            let dir = self.work_dir.join(label);
            export_tensors(
                &dir,
                tensors,
                &self.config_json,
                Some(&self.companions),
                u64::MAX,
            )?;
            let outcome = self.score_external(&dir, &mut scores);
            remove_quietly(&dir);
            if let Err(reason) = outcome {
                return Ok(Err(reason));
            }
        }
        Ok(Ok(scores))
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
