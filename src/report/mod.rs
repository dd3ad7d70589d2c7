//! A run's report folder: `curves.json` (the archives' pyribs statistics against evaluations,
//! machine-readable), `curves.png` (qd_score, coverage and obj_max per archive), one
//! `archive_<task>.png` heatmap per archive (experts, softmax members and the final model
//! marked), `table.png` (the final table, once the run has finished) and `report.html`, one
//! self-contained page with all of it, the final model's lineage, the configuration and the
//! timing. Written at the end of a run, refreshed while it runs, and rebuilt by `report`.

mod html;
pub mod plots;
pub mod run_folder;

use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::durable::write_synced;
use crate::error::{Error, Result};
use crate::qd::{ChildEvent, Population};

use plots::{Marker, MarkerKind, Picture};

/// What a report is drawn from.
pub struct ReportInputs<'a> {
    /// The population, its statistics' history filled in.
    pub pop: &'a Population,
    pub events: &'a [ChildEvent],
    /// `summary.json`, once the run has finished.
    pub summary: Option<&'a Value>,
    pub config_text: Option<&'a str>,
}

/// A picture the report wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Written {
    pub file: String,
    pub width: u32,
    pub height: u32,
}

/// Redraws `run_dir/report/` during or at the end of a run: `pop` as the run holds it, the
/// folder's event log and configuration, and the summary once there is one.
pub fn redraw_run_report(run_dir: &Path, pop: &Population, summary: Option<&Value>) -> Result<()> {
    let events = run_folder::read_log(&run_dir.join("events.jsonl"))?;
    let config_text = std::fs::read_to_string(run_dir.join("config.toml")).ok();
    write_report(
        &run_dir.join("report"),
        &ReportInputs {
            pop,
            events: &events,
            summary,
            config_text: config_text.as_deref(),
        },
    )?;
    Ok(())
}

/// Writes every file of the report into `dir`; returns the pictures written.
pub fn write_report(dir: &Path, inputs: &ReportInputs) -> Result<Vec<Written>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let pop = inputs.pop;
    let curves = json!({
        "tasks": pop.tasks,
        "points": pop.history,
    });
    write_synced(
        &dir.join("curves.json"),
        &serde_json::to_vec(&curves).expect("JSON serialises"),
    )?;
    let mut pictures: Vec<(String, String, Picture)> = vec![(
        "curves.png".into(),
        "Progress".into(),
        plots::curves(&pop.tasks, &pop.history)?,
    )];
    let finals = final_model(inputs);
    for (q, name) in pop.tasks.iter().enumerate() {
        let markers = markers(inputs, &finals);
        pictures.push((
            format!("archive_{name}.png"),
            format!("Archive `{name}`"),
            plots::heatmap(&pop.tasks, q, &pop.archives[q], &markers)?,
        ));
    }
    if let Some(table) = table_rows(inputs.summary) {
        pictures.push((
            "table.png".into(),
            "Final table".into(),
            plots::table_bars(&pop.tasks, &table.rows, &table.chosen)?,
        ));
    }
    let mut written = vec![];
    let mut encoded = vec![];
    for (file, title, pic) in &pictures {
        let png = pic.encode_png()?;
        write_synced(&dir.join(file), &png)?;
        written.push(Written {
            file: file.clone(),
            width: pic.width,
            height: pic.height,
        });
        encoded.push((file.clone(), title.clone(), png));
    }
    let page = html::page(inputs, &finals, &encoded);
    write_synced(&dir.join("report.html"), page.as_bytes())?;
    Ok(written)
}

/// The model `final/` holds (or, while the run goes on, the best-mean elite so far): its
/// label, fitness and the individuals it is made of.
pub(crate) struct FinalModel {
    pub label: String,
    pub fitness: Option<Vec<f64>>,
    pub members: Vec<String>,
}

fn final_model(inputs: &ReportInputs) -> FinalModel {
    let pop = inputs.pop;
    let best_mean = pop.best_mean();
    let running = FinalModel {
        label: format!("best mean so far ({})", best_mean.id),
        fitness: Some(best_mean.fitness.clone()),
        members: vec![best_mean.id.clone()],
    };
    let Some(s) = inputs.summary else {
        return running;
    };
    let chosen = s["final"]["model"].as_str().unwrap_or_default();
    let row = s["table"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["model"] == chosen);
    let fitness = row.and_then(|r| {
        r["fitness"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
    });
    let members = if s["final"]["rule"] == "softmax" {
        pop.best_per_archive()
            .iter()
            .map(|i| i.id.clone())
            .collect()
    } else {
        vec![best_mean.id.clone()]
    };
    FinalModel {
        label: format!("final/: {chosen}"),
        fitness,
        members,
    }
}

fn markers(inputs: &ReportInputs, finals: &FinalModel) -> Vec<Marker> {
    let pop = inputs.pop;
    let mut out: Vec<Marker> = pop
        .experts
        .iter()
        .zip(&pop.tasks)
        .map(|(e, t)| Marker {
            label: format!("expert {t}"),
            kind: MarkerKind::Expert,
            fitness: e.fitness.clone(),
        })
        .collect();
    for (ind, t) in pop.best_per_archive().iter().zip(&pop.tasks) {
        out.push(Marker {
            label: format!("best of {t}"),
            kind: MarkerKind::Member,
            fitness: ind.fitness.clone(),
        });
    }
    if let Some(f) = &finals.fitness {
        out.push(Marker {
            label: "final".into(),
            kind: MarkerKind::Final,
            fitness: f.clone(),
        });
    }
    out
}

pub(crate) struct Table {
    pub tasks: Vec<String>,
    pub split: Vec<String>,
    pub rows: Vec<(String, Vec<f64>)>,
    pub means: Vec<f64>,
    pub chosen: String,
}

/// `summary.json`'s table (held-out score per task per model).
pub(crate) fn table_rows(summary: Option<&Value>) -> Option<Table> {
    let s = summary?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let rows: Vec<&Value> = s["table"].as_array()?.iter().collect();
    Some(Table {
        tasks: strings(&s["tasks"]),
        split: strings(&s["table_split"]),
        rows: rows
            .iter()
            .map(|r| {
                (
                    r["model"].as_str().unwrap_or_default().to_string(),
                    r["heldout"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|x| x.as_f64().unwrap_or(f64::NAN))
                        .collect(),
                )
            })
            .collect(),
        means: rows
            .iter()
            .map(|r| r["mean"].as_f64().unwrap_or(f64::NAN))
            .collect(),
        chosen: s["final"]["model"].as_str().unwrap_or_default().to_string(),
    })
}
