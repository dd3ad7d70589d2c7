//! `cycleqd-engine synth --out DIR`: the synthetic demo's base, experts, tasks and config.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use cycleqd_engine::synth::{synthesize, SynthOptions, SynthReport};

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output folder (must not exist or be empty; written atomically).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of skills (one expert and one task each).
    #[arg(long, default_value_t = 3)]
    skills: usize,
    /// Fitness prompts per subject (8 subjects a task; held-out prompts stay 8 per subject).
    #[arg(long, default_value_t = 12)]
    fitness_per_subject: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: SynthArgs) -> anyhow::Result<ExitCode> {
    let opts = SynthOptions {
        seed: a.seed,
        skills: a.skills,
        fitness_per_subject: a.fitness_per_subject,
        ..SynthOptions::default()
    };
    let report = synthesize(&a.out, &opts).with_context(|| format!("synth {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The measured scores and the demo's requirements, as a table.
pub fn print_report(r: &SynthReport) {
    println!("synthetic demo in {}", r.out.display());
    let head: Vec<String> = r.skills.iter().map(|s| format!("{s:>15}")).collect();
    println!("{:<16}{}   (fitness / held-out)", "model", head.join(""));
    for m in &r.scores {
        let cells: Vec<String> = m
            .fitness
            .iter()
            .zip(&m.heldout)
            .map(|(f, h)| format!("{:>15}", format!("{f:.2} / {h:.2}")))
            .collect();
        println!("{:<16}{}", m.model, cells.join(""));
    }
    for (what, ok) in &r.requirements {
        println!("  [{}] {what}", if *ok { "ok" } else { "NOT MET" });
    }
}
