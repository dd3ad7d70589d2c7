//! Interpolation on the sphere: `slerp` (base ↔ one model), `nuslerp` (two models, or their
//! task vectors, whole or per row/column), `multislerp` (a weighted spherical mean of task
//! vectors) and `karcher` (the Riemannian mean of the models' directions). Every result is a
//! combination `Σ c_i v_i` of the inputs with coefficients found from their norms and dot
//! products, so each method is one reduction pass and one output pass; Karcher's iterations
//! run on the N×N Gram matrix of the inputs instead of on the tensors.

// Element loops index several parallel tiles (one per model) at once.
#![allow(clippy::needless_range_loop)]

use super::methods::Sink;
use super::tiles::{self, add_vecs};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor};
use crate::simd::widest_simd;

widest_simd! {
    /// Adds `a², c², a·c` of each element (`a = x0 − b`, `c = x1 − b`) to its own slot of
    /// `sums` (per-column sums over a row).
    fn column_sums(sums: [&mut [f64]; 3], x0: &[f32], x1: &[f32], b: Option<&[f32]>) {
        let [aa, cc, ac] = sums;
        let n = x0.len().min(x1.len()).min(aa.len()).min(cc.len()).min(ac.len());
        let mut add = |j: usize, a: f64, c: f64| {
            aa[j] += a * a;
            cc[j] += c * c;
            ac[j] += a * c;
        };
        match b {
            Some(b) => {
                let b = &b[..n];
                for j in 0..n {
                    add(j, f64::from(x0[j] - b[j]), f64::from(x1[j] - b[j]));
                }
            }
            None => (0..n).for_each(|j| add(j, f64::from(x0[j]), f64::from(x1[j]))),
        }
    }
}

/// `[Σ v_i·v_j]` over the whole tensors (upper triangle mirrored), in f64.
fn gram(n: usize, vs: &[&HostTensor], minus: Option<&HostTensor>) -> Vec<Vec<f64>> {
    gram_per_group(n, vs, minus, Groups::One).remove(0)
}

/// `[Σ (v_i − m)·(v_j − m)]` per group of elements (the whole tensor or each row), upper
/// triangle mirrored, in f64.
pub(super) fn gram_per_group(
    n: usize,
    vs: &[&HostTensor],
    minus: Option<&HostTensor>,
    groups: Groups,
) -> Vec<Vec<Vec<f64>>> {
    let k = vs.len();
    let count = match groups {
        Groups::One => 1,
        Groups::Rows(cols) => n / cols.max(1),
        Groups::Columns(_) => unreachable!("a Gram matrix per column is not needed"),
    };
    let mut inputs: Vec<&HostTensor> = vs.to_vec();
    inputs.extend(minus);
    let flat = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; count * k * k],
        |acc, lo, xs| {
            for (j, end, g) in runs(groups, lo, xs[0].len()) {
                let vs: Vec<&[f32]> = xs[..k].iter().map(|x| &x[j..end]).collect();
                let m = minus.map(|_| &xs[k][j..end]);
                GRAM_SCRATCH.with_borrow_mut(|scratch| {
                    gram_run(&vs, m, &mut acc[g * k * k..(g + 1) * k * k], scratch)
                });
            }
        },
        add_vecs,
    );
    flat.chunks(k * k)
        .map(|f| {
            (0..k)
                .map(|a| (0..k).map(|b| f[a.min(b) * k + a.max(b)]).collect())
                .collect()
        })
        .collect()
}

thread_local! {
    /// Per-thread copies of a block of each (centred) vector.
    static GRAM_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Elements per block of [`gram_run`]: short enough that each f32 lane sums 16 products
/// (relative error ≤ 16·2⁻²⁴ of the block's magnitude) before the block's sum joins an f64
/// total, and that the block's vectors stay in L1.
const GRAM_BLOCK: usize = 256;

widest_simd! {
    /// Adds `(v_a − m)·(v_b − m)` for `a ≤ b` to `acc[a·k + b]`: each block of every vector is
    /// centred once, then every pair's products are summed in sixteen f32 lanes per block and
    /// the blocks' sums in f64 (one pass over the run for all pairs; f32 products run twice
    /// as wide as f64 ones).
    fn gram_run(vs: &[&[f32]], m: Option<&[f32]>, acc: &mut [f64], scratch: &mut Vec<f32>) {
        let k = vs.len();
        let n = vs.iter().map(|v| v.len()).min().unwrap_or(0);
        scratch.resize(k * GRAM_BLOCK, 0.0);
        for lo in (0..n).step_by(GRAM_BLOCK) {
            let len = GRAM_BLOCK.min(n - lo);
            for (v, d) in vs.iter().zip(scratch.chunks_mut(GRAM_BLOCK)) {
                let (v, d) = (&v[lo..lo + len], &mut d[..len]);
                match m {
                    Some(m) => {
                        let m = &m[lo..lo + len];
                        for j in 0..len {
                            d[j] = v[j] - m[j];
                        }
                    }
                    None => d.copy_from_slice(v),
                }
            }
            for a in 0..k {
                let da = &scratch[a * GRAM_BLOCK..a * GRAM_BLOCK + len];
                for b in a..k {
                    let db = &scratch[b * GRAM_BLOCK..b * GRAM_BLOCK + len];
                    let mut lane = [0.0f32; 16];
                    let (xs, ys) = (da.chunks_exact(16), db.chunks_exact(16));
                    let tail = xs.remainder().iter().zip(ys.remainder());
                    for (x, y) in xs.zip(ys) {
                        for l in 0..16 {
                            lane[l] += x[l] * y[l];
                        }
                    }
                    for (x, y) in tail {
                        lane[0] += x * y;
                    }
                    acc[a * k + b] += lane.iter().map(|&s| f64::from(s)).sum::<f64>();
                }
            }
        }
    }
}

/// Which coefficients each element of a tensor uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Groups {
    /// One set for the whole tensor.
    One,
    /// A set per row of this many columns.
    Rows(usize),
    /// A set per column, rows of this many columns.
    Columns(usize),
}

/// The coefficients of one run of elements.
#[derive(Clone, Copy)]
enum RunCoefs<'a> {
    /// `c[i]` for every element.
    Same(&'a [f32]),
    /// `c[i][j]` for element `j` of the run.
    PerElement(&'a [&'a [f32]]),
}

widest_simd! {
    /// `out = Σ c_i (x_i − b) [+ b]` over one run, model by model (loops that vectorise; the
    /// terms are added in the same order as a per-element loop would).
    fn mix_run(out: &mut [f32], xs: &[&[f32]], b: Option<&[f32]>, add_base: bool, c: RunCoefs<'_>) {
        let len = out.len();
        out.fill(0.0);
        for (i, x) in xs.iter().enumerate() {
            let x = &x[..len];
            match (b, c) {
                (Some(b), RunCoefs::Same(c)) => {
                    let (c, b) = (c[i], &b[..len]);
                    for j in 0..len {
                        out[j] += c * (x[j] - b[j]);
                    }
                }
                (None, RunCoefs::Same(c)) => {
                    let c = c[i];
                    for j in 0..len {
                        out[j] += c * x[j];
                    }
                }
                (Some(b), RunCoefs::PerElement(cs)) => {
                    let (c, b) = (&cs[i][..len], &b[..len]);
                    for j in 0..len {
                        out[j] += c[j] * (x[j] - b[j]);
                    }
                }
                (None, RunCoefs::PerElement(cs)) => {
                    let c = &cs[i][..len];
                    for j in 0..len {
                        out[j] += c[j] * x[j];
                    }
                }
            }
        }
        if let (Some(b), true) = (b, add_base) {
            out.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
    }
}

/// The runs of a tile that start at element `lo` and are `len` long: `(start, end, group)`,
/// where a run never crosses a row when the groups are per row or per column.
pub(super) fn runs(
    groups: Groups,
    lo: usize,
    len: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut j = 0;
    std::iter::from_fn(move || {
        if j >= len {
            return None;
        }
        let (end, g) = match groups {
            Groups::One => (len, 0),
            Groups::Rows(cols) => (len.min((lo + j) / cols * cols + cols - lo), (lo + j) / cols),
            Groups::Columns(cols) => (len.min((lo + j) / cols * cols + cols - lo), (lo + j) % cols),
        };
        let run = (j, end, g);
        j = end;
        Some(run)
    })
}

/// Writes `Σ c_i (x_i − base) [+ base]` with `coefs[g]` the coefficients of group `g`.
#[allow(clippy::too_many_arguments)]
fn combine(
    n: usize,
    xs: &[&HostTensor],
    base: Option<&HostTensor>,
    add_base: bool,
    coefs: &[Vec<f32>],
    groups: Groups,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let k = xs.len();
    let mut inputs: Vec<&HostTensor> = xs.to_vec();
    inputs.extend(base);
    // Per column, each model's coefficients side by side, so a row's run reads them in order.
    let by_model: Vec<Vec<f32>> = match groups {
        Groups::Columns(_) => (0..k)
            .map(|i| coefs.iter().map(|c| c[i]).collect())
            .collect(),
        _ => vec![],
    };
    tiles::output(n, &inputs, out_dtype, sink, |lo, t, out| {
        let b = base.map(|_| t[k]);
        for (j, end, g) in runs(groups, lo, out.len()) {
            let x: Vec<&[f32]> = t[..k].iter().map(|x| &x[j..end]).collect();
            let b = b.map(|b| &b[j..end]);
            let o = &mut out[j..end];
            match groups {
                Groups::Columns(_) => {
                    let c: Vec<&[f32]> = by_model.iter().map(|c| &c[g..g + end - j]).collect();
                    mix_run(o, &x, b, add_base, RunCoefs::PerElement(&c));
                }
                _ => mix_run(o, &x, b, add_base, RunCoefs::Same(&coefs[g])),
            }
        }
    })
}

/// A mean of one model: the model, in the output dtype.
fn the_one_model(x: &HostTensor, out_dtype: DType, sink: &Sink) -> Result<()> {
    combine(
        x.numel(),
        &[x],
        None,
        false,
        &[vec![1.0]],
        Groups::One,
        out_dtype,
        sink,
    )
}

/// SLERP's two coefficients for the whole tensor: `(s0, s1)` with `out = s0·v0 + s1·v1`;
/// vectors whose norm is ≤ 1e-8 are left unnormalised, and nearly colinear ones
/// (|cos| > 0.9995) interpolated linearly, as in mergekit.
pub fn slerp(
    v0: &HostTensor,
    v1: &HostTensor,
    t: f32,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = v0.numel();
    let g = gram(n, &[v0, v1], None);
    let norm = |ss: f64| {
        let n = ss.sqrt();
        if n > 1e-8 {
            n
        } else {
            1.0
        }
    };
    let dot = (g[0][1] / (norm(g[0][0]) * norm(g[1][1]))).clamp(-1.0, 1.0);
    let t64 = t as f64;
    let (s0, s1) = if dot.abs() > 0.9995 {
        (1.0 - t64, t64)
    } else {
        let th = dot.acos();
        (
            (th * (1.0 - t64)).sin() / th.sin(),
            (th * t64).sin() / th.sin(),
        )
    };
    combine(
        n,
        &[v0, v1],
        None,
        false,
        &[vec![s0 as f32, s1 as f32]],
        Groups::One,
        out_dtype,
        sink,
    )
}

/// How nuslerp takes its vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Vectors {
    /// The whole tensor is one vector.
    Flat,
    /// Each row (the last dimension).
    Rows,
    /// Each column (the first dimension's extent, per column).
    Columns,
}

/// nuslerp between `x0` and `x1` (or their task vectors over `base`) at `t`, per vector.
#[allow(clippy::too_many_arguments)]
pub fn nuslerp(
    name: &str,
    x0: &HostTensor,
    x1: &HostTensor,
    base: Option<&HostTensor>,
    t: f32,
    vectors: Vectors,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = x0.numel();
    // A 1-D tensor is one vector whichever way.
    let (rows, cols) = if x0.shape.len() < 2 {
        (1, n)
    } else {
        (x0.shape[0], n / x0.shape[0].max(1))
    };
    let vectors = if x0.shape.len() < 2 {
        Vectors::Flat
    } else {
        vectors
    };
    let count = match vectors {
        Vectors::Flat => 1,
        Vectors::Rows => rows,
        Vectors::Columns => cols,
    };
    if x0.shape.len() > 2 && vectors != Vectors::Flat {
        return Err(Error::tensor(
            name,
            "nuslerp per row or column takes 1-D or 2-D tensors",
        ));
    }
    let groups = match vectors {
        Vectors::Flat => Groups::One,
        Vectors::Rows => Groups::Rows(cols),
        Vectors::Columns => Groups::Columns(cols),
    };
    let mut inputs: Vec<&HostTensor> = vec![x0, x1];
    inputs.extend(base);
    // Per vector: |v0|², |v1|², v0·v1, as three arrays of `count` sums.
    let sums = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; 3 * count],
        |acc, lo, xs| {
            let b = base.map(|_| xs[2]);
            let (aa, rest) = acc.split_at_mut(count);
            let (cc, ac) = rest.split_at_mut(count);
            for (j, end, g) in runs(groups, lo, xs[0].len()) {
                let (x0, x1, b) = (&xs[0][j..end], &xs[1][j..end], b.map(|b| &b[j..end]));
                if let Groups::Columns(_) = groups {
                    // Every element is in another vector: sums per column.
                    let g = g..g + end - j;
                    column_sums(
                        [&mut aa[g.clone()], &mut cc[g.clone()], &mut ac[g]],
                        x0,
                        x1,
                        b,
                    );
                } else {
                    let mut sums = [0.0f64; 4];
                    GRAM_SCRATCH.with_borrow_mut(|s| gram_run(&[x0, x1], b, &mut sums, s));
                    aa[g] += sums[0];
                    ac[g] += sums[1];
                    cc[g] += sums[3];
                }
            }
        },
        add_vecs,
    );
    let t64 = t as f64;
    let coefs: Vec<Vec<f32>> = (0..count)
        .map(|g| {
            let n0 = sums[g].sqrt().max(1e-7);
            let n1 = sums[count + g].sqrt().max(1e-7);
            let cos = (sums[2 * count + g] / (n0 * n1)).clamp(-1.0, 1.0);
            if 1.0 - cos * cos <= 1e-16 {
                vec![(1.0 - t64) as f32, t]
            } else {
                let th = cos.acos();
                let s = th.sin();
                vec![
                    ((th * (1.0 - t64)).sin() / s) as f32,
                    ((th * t64).sin() / s) as f32,
                ]
            }
        })
        .collect();
    combine(
        n,
        &[x0, x1],
        base,
        base.is_some(),
        &coefs,
        groups,
        out_dtype,
        sink,
    )
}

/// multislerp: the weighted mean of the unit task vectors, renormalised, scaled to the weighted
/// mean of their norms. (mergekit's tangent step on the sphere vanishes here: the tangent of a
/// mean at itself is zero, so its exponential map returns the mean.)
#[allow(clippy::too_many_arguments)]
pub fn multislerp(
    name: &str,
    xs: &[&HostTensor],
    base: Option<&HostTensor>,
    weights: &[f32],
    normalize_weights: bool,
    eps: f64,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = xs[0].numel();
    let k = xs.len();
    if k == 1 {
        // mergekit returns the one model as it is, base or not.
        return the_one_model(xs[0], out_dtype, sink);
    }
    let mut w: Vec<f64> = weights.iter().map(|&w| w as f64).collect();
    if normalize_weights {
        let s: f64 = w.iter().sum();
        if s == 0.0 {
            return Err(Error::tensor(
                name,
                "multislerp weights sum to zero; cannot normalise",
            ));
        }
        w.iter_mut().for_each(|x| *x /= s);
    }
    let g = gram(n, xs, base);
    let norms: Vec<f64> = (0..k).map(|i| g[i][i].sqrt()).collect();
    // mean = Σ a_i v_i with a_i = w_i / (|v_i| + eps); |mean|² = aᵀ G a.
    let a: Vec<f64> = (0..k).map(|i| w[i] / (norms[i] + eps)).collect();
    let mean_sq: f64 = (0..k)
        .map(|i| (0..k).map(|j| a[i] * a[j] * g[i][j]).sum::<f64>())
        .sum();
    let mean_norm = mean_sq.max(0.0).sqrt();
    let coefs: Vec<f32> = if mean_norm < eps {
        if k != 2 {
            return Err(Error::tensor(
                name,
                "multislerp: the weighted directions cancel out (their mean is zero)",
            ));
        }
        w.iter().map(|&w| w as f32).collect()
    } else {
        let scale: f64 = (0..k).map(|i| norms[i] * w[i]).sum();
        let tn = eps; // |tangent| + eps with a vanishing tangent
        a.iter()
            .map(|&ai| (ai / mean_norm * tn.cos() * scale) as f32)
            .collect()
    };
    combine(
        n,
        xs,
        base,
        base.is_some(),
        &[coefs],
        Groups::One,
        out_dtype,
        sink,
    )
}

/// The Karcher mean of the models' unit directions (equal weights), scaled by the mean norm.
pub fn karcher(
    xs: &[&HostTensor],
    max_iter: usize,
    tol: f64,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = xs[0].numel();
    let k = xs.len();
    if k == 1 {
        return the_one_model(xs[0], out_dtype, sink);
    }
    let raw = gram(n, xs, None);
    let norms: Vec<f64> = (0..k).map(|i| raw[i][i].sqrt()).collect();
    let alpha = 1.0 / k as f64;
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return combine(
            n,
            xs,
            None,
            false,
            &[vec![0.0; k]],
            Groups::One,
            out_dtype,
            sink,
        );
    }
    // Gram matrix of the unit vectors u_i = x_i / |x_i|; the mean is Σ c_i u_i.
    let g: Vec<Vec<f64>> = (0..k)
        .map(|i| {
            (0..k)
                .map(|j| {
                    if norms[i] == 0.0 || norms[j] == 0.0 {
                        0.0
                    } else {
                        raw[i][j] / (norms[i] * norms[j])
                    }
                })
                .collect()
        })
        .collect();
    let quad = |c: &[f64], d: &[f64]| -> f64 {
        (0..k)
            .map(|i| (0..k).map(|j| c[i] * d[j] * g[i][j]).sum::<f64>())
            .sum()
    };
    let a = 1.0 / valid.len() as f64;
    let mut c = vec![0.0f64; k];
    for &i in &valid {
        c[i] = a;
    }
    let mn = quad(&c, &c).max(0.0).sqrt();
    if mn < tol {
        c = vec![0.0; k];
        c[valid[0]] = 1.0;
    } else {
        c.iter_mut().for_each(|x| *x /= mn);
    }
    for _ in 0..max_iter {
        // tangent = Σ_i a (θ_i / sin θ_i)(u_i − cos θ_i · mean), θ_i = angle(mean, u_i).
        let mut tangent = vec![0.0f64; k];
        for &i in &valid {
            let mut e = vec![0.0; k];
            e[i] = 1.0;
            let dot = quad(&c, &e).clamp(-1.0, 1.0);
            let th = dot.acos();
            if th < tol {
                continue;
            }
            let f = a * th / th.sin();
            tangent[i] += f;
            for j in 0..k {
                tangent[j] -= f * dot * c[j];
            }
        }
        let tn = quad(&tangent, &tangent).max(0.0).sqrt();
        if tn < tol {
            break;
        }
        for j in 0..k {
            c[j] = tn.cos() * c[j] + tn.sin() * tangent[j] / tn;
        }
        let un = quad(&c, &c).max(0.0).sqrt();
        if un > tol {
            c.iter_mut().for_each(|x| *x /= un);
        }
    }
    let coefs: Vec<f32> = (0..k)
        .map(|i| {
            if norms[i] == 0.0 {
                0.0
            } else {
                (scale * c[i] / norms[i]) as f32
            }
        })
        .collect();
    combine(n, xs, None, false, &[coefs], Groups::One, out_dtype, sink)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::merge::tiles::TILE;
    use crate::model::dtype;

    /// nuslerp of one pair of vectors in f64, straight from the formula.
    fn slerp_f64(a: &[f64], c: &[f64], t: f64) -> Vec<f64> {
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| x * y).sum::<f64>();
        let (na, nc) = (dot(a, a).sqrt(), dot(c, c).sqrt());
        let th = (dot(a, c) / (na * nc)).clamp(-1.0, 1.0).acos();
        let (s0, s1) = (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin());
        a.iter().zip(c).map(|(x, y)| s0 * x + s1 * y).collect()
    }

    #[test]
    fn nuslerp_per_row_and_per_column_match_the_formula_across_tiles() {
        // Rows that straddle tile boundaries, so runs and per-column sums cross tiles.
        let (rows, cols) = (5, TILE / 2 + 37);
        let n = rows * cols;
        let mut draw = crate::test_rng::uniform(7);
        let (v0, v1, vb): (Vec<f32>, Vec<f32>, Vec<f32>) =
            (0..n).map(|_| (draw(), draw(), draw())).collect();
        let tensor = |v: &[f32]| HostTensor::from_f32(v, vec![rows, cols], DType::F32);
        let (x0, x1, base) = (tensor(&v0), tensor(&v1), tensor(&vb));
        let t = 0.3f32;
        for vectors in [Vectors::Rows, Vectors::Columns] {
            let out = Mutex::new(vec![0u8; n * 4]);
            let sink = |off: usize, b: &[u8]| {
                out.lock().unwrap()[off..off + b.len()].copy_from_slice(b);
                Ok(())
            };
            nuslerp("t", &x0, &x1, Some(&base), t, vectors, DType::F32, &sink).unwrap();
            let got = dtype::to_f32_vec(DType::F32, &out.into_inner().unwrap());
            let (count, index): (usize, Box<dyn Fn(usize, usize) -> usize>) = match vectors {
                Vectors::Rows => (rows, Box::new(move |g, i| g * cols + i)),
                _ => (cols, Box::new(move |g, i| i * cols + g)),
            };
            let len = n / count;
            let mut worst = 0.0f64;
            for g in 0..count {
                let idx: Vec<usize> = (0..len).map(|i| index(g, i)).collect();
                let tau = |v: &[f32]| -> Vec<f64> {
                    idx.iter().map(|&j| f64::from(v[j] - vb[j])).collect()
                };
                let want = slerp_f64(&tau(&v0), &tau(&v1), f64::from(t));
                for (w, &j) in want.iter().zip(&idx) {
                    worst = worst.max((w + f64::from(vb[j]) - f64::from(got[j])).abs());
                }
            }
            assert!(worst < 1e-5, "{vectors:?}: max |Δ| {worst}");
        }
    }
}
