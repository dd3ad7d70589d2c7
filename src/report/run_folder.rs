//! What a report reads from a run folder, finished or running, of this build or an older one:
//! the checkpoint's grids and experts (no expert set needed), every complete event of the log
//! replayed onto them (so a running run is shown as of its last applied child, not its last
//! checkpoint), `summary.json` when the run has finished, and `config.toml`.
//! Also the questions `report` answers: an individual's lineage, an archive's best elites.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::qd::{checkpoint, ChildEvent, Population};

pub struct RunFolder {
    pub dir: PathBuf,
    /// The population the log describes (no genomes), its history filled in.
    pub pop: Population,
    /// The log's events, in the order applied.
    pub events: Vec<ChildEvent>,
    pub summary: Option<Value>,
    pub config_text: Option<String>,
}

impl RunFolder {
    pub fn open(dir: &Path) -> Result<RunFolder> {
        let ckpt = dir.join("checkpoint.safetensors");
        if !ckpt.is_file() {
            return Err(Error::format(
                dir,
                "not a run folder (it has no checkpoint.safetensors)",
            ));
        }
        let (saved, events_len) = checkpoint::read_state(&ckpt)?;
        let log = dir.join("events.jsonl");
        // The log up to the checkpoint must be the checkpoint's; past it (a running or killed
        // run), every complete line counts.
        let mut events =
            crate::run::coordinator::read_events(&log, events_len, saved.children_done)?;
        events.extend(read_log_after(&log, events_len, events.len())?);
        let pop = saved.replayed(&events)?;
        let summary_path = dir.join("summary.json");
        let summary = match std::fs::read(&summary_path) {
            Ok(b) => Some(
                serde_json::from_slice(&b)
                    .map_err(|e| Error::format(&summary_path, format!("{e}")))?,
            ),
            Err(_) => None,
        };
        Ok(RunFolder {
            dir: dir.to_path_buf(),
            pop,
            events,
            summary,
            config_text: std::fs::read_to_string(dir.join("config.toml")).ok(),
        })
    }
}

/// Every complete event of a log (a line still being written at its end is left out).
pub fn read_log(path: &Path) -> Result<Vec<ChildEvent>> {
    read_log_after(path, 0, 0)
}

/// The complete events after byte `offset`, which ends line `lines_before`.
fn read_log_after(path: &Path, offset: u64, lines_before: usize) -> Result<Vec<ChildEvent>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_to_string(&mut text))
        .map_err(|e| Error::io(path, e))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                let line = lines_before + i + 1;
                Error::format(path, format!("line {line} is not an event ({e})"))
            })
        })
        .collect()
}

/// An individual of a lineage: the child that made it (experts have none).
#[derive(Clone, Debug, Serialize)]
pub struct Ancestor {
    pub id: String,
    pub child: Option<u64>,
    pub quality_task: Option<String>,
    pub parents: Vec<String>,
    pub fitness: Option<Vec<f64>>,
}

/// Every ancestor of `ids` (themselves included), children in the order they were made, then
/// the experts reached.
pub fn lineage(events: &[ChildEvent], ids: &[&str]) -> Vec<Ancestor> {
    let by_id: BTreeMap<&str, &ChildEvent> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<&str> = ids.to_vec();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        if let Some(e) = by_id.get(id) {
            stack.extend(e.parents.iter().map(String::as_str));
        }
    }
    let mut out: Vec<Ancestor> = seen
        .iter()
        .map(|id| match by_id.get(id) {
            Some(e) => Ancestor {
                id: id.to_string(),
                child: Some(e.child),
                quality_task: Some(e.quality_task.clone()),
                parents: e.parents.to_vec(),
                fitness: e.scores.clone(),
            },
            None => Ancestor {
                id: id.to_string(),
                child: None,
                quality_task: None,
                parents: vec![],
                fitness: None,
            },
        })
        .collect();
    out.sort_by_key(|a| (a.child.is_none(), a.child, a.id.clone()));
    out
}

/// One of an archive's best elites.
#[derive(Clone, Debug, Serialize)]
pub struct TopElite {
    pub id: String,
    pub objective: f64,
    pub measures: Vec<f64>,
    pub cell: Vec<usize>,
    pub fitness: Vec<f64>,
    pub parents: Vec<String>,
    /// The experts its lineage goes back to, and how many children it holds.
    pub experts: Vec<String>,
    pub ancestors: usize,
}

/// Archive `task`'s `k` best elites (highest objective first; lowest id on ties).
pub fn top_elites(run: &RunFolder, task: &str, k: usize) -> Result<Vec<TopElite>> {
    let q = run
        .pop
        .tasks
        .iter()
        .position(|t| t == task)
        .ok_or_else(|| {
            Error::invalid(format!(
                "no task `{task}` in this run (tasks: {})",
                run.pop.tasks.join(", ")
            ))
        })?;
    let mut elites: Vec<_> = run.pop.archives[q].elites().collect();
    elites.sort_by(|a, b| {
        b.objective
            .total_cmp(&a.objective)
            .then_with(|| a.solution.cmp(&b.solution))
    });
    Ok(elites
        .into_iter()
        .take(k)
        .map(|e| {
            let line = lineage(&run.events, &[e.solution.as_str()]);
            let parents = line
                .iter()
                .find(|a| a.id == e.solution)
                .map(|a| a.parents.clone())
                .unwrap_or_default();
            TopElite {
                id: e.solution.clone(),
                objective: e.objective,
                measures: e.measures.clone(),
                cell: e.cell.clone(),
                fitness: run
                    .pop
                    .individuals
                    .get(&e.solution)
                    .map(|i| i.fitness.clone())
                    .unwrap_or_default(),
                parents,
                experts: line
                    .iter()
                    .filter(|a| a.child.is_none())
                    .map(|a| a.id.clone())
                    .collect(),
                ancestors: line.iter().filter(|a| a.child.is_some()).count(),
            }
        })
        .collect())
}
