//! `cycleqd-engine score --task FILE --completions FILE.jsonl`: scores given completions with
//! the task's metric, with no model (generation and execution separated, as
//! bigcode-evaluation-harness does): one JSON line per example of the task file,
//! `{"completion": …}` or `{"completions": […]}` (several samples give pass@k).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::Args;
use serde_json::Value;

use cycleqd_engine::eval::settings::describe;
use cycleqd_engine::eval::{score_completions, PreparedTask, TaskFile, TaskSettings};

use super::eval::SettingFlags;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// JSONL task file.
    #[arg(long)]
    task: PathBuf,
    /// JSONL completions, one line per example of the task file.
    #[arg(long)]
    completions: PathBuf,
    #[command(flatten)]
    flags: SettingFlags,
    /// Print one JSON object: {"task", "score", "examples", "correct", "per_example", …}.
    #[arg(long)]
    json: bool,
}

/// Reads the completions file; errors name its line.
fn read_completions(path: &Path) -> anyhow::Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: invalid JSON: {e}", at()))?;
        let list = match (v.get("completion"), v.get("completions")) {
            (Some(Value::String(c)), None) => vec![c.clone()],
            (None, Some(Value::Array(a))) if !a.is_empty() => a
                .iter()
                .map(|c| c.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow!("{}: `completions` must be strings", at()))?,
            _ => bail!(
                "{}: expected {{\"completion\": \"…\"}} or {{\"completions\": [\"…\", …]}}",
                at()
            ),
        };
        out.push(list);
    }
    Ok(out)
}

pub fn run(a: ScoreArgs) -> anyhow::Result<ExitCode> {
    let file = TaskFile::load(&a.task)?;
    let completions = read_completions(&a.completions)?;
    if completions.len() != file.examples.len() {
        bail!(
            "{}: {} completion lines for the {} examples of {}",
            a.completions.display(),
            completions.len(),
            file.examples.len(),
            a.task.display()
        );
    }
    let (merged, from) =
        TaskSettings::merge(&[("task file", &file.settings), ("flag", &a.flags.settings())]);
    let most = completions.iter().map(Vec::len).max().unwrap_or(1);
    let scoring = merged
        .resolve_for_completions(most)
        .map_err(|m| anyhow!("{}: {m}", a.task.display()))?;
    let used = describe(&scoring, &from);
    let name = a
        .task
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let task = PreparedTask::without_model(&name, &file, scoring)?;
    let r = score_completions(&task, &completions)
        .map_err(|e| anyhow!("{}: {e}", a.completions.display()))?;
    let solved = r.solved();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"task": a.task, "completions": a.completions, "score": r.score,
                               "examples": r.per_example.len(), "correct": solved,
                               "per_example": r.per_example, "settings": used,
                               "sandbox": task.sandbox_description()})
        );
    } else {
        eprintln!("settings: {used}");
        if let Some(sb) = task.sandbox_description() {
            eprintln!("{sb}");
        }
        println!(
            "{}: {:.4} ({solved}/{} correct)",
            a.task.display(),
            r.score,
            r.per_example.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
