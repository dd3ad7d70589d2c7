//! The model behind an OpenAI-compatible endpoint: `cycleqd-engine serve`, and a run's child
//! served to an evaluator for the evaluator's lifetime (`serve = true`), with no checkpoint
//! written. The engine's loop runs on the calling thread, where the model is (a worker's child,
//! already on its device); the HTTP server runs on a small tokio runtime beside it.

pub mod engine;
pub mod http;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::llama::LlamaModel;
use crate::model::{ChatTemplate, Tokenizer};

pub use engine::{EngineLimits, Event, Finish, Load, Request};

/// How a model is served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to bind (loopback by default).
    pub host: String,
    /// 0: a free port.
    pub port: u16,
    pub max_batch: usize,
    /// Positions per sequence (default: the model's).
    pub max_context: Option<usize>,
    /// Requests waiting for a slot beyond which new ones get HTTP 429.
    pub max_queue: usize,
    pub api_key: Option<String>,
    /// The model's name in the API.
    pub model_name: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 0,
            max_batch: 64,
            max_context: None,
            max_queue: 256,
            api_key: None,
            model_name: "cycleqd".into(),
        }
    }
}

/// Serves `model` until `until` (given the server's base URL, `http://host:port/v1`) returns,
/// and returns what it returned. In-flight requests are cut when it returns.
pub fn serve_model<B: Backend, T: Send>(
    backend: &B,
    model: &LlamaModel<B>,
    tokenizer: &Tokenizer,
    chat: Option<ChatTemplate>,
    opts: &ServeOptions,
    until: impl FnOnce(&str) -> T + Send,
) -> Result<T>
where
    B::Buf: Default,
{
    let max_context = opts
        .max_context
        .unwrap_or(model.config.max_position_embeddings)
        .min(model.config.max_position_embeddings);
    let limits = EngineLimits {
        max_batch: opts.max_batch.max(1),
        max_context,
    };
    let addr = format!("{}:{}", opts.host, opts.port);
    let listener =
        TcpListener::bind(&addr).map_err(|e| Error::invalid(format!("binding {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::invalid(format!("binding {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::invalid(format!("binding {addr}: {e}")))?;
    let base_url = format!("http://{local}/v1");
    let (req_tx, req_rx) = std::sync::mpsc::channel();
    let load = Arc::new(Load::default());
    let state = Arc::new(http::ServerState {
        requests: std::sync::Mutex::new(req_tx),
        tokenizer: tokenizer.clone(),
        chat,
        model_name: opts.model_name.clone(),
        api_key: opts.api_key.clone(),
        max_queue: opts.max_queue,
        load: load.clone(),
        max_context,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let eos = model.config.stop_token_ids.clone();
    std::thread::scope(|s| -> Result<T> {
        let server = {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            s.spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| Error::invalid(format!("starting the HTTP runtime: {e}")))?;
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| Error::invalid(format!("serving: {e}")))?;
                    axum::serve(l, http::router(state))
                        .with_graceful_shutdown(async move { shutdown.notified().await })
                        .await
                        .map_err(|e| Error::invalid(format!("serving: {e}")))
                })
            })
        };
        let user = {
            let (stop, shutdown, url) = (stop.clone(), shutdown.clone(), base_url.clone());
            s.spawn(move || {
                let out = until(&url);
                stop.store(true, Ordering::SeqCst);
                shutdown.notify_one();
                out
            })
        };
        let engine = crate::backend::on_compute_threads::<B, _>(|| {
            engine::run_engine(
                model,
                backend,
                tokenizer,
                &eos,
                limits,
                req_rx,
                &load,
                &|| stop.load(Ordering::SeqCst),
            )
        });
        // The engine stops only when told: if it failed, stop the rest too.
        stop.store(true, Ordering::SeqCst);
        shutdown.notify_one();
        let out = user
            .join()
            .map_err(|_| Error::invalid("the served model's user panicked"))?;
        let served = server
            .join()
            .map_err(|_| Error::invalid("the HTTP server panicked"))?;
        engine?;
        served?;
        Ok(out)
    })
}
