//! The OpenAI-compatible HTTP side (axum on tokio): `/v1/completions`, `/v1/chat/completions`
//! (the checkpoint's chat template), `/v1/models`, `/health`; greedy or sampled, streaming by
//! server-sent events, usage counts, an optional API key. Requests go to the engine's loop
//! (continuous batching); bad input is a 4xx with OpenAI's error body, a full queue a 429.

// Handlers' helpers fail with the HTTP response itself, built once per refused request.
#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::engine::{Event, Finish, Load, Request};
use crate::llama::Sampling;
use crate::model::{ChatTemplate, Tokenizer};

/// What every handler shares.
pub struct ServerState {
    pub requests: std::sync::Mutex<std::sync::mpsc::Sender<Request>>,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    pub model_name: String,
    pub api_key: Option<String>,
    /// Requests waiting for a slot beyond which new ones get 429.
    pub max_queue: usize,
    pub load: Arc<Load>,
    pub max_context: usize,
    pub created: u64,
}

type Shared = Arc<ServerState>;

/// An OpenAI-style error response.
fn error(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
    param: Option<&str>,
) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "param": param, "code": Value::Null}});
    (status, Json(body)).into_response()
}

fn bad(message: impl Into<String>, param: Option<&str>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        param,
    )
}

/// The router of a server over `state`.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint",
                None,
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(
    State(st): State<Shared>,
    headers: HeaderMap,
    req: HttpRequest,
    next: Next,
) -> Response {
    if let Some(key) = &st.api_key {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) && req.uri().path() != "/health" {
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "a valid API key is required (Authorization: Bearer …)",
                None,
            );
        }
    }
    next.run(req).await
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(st): State<Shared>) -> Response {
    Json(
        json!({"object": "list", "data": [{"id": st.model_name, "object": "model",
        "created": st.created, "owned_by": "cycleqd-engine"}]}),
    )
    .into_response()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    /// Several tokenised prompts (lm-eval's `local-completions` sends these).
    IdBatches(Vec<Vec<u32>>),
}

const MAX_STOP_STRINGS: usize = 16;

/// The fields both endpoints share, checked.
struct Generation {
    max_tokens: usize,
    sampling: Option<Sampling>,
    stop: Vec<String>,
    stream: bool,
    top_logprobs: usize,
    /// vLLM's extension: generate past the stop tokens (benchmarks of fixed lengths).
    ignore_eos: bool,
}

#[allow(clippy::too_many_arguments)]
fn generation(
    st: &ServerState,
    model: &Option<String>,
    max_tokens: Option<usize>,
    default_max: usize,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<usize>,
    stop: Option<StopInput>,
    seed: Option<u64>,
    stream: Option<bool>,
    top_logprobs: usize,
) -> Result<Generation, Response> {
    if let Some(m) = model {
        if m != &st.model_name {
            return Err(error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model `{m}` does not exist (this server serves `{}`)",
                    st.model_name
                ),
                Some("model"),
            ));
        }
    }
    if n.is_some_and(|n| n != 1) {
        return Err(bad("only n = 1 is supported", Some("n")));
    }
    let max_tokens = max_tokens.unwrap_or(default_max);
    if max_tokens == 0 {
        return Err(bad("max_tokens must be at least 1", Some("max_tokens")));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(bad(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("top_p must be in (0, 1]", Some("top_p")));
    }
    if top_logprobs > 20 {
        return Err(bad(
            "at most 20 log-probabilities per token",
            Some("logprobs"),
        ));
    }
    let stop = match stop {
        None => vec![],
        Some(StopInput::One(s)) => vec![s],
        Some(StopInput::Many(v)) => v,
    };
    // OpenAI takes 4, vLLM any number; harnesses add the EOS text to a task's own list.
    if stop.len() > MAX_STOP_STRINGS {
        return Err(bad(
            format!("at most {MAX_STOP_STRINGS} stop sequences"),
            Some("stop"),
        ));
    }
    Ok(Generation {
        max_tokens,
        sampling: (temperature > 0.0).then(|| Sampling {
            temperature,
            top_p,
            seed: seed.unwrap_or_else(rand::random),
        }),
        stop,
        stream: stream.unwrap_or(false),
        top_logprobs,
        ignore_eos: false,
    })
}

/// Queues a request for `prompt`, checking its length and the queue.
fn submit(
    st: &ServerState,
    prompt: Vec<u32>,
    g: &Generation,
) -> Result<UnboundedReceiver<Event>, Response> {
    if prompt.is_empty() {
        return Err(bad("the prompt is empty", Some("prompt")));
    }
    if prompt.len() + g.max_tokens > st.max_context {
        return Err(bad(
            format!(
                "this model's maximum context length is {} tokens; the prompt has {} and max_tokens is {}",
                st.max_context,
                prompt.len(),
                g.max_tokens
            ),
            Some("max_tokens"),
        ));
    }
    if st.load.waiting.load(Ordering::SeqCst) >= st.max_queue {
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is busy ({} requests waiting); retry later",
                st.max_queue
            ),
            None,
        ));
    }
    let (tx, rx) = unbounded_channel();
    st.load.waiting.fetch_add(1, Ordering::SeqCst);
    let sent = st
        .requests
        .lock()
        .map_err(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the engine is gone",
                None,
            )
        })?
        .send(Request {
            prompt,
            max_tokens: g.max_tokens,
            sampling: g.sampling,
            stop: g.stop.clone(),
            top_logprobs: g.top_logprobs,
            ignore_eos: g.ignore_eos,
            stream: g.stream,
            events: tx,
        });
    if sent.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine has stopped",
            None,
        ));
    }
    Ok(rx)
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let param = msg.split('`').nth(1).map(String::from);
        bad(format!("invalid request body: {msg}"), param.as_deref())
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// A token, its log-probability and the most likely alternatives with theirs.
type TokenLogprobs = (u32, f32, Vec<(u32, f32)>);

/// A whole generation, collected: text, token logprobs, finish, counts.
struct Collected {
    text: String,
    tokens: Vec<TokenLogprobs>,
    finish: Finish,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, Response> {
    let mut c = Collected {
        text: String::new(),
        tokens: vec![],
        finish: Finish::Length,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                id,
                text,
                logprob,
                top,
            } => {
                c.text.push_str(&text);
                c.tokens.push((id, logprob, top));
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                c.finish = finish;
                c.prompt_tokens = prompt_tokens;
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
            Event::Failed(e) => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    e,
                    None,
                ))
            }
        }
    }
    Err(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the engine stopped",
        None,
    ))
}

fn token_text(st: &ServerState, id: u32) -> String {
    st.tokenizer.decode(&[id]).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: Option<String>,
    prompt: PromptInput,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<usize>,
    stream: Option<bool>,
    stop: Option<StopInput>,
    logprobs: Option<usize>,
    echo: Option<bool>,
    seed: Option<u64>,
    user: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    best_of: Option<usize>,
    stream_options: Option<Value>,
    ignore_eos: Option<bool>,
}

async fn completions(State(st): State<Shared>, body: Bytes) -> Response {
    let r: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let _ = (&r.user, &r.stream_options);
    if r.echo == Some(true) {
        return bad("echo is not supported", Some("echo"));
    }
    if r.presence_penalty.is_some_and(|p| p != 0.0) || r.frequency_penalty.is_some_and(|p| p != 0.0)
    {
        return bad(
            "presence and frequency penalties are not supported",
            Some("presence_penalty"),
        );
    }
    if r.best_of.is_some_and(|b| b != 1) {
        return bad("only best_of = 1 is supported", Some("best_of"));
    }
    let g = match generation(
        &st,
        &r.model,
        r.max_tokens,
        16,
        r.temperature,
        r.top_p,
        r.n,
        r.stop,
        r.seed,
        r.stream,
        r.logprobs.unwrap_or(0),
    ) {
        Ok(g) => Generation {
            ignore_eos: r.ignore_eos.unwrap_or(false),
            ..g
        },
        Err(e) => return e,
    };
    let prompts: Vec<Vec<u32>> = match r.prompt {
        PromptInput::Text(t) => match st.tokenizer.encode(&t) {
            Ok(ids) => vec![ids],
            Err(e) => return bad(e.to_string(), Some("prompt")),
        },
        PromptInput::Texts(ts) => {
            let mut out = vec![];
            for t in ts {
                match st.tokenizer.encode(&t) {
                    Ok(ids) => out.push(ids),
                    Err(e) => return bad(e.to_string(), Some("prompt")),
                }
            }
            out
        }
        PromptInput::Ids(ids) => vec![ids],
        PromptInput::IdBatches(batches) => batches,
    };
    let vocab = st.tokenizer.vocab_size().max(1);
    if let Some(bad_id) = prompts.iter().flatten().find(|&&i| i as usize >= vocab) {
        return bad(
            format!("token id {bad_id} is out of the vocabulary"),
            Some("prompt"),
        );
    }
    if prompts.is_empty() {
        return bad("no prompt", Some("prompt"));
    }
    let (id, created) = (request_id("cmpl"), now());
    if g.stream {
        if prompts.len() != 1 {
            return bad("streaming takes one prompt", Some("prompt"));
        }
        let rx = match submit(&st, prompts.into_iter().next().expect("one"), &g) {
            Ok(rx) => rx,
            Err(e) => return e,
        };
        let (model, st2) = (st.model_name.clone(), st.clone());
        let want_logprobs = g.top_logprobs > 0;
        let events = UnboundedReceiverStream::new(rx).filter_map(move |ev| match ev {
            Event::Token { id: tok, text, logprob, .. } => {
                if text.is_empty() && !want_logprobs {
                    return None;
                }
                let lp = want_logprobs.then(|| json!({"tokens": [token_text(&st2, tok)], "token_logprobs": [logprob]}));
                Some(json!({"id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": Value::Null}]}))
            }
            Event::Done { finish, .. } => Some(json!({"id": id, "object": "text_completion", "created": created,
                "model": model, "choices": [{"text": "", "index": 0, "logprobs": Value::Null, "finish_reason": finish}]})),
            Event::Failed(e) => Some(json!({"error": {"message": e, "type": "server_error"}})),
        });
        return sse(events);
    }
    let mut receivers = vec![];
    for p in prompts {
        match submit(&st, p, &g) {
            Ok(rx) => receivers.push(rx),
            Err(e) => return e,
        }
    }
    let (mut choices, mut prompt_tokens, mut completion_tokens) = (vec![], 0, 0);
    for (index, rx) in receivers.into_iter().enumerate() {
        let c = match collect(rx).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        prompt_tokens += c.prompt_tokens;
        completion_tokens += c.completion_tokens;
        let logprobs = (g.top_logprobs > 0).then(|| {
            json!({
                "tokens": c.tokens.iter().map(|t| token_text(&st, t.0)).collect::<Vec<_>>(),
                "token_logprobs": c.tokens.iter().map(|t| t.1).collect::<Vec<_>>(),
                "top_logprobs": c.tokens.iter().map(|t| t.2.iter().map(|(i, l)| (token_text(&st, *i), json!(*l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
            })
        });
        choices.push(json!({"text": c.text, "index": index, "logprobs": logprobs, "finish_reason": c.finish}));
    }
    Json(
        json!({"id": id, "object": "text_completion", "created": created, "model": st.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}),
    )
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: Option<String>,
    messages: Value,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<usize>,
    stream: Option<bool>,
    stop: Option<StopInput>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    seed: Option<u64>,
    user: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stream_options: Option<Value>,
    ignore_eos: Option<bool>,
}

async fn chat_completions(State(st): State<Shared>, body: Bytes) -> Response {
    let r: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let _ = (&r.user, &r.stream_options);
    if r.presence_penalty.is_some_and(|p| p != 0.0) || r.frequency_penalty.is_some_and(|p| p != 0.0)
    {
        return bad(
            "presence and frequency penalties are not supported",
            Some("presence_penalty"),
        );
    }
    let Some(template) = &st.chat else {
        return bad(
            "this model has no chat template: use /v1/completions",
            Some("messages"),
        );
    };
    let messages = match crate::model::chat::messages_from_json(&r.messages.to_string()) {
        Ok(m) => m,
        Err(e) => return bad(e, Some("messages")),
    };
    let text = match template.render(&messages, true) {
        Ok(t) => t,
        Err(e) => return bad(e.to_string(), Some("messages")),
    };
    let prompt = match st.tokenizer.encode_plain(&text) {
        Ok(p) => p,
        Err(e) => return bad(e.to_string(), Some("messages")),
    };
    let top = if r.logprobs == Some(true) {
        r.top_logprobs.unwrap_or(0).max(1)
    } else {
        0
    };
    let g = match generation(
        &st,
        &r.model,
        r.max_completion_tokens.or(r.max_tokens),
        st.max_context.saturating_sub(prompt.len()).clamp(1, 4096),
        r.temperature,
        r.top_p,
        r.n,
        r.stop,
        r.seed,
        r.stream,
        top,
    ) {
        Ok(g) => Generation {
            ignore_eos: r.ignore_eos.unwrap_or(false),
            ..g
        },
        Err(e) => return e,
    };
    let rx = match submit(&st, prompt, &g) {
        Ok(rx) => rx,
        Err(e) => return e,
    };
    let (id, created) = (request_id("chatcmpl"), now());
    if g.stream {
        let model = st.model_name.clone();
        let first = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null}]});
        let (id2, model2) = (id.clone(), model.clone());
        let rest = UnboundedReceiverStream::new(rx).filter_map(move |ev| match ev {
            Event::Token { text, .. } if text.is_empty() => None,
            Event::Token { text, .. } => Some(json!({"id": id2, "object": "chat.completion.chunk", "created": created,
                "model": model2, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": Value::Null, "finish_reason": Value::Null}]})),
            Event::Done { finish, .. } => Some(json!({"id": id2, "object": "chat.completion.chunk", "created": created,
                "model": model2, "choices": [{"index": 0, "delta": {}, "logprobs": Value::Null, "finish_reason": finish}]})),
            Event::Failed(e) => Some(json!({"error": {"message": e, "type": "server_error"}})),
        });
        return sse(tokio_stream::once(first).chain(rest));
    }
    let c = match collect(rx).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let logprobs = (top > 0).then(|| {
        json!({"content": c.tokens.iter().map(|t| json!({
            "token": token_text(&st, t.0), "logprob": t.1,
            "top_logprobs": t.2.iter().map(|(i, l)| json!({"token": token_text(&st, *i), "logprob": l})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    });
    Json(json!({"id": id, "object": "chat.completion", "created": created, "model": st.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs, "finish_reason": c.finish}],
        "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                  "total_tokens": c.prompt_tokens + c.completion_tokens}}))
    .into_response()
}

/// Server-sent events: one `data:` per chunk, then `data: [DONE]`. Dropping the stream (the
/// client went away) drops the engine's receiver, which frees the request's slot.
fn sse(chunks: impl tokio_stream::Stream<Item = Value> + Send + 'static) -> Response {
    let events = chunks
        .map(|v| Ok::<_, std::convert::Infallible>(SseEvent::default().data(v.to_string())))
        .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
