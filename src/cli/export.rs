//! `cycleqd-engine export RUN --final|--elite ID --out DIR`: a run's final model or any archive
//! elite as a Hugging Face checkpoint, materialised from its genome.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::evolve::ExpertSet;
use cycleqd_engine::model::export::export_tensors;
use cycleqd_engine::model::{ModelStore, DEFAULT_MAX_SHARD_BYTES};
use cycleqd_engine::qd::checkpoint::read_genomes;
use cycleqd_engine::qd::RunConfig;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A finished run folder.
    run: PathBuf,
    /// The run's final model.
    #[arg(long, conflicts_with = "elite", required_unless_present = "elite")]
    r#final: bool,
    /// An archive elite by id (see `archives/<task>.json`), e.g. `child-42` or `expert-alpha`.
    #[arg(long)]
    elite: Option<String>,
    /// Output checkpoint directory (written atomically).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let config_path = a.run.join("config.toml");
    if !config_path.is_file() {
        bail!(
            "{}: not a run folder (it has no config.toml; give the --out of a `run`)",
            a.run.display()
        );
    }
    let cfg = RunConfig::load(&config_path)?;
    let mut inputs: Vec<&std::path::Path> = vec![&a.run, &cfg.base];
    inputs.extend(cfg.tasks.iter().map(|t| t.expert.as_path()));
    cycleqd_engine::durable::check_output_dir(&a.out, &inputs)
        .with_context(|| format!("export {}", a.out.display()))?;
    let genomes_path = a.run.join("archives").join("genomes.safetensors");
    if !genomes_path.is_file() {
        bail!(
            "{}: missing; is {} a finished run?",
            genomes_path.display(),
            a.run.display()
        );
    }
    let base = ModelStore::open_llama(&cfg.base).context("base")?;
    let experts = cfg
        .tasks
        .iter()
        .map(|t| ModelStore::open_llama(&t.expert).with_context(|| format!("expert {}", t.name)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cache = cfg
        .factor_cache
        .clone()
        .unwrap_or_else(|| a.run.join("factors"));
    let set = ExpertSet::build_cached(base, experts, cfg.rank(), Some(&cache))?
        .with_crossover(cfg.crossover()?);
    let (genomes, _) = read_genomes(&genomes_path, &set)?;
    let id = a.elite.clone().unwrap_or_else(|| "final".into());
    let Some(g) = genomes.get(&id) else {
        let known: Vec<&String> = genomes.keys().take(8).collect();
        bail!(
            "{}: no genome `{id}` (held: {known:?}{})",
            genomes_path.display(),
            if genomes.len() > 8 { ", …" } else { "" }
        );
    };
    let tensors = set.materialize_model(&CpuBackend, g)?;
    export_tensors(
        &a.out,
        &tensors,
        &set.base
            .config()
            .to_json_with_dtype(set.base.dominant_dtype()),
        Some(&cfg.base),
        DEFAULT_MAX_SHARD_BYTES,
    )
    .with_context(|| format!("export {}", a.out.display()))?;
    println!(
        "exported `{id}` of {} to {}",
        a.run.display(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
