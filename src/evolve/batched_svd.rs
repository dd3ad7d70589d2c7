//! Batched randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with power iterations)
//! of task vectors of one shape, written once against [`BatchedLinalg`] (batched column-major
//! GEMMs) so the same algorithm runs on the GPU (cuBLAS strided-batched GEMMs) and on the CPU
//! (faer; what tests it on machines without a GPU). Orthonormalisation is shifted CholeskyQR3
//! (Fukaya et al. 2020): Gram matrix on the device, `l × l` Cholesky and triangular inverse on
//! the host in f64, `X ← X·R⁻¹` on the device (a CPU uses its Householder QR instead, as
//! [`BatchedLinalg::orthonormalize`] lets a device do). The small SVD is of `R` from the QR of
//! `Bᵀ = Aᵀ Q` (`l × l`, host, f64), so nothing `m × n`-sized is squared or copied back.
//!
//! Matrices are column-major; a row-major `A` `[m, n]` is the column-major `Aᵀ`.

use faer::Mat;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::factorize::{check_rank, Factors, RandomizedSvd};
use crate::error::{Error, Result};

/// A batch of column-major matrices of one shape, and the products the algorithm needs.
pub trait BatchedLinalg {
    type Mat;
    /// `batch` matrices of `rows × cols` from consecutive column-major host data.
    fn upload(&self, host: &[f32], rows: usize, cols: usize, batch: usize) -> Result<Self::Mat>;
    /// A batch of `rows × cols` members from separate host slices. The default joins them
    /// first; a device copies each straight into its place (joining 2 GB of task vectors on
    /// the host costs seconds, mostly in page faults).
    fn upload_members(&self, members: &[&[f32]], rows: usize, cols: usize) -> Result<Self::Mat> {
        self.upload(&members.concat(), rows, cols, members.len())
    }
    fn zeros(&self, rows: usize, cols: usize, batch: usize) -> Result<Self::Mat>;
    /// (rows, cols, batch).
    fn dims(&self, m: &Self::Mat) -> (usize, usize, usize);
    /// `c = op(a) · op(b)` for every member.
    fn gemm(
        &self,
        c: &mut Self::Mat,
        a: &Self::Mat,
        ta: bool,
        b: &Self::Mat,
        tb: bool,
    ) -> Result<()>;
    fn download(&self, m: &Self::Mat) -> Result<Vec<f32>>;
    /// Orthonormalises the columns of every member in place and returns each member's `R`
    /// (`l × l`, column-major, f64) with `x_in = Q·R`. The default is shifted CholeskyQR3
    /// built on [`BatchedLinalg::gemm`] (what a GPU runs fast); a device with a good
    /// Householder QR (the CPU) overrides it.
    fn orthonormalize(&self, x: &mut Self::Mat) -> Result<Vec<Vec<f64>>>
    where
        Self: Sized,
    {
        cholesky_qr(self, x)
    }
}

/// The CPU implementation (faer GEMMs, members in parallel).
pub struct CpuLinalg;

/// A CPU batch: consecutive column-major members.
pub struct CpuBatch {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    batch: usize,
}

impl BatchedLinalg for CpuLinalg {
    type Mat = CpuBatch;

    fn upload(&self, host: &[f32], rows: usize, cols: usize, batch: usize) -> Result<CpuBatch> {
        Ok(CpuBatch {
            data: host.to_vec(),
            rows,
            cols,
            batch,
        })
    }

    fn zeros(&self, rows: usize, cols: usize, batch: usize) -> Result<CpuBatch> {
        Ok(CpuBatch {
            data: vec![0.0; rows * cols * batch],
            rows,
            cols,
            batch,
        })
    }

    fn dims(&self, m: &CpuBatch) -> (usize, usize, usize) {
        (m.rows, m.cols, m.batch)
    }

    fn gemm(&self, c: &mut CpuBatch, a: &CpuBatch, ta: bool, b: &CpuBatch, tb: bool) -> Result<()> {
        use faer::linalg::matmul::matmul;
        use faer::{Accum, MatMut, MatRef, Par};
        use rayon::prelude::*;
        let (cr, cc) = (c.rows, c.cols);
        let (asz, bsz) = (a.rows * a.cols, b.rows * b.cols);
        c.data
            .par_chunks_mut(cr * cc)
            .enumerate()
            .for_each(|(i, ci)| {
                let am = MatRef::from_column_major_slice(
                    &a.data[i * asz..(i + 1) * asz],
                    a.rows,
                    a.cols,
                );
                let bm = MatRef::from_column_major_slice(
                    &b.data[i * bsz..(i + 1) * bsz],
                    b.rows,
                    b.cols,
                );
                let am = if ta { am.transpose() } else { am };
                let bm = if tb { bm.transpose() } else { bm };
                matmul(
                    MatMut::from_column_major_slice_mut(ci, cr, cc),
                    Accum::Replace,
                    am,
                    bm,
                    1.0,
                    Par::Seq,
                );
            });
        Ok(())
    }

    fn download(&self, m: &CpuBatch) -> Result<Vec<f32>> {
        Ok(m.data.clone())
    }

    /// Householder QR per member (faer, in parallel across members): on a CPU it costs a
    /// sixth of CholeskyQR3's six GEMMs and is exact in its orthogonality.
    fn orthonormalize(&self, x: &mut CpuBatch) -> Result<Vec<Vec<f64>>> {
        use rayon::prelude::*;
        let (p, l) = (x.rows, x.cols);
        Ok(x.data
            .par_chunks_mut(p * l)
            .map(|member| householder_qr(member, p, l))
            .collect())
    }
}

/// Orthonormalises the columns of every member of `x` in place (shifted CholeskyQR3) and
/// returns each member's `R` (`l × l`, column-major, f64) with `x_in = Q·R`. A member whose
/// Gram matrix is singular (a task vector of lower rank than the sketch, or zero: experts
/// often leave tensors untouched) is orthonormalised by a Householder QR on the host instead,
/// which completes its basis with arbitrary orthonormal columns.
fn cholesky_qr<O: BatchedLinalg>(ops: &O, x: &mut O::Mat) -> Result<Vec<Vec<f64>>> {
    use rayon::prelude::*;
    let (p, l, nb) = ops.dims(x);
    let mut r_total: Vec<Vec<f64>> = (0..nb).map(|_| identity(l)).collect();
    let mut gram = ops.zeros(l, l, nb)?;
    let mut next = ops.zeros(p, l, nb)?;
    let mut householder = vec![false; nb];
    for pass in 0..3 {
        ops.gemm(&mut gram, x, true, x, false)?;
        let g = ops.download(&gram)?;
        // The l×l work of every member on the host, in parallel: sequentially it was most of
        // a GPU factorisation (an 8B model's 226 matrices, 21 passes each, ~10 ms apiece).
        let per_member: Vec<Option<(Vec<f64>, Vec<f32>)>> = g
            .par_chunks_exact(l * l)
            .zip(r_total.par_iter())
            .zip(householder.par_iter())
            .map(|((gi, r_prev), &done)| {
                if done {
                    return None;
                }
                let mut g64: Vec<f64> = gi.iter().map(|&v| v as f64).collect();
                if pass == 0 {
                    // The shift keeps the Cholesky factorisable when X is ill-conditioned in
                    // f32; the two unshifted passes then restore orthogonality.
                    let norm = (0..l).map(|j| g64[j * l + j]).sum::<f64>();
                    let shift = 11.0 * ((p * l + l * (l + 1)) as f64) * f32::EPSILON as f64 * norm;
                    (0..l).for_each(|j| g64[j * l + j] += shift);
                }
                let r = cholesky_upper(&g64, l)?;
                let rinv = invert_upper(&r, l).iter().map(|&v| v as f32).collect();
                Some((matmul_upper(&r, r_prev, l), rinv))
            })
            .collect();
        let mut rinv = Vec::with_capacity(l * l * nb);
        let mut failed = vec![];
        for (i, member) in per_member.into_iter().enumerate() {
            match member {
                Some((r, inv)) => {
                    r_total[i] = r;
                    rinv.extend(inv);
                }
                None => {
                    // Left as it is by this pass; replaced by its Householder QR below (and
                    // already orthonormal in later passes).
                    if !householder[i] {
                        failed.push(i);
                    }
                    rinv.extend(identity(l).iter().map(|&v| v as f32));
                }
            }
        }
        let rinv = ops.upload(&rinv, l, l, nb)?;
        ops.gemm(&mut next, x, false, &rinv, false)?;
        std::mem::swap(x, &mut next);
        if !failed.is_empty() {
            let mut host = ops.download(x)?;
            for &i in &failed {
                let member = &mut host[i * p * l..(i + 1) * p * l];
                let r = householder_qr(member, p, l);
                r_total[i] = matmul_upper(&r, &r_total[i], l);
                householder[i] = true;
            }
            *x = ops.upload(&host, p, l, nb)?;
        }
    }
    Ok(r_total)
}

/// Householder QR of a column-major `p × l` matrix (`p ≥ l`) in place: `x ← Q` (orthonormal
/// columns even when `x` is rank deficient) and the returned `R` (column-major, f64).
fn householder_qr(x: &mut [f32], p: usize, l: usize) -> Vec<f64> {
    let qr = faer::MatRef::from_column_major_slice(&*x, p, l).qr();
    let q = qr.compute_thin_Q();
    let r = qr.thin_R();
    for j in 0..l {
        for i in 0..p {
            x[j * p + i] = q[(i, j)];
        }
    }
    let mut out = vec![0.0; l * l];
    for j in 0..l {
        for i in 0..=j {
            out[j * l + i] = r[(i, j)] as f64;
        }
    }
    out
}

/// [`randomized_svd_batch`] of `seeds.len()` row-major `[m, n]` matrices stored one after
/// another in `concat` (the expert set writes task vectors straight into such a buffer).
pub fn randomized_svd_concat<O: BatchedLinalg>(
    ops: &O,
    concat: &[f32],
    m: usize,
    n: usize,
    rank: usize,
    opts: RandomizedSvd,
    seeds: &[u64],
) -> Result<Vec<Factors>> {
    if concat.len() != seeds.len() * m * n {
        return Err(Error::invalid(
            "factorize: matrices or seeds do not match the batch",
        ));
    }
    check_rank(m, n, rank)?; // before chunking: m·n ≥ 1
    let members: Vec<&[f32]> = concat.chunks_exact(m * n).collect();
    randomized_svd_batch(ops, &members, m, n, rank, opts, seeds)
}

/// Rank-`rank` randomized SVD of each row-major `[m, n]` matrix in `mats`, batched on
/// `ops`' device. Member `i` draws its sketch from `opts.seed ^ seeds[i]`.
pub fn randomized_svd_batch<O: BatchedLinalg>(
    ops: &O,
    mats: &[&[f32]],
    m: usize,
    n: usize,
    rank: usize,
    opts: RandomizedSvd,
    seeds: &[u64],
) -> Result<Vec<Factors>> {
    use rayon::prelude::*;
    let nb = seeds.len();
    check_rank(m, n, rank)?;
    if mats.len() != nb {
        return Err(Error::invalid(
            "factorize: matrices or seeds do not match the batch",
        ));
    }
    if mats.iter().any(|a| a.len() != m * n) {
        return Err(Error::invalid(
            "factorize: matrices do not match the batch's shape",
        ));
    }
    if nb == 0 {
        return Ok(vec![]);
    }
    let l = (rank + opts.oversample).min(m.min(n));
    // Row-major A is column-major Aᵀ [n, m].
    let at = ops.upload_members(mats, n, m)?;
    let mut omega = vec![0.0f32; nb * n * l];
    omega.par_chunks_mut(n * l).zip(seeds).for_each(|(o, &s)| {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ s);
        o.iter_mut()
            .for_each(|x| *x = StandardNormal.sample(&mut rng));
    });
    let omega = ops.upload(&omega, n, l, nb)?;

    let mut q = ops.zeros(m, l, nb)?; // Q = orth(A Ω)
    ops.gemm(&mut q, &at, true, &omega, false)?;
    ops.orthonormalize(&mut q)?;
    let mut z = ops.zeros(n, l, nb)?;
    for _ in 0..opts.power_iters {
        ops.gemm(&mut z, &at, false, &q, false)?; // Aᵀ Q
        ops.orthonormalize(&mut z)?;
        ops.gemm(&mut q, &at, true, &z, false)?; // A Z
        ops.orthonormalize(&mut q)?;
    }
    // Bᵀ = Aᵀ Q = Q_b R_b; R_b = U_r Σ V_rᵀ ⇒ A ≈ (Q V_r) Σ (Q_b U_r)ᵀ.
    let mut qb = ops.zeros(n, l, nb)?;
    ops.gemm(&mut qb, &at, false, &q, false)?;
    let r_b = ops.orthonormalize(&mut qb)?;
    // The members' l×l core SVDs are independent host work: in parallel.
    let cores: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = r_b
        .par_iter()
        .map(|r| {
            let rm = Mat::from_fn(l, l, |i, j| r[j * l + i]);
            let svd = rm.thin_svd().map_err(|e| {
                Error::invalid(format!(
                    "factorize: SVD of the {l}×{l} core did not converge: {e:?}"
                ))
            })?;
            let column_major = |m: faer::MatRef<'_, f64>| -> Vec<f32> {
                (0..l)
                    .flat_map(|j| (0..l).map(move |i| m[(i, j)] as f32))
                    .collect()
            };
            let s = svd.S().column_vector().iter().map(|&s| s as f32).collect();
            Ok((column_major(svd.U()), column_major(svd.V()), s))
        })
        .collect::<Result<_>>()?;
    let (mut ur_all, mut vr_all, mut sigmas) = (vec![], vec![], vec![]);
    for (ur, vr, s) in cores {
        ur_all.extend(ur);
        vr_all.extend(vr);
        sigmas.push(s);
    }
    let (ur, vr) = (
        ops.upload(&ur_all, l, l, nb)?,
        ops.upload(&vr_all, l, l, nb)?,
    );
    let mut u = ops.zeros(m, l, nb)?;
    ops.gemm(&mut u, &q, false, &vr, false)?;
    let mut v = ops.zeros(n, l, nb)?;
    ops.gemm(&mut v, &qb, false, &ur, false)?;
    let (u, v) = (ops.download(&u)?, ops.download(&v)?);
    Ok((0..nb)
        .into_par_iter()
        .map(|i| {
            let (ui, vi) = (
                &u[i * m * l..(i + 1) * m * l],
                &v[i * n * l..(i + 1) * n * l],
            );
            // Column k of V (column-major, n rows) is row k of Vᵀ.
            Factors {
                m,
                n,
                u: transpose_columns(ui, m, rank).into(),
                s: sigmas[i][..rank].to_vec(),
                vt: vi[..rank * n].into(),
            }
        })
        .collect())
}

/// The first `cols` columns of a column-major `rows × ·` matrix as a row-major `rows × cols`
/// one, in tiles: element by element, every read of a tall matrix's row missed the cache.
fn transpose_columns(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let mut out = vec![0.0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                for r in r0..r1 {
                    out[r * cols + c] = x[c * rows + r];
                }
            }
        }
    }
    out
}

fn identity(l: usize) -> Vec<f64> {
    let mut m = vec![0.0; l * l];
    (0..l).for_each(|i| m[i * l + i] = 1.0);
    m
}

/// Upper-triangular `R` with `RᵀR = G` (column-major, `G` symmetric positive definite).
fn cholesky_upper(g: &[f64], l: usize) -> Option<Vec<f64>> {
    let mut r = vec![0.0; l * l];
    for j in 0..l {
        let mut d = g[j * l + j];
        for k in 0..j {
            d -= r[j * l + k] * r[j * l + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let rjj = d.sqrt();
        r[j * l + j] = rjj;
        for i in j + 1..l {
            let mut s = g[i * l + j];
            for k in 0..j {
                s -= r[j * l + k] * r[i * l + k];
            }
            r[i * l + j] = s / rjj; // R[j, i] (row j, column i)
        }
    }
    Some(r)
}

/// Inverse of an upper-triangular column-major matrix.
fn invert_upper(r: &[f64], l: usize) -> Vec<f64> {
    // Column j solves R·x = e_j by back substitution in its column form, so R is read down
    // its columns (contiguous) rather than along its rows (a stride of l).
    let mut inv = vec![0.0; l * l];
    for j in 0..l {
        let x = &mut inv[j * l..j * l + j + 1];
        x[j] = 1.0;
        for k in (0..=j).rev() {
            let col = &r[k * l..k * l + k + 1];
            x[k] /= col[k];
            let xk = x[k];
            for (xi, &rik) in x[..k].iter_mut().zip(&col[..k]) {
                *xi -= rik * xk;
            }
        }
    }
    inv
}

/// `a · b` for column-major `l × l` matrices.
fn matmul_upper(a: &[f64], b: &[f64], l: usize) -> Vec<f64> {
    let mut c = vec![0.0; l * l];
    for j in 0..l {
        for k in 0..l {
            let bkj = b[j * l + k];
            if bkj != 0.0 {
                for i in 0..l {
                    c[j * l + i] += a[k * l + i] * bkj;
                }
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evolve::factorize::exact_svd;

    /// The CPU's GEMMs with the default orthonormalisation, shifted CholeskyQR3: what the GPU
    /// runs (with cuBLAS GEMMs), tested here.
    struct CholeskyOnCpu;

    impl BatchedLinalg for CholeskyOnCpu {
        type Mat = CpuBatch;
        fn upload(&self, h: &[f32], r: usize, c: usize, b: usize) -> Result<CpuBatch> {
            CpuLinalg.upload(h, r, c, b)
        }
        fn zeros(&self, r: usize, c: usize, b: usize) -> Result<CpuBatch> {
            CpuLinalg.zeros(r, c, b)
        }
        fn dims(&self, m: &CpuBatch) -> (usize, usize, usize) {
            CpuLinalg.dims(m)
        }
        fn gemm(
            &self,
            c: &mut CpuBatch,
            a: &CpuBatch,
            ta: bool,
            b: &CpuBatch,
            tb: bool,
        ) -> Result<()> {
            CpuLinalg.gemm(c, a, ta, b, tb)
        }
        fn download(&self, m: &CpuBatch) -> Result<Vec<f32>> {
            CpuLinalg.download(m)
        }
    }

    /// The whole algorithm with both orthonormalisations.
    #[test]
    fn batched_randomized_svd_is_near_optimal_and_orthonormal() {
        near_optimal(&CpuLinalg);
        near_optimal(&CholeskyOnCpu);
    }

    fn near_optimal<O: BatchedLinalg>(ops: &O) {
        for (m, n) in [(300, 80), (80, 300), (128, 128)] {
            let mats: Vec<Vec<f32>> = (0..3u64)
                .map(|b| {
                    let mut rng = ChaCha8Rng::seed_from_u64(b + 10 * m as u64);
                    let k = 40;
                    let u: Vec<f32> = (0..m * k)
                        .map(|_| StandardNormal.sample(&mut rng))
                        .collect();
                    let v: Vec<f32> = (0..n * k)
                        .map(|_| StandardNormal.sample(&mut rng))
                        .collect();
                    (0..m * n)
                        .map(|idx| {
                            let (i, j) = (idx / n, idx % n);
                            let noise: f32 = StandardNormal.sample(&mut rng);
                            (0..k)
                                .map(|t| u[i * k + t] * v[j * k + t] * 0.85f32.powi(t as i32))
                                .sum::<f32>()
                                + 1e-3 * noise
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = mats.iter().map(|v| &v[..]).collect();
            let r = 12;
            let got =
                randomized_svd_batch(ops, &refs, m, n, r, RandomizedSvd::default(), &[0, 1, 2])
                    .unwrap();
            for (a, f) in mats.iter().zip(&got) {
                let optimal = exact_svd(a, m, n, r).unwrap();
                let (e_opt, e_got) = (optimal.relative_error(a), f.relative_error(a));
                assert!(e_got <= 1.5 * e_opt, "{m}×{n}: {e_got} vs optimal {e_opt}");
                for k in 0..r / 2 {
                    let rel = ((f.s[k] - optimal.s[k]) / optimal.s[k]).abs();
                    assert!(rel < 1e-3, "{m}×{n} σ_{k}: {} vs {}", f.s[k], optimal.s[k]);
                }
                // U's columns are orthonormal.
                for p in 0..r {
                    for q in 0..r {
                        let d: f32 = (0..m).map(|i| f.u[i * r + p] * f.u[i * r + q]).sum();
                        let want = if p == q { 1.0 } else { 0.0 };
                        assert!((d - want).abs() < 1e-3, "{m}×{n} UᵀU[{p},{q}] = {d}");
                    }
                }
            }
        }
        // The rank is checked.
        assert!(randomized_svd_batch(
            &CpuLinalg,
            &[&[0.0; 6][..]],
            2,
            3,
            3,
            RandomizedSvd::default(),
            &[0]
        )
        .is_err());
    }

    #[test]
    fn flat_spectra_zero_and_low_rank_members_factorise() {
        degenerate(&CpuLinalg);
        degenerate(&CholeskyOnCpu);
    }

    fn degenerate<O: BatchedLinalg>(ops: &O) {
        // A Gaussian (flat spectrum), an exactly rank-2 and a zero task vector in one batch:
        // the last two make CholeskyQR's Gram matrices singular.
        for (m, n) in [(200, 60), (60, 200)] {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let mut normal = || -> f32 { StandardNormal.sample(&mut rng) };
            let gaussian: Vec<f32> = (0..m * n).map(|_| normal()).collect();
            let (p, q): (Vec<f32>, Vec<f32>) = (
                (0..m * 2).map(|_| normal()).collect(),
                (0..n * 2).map(|_| normal()).collect(),
            );
            let rank2: Vec<f32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    p[2 * i] * q[2 * j] + 0.5 * p[2 * i + 1] * q[2 * j + 1]
                })
                .collect();
            let zero = vec![0.0f32; m * n];
            let r = 12;
            let got = randomized_svd_batch(
                ops,
                &[&gaussian[..], &rank2[..], &zero[..]],
                m,
                n,
                r,
                RandomizedSvd::default(),
                &[0, 1, 2],
            )
            .unwrap();
            let optimal = exact_svd(&gaussian, m, n, r)
                .unwrap()
                .relative_error(&gaussian);
            let e = got[0].relative_error(&gaussian);
            assert!(
                e <= 1.5 * optimal,
                "{m}×{n} gaussian: {e} vs optimal {optimal}"
            );
            let e = got[1].relative_error(&rank2);
            assert!(e < 1e-4, "{m}×{n} rank 2: relative error {e}");
            assert!(got[1].s[2..].iter().all(|&s| s.abs() <= 1e-4 * got[1].s[0]));
            assert!(
                got[2].s.iter().all(|&s| s == 0.0)
                    && got[2].reconstruct().iter().all(|&v| v == 0.0)
            );
            for f in &got {
                assert!(f.u.iter().chain(f.vt.iter()).all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn host_cholesky_and_triangular_inverse() {
        let l = 5;
        // G = MᵀM for a well-conditioned M (column-major).
        let mcol: Vec<f64> = (0..l * l)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0 + if i % (l + 1) == 0 { 4.0 } else { 0.0 })
            .collect();
        let mut g = vec![0.0; l * l];
        for i in 0..l {
            for j in 0..l {
                g[j * l + i] = (0..l).map(|k| mcol[i * l + k] * mcol[j * l + k]).sum();
            }
        }
        let r = cholesky_upper(&g, l).unwrap();
        for i in 0..l {
            for j in 0..l {
                let rtr: f64 = (0..l).map(|k| r[i * l + k] * r[j * l + k]).sum();
                assert!((rtr - g[j * l + i]).abs() < 1e-9, "RᵀR ≠ G at {i},{j}");
                if i > j {
                    assert_eq!(r[j * l + i], 0.0, "R is upper triangular");
                }
            }
        }
        let prod = matmul_upper(&r, &invert_upper(&r, l), l);
        for i in 0..l {
            for j in 0..l {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((prod[j * l + i] - want).abs() < 1e-9, "R·R⁻¹ at {i},{j}");
            }
        }
        assert!(
            cholesky_upper(&[0.0, 0.0, 0.0, 1.0], 2).is_none(),
            "singular G is refused"
        );
    }
}
