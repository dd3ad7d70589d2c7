//! The coordinator of a run, in pyribs' ask/tell shape: it owns the population (archives,
//! elites, genomes), the event log and the checkpoint; [`Coordinator::ask`] breeds the next
//! child (or re-issues one in flight after a resume) and [`Coordinator::tell`] applies a
//! result. Who evaluates, where, and in what order results arrive is the caller's concern
//! (`super::drive` runs workers on threads).
//!
//! Schedules: **batch** — children `kB+1 ..= (k+1)B` are bred from the archives as they stood
//! after child `kB` and applied in child order, so the archives do not depend on how many
//! workers ran them or when their results came back; **steady** — a child is bred whenever one
//! is asked for and applied on arrival (CycleQD's asynchronous mode).
//!
//! Crash safety: every applied child appends one line to `events.jsonl`; every
//! `checkpoint_every` applied children a checkpoint records the population, the log's length,
//! the next child number and the children in flight (written on a background thread, after
//! the log is synced). Resuming cuts the log back to the checkpoint and re-issues the children
//! in flight; a result for a child not in flight (late, duplicated) is ignored and counted.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::durable::write_synced;
use crate::error::{Error, Result};
use crate::evolve::ExpertSet;
use crate::qd::checkpoint::{self, CheckpointMeta};
use crate::qd::{ChildEvent, ChildSpec, Operators, Outcome, Population};

/// When results reach the archives (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Children bred per archive snapshot, applied in child order.
    Batch(usize),
    /// Applied on arrival.
    Steady,
}

/// Who evaluated a child, and how long it took.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub worker: String,
    pub seconds: f64,
    /// Evaluations it took (2 when retried after a worker failed).
    pub attempts: u32,
}

/// What a tell did.
#[derive(Clone, Debug)]
pub enum Told {
    /// These events were applied (in batch mode a tell may release several children, or none
    /// until an earlier child arrives).
    Applied(Vec<ChildEvent>),
    /// The child was not in flight (told before, or from before a resume): ignored.
    Duplicate,
}

/// The run's fixed parameters.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub ops: Operators,
    pub schedule: Schedule,
    /// Children of the run.
    pub generations: u64,
    pub checkpoint_every: u64,
    /// The resolved configuration, stored in every checkpoint.
    pub config_toml: String,
    /// Racing: children stop being evaluated once they cannot enter an archive.
    pub racing: Option<crate::qd::RacingConfig>,
}

/// The state of a run, and its log and checkpoint on disk.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    set: Arc<ExpertSet>,
    pop: Population,
    next_child: u64,
    in_flight: BTreeMap<u64, Arc<ChildSpec>>,
    /// In flight but not handed out yet: the rest of a batch, or children restored by a
    /// resume.
    pending: VecDeque<u64>,
    /// Batch schedule: results waiting for an earlier child of their batch.
    arrived: BTreeMap<u64, (Outcome, Report)>,
    duplicates: u64,
    events: File,
    events_len: u64,
    writer: CheckpointWriter,
}

/// Progress of a run, for a progress bar.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub applied: u64,
    pub generations: u64,
    pub in_flight: usize,
    pub failed: u64,
    pub duplicates: u64,
    /// Each archive's best objective, by task.
    pub best: Vec<(String, f64)>,
    /// Examples scored, and what full evaluations would have scored.
    pub examples_scored: u64,
    pub examples_full: u64,
    /// Children racing stopped early.
    pub stopped_early: u64,
}

impl Coordinator {
    /// A new run in `out`: writes an empty `events.jsonl`, `config.toml` and the first
    /// checkpoint of `pop` (the experts seeded).
    pub fn create(
        out: &Path,
        set: Arc<ExpertSet>,
        pop: Population,
        cfg: CoordinatorConfig,
    ) -> Result<Coordinator> {
        let events_path = out.join("events.jsonl");
        write_synced(&events_path, b"")?;
        write_synced(&out.join("config.toml"), cfg.config_toml.as_bytes())?;
        let mut c = Coordinator::open(out, set, pop, cfg, 1, vec![], 0)?;
        c.checkpoint()?;
        Ok(c)
    }

    /// Resumes from a loaded checkpoint: `events.jsonl` is checked up to the checkpoint's
    /// length and cut there (later lines belong to children that will be redone), and the
    /// children in flight are re-issued first.
    pub fn resume(
        out: &Path,
        set: Arc<ExpertSet>,
        mut pop: Population,
        meta: CheckpointMeta,
        cfg: CoordinatorConfig,
    ) -> Result<Coordinator> {
        let events_path = out.join("events.jsonl");
        let events = read_events(&events_path, meta.events_len, pop.children_done)?;
        // The statistics' history is the log replayed; its end must be the archives the
        // checkpoint holds, or log and checkpoint are not of one run.
        pop.history = pop.replay_history(&events)?;
        let now: Vec<_> = pop.archives.iter().map(|a| a.stats()).collect();
        if pop.history.last().map(|h| &h.stats) != Some(&now) {
            return Err(Error::format(
                &events_path,
                "does not replay to the checkpoint's archives (not this run's log?)",
            ));
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&events_path)
            .map_err(|e| Error::io(&events_path, e))?;
        f.set_len(meta.events_len)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&events_path, e))?;
        Coordinator::open(
            out,
            set,
            pop,
            cfg,
            meta.next_child,
            meta.in_flight,
            meta.events_len,
        )
    }

    fn open(
        out: &Path,
        set: Arc<ExpertSet>,
        pop: Population,
        cfg: CoordinatorConfig,
        next_child: u64,
        in_flight: Vec<ChildSpec>,
        events_len: u64,
    ) -> Result<Coordinator> {
        if let Schedule::Batch(0) = cfg.schedule {
            return Err(Error::invalid("a batch of 0 children"));
        }
        let events_path = out.join("events.jsonl");
        let events = OpenOptions::new()
            .append(true)
            .open(&events_path)
            .map_err(|e| Error::io(&events_path, e))?;
        let writer = CheckpointWriter {
            path: out.join("checkpoint.safetensors"),
            events: events.try_clone().map_err(|e| Error::io(&events_path, e))?,
            events_path,
            pending: None,
            last_report: None,
        };
        let in_flight: BTreeMap<u64, Arc<ChildSpec>> = in_flight
            .into_iter()
            .map(|s| (s.child, Arc::new(s)))
            .collect();
        Ok(Coordinator {
            pending: in_flight.keys().copied().collect(),
            cfg,
            set,
            pop,
            next_child,
            in_flight,
            arrived: BTreeMap::new(),
            duplicates: 0,
            events,
            events_len,
            writer,
        })
    }

    /// The next child to evaluate: one bred earlier and not handed out yet (the rest of a
    /// batch, or one restored in flight), else a new one. `None` when there is nothing to
    /// hand out now: every child is bred, or (batch schedule) the current batch is out and
    /// still being evaluated.
    pub fn ask(&mut self) -> Result<Option<Arc<ChildSpec>>> {
        if self.pending.is_empty() && self.next_child <= self.cfg.generations {
            match self.cfg.schedule {
                Schedule::Steady => self.breed(1)?,
                // A batch is bred all at once from the archives the previous batch left,
                // and only once that batch is applied.
                Schedule::Batch(b) if self.in_flight.is_empty() => self.breed(b as u64)?,
                Schedule::Batch(_) => {}
            }
        }
        Ok(self.pending.pop_front().map(|n| self.in_flight[&n].clone()))
    }

    /// Breeds up to `count` new children from the archives as they are (in parallel: the
    /// children of a batch are independent, and every worker waits for them).
    fn breed(&mut self, count: u64) -> Result<()> {
        use rayon::prelude::*;
        let last = (self.next_child + count - 1).min(self.cfg.generations);
        let (pop, set, ops) = (&self.pop, &self.set, &self.cfg.ops);
        // Raced children must beat the archives they were bred from.
        let race = self.cfg.racing.as_ref().map(|r| Arc::new(r.bounds(pop)));
        let specs = (self.next_child..=last)
            .into_par_iter()
            .map(|n| {
                pop.breed(n, set, ops).map(|mut s| {
                    s.race = race.clone();
                    Arc::new(s)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for spec in specs {
            self.pending.push_back(spec.child);
            self.in_flight.insert(spec.child, spec);
        }
        self.next_child = last + 1;
        Ok(())
    }

    /// Applies child `child`'s outcome (batch schedule: once every earlier child in flight
    /// is applied), appending its event and checkpointing at the cadence.
    pub fn tell(&mut self, child: u64, outcome: Outcome, report: Report) -> Result<Told> {
        if !self.in_flight.contains_key(&child) || self.arrived.contains_key(&child) {
            self.duplicates += 1;
            return Ok(Told::Duplicate);
        }
        let mut applied = vec![];
        match self.cfg.schedule {
            Schedule::Steady => applied.push(self.apply(child, outcome, report)?),
            Schedule::Batch(_) => {
                self.arrived.insert(child, (outcome, report));
                while let Some(first) = self.in_flight.keys().next().copied() {
                    let Some((outcome, report)) = self.arrived.remove(&first) else {
                        break;
                    };
                    applied.push(self.apply(first, outcome, report)?);
                }
            }
        }
        Ok(Told::Applied(applied))
    }

    fn apply(&mut self, child: u64, outcome: Outcome, report: Report) -> Result<ChildEvent> {
        let spec = self
            .in_flight
            .remove(&child)
            .expect("told children are in flight");
        // A result may come for a child never handed out here (one restored by a resume
        // whose earlier evaluation finished after all).
        self.pending.retain(|&n| n != child);
        let mut ev = self.pop.apply(&spec, outcome)?;
        ev.seconds = report.seconds;
        ev.worker = report.worker;
        ev.attempts = report.attempts.max(1);
        let mut line = serde_json::to_vec(&ev).expect("events serialise");
        line.push(b'\n');
        self.events
            .write_all(&line)
            .map_err(|e| Error::io(&self.writer.events_path, e))?;
        self.events_len += line.len() as u64;
        let done = self.pop.children_done;
        signal_for_tests(done);
        if done.is_multiple_of(self.cfg.checkpoint_every) || self.is_done() {
            self.checkpoint_in_background()?;
        }
        Ok(ev)
    }

    /// Whether every child is bred and applied.
    pub fn is_done(&self) -> bool {
        self.next_child > self.cfg.generations && self.in_flight.is_empty()
    }

    /// Children bred and not yet applied.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Child `child`, if it is in flight (to hand it out again).
    pub fn spec_in_flight(&self, child: u64) -> Option<Arc<ChildSpec>> {
        self.in_flight.get(&child).cloned()
    }

    pub fn population(&self) -> &Population {
        &self.pop
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    pub fn set(&self) -> &Arc<ExpertSet> {
        &self.set
    }

    pub fn progress(&self) -> Progress {
        Progress {
            applied: self.pop.children_done,
            generations: self.cfg.generations,
            in_flight: self.in_flight.len(),
            failed: self.pop.failed,
            duplicates: self.duplicates,
            best: self
                .pop
                .best_per_archive()
                .iter()
                .zip(&self.pop.tasks)
                .enumerate()
                .map(|(k, (b, n))| (n.clone(), b.fitness[k]))
                .collect(),
            examples_scored: self.pop.examples_scored,
            examples_full: self.pop.examples_full,
            stopped_early: self.pop.stopped_early,
        }
    }

    fn meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            events_len: self.events_len,
            config: self.cfg.config_toml.clone(),
            next_child: self.next_child,
            in_flight: self.in_flight.values().map(|s| (**s).clone()).collect(),
        }
    }

    fn checkpoint_in_background(&mut self) -> Result<()> {
        // A snapshot (genomes shared) is all this thread pays; encoding and writing happen on
        // the writer's.
        self.writer.submit(self.pop.snapshot(), self.meta())
    }

    /// Writes a checkpoint of the state now and waits until it is on disk.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.checkpoint_in_background()?;
        self.writer.wait()
    }
}

/// Crash tests: with `CYCLEQD_SIGNAL_AT=N:KILL` (or `N:INT`, `N:TERM`) the process signals
/// itself right after the `N`th applied child's event is written, so a test kills a run at a
/// chosen point instead of racing it.
fn signal_for_tests(applied: u64) {
    static AT: std::sync::OnceLock<Option<(u64, i32)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("CYCLEQD_SIGNAL_AT").ok()?;
        let (n, sig) = v.split_once(':')?;
        let sig = match sig {
            "KILL" => libc::SIGKILL,
            "INT" => libc::SIGINT,
            "TERM" => libc::SIGTERM,
            _ => return None,
        };
        Some((n.parse().ok()?, sig))
    });
    if let Some((n, sig)) = *at {
        if n == applied {
            // SAFETY: raise(3) with a standard signal.
            unsafe { libc::raise(sig) };
        }
    }
}

/// Writes checkpoints on a thread of its own (at most one at a time), so the coordinator keeps
/// handing out children while the disk syncs. The event log is synced first: a checkpoint
/// never counts events that a crash could lose.
struct CheckpointWriter {
    path: PathBuf,
    events: File,
    events_path: PathBuf,
    pending: Option<JoinHandle<Result<()>>>,
    /// When the report was last refreshed (it is redrawn with a checkpoint at most every
    /// [`REPORT_EVERY`]).
    last_report: Option<std::time::Instant>,
}

/// How often a running run redraws `report/`.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl CheckpointWriter {
    fn submit(&mut self, pop: Population, meta: CheckpointMeta) -> Result<()> {
        self.wait()?;
        let events = self
            .events
            .try_clone()
            .map_err(|e| Error::io(&self.events_path, e))?;
        let (path, events_path) = (self.path.clone(), self.events_path.clone());
        let report = self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if report {
            self.last_report = Some(std::time::Instant::now());
        }
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let bytes = checkpoint::encode(&pop, &meta);
                events.sync_data().map_err(|e| Error::io(&events_path, e))?;
                checkpoint::write_encoded(&path, &bytes)?;
                if report {
                    // Best effort: a picture that fails must not stop the run (the final
                    // report, written at the end, reports its errors).
                    let run_dir = path.parent().unwrap_or(Path::new("."));
                    let _ = crate::report::redraw_run_report(run_dir, &pop, None);
                }
                Ok(())
            })
            .map_err(|e| Error::invalid(format!("starting the checkpoint writer: {e}")))?;
        self.pending = Some(thread);
        Ok(())
    }

    fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::invalid("the checkpoint writer panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

/// The events of `events.jsonl` up to `len` bytes, which must be `applied` complete lines.
pub fn read_events(path: &Path, len: u64, applied: u64) -> Result<Vec<ChildEvent>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if size < len {
        return Err(Error::format(
            path,
            format!("{size} bytes, shorter than the checkpoint's {len}: the log was truncated"),
        ));
    }
    let mut events = vec![];
    let mut reader = std::io::BufReader::new(std::io::Read::take(f, len));
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        let event = serde_json::from_str::<ChildEvent>(&line)
            .ok()
            .filter(|_| line.ends_with('\n'))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "line {} is not a complete event (corrupted log)",
                        events.len() + 1
                    ),
                )
            })?;
        events.push(event);
    }
    if events.len() as u64 != applied {
        return Err(Error::format(
            path,
            format!(
                "{} events before the checkpoint, which applied {applied} children",
                events.len()
            ),
        ));
    }
    Ok(events)
}
