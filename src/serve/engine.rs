//! Continuous batching over the slot KV cache: one loop owns the model, and every step runs
//! the prompts of newly admitted requests and the next token of every running one in a single
//! ragged forward pass. A request takes a free slot when one is (else it waits, in order);
//! it leaves at its stop token, stop string, token limit or the end of the context, or as
//! soon as its client is gone (its events can no longer be delivered), and its slot serves
//! the next request at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::Backend;
use crate::error::Result;
use crate::llama::generate::{sample, SplitMix64};
use crate::llama::logits::{argmax, log_softmax_at};
use crate::llama::{LlamaModel, Sampling, Step};
use crate::model::Tokenizer;

/// Why a generation ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// A stop token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context.
    Length,
}

/// What a request hears from the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A new token: its id, the text it adds (empty while a character or a possible stop
    /// string is incomplete), its log-probability and the most likely alternatives.
    Token {
        id: u32,
        text: String,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    /// The end, with the token counts.
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request could not run (the engine failed).
    Failed(String),
}

/// A generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Option<Sampling>,
    pub stop: Vec<String>,
    /// How many alternatives to report with each token (0: none).
    pub top_logprobs: usize,
    /// Generate past the model's stop tokens (to `max_tokens`, a stop string or the context).
    pub ignore_eos: bool,
    /// Tokens as they come; otherwise every event at the end, which wakes the request's
    /// task once rather than at every step.
    pub stream: bool,
    pub events: UnboundedSender<Event>,
}

/// Limits of an engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    /// Sequences generated at once (KV cache slots).
    pub max_batch: usize,
    /// Positions per sequence (prompt and completion).
    pub max_context: usize,
}

/// Requests admitted or waiting, for the HTTP side's queue limit.
#[derive(Default)]
pub struct Load {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
}

struct Running {
    slot: usize,
    req: Request,
    ids: Vec<u32>,
    /// Text already sent.
    sent: usize,
    /// Next position to write.
    pos: usize,
    rng: Option<SplitMix64>,
    /// Events held for a request that does not stream.
    held: Vec<Event>,
}

/// Runs the engine until `requests` is closed (every sender dropped) and nothing is left, or
/// `stop` says so. `eos`: the model's stop tokens.
#[allow(clippy::too_many_arguments)]
pub fn run_engine<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    tokenizer: &Tokenizer,
    eos: &[u32],
    limits: EngineLimits,
    requests: Receiver<Request>,
    load: &Load,
    stop: &dyn Fn() -> bool,
) -> Result<()>
where
    B::Buf: Default,
{
    let mut cache = model.new_cache(backend, limits.max_batch, limits.max_context)?;
    let mut state = model.new_state();
    let mut logits = vec![];
    let vocab = model.config.vocab_size;
    let mut free: Vec<usize> = (0..limits.max_batch).rev().collect();
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut running: Vec<Running> = vec![];
    let mut open = true;
    loop {
        if stop() {
            return Ok(());
        }
        // New requests: all that are there, waiting when nothing runs.
        loop {
            let next = if running.is_empty() && waiting.is_empty() && open {
                match requests.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                match requests.try_recv() {
                    Ok(r) => Some(r),
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            };
            match next {
                Some(r) => waiting.push_back(r),
                None => break,
            }
        }
        if !open && running.is_empty() && waiting.is_empty() {
            return Ok(());
        }
        // Admit into free slots; the prompts go into this step.
        let mut step = Step::default();
        let mut order: Vec<usize> = vec![];
        while let (Some(_), Some(slot)) = (waiting.front(), free.last().copied()) {
            let req = waiting.pop_front().expect("checked");
            if req.events.is_closed() {
                continue;
            }
            free.pop();
            for (p, &t) in req.prompt.iter().enumerate() {
                step.push(t, slot, p, p + 1 == req.prompt.len());
            }
            let rng = req.sampling.map(|s| SplitMix64(s.seed));
            running.push(Running {
                slot,
                pos: req.prompt.len(),
                req,
                ids: vec![],
                sent: 0,
                rng,
                held: vec![],
            });
            order.push(running.len() - 1);
        }
        // Every running sequence that has a token: its last one.
        for (i, r) in running.iter().enumerate() {
            if let Some(&last) = r.ids.last() {
                step.push(last, r.slot, r.pos - 1, true);
                order.push(i);
            }
        }
        load.waiting.store(waiting.len(), Ordering::SeqCst);
        load.running.store(running.len(), Ordering::SeqCst);
        if step.is_empty() {
            continue;
        }
        // Logit rows come in push order: the admitted prompts first, then the running ones.
        if let Err(e) = model.forward(backend, &step, &mut cache, &mut state, &mut logits) {
            for r in running.drain(..) {
                let _ = r.req.events.send(Event::Failed(e.to_string()));
                free.push(r.slot);
            }
            continue;
        }
        let mut finished = vec![];
        for (row, &i) in order.iter().enumerate() {
            let r = &mut running[i];
            let l = &logits[row * vocab..(row + 1) * vocab];
            let id = match (&mut r.rng, r.req.sampling) {
                (Some(rng), Some(s)) => sample(l, s, rng),
                _ => argmax(l),
            };
            let logprob = log_softmax_at(l, id as usize);
            let top = top_k(l, r.req.top_logprobs);
            r.ids.push(id);
            r.pos += 1;
            let mut finish = None;
            // The text so far, without the stop token; a stop string ends it before the stop.
            let is_eos = !r.req.ignore_eos && eos.contains(&id);
            let shown = if is_eos {
                &r.ids[..r.ids.len() - 1]
            } else {
                &r.ids[..]
            };
            let mut text = tokenizer.decode(shown).unwrap_or_default();
            if let Some(cut) = r
                .req
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
                finish = Some(Finish::Stop);
            } else if is_eos {
                finish = Some(Finish::Stop);
            } else if r.ids.len() >= r.req.max_tokens || r.pos >= limits.max_context {
                finish = Some(Finish::Length);
            }
            // Hold back an incomplete character, and text that may be the start of a stop
            // string, until the next token decides.
            let safe = if finish.is_some() {
                text.len()
            } else {
                let mut end = text.len();
                if text.ends_with('\u{FFFD}') {
                    end = text.trim_end_matches('\u{FFFD}').len();
                }
                for s in &r.req.stop {
                    for k in (1..s.len()).rev() {
                        if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                            end = end.min(text.len() - k);
                            break;
                        }
                    }
                }
                end.max(r.sent)
            };
            let delta =
                if safe > r.sent && text.is_char_boundary(r.sent) && text.is_char_boundary(safe) {
                    text[r.sent..safe].to_string()
                } else {
                    String::new()
                };
            r.sent = r.sent.max(safe);
            let token = Event::Token {
                id,
                text: delta,
                logprob,
                top,
            };
            let alive = if r.req.stream {
                r.req.events.send(token).is_ok()
            } else {
                r.held.push(token);
                !r.req.events.is_closed()
            };
            match (finish, alive) {
                (_, false) => finished.push(i),
                (Some(f), true) => {
                    for e in r.held.drain(..) {
                        let _ = r.req.events.send(e);
                    }
                    let _ = r.req.events.send(Event::Done {
                        finish: f,
                        prompt_tokens: r.req.prompt.len(),
                        completion_tokens: r.ids.len(),
                    });
                    finished.push(i);
                }
                (None, true) => {}
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            free.push(running.swap_remove(i).slot);
        }
    }
}

/// The `k` most likely tokens with their log-probabilities.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return vec![];
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |a, b| {
        logits[*b as usize].total_cmp(&logits[*a as usize])
    });
    let mut top: Vec<u32> = idx[..k].to_vec();
    top.sort_by(|a, b| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    });
    top.into_iter()
        .map(|i| (i, log_softmax_at(logits, i as usize)))
        .collect()
}

/// The engine's side of a server: load counters shared with the HTTP side.
pub type SharedLoad = Arc<Load>;
