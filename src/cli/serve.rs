//! `cycleqd-engine serve --model DIR`: an OpenAI-compatible server for a checkpoint
//! (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`), with continuous
//! batching over the slot KV cache. Stops on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::DeviceChoice;
use cycleqd_engine::backend::Backend;
use cycleqd_engine::llama::LlamaModel;
use cycleqd_engine::model::{ModelStore, Tokenizer};
use cycleqd_engine::run::Stop;
use cycleqd_engine::serve::{serve_model, ServeOptions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json; a chat template for
    /// /v1/chat/completions).
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: a free one, printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Positions per sequence (default: the model's max_position_embeddings).
    #[arg(long)]
    max_context: Option<usize>,
    /// Requests that may wait for a slot; more get HTTP 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long)]
    api_key: Option<String>,
    /// The model's name in the API (default: the folder's name).
    #[arg(long)]
    model_name: Option<String>,
}

fn serve_on<B: Backend>(backend: &B, a: &ServeArgs, opts: &ServeOptions) -> anyhow::Result<()>
where
    B::Buf: Default,
{
    let store = ModelStore::open_llama(&a.model)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let chat = tok.chat_template()?.cloned();
    let model = LlamaModel::load(backend, &store).context("loading weights")?;
    let stop = Stop::on_signals();
    serve_model(backend, &model, &tok, chat, opts, |url| {
        eprintln!("serving {} at {url} (Ctrl-C stops)", opts.model_name);
        while stop.requests() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    })?;
    Ok(())
}

pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let name = a.model_name.clone().unwrap_or_else(|| {
        std::path::absolute(&a.model)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let opts = ServeOptions {
        host: a.host.clone(),
        port: a.port,
        max_batch: a.max_batch,
        max_context: a.max_context,
        max_queue: a.max_queue,
        api_key: a.api_key.clone(),
        model_name: name,
    };
    match super::open_device(a.device)? {
        Some(gpu) => serve_on(&gpu, &a, &opts),
        None => serve_on(&CpuBackend, &a, &opts),
    }
    .with_context(|| format!("serve {}", a.model.display()))?;
    Ok(ExitCode::SUCCESS)
}
