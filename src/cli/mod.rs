//! Subcommands: argument parsing (clap derive) and dispatch. Each subcommand lives in its own
//! module and returns `anyhow::Result` with context on every file and device call.

mod eval;
mod export;
mod generate;
mod inspect;
mod merge;
mod run;
mod synth;

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
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a continuation of a prompt with a Hugging Face Llama checkpoint.
    Generate(generate::GenerateArgs),
    /// Summarise a checkpoint directory and report any problem found.
    Inspect(inspect::InspectArgs),
    /// Merge models as a mergekit YAML configuration says (linear, task_arithmetic, ties, slerp).
    Merge(merge::MergeArgs),
    /// Score a checkpoint on a JSONL task file.
    Eval(eval::EvalArgs),
    /// Export a run's final model or an archive elite as a Hugging Face checkpoint.
    Export(export::ExportArgs),
    /// Evolve multi-skill models (CycleQD); without --config, the built-in synthetic demo.
    Run(run::RunArgs),
    /// Build the synthetic demo: a tiny base, skill experts, task files and a run config.
    Synth(synth::SynthArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Run(a) => run::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Export(a) => export::run(a),
    }
}
