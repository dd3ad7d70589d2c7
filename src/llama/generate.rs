//! Batched generation and scoring on top of the forward pass.
//!
//! All prompts are prefilled in one ragged batch, then every unfinished sequence advances one
//! token per step, so evaluating hundreds of prompts costs one weight read per step rather than
//! one per prompt.

use rayon::prelude::*;

use crate::backend::Backend;
use crate::error::{Error, Result};

use super::logits::{argmax, first_non_finite, log_softmax_at};
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
    /// The caller's stop condition (a stop string) was met.
    StopString,
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
    /// For every prompt; prompt `i` samples from its own stream, seeded `seed + i·φ` (prompt 0
    /// with `seed` itself).
    pub sampling: Option<Sampling>,
    /// Per-prompt settings instead of the two above (empty: those for every prompt), so one
    /// batch can hold prompts of several tasks.
    pub per_prompt: Vec<PromptOptions>,
}

/// One prompt's generation settings.
#[derive(Clone, Copy, Debug)]
pub struct PromptOptions {
    pub max_new_tokens: usize,
    /// Its own seed: the same prompt and seed give the same sample in any batch.
    pub sampling: Option<Sampling>,
}

impl GenerateOptions {
    fn for_prompt(&self, i: usize) -> PromptOptions {
        match self.per_prompt.get(i) {
            Some(p) => *p,
            None => PromptOptions {
                max_new_tokens: self.max_new_tokens,
                sampling: self.sampling.map(|s| Sampling {
                    seed: s
                        .seed
                        .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    ..s
                }),
            },
        }
    }
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
    generate_until(model, backend, prompts, opts, &mut |_, _| false)
}

/// [`generate`], also ending prompt `i`'s sequence as soon as `stop(i, new_ids)` says so (a
/// stop string has appeared): a batch does not run on for sequences already answered.
pub fn generate_until<B: Backend>(
    model: &LlamaModel<B>,
    backend: &B,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Generation>>
where
    B::Buf: Default,
{
    if !opts.per_prompt.is_empty() && opts.per_prompt.len() != prompts.len() {
        return Err(Error::invalid(format!(
            "{} per-prompt options for {} prompts",
            opts.per_prompt.len(),
            prompts.len()
        )));
    }
    let per: Vec<PromptOptions> = (0..prompts.len()).map(|i| opts.for_prompt(i)).collect();
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
    let max_seq = prompts
        .iter()
        .zip(&per)
        .map(|(p, o)| p.len().saturating_add(o.max_new_tokens))
        .max()
        .unwrap_or(0)
        .min(max_pos)
        .max(1);
    let mut cache = model.new_cache(backend, prompts.len(), max_seq)?;
    let mut state = model.new_state();
    let mut logits = Vec::new();
    let vocab = model.config.vocab_size;
    let mut rngs: Vec<Option<SplitMix64>> = per
        .iter()
        .map(|o| o.sampling.map(|s| SplitMix64(s.seed)))
        .collect();

    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            new_ids: vec![],
            logprobs: vec![],
            stop: StopReason::Length,
        })
        .collect();
    let mut active: Vec<usize> = (0..prompts.len())
        .filter(|&i| per[i].max_new_tokens > 0)
        .collect();
    if active.is_empty() {
        return Ok(out);
    }

    let mut step = Step::default();
    for &slot in &active {
        let p = &prompts[slot];
        for (pos, &t) in p.iter().enumerate() {
            step.push(t, slot, pos, pos + 1 == p.len());
        }
    }
    loop {
        model.forward(backend, &step, &mut cache, &mut state, &mut logits)?;
        // Every row's token and log-probability at once (rows are independent; each row's
        // sampler is its sequence's own), then the sequences advance in row order.
        let mut row_rngs: Vec<Option<SplitMix64>> =
            active.iter().map(|&slot| rngs[slot].take()).collect();
        let picks: Vec<RowResult<(u32, f32)>> = logits
            .par_chunks(vocab)
            .zip(active.par_iter())
            .zip(row_rngs.par_iter_mut())
            .map(|((l, &slot), rng)| {
                finite_row(l)?;
                let id = match (rng, per[slot].sampling) {
                    (Some(rng), Some(s)) => sample(l, s, rng),
                    _ => argmax(l),
                };
                Ok((id, log_softmax_at(l, id as usize)))
            })
            .collect();
        for (&slot, rng) in active.iter().zip(row_rngs) {
            rngs[slot] = rng;
        }
        let picks = rows_or_error(picks, &logits, vocab)?;
        let mut next = Step::default();
        let mut still = Vec::with_capacity(active.len());
        for (&slot, (id, logprob)) in active.iter().zip(picks) {
            let g = &mut out[slot];
            g.new_ids.push(id);
            g.logprobs.push(logprob);
            let pos = prompts[slot].len() + g.new_ids.len() - 1;
            if opts.eos.contains(&id) {
                g.stop = StopReason::Eos;
            } else if stop(slot, &g.new_ids) {
                g.stop = StopReason::StopString;
            } else if g.new_ids.len() >= per[slot].max_new_tokens {
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
    // Row r's logits predict the r-th continuation token, in pair order.
    let targets: Vec<u32> = pairs.iter().flat_map(|(_, c)| c.iter().copied()).collect();
    let lps: Vec<RowResult<f32>> = logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(l, &t)| {
            finite_row(l)?;
            Ok(log_softmax_at(l, t as usize))
        })
        .collect();
    let mut lps = rows_or_error(lps, &logits, vocab)?.into_iter();
    Ok(pairs
        .iter()
        .map(|(_, cont)| lps.by_ref().take(cont.len()).collect())
        .collect())
}

/// A row's result, or the position of its first logit that is NaN or infinite.
type RowResult<T> = std::result::Result<T, usize>;

fn finite_row(row: &[f32]) -> RowResult<()> {
    first_non_finite(row).map_or(Ok(()), Err)
}

/// The rows' results in order, or an error for the first row holding NaN or Inf: a greedy
/// token or a log-probability read from it would be meaningless, and a score built on it
/// silently wrong.
fn rows_or_error<T>(rows: Vec<RowResult<T>>, logits: &[f32], vocab: usize) -> Result<Vec<T>> {
    rows.into_iter()
        .enumerate()
        .map(|(row, r)| {
            r.map_err(|token| {
                Error::NonFiniteOutput(format!(
                    "the model's logits hold {} (row {row}, token {token}): its weights are not \
                     finite or overflow",
                    logits[row * vocab + token]
                ))
            })
        })
        .collect()
}

pub(crate) fn sample(logits: &[f32], s: Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| (((v - max) / s.temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if s.top_p >= 1.0 {
        // The whole distribution: one draw by its cumulative sum, no sort.
        let mut u = rng.next_f64() * total;
        for (i, &w) in weights.iter().enumerate() {
            u -= w;
            if u <= 0.0 {
                return i as u32;
            }
        }
        return (weights.len() - 1) as u32;
    }
    // Nucleus: the smallest set of the most likely tokens (ties by id) whose mass reaches
    // top_p, found among the top m for growing m instead of sorting the whole vocabulary.
    let by_weight = |a: &u32, b: &u32| {
        weights[*b as usize]
            .total_cmp(&weights[*a as usize])
            .then(a.cmp(b))
    };
    let mut order: Vec<u32> = (0..weights.len() as u32).collect();
    let target = s.top_p as f64;
    let mut m = 64.min(order.len());
    let kept = loop {
        if m < order.len() {
            order.select_nth_unstable_by(m - 1, by_weight);
        }
        let top = &mut order[..m];
        top.sort_unstable_by(by_weight);
        let mut mass = 0.0;
        let mut kept = None;
        for (j, &i) in top.iter().enumerate() {
            mass += weights[i as usize] / total;
            if mass >= target {
                kept = Some(j + 1);
                break;
            }
        }
        match kept {
            Some(k) => break k,
            None if m == order.len() => break m,
            None => m = (m * 4).min(order.len()),
        }
    };
    let kept = &order[..kept];
    let kept_total: f64 = kept.iter().map(|&i| weights[i as usize]).sum();
    let mut u = rng.next_f64() * kept_total;
    for &i in kept {
        u -= weights[i as usize];
        if u <= 0.0 {
            return i;
        }
    }
    kept[kept.len() - 1]
}

/// A tiny seeded generator for sampling (SplitMix64): reproducible, no dependency.
pub(crate) struct SplitMix64(pub(crate) u64);

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

    /// The nucleus the old way: every token sorted by weight (ties by id), the smallest prefix
    /// reaching top_p.
    fn nucleus_by_full_sort(logits: &[f32], s: Sampling) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&v| (((v - max) / s.temperature) as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<u32> = (0..w.len() as u32).collect();
        order.sort_by(|a, b| w[*b as usize].total_cmp(&w[*a as usize]));
        let mut mass = 0.0;
        let mut kept = vec![];
        for i in order {
            kept.push(i);
            mass += w[i as usize] / total;
            if mass >= s.top_p as f64 {
                break;
            }
        }
        kept
    }

    #[test]
    fn the_nucleus_without_a_full_sort_is_the_same_set() {
        // Large flat vocabularies need the top set to grow past 64; ties are common in
        // quantised logits.
        let mut r = SplitMix64(7);
        for (vocab, spread, top_p) in [
            (1000, 0.1, 0.9),
            (5000, 3.0, 0.5),
            (300, 0.0, 0.7),
            (128, 8.0, 0.99),
        ] {
            let logits: Vec<f32> = (0..vocab)
                .map(|_| ((r.next_f64() * spread * 4.0).round() / 4.0) as f32)
                .collect();
            let s = Sampling {
                temperature: 0.8,
                top_p,
                seed: 0,
            };
            let set: std::collections::BTreeSet<u32> =
                nucleus_by_full_sort(&logits, s).into_iter().collect();
            for seed in 0..200 {
                let id = sample(&logits, s, &mut SplitMix64(seed));
                assert!(
                    set.contains(&id),
                    "vocab {vocab}: {id} outside the nucleus of {}",
                    set.len()
                );
            }
            // Draws cover the nucleus beyond the first 64 when it is larger.
            if set.len() > 64 {
                let drawn: std::collections::BTreeSet<u32> = (0..2000)
                    .map(|seed| sample(&logits, s, &mut SplitMix64(seed)))
                    .collect();
                assert!(drawn.len() > 64, "{} of {}", drawn.len(), set.len());
            }
        }
    }
}
