//! `cycleqd-engine eval --model DIR --task FILE`: a checkpoint's score on a JSONL task file.
//! The task's settings come from the file's own `{"settings": …}` line, overridden by the
//! flags given here; what was used is said.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Args;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::DeviceChoice;
use cycleqd_engine::backend::Backend;
use cycleqd_engine::durable::write_atomic;
use cycleqd_engine::eval::settings::describe;
use cycleqd_engine::eval::{evaluate_with, PreparedTask, TaskFile, TaskResult, TaskSettings};
use cycleqd_engine::llama::LlamaModel;
use cycleqd_engine::model::{ModelStore, Tokenizer};

/// Flags that override a task file's settings (absent: the file's value, else the default).
#[derive(Args, Debug, Default)]
pub struct SettingFlags {
    /// exact_match, contains, regex or python_tests.
    #[arg(long)]
    metric: Option<String>,
    /// The regex of `--metric regex` (its first group, else the match, must equal the answer).
    #[arg(long)]
    pattern: Option<String>,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Cut generations at this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Render prompts with the model's chat template: true or false.
    #[arg(long)]
    chat_template: Option<bool>,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Generations per prompt (pass@k's n; needs --temperature).
    #[arg(long)]
    samples: Option<usize>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    /// pass@k's k.
    #[arg(long)]
    pass_k: Option<usize>,
    /// Seed of the sampled generations.
    #[arg(long)]
    seed: Option<u64>,
    /// Python interpreter of python_tests (name on PATH or path).
    #[arg(long)]
    interpreter: Option<String>,
    /// Wall-clock limit of one program, seconds.
    #[arg(long)]
    timeout_s: Option<f64>,
}

impl SettingFlags {
    pub fn settings(&self) -> TaskSettings {
        TaskSettings {
            metric: self.metric.clone(),
            pattern: self.pattern.clone(),
            max_new_tokens: self.max_new_tokens,
            stop: (!self.stop.is_empty()).then(|| self.stop.clone()),
            chat_template: self.chat_template,
            system: self.system.clone(),
            samples: self.samples,
            temperature: self.temperature,
            top_p: self.top_p,
            pass_k: self.pass_k,
            seed: self.seed,
            interpreter: self.interpreter.clone(),
            timeout_s: self.timeout_s,
            ..TaskSettings::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// JSONL task file (`{prompt|messages, answer|choices+answer_index|tests}` per line).
    #[arg(long)]
    task: PathBuf,
    #[command(flatten)]
    flags: SettingFlags,
    /// Sequences per forward batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Write what the model answered, one JSON line per example (`score`'s input format).
    #[arg(long)]
    save_completions: Option<PathBuf>,
    /// Print one JSON object: {"model", "task", "score", "examples", "correct", "settings"}.
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long)]
    device: Option<DeviceChoice>,
}

fn score_on<B: Backend>(
    backend: &B,
    store: &ModelStore,
    tok: &Tokenizer,
    task: &PreparedTask,
    batch: usize,
    keep: bool,
) -> cycleqd_engine::Result<TaskResult>
where
    B::Buf: Default,
{
    let model = LlamaModel::load(backend, store)?;
    Ok(evaluate_with(&model, backend, tok, &[task], batch, keep)?.remove(0))
}

/// The completions file: one `{"completion": …}` or `{"completions": […]}` line per example.
pub fn completions_jsonl(completions: &[Vec<String>]) -> String {
    let mut s = String::new();
    for c in completions {
        let line = if c.len() == 1 {
            serde_json::json!({ "completion": c[0] })
        } else {
            serde_json::json!({ "completions": c })
        };
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s
}

pub fn run(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let store = ModelStore::open_llama(&a.model)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let file = TaskFile::load(&a.task)?;
    let (merged, from) =
        TaskSettings::merge(&[("task file", &file.settings), ("flag", &a.flags.settings())]);
    let scoring = merged
        .resolve()
        .map_err(|m| anyhow!("{}: {m}", a.task.display()))?;
    let used = describe(&scoring, &from);
    let name = a
        .task
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let task = PreparedTask::new(&tok, &name, &file, scoring)?;
    task.check_fits(store.config().max_position_embeddings)?;
    let keep = a.save_completions.is_some();
    let r = match super::open_device(a.device)? {
        Some(gpu) => score_on(&gpu, &store, &tok, &task, a.batch, keep),
        None => score_on(&CpuBackend, &store, &tok, &task, a.batch, keep),
    }
    .with_context(|| format!("eval {}", a.task.display()))?;
    if let Some(path) = &a.save_completions {
        write_atomic(path, completions_jsonl(&r.completions).as_bytes())
            .with_context(|| format!("--save-completions {}", path.display()))?;
    }
    let solved = r.solved();
    if a.json {
        let v = serde_json::json!({"model": a.model, "task": a.task, "score": r.score,
                                   "examples": r.per_example.len(), "correct": solved,
                                   "per_example": r.per_example, "settings": used,
                                   "sandbox": task.sandbox_description()});
        let mut out = std::io::stdout().lock();
        writeln!(out, "{v}")?;
    } else {
        // What was used, with the result (an error stays the only line of a failure).
        eprintln!("settings: {used}");
        if let Some(sb) = task.sandbox_description() {
            eprintln!("{sb}");
        }
        println!(
            "{}: {:.4} ({solved}/{} correct) on {}",
            a.model.display(),
            r.score,
            r.per_example.len(),
            a.task.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
