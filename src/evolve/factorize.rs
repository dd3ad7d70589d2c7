//! Truncated SVD of task vectors, `τ ≈ U · diag(S) · Vᵀ`: the factors every genome is written
//! over. Full rank is faer's exact thin SVD; truncated ranks use the one randomized algorithm of
//! the engine, [`super::batched_svd::randomized_svd_batch`] (Halko et al. with CholeskyQR),
//! which runs on any [`super::batched_svd::BatchedLinalg`] device. f32 throughout, as on the GPU.

use std::sync::Arc;

use faer::Mat;

use crate::backend::LowRankFactors;
use crate::error::{Error, Result};

/// `U` `[m, r]`, `S` `[r]` (non-increasing) and `Vᵀ` `[r, n]`, row-major. `U` and `Vᵀ` are
/// shared (materialisation sources hold them without copying).
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    pub m: usize,
    pub n: usize,
    pub u: Arc<[f32]>,
    pub s: Vec<f32>,
    pub vt: Arc<[f32]>,
}

impl Factors {
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// The factors as materialisation reads them.
    pub fn low_rank(&self) -> LowRankFactors {
        LowRankFactors {
            u: self.u.clone(),
            vt: self.vt.clone(),
            rank: self.rank(),
        }
    }

    /// `U · diag(S) · Vᵀ` as a dense row-major `[m, n]` matrix (one GEMM).
    pub fn reconstruct(&self) -> Vec<f32> {
        let r = self.rank();
        let us = Mat::from_fn(self.m, r, |i, k| self.u[i * r + k] * self.s[k]);
        let vt = Mat::from_fn(r, self.n, |k, j| self.vt[k * self.n + j]);
        let prod = &us * &vt;
        let mut out = Vec::with_capacity(self.m * self.n);
        for i in 0..self.m {
            out.extend((0..self.n).map(|j| prod[(i, j)]));
        }
        out
    }

    /// `‖A − U S Vᵀ‖_F / ‖A‖_F` (0 for a zero matrix).
    pub fn relative_error(&self, a: &[f32]) -> f64 {
        let approx = self.reconstruct();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(&approx) {
            num += ((x - y) as f64).powi(2);
            den += (x as f64).powi(2);
        }
        if den == 0.0 {
            0.0
        } else {
            (num / den).sqrt()
        }
    }
}

/// Randomized SVD settings: `oversample` extra sketch columns beyond the rank and
/// `power_iters` subspace iterations (default 10 and 2; `torch.svd_lowrank` also uses 2), and
/// the seed every sketch is drawn from (mixed with a per-matrix seed).
#[derive(Clone, Copy, Debug)]
pub struct RandomizedSvd {
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
}

impl Default for RandomizedSvd {
    fn default() -> Self {
        RandomizedSvd {
            oversample: 10,
            power_iters: 2,
            seed: 0,
        }
    }
}

impl RandomizedSvd {
    /// What the factor cache records of the algorithm (results depend on all of it).
    pub fn tag(&self) -> String {
        format!(
            "randomized svd (Halko, shifted CholeskyQR3), oversample {}, power iterations {}, sketch seed {}",
            self.oversample, self.power_iters, self.seed
        )
    }
}

/// `[m, k]` columns of a faer matrix as row-major `U`, and `[n, k]` columns as row-major `Vᵀ`.
fn factors_from(
    u: faer::MatRef<'_, f32>,
    s: &[f32],
    v: faer::MatRef<'_, f32>,
    r: usize,
) -> Factors {
    let (m, n) = (u.nrows(), v.nrows());
    Factors {
        m,
        n,
        u: (0..m)
            .flat_map(|i| (0..r).map(move |k| u[(i, k)]))
            .collect(),
        s: s[..r].to_vec(),
        vt: (0..r)
            .flat_map(|k| (0..n).map(move |j| v[(j, k)]))
            .collect(),
    }
}

/// The exact thin SVD of `a` `[m, n]` (row-major), truncated to `rank` (≤ min(m, n)).
pub fn exact_svd(a: &[f32], m: usize, n: usize, rank: usize) -> Result<Factors> {
    check_rank(m, n, rank)?;
    // In f64: faer's f32 SVD of a 512×2048 task vector reconstructs only to ~2e-3 relative,
    // several times worse than the randomized rank-128 truncation of the same matrix (see the
    // test below); the factors are rounded to f32 afterwards, as everywhere else.
    let svd = Mat::from_fn(m, n, |i, j| a[i * n + j] as f64)
        .thin_svd()
        .map_err(|e| Error::invalid(format!("SVD of a {m}×{n} matrix did not converge: {e:?}")))?;
    let s: Vec<f32> = svd.S().column_vector().iter().map(|&x| x as f32).collect();
    let u = Mat::from_fn(m, rank, |i, k| svd.U()[(i, k)] as f32);
    let v = Mat::from_fn(n, rank, |j, k| svd.V()[(j, k)] as f32);
    Ok(factors_from(u.as_ref(), &s, v.as_ref(), rank))
}

/// `rank` must be in `1..=min(m, n)`.
pub fn check_rank(m: usize, n: usize, rank: usize) -> Result<()> {
    if rank == 0 || rank > m.min(n) {
        return Err(Error::invalid(format!(
            "rank {rank} is outside 1..={} for a {m}×{n} matrix",
            m.min(n)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn gaussian(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..m * n)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect()
    }

    #[test]
    fn exact_full_rank_reconstructs_with_orthonormal_factors() {
        for (m, n) in [(30, 17), (17, 30)] {
            let a = gaussian(m, n, 1);
            let r = m.min(n);
            let f = exact_svd(&a, m, n, r).unwrap();
            assert!(f.relative_error(&a) < 1e-5, "{}", f.relative_error(&a));
            assert!(f.s.windows(2).all(|w| w[0] >= w[1]));
            // Vᵀ's rows are orthonormal.
            for p in 0..r {
                for q in 0..r {
                    let d: f32 = (0..n).map(|j| f.vt[p * n + j] * f.vt[q * n + j]).sum();
                    let want = if p == q { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-4, "VVᵀ[{p},{q}] = {d}");
                }
            }
        }
    }

    /// The optimum is the optimum: on a decaying spectrum under noise (the bench's accuracy
    /// case, smaller), no rank-r factorisation may beat the exact truncation.
    #[test]
    fn exact_truncation_is_no_worse_than_the_randomized_one() {
        let (m, n, k, r) = (512, 2048, 64, 128);
        let (u, v) = (gaussian(m, k, 3), gaussian(n, k, 4));
        let noise = gaussian(m, n, 5);
        let a: Vec<f32> = (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                (0..k)
                    .map(|t| u[i * k + t] * v[j * k + t] * 0.93f32.powi(t as i32))
                    .sum::<f32>()
                    + 1e-3 * noise[idx]
            })
            .collect();
        let exact = exact_svd(&a, m, n, r).unwrap().relative_error(&a);
        let randomized = super::super::batched_svd::randomized_svd_batch(
            &super::super::batched_svd::CpuLinalg,
            &[&a[..]],
            m,
            n,
            r,
            RandomizedSvd::default(),
            &[0],
        )
        .unwrap()
        .remove(0)
        .relative_error(&a);
        assert!(
            exact <= randomized * 1.001,
            "exact {exact} vs randomized {randomized}"
        );
    }

    #[test]
    fn rank_is_checked() {
        let a = gaussian(4, 3, 0);
        assert!(exact_svd(&a, 4, 3, 0).is_err());
        assert!(exact_svd(&a, 4, 3, 4).is_err());
    }
}
