//! Subcommands: argument parsing (clap derive) and dispatch. Each subcommand lives in its own
//! module and returns `anyhow::Result` with context on every file and device call.

mod bench;
mod eval;
mod export;
mod generate;
mod inspect;
mod merge;
mod prompt;
mod report;
mod run;
mod score;
mod serve;
mod synth;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cycleqd-engine",
    version,
    about = "Evolve multi-skill LLMs by quality diversity (CycleQD)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Arithmetic of CPU matmuls with bf16 weights: `auto` (bf16 where the CPU has the bf16 dot
    /// product, AVX-512 BF16; else f32), `f32` (weights upcast, as the f32 reference), `bf16`
    /// (activations rounded to bf16, f32 accumulation, as transformers computes in bf16).
    /// Default: $CYCLEQD_PRECISION, else auto. GPUs are not affected.
    #[arg(long, global = true, value_parser = ["auto", "f32", "bf16"])]
    pub precision: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a continuation of a prompt with a Hugging Face Llama checkpoint.
    Generate(generate::GenerateArgs),
    /// Summarise a checkpoint directory and report any problem found.
    Inspect(inspect::InspectArgs),
    /// Merge models as a mergekit YAML configuration says (all of mergekit's methods).
    Merge(merge::MergeArgs),
    /// Score a checkpoint on a JSONL task file.
    Eval(eval::EvalArgs),
    /// Print a conversation rendered with a checkpoint's chat template, exactly.
    Prompt(prompt::PromptArgs),
    /// Score given completions on a JSONL task file, with no model (programs run sandboxed).
    Score(score::ScoreArgs),
    /// Serve a checkpoint behind an OpenAI-compatible HTTP API (continuous batching).
    Serve(serve::ServeArgs),
    /// Export a run's final model or an archive elite as a Hugging Face checkpoint.
    Export(export::ExportArgs),
    /// Rebuild a run's plots and report.html, or list an archive's best elites.
    Report(report::ReportArgs),
    /// Evolve multi-skill models (CycleQD); without --config, the built-in synthetic demo.
    Run(run::RunArgs),
    /// Build the synthetic demo: a tiny base, skill experts, task files and a run config.
    Synth(synth::SynthArgs),
    /// Serve a run's children from a broker (`run --broker`) on this node's device.
    Worker(worker::WorkerArgs),
    /// Measure the device's ceilings and time every hot operation against them.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use cycleqd_engine::backend::cpu::{Isa, Precision};
    let precision = cli
        .precision
        .or_else(|| std::env::var("CYCLEQD_PRECISION").ok())
        .unwrap_or_else(|| "auto".into());
    Precision::set(Precision::parse(&precision).ok_or_else(|| {
        anyhow::anyhow!("CYCLEQD_PRECISION={precision}: not one of auto, f32, bf16")
    })?);
    Isa::current()?; // a bad $CYCLEQD_CPU_ISA is one line here, not a surprise later
    #[cfg(target_arch = "x86_64")]
    if let Some(why) = cycleqd_engine::backend::cpu::amx::unused_reason() {
        eprintln!("note: this CPU has AMX-BF16, but the matmuls do not use it: {why}");
    }
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Worker(a) => worker::run(a),
        Command::Run(a) => run::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Prompt(a) => prompt::run(a),
        Command::Score(a) => score::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Export(a) => export::run(a),
        Command::Report(a) => report::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// The CUDA backend `--device` asks for: `None` for the CPU. Without `--device`, CUDA when a
/// device is present, else the CPU; an explicit `cuda` without one is an error.
fn open_device(
    choice: Option<cycleqd_engine::backend::cuda::DeviceChoice>,
) -> anyhow::Result<Option<cycleqd_engine::backend::cuda::CudaBackend>> {
    use anyhow::Context;
    use cycleqd_engine::backend::cuda::{cuda_unavailable_reason, CudaBackend, DeviceChoice};
    match choice {
        Some(DeviceChoice::Cpu) => Ok(None),
        None if cuda_unavailable_reason().is_some() => Ok(None),
        None => Ok(Some(
            CudaBackend::open(0).context("opening CUDA device 0 (use --device cpu to skip it)")?,
        )),
        Some(DeviceChoice::Cuda(n)) => {
            if let Some(why) = cuda_unavailable_reason() {
                anyhow::bail!("--device cuda: CUDA is unavailable: {why}");
            }
            Ok(Some(
                CudaBackend::open(n.unwrap_or(0)).context("opening the CUDA device")?,
            ))
        }
    }
}
