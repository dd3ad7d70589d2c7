//! `out[rows, n] = x[rows, k] · wᵀ`, `w` `[n, k]` in f16/bf16/f32, f32 accumulation.
//!
//! Work is split over blocks of weight rows (`block_rows`): each task upcasts its block into an
//! L1/L2-resident f32 buffer once and reuses it for every input row, so decode (few rows) reads
//! each weight byte exactly once — the memory-bandwidth roofline — and prefill (many rows) reuses
//! the upcast block `rows` times. The inner kernel takes 4 weight rows × 1 input row per pass so
//! every load of `x` feeds 4 FMAs. An AVX2+FMA build of the same kernel is chosen at run time.

use rayon::prelude::*;

use crate::model::dtype;
use crate::model::HostTensor;

/// Weight rows per task when many input rows reuse each block: 16 rows × k=4096 × 4 B =
/// 256 KiB upcast buffer (fits L2).
const W_BLOCK: usize = 16;
/// Input rows up to which a task is memory-bound (decode): blocks then grow so that each
/// rayon task streams at least `MIN_TASK_BYTES` of weights, amortising scheduling.
const FEW_ROWS: usize = 4;
const MIN_TASK_BYTES: usize = 128 << 10;

/// Weight rows per task for this shape: a multiple of 4 (the register tile).
fn block_rows(rows: usize, n: usize, k: usize, esize: usize) -> usize {
    if rows > FEW_ROWS {
        return W_BLOCK;
    }
    let by_bytes = MIN_TASK_BYTES.div_ceil(k * esize);
    // Still at least 4 tasks per thread, for load balance.
    let by_balance = n / (4 * rayon::current_num_threads()).max(1);
    by_bytes.min(by_balance).max(W_BLOCK).next_multiple_of(4)
}

/// A raw output pointer that tasks write disjoint elements through.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the output columns of its own weight block, so writes from
// different threads never alias; the pointer outlives the parallel scope.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A writer of block-local `(row, column)` results into `out[row * n + j0 + column]`.
    #[inline(always)]
    fn storer(self, n: usize, j0: usize) -> impl Fn(usize, usize, f32) {
        // SAFETY: callers pass r < rows and j0 + c < j1 <= n (in bounds), and each block owns
        // its columns, so no other thread writes these elements.
        move |r, c, v| unsafe { *self.0.add(r * n + j0 + c) = v }
    }
}

/// The instruction set a kernel runs with, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Generic,
}

impl Isa {
    /// What this CPU supports, detected once.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2Fma;
                }
            }
            Isa::Generic
        })
    }

    /// This ISA and every weaker one, for tests that cover all paths the CPU can run.
    pub fn available() -> Vec<Isa> {
        let all = [Isa::Avx512, Isa::Avx2Fma, Isa::Generic];
        let best = all.iter().position(|&i| i == Isa::detect()).unwrap_or(2);
        all[best..].to_vec()
    }
}

pub fn matmul_t(out: &mut [f32], x: &[f32], w: &HostTensor, rows: usize, n: usize, k: usize) {
    matmul_t_isa(Isa::detect(), out, x, w, rows, n, k)
}

/// [`matmul_t`] with a chosen instruction set (must be one of [`Isa::available`]).
pub fn matmul_t_isa(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    w: &HostTensor,
    rows: usize,
    n: usize,
    k: usize,
) {
    assert!(
        Isa::available().contains(&isa),
        "{isa:?} is not supported by this CPU"
    );
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

    let block = block_rows(rows, n, k, esize);
    (0..n.div_ceil(block)).into_par_iter().for_each_init(
        || vec![0.0f32; block * k],
        |wbuf, blk| {
            let j0 = blk * block;
            let j1 = (j0 + block).min(n);
            let wb = &mut wbuf[..(j1 - j0) * k];
            dtype::to_f32(w.dtype, &data[j0 * k * esize..j1 * k * esize], wb);
            match isa {
                // SAFETY: `isa` is one this CPU supports (asserted above).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { block_avx512(out_ptr, x, wb, rows, n, k, j0, j1) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { block_fma(out_ptr, x, wb, rows, n, k, j0, j1) },
                _ => block_generic(out_ptr, x, wb, rows, n, k, j0, j1),
            }
        },
    );
}

/// AVX2 register tiles: 3 input rows × 4 weight rows = 12 ymm accumulators plus 7 loads per
/// 12 FMAs, which keeps two FMA ports busy within the 16 ymm registers.
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
    let (xp, wp) = (x.as_ptr(), wb.as_ptr());
    let xs = |i: usize| xp.add(i * k);
    let ws = |j: usize| wp.add(j * k);
    let store = out.storer(n, j0);
    walk_tiles(
        rows,
        j1 - j0,
        3,
        |r, rx, c| {
            let w4 = [ws(c), ws(c + 1), ws(c + 2), ws(c + 3)];
            match rx {
                3 => emit(
                    avx2::tile::<3, 4>([xs(r), xs(r + 1), xs(r + 2)], w4, k),
                    r,
                    c,
                    &store,
                ),
                2 => emit(avx2::tile::<2, 4>([xs(r), xs(r + 1)], w4, k), r, c, &store),
                _ => emit(avx2::tile::<1, 4>([xs(r)], w4, k), r, c, &store),
            }
        },
        |r, c| store(r, c, avx2::tile::<1, 1>([xs(r)], [ws(c)], k)[0][0]),
    );
}

/// AVX-512 register tiles: 6 input rows × 4 weight rows = 24 zmm accumulators, 4 weight and
/// 1 input registers per step (29 of 32), 2.4 FMAs per load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512(
    out: OutPtr,
    x: &[f32],
    wb: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let (xp, wp) = (x.as_ptr(), wb.as_ptr());
    let xs = |i: usize| xp.add(i * k);
    let ws = |j: usize| wp.add(j * k);
    let store = out.storer(n, j0);
    walk_tiles(
        rows,
        j1 - j0,
        6,
        |r, rx, c| {
            let w4 = [ws(c), ws(c + 1), ws(c + 2), ws(c + 3)];
            let x = |i: usize| xs(r + i);
            match rx {
                6 => emit(
                    avx512::tile::<6, 4>([x(0), x(1), x(2), x(3), x(4), x(5)], w4, k),
                    r,
                    c,
                    &store,
                ),
                5 => emit(
                    avx512::tile::<5, 4>([x(0), x(1), x(2), x(3), x(4)], w4, k),
                    r,
                    c,
                    &store,
                ),
                4 => emit(
                    avx512::tile::<4, 4>([x(0), x(1), x(2), x(3)], w4, k),
                    r,
                    c,
                    &store,
                ),
                3 => emit(
                    avx512::tile::<3, 4>([x(0), x(1), x(2)], w4, k),
                    r,
                    c,
                    &store,
                ),
                2 => emit(avx512::tile::<2, 4>([x(0), x(1)], w4, k), r, c, &store),
                _ => emit(avx512::tile::<1, 4>([x(0)], w4, k), r, c, &store),
            }
        },
        |r, c| store(r, c, avx512::tile::<1, 1>([xs(r)], [ws(c)], k)[0][0]),
    );
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Dot products of `A` input rows with `B` weight rows of length `k` in zmm accumulators;
    /// the tail past a multiple of 16 is done in scalar FMAs.
    ///
    /// # Safety
    /// AVX-512F must be available; every pointer must be valid for `k` reads.
    #[inline(always)]
    pub unsafe fn tile<const A: usize, const B: usize>(
        x: [*const f32; A],
        w: [*const f32; B],
        k: usize,
    ) -> [[f32; B]; A] {
        let mut acc = [[_mm512_setzero_ps(); B]; A];
        let main = k - k % 16;
        let mut i = 0;
        while i < main {
            let mut wv = [_mm512_setzero_ps(); B];
            for b in 0..B {
                wv[b] = _mm512_loadu_ps(w[b].add(i));
            }
            for a in 0..A {
                let xv = _mm512_loadu_ps(x[a].add(i));
                for b in 0..B {
                    acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
                }
            }
            i += 16;
        }
        let mut out = [[0.0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                let mut s = _mm512_reduce_add_ps(acc[a][b]);
                for t in main..k {
                    s = (*x[a].add(t)).mul_add(*w[b].add(t), s);
                }
                out[a][b] = s;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Dot products of `A` input rows with `B` weight rows of length `k`, in `A·B` ymm
    /// accumulators; the tail past a multiple of 8 is done in scalar FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; every pointer must be valid for `k` reads.
    #[inline(always)]
    pub unsafe fn tile<const A: usize, const B: usize>(
        x: [*const f32; A],
        w: [*const f32; B],
        k: usize,
    ) -> [[f32; B]; A] {
        let mut acc = [[_mm256_setzero_ps(); B]; A];
        let main = k - k % 8;
        let mut i = 0;
        while i < main {
            let mut wv = [_mm256_setzero_ps(); B];
            for b in 0..B {
                wv[b] = _mm256_loadu_ps(w[b].add(i));
            }
            for a in 0..A {
                let xv = _mm256_loadu_ps(x[a].add(i));
                for b in 0..B {
                    acc[a][b] = _mm256_fmadd_ps(xv, wv[b], acc[a][b]);
                }
            }
            i += 8;
        }
        let mut out = [[0.0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                let v = acc[a][b];
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                let mut s = _mm_cvtss_f32(s1);
                for t in main..k {
                    s = (*x[a].add(t)).mul_add(*w[b].add(t), s);
                }
                out[a][b] = s;
            }
        }
        out
    }
}

/// Portable tiles: 3 input rows × 4 weight rows of 8-lane accumulators (what LLVM can keep in
/// SSE registers).
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
    let xs = |r: usize| &x[r * k..(r + 1) * k];
    let ws = |c: usize| &wb[c * k..(c + 1) * k];
    let store = out.storer(n, j0);
    walk_tiles(
        rows,
        j1 - j0,
        3,
        |r, rx, c| {
            let w4 = [ws(c), ws(c + 1), ws(c + 2), ws(c + 3)];
            match rx {
                3 => emit(
                    tile::<3, 4>([xs(r), xs(r + 1), xs(r + 2)], w4),
                    r,
                    c,
                    &store,
                ),
                2 => emit(tile::<2, 4>([xs(r), xs(r + 1)], w4), r, c, &store),
                _ => emit(tile::<1, 4>([xs(r)], w4), r, c, &store),
            }
        },
        |r, c| store(r, c, tile::<1, 1>([xs(r)], [ws(c)])[0][0]),
    );
}

/// Walks a block's `rows × cols` output in register tiles of up to `rx_max × 4`: `tile(r, rx, c)`
/// computes the `rx × 4` tile at `(r, c)`; the last `cols % 4` columns go through `one(r, c)`.
#[inline(always)]
fn walk_tiles(
    rows: usize,
    cols: usize,
    rx_max: usize,
    mut tile: impl FnMut(usize, usize, usize),
    mut one: impl FnMut(usize, usize),
) {
    let mut r = 0;
    while r < rows {
        let rx = (rows - r).min(rx_max);
        let mut c = 0;
        while c + 4 <= cols {
            tile(r, rx, c);
            c += 4;
        }
        for c in c..cols {
            for i in r..r + rx {
                one(i, c);
            }
        }
        r += rx;
    }
}

#[inline(always)]
fn emit<const A: usize, const B: usize>(
    t: [[f32; B]; A],
    r: usize,
    c: usize,
    store: &impl Fn(usize, usize, f32),
) {
    for (i, row) in t.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            store(r + i, c + j, v);
        }
    }
}

/// Lanes of the portable accumulators (one SSE/AVX register's worth for LLVM).
const LANES: usize = 8;

/// Dot products of `A` input rows with `B` weight rows (all of length k).
#[inline(always)]
fn tile<const A: usize, const B: usize>(x: [&[f32]; A], w: [&[f32]; B]) -> [[f32; B]; A] {
    let k = x[0].len();
    let main = k - k % LANES;
    let mut acc = [[[0.0f32; LANES]; B]; A];
    let mut i = 0;
    while i < main {
        for a in 0..A {
            let xs = &x[a][i..i + LANES];
            for b in 0..B {
                let ws = &w[b][i..i + LANES];
                for l in 0..LANES {
                    acc[a][b][l] += xs[l] * ws[l];
                }
            }
        }
        i += LANES;
    }
    let mut out = [[0.0f32; B]; A];
    for a in 0..A {
        for b in 0..B {
            let mut s = hsum(&acc[a][b]);
            for t in main..k {
                s += x[a][t] * w[b][t];
            }
            out[a][b] = s;
        }
    }
    out
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
        for (rows, n, k) in [(1, 37, 19), (5, 16, 64), (3, 70, 129), (13, 40, 300)] {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let w = HostTensor::from_f32(&wv, vec![n, k], dt);
                let want = matmul_slow(&x, &w.to_f32(), rows, n, k);
                // Every path this CPU can run, not only the widest (an AVX-512 machine runs
                // the AVX2 and portable tiles too).
                for isa in Isa::available() {
                    let mut got = vec![0.0; rows * n];
                    matmul_t_isa(isa, &mut got, &x, &w, rows, n, k);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-5 + 1e-5 * e.abs(),
                            "{isa:?} {dt} {rows}x{n}x{k} [{i}]: {g} vs {e}"
                        );
                    }
                }
            }
        }
        assert!(Isa::available().contains(&Isa::Generic));
    }
}
