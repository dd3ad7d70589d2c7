//! The OpenAI endpoint's throughput: completion tokens per second with 1, 16 and 64 clients
//! each sending one greedy request of a fixed length at once, against the same prompts
//! through `generate` in one batch (the ceiling continuous batching can reach: the same
//! forward passes with no HTTP, no admission and no per-token text).

use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::{on_compute_threads, Backend};
use crate::error::{Error, Result};
use crate::llama::{generate, GenerateOptions, LlamaModel};
use crate::model::Tokenizer;
use crate::serve::{serve_model, ServeOptions};
use crate::synth::hash_uniform;

/// What each client asks for.
#[derive(Clone, Copy, Debug)]
pub struct ServeWorkload {
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// Completion tokens per request (stop tokens ignored, so every request has them all).
    pub new_tokens: usize,
    /// Timed rounds per measurement; the median is kept.
    pub rounds: usize,
}

/// `n` distinct prompts of `len` ids (after id 0), none of them a special token (ids 0–2).
fn prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let mut p = vec![0u32];
            p.extend((1..len).map(|j| {
                let u = hash_uniform(seed + i as u64, j as u64) as f64;
                3 + ((u * (vocab - 3) as f64) as u32).min(vocab as u32 - 4)
            }));
            p
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One client's request: the completion's text, or why it failed.
fn complete(
    base_url: &str,
    prompt: &[u32],
    new_tokens: usize,
) -> std::result::Result<String, String> {
    let body = json!({
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
    .to_string();
    let mut r = ureq::post(format!("{base_url}/completions"))
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| e.to_string())?;
    let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    let got = v["usage"]["completion_tokens"].as_u64();
    if got != Some(new_tokens as u64) {
        return Err(format!("{got:?} completion tokens, not {new_tokens}"));
    }
    v["choices"][0]["text"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no text in {text}"))
}

/// Measures `model` at each number of concurrent clients: tokens per second through the
/// server and through `generate`, and whether the two gave the same text.
pub fn measure<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    tokenizer: &Tokenizer,
    clients: &[usize],
    w: ServeWorkload,
) -> Result<Vec<Value>>
where
    B::Buf: Default,
{
    let vocab = model.config.vocab_size;
    let context = w.prompt_tokens + w.new_tokens;
    if context > model.config.max_position_embeddings || w.rounds == 0 {
        return Err(Error::invalid(format!(
            "{} + {} tokens do not fit the model's {} positions",
            w.prompt_tokens, w.new_tokens, model.config.max_position_embeddings
        )));
    }
    let opts = GenerateOptions {
        max_new_tokens: w.new_tokens,
        eos: vec![],
        sampling: None,
        per_prompt: vec![],
    };
    let max_clients = clients.iter().copied().max().unwrap_or(1).max(1);
    // The batched ceiling, and the text the server must give.
    let mut batched = vec![];
    for &c in clients {
        let ps = prompts(c, w.prompt_tokens, vocab, 17);
        // Where the server's engine runs its steps too.
        let batch =
            |ps: &[Vec<u32>]| on_compute_threads::<B, _>(|| generate(model, backend, ps, &opts));
        batch(&ps[..1])?; // warm-up
        let mut rates = vec![];
        let mut texts = vec![];
        for _ in 0..w.rounds {
            let t = Instant::now();
            let gens = batch(&ps)?;
            rates.push((c * w.new_tokens) as f64 / t.elapsed().as_secs_f64());
            texts = gens
                .iter()
                .map(|g| tokenizer.decode(&g.new_ids))
                .collect::<Result<Vec<_>>>()?;
        }
        batched.push((ps, median(rates), texts));
    }
    let serve_opts = ServeOptions {
        max_batch: max_clients,
        max_context: Some(context),
        max_queue: 4 * max_clients,
        ..ServeOptions::default()
    };
    let served = serve_model(backend, model, tokenizer, None, &serve_opts, |url| {
        let mut out = vec![];
        for (ps, _, _) in &batched {
            complete(url, &ps[0], w.new_tokens)?; // warm-up
            let mut rates = vec![];
            let mut texts = vec![];
            for _ in 0..w.rounds {
                let t = Instant::now();
                let got: Vec<std::result::Result<String, String>> = std::thread::scope(|s| {
                    let hs: Vec<_> = ps
                        .iter()
                        .map(|p| s.spawn(move || complete(url, p, w.new_tokens)))
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into())))
                        .collect()
                });
                rates.push((ps.len() * w.new_tokens) as f64 / t.elapsed().as_secs_f64());
                texts = got
                    .into_iter()
                    .collect::<std::result::Result<Vec<_>, _>>()?;
            }
            out.push((median(rates), texts));
        }
        Ok::<_, String>(out)
    })?
    .map_err(|e| Error::invalid(format!("a benchmark request failed: {e}")))?;
    Ok(clients
        .iter()
        .zip(batched.iter().zip(served))
        .map(|(&c, ((_, gen_rate, gen_texts), (srv_rate, srv_texts)))| {
            json!({
                "clients": c,
                "prompt_tokens": w.prompt_tokens,
                "new_tokens": w.new_tokens,
                "generate_tokens_per_s": gen_rate,
                "serve_tokens_per_s": srv_rate,
                "fraction_of_batched": srv_rate / gen_rate,
                "same_text_as_generate": *gen_texts == srv_texts,
            })
        })
        .collect())
}
