//! `cycleqd-engine generate`: one prompt through the CPU Llama path.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::DeviceChoice;
use cycleqd_engine::backend::Backend;
use cycleqd_engine::llama::{
    generate, GenerateOptions, Generation, LlamaModel, Sampling, StopReason,
};
use cycleqd_engine::model::{ModelStore, Tokenizer};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Prompt text, tokenised with the model's tokenizer (BOS added by its post-processor).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated (used as given: include BOS yourself).
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Print one JSON object: {"prompt_ids", "new_ids", "logprobs", "text", "stop"}.
    #[arg(long)]
    json: bool,
    /// Sample with this temperature instead of greedy decoding (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (with --temperature).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at the config's eos_token_id.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    prompt_ids: &'a [u32],
    new_ids: &'a [u32],
    logprobs: &'a [f32],
    text: String,
    stop: StopReason,
}

fn generate_on<B: Backend>(
    backend: &B,
    store: &ModelStore,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> anyhow::Result<Generation>
where
    B::Buf: Default,
{
    let model = LlamaModel::load(backend, store).context("generate: loading weights")?;
    Ok(generate(
        &model,
        backend,
        std::slice::from_ref(&prompt.to_vec()),
        opts,
    )
    .context("generate")?
    .pop()
    .expect("one prompt in, one generation out"))
}

pub fn run(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        bail!(
            "--temperature must be a finite number ≥ 0, got {}",
            a.temperature
        );
    }
    let store = ModelStore::open_llama(&a.model).context("generate")?;
    let tokenizer = Tokenizer::from_dir(&a.model).context("generate")?;
    let cfg = store.config();
    let prompt_ids = match (&a.prompt, &a.ids) {
        (Some(text), _) => tokenizer.encode(text).context("generate: --prompt")?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires --prompt or --ids"),
    };
    if prompt_ids.is_empty() {
        bail!("generate: the prompt has no tokens");
    }
    if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!(
            "generate: token id {bad} is out of range for {} (vocab_size {})",
            a.model.join("config.json").display(),
            cfg.vocab_size
        );
    }
    if prompt_ids.len() > cfg.max_position_embeddings {
        bail!(
            "generate: the prompt has {} tokens, more than max_position_embeddings ({}) of {}",
            prompt_ids.len(),
            cfg.max_position_embeddings,
            a.model.join("config.json").display()
        );
    }

    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        eos: if a.ignore_eos {
            vec![]
        } else {
            cfg.stop_token_ids.clone()
        },
        sampling: (a.temperature > 0.0).then_some(Sampling {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }),
        per_prompt: vec![],
    };
    let out = match super::open_device(a.device)? {
        Some(gpu) => generate_on(&gpu, &store, &prompt_ids, &opts)?,
        None => generate_on(&CpuBackend, &store, &prompt_ids, &opts)?,
    };
    if out.stop == StopReason::ContextFull {
        eprintln!(
            "note: stopped after {} new tokens at max_position_embeddings ({})",
            out.new_ids.len(),
            cfg.max_position_embeddings
        );
    }
    let text = tokenizer
        .decode(&out.new_ids)
        .context("generate: decoding")?;
    if a.json {
        let o = Output {
            prompt_ids: &prompt_ids,
            new_ids: &out.new_ids,
            logprobs: &out.logprobs,
            text,
            stop: out.stop,
        };
        println!("{}", serde_json::to_string(&o)?);
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}
