//! `cycleqd-engine run`: the main job. Without `--config` it builds the synthetic demo (once)
//! and evolves it. The run folder holds `config.toml` (resolved), `events.jsonl`,
//! `checkpoint.safetensors` (atomic; the same command resumes from it), `archives/`, `final/`,
//! `summary.json` and `report/`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::{CudaBackend, DeviceChoice};
use cycleqd_engine::backend::Backend;
use cycleqd_engine::eval::{
    ExternalEvaluator, Metric, PreparedTask, Scoring, TaskFile, TaskScorer, TaskSuite,
};
use cycleqd_engine::evolve::{ChildWeights, ExpertSet, Genome, MergeOp};
use cycleqd_engine::merge::merge_in_memory;
use cycleqd_engine::model::export::{export_tensors, write_synced};
use cycleqd_engine::model::{HostTensor, ModelStore, Tokenizer, DEFAULT_MAX_SHARD_BYTES};
use cycleqd_engine::qd::checkpoint::{self, CheckpointMeta};
use cycleqd_engine::qd::config::{FinalRule, RangeSpec, RunConfig};
use cycleqd_engine::qd::cycle::coefficient_groups;
use cycleqd_engine::qd::{Evaluator, GridArchive, Operators, Population};
use cycleqd_engine::synth::{synthesize, SynthOptions};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run configuration (TOML). Without it: the synthetic demo in `--demo-dir`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder (default: `run/` in the demo folder, else `cycleqd-run`). An unfinished run
    /// there is resumed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Children to produce (overrides `evolution.generations`; a resumed run may be extended).
    #[arg(long)]
    generations: Option<u64>,
    /// Run seed (overrides `evolution.seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Where built-in tasks are scored: cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Where the demo is synthesised when `--config` is absent.
    #[arg(long, default_value = "cycleqd-demo")]
    demo_dir: PathBuf,
}

type Tensors = Vec<(String, HostTensor)>;

/// The fitness scorer of the loop: materialise the child in memory, score it on every task.
struct ChildScorer<'a> {
    set: &'a ExpertSet,
    suite: &'a TaskSuite,
    /// Reused from child to child.
    weights: ChildWeights,
}

impl Evaluator for ChildScorer<'_> {
    fn evaluate(
        &mut self,
        genome: &Genome,
        id: &str,
    ) -> cycleqd_engine::Result<std::result::Result<Vec<f64>, String>> {
        self.set
            .materialize_into(&CpuBackend, genome, &mut self.weights)?;
        self.suite.score(&self.weights.tensors, id)
    }
}

/// One row of the final table.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
struct Row {
    model: String,
    /// Held-out score per task (fitness where a task has no held-out split).
    heldout: Vec<f64>,
    mean: f64,
    /// Fitness scores, for the CycleQD candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fitness: Option<Vec<f64>>,
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let (config_path, out) = match &a.config {
        Some(c) => (
            c.clone(),
            a.out.clone().unwrap_or_else(|| "cycleqd-run".into()),
        ),
        None => {
            let cfg = a.demo_dir.join("cycleqd.toml");
            if !cfg.is_file() {
                eprintln!(
                    "no --config: building the synthetic demo in {}",
                    a.demo_dir.display()
                );
                let report = synthesize(&a.demo_dir, &SynthOptions::default())
                    .with_context(|| format!("synth {}", a.demo_dir.display()))?;
                super::synth::print_report(&report);
            }
            (cfg, a.out.clone().unwrap_or_else(|| a.demo_dir.join("run")))
        }
    };
    let mut cfg = RunConfig::load(&config_path)?;
    if let Some(g) = a.generations {
        cfg.evolution.generations = g;
    }
    if let Some(s) = a.seed {
        cfg.evolution.seed = s;
    }
    // Children are materialised on the CPU into reused buffers; built-in tasks score them on
    // the device (weights uploaded per child).
    let device = super::open_device(a.device)?.map(Arc::new);
    if let Some(d) = &device {
        eprintln!("scoring on {}", d.name());
    }
    evolve(&cfg, &out, device).with_context(|| format!("run {}", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn evolve(cfg: &RunConfig, out: &Path, device: Option<Arc<CudaBackend>>) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let config_toml = cfg.to_toml();
    let ckpt_path = out.join("checkpoint.safetensors");
    let events_path = out.join("events.jsonl");
    let summary_path = out.join("summary.json");

    // Inputs: the task files first (cheap to check), then the models and their factors.
    let base = ModelStore::open_llama(&cfg.base).context("base")?;
    let (fitness, heldout, heldout_split) = build_suites(cfg, &base, out, &cfg.base, device)?;
    let experts = cfg
        .tasks
        .iter()
        .map(|t| {
            ModelStore::open_llama(&t.expert).with_context(|| format!("expert of task {}", t.name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let base_dir = cfg.base.clone();
    let cache_dir = cfg
        .factor_cache
        .clone()
        .unwrap_or_else(|| out.join("factors"));
    let t0 = Instant::now();
    let set = ExpertSet::build_cached(
        base,
        experts,
        cfg.rank(),
        cfg.evolution.seed,
        Some(&cache_dir),
    )?;
    let worst = set
        .tensors
        .iter()
        .flat_map(|t| t.relative_error.iter().copied())
        .fold(0.0f64, f64::max);
    eprintln!(
        "factors: rank {:?}, {} tensors, cache {:?}, worst relative error {worst:.2e} ({:.2} s)",
        set.rank,
        set.tensors.iter().filter(|t| !t.factors.is_empty()).count(),
        set.cache_status,
        t0.elapsed().as_secs_f64()
    );
    let task_names: Vec<String> = cfg.tasks.iter().map(|t| t.name.clone()).collect();

    let saved = if ckpt_path.is_file() {
        let (pop, meta) = checkpoint::load(&ckpt_path, &set)?;
        same_run(&meta.config, cfg, &ckpt_path)?;
        Some((pop, meta))
    } else {
        None
    };

    // A finished run: show its table again.
    if let (true, Some((pop, _))) = (summary_path.is_file(), &saved) {
        if pop.children_done >= cfg.evolution.generations {
            let s: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&summary_path)?).context("summary.json")?;
            let rows: Vec<Row> = serde_json::from_value(s["table"].clone()).unwrap_or_default();
            eprintln!(
                "{} is a finished run ({} children); its table:",
                out.display(),
                pop.children_done
            );
            print_table(
                &task_names,
                &heldout_split,
                &rows,
                s["final"]["model"].as_str(),
            );
            return Ok(());
        }
    }

    // Resume, or start.
    let mut scorer = ChildScorer {
        set: &set,
        suite: &fitness,
        weights: ChildWeights::default(),
    };
    let (mut pop, mut events_len) = if let Some((pop, meta)) = saved {
        let f = OpenOptions::new()
            .write(true)
            .open(&events_path)
            .with_context(|| format!("{}: cannot open to resume", events_path.display()))?;
        if f.metadata()?.len() < meta.events_len {
            bail!(
                "{}: shorter than the checkpoint says ({} bytes)",
                events_path.display(),
                meta.events_len
            );
        }
        // Lines written after the checkpoint belong to children that will be redone.
        f.set_len(meta.events_len)?;
        f.sync_all()?;
        eprintln!("resuming after child {}", pop.children_done);
        (pop, meta.events_len)
    } else {
        let expert_fitness = set
            .experts
            .iter()
            .enumerate()
            .map(|(e, _)| {
                let t = scorer
                    .set
                    .materialize_model(&CpuBackend, &Genome::seed(&set, e))?;
                fitness
                    .score(&t, &format!("expert-{}", task_names[e]))?
                    .map_err(|r| anyhow::anyhow!("expert {}: {r}", task_names[e]))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ranges = measure_ranges(cfg, &expert_fitness)?;
        let pop = Population::new(
            &set,
            task_names.clone(),
            &ranges,
            cfg.evolution.bins,
            expert_fitness,
        )?;
        write_synced(&events_path, b"")?;
        write_synced(&out.join("config.toml"), config_toml.as_bytes())?;
        checkpoint::save(
            &ckpt_path,
            &pop,
            &CheckpointMeta {
                events_len: 0,
                config: config_toml.clone(),
            },
        )?;
        (pop, 0)
    };

    let names: Vec<&str> = set.tensors.iter().map(|t| t.name.as_str()).collect();
    let ops = Operators {
        seed: cfg.evolution.seed,
        crossover_mean: cfg.evolution.crossover_mean,
        crossover_std: cfg.evolution.crossover_std,
        groups: coefficient_groups(&names, cfg.evolution.crossover_granularity),
        mutation_w_max: cfg.evolution.mutation_w_max,
        sampling: cfg.elite_sampling().map_err(anyhow::Error::msg)?,
    };
    let total = cfg.evolution.generations;
    let bar = ProgressBar::new(total).with_position(pop.children_done.min(total));
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} children  {per_sec}  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut events = OpenOptions::new()
        .append(true)
        .open(&events_path)
        .with_context(|| format!("{}: cannot open", events_path.display()))?;
    let loop_start = Instant::now();
    let resumed_at = pop.children_done;
    while pop.children_done < total {
        let ev = pop.step(&set, &ops, &mut scorer)?;
        if let Some(reason) = &ev.failed {
            bar.suspend(|| eprintln!("{}: failed: {reason}", ev.id));
        }
        let mut line = serde_json::to_vec(&ev)?;
        line.push(b'\n');
        events
            .write_all(&line)
            .with_context(|| format!("{}: write", events_path.display()))?;
        events_len += line.len() as u64;
        if pop.children_done % cfg.evolution.checkpoint_every == 0 || pop.children_done == total {
            events.sync_data()?;
            checkpoint::save(
                &ckpt_path,
                &pop,
                &CheckpointMeta {
                    events_len,
                    config: config_toml.clone(),
                },
            )?;
        }
        let best: Vec<String> = pop
            .best_per_archive()
            .iter()
            .zip(&task_names)
            .enumerate()
            .map(|(k, (b, n))| format!("{n} {:.2}", b.fitness[k]))
            .collect();
        bar.set_message(format!("best: {}", best.join(", ")));
        bar.set_position(pop.children_done);
    }
    bar.finish();
    let loop_seconds = loop_start.elapsed().as_secs_f64();
    let children_run = pop.children_done - resumed_at;

    finish(
        cfg,
        out,
        &set,
        &pop,
        &fitness,
        &heldout,
        &heldout_split,
        &base_dir,
        json!({
            "children_this_session": children_run,
            "loop_seconds_this_session": loop_seconds,
            "children_per_second": children_run as f64 / loop_seconds.max(1e-9),
            "total_seconds_this_session": started.elapsed().as_secs_f64(),
        }),
    )
}

/// Refuses to resume a run folder made by another configuration (the number of children may
/// differ: that extends or shortens the run).
fn same_run(saved: &str, cfg: &RunConfig, path: &Path) -> anyhow::Result<()> {
    let mut prev: RunConfig = toml::from_str(saved)
        .with_context(|| format!("{}: unreadable saved configuration", path.display()))?;
    prev.evolution.generations = cfg.evolution.generations;
    if prev != *cfg {
        bail!(
            "{}: this run folder belongs to a different configuration; use another --out",
            path.display()
        );
    }
    Ok(())
}

/// The fitness and held-out suites, and per task which split the table shows.
fn build_suites(
    cfg: &RunConfig,
    base: &ModelStore,
    out: &Path,
    base_dir: &Path,
    device: Option<Arc<CudaBackend>>,
) -> anyhow::Result<(TaskSuite, TaskSuite, Vec<&'static str>)> {
    let tok = if cfg.tasks.iter().any(|t| t.fitness.is_some()) {
        Some(Tokenizer::from_dir(base_dir)?)
    } else {
        None
    };
    let mut fit = vec![];
    let mut held = vec![];
    let mut split = vec![];
    for t in &cfg.tasks {
        let scoring = Scoring {
            metric: Metric::parse(&t.metric, t.pattern.as_deref()).map_err(anyhow::Error::msg)?,
            max_new_tokens: t.max_new_tokens,
            stop: t.stop.clone(),
        };
        match (&t.fitness, &t.evaluator) {
            (Some(f), _) => {
                let tk = tok.as_ref().expect("loaded when a task has a fitness file");
                let file = TaskFile::load(f)?;
                fit.push(TaskScorer::Builtin(PreparedTask::new(
                    tk,
                    &t.name,
                    &file,
                    scoring.clone(),
                )?));
                let (hfile, s) = match &t.heldout {
                    Some(h) => (TaskFile::load(h)?, "heldout"),
                    None => (file, "fitness"),
                };
                held.push(TaskScorer::Builtin(PreparedTask::new(
                    tk, &t.name, &hfile, scoring,
                )?));
                split.push(s);
            }
            (None, Some(cmd)) => {
                let ev = ExternalEvaluator {
                    command: cmd.clone(),
                    timeout: Duration::from_secs_f64(t.evaluator_timeout_s),
                };
                fit.push(TaskScorer::External(ev.clone()));
                held.push(TaskScorer::External(ev));
                split.push("external");
            }
            (None, None) => unreachable!("validated"),
        }
    }
    let config = base.config().clone();
    let config_json = config.to_json_with_dtype(base.dominant_dtype());
    let suite = |scorers| TaskSuite {
        names: cfg.tasks.iter().map(|t| t.name.clone()).collect(),
        scorers,
        config: config.clone(),
        config_json: config_json.clone(),
        companions: base_dir.to_path_buf(),
        tokenizer: tok.clone(),
        work_dir: out.join("work"),
        batch: cfg.evolution.eval_batch,
        device: device.clone(),
    };
    Ok((suite(fit), suite(held), split))
}

/// Per task, the range of its score where it is a measure.
fn measure_ranges(cfg: &RunConfig, expert_fitness: &[Vec<f64>]) -> anyhow::Result<Vec<(f64, f64)>> {
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
                    bail!(
                        "task {}: measure_range = \"experts\" gives an empty range ({lo}, {hi}): \
                         every expert scores {} on it; set [lo, hi]",
                        t.name,
                        scores[0]
                    );
                }
                Ok((lo, hi))
            }
        })
        .collect()
}

fn store_tensors(s: &ModelStore) -> cycleqd_engine::Result<Tensors> {
    s.names()
        .map(|n| Ok((n.to_string(), s.tensor(n)?)))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The end of a run: archives and genomes on disk, the final-model candidates and the
/// baselines scored on the held-out split, `final/`, `summary.json`, `report/` and the table.
#[allow(clippy::too_many_arguments)]
fn finish(
    cfg: &RunConfig,
    out: &Path,
    set: &ExpertSet,
    pop: &Population,
    fitness: &TaskSuite,
    heldout: &TaskSuite,
    split: &[&'static str],
    base_dir: &Path,
    timing: serde_json::Value,
) -> anyhow::Result<()> {
    let names = &pop.tasks;
    let k = names.len();

    // Archives and the genomes they hold.
    let adir = out.join("archives");
    std::fs::create_dir_all(&adir)?;
    for (q, a) in pop.archives.iter().enumerate() {
        let elites: Vec<_> = a
            .elites()
            .map(|e| {
                json!({"id": e.solution, "objective": e.objective, "measures": e.measures,
                       "cell": e.cell, "fitness": pop.individuals[&e.solution].fitness})
            })
            .collect();
        let doc = json!({"task": names[q], "bins": a.bins(), "stats": a.stats(), "elites": elites});
        write_synced(
            &adir.join(format!("{}.json", names[q])),
            &serde_json::to_vec_pretty(&doc)?,
        )?;
    }

    // Candidates for the final model.
    let best = pop.best_per_archive();
    let objectives: Vec<f64> = best.iter().enumerate().map(|(q, b)| b.fitness[q]).collect();
    let best_genomes: Vec<&Genome> = best.iter().map(|b| &pop.genomes[&b.id]).collect();
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
            pop.genomes[&best_mean.id].clone(),
        ),
    ];

    // The table: baselines through the merge operators, then the candidates.
    let score = |suite: &TaskSuite, t: &Tensors, label: &str| -> anyhow::Result<Vec<f64>> {
        suite
            .score(t, label)?
            .map_err(|r| anyhow::anyhow!("{label}: {r}"))
    };
    let row = |model: String, t: &Tensors, with_fitness: bool| -> anyhow::Result<Row> {
        let label = format!("table-{}", model.split_whitespace().next().unwrap_or("m"));
        let h = score(heldout, t, &label)?;
        Ok(Row {
            model,
            mean: mean(&h),
            heldout: h,
            fitness: if with_fitness {
                Some(score(fitness, t, &label)?)
            } else {
                None
            },
        })
    };
    let bar = ProgressBar::new((k + 5 + candidates.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("scoring the final table [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut rows = vec![];
    bar.set_message("base");
    rows.push(row("base".into(), &store_tensors(&set.base)?, false)?);
    bar.inc(1);
    for (e, s) in set.experts.iter().enumerate() {
        rows.push(row(
            format!("expert {}", names[e]),
            &store_tensors(s)?,
            false,
        )?);
        bar.inc(1);
    }
    let experts: Vec<&ModelStore> = set.experts.iter().collect();
    let ones = vec![1.0f32; k];
    let baselines = [
        (
            "linear merge (equal weights)".to_string(),
            MergeOp::Linear {
                weights: ones.clone(),
                normalize: true,
            },
        ),
        (
            "task arithmetic λ=0.5".to_string(),
            MergeOp::TaskArithmetic {
                weights: ones.clone(),
                lambda: 0.5,
                normalize: false,
            },
        ),
        (
            "task arithmetic λ=1".to_string(),
            MergeOp::TaskArithmetic {
                weights: ones.clone(),
                lambda: 1.0,
                normalize: false,
            },
        ),
        (
            "TIES (density 0.5)".to_string(),
            MergeOp::Ties {
                weights: ones.clone(),
                densities: vec![0.5; k],
                lambda: 1.0,
                normalize: true,
            },
        ),
    ];
    for (name, op) in &baselines {
        bar.set_message(name.clone());
        let t = merge_in_memory(&CpuBackend, &set.base, &experts, op)?;
        rows.push(row(name.clone(), &t, false)?);
        bar.inc(1);
    }
    let mut chosen = None;
    let mut chosen_tensors = None;
    for (name, rule, g) in &candidates {
        bar.set_message(name.clone());
        let t = set.materialize_model(&CpuBackend, g)?;
        rows.push(row(name.clone(), &t, true)?);
        if *rule == cfg.evolution.final_model {
            chosen = Some(name.clone());
            chosen_tensors = Some(t);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let chosen = chosen.expect("every rule has a candidate");

    // The archives' genomes, with the final model's under `final` (for `export`).
    let mut genomes = pop.genomes.clone();
    let final_genome = candidates
        .iter()
        .find(|c| c.1 == cfg.evolution.final_model)
        .map(|c| c.2.clone())
        .expect("every rule has a candidate");
    genomes.insert("final".into(), final_genome);
    checkpoint::write_genomes(
        &adir.join("genomes.safetensors"),
        &genomes,
        [("tasks".to_string(), names.join(","))].into(),
    )?;

    export_tensors(
        &out.join("final"),
        &chosen_tensors.expect("chosen"),
        &set.base
            .config()
            .to_json_with_dtype(set.base.dominant_dtype()),
        Some(base_dir),
        DEFAULT_MAX_SHARD_BYTES,
    )?;

    let verdict = verdict(&rows, &chosen);
    let summary = json!({
        "tasks": names,
        "table_split": split,
        "children": pop.children_done,
        "failed_children": pop.failed,
        "evaluations": pop.evaluations(),
        "archives": pop.archives.iter().zip(names).map(|(a, n)| json!({"task": n, "stats": a.stats()})).collect::<Vec<_>>(),
        "final": {"rule": cfg.evolution.final_model, "model": chosen, "path": out.join("final")},
        "table": rows,
        "verdict": verdict,
        "timing": timing,
    });
    write_synced(
        &out.join("summary.json"),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    cycleqd_engine::report::write_report(&out.join("report"), pop)?;
    print_table(names, split, &rows, Some(&chosen));
    Ok(())
}

/// Where the chosen model stands, computed from the table.
fn verdict(rows: &[Row], chosen: &str) -> Vec<String> {
    let Some(f) = rows.iter().find(|r| r.model == chosen) else {
        return vec![];
    };
    let mut v = vec![];
    let best_expert = rows
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
    for r in rows.iter().filter(|r| {
        r.model.starts_with("linear") || r.model.starts_with("task") || r.model.starts_with("TIES")
    }) {
        v.push(format!("{} {} ({:.3})", cmp(r.mean), r.model, r.mean));
    }
    v
}

fn print_table(names: &[String], split: &[&str], rows: &[Row], chosen: Option<&str>) {
    let width = rows
        .iter()
        .map(|r| r.model.len())
        .max()
        .unwrap_or(10)
        .max(10)
        + 2;
    println!();
    println!(
        "{:<width$}{}{:>8}",
        "scores (split per task: held-out unless marked)",
        names
            .iter()
            .zip(split)
            .map(|(n, s)| {
                let n = if *s == "heldout" {
                    n.clone()
                } else {
                    format!("{n}({s})")
                };
                format!("{n:>10}")
            })
            .collect::<String>(),
        "mean",
        width = width.max(48),
    );
    for r in rows {
        let mark = if Some(r.model.as_str()) == chosen {
            "  ← final/"
        } else {
            ""
        };
        println!(
            "{:<width$}{}{:>8.3}{mark}",
            r.model,
            r.heldout
                .iter()
                .map(|x| format!("{x:>10.3}"))
                .collect::<String>(),
            r.mean,
            width = width.max(48),
        );
    }
    if let Some(c) = chosen {
        for line in verdict(rows, c) {
            println!("  {line}");
        }
    }
}
