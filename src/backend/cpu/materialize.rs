//! Materialisation, CPU reference: one genome tensor to dense weights in one pass over the
//! sources (see [`crate::backend::materialize`] for the formula), f32 accumulation, rounded
//! once to the output dtype. Parallel over blocks of rows; each block is upcast, combined and
//! rounded while it is in cache, and the low-rank term is one small GEMM per block.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::backend::materialize::{TensorCoefficients, TensorSources};
use crate::model::{dtype, DType, HostTensor};

/// Rows per task: enough for the low-rank GEMM to reuse each `Vᵀ` row, few enough that the
/// block's f32 accumulator stays in L2.
const ROWS: usize = 32;

/// Writes tensor `src` of a child with coefficients `coef` into `out` (`m·n` elements of
/// `out_dtype`). The caller has checked the call ([`TensorSources::check_call`]).
pub fn materialize(
    out: &mut [u8],
    out_dtype: DType,
    src: &TensorSources,
    coef: &TensorCoefficients,
) {
    let (m, n) = (src.m, src.n);
    let esize = out_dtype.size();
    assert_eq!(out.len(), m * n * esize, "materialize: output buffer size");
    let a_sum: f32 = coef.a.iter().sum();
    let max_rank = src.factors.iter().map(|f| f.rank).max().unwrap_or(0);
    // Offsets of each expert's coefficients in `coef.c`.
    let offsets: Vec<usize> = src
        .factors
        .iter()
        .scan(0, |o, f| {
            let at = *o;
            *o += f.rank;
            Some(at)
        })
        .collect();
    out.par_chunks_mut(ROWS * n * esize)
        .enumerate()
        .for_each_init(
            || (vec![0.0f32; ROWS * n], vec![0.0f32; ROWS * n.max(max_rank)]),
            |(acc, tmp), (blk, out_block)| {
                let (r0, rows) = (blk * ROWS, out_block.len() / (n * esize));
                let len = rows * n;
                let (lo, hi) = (r0 * n, r0 * n + len);
                let acc = &mut acc[..len];
                dtype::to_f32(src.base.dtype, bytes_of(&src.base, lo, hi), acc);
                acc.iter_mut().for_each(|v| *v *= 1.0 - a_sum);
                for (x, &ae) in src.experts.iter().zip(&coef.a) {
                    dtype::to_f32(x.dtype, bytes_of(x, lo, hi), &mut tmp[..len]);
                    acc.iter_mut()
                        .zip(&tmp[..len])
                        .for_each(|(o, &x)| *o += ae * x);
                }
                for (f, &off) in src.factors.iter().zip(&offsets) {
                    // acc[rows, n] += (U[r0.., :] · diag(c)) · Vᵀ: a small GEMM, so each Vᵀ
                    // element loaded is reused across the block's rows in registers.
                    let r = f.rank;
                    if r == 0 {
                        continue;
                    }
                    let c = &coef.c[off..off + r];
                    let us = &mut tmp[..rows * r];
                    for (i, row) in us.chunks_exact_mut(r).enumerate() {
                        let u = &f.u[(r0 + i) * r..(r0 + i + 1) * r];
                        row.iter_mut()
                            .zip(u.iter().zip(c))
                            .for_each(|(o, (u, c))| *o = u * c);
                    }
                    matmul(
                        MatMut::from_row_major_slice_mut(acc, rows, n),
                        Accum::Add,
                        MatRef::from_row_major_slice(us, rows, r),
                        MatRef::from_row_major_slice(&f.vt, r, n),
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
    use crate::backend::materialize::LowRankFactors;

    #[test]
    fn matches_the_formula_rounded_once_for_every_dtype() {
        // 70 rows cross three row blocks; the experts' ranks differ.
        let (m, n, ranks) = (70, 5, [2usize, 3]);
        let val = |i: usize, s: f32| ((i * 37 % 17) as f32 - 8.0) * s;
        let u: Vec<Vec<f32>> = (0..2)
            .map(|e| (0..m * ranks[e]).map(|i| val(i + e, 0.1)).collect())
            .collect();
        let vt: Vec<Vec<f32>> = (0..2)
            .map(|e| (0..ranks[e] * n).map(|i| val(i + 3 + e, 0.05)).collect())
            .collect();
        let c = vec![0.7f32, -0.2, 0.4, 0.1, -0.3];
        let a = [0.3f32, 0.5];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let t = |k: usize, s: f32| {
                HostTensor::from_f32(
                    &(0..m * n).map(|i| val(i + k, s)).collect::<Vec<_>>(),
                    vec![m, n],
                    dt,
                )
            };
            let (b, x0, x1) = (t(0, 0.01), t(1, 0.02), t(2, 0.03));
            let want: Vec<f32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    let mut lr = 0.0f32;
                    let mut off = 0;
                    for e in 0..2 {
                        let r = ranks[e];
                        lr += (0..r)
                            .map(|k| u[e][i * r + k] * c[off + k] * vt[e][k * n + j])
                            .sum::<f32>();
                        off += r;
                    }
                    (1.0 - 0.8) * b.to_f32()[idx]
                        + a[0] * x0.to_f32()[idx]
                        + a[1] * x1.to_f32()[idx]
                        + lr
                })
                .collect();
            let src = TensorSources {
                name: "w".into(),
                base: b,
                experts: vec![x0, x1],
                factors: (0..2)
                    .map(|e| LowRankFactors {
                        u: u[e].clone().into(),
                        vt: vt[e].clone().into(),
                        rank: ranks[e],
                    })
                    .collect(),
                m,
                n,
            };
            src.check().unwrap();
            let coef = TensorCoefficients {
                a: a.to_vec(),
                c: c.clone(),
            };
            let mut out = vec![0u8; m * n * dt.size()];
            materialize(&mut out, dt, &src, &coef);
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
