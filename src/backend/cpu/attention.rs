//! Causal grouped-query attention over a slot-indexed KV cache, one rayon task per
//! (query row, head): `out = softmax(q·Kᵀ / √d) · V` over positions `0..=pos` of the row's slot.
//! Softmax is taken in f32 with the maximum subtracted, as eager attention in transformers does.

use rayon::prelude::*;

use crate::backend::AttentionGeometry;

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
            || vec![0.0f32; max_seq],
            |scores, (task, o)| {
                let (row, head) = (task / num_heads, task % num_heads);
                let (slot, pos) = (slots[row] as usize, positions[row] as usize);
                let kvh = head / group;
                let qh = &q[(row * num_heads + head) * head_dim..][..head_dim];
                let base = slot * max_seq * kv_width + kvh * head_dim;

                let mut max = f32::NEG_INFINITY;
                for (t, s) in scores[..=pos].iter_mut().enumerate() {
                    let kt = &k_cache[base + t * kv_width..][..head_dim];
                    *s = qh.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                for s in scores[..=pos].iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                o.fill(0.0);
                for (t, &p) in scores[..=pos].iter().enumerate() {
                    let vt = &v_cache[base + t * kv_width..][..head_dim];
                    let w = p * inv;
                    for (o, v) in o.iter_mut().zip(vt) {
                        *o += w * v;
                    }
                }
            },
        );
}
