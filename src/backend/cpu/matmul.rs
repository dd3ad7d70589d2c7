//! `out[rows, n] = x[rows, k] · wᵀ`, `w` `[n, k]` in f16/bf16/f32, f32 accumulation.
//!
//! Work is split over blocks of `W_BLOCK` weight rows: each task upcasts its block into an
//! L1/L2-resident f32 buffer once and reuses it for every input row, so decode (few rows) reads
//! each weight byte exactly once — the memory-bandwidth roofline — and prefill (many rows) reuses
//! the upcast block `rows` times. The inner kernel takes 4 weight rows × 1 input row per pass so
//! every load of `x` feeds 4 FMAs. An AVX2+FMA build of the same kernel is chosen at run time.

use rayon::prelude::*;

use crate::model::dtype;
use crate::model::HostTensor;

/// Weight rows per task: 16 rows × k=4096 × 4 B = 256 KiB upcast buffer (fits L2).
const W_BLOCK: usize = 16;

/// A raw output pointer that tasks write disjoint elements through.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the output columns of its own weight block, so writes from
// different threads never alias; the pointer outlives the parallel scope.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub fn matmul_t(out: &mut [f32], x: &[f32], w: &HostTensor, rows: usize, n: usize, k: usize) {
    assert_eq!(
        w.numel(),
        n * k,
        "matmul_t: weight has {} elements, expected {n}×{k}",
        w.numel()
    );
    assert!(
        x.len() >= rows * k && out.len() >= rows * n,
        "matmul_t: buffers too small"
    );
    let data = w.data();
    let esize = w.dtype.size();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let use_fma = has_fma();

    (0..n.div_ceil(W_BLOCK)).into_par_iter().for_each_init(
        || vec![0.0f32; W_BLOCK * k],
        |wbuf, blk| {
            let j0 = blk * W_BLOCK;
            let j1 = (j0 + W_BLOCK).min(n);
            let wb = &mut wbuf[..(j1 - j0) * k];
            dtype::to_f32(w.dtype, &data[j0 * k * esize..j1 * k * esize], wb);
            let out_ptr = out_ptr;
            #[cfg(target_arch = "x86_64")]
            if use_fma {
                // SAFETY: the CPU supports AVX2 and FMA (checked by `has_fma`).
                unsafe { block_fma(out_ptr, x, wb, rows, n, k, j0, j1) };
                return;
            }
            let _ = use_fma;
            block_generic(out_ptr, x, wb, rows, n, k, j0, j1);
        },
    );
}

fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_fma(
    out: OutPtr,
    x: &[f32],
    wb: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    block_body::<true>(out, x, wb, rows, n, k, j0, j1)
}

#[allow(clippy::too_many_arguments)]
fn block_generic(
    out: OutPtr,
    x: &[f32],
    wb: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    block_body::<false>(out, x, wb, rows, n, k, j0, j1)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_body<const FMA: bool>(
    out: OutPtr,
    x: &[f32],
    wb: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let cols = j1 - j0;
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        let mut c = 0;
        while c + 4 <= cols {
            let d = dot4::<FMA>(
                xr,
                &wb[c * k..(c + 1) * k],
                &wb[(c + 1) * k..(c + 2) * k],
                &wb[(c + 2) * k..(c + 3) * k],
                &wb[(c + 3) * k..(c + 4) * k],
            );
            for (i, v) in d.into_iter().enumerate() {
                // SAFETY: r < rows and j0 + c + i < j1 <= n: in bounds, and owned by this block.
                unsafe { *out.0.add(r * n + j0 + c + i) = v };
            }
            c += 4;
        }
        while c < cols {
            let v = dot::<FMA>(xr, &wb[c * k..(c + 1) * k]);
            // SAFETY: as above.
            unsafe { *out.0.add(r * n + j0 + c) = v };
            c += 1;
        }
    }
}

const LANES: usize = 8;

#[inline(always)]
fn fmadd<const FMA: bool>(acc: f32, a: f32, b: f32) -> f32 {
    if FMA {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

#[inline(always)]
fn dot4<const FMA: bool>(x: &[f32], w0: &[f32], w1: &[f32], w2: &[f32], w3: &[f32]) -> [f32; 4] {
    let k = x.len();
    let main = k - k % LANES;
    let mut acc = [[0.0f32; LANES]; 4];
    let mut i = 0;
    while i < main {
        let xs = &x[i..i + LANES];
        let ws = [
            &w0[i..i + LANES],
            &w1[i..i + LANES],
            &w2[i..i + LANES],
            &w3[i..i + LANES],
        ];
        for (a, w) in acc.iter_mut().zip(ws) {
            for l in 0..LANES {
                a[l] = fmadd::<FMA>(a[l], xs[l], w[l]);
            }
        }
        i += LANES;
    }
    let mut out = [0.0f32; 4];
    for (o, (a, w)) in out.iter_mut().zip(acc.iter().zip([w0, w1, w2, w3])) {
        let mut s = hsum(a);
        for t in main..k {
            s = fmadd::<FMA>(s, x[t], w[t]);
        }
        *o = s;
    }
    out
}

#[inline(always)]
fn dot<const FMA: bool>(x: &[f32], w: &[f32]) -> f32 {
    let k = x.len();
    let main = k - k % LANES;
    let mut acc = [0.0f32; LANES];
    let mut i = 0;
    while i < main {
        for l in 0..LANES {
            acc[l] = fmadd::<FMA>(acc[l], x[i + l], w[i + l]);
        }
        i += LANES;
    }
    let mut s = hsum(&acc);
    for t in main..k {
        s = fmadd::<FMA>(s, x[t], w[t]);
    }
    s
}

#[inline(always)]
fn hsum(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DType;

    /// The slow composition the fused kernel must equal: f64 dot products of upcast values.
    fn matmul_slow(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matches_slow_reference_for_every_dtype_and_ragged_shape() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (rows, n, k) in [(1, 37, 19), (5, 16, 64), (3, 70, 129)] {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let w = HostTensor::from_f32(&wv, vec![n, k], dt);
                let want = matmul_slow(&x, &w.to_f32(), rows, n, k);
                let mut got = vec![0.0; rows * n];
                matmul_t(&mut got, &x, &w, rows, n, k);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 + 1e-5 * e.abs(),
                        "{dt} {rows}x{n}x{k} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }
}
