//! Scores a model on tasks with the engine's own batched inference: the generations of every
//! task (each sample of each generative example) go through one ragged generation per batch
//! (no padding, one weight read per step for the whole batch, sequences ended at their stop
//! string), the multiple-choice examples through one scoring pass per batch. Programs of
//! `python_tests` tasks run in the sandbox on the CPU cores while the device generates the
//! next batch. An example's score is 0/1, or pass@k over its samples; a task's is their mean.

use std::sync::mpsc;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::llama::{
    generate_until, score_continuations, GenerateOptions, LlamaModel, PromptOptions, Sampling,
};
use crate::model::Tokenizer;

use super::program;
use super::prompt::{self, Rendered};
use super::sandbox::Sandbox;
use super::settings::Scoring;
use super::task::{CodeTests, Input, Metric, Target, TaskFile};

/// A task with its examples tokenised once, ready to score any number of models.
pub struct PreparedTask {
    pub name: String,
    pub scoring: Scoring,
    items: Vec<Item>,
    /// `file:line` of each example, for errors.
    at: Vec<String>,
    /// The sandbox of a `python_tests` task.
    sandbox: Option<Arc<Sandbox>>,
}

/// A choice example's (prompt ids, continuation ids), one pair per choice.
type Pairs = Vec<(Vec<u32>, Vec<u32>)>;

enum Item {
    Generate {
        prompt: Vec<u32>,
        /// The prompt text of a `prompt` line (a continuation may need it before its code).
        prompt_text: Option<String>,
        check: Check,
    },
    Choice {
        pairs: Pairs,
        choices: Vec<String>,
        answer_index: usize,
    },
}

enum Check {
    Answer(String),
    Tests(CodeTests),
}

/// One task's result.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub score: f64,
    /// Per example, in the file's order: 1 or 0, or pass@k with several samples.
    pub per_example: Vec<f64>,
    /// Per example, what the model answered (each sample's generation, cut at the stop
    /// string; the chosen choice of a multiple-choice example), when asked for.
    pub completions: Vec<Vec<String>>,
}

impl TaskResult {
    /// Examples with a full score.
    pub fn solved(&self) -> usize {
        self.per_example.iter().filter(|&&s| s >= 1.0).count()
    }
}

impl PreparedTask {
    /// Renders and tokenises every example. A `python_tests` task gets its sandbox here (the
    /// interpreter found, what the kernel allows probed) and its tests' syntax checked. Errors
    /// name the file and line.
    pub fn new(
        tokenizer: &Tokenizer,
        name: &str,
        file: &TaskFile,
        scoring: Scoring,
    ) -> Result<Self> {
        Self::build(Some(tokenizer), name, file, scoring)
    }

    /// A task for scoring given completions ([`score_completions`]): nothing is tokenised.
    pub fn without_model(name: &str, file: &TaskFile, scoring: Scoring) -> Result<Self> {
        Self::build(None, name, file, scoring)
    }

    fn build(
        tokenizer: Option<&Tokenizer>,
        name: &str,
        file: &TaskFile,
        scoring: Scoring,
    ) -> Result<Self> {
        let code = matches!(scoring.metric, Metric::PythonTests);
        let mut items = Vec::with_capacity(file.examples.len());
        let mut at = Vec::with_capacity(file.examples.len());
        for (i, ex) in file.examples.iter().enumerate() {
            let here = file.at(i);
            let err = |msg: String| Error::format(&here, msg);
            let rendered = match tokenizer {
                Some(tok) => prompt::render(tok, &scoring, &ex.input).map_err(err)?,
                None => Rendered {
                    ids: vec![],
                    text: String::new(),
                    chat: false,
                },
            };
            let prompt_text = match &ex.input {
                Input::Prompt(p) => Some(p.clone()),
                Input::Messages(_) => None,
            };
            let item = match &ex.target {
                Target::Answer(a) if !code => Item::Generate {
                    prompt: rendered.ids,
                    prompt_text,
                    check: Check::Answer(a.clone()),
                },
                Target::Answer(_) => {
                    return Err(err(
                        "the metric is python_tests, but this line has an `answer` and no `tests`".into(),
                    ))
                }
                Target::Tests(t) if code => Item::Generate {
                    prompt: rendered.ids,
                    prompt_text,
                    check: Check::Tests(t.clone()),
                },
                Target::Tests(_) => {
                    return Err(err(format!(
                        "this line has `tests`, but the task's metric is {} (set metric = \"python_tests\")",
                        scoring.metric.name()
                    )))
                }
                Target::Choices {
                    choices,
                    answer_index,
                } => match tokenizer {
                    Some(tok) => choice_item(tok, &rendered, choices, *answer_index).map_err(err)?,
                    None => Item::Choice {
                        pairs: vec![],
                        choices: choices.clone(),
                        answer_index: *answer_index,
                    },
                },
            };
            items.push(item);
            at.push(here);
        }
        let sandbox = if code {
            let sb = Sandbox::new(&scoring.interpreter, scoring.limits.clone())
                .map_err(|e| Error::format(&file.path, e.to_string()))?;
            check_tests_parse(&sb, file)?;
            Some(Arc::new(sb))
        } else {
            None
        };
        Ok(PreparedTask {
            name: name.to_string(),
            scoring,
            items,
            at,
            sandbox,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether every example scores 0 or 1 (one sample, or pass@n of n samples).
    pub fn binary(&self) -> bool {
        self.scoring.samples == 1 || self.scoring.pass_k == self.scoring.samples
    }

    /// What the sandbox of a `python_tests` task enforces here.
    pub fn sandbox_description(&self) -> Option<String> {
        self.sandbox.as_ref().map(|s| s.enforced())
    }

    /// Every example fits a model of `max_positions` (an error names the file and line of the
    /// first that does not: found when the task is loaded, not deep inside a batch).
    pub fn check_fits(&self, max_positions: usize) -> Result<()> {
        for (item, at) in self.items.iter().zip(&self.at) {
            let (n, what) = match item {
                Item::Generate { prompt, .. } => (prompt.len(), "a prompt"),
                Item::Choice { pairs, .. } => (
                    pairs
                        .iter()
                        .map(|(p, x)| p.len() + x.len())
                        .max()
                        .unwrap_or(0),
                    "a prompt and choice",
                ),
            };
            if n > max_positions {
                return Err(Error::format(
                    at,
                    format!("{what} of {n} tokens, more than the model's max_position_embeddings ({max_positions})"),
                ));
            }
        }
        Ok(())
    }

    /// The longest sequence one of its examples puts in the KV cache (prompt and generation,
    /// or prompt and the longest choice): what a device must reserve per sequence slot.
    pub fn longest_sequence(&self) -> usize {
        self.items
            .iter()
            .map(|item| match item {
                Item::Generate { prompt, .. } => {
                    prompt.len().saturating_add(self.scoring.max_new_tokens)
                }
                Item::Choice { pairs, .. } => pairs
                    .iter()
                    .map(|(p, x)| p.len() + x.len())
                    .max()
                    .unwrap_or(0),
            })
            .max()
            .unwrap_or(0)
    }
}

fn choice_item(
    tok: &Tokenizer,
    rendered: &Rendered,
    choices: &[String],
    answer_index: usize,
) -> std::result::Result<Item, String> {
    let mut pairs = vec![];
    for (i, c) in choices.iter().enumerate() {
        let cont = prompt::continuation(tok, rendered, c)?;
        if cont.is_empty() {
            return Err(format!("choice {i} (`{c}`) encodes to no tokens"));
        }
        pairs.push((rendered.ids.clone(), cont));
    }
    Ok(Item::Choice {
        pairs,
        choices: choices.to_vec(),
        answer_index,
    })
}

/// Refuses tests and setups that are not valid Python, naming the line.
fn check_tests_parse(sb: &Sandbox, file: &TaskFile) -> Result<()> {
    let mut snippets = vec![];
    let mut origin = vec![];
    for (i, ex) in file.examples.iter().enumerate() {
        if let Target::Tests(t) = &ex.target {
            if let Some(s) = &t.setup {
                snippets.push(s.clone());
                origin.push((i, "`setup`".to_string()));
            }
            for (j, test) in t.tests.iter().enumerate() {
                snippets.push(test.clone());
                origin.push((i, format!("test {j}")));
            }
        }
    }
    if let Some((k, msg)) = program::first_syntax_error(sb, &snippets)
        .map_err(|e| Error::format(&file.path, e.to_string()))?
    {
        let (i, what) = &origin[k];
        return Err(Error::format(
            file.at(*i),
            format!("{what} is not valid Python: {msg}"),
        ));
    }
    Ok(())
}

/// A sampled generation's seed: the task's seed, the example and the sample, mixed (the same
/// for every model, in any batch).
fn sample_seed(seed: u64, example: usize, sample: usize) -> u64 {
    let mut z = seed
        ^ (example as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (sample as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs programs on the CPU cores while the caller goes on generating.
struct Executor {
    jobs: Option<mpsc::Sender<(usize, Arc<Sandbox>, String)>>,
    results: mpsc::Receiver<(usize, Result<bool>)>,
    threads: Vec<std::thread::JoinHandle<()>>,
    submitted: usize,
}

impl Executor {
    fn new() -> Executor {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jobs, rx) = mpsc::channel::<(usize, Arc<Sandbox>, String)>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let (done_tx, results) = mpsc::channel();
        let threads = (0..n)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let done = done_tx.clone();
                std::thread::spawn(move || loop {
                    let job = rx.lock().map(|r| r.recv());
                    let Ok(Ok((slot, sb, program))) = job else {
                        return;
                    };
                    let r = sb.run_python(&program).map(|e| e.passed());
                    if done.send((slot, r)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Executor {
            jobs: Some(jobs),
            results,
            threads,
            submitted: 0,
        }
    }

    fn submit(&mut self, slot: usize, sb: Arc<Sandbox>, program: String) {
        self.submitted += 1;
        self.jobs
            .as_ref()
            .expect("open until finished")
            .send((slot, sb, program))
            .expect("executor threads live until finished");
    }

    /// Every submitted program's result, by slot.
    fn finish(mut self) -> Result<Vec<(usize, bool)>> {
        self.jobs = None;
        let mut out = Vec::with_capacity(self.submitted);
        for _ in 0..self.submitted {
            let (slot, r) = self
                .results
                .recv()
                .map_err(|_| Error::invalid("a program runner thread ended"))?;
            out.push((slot, r?));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(out)
    }
}

/// One generation to make: task, example, sample.
struct Job<'a> {
    task: usize,
    example: usize,
    prompt: &'a [u32],
    options: PromptOptions,
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
    evaluate_with(model, backend, tokenizer, tasks, batch, false)
}

/// [`evaluate`], keeping what the model answered when `keep_completions`.
pub fn evaluate_with<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    tokenizer: &Tokenizer,
    tasks: &[&PreparedTask],
    batch: usize,
    keep_completions: bool,
) -> Result<Vec<TaskResult>>
where
    B::Buf: Default,
{
    evaluate_examples(
        model,
        backend,
        tokenizer,
        tasks,
        batch,
        keep_completions,
        None,
    )
}

/// [`evaluate`] on some examples only: `include[t][i]` says whether example `i` of task `t`
/// is scored. The others' entries in `per_example` are NaN and do not count in `score`.
pub fn evaluate_some<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    tokenizer: &Tokenizer,
    tasks: &[&PreparedTask],
    batch: usize,
    include: &[Vec<bool>],
) -> Result<Vec<TaskResult>>
where
    B::Buf: Default,
{
    evaluate_examples(
        model,
        backend,
        tokenizer,
        tasks,
        batch,
        false,
        Some(include),
    )
}

#[allow(clippy::too_many_arguments)]
fn evaluate_examples<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    tokenizer: &Tokenizer,
    tasks: &[&PreparedTask],
    batch: usize,
    keep_completions: bool,
    include: Option<&[Vec<bool>]>,
) -> Result<Vec<TaskResult>>
where
    B::Buf: Default,
{
    let included = |t: usize, i: usize| include.is_none_or(|inc| inc[t][i]);
    let batch = batch.max(1);
    // Passing samples per example, and the completions.
    let mut passed: Vec<Vec<usize>> = tasks.iter().map(|t| vec![0; t.len()]).collect();
    let mut completions: Vec<Vec<Vec<String>>> =
        tasks.iter().map(|t| vec![vec![]; t.len()]).collect();

    let mut jobs = vec![];
    for (t, task) in tasks.iter().enumerate() {
        let s = &task.scoring;
        for (i, item) in task.items.iter().enumerate() {
            if !included(t, i) {
                continue;
            }
            if let Item::Generate { prompt, .. } = item {
                for j in 0..s.samples {
                    jobs.push(Job {
                        task: t,
                        example: i,
                        prompt,
                        options: PromptOptions {
                            max_new_tokens: s.max_new_tokens,
                            sampling: s.sampled().then(|| Sampling {
                                temperature: s.temperature,
                                top_p: s.top_p,
                                seed: sample_seed(s.seed, i, j),
                            }),
                        },
                    });
                }
            }
        }
    }
    // Flat index of (task, example), for program results.
    let offsets: Vec<usize> = tasks
        .iter()
        .scan(0, |acc, t| {
            let o = *acc;
            *acc += t.len();
            Some(o)
        })
        .collect();
    let mut executor = tasks
        .iter()
        .any(|t| t.sandbox.is_some())
        .then(Executor::new);

    for chunk in jobs.chunks(batch) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|j| j.prompt.to_vec()).collect();
        let opts = GenerateOptions {
            max_new_tokens: 0,
            eos: model.config.stop_token_ids.clone(),
            sampling: None,
            per_prompt: chunk.iter().map(|j| j.options).collect(),
        };
        // A sequence ends once a stop string appears in its newest tokens: decoding a window
        // as long as the longest stop (plus a few tokens for split characters) finds it.
        let window: Vec<usize> = chunk
            .iter()
            .map(|j| {
                tasks[j.task]
                    .scoring
                    .stop
                    .iter()
                    .map(|s| s.len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut stop = |slot: usize, ids: &[u32]| -> bool {
            let w = window[slot];
            if w == 0 {
                return false;
            }
            let from = ids.len().saturating_sub(w + 4);
            tokenizer
                .decode(&ids[from..])
                .map(|text| {
                    tasks[chunk[slot].task]
                        .scoring
                        .stop
                        .iter()
                        .any(|s| !s.is_empty() && text.contains(s.as_str()))
                })
                .unwrap_or(false)
        };
        let outs = generate_until(model, backend, &prompts, &opts, &mut stop)?;
        for (job, out) in chunk.iter().zip(outs) {
            let task = tasks[job.task];
            let s = &task.scoring;
            let text = tokenizer.decode(&out.new_ids)?;
            let answer = s.cut(&text);
            let Item::Generate {
                prompt_text, check, ..
            } = &task.items[job.example]
            else {
                unreachable!("jobs are generative")
            };
            match check {
                Check::Answer(a) => {
                    if s.metric.matches(answer, a) {
                        passed[job.task][job.example] += 1;
                    }
                }
                Check::Tests(t) => {
                    let file = program::assemble(prompt_text.as_deref(), answer, t);
                    let sb = task
                        .sandbox
                        .as_ref()
                        .expect("python_tests tasks have a sandbox");
                    executor
                        .as_mut()
                        .expect("made when a task runs programs")
                        .submit(offsets[job.task] + job.example, Arc::clone(sb), file);
                }
            }
            if keep_completions {
                completions[job.task][job.example].push(answer.to_string());
            }
        }
    }
    if let Some(ex) = executor {
        for (slot, ok) in ex.finish()? {
            if ok {
                let t = offsets
                    .iter()
                    .rposition(|&o| o <= slot)
                    .expect("slot in a task");
                passed[t][slot - offsets[t]] += 1;
            }
        }
    }

    // Multiple-choice examples: every (prompt, choice) pair of a chunk in one scoring pass.
    let mut chosen: Vec<Vec<Option<usize>>> = tasks.iter().map(|t| vec![None; t.len()]).collect();
    let choice: Vec<(usize, usize, &Pairs)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(t, task)| {
            task.items
                .iter()
                .enumerate()
                .filter_map(move |(i, item)| match item {
                    Item::Choice { pairs, .. } if included(t, i) => Some((t, i, pairs)),
                    _ => None,
                })
        })
        .collect();
    let mut start = 0;
    while start < choice.len() {
        // Whole items per chunk, about `batch` pairs.
        let mut end = start;
        let mut pairs = 0;
        while end < choice.len() && (end == start || pairs + choice[end].2.len() <= batch) {
            pairs += choice[end].2.len();
            end += 1;
        }
        let flat: Vec<(Vec<u32>, Vec<u32>)> = choice[start..end]
            .iter()
            .flat_map(|(_, _, p)| p.iter().cloned())
            .collect();
        let lps = score_continuations(model, backend, &flat)?;
        let mut k = 0;
        for &(t, i, p) in &choice[start..end] {
            let sums: Vec<f64> = (0..p.len())
                .map(|j| lps[k + j].iter().map(|&v| v as f64).sum())
                .collect();
            k += p.len();
            chosen[t][i] = Some(argmax_f64(&sums));
        }
        start = end;
    }

    Ok(tasks
        .iter()
        .enumerate()
        .map(|(t, task)| {
            let s = &task.scoring;
            let per_example: Vec<f64> = task
                .items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    _ if !included(t, i) => f64::NAN,
                    Item::Generate { .. } => program::pass_at_k(s.samples, passed[t][i], s.pass_k),
                    Item::Choice { answer_index, .. } => {
                        (chosen[t][i] == Some(*answer_index)) as u8 as f64
                    }
                })
                .collect();
            let mut comps = std::mem::take(&mut completions[t]);
            if keep_completions {
                for (i, item) in task.items.iter().enumerate() {
                    if let (Item::Choice { choices, .. }, Some(c)) = (item, chosen[t][i]) {
                        comps[i] = vec![choices[c].clone()];
                    }
                }
            } else {
                comps.clear();
            }
            let scored: Vec<f64> = per_example
                .iter()
                .copied()
                .filter(|v| !v.is_nan())
                .collect();
            TaskResult {
                score: scored.iter().sum::<f64>() / scored.len().max(1) as f64,
                per_example,
                completions: comps,
            }
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

/// Scores given completions (no model): one list of completions per example, in the file's
/// order, with the task's metric (programs run in its sandbox). A multiple-choice example's
/// completion must be its right choice's text.
pub fn score_completions(task: &PreparedTask, completions: &[Vec<String>]) -> Result<TaskResult> {
    if completions.len() != task.len() {
        return Err(Error::invalid(format!(
            "{} completion lines for {} examples",
            completions.len(),
            task.len()
        )));
    }
    let s = &task.scoring;
    let mut passed = vec![0usize; task.len()];
    let mut executor = task.sandbox.as_ref().map(|_| Executor::new());
    for (i, (item, comps)) in task.items.iter().zip(completions).enumerate() {
        if comps.is_empty() {
            return Err(Error::format(&task.at[i], "no completion for this example"));
        }
        match item {
            Item::Generate {
                prompt_text, check, ..
            } => {
                if comps.len() < s.pass_k {
                    return Err(Error::format(
                        &task.at[i],
                        format!(
                            "{} completions, fewer than pass_k = {}",
                            comps.len(),
                            s.pass_k
                        ),
                    ));
                }
                for c in comps {
                    let answer = s.cut(c);
                    match check {
                        Check::Answer(a) => passed[i] += s.metric.matches(answer, a) as usize,
                        Check::Tests(t) => executor.as_mut().expect("a python_tests task").submit(
                            i,
                            Arc::clone(task.sandbox.as_ref().expect("a python_tests task")),
                            program::assemble(prompt_text.as_deref(), answer, t),
                        ),
                    }
                }
            }
            Item::Choice {
                choices,
                answer_index,
                ..
            } => {
                let right = choices[*answer_index].trim();
                passed[i] = comps.iter().filter(|c| c.trim() == right).count();
            }
        }
    }
    if let Some(ex) = executor {
        for (i, ok) in ex.finish()? {
            passed[i] += ok as usize;
        }
    }
    let per_example: Vec<f64> = task
        .items
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let n = completions[i].len();
            program::pass_at_k(n, passed[i], s.pass_k.min(n))
        })
        .collect();
    Ok(TaskResult {
        score: per_example.iter().sum::<f64>() / per_example.len().max(1) as f64,
        per_example,
        completions: completions.to_vec(),
    })
}
