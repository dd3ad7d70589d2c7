//! The end of a run: the archives and the genomes they hold on disk, the final-model candidates
//! (the best-mean elite and the paper's softmax merge) and the merge baselines scored on the
//! held-out split, `final/`, `summary.json`, `report/`, and the table.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::worker::{Split, Worker};
use crate::backend::cpu::CpuBackend;
use crate::durable::write_synced;
use crate::error::{Error, Result};
use crate::evolve::{ExpertSet, Genome};
use crate::merge::{merge_in_memory, MergeOp};
use crate::model::export::export_tensors;
use crate::model::{HostTensor, ModelStore, DEFAULT_MAX_SHARD_BYTES};
use crate::qd::checkpoint;
use crate::qd::config::FinalRule;
use crate::qd::Population;

type Tensors = Vec<(String, HostTensor)>;

/// One row of the final table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    /// Held-out score per task (fitness where a task has no held-out split).
    pub heldout: Vec<f64>,
    pub mean: f64,
    /// Fitness scores, for the CycleQD candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fitness: Option<Vec<f64>>,
}

/// The final table of a run and the model `final/` holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub tasks: Vec<String>,
    /// Per task: `heldout`, `fitness` (no held-out split) or `external`.
    pub split: Vec<String>,
    pub rows: Vec<Row>,
    /// The row of the model in `final/`.
    pub chosen: String,
}

/// Something that reports how far the final table is.
pub type TableProgress<'a> = dyn FnMut(usize, usize, &str) + 'a;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn store_tensors(s: &ModelStore) -> Result<Tensors> {
    s.names()
        .map(|n| Ok((n.to_string(), s.tensor(n)?)))
        .collect()
}

/// Writes everything a finished run leaves in `out` and returns its table. `worker` scores
/// the table's models; `timing` goes into `summary.json` as it is.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    out: &Path,
    set: &ExpertSet,
    pop: &Population,
    final_rule: FinalRule,
    split: &[&'static str],
    worker: &mut dyn Worker,
    timing: Value,
    progress: &mut TableProgress,
) -> Result<Summary> {
    let names = &pop.tasks;
    let k = names.len();

    // Archives and the genomes they hold.
    let adir = out.join("archives");
    std::fs::create_dir_all(&adir).map_err(|e| Error::io(&adir, e))?;
    for (q, a) in pop.archives.iter().enumerate() {
        let elites: Vec<_> = a
            .elites()
            .map(|e| {
                let ind = &pop.individuals[&e.solution];
                let mut v = json!({"id": e.solution, "objective": e.objective, "measures": e.measures,
                                   "cell": e.cell, "fitness": ind.fitness});
                if !ind.examples.is_empty() {
                    // Per task, what each example gave (`"10…"`: right or wrong, in file order).
                    v["examples"] = json!(names
                        .iter()
                        .zip(&ind.examples)
                        .filter(|(_, x)| !matches!(x, crate::qd::ExampleScores::Bits(b) if b.is_empty()))
                        .map(|(n, x)| (n.clone(), x))
                        .collect::<std::collections::BTreeMap<_, _>>());
                }
                v
            })
            .collect();
        let doc = json!({"task": names[q], "bins": a.bins(), "stats": a.stats(), "elites": elites});
        write_synced(
            &adir.join(format!("{}.json", names[q])),
            &serde_json::to_vec_pretty(&doc).expect("JSON serialises"),
        )?;
    }

    // Candidates for the final model.
    let best = pop.best_per_archive();
    let objectives: Vec<f64> = best.iter().enumerate().map(|(q, b)| b.fitness[q]).collect();
    let best_genomes: Vec<&Genome> = best.iter().map(|b| &*pop.genomes[&b.id]).collect();
    let softmax = Genome::softmax_merge(&best_genomes, &objectives);
    let best_mean = pop.best_mean();
    let candidates: Vec<(String, FinalRule, Genome)> = vec![
        (
            format!(
                "CycleQD softmax merge ({})",
                best.iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            FinalRule::Softmax,
            softmax,
        ),
        (
            format!("CycleQD best-mean elite ({})", best_mean.id),
            FinalRule::BestMean,
            (*pop.genomes[&best_mean.id]).clone(),
        ),
    ];

    // The table: baselines through the merge operators, then the candidates.
    let mut row = |model: String, t: &Tensors, with_fitness: bool| -> Result<Row> {
        let label = format!("table-{}", model.split_whitespace().next().unwrap_or("m"));
        let mut score = |split: Split| -> Result<Vec<f64>> {
            worker
                .score_tensors(t, split, &label)?
                .map(|ev| ev.scores)
                .map_err(|r| Error::invalid(format!("{model}: {r}")))
        };
        let h = score(Split::Heldout)?;
        let fitness = if with_fitness {
            Some(score(Split::Fitness)?)
        } else {
            None
        };
        Ok(Row {
            mean: mean(&h),
            heldout: h,
            fitness,
            model,
        })
    };
    let total = k + 5 + candidates.len();
    let mut step = 0;
    let mut rows = vec![];
    progress(step, total, "base");
    rows.push(row("base".into(), &store_tensors(&set.base)?, false)?);
    step += 1;
    for (e, s) in set.experts.iter().enumerate() {
        progress(step, total, &format!("expert {}", names[e]));
        rows.push(row(
            format!("expert {}", names[e]),
            &store_tensors(s)?,
            false,
        )?);
        step += 1;
    }
    let experts: Vec<&ModelStore> = set.experts.iter().collect();
    for (name, op) in baselines(k) {
        progress(step, total, &name);
        let t = merge_in_memory(&CpuBackend, &set.base, &experts, &op)?;
        rows.push(row(name, &t, false)?);
        step += 1;
    }
    let mut chosen = None;
    for (name, rule, g) in &candidates {
        progress(step, total, name);
        let t = set.materialize_model(&CpuBackend, g)?;
        rows.push(row(name.clone(), &t, true)?);
        if *rule == final_rule {
            chosen = Some((name.clone(), t));
        }
        step += 1;
    }
    progress(total, total, "");
    let (chosen, chosen_tensors) = chosen.expect("every rule has a candidate");

    // The archives' genomes, with the final model's under `final` (for `export`).
    let final_genome = candidates
        .iter()
        .find(|c| c.1 == final_rule)
        .map(|c| &c.2)
        .expect("every rule has a candidate");
    let final_id = "final".to_string();
    let mut genomes: Vec<(&String, &Genome)> = pop.genomes.iter().map(|(k, g)| (k, &**g)).collect();
    genomes.push((&final_id, final_genome));
    genomes.sort_by(|a, b| a.0.cmp(b.0));
    checkpoint::write_genomes(
        &adir.join("genomes.safetensors"),
        genomes.into_iter(),
        [("tasks".to_string(), names.join(","))].into(),
    )?;

    export_tensors(
        &out.join("final"),
        &chosen_tensors,
        &set.base
            .config()
            .to_json_with_dtype(set.base.dominant_dtype()),
        Some(set.base.dir()),
        DEFAULT_MAX_SHARD_BYTES,
    )?;

    let summary = Summary {
        tasks: names.clone(),
        split: split.iter().map(|s| s.to_string()).collect(),
        rows,
        chosen,
    };
    let doc = json!({
        "tasks": names,
        "table_split": split,
        "children": pop.children_done,
        "failed_children": pop.failed,
        "evaluations": pop.evaluations(),
        // Fitness examples scored during the loop, what full evaluations would have scored
        // (they differ when racing stops children early), and how many it stopped.
        "examples_scored": pop.examples_scored,
        "examples_full": pop.examples_full,
        "stopped_early": pop.stopped_early,
        "archives": pop.archives.iter().zip(names).map(|(a, n)| json!({"task": n, "stats": a.stats()})).collect::<Vec<_>>(),
        "final": {"rule": final_rule, "model": summary.chosen, "path": out.join("final")},
        "table": summary.rows,
        "verdict": summary.verdict(),
        "timing": timing,
    });
    write_synced(
        &out.join("summary.json"),
        &serde_json::to_vec_pretty(&doc).expect("JSON serialises"),
    )?;
    crate::report::redraw_run_report(out, pop, Some(&doc))?;
    Ok(summary)
}

/// The merge baselines of the table, through mergekit's operators.
fn baselines(k: usize) -> Vec<(String, MergeOp)> {
    let ones = vec![1.0f32; k];
    vec![
        (
            "linear merge (equal weights)".to_string(),
            MergeOp::Linear {
                weights: ones.clone(),
                normalize: true,
            },
        ),
        (
            "task arithmetic λ=0.5".to_string(),
            MergeOp::task_arithmetic(ones.clone(), 0.5, false),
        ),
        (
            "task arithmetic λ=1".to_string(),
            MergeOp::task_arithmetic(ones.clone(), 1.0, false),
        ),
        (
            "TIES (density 0.5)".to_string(),
            MergeOp::ties(ones, vec![0.5; k], 1.0, true),
        ),
    ]
}

impl Summary {
    /// Reads the table a finished run wrote to `summary.json`.
    pub fn read(path: &Path) -> Result<Summary> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            err: e,
        })?;
        let field = |k: &str| {
            v.get(k)
                .cloned()
                .ok_or_else(|| Error::format(path, format!("no `{k}`")))
        };
        fn parse<T: serde::de::DeserializeOwned>(path: &Path, k: &str, x: Value) -> Result<T> {
            serde_json::from_value(x).map_err(|e| Error::format(path, format!("`{k}`: {e}")))
        }
        Ok(Summary {
            tasks: parse(path, "tasks", field("tasks")?)?,
            split: parse(path, "table_split", field("table_split")?)?,
            rows: parse(path, "table", field("table")?)?,
            chosen: parse(path, "final.model", field("final")?["model"].clone())?,
        })
    }

    /// Where the chosen model stands, computed from the table.
    pub fn verdict(&self) -> Vec<String> {
        let Some(f) = self.rows.iter().find(|r| r.model == self.chosen) else {
            return vec![];
        };
        let mut v = vec![];
        let best_expert = self
            .rows
            .iter()
            .filter(|r| r.model.starts_with("expert"))
            .map(|r| r.mean)
            .fold(f64::NEG_INFINITY, f64::max);
        let cmp = |x: f64| {
            if f.mean > x {
                "above"
            } else if f.mean == x {
                "equal to"
            } else {
                "below"
            }
        };
        v.push(format!(
            "final model mean {:.3}: {} the best expert's mean ({best_expert:.3})",
            f.mean,
            cmp(best_expert)
        ));
        for r in self.rows.iter().filter(|r| {
            r.model.starts_with("linear")
                || r.model.starts_with("task")
                || r.model.starts_with("TIES")
        }) {
            v.push(format!("{} {} ({:.3})", cmp(r.mean), r.model, r.mean));
        }
        v
    }

    /// The table as text: one row per model, a column per task, the final model marked,
    /// then the verdict.
    pub fn table(&self) -> String {
        let width = (self
            .rows
            .iter()
            .map(|r| r.model.len())
            .max()
            .unwrap_or(10)
            .max(10)
            + 2)
        .max(48);
        let mut s = format!(
            "\n{:<width$}{}{:>8}\n",
            "scores (split per task: held-out unless marked)",
            self.tasks
                .iter()
                .zip(&self.split)
                .map(|(n, s)| {
                    let n = if s == "heldout" {
                        n.clone()
                    } else {
                        format!("{n}({s})")
                    };
                    format!("{n:>10}")
                })
                .collect::<String>(),
            "mean",
        );
        for r in &self.rows {
            let mark = if r.model == self.chosen {
                "  ← final/"
            } else {
                ""
            };
            s.push_str(&format!(
                "{:<width$}{}{:>8.3}{mark}\n",
                r.model,
                r.heldout
                    .iter()
                    .map(|x| format!("{x:>10.3}"))
                    .collect::<String>(),
                r.mean,
            ));
        }
        for line in self.verdict() {
            s.push_str(&format!("  {line}\n"));
        }
        s
    }
}
