//! Model-merging operators, per tensor, as mergekit 0.1.x defines them (CPU reference).
//!
//! With `b` the base tensor, `x_i` the models' tensors, `τ_i = x_i − b` and weights `w_i`:
//! - linear: `Σ w_i x_i / Σ w_i` (or without the division when `normalize` is off);
//! - task arithmetic: `b + λ · Σ w_i τ_i [/ Σ w_i]` (divisor 1 where `|Σ w_i| < 1e-8`);
//! - TIES: keep the top-`density` fraction of `|τ_i|` (whole-tensor top-k, `k = ⌊density·n⌋`),
//!   elect the sign of `Σ w_i τ'_i` (`≥ 0` → +), keep the entries of that sign and
//!   `b + λ · Σ m_i w_i τ'_i [/ Σ m_i w_i]` (divisor 1 where it is 0);
//! - SLERP: spherical interpolation of the flattened tensors, linear when `|cos θ| > 0.9995`.
//!
//! Differences from mergekit, on purpose: inputs are upcast to f32 and every result is rounded
//! once to the output dtype (mergekit computes in the input dtype, rounding bf16 at each step);
//! for f32 inputs the two agree to float rounding. Equal magnitudes straddling the TIES cut keep
//! the lowest flat indices (mergekit's order there is unspecified).
//!
//! Execution streams: a tensor is processed in tiles of `TILE` elements in parallel, each tile
//! upcast, merged and rounded in thread-local buffers and handed to a sink, so memory stays a
//! few tiles per thread whatever the tensor size. TIES finds each model's magnitude cut with a
//! two-pass radix select over the bit patterns of `|τ_i|` (for non-negative floats the bit
//! order is the numeric order), so it needs no copy of the task vectors either.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{dtype, DType, HostTensor};

/// Elements per tile: 64 Ki × 4 B = 256 KiB per f32 buffer.
const TILE: usize = 1 << 16;

/// A merge method with its resolved parameters (one weight/density per model, in model order).
#[derive(Clone, Debug, PartialEq)]
pub enum MergeOp {
    Linear {
        weights: Vec<f32>,
        normalize: bool,
    },
    TaskArithmetic {
        weights: Vec<f32>,
        lambda: f32,
        normalize: bool,
    },
    Ties {
        weights: Vec<f32>,
        densities: Vec<f64>,
        lambda: f32,
        normalize: bool,
    },
    Slerp {
        t: f32,
    },
}

impl MergeOp {
    /// Whether the op needs a base tensor (`Linear` does not).
    pub fn needs_base(&self) -> bool {
        !matches!(self, MergeOp::Linear { .. })
    }
}

/// Receives merged bytes: `(byte offset within the tensor, bytes in the output dtype)`.
pub type Sink<'a> = dyn Fn(usize, &[u8]) -> Result<()> + Sync + 'a;

/// Merges one tensor. `base` is the base model's tensor (SLERP: the t = 0 end), `models` the
/// others' (SLERP: exactly one, the t = 1 end). All share one shape; `name` is for errors.
pub fn merge_tensor(
    name: &str,
    op: &MergeOp,
    base: Option<&HostTensor>,
    models: &[&HostTensor],
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = models
        .first()
        .map(|m| m.numel())
        .or(base.map(|b| b.numel()))
        .ok_or_else(|| Error::tensor(name, "merge has no input"))?;
    for t in models.iter().copied().chain(base) {
        if t.numel() != n {
            return Err(Error::tensor(
                name,
                format!("inputs differ in shape ({:?} vs {n} elements)", t.shape),
            ));
        }
    }
    if op.needs_base() && base.is_none() {
        return Err(Error::tensor(name, "this merge method needs a base model"));
    }
    match op {
        MergeOp::Linear { weights, normalize } => {
            let total: f32 = weights.iter().sum();
            if *normalize && total == 0.0 {
                return Err(Error::tensor(
                    name,
                    "linear merge weights sum to zero; cannot normalise",
                ));
            }
            tiles(n, models, base, out_dtype, sink, |_, xs, _, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    let mut acc = 0.0f32;
                    for (x, &w) in xs.iter().zip(weights) {
                        acc += w * x[j];
                    }
                    *o = if *normalize { acc / total } else { acc };
                }
            })
        }
        MergeOp::TaskArithmetic {
            weights,
            lambda,
            normalize,
        } => {
            let sum: f32 = weights.iter().sum();
            let divisor = if sum.abs() < 1e-8 { 1.0 } else { sum };
            tiles(n, models, base, out_dtype, sink, |_, xs, b, out| {
                let b = b.expect("checked above");
                for (j, o) in out.iter_mut().enumerate() {
                    let mut mixed = 0.0f32;
                    for (x, &w) in xs.iter().zip(weights) {
                        mixed += (x[j] - b[j]) * w;
                    }
                    if *normalize {
                        mixed /= divisor;
                    }
                    if *lambda != 1.0 {
                        mixed *= lambda;
                    }
                    *o = b[j] + mixed;
                }
            })
        }
        MergeOp::Ties {
            weights,
            densities,
            lambda,
            normalize,
        } => {
            let base = base.expect("checked above");
            let cuts = models
                .iter()
                .zip(densities)
                .map(|(m, &d)| magnitude_cut(name, base, m, d))
                .collect::<Result<Vec<_>>>()?;
            tiles(
                n,
                models,
                Some(base),
                out_dtype,
                sink,
                |tile, xs, b, out| {
                    let b = b.expect("base given");
                    let mut seen_equal = vec![0usize; xs.len()];
                    let mut wd = vec![0.0f32; xs.len()];
                    for (j, o) in out.iter_mut().enumerate() {
                        let mut sum = 0.0f32;
                        for (i, (x, &w)) in xs.iter().zip(weights).enumerate() {
                            let tau = x[j] - b[j];
                            let keep = cuts[i].keeps(tau, tile, &mut seen_equal[i]);
                            wd[i] = if keep { tau * w } else { 0.0 };
                            sum += wd[i];
                        }
                        let elected_positive = sum >= 0.0;
                        let (mut mixed, mut div) = (0.0f32, 0.0f32);
                        for (&d, &w) in wd.iter().zip(weights) {
                            if d != 0.0 && (d > 0.0) == elected_positive {
                                mixed += d;
                                div += w;
                            }
                        }
                        if div == 0.0 {
                            div = 1.0;
                        }
                        if *normalize {
                            mixed /= div;
                        }
                        if *lambda != 1.0 {
                            mixed *= lambda;
                        }
                        *o = b[j] + mixed;
                    }
                },
            )
        }
        MergeOp::Slerp { t } => {
            let [m] = models else {
                return Err(Error::tensor(
                    name,
                    format!("slerp merges exactly 2 models, got {}", models.len() + 1),
                ));
            };
            let base = base.expect("checked above");
            let (s0, s1) = slerp_coefficients(base, m, *t);
            tiles(n, models, Some(base), out_dtype, sink, |_, xs, b, out| {
                let (v0, v1) = (b.expect("base given"), xs[0]);
                for (j, o) in out.iter_mut().enumerate() {
                    *o = s0 * v0[j] + s1 * v1[j];
                }
            })
        }
    }
}

/// Runs `f(tile_index, model tiles, base tile, out tile)` over all tiles in parallel and sinks
/// each result rounded to `out_dtype`.
fn tiles(
    n: usize,
    models: &[&HostTensor],
    base: Option<&HostTensor>,
    out_dtype: DType,
    sink: &Sink,
    f: impl Fn(usize, &[&[f32]], Option<&[f32]>, &mut [f32]) + Sync,
) -> Result<()> {
    let m = models.len();
    (0..n.div_ceil(TILE)).into_par_iter().try_for_each_init(
        || (vec![0.0f32; TILE * (m + 2)], Vec::with_capacity(TILE * 4)),
        |(buf, bytes), tile| {
            let (lo, hi) = (tile * TILE, ((tile + 1) * TILE).min(n));
            let len = hi - lo;
            let (inputs, rest) = buf.split_at_mut(TILE * m);
            let (base_buf, out) = rest.split_at_mut(TILE);
            for (i, t) in models.iter().enumerate() {
                upcast_range(t, lo, hi, &mut inputs[i * TILE..i * TILE + len]);
            }
            let b = base.map(|t| {
                upcast_range(t, lo, hi, &mut base_buf[..len]);
                &base_buf[..len]
            });
            let xs: Vec<&[f32]> = (0..m).map(|i| &inputs[i * TILE..i * TILE + len]).collect();
            f(tile, &xs, b, &mut out[..len]);
            bytes.clear();
            dtype::from_f32_into(out_dtype, &out[..len], bytes);
            sink(lo * out_dtype.size(), bytes)
        },
    )
}

fn upcast_range(t: &HostTensor, lo: usize, hi: usize, dst: &mut [f32]) {
    let s = t.dtype.size();
    dtype::to_f32(t.dtype, &t.data()[lo * s..hi * s], dst);
}

/// Where a model's TIES magnitude cut falls: entries with `|τ|` bits above `bits` are kept; of
/// those exactly at `bits`, tile `i` keeps its first `equal_quota[i]`.
struct MagnitudeCut {
    keep_all: bool,
    bits: u32,
    equal_quota: Vec<usize>,
}

impl MagnitudeCut {
    /// Whether this entry survives; `seen_equal` counts this tile's entries at the cut so far.
    #[inline]
    fn keeps(&self, tau: f32, tile: usize, seen_equal: &mut usize) -> bool {
        if self.keep_all {
            return true;
        }
        let bits = tau.abs().to_bits();
        if bits > self.bits {
            true
        } else if bits == self.bits && *seen_equal < self.equal_quota[tile] {
            *seen_equal += 1;
            true
        } else {
            false
        }
    }
}

/// The top-`k` cut of `|model − base|`, `k = ⌊density · n⌋`, by a radix select on the upper
/// then lower 16 bits of the magnitudes' bit patterns.
fn magnitude_cut(
    name: &str,
    base: &HostTensor,
    model: &HostTensor,
    density: f64,
) -> Result<MagnitudeCut> {
    let n = base.numel();
    if density >= 1.0 {
        return Ok(MagnitudeCut {
            keep_all: true,
            bits: 0,
            equal_quota: vec![],
        });
    }
    let k = (density * n as f64) as usize;
    if k == 0 {
        return Err(Error::tensor(
            name,
            format!("density {density} keeps no entry of its {n} elements; raise density"),
        ));
    }
    let abs_bits = |tile: usize, f: &mut dyn FnMut(u32)| {
        let (lo, hi) = (tile * TILE, ((tile + 1) * TILE).min(n));
        let mut b = vec![0.0f32; hi - lo];
        let mut x = vec![0.0f32; hi - lo];
        upcast_range(base, lo, hi, &mut b);
        upcast_range(model, lo, hi, &mut x);
        for (x, b) in x.iter().zip(&b) {
            f((x - b).abs().to_bits());
        }
    };
    let n_tiles = n.div_ceil(TILE);
    let histogram = |select: &(dyn Fn(u32) -> Option<usize> + Sync)| -> Vec<usize> {
        (0..n_tiles)
            .into_par_iter()
            .fold(
                || vec![0usize; 1 << 16],
                |mut h, tile| {
                    abs_bits(tile, &mut |bits| {
                        if let Some(bin) = select(bits) {
                            h[bin] += 1;
                        }
                    });
                    h
                },
            )
            .reduce(
                || vec![0usize; 1 << 16],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            )
    };
    // The bin holding the k-th largest, counting from the top, and how many lie above it.
    let find = |h: &[usize], k: usize| -> (usize, usize) {
        let mut above = 0;
        for bin in (0..h.len()).rev() {
            if above + h[bin] >= k {
                return (bin, above);
            }
            above += h[bin];
        }
        (0, above)
    };
    let hi_hist = histogram(&|bits| Some((bits >> 16) as usize));
    let (hi, above_hi) = find(&hi_hist, k);
    let lo_hist =
        histogram(&|bits| ((bits >> 16) as usize == hi).then_some((bits & 0xFFFF) as usize));
    let (lo, above_lo) = find(&lo_hist, k - above_hi);
    let cut = ((hi as u32) << 16) | lo as u32;
    let mut equal_needed = k - above_hi - above_lo;

    // Ties at the cut: the lowest flat indices win, so hand out the quota tile by tile in order.
    let equal_per_tile: Vec<usize> = (0..n_tiles)
        .into_par_iter()
        .map(|tile| {
            let mut c = 0;
            abs_bits(tile, &mut |bits| c += (bits == cut) as usize);
            c
        })
        .collect();
    let equal_quota = equal_per_tile
        .iter()
        .map(|&c| {
            let q = c.min(equal_needed);
            equal_needed -= q;
            q
        })
        .collect();
    Ok(MagnitudeCut {
        keep_all: false,
        bits: cut,
        equal_quota,
    })
}

/// SLERP's two coefficients for the whole tensor: `(s0, s1)` with `out = s0·v0 + s1·v1`.
/// Norms and the cosine are accumulated in f64 over the flattened tensors; vectors whose norm
/// is ≤ 1e-8 are left unnormalised, as in mergekit.
fn slerp_coefficients(v0: &HostTensor, v1: &HostTensor, t: f32) -> (f32, f32) {
    let n = v0.numel();
    let (s00, s11, s01) = (0..n.div_ceil(TILE))
        .into_par_iter()
        .map(|tile| {
            let (lo, hi) = (tile * TILE, ((tile + 1) * TILE).min(n));
            let (mut a, mut b) = (vec![0.0f32; hi - lo], vec![0.0f32; hi - lo]);
            upcast_range(v0, lo, hi, &mut a);
            upcast_range(v1, lo, hi, &mut b);
            a.iter()
                .zip(&b)
                .fold((0.0f64, 0.0f64, 0.0f64), |(aa, bb, ab), (&x, &y)| {
                    let (x, y) = (x as f64, y as f64);
                    (aa + x * x, bb + y * y, ab + x * y)
                })
        })
        .reduce(|| (0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let norm = |ss: f64| {
        let n = ss.sqrt();
        if n > 1e-8 {
            n
        } else {
            1.0
        }
    };
    let dot = s01 / (norm(s00) * norm(s11));
    let t = t as f64;
    if dot.abs() > 0.9995 {
        return ((1.0 - t) as f32, t as f32);
    }
    let theta_0 = dot.acos();
    let sin_theta_0 = theta_0.sin();
    let theta_t = theta_0 * t;
    (
        ((theta_0 - theta_t).sin() / sin_theta_0) as f32,
        (theta_t.sin() / sin_theta_0) as f32,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn t(v: &[f32]) -> HostTensor {
        HostTensor::from_f32(v, vec![v.len()], DType::F32)
    }

    fn run(op: &MergeOp, base: Option<&HostTensor>, models: &[&HostTensor]) -> Vec<f32> {
        let n = models.first().map(|m| m.numel()).unwrap_or(0);
        let out = Mutex::new(vec![0u8; n * 4]);
        merge_tensor("t", op, base, models, DType::F32, &|off, b| {
            out.lock().unwrap()[off..off + b.len()].copy_from_slice(b);
            Ok(())
        })
        .unwrap();
        dtype::to_f32_vec(DType::F32, &out.into_inner().unwrap())
    }

    #[test]
    fn ties_keeps_top_k_elects_sign_and_normalises() {
        let base = t(&[0.0; 6]);
        let a = t(&[3.0, -1.0, 0.5, 2.0, 0.0, -4.0]);
        let b = t(&[-1.0, 2.0, 0.25, 1.0, 0.0, 1.0]);
        let op = MergeOp::Ties {
            weights: vec![1.0, 0.5],
            densities: vec![0.5, 0.5],
            lambda: 1.0,
            normalize: true,
        };
        // k = 3. a keeps -4, 3, 2 (indices 5, 0, 3). |b| = [1, 2, .25, 1, 0, 1]: b keeps 2 and,
        // of the three 1s tied at the cut, the two lowest indices (0 and 3).
        let got = run(&op, Some(&base), &[&a, &b]);
        // idx0: a 3, b -0.5 → + elected, a alone: 3 / 1.  idx1: b 1 → 1 / 0.5.
        // idx3: a 2, b 0.5 → 2.5 / 1.5.  idx5: a -4 (b dropped) → -4.  Others: base.
        assert_eq!(got, [3.0, 2.0, 0.0, 2.5 / 1.5, 0.0, -4.0]);
    }

    #[test]
    fn slerp_is_lerp_when_colinear_and_rotates_otherwise() {
        let a = t(&[1.0, 0.0]);
        let b = t(&[2.0, 0.0]);
        assert_eq!(
            run(&MergeOp::Slerp { t: 0.25 }, Some(&a), &[&b]),
            [1.25, 0.0]
        );
        let c = t(&[0.0, 1.0]);
        let got = run(&MergeOp::Slerp { t: 0.5 }, Some(&a), &[&c]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (got[0] - h).abs() < 1e-6 && (got[1] - h).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn linear_and_task_arithmetic_formulas() {
        let base = t(&[1.0, 1.0]);
        let a = t(&[2.0, 0.0]);
        let b = t(&[4.0, 3.0]);
        let lin = MergeOp::Linear {
            weights: vec![1.0, 3.0],
            normalize: true,
        };
        assert_eq!(run(&lin, None, &[&a, &b]), [3.5, 2.25]);
        let ta = MergeOp::TaskArithmetic {
            weights: vec![1.0, 0.5],
            lambda: 2.0,
            normalize: false,
        };
        assert_eq!(
            run(&ta, Some(&base), &[&a, &b]),
            [1.0 + 2.0 * (1.0 + 1.5), 1.0 + 2.0 * (-1.0 + 1.0)]
        );
    }

    #[test]
    fn radix_cut_matches_sorting_on_large_random_tensors() {
        let n = 3 * TILE + 123;
        let mut s = 11u64;
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                // Few distinct values: many ties at the cut.
                ((s >> 40) % 97) as f32 / 16.0 - 3.0
            })
            .collect();
        let base = t(&vec![0.0; n]);
        let m = t(&vals);
        for density in [0.1, 0.37, 0.9] {
            let k = (density * n as f64) as usize;
            let cut = magnitude_cut("t", &base, &m, density).unwrap();
            let mut seen = vec![0usize; n.div_ceil(TILE)];
            let kept: Vec<usize> = (0..n)
                .filter(|&j| cut.keeps(vals[j], j / TILE, &mut seen[j / TILE]))
                .collect();
            assert_eq!(kept.len(), k);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| vals[b].abs().total_cmp(&vals[a].abs()).then(a.cmp(&b)));
            let mut want = order[..k].to_vec();
            want.sort();
            assert_eq!(kept, want, "density {density}");
        }
    }
}
