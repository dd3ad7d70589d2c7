//! What crosses the broker: versioned stream entries holding child numbers, genomes
//! (little-endian f32 with a checksum) and scores, never weights or pickles; and the names of
//! a run's keys.
//!
//! A child entry: `v`, `run`, `fp` (the expert set's fingerprint), `child`, `attempt`,
//! `genome`, `sum`. A result entry: `v`, `run`, `fp`, `child`, `attempt`, `worker`, `seconds`,
//! `outcome` (JSON: `{"scores": […]}`, `{"failed": "…"}` for a child that failed, or
//! `{"error": "…"}` for a worker that could not evaluate it). Anything that does not parse,
//! has another version, run or fingerprint is a [`WireError`] with the reason, for the dead
//! letters.

use std::collections::HashMap;

use redis::Value;

use crate::durable::hash_bytes;
use crate::eval::Evaluation;
use crate::qd::RaceBounds;

/// The wire format's version.
pub const VERSION: u32 = 1;

/// The keys of run `run`.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// The set of runs a broker serves (workers without `--run` find theirs there).
pub const RUNS: &str = "cycleqd:runs";
/// Consumer group of the workers on a run's children stream.
pub const WORKERS_GROUP: &str = "workers";
/// Consumer group of the coordinator on a run's results stream.
pub const COORDINATOR_GROUP: &str = "coordinator";

impl Keys {
    pub fn new(run: &str) -> Keys {
        Keys {
            prefix: format!("cycleqd:{run}:"),
        }
    }

    /// Stream of children to evaluate.
    pub fn children(&self) -> String {
        format!("{}children", self.prefix)
    }

    /// Stream of results.
    pub fn results(&self) -> String {
        format!("{}results", self.prefix)
    }

    /// Stream of dead letters: entries that could not be used, with the reason.
    pub fn dead(&self) -> String {
        format!("{}dead", self.prefix)
    }

    /// Hash: the run's resolved configuration, fingerprint, settings and state.
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    /// A worker's heartbeat (expires when it stops beating).
    pub fn heartbeat(&self, worker: &str) -> String {
        format!("{}worker:{worker}", self.prefix)
    }

    /// Pattern of every heartbeat key.
    pub fn heartbeats(&self) -> String {
        format!("{}worker:*", self.prefix)
    }
}

/// Why an entry was not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Fields = HashMap<String, Value>;

fn bytes<'a>(f: &'a Fields, key: &str) -> std::result::Result<&'a [u8], WireError> {
    match f.get(key) {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.as_bytes()),
        Some(_) => Err(WireError(format!("field `{key}` is not a string"))),
        None => Err(WireError(format!("field `{key}` is missing"))),
    }
}

fn text<'a>(f: &'a Fields, key: &str) -> std::result::Result<&'a str, WireError> {
    std::str::from_utf8(bytes(f, key)?)
        .map_err(|_| WireError(format!("field `{key}` is not UTF-8")))
}

fn number<T: std::str::FromStr>(f: &Fields, key: &str) -> std::result::Result<T, WireError> {
    text(f, key)?
        .parse()
        .map_err(|_| WireError(format!("field `{key}` is not a number")))
}

/// The header every entry carries: the version, then the run and fingerprint it is for.
fn check_header(f: &Fields, run: &str, fingerprint: u64) -> std::result::Result<(), WireError> {
    let v: u32 = number(f, "v")?;
    if v != VERSION {
        return Err(WireError(format!(
            "wire version {v}, this engine speaks {VERSION}"
        )));
    }
    let r = text(f, "run")?;
    if r != run {
        return Err(WireError(format!("for run `{r}`, not `{run}`")));
    }
    let fp = text(f, "fp")?;
    if fp != format!("{fingerprint:016x}") {
        return Err(WireError(format!(
            "expert-set fingerprint {fp}, not this run's {fingerprint:016x}"
        )));
    }
    Ok(())
}

/// A child to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildMessage {
    pub child: u64,
    pub attempt: u32,
    /// The genome, flat ([`crate::evolve::Genome::to_flat`]).
    pub genome: Vec<f32>,
    /// Racing: what the child must beat (field `race`, JSON).
    pub race: Option<RaceBounds>,
}

impl ChildMessage {
    /// The entry's field/value pairs.
    pub fn fields(&self, run: &str, fingerprint: u64) -> Vec<(&'static str, Vec<u8>)> {
        let genome: Vec<u8> = self.genome.iter().flat_map(|x| x.to_le_bytes()).collect();
        let sum = format!("{:016x}", hash_bytes(&genome));
        let mut f = vec![
            ("v", VERSION.to_string().into_bytes()),
            ("run", run.as_bytes().to_vec()),
            ("fp", format!("{fingerprint:016x}").into_bytes()),
            ("child", self.child.to_string().into_bytes()),
            ("attempt", self.attempt.to_string().into_bytes()),
            ("genome", genome),
            ("sum", sum.into_bytes()),
        ];
        if let Some(r) = &self.race {
            f.push(("race", serde_json::to_vec(r).expect("bounds serialise")));
        }
        f
    }

    pub fn parse(f: &Fields, run: &str, fingerprint: u64) -> std::result::Result<Self, WireError> {
        check_header(f, run, fingerprint)?;
        let raw = bytes(f, "genome")?;
        if raw.len() % 4 != 0 {
            return Err(WireError(format!(
                "genome of {} bytes, not whole f32s",
                raw.len()
            )));
        }
        if text(f, "sum")? != format!("{:016x}", hash_bytes(raw)) {
            return Err(WireError("the genome's checksum does not match".into()));
        }
        let race = match f.get("race") {
            None => None,
            Some(_) => Some(
                serde_json::from_slice(bytes(f, "race")?)
                    .map_err(|e| WireError(format!("field `race` is not racing bounds: {e}")))?,
            ),
        };
        Ok(ChildMessage {
            child: number(f, "child")?,
            attempt: number(f, "attempt")?,
            genome: raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            race,
        })
    }
}

/// What became of a child on a worker.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireOutcome {
    /// Its scores, one per task, and what each example gave.
    Scores(Evaluation),
    /// The child failed (an evaluator crashed, its logits were not finite, it was lost on
    /// too many workers): it is marked failed.
    Failed(String),
    /// The worker could not evaluate it (its device failed): another attempt may.
    Error(String),
}

/// A result.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultMessage {
    pub child: u64,
    pub attempt: u32,
    pub worker: String,
    pub seconds: f64,
    pub outcome: WireOutcome,
}

impl ResultMessage {
    pub fn fields(&self, run: &str, fingerprint: u64) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("v", VERSION.to_string().into_bytes()),
            ("run", run.as_bytes().to_vec()),
            ("fp", format!("{fingerprint:016x}").into_bytes()),
            ("child", self.child.to_string().into_bytes()),
            ("attempt", self.attempt.to_string().into_bytes()),
            ("worker", self.worker.as_bytes().to_vec()),
            ("seconds", self.seconds.to_string().into_bytes()),
            (
                "outcome",
                serde_json::to_vec(&self.outcome).expect("outcomes serialise"),
            ),
        ]
    }

    pub fn parse(f: &Fields, run: &str, fingerprint: u64) -> std::result::Result<Self, WireError> {
        check_header(f, run, fingerprint)?;
        let outcome: WireOutcome = serde_json::from_slice(bytes(f, "outcome")?)
            .map_err(|e| WireError(format!("field `outcome` is not an outcome: {e}")))?;
        if let WireOutcome::Scores(ev) = &outcome {
            if ev.scores.iter().any(|x| !x.is_finite()) {
                return Err(WireError("a score is not finite".into()));
            }
        }
        Ok(ResultMessage {
            child: number(f, "child")?,
            attempt: number(f, "attempt")?,
            worker: text(f, "worker")?.to_string(),
            seconds: number(f, "seconds")?,
            outcome,
        })
    }
}

/// An entry's fields for a dead letter: the reason, where it came from, and what it held.
pub fn dead_letter(reason: &str, stream: &str, id: &str, f: &Fields) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("reason".to_string(), reason.as_bytes().to_vec()),
        ("stream".to_string(), stream.as_bytes().to_vec()),
        ("id".to_string(), id.as_bytes().to_vec()),
    ];
    let mut keys: Vec<&String> = f.keys().collect();
    keys.sort();
    for k in keys {
        if let Some(Value::BulkString(b)) = f.get(k) {
            out.push((format!("field:{k}"), b.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_fields(pairs: Vec<(&'static str, Vec<u8>)>) -> Fields {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::BulkString(v)))
            .collect()
    }

    #[test]
    fn messages_round_trip_and_refuse_what_is_not_theirs() {
        let c = ChildMessage {
            child: 42,
            attempt: 2,
            genome: vec![1.0, -0.5, f32::MIN_POSITIVE, 3.25e7],
            race: None,
        };
        let f = as_fields(c.fields("r1", 0xabc));
        assert_eq!(ChildMessage::parse(&f, "r1", 0xabc).unwrap(), c);
        assert!(ChildMessage::parse(&f, "r2", 0xabc)
            .unwrap_err()
            .0
            .contains("for run `r1`"));
        assert!(ChildMessage::parse(&f, "r1", 0xabd)
            .unwrap_err()
            .0
            .contains("fingerprint"));
        let mut bad = f.clone();
        bad.insert("v".into(), Value::BulkString(b"9".to_vec()));
        assert!(ChildMessage::parse(&bad, "r1", 0xabc)
            .unwrap_err()
            .0
            .contains("version 9"));
        let mut flipped = f.clone();
        if let Some(Value::BulkString(g)) = flipped.get_mut("genome") {
            g[3] ^= 1;
        }
        assert!(ChildMessage::parse(&flipped, "r1", 0xabc)
            .unwrap_err()
            .0
            .contains("checksum"));

        let r = ResultMessage {
            child: 42,
            attempt: 1,
            worker: "cuda:0 H100".into(),
            seconds: 1.5,
            outcome: WireOutcome::Scores(Evaluation {
                scores: vec![0.25, 1.0],
                examples: vec![vec![Some(0.0), None, Some(1.0)], vec![]],
                stopped_early: true,
                served: vec![1],
                exported: false,
            }),
        };
        let f = as_fields(r.fields("r1", 7));
        assert_eq!(ResultMessage::parse(&f, "r1", 7).unwrap(), r);
        let mut nan = f.clone();
        nan.insert(
            "outcome".into(),
            Value::BulkString(
                br#"{"scores": {"scores": [NaN], "examples": [], "stopped_early": false}}"#
                    .to_vec(),
            ),
        );
        assert!(ResultMessage::parse(&nan, "r1", 7).is_err());
        let mut garbage = Fields::new();
        garbage.insert("hello".into(), Value::BulkString(b"world".to_vec()));
        assert!(ResultMessage::parse(&garbage, "r1", 7)
            .unwrap_err()
            .0
            .contains("`v` is missing"));
    }
}
