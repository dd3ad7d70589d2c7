//! Causal grouped-query attention over a slot-indexed KV cache, one rayon task per
//! (query row, head): `out = softmax(q·Kᵀ / √d) · V` over positions `0..=pos` of the row's slot.
//! Softmax is taken in f32 with the maximum subtracted, as eager attention in transformers does.

use rayon::prelude::*;

use super::matmul::Isa;
use crate::backend::AttentionGeometry;
use crate::simd::{exp, widest_simd};

pub fn attention(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    slots: &[u32],
    positions: &[u32],
    geom: AttentionGeometry,
) {
    let AttentionGeometry {
        num_heads,
        num_kv_heads,
        head_dim,
        max_seq,
    } = geom;
    let group = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let rows = slots.len();
    // The instruction set the matmuls use (so forcing a narrower one covers this too).
    let isa = Isa::current().unwrap_or_else(|_| Isa::detect());
    let wide = matches!(isa, Isa::Avx512 | Isa::Avx512Bf16);

    out[..rows * num_heads * head_dim]
        .par_chunks_mut(head_dim)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; max_seq.next_multiple_of(EXP_CHUNK)],
            |scores, (task, o)| {
                let (row, head) = (task / num_heads, task % num_heads);
                let (slot, pos) = (slots[row] as usize, positions[row] as usize);
                let qh = &q[(row * num_heads + head) * head_dim..][..head_dim];
                let base = slot * max_seq * kv_width + (head / group) * head_dim;
                let keys = KvRows {
                    k: &k_cache[base..],
                    v: &v_cache[base..],
                    stride: kv_width,
                };
                #[cfg(target_arch = "x86_64")]
                if wide && head_dim.is_multiple_of(16) {
                    // SAFETY: `wide` says the CPU has AVX-512F; the head size is checked.
                    return unsafe { attend_avx512(o, qh, keys, scores, pos + 1, scale) };
                }
                attend(o, qh, keys, scores, pos + 1, scale);
            },
        );
}

/// Scores exponentiated at a time (one AVX-512 vector).
const EXP_CHUNK: usize = 16;

/// One head's keys and values for one sequence: row `t` at `t · stride`.
#[derive(Clone, Copy)]
struct KvRows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
}

/// One query row of one head over its first `len` positions: the score of each key
/// (`dot(q, key)`), softmax, and the weighted sum of the values into `o`. `scores_buf` holds
/// at least `len` rounded up to a multiple of [`EXP_CHUNK`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_with(
    dot: impl Fn(&[f32], &[f32]) -> f32,
    o: &mut [f32],
    q: &[f32],
    kv: KvRows,
    scores_buf: &mut [f32],
    len: usize,
    scale: f32,
) {
    let d = q.len();
    let scores = &mut scores_buf[..len];
    for (t, s) in scores.iter_mut().enumerate() {
        *s = dot(q, &kv.k[t * kv.stride..][..d]) * scale;
    }
    // Separate passes, so that the exponentials run as vectors (a running maximum or sum in
    // the same loop would serialise it).
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    // In whole vectors of 16 (the padding past the scores is −∞, so it adds 0): a loop of a
    // few dozen would otherwise run in its scalar remainder.
    let padded = len.next_multiple_of(EXP_CHUNK);
    scores_buf[len..padded].fill(f32::NEG_INFINITY);
    for chunk in scores_buf[..padded].chunks_exact_mut(EXP_CHUNK) {
        let chunk: &mut [f32; EXP_CHUNK] = chunk.try_into().unwrap();
        for s in chunk.iter_mut() {
            *s = exp(*s - max);
        }
    }
    let inv = 1.0 / scores_buf[..padded].iter().sum::<f32>();
    o.fill(0.0);
    for (t, &p) in scores_buf[..len].iter().enumerate() {
        let w = p * inv;
        for (o, v) in o.iter_mut().zip(&kv.v[t * kv.stride..][..d]) {
            *o += w * v;
        }
    }
}

widest_simd! {
    /// [`attend_with`] in portable lane arithmetic.
    fn attend(o: &mut [f32], q: &[f32], kv: KvRows, scores_buf: &mut [f32], len: usize, scale: f32) {
        attend_with(dot, o, q, kv, scores_buf, len, scale)
    }
}

/// [`attend_with`] with AVX-512 dot products, for head sizes that are a multiple of 16 (the
/// compiler does not turn the portable lane sums into full-width vectors).
///
/// # Safety
/// AVX-512F must be available, and `q.len()` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    o: &mut [f32],
    q: &[f32],
    kv: KvRows,
    scores_buf: &mut [f32],
    len: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    let dot = |a: &[f32], b: &[f32]| {
        debug_assert!(a.len().is_multiple_of(16) && b.len() >= a.len());
        let mut acc = _mm512_setzero_ps();
        for i in (0..a.len()).step_by(16) {
            // SAFETY: i + 16 <= a.len() <= b.len().
            unsafe {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    _mm512_loadu_ps(b.as_ptr().add(i)),
                    acc,
                );
            }
        }
        _mm512_reduce_add_ps(acc)
    };
    attend_with(dot, o, q, kv, scores_buf, len, scale)
}

/// A dot product in 16 independent lanes, summed as a tree (a single running sum cannot
/// vectorise: float addition is not reassociated; a running sum of the lanes would be a
/// chain of 15 dependent adds per score).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut lanes = [0.0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[f32; L], &[f32; L]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..L {
            lanes[l] += x[l] * y[l];
        }
    }
    let h8: [f32; 8] = std::array::from_fn(|l| lanes[l] + lanes[l + 8]);
    let h4: [f32; 4] = std::array::from_fn(|l| h8[l] + h8[l + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, one (row, head) at a time.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        slots: &[u32],
        pos: &[u32],
        g: AttentionGeometry,
    ) -> Vec<f64> {
        let (h, kvh, d, max_seq) = (g.num_heads, g.num_kv_heads, g.head_dim, g.max_seq);
        let width = kvh * d;
        let mut out = vec![0.0; slots.len() * h * d];
        for row in 0..slots.len() {
            for head in 0..h {
                let base = slots[row] as usize * max_seq * width + head / (h / kvh) * d;
                let qh = &q[(row * h + head) * d..][..d];
                let scores: Vec<f64> = (0..=pos[row] as usize)
                    .map(|t| {
                        let kt = &k[base + t * width..][..d];
                        qh.iter()
                            .zip(kt)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (t, w) in e.iter().enumerate() {
                    for i in 0..d {
                        out[(row * h + head) * d + i] += w / sum * v[base + t * width + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn both_paths_match_softmax_attention_in_f64() {
        let mut rnd = crate::test_rng::uniform(11);
        // Head sizes on the AVX-512 path (multiples of 16) and off it; contexts around the
        // 16-score exponentiation chunks.
        for (head_dim, max_seq) in [(64, 40), (16, 17), (8, 33), (12, 5)] {
            let g = AttentionGeometry {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim,
                max_seq,
            };
            let slots_n = 3;
            let width = g.num_kv_heads * head_dim;
            let k: Vec<f32> = (0..slots_n * max_seq * width)
                .map(|_| 2.0 * rnd())
                .collect();
            let v: Vec<f32> = (0..slots_n * max_seq * width).map(|_| rnd()).collect();
            let slots = [0u32, 2, 1, 2];
            let positions = [
                0u32,
                max_seq as u32 - 1,
                15.min(max_seq as u32 - 1),
                16.min(max_seq as u32 - 1),
            ];
            let q: Vec<f32> = (0..slots.len() * g.num_heads * head_dim)
                .map(|_| rnd())
                .collect();
            let want = naive(&q, &k, &v, &slots, &positions, g);
            let mut got = vec![f32::NAN; want.len()];
            attention(&mut got, &q, &k, &v, &slots, &positions, g);
            // The portable body directly, whatever this CPU runs.
            let mut portable = vec![f32::NAN; want.len()];
            let mut scores = vec![0.0; max_seq.next_multiple_of(EXP_CHUNK)];
            for (task, o) in portable.chunks_mut(head_dim).enumerate() {
                let (row, head) = (task / g.num_heads, task % g.num_heads);
                let base = slots[row] as usize * max_seq * width + head / 3 * head_dim;
                let kv = KvRows {
                    k: &k[base..],
                    v: &v[base..],
                    stride: width,
                };
                let qh = &q[task * head_dim..][..head_dim];
                attend(
                    o,
                    qh,
                    kv,
                    &mut scores,
                    positions[row] as usize + 1,
                    1.0 / (head_dim as f32).sqrt(),
                );
            }
            for (name, out) in [("dispatched", &got), ("portable", &portable)] {
                for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5,
                        "{name} head_dim {head_dim} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
