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

/// Elements per tile: 16 Ki × 4 B = 64 KiB per f32 buffer, so a tile's inputs and output stay
/// in L2 between the upcast and the arithmetic.
const TILE: usize = 1 << 14;
/// Largest tensor whose TIES magnitudes are kept in memory (64 Mi elements: 256 MB of u32).
const IN_MEMORY_BITS: usize = 1 << 26;
/// Tiles per task and per sink call (1 Mi elements: 2–4 MB of output).
const TILES_PER_CHUNK: usize = 64;

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
                // Model-outer loops vectorise; the sum order per element is mergekit's.
                out.fill(0.0);
                for (x, &w) in xs.iter().zip(weights) {
                    out.iter_mut().zip(*x).for_each(|(o, &x)| *o += w * x);
                }
                if *normalize {
                    out.iter_mut().for_each(|o| *o /= total);
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
                out.fill(0.0);
                for (x, &w) in xs.iter().zip(weights) {
                    out.iter_mut()
                        .zip(*x)
                        .zip(b)
                        .for_each(|((o, &x), &b)| *o += (x - b) * w);
                }
                for (o, &b) in out.iter_mut().zip(b) {
                    let mut mixed = *o;
                    if *normalize {
                        mixed /= divisor;
                    }
                    if *lambda != 1.0 {
                        mixed *= lambda;
                    }
                    *o = b + mixed;
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
                    SCRATCH.with_borrow_mut(|scratch| {
                        ties_tile(
                            tile, xs, b, weights, &cuts, *lambda, *normalize, out, scratch,
                        )
                    })
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

/// Runs `f(tile_index, model tiles, base tile, out tile)` over all tiles and sinks the results
/// rounded to `out_dtype`. Tasks take `TILES_PER_CHUNK` consecutive tiles, so that each sink
/// call (a `pwrite` in the merge command) moves megabytes: per-tile writes from several threads
/// contend on the output file's lock.
fn tiles(
    n: usize,
    models: &[&HostTensor],
    base: Option<&HostTensor>,
    out_dtype: DType,
    sink: &Sink,
    f: impl Fn(usize, &[&[f32]], Option<&[f32]>, &mut [f32]) + Sync,
) -> Result<()> {
    let m = models.len();
    let chunk = TILE * TILES_PER_CHUNK;
    (0..n.div_ceil(chunk)).into_par_iter().try_for_each_init(
        || (vec![0.0f32; TILE * (m + 2)], Vec::with_capacity(chunk * 4)),
        |(buf, bytes), c| {
            bytes.clear();
            let first = c * TILES_PER_CHUNK;
            for tile in first..(first + TILES_PER_CHUNK).min(n.div_ceil(TILE)) {
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
                dtype::from_f32_into(out_dtype, &out[..len], bytes);
            }
            sink(c * chunk * out_dtype.size(), bytes)
        },
    )
}

thread_local! {
    /// Per-thread scratch of the TIES tile: reused, because a fresh allocation of this size per
    /// tile goes to mmap and costs page faults.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One TIES tile, in model-outer loops that vectorise: sparsify and weight each task vector,
/// elect the sign per entry, then average the agreeing entries.
#[allow(clippy::too_many_arguments)]
fn ties_tile(
    tile: usize,
    xs: &[&[f32]],
    b: &[f32],
    weights: &[f32],
    cuts: &[MagnitudeCut],
    lambda: f32,
    normalize: bool,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (len, m) = (out.len(), xs.len());
    scratch.resize((m + 1) * len, 0.0);
    let (wd, div) = scratch.split_at_mut(m * len);
    for (i, (x, &w)) in xs.iter().zip(weights).enumerate() {
        let d = &mut wd[i * len..(i + 1) * len];
        let cut = &cuts[i];
        if cut.keep_all {
            d.iter_mut()
                .zip(*x)
                .zip(b)
                .for_each(|((d, &x), &b)| *d = (x - b) * w);
            continue;
        }
        // Quotas go to the lowest indices first, so every tile but one keeps all or none of
        // its entries at the cut: only that one needs the scalar pass below.
        let (quota, at_cut) = (cut.equal_quota[tile], cut.equal_count[tile]);
        let keep_equal = quota == at_cut;
        d.iter_mut().zip(*x).zip(b).for_each(|((d, &x), &b)| {
            let tau = x - b;
            let bits = tau.abs().to_bits();
            *d = if bits > cut.bits || (keep_equal && bits == cut.bits) {
                tau * w
            } else {
                0.0
            };
        });
        if keep_equal {
            continue;
        }
        let mut quota = quota;
        for (j, d) in d.iter_mut().enumerate() {
            if quota == 0 {
                break;
            }
            let tau = x[j] - b[j];
            if tau.abs().to_bits() == cut.bits {
                *d = tau * w;
                quota -= 1;
            }
        }
    }
    // Σ_i wd_i, in model order: its sign is the elected one (≥ 0 → +).
    out.fill(0.0);
    for i in 0..m {
        out.iter_mut()
            .zip(&wd[i * len..(i + 1) * len])
            .for_each(|(s, &d)| *s += d);
    }
    // Keep entries agreeing with the elected sign; `out` turns from the sum into the mix.
    div.fill(0.0);
    for i in 0..m {
        let w = weights[i];
        for ((s, dv), d) in out
            .iter()
            .zip(div.iter_mut())
            .zip(wd[i * len..(i + 1) * len].iter_mut())
        {
            // Non-zero and of the elected sign, written branch-free so that it vectorises.
            let elected = if *s >= 0.0 { 1.0f32 } else { -1.0 };
            let agrees = *d * elected > 0.0;
            *d = if agrees { *d } else { 0.0 };
            *dv += if agrees { w } else { 0.0 };
        }
    }
    out.fill(0.0);
    for i in 0..m {
        out.iter_mut()
            .zip(&wd[i * len..(i + 1) * len])
            .for_each(|(o, &d)| *o += d);
    }
    for ((o, &dv), &b) in out.iter_mut().zip(div.iter()).zip(b) {
        let mut mixed = *o;
        if normalize {
            mixed /= if dv == 0.0 { 1.0 } else { dv };
        }
        if lambda != 1.0 {
            mixed *= lambda;
        }
        *o = b + mixed;
    }
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
    /// Entries exactly at the cut, per tile.
    equal_count: Vec<usize>,
}

#[cfg(test)]
impl MagnitudeCut {
    /// Whether this entry survives (the per-entry form of `ties_tile`'s rule); `seen_equal` counts this tile's entries at the cut so far.
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
            equal_count: vec![],
        });
    }
    let k = (density * n as f64) as usize;
    if k == 0 {
        return Err(Error::tensor(
            name,
            format!("density {density} keeps no entry of its {n} elements; raise density"),
        ));
    }
    let n_tiles = n.div_ceil(TILE);
    // |τ| bit patterns of one tile, into `bits` (scratch `b`, `x`); a vectorisable loop.
    let tile_bits = |tile: usize, bits: &mut Vec<u32>, b: &mut Vec<f32>, x: &mut Vec<f32>| {
        let (lo, hi) = (tile * TILE, ((tile + 1) * TILE).min(n));
        b.resize(hi - lo, 0.0);
        x.resize(hi - lo, 0.0);
        bits.resize(hi - lo, 0);
        upcast_range(base, lo, hi, b);
        upcast_range(model, lo, hi, x);
        for ((o, x), b) in bits.iter_mut().zip(x.iter()).zip(b.iter()) {
            *o = (x - b).abs().to_bits();
        }
    };
    // One contiguous range of tiles per thread, so that only `threads` histograms are merged.
    let workers = rayon::current_num_threads().max(1);
    let per_worker = n_tiles.div_ceil(workers);
    // Tensors up to IN_MEMORY_BITS elements keep their |τ| bits in memory for the three scans;
    // larger ones (a Llama-3 embedding) recompute them per scan to bound memory.
    let in_memory: Option<Vec<u32>> = (n <= IN_MEMORY_BITS).then(|| {
        let mut all = vec![0u32; n];
        all.par_chunks_mut(TILE).enumerate().for_each_init(
            || (vec![], vec![], vec![]),
            |(bits, b, x), (tile, out)| {
                tile_bits(tile, bits, b, x);
                out.copy_from_slice(bits);
            },
        );
        all
    });
    let for_each_tile = |w: usize, f: &mut dyn FnMut(usize, &[u32])| {
        let (mut bits, mut b, mut x) = (vec![], vec![], vec![]);
        for tile in w * per_worker..((w + 1) * per_worker).min(n_tiles) {
            match &in_memory {
                Some(all) => f(tile, &all[tile * TILE..((tile + 1) * TILE).min(n)]),
                None => {
                    tile_bits(tile, &mut bits, &mut b, &mut x);
                    f(tile, &bits);
                }
            }
        }
    };
    // Histogram of the upper 16 bits (`within: None`) or of the lower 16 bits of the entries
    // whose upper 16 bits are `within`.
    let histogram = |within: Option<u32>| -> Vec<usize> {
        (0..workers)
            .into_par_iter()
            .map(|w| {
                let mut h = vec![0usize; 1 << 16];
                for_each_tile(w, &mut |_, bits| match within {
                    None => bits.iter().for_each(|&v| h[(v >> 16) as usize] += 1),
                    Some(top) => bits
                        .iter()
                        .filter(|&&v| v >> 16 == top)
                        .for_each(|&v| h[(v & 0xFFFF) as usize] += 1),
                });
                h
            })
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
    let (hi, above_hi) = find(&histogram(None), k);
    let (lo, above_lo) = find(&histogram(Some(hi as u32)), k - above_hi);
    let cut = ((hi as u32) << 16) | lo as u32;
    let mut equal_needed = k - above_hi - above_lo;

    // Ties at the cut: the lowest flat indices win, so hand out the quota tile by tile in order.
    let mut equal_per_tile = vec![0usize; n_tiles];
    let counts: Vec<Vec<(usize, usize)>> = (0..workers)
        .into_par_iter()
        .map(|w| {
            let mut c = vec![];
            for_each_tile(w, &mut |tile, bits| {
                c.push((tile, bits.iter().filter(|&&v| v == cut).count()))
            });
            c
        })
        .collect();
    for (tile, c) in counts.into_iter().flatten() {
        equal_per_tile[tile] = c;
    }
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
        equal_count: equal_per_tile,
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

    /// TIES on multi-tile tensors full of ties at the cut, against a slow per-entry reference
    /// (sort for the top-k, lowest index first among equals).
    #[test]
    fn ties_matches_slow_reference_across_tiles() {
        let n = 3 * TILE + 77;
        let mut s = 5u64;
        let mut level = |m: u64| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) % m) as f32 / 8.0 - 1.0
        };
        let base: Vec<f32> = (0..n).map(|_| level(5) * 0.5).collect();
        let models: Vec<Vec<f32>> = (0..3)
            .map(|_| base.iter().map(|b| b + level(17)).collect())
            .collect();
        let (weights, densities) = (vec![1.0f32, 0.7, -0.4], vec![0.3, 0.55, 1.0]);
        let op = MergeOp::Ties {
            weights: weights.clone(),
            densities: densities.clone(),
            lambda: 0.8,
            normalize: true,
        };
        let bt = t(&base);
        let mt: Vec<HostTensor> = models.iter().map(|m| t(m)).collect();
        let got = run(&op, Some(&bt), &mt.iter().collect::<Vec<_>>());

        let kept: Vec<Vec<bool>> = models
            .iter()
            .zip(&densities)
            .map(|(m, &d)| {
                let tau: Vec<f32> = m.iter().zip(&base).map(|(x, b)| x - b).collect();
                if d >= 1.0 {
                    return vec![true; n];
                }
                let k = (d * n as f64) as usize;
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| tau[b].abs().total_cmp(&tau[a].abs()).then(a.cmp(&b)));
                let mut keep = vec![false; n];
                order[..k].iter().for_each(|&j| keep[j] = true);
                keep
            })
            .collect();
        for j in 0..n {
            let wd: Vec<f32> = (0..3)
                .map(|i| {
                    if kept[i][j] {
                        (models[i][j] - base[j]) * weights[i]
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f32 = wd.iter().sum();
            let (mut mixed, mut div) = (0.0f32, 0.0f32);
            for i in 0..3 {
                if wd[i] != 0.0 && (wd[i] > 0.0) == (sum >= 0.0) {
                    mixed += wd[i];
                    div += weights[i];
                }
            }
            let want = base[j] + mixed / if div == 0.0 { 1.0 } else { div } * 0.8;
            assert!(
                (got[j] - want).abs() <= 1e-6,
                "entry {j}: {} vs {want}",
                got[j]
            );
        }
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
