//! Materialisation, CPU reference: one genome tensor to dense weights in one pass over the
//! sources, `θ = (1 − Σ a_e)·θ_b + Σ a_e·θ_e + Σ_e U_e·diag(c_e)·V_eᵀ` with
//! `c_e = γ_e − a_e·S_e`, f32 accumulation, rounded once to the output dtype. Parallel over
//! blocks of rows; each block is upcast, combined and rounded while it is in cache.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::model::{dtype, DType, HostTensor};

/// Rows per task: enough for the low-rank GEMM to reuse each `Vᵀ` row, few enough that the
/// block's f32 accumulator stays in L2.
const ROWS: usize = 32;

/// One low-rank term: `U` `[m, r]` and `Vᵀ` `[r, n]` (row-major) with its coefficients `[r]`.
pub struct LowRank<'a> {
    pub u: &'a [f32],
    pub vt: &'a [f32],
    pub coef: Vec<f32>,
}

/// Checks a materialisation call's buffers: `out` holds `m·n` elements of `out_dtype` and every
/// source is `m·n` elements (the backends' shared precondition).
pub fn check_shapes(
    out_len: usize,
    out_dtype: DType,
    base: &HostTensor,
    experts: &[&HostTensor],
    m: usize,
    n: usize,
) -> crate::error::Result<()> {
    if out_len != m * n * out_dtype.size()
        || base.numel() != m * n
        || experts.iter().any(|x| x.numel() != m * n)
    {
        return Err(crate::error::Error::invalid(format!(
            "materialize: buffers do not match a {m}×{n} tensor of {out_dtype}"
        )));
    }
    Ok(())
}

/// Writes the `[m, n]` tensor into `out` (`m·n` elements of `out_dtype`).
#[allow(clippy::too_many_arguments)]
pub fn materialize(
    out: &mut [u8],
    out_dtype: DType,
    base: &HostTensor,
    experts: &[&HostTensor],
    a: &[f32],
    low_rank: &[LowRank],
    m: usize,
    n: usize,
) {
    let esize = out_dtype.size();
    assert_eq!(out.len(), m * n * esize, "materialize: output buffer size");
    let a_sum: f32 = a.iter().sum();
    out.par_chunks_mut(ROWS * n * esize)
        .enumerate()
        .for_each_init(
            || {
                let max_rank = low_rank.iter().map(|l| l.coef.len()).max().unwrap_or(0);
                (vec![0.0f32; ROWS * n], vec![0.0f32; ROWS * n.max(max_rank)])
            },
            |(acc, tmp), (blk, out_block)| {
                let (r0, rows) = (blk * ROWS, out_block.len() / (n * esize));
                let len = rows * n;
                let (lo, hi) = (r0 * n, r0 * n + len);
                let acc = &mut acc[..len];
                dtype::to_f32(base.dtype, bytes_of(base, lo, hi), acc);
                acc.iter_mut().for_each(|v| *v *= 1.0 - a_sum);
                for (x, &ae) in experts.iter().zip(a) {
                    dtype::to_f32(x.dtype, bytes_of(x, lo, hi), &mut tmp[..len]);
                    acc.iter_mut()
                        .zip(&tmp[..len])
                        .for_each(|(o, &x)| *o += ae * x);
                }
                for lr in low_rank {
                    // acc[rows, n] += (U[r0.., :] · diag(c)) · Vᵀ: a small GEMM, so each Vᵀ
                    // element loaded is reused across the block's rows in registers.
                    let r = lr.coef.len();
                    let us = &mut tmp[..rows * r];
                    for (i, row) in us.chunks_exact_mut(r).enumerate() {
                        let u = &lr.u[(r0 + i) * r..(r0 + i + 1) * r];
                        row.iter_mut()
                            .zip(u.iter().zip(&lr.coef))
                            .for_each(|(o, (u, c))| *o = u * c);
                    }
                    matmul(
                        MatMut::from_row_major_slice_mut(acc, rows, n),
                        Accum::Add,
                        MatRef::from_row_major_slice(us, rows, r),
                        MatRef::from_row_major_slice(lr.vt, r, n),
                        1.0,
                        Par::Seq,
                    );
                }
                dtype::from_f32_slice(out_dtype, acc, out_block);
            },
        );
}

/// The bytes of elements `lo..hi` of a tensor.
fn bytes_of(t: &HostTensor, lo: usize, hi: usize) -> &[u8] {
    let s = t.dtype.size();
    &t.data()[lo * s..hi * s]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_rounded_once_for_every_dtype() {
        let (m, n, r) = (11, 5, 2);
        let val = |i: usize, s: f32| ((i * 37 % 17) as f32 - 8.0) * s;
        let u: Vec<f32> = (0..m * r).map(|i| val(i, 0.1)).collect();
        let vt: Vec<f32> = (0..r * n).map(|i| val(i + 3, 0.05)).collect();
        let coef = vec![0.7f32, -0.2];
        let a = [0.3f32, 0.5];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let b = HostTensor::from_f32(
                &(0..m * n).map(|i| val(i, 0.01)).collect::<Vec<_>>(),
                vec![m, n],
                dt,
            );
            let x0 = HostTensor::from_f32(
                &(0..m * n).map(|i| val(i + 1, 0.02)).collect::<Vec<_>>(),
                vec![m, n],
                dt,
            );
            let x1 = HostTensor::from_f32(
                &(0..m * n).map(|i| val(i + 2, 0.03)).collect::<Vec<_>>(),
                vec![m, n],
                dt,
            );
            let want: Vec<f32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    let lr: f32 = (0..r).map(|k| u[i * r + k] * coef[k] * vt[k * n + j]).sum();
                    (1.0 - 0.8) * b.to_f32()[idx]
                        + a[0] * x0.to_f32()[idx]
                        + a[1] * x1.to_f32()[idx]
                        + lr
                })
                .collect();
            let mut out = vec![0u8; m * n * dt.size()];
            let low = [LowRank {
                u: &u,
                vt: &vt,
                coef: coef.clone(),
            }];
            materialize(&mut out, dt, &b, &[&x0, &x1], &a, &low, m, n);
            let got = dtype::to_f32_vec(dt, &out);
            let rounded = dtype::to_f32_vec(dt, &dtype::from_f32(dt, &want));
            // Equal after rounding, up to one ulp where f32 sums straddle a rounding boundary.
            let ulp = match dt {
                DType::F32 => 1e-6,
                DType::F16 => 1e-3,
                DType::BF16 => 8e-3,
            };
            for (g, w) in got.iter().zip(&rounded) {
                assert!((g - w).abs() <= w.abs() * ulp + 1e-7, "{dt}: {g} vs {w}");
            }
        }
    }
}
