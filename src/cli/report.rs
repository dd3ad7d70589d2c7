//! `cycleqd-engine report RUN [--out DIR] [--json] [--top K --task T]`: rebuilds a run's plots
//! and `report.html` from its folder (finished, running or interrupted; older runs too), or
//! lists an archive's best elites with their scores, cells and lineage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use cycleqd_engine::report::run_folder::{top_elites, RunFolder};
use cycleqd_engine::report::{write_report, ReportInputs};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run folder (the `--out` of a `run`).
    run: PathBuf,
    /// Where the report goes (default: the run's `report/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON (the files written, or the elites) instead of text.
    #[arg(long)]
    json: bool,
    /// List this many of an archive's best elites instead of drawing (needs --task).
    #[arg(long, requires = "task")]
    top: Option<usize>,
    /// The archive (task) whose elites --top lists.
    #[arg(long, requires = "top")]
    task: Option<String>,
}

pub fn run(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let run = RunFolder::open(&a.run)?;
    if let (Some(k), Some(task)) = (a.top, &a.task) {
        let elites = top_elites(&run, task, k)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&elites)?);
            return Ok(ExitCode::SUCCESS);
        }
        let others: Vec<&String> = run.pop.tasks.iter().filter(|t| *t != task).collect();
        println!(
            "archive `{task}`: {} best of {} elites (objective = {task} score; measures: {})",
            elites.len(),
            run.pop.archives[run.pop.tasks.iter().position(|t| t == task).unwrap_or(0)].len(),
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for e in &elites {
            let fitness: Vec<String> = run
                .pop
                .tasks
                .iter()
                .zip(&e.fitness)
                .map(|(t, f)| format!("{t} {f:.4}"))
                .collect();
            println!(
                "{:<14} objective {:.4}  cell {:?}  scores [{}]  parents {}  ({} ancestors, from {})",
                e.id,
                e.objective,
                e.cell,
                fitness.join(", "),
                if e.parents.is_empty() {
                    "—".to_string()
                } else {
                    e.parents.join(" × ")
                },
                e.ancestors,
                e.experts.join(", ")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let out = a.out.unwrap_or_else(|| a.run.join("report"));
    let written = write_report(
        &out,
        &ReportInputs {
            pop: &run.pop,
            events: &run.events,
            summary: run.summary.as_ref(),
            config_text: run.config_text.as_deref(),
        },
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "report": out.join("report.html"),
                "pictures": written,
                "finished": run.summary.is_some(),
                "children": run.pop.children_done,
            }))?
        );
    } else {
        println!(
            "report: {} ({} pictures; run {}, {} children)",
            out.join("report.html").display(),
            written.len(),
            if run.summary.is_some() {
                "finished"
            } else {
                "not finished: as of its last applied child"
            },
            run.pop.children_done
        );
    }
    Ok(ExitCode::SUCCESS)
}
