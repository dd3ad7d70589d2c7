//! `bench --op scheduler`: the real coordinator (asks, tells, archive inserts, the event log,
//! checkpoints at the configured cadence) driving simulated devices, one per worker, that hold
//! each child a fixed time. It measures what the scheduling costs: each worker's busy fraction
//! (time evaluating ÷ wall time; the ceiling is 1) and the coordinator's time per child.
//!
//! The genomes are the demo's, bred by the real operators; a simulated worker scores a genome
//! by a fixed function of its coefficients, so the archives fill as in a run and the results
//! are a deterministic function of the schedule.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::eval::Scored;
use crate::evolve::{ExpertSet, Genome, Rank};
use crate::model::{HostTensor, ModelStore};
use crate::qd::config::Granularity;
use crate::qd::cycle::coefficient_groups;
use crate::qd::{EliteSampling, Operators, Population};
use crate::run::coordinator::{Coordinator, CoordinatorConfig, Schedule};
use crate::run::drive::{drive, Stop};
use crate::run::worker::{Split, Worker};

/// A device that holds every child `hold` and scores it by [`simulated_scores`].
pub struct SimulatedWorker {
    pub name: String,
    pub hold: Duration,
}

/// Scores of a genome, one per expert: 0.7 × the mean of its `a_e` over tensors (clamped to
/// [0, 1]) plus 0.3 × a uniform draw hashed from its coefficients. An expert's seed leads on its
/// own task; crossovers mix; every distinct genome scores differently, deterministically.
pub fn simulated_scores(genome: &Genome) -> Vec<f64> {
    let k = genome.tensors.first().map_or(0, |t| t.a.len());
    let id = u64::from_str_radix(&genome.content_id(), 16).unwrap_or(0);
    let n = genome.tensors.len().max(1) as f64;
    (0..k)
        .map(|e| {
            let a: f64 = genome.tensors.iter().map(|t| t.a[e] as f64).sum::<f64>() / n;
            let u = crate::synth::hash_uniform(id, e as u64) as f64;
            0.7 * a.clamp(0.0, 1.0) + 0.3 * u
        })
        .collect()
}

impl Worker for SimulatedWorker {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn evaluate(
        &mut self,
        genome: &Genome,
        _label: &str,
        _race: Option<&crate::qd::RaceBounds>,
    ) -> Result<Scored> {
        std::thread::sleep(self.hold);
        Ok(Ok(simulated_scores(genome).into()))
    }

    fn score_tensors(
        &mut self,
        _tensors: &[(String, HostTensor)],
        _split: Split,
        _label: &str,
    ) -> Result<Scored> {
        Err(Error::invalid("a simulated worker scores genomes only"))
    }
}

/// The demo's expert set (synthesised under `dir` once).
pub fn demo_set(dir: &Path) -> Result<ExpertSet> {
    if !dir.join("cycleqd.toml").is_file() {
        crate::synth::synthesize(dir, &crate::synth::SynthOptions::default())?;
    }
    expert_set_of(&crate::qd::RunConfig::load(&dir.join("cycleqd.toml"))?)
}

/// The expert set of a configuration, factorised at full rank on the CPU without a cache (the
/// simulated workers' set: the same on every process that opens the same files).
pub fn expert_set_of(cfg: &crate::qd::RunConfig) -> Result<ExpertSet> {
    let experts = cfg
        .tasks
        .iter()
        .map(|t| ModelStore::open_llama(&t.expert))
        .collect::<Result<Vec<_>>>()?;
    Ok(
        ExpertSet::build(ModelStore::open_llama(&cfg.base)?, experts, Rank::Full)?
            .with_crossover(cfg.crossover()?),
    )
}

/// One scheduler measurement: `children` children on `workers` simulated devices holding each
/// `child_ms`, in a fresh run folder under `scratch`.
pub fn measure(
    set: Arc<ExpertSet>,
    scratch: &Path,
    workers: usize,
    child_ms: f64,
    schedule: Schedule,
    children: u64,
) -> Result<Value> {
    let out = unique_dir(scratch)?;
    let mut coord = bench_coordinator(set, &out, schedule, children)?;
    let hold = Duration::from_secs_f64(child_ms / 1e3);
    let fleet: Vec<Box<dyn Worker>> = (0..workers)
        .map(|i| {
            Box::new(SimulatedWorker {
                name: format!("sim:{i}"),
                hold,
            }) as Box<dyn Worker>
        })
        .collect();
    let t = Instant::now();
    let driven = drive(&mut coord, fleet, &Stop::default(), &mut |_| {})?;
    coord.checkpoint()?;
    let total = t.elapsed().as_secs_f64();
    let st = &driven.stats;
    let busy: Vec<f64> = st
        .busy_seconds
        .iter()
        .map(|b| b / st.wall_seconds.max(1e-12))
        .collect();
    let _ = std::fs::remove_dir_all(&out);
    Ok(json!({
        "schedule": match schedule { Schedule::Batch(b) => format!("batch {b}"), Schedule::Steady => "steady".into() },
        "workers": workers,
        "child_ms": child_ms,
        "children": children,
        "wall_seconds": st.wall_seconds,
        "total_seconds_with_final_checkpoint": total,
        "busy_fraction_per_worker": busy,
        "busy_fraction_min": busy.iter().copied().fold(f64::INFINITY, f64::min),
        "busy_fraction_mean": busy.iter().sum::<f64>() / busy.len().max(1) as f64,
        "coordinator_ms_per_child": 1e3 * st.coordinator_seconds / children.max(1) as f64,
        "children_per_second": children as f64 / st.wall_seconds.max(1e-12),
        "ideal_children_per_second": workers as f64 / (child_ms / 1e3),
    }))
}

/// The coordinator of [`measure`] (simulated scores, the demo's set and operators).
fn bench_coordinator(
    set: Arc<ExpertSet>,
    out: &Path,
    schedule: Schedule,
    children: u64,
) -> Result<Coordinator> {
    let k = set.experts.len();
    let names: Vec<&str> = set.tensors.iter().map(|t| t.name.as_str()).collect();
    let tasks: Vec<String> = (0..k).map(|e| format!("task{e}")).collect();
    let expert_fitness: Vec<Vec<f64>> = (0..k)
        .map(|e| simulated_scores(&Genome::seed(&set, e)))
        .collect();
    let pop = Population::new(&set, tasks, &vec![(0.0, 1.0); k], 15, expert_fitness)?;
    let cfg = CoordinatorConfig {
        ops: Operators {
            seed: 0,
            crossover_mean: 1.0,
            crossover_std: 0.01,
            groups: coefficient_groups(&names, Granularity::Model),
            mutation_w_max: 0.3,
            sampling: EliteSampling::Weighted {
                alpha_low: 0.5,
                alpha_high: 1.3,
            },
        },
        schedule,
        generations: children,
        // The configuration default: what a run pays.
        checkpoint_every: 25,
        config_toml: String::new(),
        racing: None,
    };
    Coordinator::create(out, set, pop, cfg)
}

/// [`measure`] through a broker: `workers` worker processes (`exe worker --simulate-child-ms`)
/// take the children from Redis. Their busy fractions come from the results (time evaluating
/// ÷ the drive's wall time); the broker's latency per child is the time from publishing a
/// child to reading its result, less the worker's hold.
#[allow(clippy::too_many_arguments)]
pub fn measure_broker(
    url: &crate::broker::BrokerUrl,
    exe: &Path,
    demo_dir: &Path,
    set: Arc<ExpertSet>,
    scratch: &Path,
    workers: usize,
    child_ms: f64,
    schedule: Schedule,
    children: u64,
) -> Result<Value> {
    use crate::broker::{
        drive_broker, finish_run, live_workers, publish_run, wire::Keys, RunOnBroker,
    };
    let out = unique_dir(scratch)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bench".into());
    let config = crate::qd::RunConfig::load(&demo_dir.join("cycleqd.toml"))?;
    let run = RunOnBroker {
        name: name.clone(),
        fingerprint: set.fingerprint,
        config_toml: config.to_toml(),
        factor_cache: out.join("factors").display().to_string(),
        max_attempts: 2,
        visibility: Duration::from_secs(60),
    };
    let mut coord = bench_coordinator(set, &out, schedule, children)?;
    publish_run(url, &run)?;
    let mut procs = (0..workers)
        .map(|_| {
            std::process::Command::new(exe)
                .args(["worker", "--broker", &url_arg(url), "--run", &name])
                .args(["--simulate-child-ms", &child_ms.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| Error::invalid(format!("starting a worker process: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    // Every worker up before the clock starts.
    let mut conn = url.connect()?;
    let keys = Keys::new(&name);
    let t0 = Instant::now();
    while live_workers(&mut conn, url, &keys)?.len() < workers {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(Error::invalid(
                "the worker processes did not come up in 60 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, stats) = drive_broker(&mut coord, url, &run, &Stop::default(), &mut |_| {})?;
    finish_run(url, &name)?;
    for p in &mut procs {
        let _ = p.wait();
    }
    coord.checkpoint()?;
    let _ = std::fs::remove_dir_all(&out);
    let busy: Vec<f64> = stats
        .busy_by_worker
        .values()
        .map(|b| b / stats.wall_seconds.max(1e-12))
        .collect();
    let mut lat = stats.latency_seconds.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
            * 1e3
    };
    Ok(json!({
        "schedule": match schedule { Schedule::Batch(b) => format!("batch {b}"), Schedule::Steady => "steady".into() },
        "broker": url.to_string(),
        "workers": workers,
        "child_ms": child_ms,
        "children": children,
        "wall_seconds": stats.wall_seconds,
        "busy_fraction_per_worker": busy,
        "busy_fraction_min": busy.iter().copied().fold(f64::INFINITY, f64::min),
        "busy_fraction_mean": busy.iter().sum::<f64>() / workers.max(1) as f64,
        "broker_latency_ms_median": pct(0.5),
        "broker_latency_ms_p90": pct(0.9),
        "children_per_second": children as f64 / stats.wall_seconds.max(1e-12),
        "ideal_children_per_second": workers as f64 / (child_ms / 1e3),
    }))
}

/// The URL as a worker process is given it (the real one: the display form masks passwords).
fn url_arg(url: &crate::broker::BrokerUrl) -> String {
    url.as_str().to_string()
}

fn unique_dir(scratch: &Path) -> Result<PathBuf> {
    let d = scratch.join(format!(
        "scheduler-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    Ok(d)
}
