//! `cycleqd-engine eval --model DIR --task FILE`: a checkpoint's score on a JSONL task file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::DeviceChoice;
use cycleqd_engine::backend::Backend;
use cycleqd_engine::eval::{evaluate, Metric, PreparedTask, Scoring, TaskFile, TaskResult};
use cycleqd_engine::llama::LlamaModel;
use cycleqd_engine::model::{ModelStore, Tokenizer};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// JSONL task file (`{prompt, answer}` or `{prompt, choices, answer_index}` per line).
    #[arg(long)]
    task: PathBuf,
    /// exact_match, contains or regex (generative examples).
    #[arg(long, default_value = "exact_match")]
    metric: String,
    /// The regex of `--metric regex` (its first group, else the match, must equal the answer).
    #[arg(long)]
    pattern: Option<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Cut generations at this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Sequences per forward batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Print one JSON object: {"model", "task", "score", "examples", "correct"}.
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
) -> cycleqd_engine::Result<TaskResult>
where
    B::Buf: Default,
{
    let model = LlamaModel::load(backend, store)?;
    Ok(evaluate(&model, backend, tok, &[task], batch)?.remove(0))
}

pub fn run(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let scoring = Scoring {
        metric: Metric::parse(&a.metric, a.pattern.as_deref())
            .map_err(|m| anyhow::anyhow!("--metric: {m}"))?,
        max_new_tokens: a.max_new_tokens.max(1),
        stop: a.stop.clone(),
    };
    let store = ModelStore::open_llama(&a.model)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let file = TaskFile::load(&a.task)?;
    let name = a
        .task
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let task = PreparedTask::new(&tok, &name, &file, scoring)?;
    task.check_fits(store.config().max_position_embeddings)?;
    let r = match super::open_device(a.device)? {
        Some(gpu) => score_on(&gpu, &store, &tok, &task, a.batch),
        None => score_on(&CpuBackend, &store, &tok, &task, a.batch),
    }
    .with_context(|| format!("eval {}", a.task.display()))?;
    let correct = r.correct.iter().filter(|&&c| c).count();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "task": a.task, "score": r.score,
                               "examples": r.correct.len(), "correct": correct})
        );
    } else {
        println!(
            "{}: {:.4} ({correct}/{} correct) on {}",
            a.model.display(),
            r.score,
            r.correct.len(),
            a.task.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
