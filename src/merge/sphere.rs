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
use crate::simd::{lane_sums, widest_simd};

widest_simd! {
    /// `Σ (x − m)·(y − m)` (`m` = 0 without `minus`) in f64.
    fn dot_minus(x: &[f32], y: &[f32], minus: Option<&[f32]>) -> f64 {
        let n = x.len().min(y.len());
        let (x, y) = (&x[..n], &y[..n]);
        let [s] = match minus {
            Some(m) => {
                let m = &m[..n];
                lane_sums(n, |j| [f64::from(x[j] - m[j]) * f64::from(y[j] - m[j])])
            }
            None => lane_sums(n, |j| [f64::from(x[j]) * f64::from(y[j])]),
        };
        s
    }
}

widest_simd! {
    /// `[|a|², |c|², a·c]` for `a = x0 − b`, `c = x1 − b` (`b` = 0 without a base), in f64.
    fn sphere_sums(x0: &[f32], x1: &[f32], b: Option<&[f32]>) -> [f64; 3] {
        let n = x0.len().min(x1.len());
        let (x0, x1) = (&x0[..n], &x1[..n]);
        let terms = |a: f64, c: f64| [a * a, c * c, a * c];
        match b {
            Some(b) => {
                let b = &b[..n];
                lane_sums(n, |j| terms(f64::from(x0[j] - b[j]), f64::from(x1[j] - b[j])))
            }
            None => lane_sums(n, |j| terms(f64::from(x0[j]), f64::from(x1[j]))),
        }
    }
}

/// `[Σ v_i·v_j]` over the whole tensors (upper triangle mirrored), in f64.
fn gram(n: usize, vs: &[&HostTensor], minus: Option<&HostTensor>) -> Vec<Vec<f64>> {
    let k = vs.len();
    let mut inputs: Vec<&HostTensor> = vs.to_vec();
    inputs.extend(minus);
    let flat = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; k * k],
        |acc, _, xs| {
            let m = minus.map(|_| xs[k]);
            for a in 0..k {
                for b in a..k {
                    acc[a * k + b] += dot_minus(xs[a], xs[b], m);
                }
            }
        },
        add_vecs,
    );
    (0..k)
        .map(|a| (0..k).map(|b| flat[a.min(b) * k + a.max(b)]).collect())
        .collect()
}

/// Writes `Σ c_i (x_i − base) [+ base]` for per-element coefficient groups: element `j` uses
/// `coefs[group(j)]`.
#[allow(clippy::too_many_arguments)]
fn combine(
    n: usize,
    xs: &[&HostTensor],
    base: Option<&HostTensor>,
    add_base: bool,
    coefs: &[Vec<f32>],
    group: impl Fn(usize) -> usize + Sync,
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let k = xs.len();
    let mut inputs: Vec<&HostTensor> = xs.to_vec();
    inputs.extend(base);
    tiles::output(n, &inputs, out_dtype, sink, |lo, t, out| {
        for (j, o) in out.iter_mut().enumerate() {
            let c = &coefs[group(lo + j)];
            let b = if base.is_some() { t[k][j] } else { 0.0 };
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += c[i] * (t[i][j] - b);
            }
            *o = if add_base { acc + b } else { acc };
        }
    })
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
        |_| 0,
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
    let group = move |j: usize| match vectors {
        Vectors::Flat => 0,
        Vectors::Rows => j / cols,
        Vectors::Columns => j % cols,
    };
    let mut inputs: Vec<&HostTensor> = vec![x0, x1];
    inputs.extend(base);
    // Per vector: |v0|², |v1|², v0·v1.
    let sums = tiles::reduce(
        n,
        &inputs,
        || vec![0.0f64; 3 * count],
        |acc, lo, xs| {
            let len = xs[0].len();
            let b = base.map(|_| xs[2]);
            if vectors == Vectors::Columns {
                // Every element is in another vector: no runs to sum.
                for j in 0..len {
                    let bj = b.map_or(0.0, |b| b[j]);
                    let (a, c) = (f64::from(xs[0][j] - bj), f64::from(xs[1][j] - bj));
                    let g = 3 * group(lo + j);
                    acc[g] += a * a;
                    acc[g + 1] += c * c;
                    acc[g + 2] += a * c;
                }
                return;
            }
            // Runs of elements in one vector: the whole tile, or up to a row's end.
            let mut j = 0;
            while j < len {
                let end = match vectors {
                    Vectors::Rows => len.min((lo + j) / cols * cols + cols - lo),
                    _ => len,
                };
                let g = 3 * group(lo + j);
                let sums = sphere_sums(&xs[0][j..end], &xs[1][j..end], b.map(|b| &b[j..end]));
                for (a, s) in acc[g..g + 3].iter_mut().zip(sums) {
                    *a += s;
                }
                j = end;
            }
        },
        add_vecs,
    );
    let t64 = t as f64;
    let coefs: Vec<Vec<f32>> = (0..count)
        .map(|g| {
            let n0 = sums[3 * g].sqrt().max(1e-7);
            let n1 = sums[3 * g + 1].sqrt().max(1e-7);
            let cos = (sums[3 * g + 2] / (n0 * n1)).clamp(-1.0, 1.0);
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
        group,
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
        return combine(n, xs, None, false, &[vec![1.0]], |_| 0, out_dtype, sink);
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
        |_| 0,
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
        return combine(n, xs, None, false, &[vec![1.0]], |_| 0, out_dtype, sink);
    }
    let raw = gram(n, xs, None);
    let norms: Vec<f64> = (0..k).map(|i| raw[i][i].sqrt()).collect();
    let alpha = 1.0 / k as f64;
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return combine(n, xs, None, false, &[vec![0.0; k]], |_| 0, out_dtype, sink);
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
    combine(n, xs, None, false, &[coefs], |_| 0, out_dtype, sink)
}
