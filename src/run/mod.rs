//! A CycleQD run as a library: [`Run::open`] locks the run folder, reads the configuration's
//! inputs, factorises the expert set (on the first GPU when there is one) and finds a
//! checkpoint to resume; [`Run::execute`] builds one [`worker::Worker`] per device, drives the
//! [`coordinator::Coordinator`] with them ([`drive::drive`]) and, when every child is applied,
//! writes the final table, `final/`, `summary.json` and `report/` ([`finish::finish`]).
//! The CLI's `run` is a thin shell over this: parse, open, execute, print.

pub mod coordinator;
pub mod drive;
pub mod finish;
pub mod lock;
mod signals;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{cuda_device_count, cuda_unavailable_reason, CudaBackend, DeviceChoice};
use crate::broker::{
    drive_broker, finish_run, publish_run, serve, BrokerUrl, RunOnBroker, ServeOptions,
};
use crate::error::{Error, Result};
use crate::eval::{
    ExternalEvaluator, PreparedTask, Scoring, TaskFile, TaskScorer, TaskSettings, TaskSuite,
};
use crate::evolve::batched_svd::CpuLinalg;
use crate::evolve::{ExpertSet, Genome};
use crate::model::{ModelStore, Tokenizer};
use crate::qd::checkpoint::{self, CheckpointMeta};
use crate::qd::config::{EvaluationKind, RangeSpec, RunConfig, ScheduleKind};
use crate::qd::cycle::coefficient_groups;
use crate::qd::{GridArchive, Operators, Population};

pub use coordinator::{Coordinator, CoordinatorConfig, Progress, Report, Schedule, Told};
pub use drive::{drive, DriveEnd, DriveEvent, DriveStats, Driven, Stop};
pub use finish::{Row, Summary};
pub use lock::RunLock;
pub use worker::{ModelWorker, Split, Suites, Worker};

/// The last stop signal received (SIGINT 2, SIGTERM 15), or 0.
pub fn last_signal() -> i32 {
    signals::last()
}

/// Where one worker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU, with this many threads.
    Cpu { threads: usize },
    /// CUDA device `N`.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu { threads } => write!(f, "cpu ({threads} threads)"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The workers of a run: `count` of them (`None`: one per GPU found, else one CPU worker on
/// every core) on `device` (`None`: CUDA when present). CPU workers split the cores.
pub fn plan_workers(count: Option<usize>, device: Option<DeviceChoice>) -> Result<Vec<Device>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = |n: usize| -> Vec<Device> {
        (0..n)
            .map(|_| Device::Cpu {
                threads: (cores / n).max(1),
            })
            .collect()
    };
    let gpus = |ordinal: Option<usize>| -> Result<Vec<Device>> {
        if let Some(why) = cuda_unavailable_reason() {
            return Err(Error::invalid(format!(
                "--device cuda: CUDA is unavailable: {why}"
            )));
        }
        let found = cuda_device_count()?;
        match ordinal {
            Some(i) => {
                if count.is_some_and(|n| n != 1) {
                    return Err(Error::invalid(format!(
                        "workers = {}: --device cuda:{i} is one device, one worker",
                        count.unwrap_or(1)
                    )));
                }
                if i >= found {
                    return Err(Error::invalid(format!(
                        "CUDA device {i} requested, {found} present"
                    )));
                }
                Ok(vec![Device::Cuda(i)])
            }
            None => {
                let n = count.unwrap_or(found);
                if n > found {
                    return Err(Error::invalid(format!(
                        "workers = {n}: one worker per GPU, and {found} GPU(s) are present \
                         (use --device cpu for CPU workers)"
                    )));
                }
                Ok((0..n).map(Device::Cuda).collect())
            }
        }
    };
    match device {
        Some(DeviceChoice::Cpu) => Ok(cpu(count.unwrap_or(1))),
        Some(DeviceChoice::Cuda(i)) => gpus(i),
        None if cuda_unavailable_reason().is_none() && cuda_device_count()? > 0 => gpus(None),
        None => Ok(cpu(count.unwrap_or(1))),
    }
}

/// A device opened for a worker (and, the first one, for factorising).
enum Opened {
    Cpu { threads: usize },
    Cuda(Box<CudaBackend>),
}

/// How a run's messages and progress reach a person (the CLI's bars) or nobody.
pub trait Reporter {
    /// A line for the log.
    fn note(&mut self, _line: &str) {}
    /// The loop starts, with this progress already made (a resume).
    fn started(&mut self, _p: &Progress, _workers: &[String]) {}
    /// After every result.
    fn progress(&mut self, _p: &Progress) {}
    /// The loop is over.
    fn loop_ended(&mut self) {}
    /// The final table: `step` of `total` models scored, `what` next.
    fn table(&mut self, _step: usize, _total: usize, _what: &str) {}
    /// The live workers of a run over a broker, about once a second.
    fn workers(&mut self, _live: &[crate::broker::WorkerStatus]) {}
}

/// A reporter that says nothing.
pub struct Quiet;
impl Reporter for Quiet {}

/// How [`Run::execute`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEnd {
    /// Every child is applied and the outputs are written.
    Finished(Summary),
    /// The folder held a finished run: its table, unchanged.
    AlreadyFinished(Summary),
    /// Stopped on request: the checkpoint holds `applied` children and `in_flight` more to
    /// redo; the same run resumes there.
    Stopped { applied: u64, in_flight: usize },
}

/// An opened run folder.
pub struct Run {
    pub cfg: RunConfig,
    pub out: PathBuf,
    pub set: Arc<ExpertSet>,
    pub suites: Arc<Suites>,
    pub devices: Vec<Device>,
    saved: Option<(Population, CheckpointMeta)>,
    opened: Vec<Opened>,
    started: Instant,
    /// Where the expert set's factors are cached (workers on other nodes read them there).
    pub factor_cache: PathBuf,
    _lock: RunLock,
}

impl Run {
    /// Locks `out`, checks the task files, opens the models and `devices`, factorises the
    /// expert set (cached; on the first device when it is a GPU) and reads the checkpoint of
    /// an earlier session, which must be of the same run.
    pub fn open(
        mut cfg: RunConfig,
        out: &Path,
        devices: Vec<Device>,
        reporter: &mut dyn Reporter,
    ) -> Result<Run> {
        let started = Instant::now();
        if devices.is_empty() {
            return Err(Error::invalid("a run needs at least one worker"));
        }
        // The run folder must not be, sit inside, or hold a model or task file it reads.
        let mut inputs: Vec<&Path> = vec![&cfg.base];
        for t in &cfg.tasks {
            inputs.push(&t.expert);
            inputs.extend(t.fitness.as_deref());
            inputs.extend(t.heldout.as_deref());
        }
        crate::durable::check_output_dir(out, &inputs)?;
        let lock = RunLock::acquire(out)?;
        // What killed earlier sessions left half-written (the lock says none is running).
        for d in [out.to_path_buf(), out.join("archives"), out.join("report")] {
            for p in crate::durable::remove_stale_temporaries(&d) {
                reporter.note(&format!("removed {} (left by a killed run)", p.display()));
            }
        }
        let base = ModelStore::open_llama(&cfg.base)?;
        let suites = Arc::new(build_suites(&cfg, &base, out)?);
        let experts = cfg
            .tasks
            .iter()
            .map(|t| ModelStore::open_llama(&t.expert))
            .collect::<Result<Vec<_>>>()?;
        let opened = devices
            .iter()
            .map(open_device)
            .collect::<Result<Vec<_>>>()?;
        let cache_dir = cfg
            .factor_cache
            .clone()
            .unwrap_or_else(|| out.join("factors"));
        let t0 = Instant::now();
        let set = match opened.first() {
            Some(Opened::Cuda(gpu)) => {
                ExpertSet::build_with(base, experts, cfg.rank(), Some(&cache_dir), gpu.as_ref())?
            }
            _ => ExpertSet::build_with(base, experts, cfg.rank(), Some(&cache_dir), &CpuLinalg)?,
        }
        .with_crossover(cfg.crossover()?);
        reporter.note(&format!(
            "factors: {}, {} tensors, {} in {} ({:.2} s); worst relative error {:.2e}",
            set.rank,
            set.factorised_tensors(),
            set.cache_status,
            cache_dir.display(),
            t0.elapsed().as_secs_f64(),
            set.worst_relative_error(),
        ));
        let ckpt = out.join("checkpoint.safetensors");
        let saved = if ckpt.is_file() {
            let (pop, meta) = checkpoint::load(&ckpt, &set)?;
            let prev: RunConfig = toml::from_str(&meta.config).map_err(|e| {
                Error::format(&ckpt, format!("unreadable saved configuration: {e}"))
            })?;
            if !cfg.same_run_as(&prev) {
                return Err(Error::format(
                    &ckpt,
                    "this run folder belongs to a different configuration; use another --out",
                ));
            }
            Some((pop, meta))
        } else {
            None
        };
        if cfg.evolution.schedule == ScheduleKind::Batch && cfg.evolution.batch.is_none() {
            cfg.evolution.batch = Some(devices.len());
        }
        Ok(Run {
            cfg,
            out: out.to_path_buf(),
            set: Arc::new(set),
            suites,
            devices,
            saved,
            opened,
            started,
            factor_cache: std::path::absolute(&cache_dir).unwrap_or(cache_dir),
            _lock: lock,
        })
    }

    /// The schedule the configuration resolves to.
    pub fn schedule(&self) -> Schedule {
        match self.cfg.evolution.schedule {
            ScheduleKind::Steady => Schedule::Steady,
            ScheduleKind::Batch => Schedule::Batch(self.cfg.evolution.batch.unwrap_or(1)),
        }
    }

    /// Whether the folder holds a finished run (its summary written).
    pub fn finished_summary(&self) -> Result<Option<Summary>> {
        let path = self.out.join("summary.json");
        match &self.saved {
            Some((pop, meta))
                if path.is_file()
                    && meta.in_flight.is_empty()
                    && pop.children_done >= self.cfg.evolution.generations =>
            {
                Ok(Some(Summary::read(&path)?))
            }
            _ => Ok(None),
        }
    }

    /// One worker per opened device (each places the set's sources there once).
    pub fn workers(&mut self) -> Result<Vec<Box<dyn Worker>>> {
        let shared = self.devices.len() > 1;
        std::mem::take(&mut self.opened)
            .into_iter()
            .enumerate()
            .map(|(i, d)| make_worker(i, d, shared, &self.set, &self.suites))
            .collect()
    }

    /// The coordinator: resumed from the checkpoint, or a new run whose archives are seeded
    /// with the experts, scored by `first`.
    pub fn coordinator(&mut self, first: &mut dyn Worker) -> Result<Coordinator> {
        let names: Vec<&str> = self.set.tensors.iter().map(|t| t.name.as_str()).collect();
        let e = &self.cfg.evolution;
        let ccfg = CoordinatorConfig {
            ops: Operators {
                seed: e.seed,
                crossover_mean: e.crossover_mean,
                crossover_std: e.crossover_std,
                groups: coefficient_groups(&names, e.crossover_granularity),
                mutation_w_max: e.mutation_w_max,
                sampling: self.cfg.elite_sampling().map_err(Error::invalid)?,
            },
            schedule: self.schedule(),
            generations: e.generations,
            checkpoint_every: e.checkpoint_every,
            config_toml: self.cfg.to_toml(),
            racing: self.racing(),
        };
        if let Some((pop, meta)) = self.saved.take() {
            return Coordinator::resume(&self.out, self.set.clone(), pop, meta, ccfg);
        }
        let tasks: Vec<String> = self.cfg.tasks.iter().map(|t| t.name.clone()).collect();
        let expert_fitness = (0..self.set.experts.len())
            .map(|e| {
                first
                    .evaluate(
                        &Genome::seed(&self.set, e),
                        &format!("expert-{}", tasks[e]),
                        None,
                    )?
                    .map_err(|r| Error::invalid(format!("expert {}: {r}", tasks[e])))
            })
            .collect::<Result<Vec<_>>>()?;
        let scores: Vec<Vec<f64>> = expert_fitness.iter().map(|e| e.scores.clone()).collect();
        let ranges = measure_ranges(&self.cfg, &scores)?;
        let pop = Population::new(
            &self.set,
            tasks,
            &ranges,
            self.cfg.evolution.bins,
            expert_fitness,
        )?;
        Coordinator::create(&self.out, self.set.clone(), pop, ccfg)
    }

    /// The racing settings the configuration resolves to (`None`: every child is scored on
    /// every example). Only built-in tasks race; a task's `evaluation` overrides the run's.
    pub fn racing(&self) -> Option<crate::qd::RacingConfig> {
        let e = &self.cfg.evolution;
        let raced: Vec<bool> = self
            .cfg
            .tasks
            .iter()
            .zip(&self.suites.fitness.scorers)
            .map(|(t, s)| {
                let wanted = t.evaluation.unwrap_or(e.evaluation) == EvaluationKind::Racing;
                wanted && matches!(s, TaskScorer::Builtin(_))
            })
            .collect();
        if !raced.iter().any(|&r| r) {
            return None;
        }
        let batch = e.racing_batch;
        let rounds = self
            .suites
            .fitness
            .scorers
            .iter()
            .zip(&raced)
            .filter_map(|(s, &r)| match s {
                TaskScorer::Builtin(t) if r => {
                    Some(crate::eval::racing::rounds(t.len(), batch, e.racing_growth))
                }
                _ => None,
            })
            .max()
            .unwrap_or(1);
        Some(crate::qd::RacingConfig {
            raced,
            batch,
            growth: e.racing_growth,
            confidence: e.racing_confidence,
            seed: e.seed,
            rounds,
        })
    }

    /// The whole run from where the folder stands: workers, the loop (until done or `stop`),
    /// then the outputs.
    pub fn execute(&mut self, stop: &Stop, reporter: &mut dyn Reporter) -> Result<RunEnd> {
        if let Some(s) = self.finished_summary()? {
            return Ok(RunEnd::AlreadyFinished(s));
        }
        let workers = self.workers()?;
        self.execute_with(workers, stop, reporter)
    }

    /// [`Run::execute`] with the caller's workers (the first scores the experts and the final
    /// table).
    pub fn execute_with(
        &mut self,
        mut workers: Vec<Box<dyn Worker>>,
        stop: &Stop,
        reporter: &mut dyn Reporter,
    ) -> Result<RunEnd> {
        if workers.is_empty() {
            return Err(Error::invalid("a run needs at least one worker"));
        }
        for w in &workers {
            reporter.note(&match w.placement() {
                Some(p) => format!("worker {}: sources {p}", w.name()),
                None => format!("worker {}", w.name()),
            });
        }
        let mut coord = self.coordinator(workers[0].as_mut())?;
        let names: Vec<String> = workers.iter().map(|w| w.name()).collect();
        let resumed_at = coord.population().children_done;
        reporter.started(&coord.progress(), &names);
        let loop_start = Instant::now();
        let Driven {
            end,
            workers: mut back,
            ..
        } = drive(&mut coord, workers, stop, &mut |ev| forward(reporter, ev))?;
        self.conclude(
            coord, end, &mut back, names, resumed_at, loop_start, reporter,
        )
    }

    /// The run over a broker (`url`, as run `name`): the run is published, `local` of this
    /// process's workers serve it as remote ones do (0: coordinate only; the first device
    /// still scores the experts and the final table), and the coordinator drives it through
    /// the streams. The same folder and broker resume it after a crash.
    pub fn execute_broker(
        &mut self,
        url: &BrokerUrl,
        name: &str,
        local: usize,
        stop: &Stop,
        reporter: &mut dyn Reporter,
    ) -> Result<RunEnd> {
        use std::sync::atomic::{AtomicBool, Ordering};
        if let Some(s) = self.finished_summary()? {
            return Ok(RunEnd::AlreadyFinished(s));
        }
        let mut workers = self.workers()?;
        if workers.is_empty() {
            return Err(Error::invalid(
                "a run needs one device of its own (to score the experts and the final table)",
            ));
        }
        let mut coord = self.coordinator(workers[0].as_mut())?;
        let run = RunOnBroker {
            name: name.to_string(),
            fingerprint: self.set.fingerprint,
            config_toml: self.cfg.to_toml(),
            factor_cache: self.factor_cache.display().to_string(),
            max_attempts: self.cfg.evolution.max_attempts,
            visibility: Duration::from_secs_f64(self.cfg.evolution.visibility_timeout_s),
        };
        publish_run(url, &run)?;
        reporter.note(&format!(
            "run `{name}` on broker {url} (expert set {:016x}); {local} local worker(s)",
            run.fingerprint
        ));
        let resumed_at = coord.population().children_done;
        let names: Vec<String> = workers.iter().take(local).map(|w| w.name()).collect();
        reporter.started(&coord.progress(), &names);
        let stop_local = Arc::new(AtomicBool::new(false));
        let n_local = local.min(workers.len());
        let serving: Vec<_> = workers
            .drain(..n_local)
            .map(|mut w| {
                let (url, set) = (url.clone(), self.set.clone());
                let opts = ServeOptions {
                    run: name.to_string(),
                    fingerprint: run.fingerprint,
                    visibility: run.visibility,
                    max_attempts: run.max_attempts,
                    stop: stop_local.clone(),
                };
                std::thread::spawn(move || {
                    let r = serve(&url, &set, w.as_mut(), &opts, &mut |_| {});
                    (w, r)
                })
            })
            .collect();
        let loop_start = Instant::now();
        let driven = drive_broker(&mut coord, url, &run, stop, &mut |ev| forward(reporter, ev));
        if let Ok((DriveEnd::Finished, _)) = &driven {
            finish_run(url, name)?;
        }
        stop_local.store(true, Ordering::SeqCst);
        let mut back = vec![];
        for t in serving {
            let (w, r) = t
                .join()
                .map_err(|_| Error::invalid("a local worker's thread panicked"))?;
            if let Err(e) = r {
                reporter.note(&format!("local worker {}: {e}", w.name()));
            }
            back.push(w);
        }
        back.append(&mut workers);
        let (end, stats) = driven?;
        reporter.note(&format!(
            "broker: {} children published ({} again after a worker's error), {} results, {} duplicates ignored, {} dead letters",
            stats.published, stats.republished, stats.results, stats.duplicates, stats.dead_letters
        ));
        self.conclude(
            coord, end, &mut back, names, resumed_at, loop_start, reporter,
        )
    }

    /// After the loop: the checkpoint, then (every child applied) the final table and outputs,
    /// scored by the first of `back`.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        mut coord: Coordinator,
        end: DriveEnd,
        back: &mut [Box<dyn Worker>],
        names: Vec<String>,
        resumed_at: u64,
        loop_start: Instant,
        reporter: &mut dyn Reporter,
    ) -> Result<RunEnd> {
        coord.checkpoint()?;
        // Past the loop a stop request has nothing left to save: signals act as usual again.
        signals::restore();
        reporter.loop_ended();
        let loop_seconds = loop_start.elapsed().as_secs_f64();
        if let DriveEnd::Stopped { .. } = end {
            return Ok(RunEnd::Stopped {
                applied: coord.population().children_done,
                in_flight: coord.in_flight(),
            });
        }
        let children_run = coord.population().children_done - resumed_at;
        let timing = json!({
            "workers": names,
            "schedule": format!("{:?}", self.schedule()).to_lowercase(),
            "children_this_session": children_run,
            "loop_seconds_this_session": loop_seconds,
            "children_per_second": children_run as f64 / loop_seconds.max(1e-9),
            "total_seconds_this_session": self.started.elapsed().as_secs_f64(),
        });
        let worker = back
            .first_mut()
            .ok_or_else(|| Error::invalid("no worker is left to score the final table"))?;
        let summary = finish::finish(
            &self.out,
            &self.set,
            coord.population(),
            self.cfg.evolution.final_model,
            &self.suites.table_split,
            worker.as_mut(),
            timing,
            &mut |step, total, what| reporter.table(step, total, what),
        )?;
        Ok(RunEnd::Finished(summary))
    }
}

/// A worker on opened device `d` (the `i`th of the process; `shared`: CPU workers split the
/// cores between them).
fn make_worker(
    i: usize,
    d: Opened,
    shared: bool,
    set: &Arc<ExpertSet>,
    suites: &Arc<Suites>,
) -> Result<Box<dyn Worker>> {
    Ok(match d {
        Opened::Cpu { threads } => {
            let pool = if shared {
                Some(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |t| format!("cpu{i}-{t}"))
                        .build()
                        .map_err(|e| Error::invalid(format!("CPU worker {i}: {e}")))?,
                )
            } else {
                None
            };
            Box::new(ModelWorker::new(
                format!("cpu:{i}"),
                CpuBackend,
                set.clone(),
                suites.clone(),
                None,
                pool,
            )?)
        }
        Opened::Cuda(gpu) => {
            use crate::backend::Backend;
            let name = gpu.name();
            Box::new(ModelWorker::new(
                name,
                *gpu,
                set.clone(),
                suites.clone(),
                None,
                None,
            )?)
        }
    })
}

fn open_device(d: &Device) -> Result<Opened> {
    match d {
        Device::Cpu { threads } => Ok(Opened::Cpu { threads: *threads }),
        Device::Cuda(i) => CudaBackend::open(*i).map(|b| Opened::Cuda(Box::new(b))),
    }
}

/// What a worker process on any node needs of a run it serves through a broker: the run's
/// configuration (paths as they are on this node), the coordinator's factor cache (read there
/// when this node sees it, else computed into `local_cache`), a folder for exported copies of
/// children, and its device. The expert set's fingerprint must be `fingerprint`, the
/// coordinator's, or the worker would materialise other children from the same genomes.
pub fn open_broker_worker(
    cfg: &RunConfig,
    coordinator_cache: &Path,
    local_cache: &Path,
    work_dir: &Path,
    device: &Device,
    fingerprint: u64,
) -> Result<(Arc<ExpertSet>, Box<dyn Worker>)> {
    let base = ModelStore::open_llama(&cfg.base)?;
    let suites = Arc::new(build_suites(cfg, &base, work_dir)?);
    let experts = cfg
        .tasks
        .iter()
        .map(|t| ModelStore::open_llama(&t.expert))
        .collect::<Result<Vec<_>>>()?;
    let opened = open_device(device)?;
    let cache = if coordinator_cache.is_dir() {
        coordinator_cache
    } else {
        local_cache
    };
    let set = match &opened {
        Opened::Cuda(gpu) => {
            ExpertSet::build_with(base, experts, cfg.rank(), Some(cache), gpu.as_ref())?
        }
        Opened::Cpu { .. } => {
            ExpertSet::build_with(base, experts, cfg.rank(), Some(cache), &CpuLinalg)?
        }
    }
    .with_crossover(cfg.crossover()?);
    if set.fingerprint != fingerprint {
        return Err(Error::invalid(format!(
            "this node's expert set (fingerprint {:016x}, factors {} in {}) is not the coordinator's \
             ({fingerprint:016x}): other models, or factors computed elsewhere; give the worker the \
             same files and the run's factor cache ({}), with --path-map where they are mounted elsewhere",
            set.fingerprint,
            set.cache_status,
            cache.display(),
            coordinator_cache.display()
        )));
    }
    let set = Arc::new(set);
    let worker = make_worker(0, opened, false, &set, &suites)?;
    Ok((set, worker))
}

/// Passes a drive's events to a reporter.
fn forward(reporter: &mut dyn Reporter, ev: DriveEvent) {
    match ev {
        DriveEvent::Progress(p) => reporter.progress(p),
        DriveEvent::Note(n) => reporter.note(&n),
        DriveEvent::Workers(w) => reporter.workers(w),
    }
}

/// The fitness and held-out suites, and per task which split the table shows.
fn build_suites(cfg: &RunConfig, base: &ModelStore, out: &Path) -> Result<Suites> {
    let base_dir = base.dir().to_path_buf();
    let tok = if cfg.tasks.iter().any(|t| t.fitness.is_some() || t.serve) {
        Some(Tokenizer::from_dir(&base_dir)?)
    } else {
        None
    };
    let mut fit = vec![];
    let mut held = vec![];
    let mut split = vec![];
    for t in &cfg.tasks {
        // The file's own settings, under the configuration's.
        let scoring = |file: &TaskFile| -> Result<Scoring> {
            let (merged, _) =
                TaskSettings::merge(&[("task file", &file.settings), ("config", &t.settings())]);
            merged
                .resolve()
                .map_err(|m| Error::format(&file.path, format!("task `{}`: {m}", t.name)))
        };
        match (&t.fitness, &t.evaluator) {
            (Some(f), _) => {
                let tk = tok.as_ref().expect("loaded when a task has a fitness file");
                let file = TaskFile::load(f)?;
                fit.push(TaskScorer::Builtin(Box::new(PreparedTask::new(
                    tk,
                    &t.name,
                    &file,
                    scoring(&file)?,
                )?)));
                let (hfile, s) = match &t.heldout {
                    Some(h) => (TaskFile::load(h)?, "heldout"),
                    None => (file, "fitness"),
                };
                let hs = scoring(&hfile)?;
                held.push(TaskScorer::Builtin(Box::new(PreparedTask::new(
                    tk, &t.name, &hfile, hs,
                )?)));
                split.push(s);
            }
            (None, Some(cmd)) => {
                let ev = ExternalEvaluator {
                    command: cmd.clone(),
                    timeout: Duration::from_secs_f64(t.evaluator_timeout_s),
                    dir: t.evaluator_dir.clone(),
                    serve: t.serve,
                };
                fit.push(TaskScorer::External(ev.clone()));
                held.push(TaskScorer::External(ev));
                split.push("external");
            }
            (None, None) => unreachable!("validated"),
        }
    }
    let config = base.config().clone();
    for s in fit.iter().chain(&held) {
        if let TaskScorer::Builtin(t) = s {
            t.check_fits(config.max_position_embeddings)?;
        }
    }
    let config_json = config.to_json_with_dtype(base.dominant_dtype());
    let suite = |scorers| TaskSuite {
        names: cfg.tasks.iter().map(|t| t.name.clone()).collect(),
        scorers,
        config: config.clone(),
        config_json: config_json.clone(),
        companions: base_dir.clone(),
        tokenizer: tok.clone(),
        work_dir: out.join("work"),
        batch: cfg.evolution.eval_batch,
    };
    Ok(Suites {
        fitness: suite(fit),
        heldout: suite(held),
        table_split: split,
    })
}

/// Per task, the range of its score where it is a measure.
fn measure_ranges(cfg: &RunConfig, expert_fitness: &[Vec<f64>]) -> Result<Vec<(f64, f64)>> {
    cfg.tasks
        .iter()
        .enumerate()
        .map(|(k, t)| match &t.measure_range {
            None => Ok((0.0, 1.0)),
            Some(RangeSpec::Explicit([lo, hi])) => Ok((*lo, *hi)),
            Some(RangeSpec::Rule(_)) => {
                let scores: Vec<f64> = expert_fitness.iter().map(|f| f[k]).collect();
                let (lo, hi) = GridArchive::<()>::paper_range(&scores);
                if lo >= hi {
                    return Err(Error::invalid(format!(
                        "task {}: measure_range = \"experts\" gives an empty range ({lo}, {hi}): \
                         every expert scores {} on it; set [lo, hi]",
                        t.name, scores[0]
                    )));
                }
                Ok((lo, hi))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(range: &str) -> RunConfig {
        toml::from_str(&format!(
            "base = \"b\"\n[[tasks]]\nname = \"x\"\nexpert = \"e1\"\nfitness = \"f\"\nmeasure_range = {range}\n\
             [[tasks]]\nname = \"y\"\nexpert = \"e2\"\nfitness = \"f\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn measure_ranges_follow_the_paper_rule_and_refuse_an_empty_one() {
        let c = config("\"experts\"");
        // Task x: the experts score 0.2 and 0.6 → [0.85·0.2, 1.15·0.6]; y has the default.
        let r = measure_ranges(&c, &[vec![0.2, 0.9], vec![0.6, 0.1]]).unwrap();
        assert!(
            (r[0].0 - 0.17).abs() < 1e-12 && (r[0].1 - 0.69).abs() < 1e-12,
            "{r:?}"
        );
        assert_eq!(r[1], (0.0, 1.0));
        // Every expert scores 0 on x: the rule gives a single value, which is refused.
        let e = measure_ranges(&c, &[vec![0.0, 0.9], vec![0.0, 0.1]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("task x") && e.contains("empty range"), "{e}");
        let explicit = config("[0.1, 0.3]");
        assert_eq!(
            measure_ranges(&explicit, &[vec![0.0; 2], vec![0.0; 2]]).unwrap()[0],
            (0.1, 0.3)
        );
    }
}
