//! `cycleqd-engine worker --broker URL [--device D] [--run NAME] [--path-map FROM=TO]`: a worker
//! on any node. It reads the run's resolved configuration from the broker, opens the same base,
//! experts and tasks (at the same paths, or mapped), checks that its expert set's fingerprint
//! is the coordinator's, and serves children until the run is finished.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::Args;

use cycleqd_engine::backend::cuda::DeviceChoice;
use cycleqd_engine::broker::{read_run, serve, BrokerUrl, ServeOptions};
use cycleqd_engine::qd::RunConfig;
use cycleqd_engine::run::{open_broker_worker, plan_workers, Device, Worker};

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The broker the coordinator publishes on (`redis://HOST:PORT/DB`, `rediss://` for TLS).
    #[arg(long)]
    broker: BrokerUrl,
    /// cpu, cuda or cuda:N (default: the first GPU when present, else the CPU).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// The run to serve (default: the only one on the broker).
    #[arg(long)]
    run: Option<String>,
    /// Paths of the coordinator's node that are mounted elsewhere here (repeatable):
    /// `/mnt/models=/data/models`.
    #[arg(long, value_parser = parse_map)]
    path_map: Vec<(PathBuf, PathBuf)>,
    /// Where factors are cached when the coordinator's factor cache is not visible here.
    #[arg(long, default_value = "cycleqd-worker-factors")]
    factor_cache: PathBuf,
    /// Benchmarks only: hold each child this many milliseconds and score it by a fixed
    /// function of its genome instead of evaluating it (`bench --op scheduler --broker`).
    #[arg(long, hide = true)]
    simulate_child_ms: Option<f64>,
}

fn parse_map(s: &str) -> Result<(PathBuf, PathBuf), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.into(), b.into())),
        _ => Err(format!("`{s}` is not FROM=TO")),
    }
}

pub fn run(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let on_broker = read_run(&a.broker, a.run.as_deref())?;
    let mut cfg = RunConfig::parse_resolved(
        &on_broker.config_toml,
        &format!("run `{}` on {}", on_broker.name, a.broker),
    )?;
    cfg.map_paths(&a.path_map);
    let mut coordinator_cache = PathBuf::from(&on_broker.factor_cache);
    for (from, to) in &a.path_map {
        if let Ok(rest) = coordinator_cache.strip_prefix(from) {
            coordinator_cache = to.join(rest);
            break;
        }
    }
    let device: Device = match a.device {
        // One worker per process: the first GPU unless told otherwise.
        None => plan_workers(Some(1), None)?.remove(0),
        Some(d) => plan_workers(Some(1), Some(d))?.remove(0),
    };
    let work_dir = std::env::temp_dir().join(format!("cycleqd-worker-{}", std::process::id()));
    let (set, mut worker): (_, Box<dyn Worker>) = match a.simulate_child_ms {
        Some(ms) => {
            let set = cycleqd_engine::bench::scheduler::expert_set_of(&cfg)?;
            if set.fingerprint != on_broker.fingerprint {
                return Err(anyhow!("the expert set here is not the coordinator's"));
            }
            (
                Arc::new(set),
                Box::new(cycleqd_engine::bench::scheduler::SimulatedWorker {
                    name: format!("simulated:{}", std::process::id()),
                    hold: std::time::Duration::from_secs_f64(ms / 1e3),
                }),
            )
        }
        None => open_broker_worker(
            &cfg,
            &coordinator_cache,
            &a.factor_cache,
            &work_dir,
            &device,
            on_broker.fingerprint,
        )
        .with_context(|| format!("worker for run `{}`", on_broker.name))?,
    };
    eprintln!(
        "worker {} serving run `{}` on {} (expert set {:016x})",
        worker.name(),
        on_broker.name,
        a.broker,
        on_broker.fingerprint
    );
    let opts = ServeOptions {
        run: on_broker.name.clone(),
        fingerprint: on_broker.fingerprint,
        visibility: on_broker.visibility,
        max_attempts: on_broker.max_attempts,
        stop: Arc::new(AtomicBool::new(false)),
    };
    let served = serve(&a.broker, &set, worker.as_mut(), &opts, &mut |line| {
        eprintln!("{line}")
    })?;
    let _ = std::fs::remove_dir_all(&work_dir);
    eprintln!(
        "run `{}` finished: {} children evaluated here ({:.1} s busy), {} dead letters",
        on_broker.name, served.children, served.busy_seconds, served.dead_letters
    );
    Ok(ExitCode::SUCCESS)
}
