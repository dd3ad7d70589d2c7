//! `cycleqd-engine inspect DIR`: what a checkpoint holds, and what is wrong with it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use cycleqd_engine::model::{ModelStore, RopeScaling, Tokenizer};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint directory.
    dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let store = ModelStore::open(&a.dir).context("inspect")?;
    let cfg = store.config();
    let mut problems = vec![];
    if let Err(e) = store.validate_llama() {
        problems.push(e.to_string());
    }
    if let Err(e) = store.check_finite() {
        problems.push(e.to_string());
    }
    match Tokenizer::from_dir(&a.dir) {
        Ok(t) if t.vocab_size() > cfg.vocab_size => problems.push(format!(
            "tokenizer has {} tokens but vocab_size is {}",
            t.vocab_size(),
            cfg.vocab_size
        )),
        Ok(_) => {}
        Err(e) => problems.push(e.to_string()),
    }
    let dtype_counts = store.dtype_counts();
    let stored: usize = dtype_counts.values().sum();
    let dtypes: Vec<String> = dtype_counts
        .iter()
        .map(|(d, n)| format!("{d}: {n}"))
        .collect();
    let shards: Vec<String> = store
        .shard_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let rope = match &cfg.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Linear { factor } => format!("linear ×{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!("llama3 ×{factor}"),
    };

    if a.json {
        let v = json!({
            "dir": a.dir,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": rope,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "config_dtype": cfg.dtype.map(|d| d.torch_name()),
            "parameters_config": cfg.num_parameters(),
            "parameters_stored": stored,
            "dtypes": dtype_counts.iter().map(|(d, n)| (d.torch_name(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
            "shards": shards,
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", a.dir.display());
        println!(
            "  llama: {} layers, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        );
        println!(
            "  vocab {}, max positions {}, rope_theta {}, rope scaling {rope}, tied embeddings {}",
            cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta, cfg.tie_word_embeddings
        );
        println!(
            "  parameters: {} stored, {} implied by config.json",
            stored,
            cfg.num_parameters()
        );
        println!("  dtypes: {}", dtypes.join(", "));
        println!("  shards: {}", shards.join(", "));
        if problems.is_empty() {
            println!("  problems: none");
        } else {
            for p in &problems {
                println!("  problem: {p}");
            }
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
