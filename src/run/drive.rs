//! Runs a coordinator's children on workers, one thread per worker, each holding at most one
//! child: a worker that finishes gets the next child at once (the coordinator's ask and tell
//! are microseconds; checkpoints are written on another thread). A worker that fails on a
//! child (an error or a panic inside it) costs that child one attempt: it is retried once on
//! another worker, and marked failed if that fails too; a worker that fails
//! [`MAX_CONSECUTIVE_FAULTS`] children in a row is retired. A stop request lets the children
//! in flight finish (a second one abandons them: they stay in flight in the checkpoint and
//! are re-issued on resume).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::coordinator::{Coordinator, Progress, Report, Told};
use super::worker::Worker;
use crate::error::{Error, Result};
use crate::qd::{ChildSpec, Outcome};

/// A worker failing this many children in a row is retired.
pub const MAX_CONSECUTIVE_FAULTS: u32 = 3;

/// Requests to stop: the first lets children in flight finish, the second abandons them.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicUsize>);

impl Stop {
    pub fn request(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn requests(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// A stop that counts SIGINT and SIGTERM (installs the handlers).
    pub fn on_signals() -> Stop {
        super::signals::install();
        Stop(super::signals::counter())
    }
}

/// How a drive ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriveEnd {
    /// Every child is applied.
    Finished,
    /// Stopped on request; `abandoned` children were still being evaluated (they are in
    /// flight in the checkpoint).
    Stopped { abandoned: usize },
}

/// Where a drive's time went.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DriveStats {
    /// From the first child handed out to the end.
    pub wall_seconds: f64,
    /// Spent by the driving thread in the coordinator (asks, tells, checkpoint encoding).
    pub coordinator_seconds: f64,
    /// Per worker: seconds spent evaluating children.
    pub busy_seconds: Vec<f64>,
    /// Results received (retries included).
    pub results: u64,
}

/// What a drive returns: how it ended, the workers it could take back (all of them unless
/// children were abandoned) and where the time went.
pub struct Driven {
    pub end: DriveEnd,
    pub workers: Vec<Box<dyn Worker>>,
    pub stats: DriveStats,
}

/// What the drive tells its observer.
pub enum DriveEvent<'a> {
    /// After every result.
    Progress(&'a Progress),
    /// A line for the log (a failure, a retry, a retired worker).
    Note(String),
    /// The live workers of a run over a broker, about once a second.
    Workers(&'a [crate::broker::WorkerStatus]),
}

struct Job {
    spec: Arc<ChildSpec>,
    attempt: u32,
    /// Why the previous attempt failed (a retry).
    previous: Option<String>,
}

struct Done {
    worker: usize,
    spec: Arc<ChildSpec>,
    attempt: u32,
    previous: Option<String>,
    seconds: f64,
    /// The child's outcome, or the worker's failure.
    result: std::result::Result<Outcome, String>,
}

/// A child to run again, away from the worker that failed it.
struct Retry {
    spec: Arc<ChildSpec>,
    avoid: usize,
    failure: String,
}

struct Slot {
    name: String,
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<Box<dyn Worker>>>,
    busy: bool,
    faults: u32,
}

/// Drives `coord` with `workers` until every child is applied or a stop is requested. The
/// caller checkpoints afterwards.
pub fn drive(
    coord: &mut Coordinator,
    workers: Vec<Box<dyn Worker>>,
    stop: &Stop,
    observe: &mut dyn FnMut(DriveEvent),
) -> Result<Driven> {
    if workers.is_empty() {
        return Err(Error::invalid("a run needs at least one worker"));
    }
    let (done_tx, done_rx) = channel::<Done>();
    let mut slots: Vec<Slot> = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| spawn(i, w, done_tx.clone()))
        .collect::<Result<_>>()?;
    drop(done_tx);
    let mut retries: VecDeque<Retry> = VecDeque::new();
    let mut stats = DriveStats {
        busy_seconds: vec![0.0; slots.len()],
        ..DriveStats::default()
    };
    let start = Instant::now();
    let end = loop {
        let stopping = stop.requests() > 0;
        if stop.requests() > 1 {
            break DriveEnd::Stopped {
                abandoned: slots.iter().filter(|s| s.busy).count(),
            };
        }
        let t = Instant::now();
        dispatch(coord, &mut slots, &mut retries, stopping)?;
        stats.coordinator_seconds += t.elapsed().as_secs_f64();
        let busy = slots.iter().filter(|s| s.busy).count();
        if busy == 0 {
            if coord.is_done() {
                break DriveEnd::Finished;
            }
            if stopping {
                break DriveEnd::Stopped { abandoned: 0 };
            }
            if slots.iter().all(|s| s.jobs.is_none()) {
                return Err(Error::invalid(
                    "every worker was retired after failing children in a row (see the log)",
                ));
            }
            // Children remain but none can be handed out: a retry waits for a worker other
            // than the one that failed it, and that worker is the only one left.
            if let Some(r) = retries.pop_front() {
                let w = slots
                    .iter()
                    .position(|s| s.jobs.is_some())
                    .expect("a live worker");
                send(&mut slots[w], r.spec, 2, Some(r.failure))?;
                continue;
            }
            return Err(Error::invalid(
                "the coordinator has children in flight that no worker holds",
            ));
        }
        let d = match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(d) => d,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::invalid("every worker thread ended"))
            }
        };
        let t = Instant::now();
        stats.results += 1;
        stats.busy_seconds[d.worker] += d.seconds;
        slots[d.worker].busy = false;
        // The worker gets its next child before this result is applied: it is what keeps a
        // worker busy (with the batch schedule, the rest of the batch is already bred; with
        // the steady one, a child is bred from the archives without the result in hand).
        if d.result.is_ok() {
            dispatch(coord, &mut slots, &mut retries, stopping)?;
        }
        let slot = &mut slots[d.worker];
        let report = Report {
            worker: slot.name.clone(),
            seconds: d.seconds,
            attempts: d.attempt,
        };
        match d.result {
            Ok(outcome) => {
                slot.faults = 0;
                tell(coord, d.spec.child, outcome, report, observe)?;
            }
            Err(failure) => {
                slot.faults += 1;
                let failure = format!("worker {}: {failure}", slot.name);
                observe(DriveEvent::Note(format!("{}: {failure}", d.spec.id())));
                if slot.faults >= MAX_CONSECUTIVE_FAULTS {
                    observe(DriveEvent::Note(format!(
                        "worker {} retired after {} failures in a row",
                        slot.name, slot.faults
                    )));
                    slot.jobs = None;
                }
                match d.previous {
                    // The retry failed too: the child fails, the run goes on.
                    Some(first) => {
                        let why = format!("{first}; retried: {failure}");
                        tell(coord, d.spec.child, Outcome::Failed(why), report, observe)?;
                    }
                    None => retries.push_back(Retry {
                        spec: d.spec,
                        avoid: d.worker,
                        failure,
                    }),
                }
            }
        }
        stats.coordinator_seconds += t.elapsed().as_secs_f64();
        observe(DriveEvent::Progress(&coord.progress()));
    };
    stats.wall_seconds = start.elapsed().as_secs_f64();
    // Hand back every idle worker; busy ones (abandoned children) finish on their own.
    let mut back = vec![];
    for s in &mut slots {
        s.jobs = None;
        if !s.busy {
            if let Some(t) = s.thread.take() {
                match t.join() {
                    Ok(w) => back.push(w),
                    Err(_) => observe(DriveEvent::Note(format!("worker {} panicked", s.name))),
                }
            }
        }
    }
    Ok(Driven {
        end,
        workers: back,
        stats,
    })
}

fn tell(
    coord: &mut Coordinator,
    child: u64,
    outcome: Outcome,
    report: Report,
    observe: &mut dyn FnMut(DriveEvent),
) -> Result<()> {
    if let Told::Applied(events) = coord.tell(child, outcome, report)? {
        for ev in events {
            if let Some(why) = &ev.failed {
                observe(DriveEvent::Note(format!("{}: failed: {why}", ev.id)));
            }
        }
    }
    Ok(())
}

/// Gives every idle live worker a child: retries first (on a worker other than the one that
/// failed them), then new children unless stopping.
fn dispatch(
    coord: &mut Coordinator,
    slots: &mut [Slot],
    retries: &mut VecDeque<Retry>,
    stopping: bool,
) -> Result<()> {
    loop {
        let idle: Vec<usize> = (0..slots.len())
            .filter(|&i| !slots[i].busy && slots[i].jobs.is_some())
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        if !stopping {
            if let Some(pos) = retries
                .iter()
                .position(|r| idle.iter().any(|&w| w != r.avoid))
            {
                let r = retries.remove(pos).expect("found above");
                let w = *idle.iter().find(|&&w| w != r.avoid).expect("found above");
                send(&mut slots[w], r.spec, 2, Some(r.failure))?;
                continue;
            }
        }
        if stopping {
            return Ok(());
        }
        match coord.ask()? {
            Some(spec) => send(&mut slots[idle[0]], spec, 1, None)?,
            None => return Ok(()),
        }
    }
}

fn send(
    slot: &mut Slot,
    spec: Arc<ChildSpec>,
    attempt: u32,
    previous: Option<String>,
) -> Result<()> {
    let jobs = slot
        .jobs
        .as_ref()
        .ok_or_else(|| Error::invalid("a child was sent to a retired worker"))?;
    jobs.send(Job {
        spec,
        attempt,
        previous,
    })
    .map_err(|_| Error::invalid(format!("worker {} stopped", slot.name)))?;
    slot.busy = true;
    Ok(())
}

fn spawn(i: usize, mut worker: Box<dyn Worker>, done: Sender<Done>) -> Result<Slot> {
    let name = worker.name();
    let (tx, rx): (Sender<Job>, Receiver<Job>) = channel();
    let thread = std::thread::Builder::new()
        .name(format!("worker-{i}"))
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let start = Instant::now();
                let id = job.spec.id();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    worker.evaluate(&job.spec.genome, &id, job.spec.race.as_deref())
                }));
                let result = match r {
                    Ok(Ok(Ok(scores))) => Ok(Outcome::Scored(scores)),
                    Ok(Ok(Err(reason))) => Ok(Outcome::Failed(reason)),
                    Ok(Err(e)) => Err(format!("error: {e}")),
                    Err(panic) => Err(format!("panicked: {}", panic_message(&panic))),
                };
                let d = Done {
                    worker: i,
                    spec: job.spec,
                    attempt: job.attempt,
                    previous: job.previous,
                    seconds: start.elapsed().as_secs_f64(),
                    result,
                };
                if done.send(d).is_err() {
                    break;
                }
            }
            worker
        })
        .map_err(|e| Error::invalid(format!("starting worker {name}: {e}")))?;
    Ok(Slot {
        name,
        jobs: Some(tx),
        thread: Some(thread),
        busy: false,
        faults: 0,
    })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
