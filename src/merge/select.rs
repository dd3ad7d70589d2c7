//! Top-k selection without sorting: the `k` largest of a tensor's non-negative scores (|τ| for
//! TIES and breadcrumbs, the variance across models for SCE), found by a radix select on the
//! upper then lower 16 bits of their f32 bit patterns (for non-negative floats the bit order is
//! the numeric order), and returned as a packed keep mask. Equal scores at the cut go to the
//! lowest indices. Tensors up to `IN_MEMORY` elements keep their scores in memory for the
//! scans; larger ones (a Llama-3 embedding) recompute them per scan to bound memory.

use rayon::prelude::*;

use super::tiles::{range, upcast_range, TILE};
use crate::model::HostTensor;
use crate::simd::widest_simd;

/// Largest tensor whose scores are kept in memory (64 Mi elements: 256 MB of u32).
const IN_MEMORY: usize = 1 << 26;

/// Fills `bits` with the scores' bit patterns of one tile.
pub type TileScores<'a> = dyn Fn(usize, &mut Vec<u32>) + Sync + 'a;

/// `|model − base|` as scores.
pub fn magnitude_scores<'a>(
    base: &'a HostTensor,
    model: &'a HostTensor,
) -> impl Fn(usize, &mut Vec<u32>) + Sync + 'a {
    let n = base.numel();
    move |tile, bits| {
        let (lo, hi) = range(n, tile);
        let (mut b, mut x) = (vec![0.0f32; hi - lo], vec![0.0f32; hi - lo]);
        upcast_range(base, lo, hi, &mut b);
        upcast_range(model, lo, hi, &mut x);
        bits.clear();
        bits.extend(x.iter().zip(&b).map(|(x, b)| (x - b).abs().to_bits()));
    }
}

/// A mask of `n` bits, all set or none.
pub fn full_mask(n: usize, set: bool) -> Vec<u64> {
    let mut m = vec![0u64; n.div_ceil(64)];
    if set {
        set_all(&mut m, n);
    }
    m
}

/// Sets the first `n` bits of `words` (the words of `n` entries) and clears the rest.
fn set_all(words: &mut [u64], n: usize) {
    words.fill(u64::MAX);
    if let (Some(last), tail @ 1..) = (words.last_mut(), n % 64) {
        *last = (1u64 << tail) - 1;
    }
}

/// A tensor's scores, ranked once for one or several top-k selections: the scores (kept in
/// memory when the tensor is small enough) and the histogram of their upper 16 bits are found
/// in one pass, and a rank window's two cuts share every later pass.
pub struct Ranked<'s, 'a> {
    n: usize,
    scores: &'s TileScores<'a>,
    in_memory: Option<Vec<u32>>,
    upper: Vec<usize>,
    zeros: usize,
}

/// The in-memory scores' buffer, handed from one ranking to the next.
static SCORE_BUFFER: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

impl Drop for Ranked<'_, '_> {
    fn drop(&mut self) {
        if let (Some(all), Ok(mut kept)) = (self.in_memory.take(), SCORE_BUFFER.lock()) {
            if all.capacity() > kept.capacity() {
                *kept = all;
            }
        }
    }
}

/// Where a selection of the `k` largest stops: above `value`, and the first `quota[tile]`
/// scores equal to it in each tile (ties go to the lowest indices).
enum Cut {
    All,
    Nothing,
    At { value: u32, quota: Vec<usize> },
}

impl<'s, 'a> Ranked<'s, 'a> {
    pub fn new(n: usize, scores: &'s TileScores<'a>) -> Self {
        Self::with_memory_limit(n, scores, IN_MEMORY)
    }

    /// As [`Ranked::new`], keeping the scores in memory only up to `limit` elements.
    fn with_memory_limit(n: usize, scores: &'s TileScores<'a>, limit: usize) -> Self {
        let mut ranked = Ranked {
            n,
            scores,
            in_memory: None,
            upper: vec![],
            zeros: 0,
        };
        let mut all = if n <= limit && n > 0 {
            // A buffer kept from the last ranking: a fresh one of this size would be
            // zeroed page by page by the kernel on first touch.
            let mut all = SCORE_BUFFER
                .lock()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default();
            all.resize(n, 0);
            all
        } else {
            vec![]
        };
        let per_worker: Vec<(Vec<u32>, usize)> = if all.is_empty() {
            ranked.per_worker(|_, bits, acc: &mut (Vec<u32>, usize)| upper_histogram(bits, acc))
        } else {
            // Each worker fills its own contiguous range of tiles.
            let chunk = ranked.tiles_per_worker() * TILE;
            all.par_chunks_mut(chunk)
                .enumerate()
                .map(|(w, part)| {
                    let mut acc = (vec![0u32; 1 << 16], 0);
                    let mut bits = vec![];
                    for (t, out) in part.chunks_mut(TILE).enumerate() {
                        scores(w * chunk / TILE + t, &mut bits);
                        out.copy_from_slice(&bits);
                        upper_histogram(out, &mut acc);
                    }
                    acc
                })
                .collect()
        };
        ranked.upper = vec![0usize; 1 << 16];
        for (h, zeros) in per_worker {
            ranked
                .upper
                .iter_mut()
                .zip(&h)
                .for_each(|(a, &b)| *a += b as usize);
            ranked.zeros += zeros;
        }
        ranked.in_memory = (!all.is_empty()).then_some(all);
        ranked
    }

    /// How many scores are not zero.
    pub fn nonzero(&self) -> usize {
        self.n - self.zeros
    }

    /// The keep mask of the `k` largest scores.
    pub fn top_k(&self, k: usize) -> Vec<u64> {
        self.window(0, k)
    }

    /// Entries whose descending rank (ties: lowest index first) is in `[from, to)`:
    /// breadcrumbs' window that drops the largest and the smallest.
    pub fn window(&self, from: usize, to: usize) -> Vec<u64> {
        let n = self.n;
        if from >= to {
            return full_mask(n, false);
        }
        if from == 0 && to >= n {
            return full_mask(n, true);
        }
        let cuts = self.cuts(&[to, from]);
        let (upto, above) = (&cuts[0], &cuts[1]);
        let mut mask = vec![0u64; n.div_ceil(64)];
        mask.par_chunks_mut(TILE / 64).enumerate().for_each_init(
            || (vec![], vec![], vec![]),
            |(bits, eq, above_words), (tile, words)| {
                let slice = self.tile(tile, bits);
                keep_bits(upto, tile, slice, words, eq);
                if !matches!(above, Cut::Nothing) {
                    above_words.resize(words.len(), 0);
                    keep_bits(above, tile, slice, above_words, eq);
                    words
                        .iter_mut()
                        .zip(above_words.iter())
                        .for_each(|(w, a)| *w &= !a);
                }
            },
        );
        mask
    }

    /// The cut of each `k` largest, found together: one pass for the lower-16-bit
    /// histograms and one for the ties at the cuts.
    fn cuts(&self, ks: &[usize]) -> Vec<Cut> {
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
        let uppers: Vec<(usize, usize)> = ks.iter().map(|&k| find(&self.upper, k)).collect();
        let lower_per_worker = self.per_worker(|_, bits, hs: &mut Vec<Vec<u32>>| {
            hs.resize_with(ks.len(), || vec![0u32; 1 << 16]);
            for (h, &(hi, _)) in hs.iter_mut().zip(&uppers) {
                lower_histogram(bits, hi as u32, h);
            }
        });
        let values: Vec<(u32, usize)> = (0..ks.len())
            .map(|c| {
                let mut lower = vec![0usize; 1 << 16];
                for hs in lower_per_worker.iter().filter(|hs| !hs.is_empty()) {
                    lower
                        .iter_mut()
                        .zip(&hs[c])
                        .for_each(|(a, &b)| *a += b as usize);
                }
                let (hi, above_hi) = uppers[c];
                let k = ks[c].clamp(1, self.n);
                let (lo, above_lo) = find(&lower, k - above_hi);
                (((hi as u32) << 16) | lo as u32, k - above_hi - above_lo)
            })
            .collect();
        // Ties at each cut: the lowest indices win, so hand out the quota tile by tile.
        let equal = self.per_worker(|tile, bits, c: &mut Vec<(usize, Vec<usize>)>| {
            let counts = values.iter().map(|&(v, _)| count_equal(bits, v)).collect();
            c.push((tile, counts));
        });
        let n_tiles = self.n.div_ceil(TILE);
        ks.iter()
            .enumerate()
            .map(|(c, &k)| {
                if k == 0 {
                    return Cut::Nothing;
                }
                if k >= self.n {
                    return Cut::All;
                }
                let (value, mut needed) = values[c];
                let mut quota = vec![0usize; n_tiles];
                for (tile, counts) in equal.iter().flatten() {
                    quota[*tile] = counts[c];
                }
                for q in quota.iter_mut() {
                    *q = (*q).min(needed);
                    needed -= *q;
                }
                Cut::At { value, quota }
            })
            .collect()
    }

    fn tiles_per_worker(&self) -> usize {
        self.n
            .div_ceil(TILE)
            .div_ceil(rayon::current_num_threads().max(1))
            .max(1)
    }

    /// Folds every tile into one accumulator per worker, each over a contiguous range of
    /// tiles (so that only `threads` accumulators are merged).
    fn per_worker<A: Send + Default>(&self, f: impl Fn(usize, &[u32], &mut A) + Sync) -> Vec<A> {
        let per = self.tiles_per_worker();
        let n_tiles = self.n.div_ceil(TILE);
        (0..n_tiles.div_ceil(per))
            .into_par_iter()
            .map(|w| {
                let mut acc = A::default();
                let mut bits = vec![];
                for tile in w * per..((w + 1) * per).min(n_tiles) {
                    f(tile, self.tile(tile, &mut bits), &mut acc);
                }
                acc
            })
            .collect()
    }

    /// Tile `tile`'s scores, from memory or computed into `bits`.
    fn tile<'b>(&'b self, tile: usize, bits: &'b mut Vec<u32>) -> &'b [u32] {
        match &self.in_memory {
            Some(all) => {
                let (lo, hi) = range(self.n, tile);
                &all[lo..hi]
            }
            None => {
                (self.scores)(tile, bits);
                bits
            }
        }
    }
}
/// Adds the scores' upper 16 bits to the histogram `h` and counts the zero scores.
fn upper_histogram(bits: &[u32], (h, zeros): &mut (Vec<u32>, usize)) {
    h.resize(1 << 16, 0);
    for &v in bits {
        h[(v >> 16) as usize] += 1;
        *zeros += usize::from(v == 0);
    }
}

/// Sets `words` to the keep bits of one tile's scores under `cut`; `eq` is scratch.
fn keep_bits(cut: &Cut, tile: usize, scores: &[u32], words: &mut [u64], eq: &mut Vec<u64>) {
    match cut {
        Cut::Nothing => words.fill(0),
        Cut::All => set_all(words, scores.len()),
        Cut::At { value, quota } => {
            eq.resize(words.len(), 0);
            compare_bits(scores, *value, words, eq);
            // The first `left` scores equal to the cut, in index order.
            let mut left = quota[tile];
            for (w, &e) in words.iter_mut().zip(eq.iter()) {
                if left == 0 {
                    break;
                }
                let mut e = e;
                while e != 0 && left > 0 {
                    *w |= e & e.wrapping_neg();
                    e &= e - 1;
                    left -= 1;
                }
            }
        }
    }
}

widest_simd! {
    /// Adds the lower 16 bits of the scores whose upper 16 bits are `hi` to `h`: the matches
    /// are found 64 at a time with vector compares, and only they are counted one by one.
    fn lower_histogram(scores: &[u32], hi: u32, h: &mut [u32]) {
        for (c, chunk) in scores.chunks(64).enumerate() {
            let mut hits = 0u64;
            for (l, &v) in chunk.iter().enumerate() {
                hits |= u64::from(v >> 16 == hi) << l;
            }
            while hits != 0 {
                let v = scores[c * 64 + hits.trailing_zeros() as usize];
                h[(v & 0xFFFF) as usize] += 1;
                hits &= hits - 1;
            }
        }
    }
}

widest_simd! {
    /// How many scores equal `v`.
    fn count_equal(scores: &[u32], v: u32) -> usize {
        scores.iter().map(|&s| u32::from(s == v)).sum::<u32>() as usize
    }
}

widest_simd! {
    /// Per 64 scores, the bits of those above `cut` (`gt`) and of those equal to it (`eq`).
    fn compare_bits(scores: &[u32], cut: u32, gt: &mut [u64], eq: &mut [u64]) {
        for ((c, g), e) in scores.chunks(64).zip(gt.iter_mut()).zip(eq.iter_mut()) {
            let (mut wg, mut we) = (0u64, 0u64);
            for (l, &v) in c.iter().enumerate() {
                wg |= u64::from(v > cut) << l;
                we |= u64::from(v == cut) << l;
            }
            *g = wg;
            *e = we;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::mt::bit;

    fn scores_of(v: &[f32]) -> impl Fn(usize, &mut Vec<u32>) + Sync + '_ {
        move |tile, bits: &mut Vec<u32>| {
            let (lo, hi) = range(v.len(), tile);
            bits.clear();
            bits.extend(v[lo..hi].iter().map(|x| x.abs().to_bits()));
        }
    }

    #[test]
    fn top_k_matches_a_stable_sort_with_many_ties() {
        let n = 3 * TILE + 123;
        let mut s = 11u64;
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((s >> 40) % 97) as f32 / 16.0 - 3.0
            })
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| vals[b].abs().total_cmp(&vals[a].abs()).then(a.cmp(&b)));
        let zeros = vals.iter().filter(|v| **v == 0.0).count();
        assert!(zeros > 0);
        for limit in [0, n] {
            assert_eq!(
                Ranked::with_memory_limit(n, &scores_of(&vals), limit).nonzero(),
                n - zeros
            );
        }
        for (from, to) in [
            (0, n / 10),
            (0, n / 2),
            (n / 7, n - 5),
            (0, n),
            (3, 3),
            (5, n),
            (0, 1),
        ] {
            let scores = scores_of(&vals);
            for limit in [0, n] {
                let m = Ranked::with_memory_limit(n, &scores, limit).window(from, to);
                let got: Vec<usize> = (0..n).filter(|&j| bit(&m, j)).collect();
                let mut want = order[from..to].to_vec();
                want.sort();
                assert_eq!(got, want, "[{from}, {to}), in memory up to {limit}");
            }
            let m = Ranked::new(n, &scores).top_k(to);
            let got: Vec<usize> = (0..n).filter(|&j| bit(&m, j)).collect();
            let mut want = order[..to].to_vec();
            want.sort();
            assert_eq!(got, want, "top {to}");
        }
    }
}
