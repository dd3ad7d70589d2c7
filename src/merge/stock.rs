//! `model_stock` (Jang et al. 2024: interpolate between the base and the models' average by a
//! ratio found from the angles between their task vectors) and `sce` (select the entries whose
//! task vectors vary most across models, weight each model by its mean squared task vector,
//! keep the entries agreeing with the elected sign).

// Element loops index several parallel tiles (one per model) at once.
#![allow(clippy::needless_range_loop)]

use super::methods::Sink;
use super::mt::bit;
use super::select::top_k_mask;
use super::tiles::{self, add_vecs, range, upcast_range, TILE};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor};

/// model_stock: `t·avg + (1 − t)·base`, `t = N·cos / (1 + (N − 1)·cos)` (0 where the
/// denominator is below 1e-6), `cos` the mean cosine over pairs of task vectors, taken over
/// the whole tensor or, with `filter_wise`, per row.
pub fn model_stock(
    name: &str,
    base: &HostTensor,
    xs: &[&HostTensor],
    filter_wise: bool,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = base.numel();
    let k = xs.len();
    if k < 2 {
        return Err(Error::tensor(
            name,
            "model_stock needs at least two models besides the base",
        ));
    }
    let cols = if filter_wise && base.shape.len() >= 2 {
        base.shape[base.shape.len() - 1]
    } else {
        n
    };
    let groups = n / cols.max(1);
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|a| (a + 1..k).map(move |b| (a, b)))
        .collect();
    let mut inputs: Vec<&HostTensor> = vec![base];
    inputs.extend(xs);
    // Per group: |τ_i|² for each model, then τ_a·τ_b for each pair.
    let width = k + pairs.len();
    let sums = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; width * groups],
        |acc, lo, t| {
            for j in 0..t[0].len() {
                let g = (lo + j) / cols * width;
                let b = t[0][j];
                for i in 0..k {
                    let d = (t[i + 1][j] - b) as f64;
                    acc[g + i] += d * d;
                }
                for (p, &(a, c)) in pairs.iter().enumerate() {
                    acc[g + k + p] += (t[a + 1][j] - b) as f64 * (t[c + 1][j] - b) as f64;
                }
            }
        },
        add_vecs,
    );
    let ratios: Vec<f32> = (0..groups)
        .map(|g| {
            let s = &sums[g * width..(g + 1) * width];
            let cos: f64 = pairs
                .iter()
                .enumerate()
                .map(|(p, &(a, c))| {
                    (s[k + p] / (s[a].sqrt() * s[c].sqrt()).max(1e-6)).clamp(-1.0, 1.0)
                })
                .sum::<f64>()
                / pairs.len() as f64;
            let den = 1.0 + (k as f64 - 1.0) * cos;
            if den.abs() < 1e-6 {
                0.0
            } else {
                (k as f64 * cos / den) as f32
            }
        })
        .collect();
    tiles::output(n, &inputs, out_dtype, sink, |lo, t, out| {
        for (j, o) in out.iter_mut().enumerate() {
            let r = ratios[(lo + j) / cols];
            let mut sum = 0.0f32;
            for x in &t[1..] {
                sum += x[j];
            }
            *o = r * (sum / k as f32) + (1.0 - r) * t[0][j];
        }
    })
}

/// sce. `select_topk < 1` keeps, for every model, only the `⌊nonzero·select_topk⌋` entries of
/// largest variance across the models.
pub fn sce(
    base: &HostTensor,
    xs: &[&HostTensor],
    select_topk: f64,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = base.numel();
    let k = xs.len();
    let mut inputs: Vec<&HostTensor> = vec![base];
    inputs.extend(xs);
    // Population variance of the task vectors across the models, per entry, as bits.
    let variance = |tile: usize, bits: &mut Vec<u32>| {
        let (lo, hi) = range(n, tile);
        let len = hi - lo;
        let mut buf = vec![0.0f32; (k + 1) * len];
        for (i, t) in inputs.iter().enumerate() {
            upcast_range(t, lo, hi, &mut buf[i * len..(i + 1) * len]);
        }
        bits.clear();
        bits.extend((0..len).map(|j| {
            let b = buf[j];
            let mean = (1..=k).map(|i| buf[i * len + j] - b).sum::<f32>() / k as f32;
            let var = (1..=k)
                .map(|i| {
                    let d = buf[i * len + j] - b - mean;
                    d * d
                })
                .sum::<f32>()
                / k as f32;
            var.abs().to_bits()
        }));
    };
    let mask: Option<Vec<u64>> = if select_topk < 1.0 {
        let nonzero: usize = (0..n.div_ceil(TILE))
            .map(|tile| {
                let mut bits = vec![];
                variance(tile, &mut bits);
                bits.iter().filter(|&&b| b != 0).count()
            })
            .sum();
        let keep = (nonzero as f32 * select_topk as f32) as usize;
        Some(top_k_mask(n, keep, &variance))
    } else {
        None
    };
    let kept = |j: usize| mask.as_ref().is_none_or(|m| bit(m, j));
    // Each model's weight: its mean squared (selected) task vector, normalised to sum to 1.
    let sq = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; k],
        |acc, lo, t| {
            for j in 0..t[0].len() {
                if kept(lo + j) {
                    for i in 0..k {
                        let d = (t[i + 1][j] - t[0][j]) as f64;
                        acc[i] += d * d;
                    }
                }
            }
        },
        add_vecs,
    );
    let means: Vec<f64> = sq.iter().map(|s| s / n as f64).collect();
    let total: f64 = means.iter().sum();
    let weights: Vec<f32> = if total.abs() < 1e-6 {
        vec![1.0 / k as f32; k]
    } else {
        means.iter().map(|m| (m / total) as f32).collect()
    };
    tiles::output(n, &inputs, out_dtype, sink, |lo, t, out| {
        for (j, o) in out.iter_mut().enumerate() {
            let b = t[0][j];
            let keep = kept(lo + j);
            let tau = |i: usize| if keep { t[i + 1][j] - b } else { 0.0 };
            let s: f32 = (0..k).map(tau).sum();
            let elected = if s >= 0.0 { 1.0f32 } else { -1.0 };
            let (mut num, mut den) = (0.0f32, 0.0f32);
            for (i, &w) in weights.iter().enumerate() {
                let d = tau(i);
                if d * elected > 0.0 {
                    num += d * w;
                    den += w;
                }
            }
            *o = b + num / den.max(1e-6);
        }
    })
}
