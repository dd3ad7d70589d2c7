//! `cycleqd-engine run`: the main job, a thin shell over [`cycleqd_engine::run`]. Without
//! `--config` it builds the synthetic demo (once) and evolves it. The run folder holds
//! `config.toml` (resolved), `events.jsonl`, `checkpoint.safetensors` (the same command resumes
//! from it), `archives/`, `final/`, `summary.json` and `report/`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use cycleqd_engine::backend::cuda::DeviceChoice;
use cycleqd_engine::broker::{BrokerUrl, WorkerStatus};
use cycleqd_engine::qd::RunConfig;
use cycleqd_engine::run::{plan_workers, Progress, Reporter, Run, RunEnd, Stop};
use cycleqd_engine::synth::{synthesize, SynthOptions};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run configuration (TOML). Without it: the synthetic demo in `--demo-dir`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder (default: `run/` in the demo folder, else `cycleqd-run`). An unfinished run
    /// there is resumed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Children to produce (overrides `evolution.generations`; a resumed run may be extended).
    #[arg(long)]
    generations: Option<u64>,
    /// Run seed (overrides `evolution.seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Workers (overrides `evolution.workers`): one per GPU, or CPU workers splitting the
    /// cores.
    #[arg(long)]
    workers: Option<usize>,
    /// Where workers run: cpu, cuda (every GPU) or cuda:N (default: CUDA when present).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Where the demo is synthesised when `--config` is absent.
    #[arg(long, default_value = "cycleqd-demo")]
    demo_dir: PathBuf,
    /// Coordinate workers on any node through this Redis (`redis://HOST:PORT/DB`, `rediss://`
    /// for TLS); `--workers N` also serves it with N local workers (0: coordinate only).
    #[arg(long)]
    broker: Option<BrokerUrl>,
    /// The run's name on the broker (default: the run folder's name).
    #[arg(long, requires = "broker")]
    run: Option<String>,
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let (config_path, out) = match &a.config {
        Some(c) => (
            c.clone(),
            a.out.clone().unwrap_or_else(|| "cycleqd-run".into()),
        ),
        None => {
            let cfg = a.demo_dir.join("cycleqd.toml");
            if !cfg.is_file() {
                eprintln!(
                    "no --config: building the synthetic demo in {}",
                    a.demo_dir.display()
                );
                let report = synthesize(&a.demo_dir, &SynthOptions::default())
                    .with_context(|| format!("synth {}", a.demo_dir.display()))?;
                super::synth::print_report(&report);
            }
            (cfg, a.out.clone().unwrap_or_else(|| a.demo_dir.join("run")))
        }
    };
    let mut cfg = RunConfig::load(&config_path)?;
    if let Some(g) = a.generations {
        cfg.evolution.generations = g;
    }
    if let Some(s) = a.seed {
        cfg.evolution.seed = s;
    }
    let count =
        match a.workers {
            Some(0) if a.broker.is_some() => Some(0),
            Some(0) => anyhow::bail!("--workers: must be at least 1 (0 only with --broker)"),
            Some(n) => Some(n),
            None => cfg.evolution.workers.count().map_err(|m| {
                anyhow::anyhow!("{}: `evolution.workers`: {m}", config_path.display())
            })?,
        };
    // Over a broker with no local workers, one device still scores the experts and the
    // final table.
    let devices = plan_workers(count.map(|n| n.max(1)), a.device)?;
    let local = count.unwrap_or(devices.len());
    let mut bars = Bars::default();
    let mut run = Run::open(cfg, &out, devices, &mut bars)
        .with_context(|| format!("run {}", out.display()))?;
    eprintln!(
        "run folder: {} ({} worker(s), schedule {})",
        out.display(),
        run.devices.len(),
        describe(&run)
    );
    let stop = Stop::on_signals();
    let end = match &a.broker {
        None => run.execute(&stop, &mut bars),
        Some(url) => {
            let name = match &a.run {
                Some(n) => n.clone(),
                None => std::path::absolute(&out)?
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into()),
            };
            run.execute_broker(url, &name, local, &stop, &mut bars)
        }
    }
    .with_context(|| format!("run {}", out.display()))?;
    match end {
        RunEnd::AlreadyFinished(s) => {
            eprintln!("{} is a finished run; its table:", out.display());
            print!("{}", s.table());
        }
        RunEnd::Finished(s) => {
            print!("{}", s.table());
            eprintln!(
                "outputs in {}: final/ (the final model, a Hugging Face checkpoint), \
                 summary.json, report/, archives/, events.jsonl",
                out.display()
            );
        }
        RunEnd::Stopped { applied, in_flight } => {
            eprintln!(
                "stopped after {applied} children ({in_flight} in flight, saved); resume with: \
                 cycleqd-engine run{} --out {}",
                a.config
                    .as_ref()
                    .map(|c| format!(" --config {}", c.display()))
                    .unwrap_or_default(),
                out.display()
            );
            // 128 + the signal, as shells report a process stopped by it.
            let sig = cycleqd_engine::run::last_signal();
            return Ok(ExitCode::from(if sig > 0 { 128 + sig as u8 } else { 130 }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(run: &Run) -> String {
    match run.schedule() {
        cycleqd_engine::run::Schedule::Batch(b) => format!("batch of {b}"),
        cycleqd_engine::run::Schedule::Steady => "steady".into(),
    }
}

/// The loop's progress bar and the final table's, on stderr.
#[derive(Default)]
struct Bars {
    bar: Option<ProgressBar>,
}

impl Reporter for Bars {
    fn note(&mut self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn started(&mut self, p: &Progress, workers: &[String]) {
        let bar = ProgressBar::new(p.generations).with_position(p.applied.min(p.generations));
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} children  {per_sec}  {prefix} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.reset_eta();
        if p.applied > 0 {
            bar.println(format!("resuming after {} children", p.applied));
        }
        bar.println(format!(
            "{} worker(s): {}",
            workers.len(),
            workers.join(", ")
        ));
        self.bar = Some(bar);
    }

    fn progress(&mut self, p: &Progress) {
        if let Some(bar) = &self.bar {
            let best: Vec<String> = p.best.iter().map(|(n, b)| format!("{n} {b:.2}")).collect();
            let raced = if p.examples_scored < p.examples_full {
                format!(
                    "  examples {:.0}% of full, {} stopped early",
                    100.0 * p.examples_scored as f64 / p.examples_full.max(1) as f64,
                    p.stopped_early
                )
            } else {
                String::new()
            };
            bar.set_message(format!(
                "best: {}{}{raced}",
                best.join(", "),
                if p.failed > 0 {
                    format!("  ({} failed)", p.failed)
                } else {
                    String::new()
                }
            ));
            bar.set_position(p.applied);
        }
    }

    fn workers(&mut self, live: &[WorkerStatus]) {
        if let Some(bar) = &self.bar {
            let each: Vec<String> = live
                .iter()
                .map(|w| {
                    let short = w.name.rsplit('/').next().unwrap_or(&w.name);
                    format!("{short} {:.1}/s", w.children_per_second)
                })
                .collect();
            bar.set_prefix(format!("{} worker(s) [{}]", live.len(), each.join(", ")));
        }
    }

    fn loop_ended(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }

    fn table(&mut self, step: usize, total: usize, what: &str) {
        if step == 0 {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "scoring the final table [{bar:30}] {pos}/{len} {msg}",
                )
                .expect("valid template"),
            );
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(what.to_string());
            if step == total {
                bar.finish_and_clear();
            }
        }
        if step == total {
            self.bar = None;
        }
    }
}
