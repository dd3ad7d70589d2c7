//! Top-k selection without sorting: the `k` largest of a tensor's non-negative scores (|τ| for
//! TIES and breadcrumbs, the variance across models for SCE), found by a radix select on the
//! upper then lower 16 bits of their f32 bit patterns (for non-negative floats the bit order is
//! the numeric order), and returned as a packed keep mask. Equal scores at the cut go to the
//! lowest indices. Tensors up to `IN_MEMORY` elements keep their scores in memory for the
//! scans; larger ones (a Llama-3 embedding) recompute them per scan to bound memory.

use rayon::prelude::*;

use super::tiles::{range, upcast_range, TILE};
use crate::model::HostTensor;

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
    let mut m = vec![if set { u64::MAX } else { 0 }; n.div_ceil(64)];
    if set && !n.is_multiple_of(64) {
        *m.last_mut().expect("n > 0") = (1u64 << (n % 64)) - 1;
    }
    m
}

/// The keep mask of the `k` largest scores.
pub fn top_k_mask(n: usize, k: usize, scores: &TileScores) -> Vec<u64> {
    if k >= n {
        return full_mask(n, true);
    }
    if k == 0 {
        return full_mask(n, false);
    }
    let n_tiles = n.div_ceil(TILE);
    let in_memory: Option<Vec<u32>> = (n <= IN_MEMORY).then(|| {
        let mut all = vec![0u32; n];
        all.par_chunks_mut(TILE)
            .enumerate()
            .for_each_init(Vec::new, |bits, (tile, out)| {
                scores(tile, bits);
                out.copy_from_slice(bits);
            });
        all
    });
    // One contiguous range of tiles per thread, so that only `threads` histograms are merged.
    let workers = rayon::current_num_threads().max(1);
    let per_worker = n_tiles.div_ceil(workers);
    let for_each_tile = |w: usize, f: &mut dyn FnMut(usize, &[u32])| {
        let mut bits = vec![];
        for tile in w * per_worker..((w + 1) * per_worker).min(n_tiles) {
            match &in_memory {
                Some(all) => {
                    let (lo, hi) = range(n, tile);
                    f(tile, &all[lo..hi]);
                }
                None => {
                    scores(tile, &mut bits);
                    f(tile, &bits);
                }
            }
        }
    };
    // Histogram of the upper 16 bits (`within: None`) or of the lower 16 bits of the scores
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
    // Ties at the cut: the lowest indices win, so hand out the quota tile by tile in order.
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
    let quota: Vec<usize> = equal_per_tile
        .iter()
        .map(|&c| {
            let q = c.min(equal_needed);
            equal_needed -= q;
            q
        })
        .collect();
    let mut mask = vec![0u64; n.div_ceil(64)];
    mask.par_chunks_mut(TILE / 64)
        .enumerate()
        .for_each_init(Vec::new, |bits, (tile, words)| {
            let slice: &[u32] = match &in_memory {
                Some(all) => {
                    let (lo, hi) = range(n, tile);
                    &all[lo..hi]
                }
                None => {
                    scores(tile, bits);
                    bits
                }
            };
            let mut left = quota[tile];
            for (j, &v) in slice.iter().enumerate() {
                let keep = v > cut
                    || (v == cut && left > 0 && {
                        left -= 1;
                        true
                    });
                words[j / 64] |= u64::from(keep) << (j % 64);
            }
        });
    mask
}

/// Entries whose descending rank (ties: lowest index first) is in `[from, to)`: breadcrumbs'
/// window that drops the largest and the smallest.
pub fn rank_window_mask(n: usize, from: usize, to: usize, scores: &TileScores) -> Vec<u64> {
    let upto = top_k_mask(n, to, scores);
    if from == 0 {
        return upto;
    }
    let above = top_k_mask(n, from, scores);
    upto.iter().zip(&above).map(|(a, b)| a & !b).collect()
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
        for (from, to) in [(0, n / 10), (0, n / 2), (n / 7, n - 5), (0, n), (3, 3)] {
            let m = rank_window_mask(n, from, to, &scores_of(&vals));
            let got: Vec<usize> = (0..n).filter(|&j| bit(&m, j)).collect();
            let mut want = order[from..to].to_vec();
            want.sort();
            assert_eq!(got, want, "[{from}, {to})");
        }
    }
}
