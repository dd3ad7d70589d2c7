//! Batched generation and scoring on top of the forward pass.
//!
//! All prompts are prefilled in one ragged batch, then every unfinished sequence advances one
//! token per step, so evaluating hundreds of prompts costs one weight read per step rather than
//! one per prompt.

use crate::backend::Backend;
use crate::error::{Error, Result};

use super::model::{LlamaModel, Step};

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was produced (it is included in `new_ids`).
    Eos,
    /// `max_new_tokens` were produced.
    Length,
    /// The model's `max_position_embeddings` was reached.
    ContextFull,
}

/// Temperature / nucleus sampling; greedy when absent.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (the config's `eos_token_id`s by default).
    pub eos: Vec<u32>,
    pub sampling: Option<Sampling>,
}

/// One sequence's continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub new_ids: Vec<u32>,
    /// Natural-log probability of each new token under the model (before temperature).
    pub logprobs: Vec<f32>,
    pub stop: StopReason,
}

/// Generates continuations of `prompts` (token ids, BOS included).
pub fn generate<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>>
where
    B::Buf: Default,
{
    let max_pos = model.config.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::invalid(format!("prompt {i} is empty")));
        }
        if p.len() > max_pos {
            return Err(Error::invalid(format!(
                "prompt {i} has {} tokens, more than max_position_embeddings ({max_pos})",
                p.len()
            )));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_seq = longest
        .saturating_add(opts.max_new_tokens)
        .min(max_pos)
        .max(1);
    let mut cache = model.new_cache(backend, prompts.len(), max_seq)?;
    let mut state = model.new_state();
    let mut logits = Vec::new();
    let vocab = model.config.vocab_size;
    let mut rng = opts.sampling.map(|s| SplitMix64(s.seed));

    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            new_ids: vec![],
            logprobs: vec![],
            stop: StopReason::Length,
        })
        .collect();
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }

    let mut step = Step::default();
    for (slot, p) in prompts.iter().enumerate() {
        for (pos, &t) in p.iter().enumerate() {
            step.push(t, slot, pos, pos + 1 == p.len());
        }
    }
    loop {
        model.forward(backend, &step, &mut cache, &mut state, &mut logits)?;
        check_finite_logits(&logits, vocab)?;
        let mut next = Step::default();
        let mut still = Vec::with_capacity(active.len());
        for (row, &slot) in active.iter().enumerate() {
            let l = &logits[row * vocab..(row + 1) * vocab];
            let id = match (&mut rng, opts.sampling) {
                (Some(rng), Some(s)) => sample(l, s, rng),
                _ => argmax(l),
            };
            let g = &mut out[slot];
            g.new_ids.push(id);
            g.logprobs.push(log_softmax_at(l, id as usize));
            let pos = prompts[slot].len() + g.new_ids.len() - 1;
            if opts.eos.contains(&id) {
                g.stop = StopReason::Eos;
            } else if g.new_ids.len() >= opts.max_new_tokens {
                g.stop = StopReason::Length;
            } else if pos >= max_pos || pos >= max_seq {
                g.stop = StopReason::ContextFull;
            } else {
                next.push(id, slot, pos, true);
                still.push(slot);
            }
        }
        if still.is_empty() {
            return Ok(out);
        }
        active = still;
        step = next;
    }
}

/// Log-probabilities of each continuation token given its prompt: for every `(prompt,
/// continuation)` pair, `log p(continuation[j] | prompt, continuation[..j])`.
pub fn score_continuations<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    pairs: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<Vec<f32>>>
where
    B::Buf: Default,
{
    let max_pos = model.config.max_position_embeddings;
    let mut step = Step::default();
    let mut longest = 1;
    for (slot, (prompt, cont)) in pairs.iter().enumerate() {
        let len = prompt.len() + cont.len();
        if prompt.is_empty() {
            return Err(Error::invalid(format!(
                "scoring pair {slot} has an empty prompt"
            )));
        }
        if len > max_pos {
            return Err(Error::invalid(format!(
                "scoring pair {slot} has {len} tokens, more than max_position_embeddings ({max_pos})"
            )));
        }
        longest = longest.max(len);
        for (pos, &t) in prompt.iter().chain(cont).enumerate() {
            // The logits at position p predict token p + 1: keep those that predict the continuation.
            let wanted = pos + 1 >= prompt.len() && pos + 1 < len;
            step.push(t, slot, pos, wanted);
        }
    }
    let mut cache = model.new_cache(backend, pairs.len(), longest)?;
    let mut state = model.new_state();
    let mut logits = Vec::new();
    model.forward(backend, &step, &mut cache, &mut state, &mut logits)?;
    let vocab = model.config.vocab_size;
    check_finite_logits(&logits, vocab)?;
    let mut row = 0;
    Ok(pairs
        .iter()
        .map(|(_, cont)| {
            cont.iter()
                .map(|&t| {
                    let lp = log_softmax_at(&logits[row * vocab..(row + 1) * vocab], t as usize);
                    row += 1;
                    lp
                })
                .collect()
        })
        .collect())
}

/// Refuses logits holding NaN or Inf: a greedy token or a log-probability read from them would
/// be meaningless, and a score built on it silently wrong.
fn check_finite_logits(logits: &[f32], vocab: usize) -> Result<()> {
    match logits.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFiniteOutput(format!(
            "the model's logits hold {} (row {}, token {}): its weights are not finite or overflow",
            logits[i],
            i / vocab.max(1),
            i % vocab.max(1)
        ))),
    }
}

/// The index of the largest logit, the first on ties; NaN counts as the largest value (torch's
/// and numpy's rule, which the GPU's `argmax_rows` follows too).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        let b = logits[best];
        if !b.is_nan() && (v.is_nan() || v > b) {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(logits)[i]`, computed stably in f64.
pub fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    (logits[i] as f64 - max - sum.ln()) as f32
}

fn sample(logits: &[f32], s: Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, (((v - max) / s.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= s.top_p as f64 {
            break;
        }
    }
    let kept = &probs[..kept];
    let kept_total: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * kept_total;
    for p in kept {
        u -= p.1;
        if u <= 0.0 {
            return p.0;
        }
    }
    kept[kept.len() - 1].0
}

/// A tiny seeded generator for sampling (SplitMix64): reproducible, no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_definition() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        for i in 0..3 {
            let want = ((l[i] as f64).exp() / z).ln() as f32;
            assert!((log_softmax_at(&l, i) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn argmax_takes_first_of_ties_and_nan_as_the_largest() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(argmax(&[0.0, f32::NAN, 3.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, 3.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn sampling_respects_top_p_and_seed() {
        let logits = [10.0f32, 0.0, 0.0, 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
        };
        let mut rng = SplitMix64(s.seed);
        // The first token holds > 99.9% of the mass: top_p = 0.5 keeps only it.
        assert!((0..100).all(|_| sample(&logits, s, &mut rng) == 0));
        let flat = [0.0f32; 4];
        let draws = |seed| {
            let mut r = SplitMix64(seed);
            (0..20)
                .map(|_| {
                    sample(
                        &flat,
                        Sampling {
                            seed,
                            top_p: 1.0,
                            ..s
                        },
                        &mut r,
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_ne!(draws(5), draws(6), "seeds give different streams");
        // Flat logits: each of the 4 tokens drawn a quarter of the time (within 5σ).
        let mut r = SplitMix64(11);
        let mut counts = [0usize; 4];
        let n = 4000;
        for _ in 0..n {
            counts[sample(
                &flat,
                Sampling {
                    seed: 11,
                    top_p: 1.0,
                    ..s
                },
                &mut r,
            ) as usize] += 1;
        }
        let (mean, sd) = (n as f64 / 4.0, (n as f64 * 0.25 * 0.75).sqrt());
        for c in counts {
            assert!((c as f64 - mean).abs() < 5.0 * sd, "{counts:?}");
        }
    }
}
