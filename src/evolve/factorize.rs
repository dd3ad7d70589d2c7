//! Truncated SVD of task vectors, `τ ≈ U · diag(S) · Vᵀ`: exact (faer's thin SVD) for full
//! rank, randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4 with power iterations and QR
//! re-orthonormalisation) for truncated ranks. f32 throughout, as on the GPU.

use faer::Mat;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// `U` `[m, r]`, `S` `[r]` (non-increasing), `V` `[n, r]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    pub m: usize,
    pub n: usize,
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    pub v: Vec<f32>,
}

impl Factors {
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// `U · diag(S) · Vᵀ` as a dense row-major `[m, n]` matrix (one GEMM).
    pub fn reconstruct(&self) -> Vec<f32> {
        let r = self.rank();
        let us = Mat::from_fn(self.m, r, |i, k| self.u[i * r + k] * self.s[k]);
        let v = Mat::from_fn(self.n, r, |j, k| self.v[j * r + k]);
        let prod = &us * v.transpose();
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
/// `power_iters` subspace iterations (default 10 and 2; `torch.svd_lowrank` also uses 2).
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

fn to_mat(a: &[f32], m: usize, n: usize) -> Mat<f32> {
    Mat::from_fn(m, n, |i, j| a[i * n + j])
}

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
        v: (0..n)
            .flat_map(|j| (0..r).map(move |k| v[(j, k)]))
            .collect(),
    }
}

/// The exact thin SVD of `a` `[m, n]` (row-major), truncated to `rank` (≤ min(m, n)).
pub fn exact_svd(a: &[f32], m: usize, n: usize, rank: usize) -> Result<Factors> {
    check(m, n, rank)?;
    let svd = to_mat(a, m, n)
        .thin_svd()
        .map_err(|e| Error::invalid(format!("SVD of a {m}×{n} matrix did not converge: {e:?}")))?;
    let s: Vec<f32> = svd.S().column_vector().iter().copied().collect();
    Ok(factors_from(svd.U(), &s, svd.V(), rank))
}

/// The rank-`rank` randomized SVD of `a` `[m, n]`: range finder `Y = (A Aᵀ)^q A Ω` with QR
/// after every product, then the exact SVD of the small `Qᵀ A`.
pub fn randomized_svd(
    a: &[f32],
    m: usize,
    n: usize,
    rank: usize,
    opts: RandomizedSvd,
) -> Result<Factors> {
    check(m, n, rank)?;
    let l = (rank + opts.oversample).min(m.min(n));
    if l == m.min(n) {
        return exact_svd(a, m, n, rank);
    }
    let a = to_mat(a, m, n);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let omega = Mat::<f32>::from_fn(n, l, |_, _| StandardNormal.sample(&mut rng));
    let mut q = (&a * &omega).qr().compute_thin_Q();
    for _ in 0..opts.power_iters {
        let z = (a.transpose() * &q).qr().compute_thin_Q();
        q = (&a * &z).qr().compute_thin_Q();
    }
    let b = q.transpose() * &a; // [l, n]
    let svd = b.thin_svd().map_err(|e| {
        Error::invalid(format!("SVD of the {l}×{n} sketch did not converge: {e:?}"))
    })?;
    let u = &q * svd.U();
    let s: Vec<f32> = svd.S().column_vector().iter().copied().collect();
    Ok(factors_from(u.as_ref(), &s, svd.V(), rank))
}

fn check(m: usize, n: usize, rank: usize) -> Result<()> {
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

    /// `A = P · diag(σ) · Qᵀ` with orthonormal P, Q from QR of Gaussians and the given σ.
    fn with_spectrum(m: usize, n: usize, sigma: &[f32], seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = sigma.len();
        let p = Mat::<f32>::from_fn(m, k, |_, _| StandardNormal.sample(&mut rng))
            .qr()
            .compute_thin_Q();
        let q = Mat::<f32>::from_fn(n, k, |_, _| StandardNormal.sample(&mut rng))
            .qr()
            .compute_thin_Q();
        let mut a = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                a[i * n + j] = (0..k).map(|t| p[(i, t)] * sigma[t] * q[(j, t)]).sum();
            }
        }
        a
    }

    fn gaussian(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..m * n)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect()
    }

    #[test]
    fn exact_full_rank_reconstructs() {
        let a = gaussian(30, 17, 1);
        let f = exact_svd(&a, 30, 17, 17).unwrap();
        assert!(f.relative_error(&a) < 1e-5, "{}", f.relative_error(&a));
        assert!(f.s.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn randomized_error_is_near_optimal_on_random_and_real_shapes() {
        for (m, n, decaying) in [
            (200, 60, false),
            (60, 200, false),
            (256, 96, true),
            (96, 256, true),
        ] {
            let a = if decaying {
                let sigma: Vec<f32> = (0..60).map(|i| 0.85f32.powi(i)).collect();
                with_spectrum(m, n, &sigma, 3)
            } else {
                gaussian(m, n, 2)
            };
            let r = 12;
            let optimal = exact_svd(&a, m, n, r).unwrap();
            let approx = randomized_svd(&a, m, n, r, RandomizedSvd::default()).unwrap();
            let (e_opt, e_rnd) = (optimal.relative_error(&a), approx.relative_error(&a));
            assert!(
                e_rnd <= 1.5 * e_opt,
                "{m}×{n}: randomized {e_rnd} vs optimal {e_opt}"
            );
            if decaying {
                for k in 0..r / 2 {
                    let rel = ((approx.s[k] - optimal.s[k]) / optimal.s[k]).abs();
                    assert!(
                        rel < 1e-3,
                        "{m}×{n} σ_{k}: {} vs {}",
                        approx.s[k],
                        optimal.s[k]
                    );
                }
            }
        }
    }

    #[test]
    fn rank_is_checked() {
        let a = gaussian(4, 3, 0);
        assert!(exact_svd(&a, 4, 3, 0).is_err());
        assert!(randomized_svd(&a, 4, 3, 4, RandomizedSvd::default()).is_err());
    }
}
