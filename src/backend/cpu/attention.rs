//! Causal grouped-query attention over a slot-indexed KV cache, one rayon task per
//! (query row, head): `out = softmax(q·Kᵀ / √d) · V` over positions `0..=pos` of the row's slot.
//! Softmax is taken in f32 with the maximum subtracted, as eager attention in transformers does.

use rayon::prelude::*;

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

widest_simd! {
    /// One query row of one head over its first `len` positions: the score of each key,
    /// softmax, and the weighted sum of the values into `o`. `scores_buf` holds at least
    /// `len` rounded up to a multiple of [`EXP_CHUNK`].
    fn attend(o: &mut [f32], q: &[f32], kv: KvRows, scores_buf: &mut [f32], len: usize, scale: f32) {
        let d = q.len();
        let scores = &mut scores_buf[..len];
        for (t, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &kv.k[t * kv.stride..][..d]) * scale;
        }
        // Separate passes, so that the exponentials run as vectors (a running maximum or
        // sum in the same loop would serialise it).
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        // In whole vectors of 16 (the padding past the scores is −∞, so it adds 0): a loop
        // of a few dozen would otherwise run in its scalar remainder.
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
