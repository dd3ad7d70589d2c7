//! `bench --op racing`: the demo evolved twice per seed, with full evaluation and with racing,
//! from the same synthetic models: examples scored, the loop's wall time, and the final
//! model's held-out scores (racing must not change what a run finds; see
//! `benches/results/racing.md`).

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::qd::config::EvaluationKind;
use crate::qd::RunConfig;
use crate::run::{plan_workers, Quiet, Run, RunEnd, Stop};
use crate::synth::{synthesize, SynthOptions};

/// One run of the demo in `out` with `evaluation`: its numbers.
fn one(
    cfg_path: &Path,
    out: &Path,
    evaluation: EvaluationKind,
    children: Option<u64>,
    growth: Option<f64>,
) -> Result<Value> {
    let mut cfg = RunConfig::load(cfg_path)?;
    cfg.evolution.evaluation = evaluation;
    if let Some(g) = growth {
        cfg.evolution.racing_growth = g;
    }
    if let Some(c) = children {
        cfg.evolution.generations = c;
    }
    let cfg_growth = cfg.evolution.racing_growth;
    let devices = plan_workers(Some(1), Some(crate::backend::cuda::DeviceChoice::Cpu))?;
    let t = Instant::now();
    let mut run = Run::open(cfg, out, devices, &mut Quiet)?;
    let RunEnd::Finished(summary) = run.execute(&Stop::default(), &mut Quiet)? else {
        return Err(Error::invalid("the demo run did not finish"));
    };
    let total = t.elapsed().as_secs_f64();
    let doc: Value = serde_json::from_slice(
        &std::fs::read(out.join("summary.json"))
            .map_err(|e| Error::io(out.join("summary.json"), e))?,
    )
    .map_err(|e| Error::invalid(format!("summary.json: {e}")))?;
    let chosen = summary
        .rows
        .iter()
        .find(|r| r.model == summary.chosen)
        .expect("the chosen model has a row");
    Ok(json!({
        "racing_growth": cfg_growth,
        "examples_scored": doc["examples_scored"],
        "examples_full": doc["examples_full"],
        "stopped_early": doc["stopped_early"],
        "loop_seconds": doc["timing"]["loop_seconds_this_session"],
        "total_seconds": total,
        "final_model": chosen.model,
        "final_heldout": chosen.heldout,
        "final_heldout_mean": chosen.mean,
    }))
}

/// Full against racing on the demo of each seed (`fitness_per_subject` fitness prompts per
/// subject), in `scratch`; racing's rounds grow by `growth` (default: the config's).
pub fn compare(
    scratch: &Path,
    seeds: &[u64],
    fitness_per_subject: usize,
    children: Option<u64>,
    growth: Option<f64>,
) -> Result<Value> {
    let mut rows = vec![];
    for &seed in seeds {
        let dir = scratch.join(format!("racing-demo-{seed}-{fitness_per_subject}"));
        if !dir.join("cycleqd.toml").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            synthesize(
                &dir,
                &SynthOptions {
                    seed,
                    fitness_per_subject,
                    ..SynthOptions::default()
                },
            )?;
        }
        let cfg = dir.join("cycleqd.toml");
        let mut modes = vec![];
        for (name, kind) in [
            ("full", EvaluationKind::Full),
            ("racing", EvaluationKind::Racing),
        ] {
            let out = dir.join(format!("run-{name}"));
            let _ = std::fs::remove_dir_all(&out);
            modes.push(one(&cfg, &out, kind, children, growth)?);
            let _ = std::fs::remove_dir_all(&out);
        }
        let (full, racing) = (&modes[0], &modes[1]);
        let ratio = full["examples_scored"].as_f64().unwrap_or(0.0)
            / racing["examples_scored"].as_f64().unwrap_or(1.0).max(1.0);
        let diff = racing["final_heldout_mean"].as_f64().unwrap_or(0.0)
            - full["final_heldout_mean"].as_f64().unwrap_or(0.0);
        rows.push(json!({
            "seed": seed,
            "fitness_examples_per_task": 8 * fitness_per_subject,
            "full": full,
            "racing": racing,
            "examples_ratio": ratio,
            "heldout_mean_difference": diff,
        }));
    }
    Ok(json!({ "op": "racing", "results": rows }))
}
