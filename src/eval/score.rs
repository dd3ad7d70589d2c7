//! Scores a model on tasks with the engine's own batched inference: the generative examples of
//! every task go through one ragged greedy generation per batch (no padding, one weight read per
//! step for the whole batch), the multiple-choice ones through one scoring pass per batch.
//! A task's score is the fraction of its examples answered correctly.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::llama::{generate, score_continuations, GenerateOptions, LlamaModel};
use crate::model::Tokenizer;

use super::task::{Example, Scoring, TaskFile};

/// A task with its examples tokenised once, ready to score any number of models.
pub struct PreparedTask {
    pub name: String,
    pub scoring: Scoring,
    generate: Vec<GenItem>,
    choice: Vec<ChoiceItem>,
    /// `file:line` of each generative and each choice example, for errors.
    generate_at: Vec<String>,
    choice_at: Vec<String>,
}

/// A generative example: prompt ids and the expected answer.
type GenItem = (Vec<u32>, String);

struct ChoiceItem {
    /// One (prompt ids, continuation ids) pair per choice.
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
    answer_index: usize,
}

/// One task's result: its score and, per example (generative first, then choice), whether it
/// was answered correctly.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub score: f64,
    pub correct: Vec<bool>,
}

impl PreparedTask {
    pub fn new(
        tokenizer: &Tokenizer,
        name: &str,
        file: &TaskFile,
        scoring: Scoring,
    ) -> Result<Self> {
        let mut generate = vec![];
        let mut choice = vec![];
        let (mut generate_at, mut choice_at) = (vec![], vec![]);
        for (ex, line) in file.examples.iter().zip(&file.lines) {
            let at = format!("{}:{line}", file.path.display());
            match ex {
                Example::Generate { prompt, answer } => {
                    generate.push((tokenizer.encode(prompt)?, answer.clone()));
                    generate_at.push(at);
                }
                Example::Choice {
                    prompt,
                    choices,
                    answer_index,
                } => {
                    let p = tokenizer.encode(prompt)?;
                    let pairs = choices
                        .iter()
                        .map(|c| Ok((p.clone(), continuation(tokenizer, &p, prompt, c)?)))
                        .collect::<Result<Vec<_>>>()?;
                    if let Some(i) = pairs.iter().position(|(_, c)| c.is_empty()) {
                        return Err(Error::format(
                            &at,
                            format!("choice {i} of prompt `{prompt}` encodes to no tokens"),
                        ));
                    }
                    choice.push(ChoiceItem {
                        pairs,
                        answer_index: *answer_index,
                    });
                    choice_at.push(at);
                }
            }
        }
        Ok(PreparedTask {
            name: name.to_string(),
            scoring,
            generate,
            choice,
            generate_at,
            choice_at,
        })
    }

    pub fn len(&self) -> usize {
        self.generate.len() + self.choice.len()
    }

    /// Every example fits a model of `max_positions` (an error names the file and line of the
    /// first that does not: found when the task is loaded, not deep inside a batch).
    pub fn check_fits(&self, max_positions: usize) -> Result<()> {
        let long = |n: usize, at: &str, what: &str| {
            Error::format(
                at,
                format!("{what} of {n} tokens, more than the model's max_position_embeddings ({max_positions})"),
            )
        };
        for ((p, _), at) in self.generate.iter().zip(&self.generate_at) {
            if p.len() > max_positions {
                return Err(long(p.len(), at, "a prompt"));
            }
        }
        for (c, at) in self.choice.iter().zip(&self.choice_at) {
            if let Some(n) = c
                .pairs
                .iter()
                .map(|(p, x)| p.len() + x.len())
                .find(|&n| n > max_positions)
            {
                return Err(long(n, at, "a prompt and choice"));
            }
        }
        Ok(())
    }

    /// The longest sequence one of its examples puts in the KV cache (prompt and generation,
    /// or prompt and the longest choice): what a device must reserve per sequence slot.
    pub fn longest_sequence(&self) -> usize {
        let gen = self
            .generate
            .iter()
            .map(|(p, _)| p.len().saturating_add(self.scoring.max_new_tokens))
            .max()
            .unwrap_or(0);
        let choice = self
            .choice
            .iter()
            .flat_map(|c| c.pairs.iter().map(|(p, x)| p.len() + x.len()))
            .max()
            .unwrap_or(0);
        gen.max(choice)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The continuation's ids as lm-eval-harness takes them: `encode(prompt + choice)` minus the
/// prompt's ids when that is a prefix (so merges across the boundary are kept), else the choice
/// encoded alone.
fn continuation(tok: &Tokenizer, prompt_ids: &[u32], prompt: &str, c: &str) -> Result<Vec<u32>> {
    let whole = tok.encode(&format!("{prompt}{c}"))?;
    if whole.len() > prompt_ids.len() && whole.starts_with(prompt_ids) {
        Ok(whole[prompt_ids.len()..].to_vec())
    } else {
        tok.encode_plain(c)
    }
}

/// Scores `model` on every task, `batch` sequences per forward batch.
pub fn evaluate<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    tokenizer: &Tokenizer,
    tasks: &[&PreparedTask],
    batch: usize,
) -> Result<Vec<TaskResult>>
where
    B::Buf: Default,
{
    let batch = batch.max(1);
    let mut correct: Vec<Vec<bool>> = tasks.iter().map(|t| vec![false; t.len()]).collect();

    // Generative examples of all tasks, in one list: (task, example, prompt).
    let gen: Vec<(usize, usize, &GenItem)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(t, task)| {
            task.generate
                .iter()
                .enumerate()
                .map(move |(i, g)| (t, i, g))
        })
        .collect();
    for chunk in gen.chunks(batch) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, _, g)| g.0.clone()).collect();
        let max_new = chunk
            .iter()
            .map(|&(t, _, _)| tasks[t].scoring.max_new_tokens)
            .max()
            .unwrap_or(1);
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            eos: model.config.eos_token_ids.clone(),
            sampling: None,
        };
        let outs = generate(model, backend, &prompts, &opts)?;
        for (&(t, i, (_, answer)), out) in chunk.iter().zip(outs) {
            let s = &tasks[t].scoring;
            let ids = &out.new_ids[..out.new_ids.len().min(s.max_new_tokens)];
            let text = tokenizer.decode(ids)?;
            correct[t][i] = s.metric.matches(s.cut(&text), answer);
        }
    }

    // Multiple-choice examples: every (prompt, choice) pair of a chunk in one scoring pass.
    let choice: Vec<(usize, usize, &ChoiceItem)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(t, task)| {
            let off = task.generate.len();
            task.choice
                .iter()
                .enumerate()
                .map(move |(i, c)| (t, off + i, c))
        })
        .collect();
    let mut start = 0;
    while start < choice.len() {
        // Whole items per chunk, about `batch` pairs.
        let mut end = start;
        let mut pairs = 0;
        while end < choice.len() && (end == start || pairs + choice[end].2.pairs.len() <= batch) {
            pairs += choice[end].2.pairs.len();
            end += 1;
        }
        let flat: Vec<(Vec<u32>, Vec<u32>)> = choice[start..end]
            .iter()
            .flat_map(|(_, _, c)| c.pairs.iter().cloned())
            .collect();
        let lps = score_continuations(model, backend, &flat)?;
        let mut k = 0;
        for &(t, i, item) in &choice[start..end] {
            let sums: Vec<f64> = (0..item.pairs.len())
                .map(|j| lps[k + j].iter().map(|&v| v as f64).sum())
                .collect();
            k += item.pairs.len();
            correct[t][i] = argmax_f64(&sums) == item.answer_index;
        }
        start = end;
    }

    Ok(correct
        .into_iter()
        .map(|c| TaskResult {
            score: c.iter().filter(|&&b| b).count() as f64 / c.len().max(1) as f64,
            correct: c,
        })
        .collect())
}

/// First index of the maximum.
fn argmax_f64(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
