//! mergekit's generalised task arithmetic: `task_arithmetic`, `ties`, `dare_linear`,
//! `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`.
//!
//! With `b` the base and `τ_i = x_i − b`: each task vector is sparsified (magnitude top-k,
//! random drops, a magnitude window, or DELLA's rank-weighted drops), optionally rescaled so
//! that its L1 norm is unchanged (`rescale`), weighted; with sign consensus only the entries
//! agreeing with the sign of `Σ w_i τ'_i` (≥ 0 → +) are kept; then
//! `b + λ · Σ w_i τ'_i / divisor`, the divisor (with `normalize`) being `Σ w_i` over the
//! models (1 where |Σ| < 1e-8) or, with consensus, over the agreeing ones per entry (1 where 0).

// Element loops index several parallel tiles (one per model) at once.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::methods::Sink;
use super::mt::{bit, MaskStream};
use super::select::{magnitude_scores, Ranked};
use super::tiles::{self, upcast_range};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor};
use crate::simd::widest_simd;

/// How each task vector is thinned before the merge.
#[derive(Clone, Debug, PartialEq)]
pub enum Sparsify {
    /// Kept whole (task arithmetic).
    None,
    /// The top `⌊density·n⌋` magnitudes, at least one (TIES).
    Magnitude,
    /// Each entry kept with probability `density` (DARE).
    Random(MaskStream),
    /// Drops the largest `⌊γ·n⌋` and keeps the next `⌊density·n⌋` (breadcrumbs); per model γ.
    Outliers(Vec<f64>),
    /// Each entry kept with a probability rising linearly with its magnitude's rank in its row,
    /// from `density − ε` to `density + ε` (DELLA); per model ε.
    Della(MaskStream, Vec<f64>),
}

impl Sparsify {
    pub fn is_random(&self) -> bool {
        matches!(self, Sparsify::Random(_) | Sparsify::Della(..))
    }
}

/// One merge of the family, its parameters resolved for one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Gta {
    pub weights: Vec<f32>,
    /// Per model; 1 keeps everything.
    pub densities: Vec<f64>,
    pub sparsify: Sparsify,
    /// Sign consensus (the `_ties` methods).
    pub consensus: bool,
    pub normalize: bool,
    /// Rescale each sparsified task vector to its L1 norm before.
    pub rescale: bool,
    pub lambda: f32,
}

/// Elements per block of DELLA's drawing: the probabilities of a block are computed in
/// parallel, then drawn in order.
const DRAW_BLOCK: usize = 1 << 20;

pub fn merge(
    name: &str,
    g: &Gta,
    base: &HostTensor,
    models: &[&HostTensor],
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let n = base.numel();
    let m = models.len();
    // Each model's keep mask (None: all kept), in model order (the random streams' order).
    let masks: Vec<Option<Vec<u64>>> = models
        .iter()
        .zip(&g.densities)
        .enumerate()
        .map(|(i, (x, &d))| mask(name, g, i, base, x, d, n))
        .collect::<Result<_>>()?;
    // L1 rescaling: Σ|τ| / Σ|τ·mask| per model, over the whole tensor.
    let scale: Vec<f32> = if g.rescale {
        let mut inputs: Vec<&HostTensor> = vec![base];
        inputs.extend(models);
        let sums = tiles::reduce(
            n,
            &inputs,
            || vec![0.0f64; 2 * m],
            |acc, lo, xs| {
                // Tiles start on mask words (TILE is a multiple of 64).
                for i in 0..m {
                    let words = masks[i].as_deref().map(|mk| &mk[lo / 64..]);
                    let (all, kept) = abs_sums(xs[i + 1], xs[0], words);
                    acc[2 * i] += all;
                    acc[2 * i + 1] += kept;
                }
            },
            tiles::add_vecs,
        );
        (0..m)
            .map(|i| {
                let (before, after) = (sums[2 * i] as f32, sums[2 * i + 1] as f32);
                if masks[i].is_none() || before < 1e-7 || after < 1e-7 {
                    1.0
                } else {
                    before / after
                }
            })
            .collect()
    } else {
        vec![1.0; m]
    };
    let mut inputs: Vec<&HostTensor> = vec![base];
    inputs.extend(models);
    let sum_w: f32 = g.weights.iter().sum();
    let flat_divisor = if sum_w.abs() < 1e-8 { 1.0 } else { sum_w };
    tiles::output(n, &inputs, out_dtype, sink, |lo, xs, out| {
        WD.with_borrow_mut(|wd| mix_tile(g, &scale, &masks, flat_divisor, lo, xs, out, wd))
    })
}

widest_simd! {
    /// One output tile: the weighted, sparsified task vectors of `xs[1..]` over the base
    /// `xs[0]`, sign consensus when the method elects one, added to the base. `wd` holds the
    /// task vectors (m × tile), reused between tiles.
    #[allow(clippy::too_many_arguments)]
    fn mix_tile(
        g: &Gta,
        scale: &[f32],
        masks: &[Option<Vec<u64>>],
        flat_divisor: f32,
        lo: usize,
        xs: &[&[f32]],
        out: &mut [f32],
        wd: &mut Vec<f32>,
    ) {
        let m = xs.len() - 1;
        let b = xs[0];
        let len = out.len();
        // Weighted, sparsified task vectors, model by model (loops that vectorise).
        wd.resize(m * len, 0.0);
        for i in 0..m {
            let (w, s, d) = (g.weights[i], scale[i], &mut wd[i * len..(i + 1) * len]);
            d.iter_mut()
                .zip(xs[i + 1])
                .zip(b)
                .for_each(|((d, &x), &b)| *d = (x - b) * s * w);
            if let Some(mk) = &masks[i] {
                zero_dropped(d, &mk[lo / 64..]);
            }
        }
        out.fill(0.0);
        for i in 0..m {
            out.iter_mut()
                .zip(&wd[i * len..(i + 1) * len])
                .for_each(|(o, &d)| *o += d);
        }
        if g.consensus {
            // `out` holds Σ w_i τ'_i: its sign is elected; keep the agreeing entries.
            let mut div = vec![0.0f32; len];
            for i in 0..m {
                let w = g.weights[i];
                for ((s, dv), d) in out
                    .iter()
                    .zip(div.iter_mut())
                    .zip(wd[i * len..(i + 1) * len].iter_mut())
                {
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
            for ((o, &dv), &b) in out.iter_mut().zip(&div).zip(b) {
                *o = finish(*o, if dv == 0.0 { 1.0 } else { dv }, g, b);
            }
        } else {
            for (o, &b) in out.iter_mut().zip(b) {
                *o = finish(*o, flat_divisor, g, b);
            }
        }
    }
}

widest_simd! {
    /// `(Σ|x − b|, Σ|x − b| over the kept elements)`, elements `j` kept when bit `j` of `words`
    /// is set (all kept without `words`). Eight f64 lanes: the sums vectorise and keep f64 (not
    /// `simd::lane_sums`: the mask word per 64 elements needs its own loop shape to vectorise).
    fn abs_sums(x: &[f32], b: &[f32], words: Option<&[u64]>) -> (f64, f64) {
        let (mut all, mut kept) = ([0.0f64; 8], [0.0f64; 8]);
        let mut add = |lane: usize, x: f32, b: f32, keep: bool| {
            let a = f64::from((x - b).abs());
            all[lane] += a;
            kept[lane] += if keep { a } else { 0.0 };
        };
        for (c, (x, b)) in x.chunks(64).zip(b.chunks(64)).enumerate() {
            let w = words.map_or(u64::MAX, |ws| ws[c]);
            match (<&[f32; 64]>::try_from(x), <&[f32; 64]>::try_from(b)) {
                // Whole words: fixed trip counts, so each group of 8 becomes vector code.
                (Ok(x), Ok(b)) => {
                    for g in 0..8 {
                        for l in 0..8 {
                            let k = g * 8 + l;
                            add(l, x[k], b[k], w >> k & 1 == 1);
                        }
                    }
                }
                _ => {
                    for (k, (&x, &b)) in x.iter().zip(b).enumerate() {
                        add(k % 8, x, b, w >> k & 1 == 1);
                    }
                }
            }
        }
        (all.iter().sum(), kept.iter().sum())
    }
}

widest_simd! {
    /// Zeroes the elements of `d` whose bit in `words` is clear.
    pub(super) fn zero_dropped(d: &mut [f32], words: &[u64]) {
        for (c, &w) in d.chunks_mut(64).zip(words) {
            for (k, x) in c.iter_mut().enumerate() {
                *x = if w >> k & 1 == 1 { *x } else { 0.0 };
            }
        }
    }
}

#[inline]
fn finish(mixed: f32, divisor: f32, g: &Gta, b: f32) -> f32 {
    let mut mixed = mixed;
    if g.normalize {
        mixed /= divisor;
    }
    if g.lambda != 1.0 {
        mixed *= g.lambda;
    }
    b + mixed
}

thread_local! {
    /// Per-thread weighted task vectors of a tile: reused, because a fresh allocation of this
    /// size per tile goes to mmap and costs page faults.
    static WD: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Model `i`'s keep mask, or `None` when it keeps everything (density ≥ 1: no draws either).
fn mask(
    name: &str,
    g: &Gta,
    i: usize,
    base: &HostTensor,
    x: &HostTensor,
    density: f64,
    n: usize,
) -> Result<Option<Vec<u64>>> {
    if density >= 1.0 || n == 0 {
        return Ok(None);
    }
    let scores = magnitude_scores(base, x);
    Ok(Some(match &g.sparsify {
        Sparsify::None => return Ok(None),
        Sparsify::Magnitude => {
            Ranked::new(n, &scores).top_k(((density * n as f64) as usize).max(1))
        }
        Sparsify::Outliers(gammas) => {
            let target = (density * n as f64) as usize;
            let top = (gammas[i] * n as f64) as usize;
            let bottom = n.saturating_sub(target + top);
            // Ascending positions [bottom, bottom + target) = descending ranks
            // [n − bottom − target, n − bottom).
            Ranked::new(n, &scores).window(n - bottom - target, n - bottom)
        }
        Sparsify::Random(stream) => stream.bernoulli(n, density as f32),
        Sparsify::Della(stream, epsilons) => {
            della_mask(name, stream, base, x, density, epsilons[i])?
        }
    }))
}

/// DELLA's drops: per row (the last dimension; a 1-D tensor is one row), entries ranked by
/// ascending magnitude get `p = (d − ε) + 2ε·(rank − 1)/(cols − 1)`, in mergekit's f32 steps.
fn della_mask(
    name: &str,
    stream: &MaskStream,
    base: &HostTensor,
    x: &HostTensor,
    density: f64,
    epsilon: f64,
) -> Result<Vec<u64>> {
    let n = base.numel();
    let cols = if base.shape.len() < 2 {
        n
    } else {
        n / base.shape[0]
    };
    if cols < 2 {
        return Err(Error::tensor(
            name,
            "della ranks the entries of each row, and this tensor's rows have one entry",
        ));
    }
    let low = (density - epsilon) as f32;
    let eps = epsilon as f32;
    let span = (cols - 1) as f32;
    let rows_per_block = (DRAW_BLOCK / cols).max(1);
    let mut probs = vec![0.0f32; rows_per_block * cols];
    let mut mask = vec![0u64; n.div_ceil(64)];
    let n_rows = n / cols;
    for first in (0..n_rows).step_by(rows_per_block) {
        let rows = rows_per_block.min(n_rows - first);
        let block = &mut probs[..rows * cols];
        block.par_chunks_mut(cols).enumerate().for_each_init(
            || RowScratch::new(cols),
            |t, (r, p)| {
                let lo = (first + r) * cols;
                upcast_range(base, lo, lo + cols, &mut t.b);
                upcast_range(x, lo, lo + cols, &mut t.v);
                // |x − b| is non-negative, so its bits order as integers.
                t.keys.clear();
                let mags = t.v.iter().zip(&t.b).map(|(x, b)| (x - b).abs().to_bits());
                t.keys.extend(mags);
                ascending_order(&t.keys, &mut t.order, &mut t.spare);
                for (rank, &j) in t.order.iter().enumerate() {
                    let rank_norm = ((rank as f32 + 1.0 - 1.0) / span).clamp(0.0, 1.0);
                    p[j as usize] = low + (rank_norm * 2.0) * eps;
                }
            },
        );
        let drawn = stream.bernoulli_each(block);
        // Copy the block's bits to their place (blocks start on row boundaries, not always
        // on words).
        let start = first * cols;
        if start % 64 == 0 {
            mask[start / 64..start / 64 + drawn.len()].copy_from_slice(&drawn);
        } else {
            for j in 0..rows * cols {
                if bit(&drawn, j) {
                    mask[(start + j) / 64] |= 1 << ((start + j) % 64);
                }
            }
        }
    }
    Ok(mask)
}

/// One thread's buffers for DELLA's per-row ranking.
struct RowScratch {
    b: Vec<f32>,
    v: Vec<f32>,
    keys: Vec<u32>,
    order: Vec<u32>,
    spare: Vec<u32>,
}

impl RowScratch {
    fn new(cols: usize) -> Self {
        RowScratch {
            b: vec![0.0; cols],
            v: vec![0.0; cols],
            keys: Vec::with_capacity(cols),
            order: Vec::with_capacity(cols),
            spare: Vec::with_capacity(cols),
        }
    }
}

/// The positions of `keys` in ascending order, equal keys by position: a stable least-
/// significant-digit radix sort on bytes (linear in the row length, where a comparison sort
/// was half of DELLA's time), skipping the bytes that every key shares.
fn ascending_order(keys: &[u32], order: &mut Vec<u32>, spare: &mut Vec<u32>) {
    let n = keys.len();
    order.clear();
    order.extend(0..n as u32);
    spare.resize(n, 0);
    let mut counts = [[0usize; 256]; 4];
    for &k in keys {
        for (d, c) in counts.iter_mut().enumerate() {
            c[(k >> (8 * d)) as usize & 255] += 1;
        }
    }
    for (d, count) in counts.iter_mut().enumerate() {
        if count.contains(&n) {
            continue; // every key has this byte: the pass would not move anything
        }
        let mut sum = 0;
        for c in count.iter_mut() {
            (*c, sum) = (sum, sum + *c);
        }
        for &i in order.iter() {
            let digit = (keys[i as usize] >> (8 * d)) as usize & 255;
            spare[count[digit]] = i;
            count[digit] += 1;
        }
        std::mem::swap(order, spare);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::methods::MergeOp;
    use crate::merge::tiles::TILE;

    fn t(v: &[f32]) -> HostTensor {
        HostTensor::from_f32(v, vec![v.len()], DType::F32)
    }

    fn run(g: &Gta, base: &HostTensor, models: &[&HostTensor]) -> Vec<f32> {
        crate::merge::methods::tests::run(&MergeOp::Gta(g.clone()), Some(base), models)
    }

    fn gta(sparsify: Sparsify, densities: Vec<f64>, rescale: bool) -> Gta {
        Gta {
            weights: vec![1.0; densities.len()],
            densities,
            sparsify,
            consensus: false,
            normalize: false,
            rescale,
            lambda: 1.0,
        }
    }

    #[test]
    fn dare_drops_at_the_density_and_its_rescaling_keeps_the_l1_norm() {
        let n = 4 * TILE + 5;
        let base = t(&vec![0.0; n]);
        let tau: Vec<f32> = (0..n).map(|j| ((j % 13) as f32 - 6.0) / 7.0).collect();
        let x = t(&tau);
        for (density, rescale) in [(0.3, false), (0.3, true), (0.9, true)] {
            let g = gta(Sparsify::Random(MaskStream::new(7)), vec![density], rescale);
            let out = run(&g, &base, &[&x]);
            let nonzero_tau = tau.iter().filter(|v| **v != 0.0).count();
            let kept = out.iter().filter(|v| **v != 0.0).count() as f64 / nonzero_tau as f64;
            assert!(
                (kept - density).abs() < 0.01,
                "drop rate {kept} for {density}"
            );
            let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
            if rescale {
                assert!((l1(&out) / l1(&tau) - 1.0).abs() < 1e-5);
                // Kept entries are τ times one common factor.
                let factors: Vec<f32> = out
                    .iter()
                    .zip(&tau)
                    .filter(|(o, _)| **o != 0.0)
                    .map(|(o, t)| o / t)
                    .collect();
                assert!(factors.iter().all(|f| (f - factors[0]).abs() < 1e-5));
            } else {
                assert!(out.iter().zip(&tau).all(|(o, t)| *o == 0.0 || o == t));
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_drops_and_another_seed_others() {
        let base = t(&vec![0.0; 1000]);
        let x = t(&(0..1000).map(|j| j as f32 + 1.0).collect::<Vec<_>>());
        let go = |seed| {
            run(
                &gta(Sparsify::Random(MaskStream::new(seed)), vec![0.5], false),
                &base,
                &[&x],
            )
        };
        assert_eq!(go(3), go(3));
        assert_ne!(go(3), go(4));
    }

    #[test]
    fn della_keeps_large_magnitudes_more_often() {
        let cols = 200;
        let rows = 400;
        let base = HostTensor::from_f32(&vec![0.0; rows * cols], vec![rows, cols], DType::F32);
        let v: Vec<f32> = (0..rows * cols).map(|j| (j % cols) as f32 + 1.0).collect();
        let x = HostTensor::from_f32(&v, vec![rows, cols], DType::F32);
        let g = gta(
            Sparsify::Della(MaskStream::new(1), vec![0.2]),
            vec![0.5],
            false,
        );
        let out = run(&g, &base, &[&x]);
        let kept_at =
            |c: usize| (0..rows).filter(|r| out[r * cols + c] != 0.0).count() as f64 / rows as f64;
        // p runs from 0.3 (smallest) to 0.7 (largest).
        assert!((kept_at(0) - 0.3).abs() < 0.08, "{}", kept_at(0));
        assert!(
            (kept_at(cols - 1) - 0.7).abs() < 0.08,
            "{}",
            kept_at(cols - 1)
        );
        let total = out.iter().filter(|v| **v != 0.0).count() as f64 / out.len() as f64;
        assert!((total - 0.5).abs() < 0.01, "{total}");
    }

    #[test]
    fn radix_order_is_the_stable_sort_order() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for n in [0, 1, 2, 7, 300, 5000] {
            // Many ties (few distinct values), then all 32 bits in play.
            for spread in [4u64, 1 << 32] {
                let keys: Vec<u32> = (0..n).map(|_| (next() % spread) as u32).collect();
                let (mut order, mut spare) = (vec![], vec![]);
                ascending_order(&keys, &mut order, &mut spare);
                let mut want: Vec<u32> = (0..n as u32).collect();
                want.sort_by_key(|&i| keys[i as usize]);
                assert_eq!(order, want, "n = {n}");
            }
        }
    }

    #[test]
    fn breadcrumbs_drop_the_largest_and_the_smallest() {
        // n = 10, density 0.5, γ 0.2: keep 5 after dropping the top 2 and the bottom 3.
        let base = t(&[0.0; 10]);
        let x = t(&[10.0, -1.0, 2.0, -9.0, 3.0, 8.0, -4.0, 5.0, 6.0, 7.0]);
        let g = gta(Sparsify::Outliers(vec![0.2]), vec![0.5], false);
        let out = run(&g, &base, &[&x]);
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 0.0, 8.0, -4.0, 5.0, 6.0, 7.0]);
    }
}
