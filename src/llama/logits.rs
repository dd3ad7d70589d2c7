//! Reductions over one row of logits: the greedy token, one token's log-probability, and the
//! finiteness check. A generation step does these for every sequence over the whole vocabulary
//! (64 rows × 32k logits at the demo's batch), so they run in the widest SIMD: done one value
//! at a time, with an f64 `exp` per logit, they were a fifth of a child's evaluation.

use crate::simd::{self, widest_simd};

const LANES: usize = 16;

/// Bit pattern of an f32 whose exponent is all ones: ±∞ or NaN.
const EXPONENT: u32 = 0x7f80_0000;

widest_simd! {
    /// The row's largest value, NaN ignored (−∞ for a row of NaNs or no values), and whether
    /// every value is finite.
    fn scan(row: &[f32]) -> (f32, bool) {
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut special = [0u32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                let v = c[l];
                // `v > max` is false for NaN, so NaN never becomes the maximum.
                max[l] = if v > max[l] { v } else { max[l] };
                special[l] |= ((v.to_bits() & EXPONENT) == EXPONENT) as u32;
            }
        }
        let mut m = f32::NEG_INFINITY;
        for v in max.into_iter().chain(tail.iter().copied()) {
            m = if v > m { v } else { m };
        }
        let finite = special.iter().all(|&s| s == 0) && tail.iter().all(|v| v.is_finite());
        (m, finite)
    }
}

widest_simd! {
    /// The index of the first value equal to `target` (never NaN here).
    fn first_equal(row: &[f32], target: f32) -> Option<usize> {
        let chunks = row.chunks_exact(LANES);
        let whole = row.len() - chunks.remainder().len();
        for (i, c) in chunks.enumerate() {
            // A branch-free test of the whole chunk; the position only in the one that holds it.
            if c.iter().fold(false, |any, &v| any | (v == target)) {
                return c.iter().position(|&v| v == target).map(|p| i * LANES + p);
            }
        }
        row[whole..].iter().position(|&v| v == target).map(|p| whole + p)
    }
}

widest_simd! {
    /// `Σ exp(v − max)` over the row: f32 terms (`simd::exp`, within 2 ulp) summed in f64
    /// lanes, so the sum of 32k terms keeps f32's precision of each. (`simd::lane_sums` gives
    /// the same sum, but its exp does not vectorise there: 4.3× slower, measured.)
    fn sum_exp_below(row: &[f32], max: f32) -> f64 {
        let mut lanes = [0.0f64; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                lanes[l] += simd::exp(c[l] - max) as f64;
            }
        }
        let tail_sum: f64 = tail.iter().map(|&v| simd::exp(v - max) as f64).sum();
        lanes.iter().sum::<f64>() + tail_sum
    }
}

/// The index of the largest logit, the first on ties; NaN counts as the largest value (torch's
/// and numpy's rule, which the GPU's `argmax_rows` follows too).
pub fn argmax(logits: &[f32]) -> u32 {
    let (max, finite) = scan(logits);
    let nan = if finite {
        None
    } else {
        logits.iter().position(|v| v.is_nan())
    };
    nan.or_else(|| first_equal(logits, max)).unwrap_or(0) as u32
}

/// `log softmax(logits)[i]`: the maximum subtracted before `exp`, the sum and the logarithm in
/// f64 (within a few 1e-7 of the exact value).
pub fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let (max, _) = scan(logits);
    let sum = sum_exp_below(logits, max);
    (logits[i] as f64 - max as f64 - sum.ln()) as f32
}

/// The position of the first value that is NaN or infinite, if any.
pub fn first_non_finite(logits: &[f32]) -> Option<usize> {
    match scan(logits) {
        (_, true) => None,
        _ => logits.iter().position(|v| !v.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of 32k logits like a model's (a few large, most near zero), plus short and odd
    /// lengths that leave tails outside the 16-lane chunks.
    fn rows() -> Vec<Vec<f32>> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut out = vec![];
        for (len, scale) in [(32000, 8.0), (32003, 30.0), (17, 4.0), (5, 1.0), (1, 1.0)] {
            out.push((0..len).map(|_| (next() - 0.5) * scale).collect());
        }
        out
    }

    #[test]
    fn log_softmax_matches_the_f64_definition() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        for (i, &v) in l.iter().enumerate() {
            let want = ((v as f64).exp() / z).ln() as f32;
            assert!((log_softmax_at(&l, i) - want).abs() < 1e-6);
        }
        for row in rows() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for i in [0, row.len() / 2, row.len() - 1] {
                let want = row[i] as f64 - max - sum.ln();
                let got = log_softmax_at(&row, i) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 + 2.0 * want.abs() * f32::EPSILON as f64,
                    "row of {}, token {i}: {got} vs {want}",
                    row.len()
                );
            }
        }
        // −∞ logits have probability 0; an all-equal row is uniform.
        let l = [f32::NEG_INFINITY, 0.0, 0.0];
        assert_eq!(log_softmax_at(&l, 0), f32::NEG_INFINITY);
        assert!((log_softmax_at(&l, 1) - (0.5f64.ln() as f32)).abs() < 1e-7);
        assert!(log_softmax_at(&[1.0, f32::NAN], 0).is_nan());
    }

    #[test]
    fn argmax_takes_first_of_ties_and_nan_as_the_largest() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(argmax(&[0.0, f32::NAN, 3.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, 3.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::INFINITY]), 1);
        for mut row in rows() {
            let scalar = |r: &[f32]| {
                let mut best = 0;
                for (i, &v) in r.iter().enumerate() {
                    if v > r[best] {
                        best = i;
                    }
                }
                best as u32
            };
            assert_eq!(argmax(&row), scalar(&row), "row of {}", row.len());
            // A tie for the maximum, the later copy in a chunk and the earlier in the tail.
            let n = row.len();
            let top = row[scalar(&row) as usize] + 1.0;
            row[n - 1] = top;
            assert_eq!(argmax(&row), n as u32 - 1);
            if n > 20 {
                row[n / 2] = top;
                assert_eq!(argmax(&row), n as u32 / 2);
                row[n - 3] = f32::NAN;
                assert_eq!(argmax(&row), n as u32 - 3);
            }
        }
    }

    #[test]
    fn non_finite_values_are_found_where_they_are() {
        for row in rows() {
            assert_eq!(first_non_finite(&row), None);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [row.len() - 1, row.len() / 3] {
                    let mut r = row.clone();
                    r[at] = bad;
                    assert_eq!(
                        first_non_finite(&r),
                        Some(at),
                        "{bad} at {at} of {}",
                        r.len()
                    );
                }
            }
        }
    }
}
