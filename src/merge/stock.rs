//! `model_stock` (Jang et al. 2024: interpolate between the base and the models' average by a
//! ratio found from the angles between their task vectors) and `sce` (select the entries whose
//! task vectors vary most across models, weight each model by its mean squared task vector,
//! keep the entries agreeing with the elected sign).

// Element loops index several parallel tiles (one per model) at once.
#![allow(clippy::needless_range_loop)]

use super::gta::zero_dropped;
use super::methods::Sink;
use super::select::Ranked;
use super::sphere::{gram_per_group, runs, Groups};
use super::tiles::{self, add_vecs, range, upcast_range};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor};
use crate::simd::{lane_sums, widest_simd};

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
    let groups = if cols == n {
        Groups::One
    } else {
        Groups::Rows(cols)
    };
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|a| (a + 1..k).map(move |b| (a, b)))
        .collect();
    // Per group: the Gram matrix of the task vectors.
    let grams = gram_per_group(n, xs, Some(base), groups);
    let ratios: Vec<f32> = grams
        .iter()
        .map(|g| {
            let cos: f64 = pairs
                .iter()
                .map(|&(a, c)| {
                    (g[a][c] / (g[a][a].sqrt() * g[c][c].sqrt()).max(1e-6)).clamp(-1.0, 1.0)
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
    let mut inputs: Vec<&HostTensor> = vec![base];
    inputs.extend(xs);
    tiles::output(n, &inputs, out_dtype, sink, |lo, t, out| {
        for (j, end, g) in runs(groups, lo, out.len()) {
            let x: Vec<&[f32]> = t[1..].iter().map(|x| &x[j..end]).collect();
            stock_run(&mut out[j..end], &x, &t[0][j..end], ratios[g]);
        }
    })
}

widest_simd! {
    /// `out = r·mean(xs) + (1 − r)·b` over one run, model by model (loops that vectorise,
    /// the sum in the models' order).
    fn stock_run(out: &mut [f32], xs: &[&[f32]], b: &[f32], r: f32) {
        let len = out.len();
        out.fill(0.0);
        for x in xs {
            out.iter_mut().zip(&x[..len]).for_each(|(o, &x)| *o += x);
        }
        let k = xs.len() as f32;
        out.iter_mut()
            .zip(&b[..len])
            .for_each(|(o, &b)| *o = r * (*o / k) + (1.0 - r) * b);
    }
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
        SCRATCH.with_borrow_mut(|buf| {
            buf.resize((k + 3) * len, 0.0);
            let (ins, stats) = buf.split_at_mut((k + 1) * len);
            for (i, t) in inputs.iter().enumerate() {
                upcast_range(t, lo, hi, &mut ins[i * len..(i + 1) * len]);
            }
            let xs: Vec<&[f32]> = ins.chunks(len).collect();
            bits.resize(len, 0);
            variance_bits(&xs, stats, bits);
        });
    };
    let mask: Option<Vec<u64>> = if select_topk < 1.0 {
        let ranked = Ranked::new(n, &variance);
        let keep = (ranked.nonzero() as f32 * select_topk as f32) as usize;
        Some(ranked.top_k(keep))
    } else {
        None
    };
    // Each model's weight: its mean squared (selected) task vector, normalised to sum to 1.
    let sq = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; k],
        |acc, lo, t| {
            SCRATCH.with_borrow_mut(|d| {
                d.resize(t[0].len(), 0.0);
                for i in 0..k {
                    acc[i] +=
                        masked_square_sum(t[i + 1], t[0], mask.as_ref().map(|m| &m[lo / 64..]), d);
                }
            })
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
        SCRATCH.with_borrow_mut(|wd| {
            sce_tile(t, mask.as_ref().map(|m| &m[lo / 64..]), &weights, out, wd)
        })
    })
}

thread_local! {
    /// Per-thread scratch of a tile (task vectors, statistics), reused between tiles.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

widest_simd! {
    /// The bit patterns of `|var|`, the population variance across the models of each
    /// element's task vector (`xs[0]` the base, `xs[1..]` the models); `stats` is scratch of
    /// twice the length.
    fn variance_bits(xs: &[&[f32]], stats: &mut [f32], bits: &mut [u32]) {
        let len = bits.len();
        let k = (xs.len() - 1) as f32;
        let b = &xs[0][..len];
        let (mean, var) = stats.split_at_mut(len);
        let var = &mut var[..len];
        mean.fill(0.0);
        for x in &xs[1..] {
            let x = &x[..len];
            for j in 0..len {
                mean[j] += x[j] - b[j];
            }
        }
        mean.iter_mut().for_each(|m| *m /= k);
        var.fill(0.0);
        for x in &xs[1..] {
            let x = &x[..len];
            for j in 0..len {
                let d = x[j] - b[j] - mean[j];
                var[j] += d * d;
            }
        }
        for j in 0..len {
            bits[j] = (var[j] / k).abs().to_bits();
        }
    }
}

widest_simd! {
    /// `Σ (x − b)²` over the elements that `mask` keeps (all without one), in f64; `d` is
    /// scratch of the tile's length.
    fn masked_square_sum(x: &[f32], b: &[f32], mask: Option<&[u64]>, d: &mut [f32]) -> f64 {
        let len = d.len();
        d.iter_mut().zip(&x[..len]).zip(&b[..len]).for_each(|((d, &x), &b)| *d = x - b);
        if let Some(m) = mask {
            zero_dropped(d, m);
        }
        let [s] = lane_sums(len, |j| [f64::from(d[j]) * f64::from(d[j])]);
        s
    }
}

widest_simd! {
    /// One SCE output tile: the selected task vectors, the sign of their sum elected, the
    /// agreeing ones averaged with the models' weights, added to the base `t[0]`.
    fn sce_tile(t: &[&[f32]], mask: Option<&[u64]>, weights: &[f32], out: &mut [f32], wd: &mut Vec<f32>) {
        let k = t.len() - 1;
        let len = out.len();
        let b = &t[0][..len];
        wd.resize((k + 2) * len, 0.0);
        let (taus, rest) = wd.split_at_mut(k * len);
        let (sign, den) = rest.split_at_mut(len);
        for i in 0..k {
            let d = &mut taus[i * len..(i + 1) * len];
            d.iter_mut().zip(&t[i + 1][..len]).zip(b).for_each(|((d, &x), &b)| *d = x - b);
            if let Some(m) = mask {
                zero_dropped(d, m);
            }
        }
        // `out` first holds the sum that elects the sign, then the weighted numerator.
        out.fill(0.0);
        for d in taus.chunks(len) {
            out.iter_mut().zip(d).for_each(|(o, &d)| *o += d);
        }
        for (s, o) in sign.iter_mut().zip(out.iter_mut()) {
            *s = if *o >= 0.0 { 1.0 } else { -1.0 };
            *o = 0.0;
        }
        den.fill(0.0);
        for (d, &w) in taus.chunks(len).zip(weights) {
            // Branch-free, so that it vectorises: a disagreeing entry adds +0, which leaves
            // the sums as they are (they are never −0).
            for (((o, dn), &d), &s) in out.iter_mut().zip(den.iter_mut()).zip(d).zip(&*sign) {
                let agrees = d * s > 0.0;
                *o += if agrees { d * w } else { 0.0 };
                *dn += if agrees { w } else { 0.0 };
            }
        }
        for ((o, &dn), &b) in out.iter_mut().zip(&*den).zip(b) {
            *o = b + *o / dn.max(1e-6);
        }
    }
}
