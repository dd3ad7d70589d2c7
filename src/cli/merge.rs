//! `cycleqd-engine merge CONFIG.yml OUT_DIR`: mergekit-compatible merging.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::merge::{run_merge, MergeOptions};
use cycleqd_engine::model::DEFAULT_MAX_SHARD_BYTES;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// mergekit YAML configuration (model paths relative to the current directory).
    config: PathBuf,
    /// Output checkpoint directory, written beside it and renamed into place when complete.
    out_dir: PathBuf,
    /// Replace OUT_DIR if it exists and is not empty (the old one stays until the new one is
    /// complete).
    #[arg(long)]
    overwrite: bool,
    /// Largest shard in bytes (mergekit's and transformers' default: 5 GB).
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// Seed of the random drops of dare_* and della* (mergekit's flag: the same seed gives
    /// mergekit's masks). Without it one is drawn and reported.
    #[arg(long)]
    random_seed: Option<u64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: MergeArgs) -> anyhow::Result<ExitCode> {
    let opts = MergeOptions {
        max_shard_bytes: a.max_shard_bytes,
        overwrite: a.overwrite,
        random_seed: a.random_seed,
        progress: !a.json,
    };
    let report = run_merge(&CpuBackend, &a.config, &a.out_dir, &opts).map_err(|e| {
        // Errors in the configuration already start with its path: say it once.
        let (config, message) = (a.config.display().to_string(), e.to_string());
        if message.starts_with(&format!("{config}:")) {
            anyhow::anyhow!("merge {message}")
        } else {
            anyhow::anyhow!("merge {config}: {message}")
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let gb = (report.bytes_read + report.bytes_written) as f64 / 1e9;
        println!(
            "merged {} tensors ({}) into {} in {:.2} s: {:.2} GB read + written, {:.2} GB/s",
            report.tensors,
            report.out_dtype,
            a.out_dir.display(),
            report.seconds,
            gb,
            gb / report.seconds
        );
        if let Some(seed) = report.random_seed {
            println!("random drops seeded with --random-seed {seed}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
