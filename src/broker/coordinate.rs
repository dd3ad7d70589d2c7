//! The coordinator's side of the broker: it publishes the run once (the resolved
//! configuration, the expert set's fingerprint, the retry settings), then drives the
//! [`Coordinator`]: each asked child goes onto the children stream; results are read from the
//! results stream in the `coordinator` consumer group and told (idempotent by child number: a
//! duplicate is ignored and counted), then acknowledged and deleted, and a told child's
//! entries leave the children stream. A worker's error costs the child an attempt: it is
//! published again until `max_attempts`, then marked failed. An entry that does not parse or
//! is not this run's goes to the dead letters.
//!
//! Restarting after a crash: the checkpoint's children in flight are re-issued, except those
//! whose entries are still on the stream (workers will finish them); results read before the
//! crash but never acknowledged are read again first; late results of children already told
//! are duplicates. With `schedule = "batch"` the archives are those of a single process at
//! the same `batch`, whatever the workers and failures.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use serde_json::Value as Json;

use super::connect::BrokerUrl;
use super::serve::{ensure_group, xadd};
use super::wire::{
    dead_letter, ChildMessage, Keys, ResultMessage, WireOutcome, COORDINATOR_GROUP, RUNS,
    WORKERS_GROUP,
};
use crate::error::{Error, Result};
use crate::qd::Outcome;
use crate::run::coordinator::{Coordinator, Report, Schedule, Told};
use crate::run::drive::{DriveEnd, DriveEvent, Stop};

/// A run as its workers see it on the broker.
#[derive(Clone, Debug)]
pub struct RunOnBroker {
    pub name: String,
    pub fingerprint: u64,
    /// The resolved configuration (TOML).
    pub config_toml: String,
    /// Where the coordinator's factor cache is (workers read it there, path-mapped).
    pub factor_cache: String,
    pub max_attempts: u32,
    pub visibility: Duration,
}

/// A worker seen through its heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerStatus {
    pub name: String,
    pub children: u64,
    pub children_per_second: f64,
    pub busy_seconds: f64,
    pub seconds: f64,
}

/// Publishes the run (its configuration hash, marked running) and creates its streams'
/// consumer groups.
pub fn publish_run(url: &BrokerUrl, run: &RunOnBroker) -> Result<()> {
    let keys = Keys::new(&run.name);
    let mut conn = url.connect()?;
    redis::cmd("HSET")
        .arg(keys.config())
        .arg("v")
        .arg(super::wire::VERSION)
        .arg("run")
        .arg(&run.name)
        .arg("fp")
        .arg(format!("{:016x}", run.fingerprint))
        .arg("config")
        .arg(&run.config_toml)
        .arg("factor_cache")
        .arg(&run.factor_cache)
        .arg("max_attempts")
        .arg(run.max_attempts)
        .arg("visibility_ms")
        .arg(run.visibility.as_millis() as u64)
        .arg("state")
        .arg("running")
        .query::<i64>(&mut conn)
        .map_err(|e| url.error(&e))?;
    redis::cmd("SADD")
        .arg(RUNS)
        .arg(&run.name)
        .query::<i64>(&mut conn)
        .map_err(|e| url.error(&e))?;
    ensure_group(&mut conn, url, &keys.children(), WORKERS_GROUP)?;
    ensure_group(&mut conn, url, &keys.results(), COORDINATOR_GROUP)?;
    Ok(())
}

/// Marks the run finished: its workers leave.
pub fn finish_run(url: &BrokerUrl, run: &str) -> Result<()> {
    let keys = Keys::new(run);
    let mut conn = url.connect()?;
    redis::cmd("HSET")
        .arg(keys.config())
        .arg("state")
        .arg("finished")
        .query::<i64>(&mut conn)
        .map_err(|e| url.error(&e))?;
    redis::cmd("SREM")
        .arg(RUNS)
        .arg(run)
        .query::<i64>(&mut conn)
        .map_err(|e| url.error(&e))?;
    Ok(())
}

/// Reads a run from the broker: `name`, or the only one it serves.
pub fn read_run(url: &BrokerUrl, name: Option<&str>) -> Result<RunOnBroker> {
    let mut conn = url.connect()?;
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let mut runs: Vec<String> = redis::cmd("SMEMBERS")
                .arg(RUNS)
                .query(&mut conn)
                .map_err(|e| url.error(&e))?;
            runs.sort();
            match runs.len() {
                1 => runs.remove(0),
                0 => {
                    return Err(Error::invalid(format!(
                        "broker {url}: no run is being coordinated there (start `run --broker` first, or give --run)"
                    )))
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "broker {url}: several runs ({}); choose one with --run",
                        runs.join(", ")
                    )))
                }
            }
        }
    };
    let keys = Keys::new(&name);
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.config())
        .query(&mut conn)
        .map_err(|e| url.error(&e))?;
    let get = |k: &str| {
        h.get(k).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "broker {url}: run `{name}` has no `{k}` (not published by this engine?)"
            ))
        })
    };
    let v: u32 = get("v")?.parse().unwrap_or(0);
    if v != super::wire::VERSION {
        return Err(Error::invalid(format!(
            "broker {url}: run `{name}` speaks wire version {v}, this engine {}",
            super::wire::VERSION
        )));
    }
    let num = |k: &str| -> Result<u64> {
        get(k)?.parse().map_err(|_| {
            Error::invalid(format!("broker {url}: run `{name}`: `{k}` is not a number"))
        })
    };
    Ok(RunOnBroker {
        fingerprint: u64::from_str_radix(&get("fp")?, 16)
            .map_err(|_| Error::invalid(format!("broker {url}: run `{name}`: bad fingerprint")))?,
        config_toml: get("config")?,
        factor_cache: get("factor_cache")?,
        max_attempts: num("max_attempts")? as u32,
        visibility: Duration::from_millis(num("visibility_ms")?),
        name,
    })
}

/// The live workers of a run (their heartbeats).
pub fn live_workers(
    conn: &mut redis::Connection,
    url: &BrokerUrl,
    keys: &Keys,
) -> Result<Vec<WorkerStatus>> {
    let mut names: Vec<String> = vec![];
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys.heartbeats())
            .arg("COUNT")
            .arg(100)
            .query(conn)
            .map_err(|e| url.error(&e))?;
        names.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = vec![];
    for k in names {
        let v: Option<String> = redis::cmd("GET")
            .arg(&k)
            .query(conn)
            .map_err(|e| url.error(&e))?;
        if let Some(j) = v.and_then(|t| serde_json::from_str::<Json>(&t).ok()) {
            out.push(WorkerStatus {
                name: j["consumer"].as_str().unwrap_or("?").to_string(),
                children: j["children"].as_u64().unwrap_or(0),
                children_per_second: j["children_per_second"].as_f64().unwrap_or(0.0),
                busy_seconds: j["busy_seconds"].as_f64().unwrap_or(0.0),
                seconds: j["seconds"].as_f64().unwrap_or(0.0),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What the drive over the broker counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerStats {
    pub published: u64,
    pub results: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    /// Children published again after a worker's error.
    pub republished: u64,
    /// Per result: seconds from publishing its child to reading the result, less the worker's
    /// evaluation (the broker's and the scheduling's share).
    pub latency_seconds: Vec<f64>,
    /// Seconds each worker spent evaluating, by name.
    pub busy_by_worker: BTreeMap<String, f64>,
    pub wall_seconds: f64,
}

/// Drives `coord` through the broker until every child is applied or a stop is requested
/// (the first lets children in flight finish, the second abandons them to the checkpoint).
pub fn drive_broker(
    coord: &mut Coordinator,
    url: &BrokerUrl,
    run: &RunOnBroker,
    stop: &Stop,
    observe: &mut dyn FnMut(DriveEvent),
) -> Result<(DriveEnd, BrokerStats)> {
    let keys = Keys::new(&run.name);
    let mut conn = url.connect()?;
    let (children, results) = (keys.children(), keys.results());
    let mut stats = BrokerStats::default();
    let start = Instant::now();
    // Entries already on the stream (a restart): those children are not published again.
    let mut on_stream: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let existing: StreamRangeReply = redis::cmd("XRANGE")
        .arg(&children)
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .map_err(|e| url.error(&e))?;
    for e in existing.ids {
        if let Ok(m) = ChildMessage::parse(&e.map, &run.name, run.fingerprint) {
            on_stream.entry(m.child).or_default().push(e.id);
        }
    }
    let mut published_at: HashMap<u64, Instant> = HashMap::new();
    let mut attempts: HashMap<u64, (u32, Vec<String>)> = HashMap::new();
    let mut live: Vec<WorkerStatus> = vec![];
    let mut last_scan: Option<Instant> = None;
    // Our own results read before a restart but never acknowledged come first.
    let mut read_from = "0";
    let end = loop {
        if stop.requests() > 1 {
            break DriveEnd::Stopped {
                abandoned: coord.in_flight(),
            };
        }
        let stopping = stop.requests() > 0;
        if last_scan.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            live = live_workers(&mut conn, url, &keys)?;
            observe(DriveEvent::Workers(&live));
            last_scan = Some(Instant::now());
        }
        if !stopping {
            // Batch: the coordinator hands out a whole batch, then nothing until it is
            // applied. Steady: every live worker has a child and one more waiting.
            let target = match coord.config().schedule {
                Schedule::Batch(_) => usize::MAX,
                Schedule::Steady => 2 * live.len().max(1),
            };
            while coord.in_flight() < target
                || matches!(coord.config().schedule, Schedule::Batch(_))
            {
                let Some(spec) = coord.ask()? else { break };
                if let Some(ids) = on_stream.get(&spec.child) {
                    if !ids.is_empty() {
                        published_at.insert(spec.child, Instant::now());
                        continue;
                    }
                }
                let msg = ChildMessage {
                    child: spec.child,
                    attempt: 1,
                    genome: spec.genome.to_flat(),
                    race: spec.race.as_deref().cloned(),
                };
                let id = xadd(
                    &mut conn,
                    url,
                    &children,
                    &msg.fields(&run.name, run.fingerprint),
                )?;
                on_stream.entry(spec.child).or_default().push(id);
                published_at.insert(spec.child, Instant::now());
                stats.published += 1;
            }
        }
        if coord.is_done() {
            break DriveEnd::Finished;
        }
        if stopping && coord.in_flight() == 0 {
            break DriveEnd::Stopped { abandoned: 0 };
        }
        let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(COORDINATOR_GROUP)
            .arg("coordinator")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS")
            .arg(&results)
            .arg(read_from)
            .query(&mut conn)
            .map_err(|e| url.error(&e))?;
        let entries: Vec<StreamId> = read
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if read_from == "0" && entries.is_empty() {
            read_from = ">";
        }
        for e in entries {
            handle_result(
                coord,
                &mut conn,
                url,
                run,
                &keys,
                &e,
                &mut on_stream,
                &mut published_at,
                &mut attempts,
                &mut stats,
                observe,
            )?;
            redis::cmd("XACK")
                .arg(&results)
                .arg(COORDINATOR_GROUP)
                .arg(&e.id)
                .query::<i64>(&mut conn)
                .map_err(|err| url.error(&err))?;
            redis::cmd("XDEL")
                .arg(&results)
                .arg(&e.id)
                .query::<i64>(&mut conn)
                .map_err(|err| url.error(&err))?;
        }
    };
    stats.wall_seconds = start.elapsed().as_secs_f64();
    Ok((end, stats))
}

#[allow(clippy::too_many_arguments)]
fn handle_result(
    coord: &mut Coordinator,
    conn: &mut redis::Connection,
    url: &BrokerUrl,
    run: &RunOnBroker,
    keys: &Keys,
    e: &StreamId,
    on_stream: &mut BTreeMap<u64, Vec<String>>,
    published_at: &mut HashMap<u64, Instant>,
    attempts: &mut HashMap<u64, (u32, Vec<String>)>,
    stats: &mut BrokerStats,
    observe: &mut dyn FnMut(DriveEvent),
) -> Result<()> {
    let r = match ResultMessage::parse(&e.map, &run.name, run.fingerprint) {
        Ok(r) => r,
        Err(why) => {
            observe(DriveEvent::Note(format!("dead letter {}: {why}", e.id)));
            xadd(
                conn,
                url,
                &keys.dead(),
                &dead_letter(&why.0, &keys.results(), &e.id, &e.map),
            )?;
            stats.dead_letters += 1;
            return Ok(());
        }
    };
    stats.results += 1;
    *stats.busy_by_worker.entry(r.worker.clone()).or_insert(0.0) += r.seconds;
    if let Some(t) = published_at.get(&r.child) {
        stats
            .latency_seconds
            .push((t.elapsed().as_secs_f64() - r.seconds).max(0.0));
    }
    let report = Report {
        worker: r.worker.clone(),
        seconds: r.seconds,
        attempts: r.attempt.max(1),
    };
    let outcome = match r.outcome {
        WireOutcome::Scores(s) => Outcome::Scored(s),
        WireOutcome::Failed(why) => Outcome::Failed(why),
        WireOutcome::Error(why) => {
            let (n, reasons) = attempts.entry(r.child).or_insert((0, vec![]));
            *n = (*n).max(r.attempt);
            reasons.push(format!("{}: {why}", r.worker));
            observe(DriveEvent::Note(format!(
                "child-{}: worker {}: {why}",
                r.child, r.worker
            )));
            if *n < run.max_attempts {
                // Another attempt, unless the child is not in flight any more.
                if let Some(spec) = coord.spec_in_flight(r.child) {
                    let msg = ChildMessage {
                        child: r.child,
                        attempt: *n + 1,
                        genome: spec.genome.to_flat(),
                        race: spec.race.as_deref().cloned(),
                    };
                    let id = xadd(
                        conn,
                        url,
                        &keys.children(),
                        &msg.fields(&run.name, run.fingerprint),
                    )?;
                    on_stream.entry(r.child).or_default().push(id);
                    stats.republished += 1;
                }
                return Ok(());
            }
            Outcome::Failed(format!("failed on {} attempts: {}", *n, reasons.join("; ")))
        }
    };
    let told = coord.tell(r.child, outcome, report)?;
    match told {
        Told::Duplicate => stats.duplicates += 1,
        Told::Applied(events) => {
            for ev in &events {
                if let Some(why) = &ev.failed {
                    observe(DriveEvent::Note(format!("{}: failed: {why}", ev.id)));
                }
            }
        }
    }
    // Told (now or before): its entries leave the children stream.
    if let Some(ids) = on_stream.remove(&r.child) {
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(keys.children());
        for id in &ids {
            cmd.arg(id);
        }
        cmd.query::<i64>(conn).map_err(|err| url.error(&err))?;
    }
    published_at.remove(&r.child);
    observe(DriveEvent::Progress(&coord.progress()));
    Ok(())
}
