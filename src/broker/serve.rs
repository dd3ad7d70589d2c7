//! A worker over the broker: takes children from the run's stream in the `workers` consumer
//! group, evaluates them with a [`Worker`], publishes each result, and only then acknowledges
//! the child (at least once: a worker that dies holding a child never acknowledges it). A
//! child held by a worker that went silent for the visibility timeout is taken over
//! (`XAUTOCLAIM`) before new ones are read; a worker renews its hold while it evaluates, so a
//! long evaluation is never taken from a live worker. A child whose holders died
//! `max_attempts` times is published as failed instead of evaluated again. An entry that does
//! not parse, has another version, run or fingerprint goes to the dead letters with the
//! reason. A heartbeat key (expiring) tells the coordinator the worker is alive and how fast
//! it goes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

use super::connect::BrokerUrl;
use super::wire::{dead_letter, ChildMessage, Keys, ResultMessage, WireOutcome, WORKERS_GROUP};
use crate::error::Result;
use crate::evolve::{ExpertSet, Genome};
use crate::run::Worker;

/// How a worker serves one run.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub run: String,
    pub fingerprint: u64,
    pub visibility: Duration,
    pub max_attempts: u32,
    /// Set to stop after the child in hand (a local worker of the coordinator's process).
    pub stop: Arc<AtomicBool>,
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Served {
    pub children: u64,
    pub busy_seconds: f64,
    pub dead_letters: u64,
}

/// This process's name for consumer groups and heartbeats: host, process and device.
pub fn consumer_name(worker: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}/{}/{worker}", std::process::id())
}

/// Creates a consumer group (and its stream) unless it exists.
pub fn ensure_group(
    conn: &mut redis::Connection,
    url: &BrokerUrl,
    stream: &str,
    group: &str,
) -> Result<()> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn);
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(url.error(&e)),
    }
}

/// Appends an entry to a stream.
pub fn xadd<K: redis::ToRedisArgs, V: redis::ToRedisArgs>(
    conn: &mut redis::Connection,
    url: &BrokerUrl,
    stream: &str,
    fields: &[(K, V)],
) -> Result<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(k).arg(v);
    }
    cmd.query(conn).map_err(|e| url.error(&e))
}

/// Serves run `opts.run` with `worker` until the run is finished or `opts.stop` is set.
pub fn serve(
    url: &BrokerUrl,
    set: &ExpertSet,
    worker: &mut dyn Worker,
    opts: &ServeOptions,
    log: &mut dyn FnMut(&str),
) -> Result<Served> {
    let keys = Keys::new(&opts.run);
    let mut conn = url.connect()?;
    let children = keys.children();
    ensure_group(&mut conn, url, &children, WORKERS_GROUP)?;
    let name = worker.name();
    let consumer = consumer_name(&name);
    let mut served = Served::default();
    let started = Instant::now();
    let mut last_beat: Option<Instant> = None;
    let visibility_ms = opts.visibility.as_millis().max(1) as u64;
    loop {
        if opts.stop.load(Ordering::SeqCst) {
            return Ok(served);
        }
        let state: Option<String> = redis::cmd("HGET")
            .arg(keys.config())
            .arg("state")
            .query(&mut conn)
            .map_err(|e| url.error(&e))?;
        if state.as_deref() == Some("finished") {
            let _: redis::RedisResult<()> = redis::cmd("DEL")
                .arg(keys.heartbeat(&consumer))
                .query(&mut conn);
            return Ok(served);
        }
        if last_beat.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let elapsed = started.elapsed().as_secs_f64();
            let beat = serde_json::json!({
                "worker": name,
                "consumer": consumer,
                "children": served.children,
                "busy_seconds": served.busy_seconds,
                "seconds": elapsed,
                "children_per_second": served.children as f64 / elapsed.max(1e-9),
            });
            redis::cmd("SET")
                .arg(keys.heartbeat(&consumer))
                .arg(beat.to_string())
                .arg("EX")
                .arg(10)
                .query::<()>(&mut conn)
                .map_err(|e| url.error(&e))?;
            last_beat = Some(Instant::now());
        }
        // A child whose holder went silent first, then a new one.
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&children)
            .arg(WORKERS_GROUP)
            .arg(&consumer)
            .arg(visibility_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query(&mut conn)
            .map_err(|e| url.error(&e))?;
        let (entry, reclaimed) = match claimed.claimed.into_iter().next() {
            Some(e) => (e, true),
            None => {
                let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(WORKERS_GROUP)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&children)
                    .arg(">")
                    .query(&mut conn)
                    .map_err(|e| url.error(&e))?;
                match read
                    .and_then(|r| r.keys.into_iter().next())
                    .and_then(|k| k.ids.into_iter().next())
                {
                    Some(e) => (e, false),
                    None => continue,
                }
            }
        };
        let t = Instant::now();
        match handle(
            url, &mut conn, &keys, set, worker, opts, &consumer, &entry, reclaimed, log,
        )? {
            Handled::Evaluated => {
                served.children += 1;
                served.busy_seconds += t.elapsed().as_secs_f64();
            }
            Handled::DeadLetter => served.dead_letters += 1,
            Handled::GaveUp => {}
        }
    }
}

enum Handled {
    Evaluated,
    DeadLetter,
    GaveUp,
}

#[allow(clippy::too_many_arguments)]
fn handle(
    url: &BrokerUrl,
    conn: &mut redis::Connection,
    keys: &Keys,
    set: &ExpertSet,
    worker: &mut dyn Worker,
    opts: &ServeOptions,
    consumer: &str,
    entry: &StreamId,
    reclaimed: bool,
    log: &mut dyn FnMut(&str),
) -> Result<Handled> {
    let children = keys.children();
    let ack = |conn: &mut redis::Connection| -> Result<()> {
        redis::cmd("XACK")
            .arg(&children)
            .arg(WORKERS_GROUP)
            .arg(&entry.id)
            .query::<i64>(conn)
            .map(|_| ())
            .map_err(|e| url.error(&e))
    };
    let msg = ChildMessage::parse(&entry.map, &opts.run, opts.fingerprint).and_then(|m| {
        Genome::from_flat(set, &m.genome)
            .map(|g| (m, g))
            .map_err(|e| {
                super::wire::WireError(format!("the genome does not fit this expert set: {e}"))
            })
    });
    let (msg, genome) = match msg {
        Ok(x) => x,
        Err(why) => {
            log(&format!("dead letter {}: {why}", entry.id));
            xadd(
                conn,
                url,
                &keys.dead(),
                &dead_letter(&why.0, &children, &entry.id, &entry.map),
            )?;
            ack(conn)?;
            let _: redis::RedisResult<i64> =
                redis::cmd("XDEL").arg(&children).arg(&entry.id).query(conn);
            return Ok(Handled::DeadLetter);
        }
    };
    // Each time the child was taken over, a worker holding it stopped answering.
    let deliveries = if reclaimed {
        let p: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&children)
            .arg(WORKERS_GROUP)
            .arg(&entry.id)
            .arg(&entry.id)
            .arg(1)
            .query(conn)
            .map_err(|e| url.error(&e))?;
        p.first().map_or(1, |x| x.3 as u32)
    } else {
        1
    };
    let attempt = msg.attempt + deliveries - 1;
    let publish =
        |conn: &mut redis::Connection, outcome: WireOutcome, seconds: f64| -> Result<()> {
            let r = ResultMessage {
                child: msg.child,
                attempt,
                worker: consumer.to_string(),
                seconds,
                outcome,
            };
            xadd(
                conn,
                url,
                &keys.results(),
                &r.fields(&opts.run, opts.fingerprint),
            )?;
            Ok(())
        };
    if attempt > opts.max_attempts {
        publish(
            conn,
            WireOutcome::Failed(format!(
                "lost {} times: its workers stopped answering while evaluating it",
                attempt - 1
            )),
            0.0,
        )?;
        ack(conn)?;
        return Ok(Handled::GaveUp);
    }
    kill_for_tests(msg.child);
    // Renew the hold while evaluating, so a long child is not taken from a live worker.
    let done = Arc::new(AtomicBool::new(false));
    let keepalive = {
        let (url, children, consumer, id, done) = (
            url.clone(),
            children.clone(),
            consumer.to_string(),
            entry.id.clone(),
            done.clone(),
        );
        let every = opts.visibility / 3;
        std::thread::spawn(move || {
            let Ok(mut c) = url.connect() else { return };
            let mut last = Instant::now();
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20).min(every));
                if last.elapsed() >= every {
                    let _: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                        .arg(&children)
                        .arg(WORKERS_GROUP)
                        .arg(&consumer)
                        .arg(0)
                        .arg(&id)
                        .arg("JUSTID")
                        .query(&mut c);
                    last = Instant::now();
                }
            }
        })
    };
    let t = Instant::now();
    let label = format!("child-{}", msg.child);
    let outcome = match catch_unwind(AssertUnwindSafe(|| {
        worker.evaluate(&genome, &label, msg.race.as_ref())
    })) {
        Ok(Ok(Ok(scores))) => WireOutcome::Scores(scores),
        Ok(Ok(Err(reason))) => WireOutcome::Failed(reason),
        Ok(Err(e)) => WireOutcome::Error(format!("error: {e}")),
        Err(_) => WireOutcome::Error("panicked".into()),
    };
    done.store(true, Ordering::SeqCst);
    let _ = keepalive.join();
    if let WireOutcome::Error(e) = &outcome {
        log(&format!("child-{}: {e}", msg.child));
    }
    publish(conn, outcome, t.elapsed().as_secs_f64())?;
    ack(conn)?;
    Ok(Handled::Evaluated)
}

/// Crash tests: with `CYCLEQD_WORKER_KILL_AT=N` a worker process kills itself with SIGKILL
/// when it starts evaluating child `N` (holding it, unacknowledged), instead of a test racing
/// a kill against the work.
fn kill_for_tests(child: u64) {
    if std::env::var("CYCLEQD_WORKER_KILL_AT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(child)
    {
        // SAFETY: raise(3) with a standard signal.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}
