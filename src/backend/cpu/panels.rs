//! Products of many input rows (prefill, batched decode) as outer products: bf16 through
//! `vdpbf16ps`, f32 through FMAs.
//!
//! The dot-product tiles of `matmul` keep a k-wide vector per (row, weight row) pair and sum
//! its lanes at the end: 24 horizontal sums and 24 scalar stores per tile, which at k = 768 is
//! a tenth of the tile's work (and most of it at the demo's k = 64). Here a vector holds one
//! output column for 16 input rows instead, so nothing is summed across lanes: the
//! activations are packed once per call into panels of 16 rows (`[panel][unit][16 lanes]`
//! u32, a unit being a bf16 pair — the operand layout of `vdpbf16ps` — or one f32), and each
//! weight unit is broadcast straight from the weight's bytes: no copy or repacking of the
//! weights, whose size is the model's.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::model::dtype;

/// Input rows a panel holds: one zmm of f32 lanes.
pub const LANES: usize = 16;

/// Input rows from which products take this path: below it, a panel would be mostly padding
/// and the dot-product tiles (which read each weight byte once) do better.
pub const MIN_ROWS: usize = 16;

/// Weight rows per task: a multiple of every tile width below, small enough for a few tasks a
/// thread on the narrowest products (k/v at 256 rows).
pub fn block_rows(n: usize) -> usize {
    if n >= 32 * 4 * rayon::current_num_threads() {
        32
    } else {
        16
    }
}

#[cfg(target_arch = "x86_64")]
/// How a panel's 32-bit lanes and a weight's elements multiply: what differs between the bf16
/// and the f32 tiles.
pub trait Unit {
    /// Weight elements a unit holds: a bf16 pair, or one f32.
    const PER_UNIT: usize;
    /// Bytes of one weight element.
    const ELEM: usize;
    /// `acc + x·w` lane by lane, `w` one weight unit broadcast to every lane.
    ///
    /// # Safety
    /// The CPU must have the unit's instructions (AVX-512F; for bf16 also AVX-512 BF16).
    unsafe fn mul_add(acc: __m512, x: __m512i, w: __m512i) -> __m512;
}

/// bf16 pairs into f32 accumulators (`vdpbf16ps`).
#[cfg(target_arch = "x86_64")]
pub struct Bf16;
/// f32 values (FMA).
#[cfg(target_arch = "x86_64")]
pub struct F32;

#[cfg(target_arch = "x86_64")]
impl Unit for Bf16 {
    const PER_UNIT: usize = 2;
    const ELEM: usize = 2;
    #[inline(always)]
    unsafe fn mul_add(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(x),
            std::mem::transmute::<__m512i, __m512bh>(w),
        )
    }
}

#[cfg(target_arch = "x86_64")]
impl Unit for F32 {
    const PER_UNIT: usize = 1;
    const ELEM: usize = 4;
    #[inline(always)]
    unsafe fn mul_add(acc: __m512, x: __m512i, w: __m512i) -> __m512 {
        _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc)
    }
}

#[cfg(target_arch = "x86_64")]
/// Units a row of `k` values takes (a bf16 row of odd `k` ends in a half-empty pair).
fn units<U: Unit>(k: usize) -> usize {
    k.div_ceil(U::PER_UNIT)
}

#[cfg(target_arch = "x86_64")]
/// `u32` elements the packed activations of `rows × k` take.
pub fn packed_len<U: Unit>(rows: usize, k: usize) -> usize {
    rows.div_ceil(LANES) * units::<U>(k) * LANES
}

#[cfg(target_arch = "x86_64")]
/// Grows `out` to the packed length of `rows × k` (only grown, and rewritten in full by each
/// call: no zeroing pass per call) and returns it, panel by panel.
fn panels_of<U: Unit>(
    out: &mut Vec<u32>,
    rows: usize,
    k: usize,
) -> rayon::slice::ChunksMut<'_, u32> {
    let len = packed_len::<U>(rows, k);
    if out.len() < len {
        out.resize(len, 0);
    }
    out[..len].par_chunks_mut(units::<U>(k) * LANES)
}

/// Rounds row-major f32 activations `x[rows, k]` to bf16 and packs them into panels, one
/// rayon task a panel: element `(panel, pair, lane)` holds row `panel·16 + lane`'s values
/// `2·pair` (low half) and `2·pair + 1` (high half). Rows past `rows` and the high half of an
/// odd `k`'s last pair are zero, so they add nothing.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
pub unsafe fn pack_bf16(x: &[f32], rows: usize, k: usize, out: &mut Vec<u32>) {
    assert!(x.len() >= rows * k, "pack: input too small");
    // One panel's rows rounded, kept per thread (no allocation per call).
    thread_local! {
        static ROUNDED: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    }
    panels_of::<Bf16>(out, rows, k)
        .enumerate()
        .for_each(|(panel, dst)| {
            let r0 = panel * LANES;
            let live = (rows - r0).min(LANES);
            let mut rounded = ROUNDED.take();
            // Only grown: products of other widths alternate, and a shrink-then-grow would
            // zero the buffer each time.
            if rounded.len() < live * k {
                rounded.resize(live * k, 0);
            }
            let rounded_rows = &mut rounded[..live * k];
            dtype::f32_to_bf16_slice(&x[r0 * k..(r0 + live) * k], rounded_rows);
            // SAFETY: the caller guarantees AVX-512F; the rows hold `live · k` values.
            unsafe {
                gather_panel(rounded_rows.as_ptr() as *const u8, 2 * k, k / 2, live, dst);
                if k % 2 == 1 {
                    // The last value alone in its pair, the high half zero.
                    for (lane, d) in dst[k / 2 * LANES..].iter_mut().enumerate() {
                        *d = if lane < live {
                            rounded_rows[lane * k + k - 1] as u32
                        } else {
                            0
                        };
                    }
                }
            }
            ROUNDED.set(rounded);
        });
}

/// Packs row-major f32 activations `x[rows, k]` into panels as they are: element `(panel, i,
/// lane)` holds row `panel·16 + lane`'s value `i`; rows past `rows` are zero.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
pub unsafe fn pack_f32(x: &[f32], rows: usize, k: usize, out: &mut Vec<u32>) {
    assert!(x.len() >= rows * k, "pack: input too small");
    panels_of::<F32>(out, rows, k)
        .enumerate()
        .for_each(|(panel, dst)| {
            let r0 = panel * LANES;
            let live = (rows - r0).min(LANES);
            // SAFETY: the caller guarantees AVX-512F; rows r0..r0 + live of `x` exist.
            unsafe { gather_panel(x[r0 * k..].as_ptr() as *const u8, 4 * k, k, live, dst) };
        });
}

/// Fills `units` 16-lane rows of `dst`: row `i` lane `l` is the 4 bytes at
/// `src + l·row_bytes + 4·i` for the `live` first lanes, zero for the others. Sixteen units at
/// a time by loading 16 rows and transposing them in registers; the rest by gathers (one
/// instruction each, but 16 loads inside: they were a twentieth of a prefill when they did all
/// of it).
///
/// # Safety
/// AVX-512F must be available; `src` must be valid for `live` rows of `row_bytes` bytes, each
/// holding at least `4·units` bytes, and `dst` must hold `units · 16` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_panel(
    src: *const u8,
    row_bytes: usize,
    units: usize,
    live: usize,
    dst: &mut [u32],
) {
    debug_assert!(dst.len() >= units * LANES && live <= LANES);
    let whole = units / LANES * LANES;
    for i0 in (0..whole).step_by(LANES) {
        let rows = std::array::from_fn(|l| {
            if l < live {
                _mm512_loadu_si512(src.add(l * row_bytes + 4 * i0) as *const _)
            } else {
                _mm512_setzero_si512()
            }
        });
        for (c, v) in transpose_16x16(rows).into_iter().enumerate() {
            _mm512_storeu_si512(dst.as_mut_ptr().add((i0 + c) * LANES) as *mut _, v);
        }
    }
    // A gather takes one unit (4 bytes, aligned or not) from each row.
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row_bytes as i32),
    );
    let mask: __mmask16 = if live == LANES {
        0xffff
    } else {
        (1u16 << live) - 1
    };
    for i in whole..units {
        let v = _mm512_mask_i32gather_epi32::<1>(
            _mm512_setzero_si512(),
            mask,
            offsets,
            src.add(4 * i) as *const i32,
        );
        _mm512_storeu_si512(dst.as_mut_ptr().add(i * LANES) as *mut _, v);
    }
}

/// Vectors `2i` and `2i + 1` interleaved 32 bits at a time within each 128-bit lane: out
/// `2i` from their lower halves, `2i + 1` from their upper ones (the first step of both
/// transposes below).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn interleave_pairs<const N: usize>(r: [__m512i; N]) -> [__m512i; N] {
    std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    })
}

/// The transpose of a 16 × 16 matrix of 32-bit values held a row a register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_16x16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane: pairs of rows interleaved, then quads, so that u[4j + c]'s
    // lane L holds rows 4j..4j + 4 of column 4L + c.
    let t = interleave_pairs(r);
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (j, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * j + c / 2], t[4 * j + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // Then the four 128-bit lanes of column 4L + c gathered from u[c], u[4 + c], u[8 + c],
    // u[12 + c]: lanes (0, 2) and (1, 3) of each pair, then of the pairs.
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let even_low = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let odd_low = _mm512_shuffle_i32x4::<0xDD>(u[c], u[4 + c]);
        let even_high = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd_high = _mm512_shuffle_i32x4::<0xDD>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(even_low, even_high);
        out[8 + c] = _mm512_shuffle_i32x4::<0xDD>(even_low, even_high);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(odd_low, odd_high);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(odd_low, odd_high);
    }
    out
}

/// Output columns `j0..j1` of `out[rows, n] = x · wᵀ` from bf16-packed activations `xp`
/// ([`pack_bf16`]) and bf16 weights; `w` points at weight row `j0` (row-major `[n, k]`,
/// possibly unaligned).
///
/// # Safety
/// AVX-512F and AVX-512 BF16 must be available; `xp` must hold [`pack_bf16`]'s output for
/// `rows × k` and `w` rows `j0..j1` of `k` bf16 values; `out` must be valid for `rows × n` f32
/// writes, of which this call writes only columns `j0..j1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_bf16(
    out: *mut f32,
    xp: &[u32],
    w: *const u8,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    block::<Bf16>(out, xp, w, rows, n, k, j0, j1)
}

/// [`block_bf16`] for f32 activations packed by [`pack_f32`] and f32 weights.
///
/// # Safety
/// AVX-512F must be available; otherwise as [`block_bf16`], with f32 weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_f32(
    out: *mut f32,
    xp: &[u32],
    w: *const u8,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    block::<F32>(out, xp, w, rows, n, k, j0, j1)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<U: Unit>(
    out: *mut f32,
    xp: &[u32],
    w: *const u8,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let panels = rows.div_ceil(LANES);
    let stride = units::<U>(k) * LANES;
    let ws = |j: usize| w.add((j - j0) * k * U::ELEM);
    let mut p = 0;
    while p < panels {
        // Two panels × 8 columns, or one panel × 16: 16 accumulators, each weight broadcast
        // feeding every panel, each activation vector every column. (Measured on one core
        // in bf16: tiles of 24 accumulators — 3 × 8, 2 × 12 — ran at ~70% of the dot peak,
        // these at 95–100%; 2 × 16 spills.)
        let np = (panels - p).min(2);
        let xs = xp.as_ptr().add(p * stride);
        let mut j = j0;
        while j < j1 {
            let left = j1 - j;
            macro_rules! run {
                ($nj:literal, $np:literal) => {{
                    let acc =
                        tile::<U, $nj, $np>(xs, stride, std::array::from_fn(|c| ws(j + c)), k);
                    store::<$nj, $np>(acc, out, rows, n, p * LANES, j);
                    j += $nj;
                }};
            }
            match (np, left) {
                (1, 16..) => run!(16, 1),
                (1, 8..) => run!(8, 1),
                (1, 4..) => run!(4, 1),
                (1, _) => run!(1, 1),
                (_, 8..) => run!(8, 2),
                (_, 4..) => run!(4, 2),
                (_, _) => run!(1, 2),
            }
        }
        p += np;
    }
}

/// `NJ` weight rows against `NP` panels: `acc[c][q]` is column `c` for panel `q`'s 16 rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<U: Unit, const NJ: usize, const NP: usize>(
    xs: *const u32,
    stride: usize,
    w: [*const u8; NJ],
    k: usize,
) -> [[__m512; NP]; NJ] {
    let mut acc = [[_mm512_setzero_ps(); NP]; NJ];
    let whole = k / U::PER_UNIT;
    for i in 0..whole {
        let units = std::array::from_fn(|c| (w[c].add(4 * i) as *const i32).read_unaligned());
        step::<U, NJ, NP>(&mut acc, xs, stride, i, units);
    }
    if whole * U::PER_UNIT < k {
        // A bf16 row's last value alone: its pair's high half is zero on both sides.
        let units = std::array::from_fn(|c| {
            (w[c].add((k - 1) * U::ELEM) as *const u16).read_unaligned() as i32
        });
        step::<U, NJ, NP>(&mut acc, xs, stride, whole, units);
    }
    acc
}

/// One unit of a tile: `units[c]` is weight row `c`'s unit, broadcast to every lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step<U: Unit, const NJ: usize, const NP: usize>(
    acc: &mut [[__m512; NP]; NJ],
    xs: *const u32,
    stride: usize,
    i: usize,
    units: [i32; NJ],
) {
    let mut xv = [_mm512_setzero_si512(); NP];
    for (q, v) in xv.iter_mut().enumerate() {
        *v = _mm512_loadu_si512(xs.add(q * stride + i * LANES) as *const _);
    }
    for (row, &unit) in acc.iter_mut().zip(&units) {
        let wb = _mm512_set1_epi32(unit);
        for (a, &v) in row.iter_mut().zip(&xv) {
            *a = U::mul_add(*a, v, wb);
        }
    }
}

/// Writes a tile's columns `j..j + NJ` for the live rows of panels starting at row `r0`:
/// full panels eight columns at a time by an in-register transpose (16 rows of 8 contiguous
/// values), the rest through a small buffer. (A scatter store would be one instruction, but
/// it is microcoded and slow on the AMD cores this runs on.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn store<const NJ: usize, const NP: usize>(
    acc: [[__m512; NP]; NJ],
    out: *mut f32,
    rows: usize,
    n: usize,
    r0: usize,
    j: usize,
) {
    for q in 0..NP {
        let first = r0 + q * LANES;
        let live = rows.saturating_sub(first).min(LANES);
        let dst = out.add(first * n + j);
        let mut c = 0;
        if live == LANES {
            while c + 8 <= NJ {
                store_8_columns(std::array::from_fn(|i| acc[c + i][q]), dst.add(c), n);
                c += 8;
            }
        }
        for (cc, col) in acc.iter().enumerate().skip(c) {
            let mut lanes = [0.0f32; LANES];
            _mm512_storeu_ps(lanes.as_mut_ptr(), col[q]);
            for (l, &v) in lanes.iter().take(live).enumerate() {
                *dst.add(l * n + cc) = v;
            }
        }
    }
}

/// Stores eight columns of 16 rows (`cols[c]` lane `l` is row `l`, column `c`) as 16 runs
/// of 8 values at `dst + l·n`. (`transpose_16x16` of the columns padded to 16 does the same
/// with twice the shuffles: measured 5–8% slower on batched decode.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_8_columns(cols: [__m512; 8], dst: *mut f32, n: usize) {
    // Within each 128-bit lane (rows 4L..4L+3): pairs, then quads of columns.
    let t = interleave_pairs(cols.map(|c| _mm512_castps_si512(c))).map(|t| _mm512_castsi512_ps(t));
    // u[m] lane L: row 4L + m, columns 0..4; u[4 + m]: the same rows, columns 4..8.
    let u: [__m512; 8] = std::array::from_fn(|i| {
        let (half, m) = (i / 4, i % 4);
        let (a, b) = (t[4 * half + m / 2], t[4 * half + 2 + m / 2]);
        if m % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    // Rows m and 4 + m from lanes 0 and 1, rows 8 + m and 12 + m from lanes 2 and 3.
    let low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    let high = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    let put = |row: usize, v: __m512| {
        _mm256_storeu_ps(dst.add(row * n), _mm512_castps512_ps256(v));
        let upper = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
        _mm256_storeu_ps(dst.add((row + 4) * n), _mm256_castpd_ps(upper));
    };
    for m in 0..4 {
        put(m, _mm512_permutex2var_ps(u[m], low, u[4 + m]));
        put(8 + m, _mm512_permutex2var_ps(u[m], high, u[4 + m]));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn transpose_16x16_puts_every_value_in_its_place() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // SAFETY: AVX-512F is present (checked above).
        unsafe { check_transpose() }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn check_transpose() {
        let m: Vec<u32> = (0..256).collect();
        let rows = std::array::from_fn(|r| _mm512_loadu_si512(m[r * 16..].as_ptr() as *const _));
        for (c, v) in transpose_16x16(rows).into_iter().enumerate() {
            let mut lanes = [0u32; 16];
            _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, v);
            let want: Vec<u32> = (0..16).map(|l| (l * 16 + c) as u32).collect();
            assert_eq!(lanes.to_vec(), want, "column {c}");
        }
    }
}
