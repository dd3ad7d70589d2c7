//! Racing: scoring a model on a task's examples in rounds, in a fixed seeded order, and
//! stopping as soon as the examples scored so far show (at a stated confidence) that its
//! final scores cannot change a decision. What a decision is belongs to the caller (the run
//! asks whether the child could still enter any archive cell); this module gives the order,
//! the rounds, and the confidence interval of a task's final score.
//!
//! The interval: after `n` of a task's `N` examples (a uniformly random subset, as the order
//! is a seeded shuffle), the final score — the mean over all `N` — lies in the interval with
//! probability at least `1 − δ`. For 0/1 examples it is the exact finite-population
//! (hypergeometric) interval: the smallest and largest success counts `K` of the whole task
//! for which the observed count is not in a tail of mass `δ/2`. For examples scored in
//! `[0, 1]` (pass@k) it is Hoeffding's bound with Serfling's finite-population correction,
//! `ε = sqrt((1 − (n−1)/N) · ln(2/δ) / (2n))`. Both are clipped to what the unscored
//! examples allow (all 0 to all 1).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A task's examples in the seeded order rounds take them (the same for every model: common
/// random numbers make children comparable).
pub fn order(examples: usize, seed: u64, task: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..examples).collect();
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(task as u64).to_le_bytes());
    s[16..24].copy_from_slice(b"racing!!");
    idx.shuffle(&mut ChaCha8Rng::from_seed(s));
    idx
}

/// Round `r` scores `first · growth^r` of a task's examples (rounded up). With growth 2 (the
/// default) a task of `total` examples takes about log₂(total ÷ first) rounds rather than
/// total ÷ first: a child is looked at as early as with equal rounds, the later rounds are
/// batched about as well as a full evaluation (small rounds are generation passes of mostly
/// padding and per-step overhead), and the confidence is split over fewer looks. Growth 1 is
/// equal rounds, which look more often late, where a task's remaining examples are few.
pub fn round_size(first: usize, growth: f64, round: usize) -> usize {
    let size = first.max(1) as f64 * growth.max(1.0).powi(round.min(i32::MAX as usize) as i32);
    if size >= usize::MAX as f64 {
        usize::MAX
    } else {
        size.ceil() as usize
    }
}

/// How many rounds a task of `total` examples takes (see [`round_size`]).
pub fn rounds(total: usize, first: usize, growth: f64) -> usize {
    let (mut done, mut r) = (0usize, 0);
    while done < total {
        done = done.saturating_add(round_size(first, growth, r));
        r += 1;
    }
    r
}

/// ln(k!) for k = 0..=n.
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let mut acc = 0.0;
    out.push(0.0);
    for k in 1..=n {
        acc += (k as f64).ln();
        out.push(acc);
    }
    out
}

/// ln C(a, b) from a table of ln k!.
fn ln_choose(lf: &[f64], a: usize, b: usize) -> f64 {
    if b > a {
        return f64::NEG_INFINITY;
    }
    lf[a] - lf[b] - lf[a - b]
}

/// P(X ≤ x) and P(X ≥ x) for X hypergeometric: `n` draws without replacement from `total`
/// items of which `k` are successes.
fn hypergeometric_tails(lf: &[f64], total: usize, k: usize, n: usize, x: usize) -> (f64, f64) {
    let denom = ln_choose(lf, total, n);
    let lo = n.saturating_sub(total - k);
    let hi = n.min(k);
    let p = |i: usize| (ln_choose(lf, k, i) + ln_choose(lf, total - k, n - i) - denom).exp();
    let below: f64 = (lo..=x.min(hi)).map(p).sum();
    let above: f64 = (x.max(lo)..=hi).map(p).sum();
    (below.min(1.0), above.min(1.0))
}

/// The interval of a task's final mean score, given `sum` over `n` of its `total` examples
/// scored, at miscoverage `delta`. `binary`: every example scores 0 or 1.
pub fn interval(sum: f64, n: usize, total: usize, delta: f64, binary: bool) -> (f64, f64) {
    assert!(n <= total && total > 0);
    let rest = (total - n) as f64;
    // What the unscored examples allow at all.
    let (floor, ceil) = (sum / total as f64, (sum + rest) / total as f64);
    if n == total {
        return (floor, floor);
    }
    if n == 0 {
        return (0.0, 1.0);
    }
    if binary {
        let s = sum.round() as usize;
        let lf = ln_factorials(total);
        // K is plausible unless the observed s is in a δ/2 tail under it.
        let plausible = |k: usize| {
            let (below, above) = hypergeometric_tails(&lf, total, k, n, s);
            below > delta / 2.0 && above > delta / 2.0
        };
        let candidates = s..=(s + (total - n));
        let lo = candidates.clone().find(|&k| plausible(k)).unwrap_or(s);
        let hi = candidates
            .rev()
            .find(|&k| plausible(k))
            .unwrap_or(s + (total - n));
        return (lo as f64 / total as f64, hi as f64 / total as f64);
    }
    let mean = sum / n as f64;
    let eps =
        ((1.0 - (n as f64 - 1.0) / total as f64) * (2.0 / delta).ln() / (2.0 * n as f64)).sqrt();
    ((mean - eps).max(floor), (mean + eps).min(ceil))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_is_a_seeded_permutation() {
        let a = order(50, 7, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, order(50, 7, 1));
        assert_ne!(a, order(50, 7, 2));
        assert_ne!(a, order(50, 8, 1));
    }

    #[test]
    fn rounds_grow_and_cover_the_task() {
        let sizes = |g: f64| (0..4).map(|r| round_size(16, g, r)).collect::<Vec<_>>();
        assert_eq!(sizes(2.0), [16, 32, 64, 128]);
        assert_eq!(sizes(1.0), [16, 16, 16, 16]);
        assert_eq!(sizes(1.5), [16, 24, 36, 54]);
        // 16 + 32 + 48 of 96; 16 + 32 + 64 + 128 + 144 of 384; a task within one round.
        assert_eq!(rounds(96, 16, 2.0), 3);
        assert_eq!(rounds(384, 16, 2.0), 5);
        assert_eq!(rounds(384, 16, 1.0), 24);
        assert_eq!(rounds(10, 16, 2.0), 1);
        assert_eq!(rounds(0, 16, 2.0), 0);
        assert_eq!(round_size(16, 2.0, 2000), usize::MAX);
    }

    #[test]
    fn hypergeometric_tails_sum_to_one_plus_the_point() {
        let lf = ln_factorials(40);
        for (k, n, x) in [(10, 8, 2), (0, 5, 0), (40, 5, 5), (20, 20, 10)] {
            let (b, a) = hypergeometric_tails(&lf, 40, k, n, x);
            let (b2, _) = hypergeometric_tails(&lf, 40, k, n, x.saturating_sub(1));
            let point = if x == 0 { b } else { b - b2 };
            assert!((b + a - point - 1.0).abs() < 1e-9, "{k} {n} {x}");
        }
    }

    /// Draws `n` of a population with `k` successes among `total` many times: the final mean
    /// k/total lies outside the interval at most about δ of the time.
    #[test]
    fn intervals_cover_the_final_score_at_their_level() {
        use rand::seq::SliceRandom;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (total, delta) = (60, 0.1);
        for &(k, n, binary) in &[
            (6, 10, true),
            (30, 20, true),
            (54, 15, true),
            (45, 30, true),
            (20, 12, false),
        ] {
            let mut pop = vec![1.0; k];
            pop.resize(total, 0.0);
            if !binary {
                // Values in [0, 1] with the same mean: halves.
                pop = pop.iter().map(|&v| 0.25 + 0.5 * v).collect();
            }
            let truth = pop.iter().sum::<f64>() / total as f64;
            let trials = 2000;
            let mut misses = 0;
            for _ in 0..trials {
                pop.shuffle(&mut rng);
                let sum: f64 = pop[..n].iter().sum();
                let (lo, hi) = interval(sum, n, total, delta, binary);
                assert!(lo <= hi && lo >= 0.0 && hi <= 1.0);
                if truth < lo - 1e-12 || truth > hi + 1e-12 {
                    misses += 1;
                }
            }
            assert!(
                misses as f64 / trials as f64 <= delta,
                "k={k} n={n}: {misses} misses"
            );
        }
        // All scored: the exact mean; none: anything.
        assert_eq!(interval(3.0, 5, 5, 0.05, true), (0.6, 0.6));
        assert_eq!(interval(0.0, 0, 5, 0.05, true), (0.0, 1.0));
        // Nothing right in 16 of 64 at δ = 0.05: the final score is below 0.2.
        let (_, hi) = interval(0.0, 16, 64, 0.05, true);
        assert!(hi < 0.2, "{hi}");
    }
}
