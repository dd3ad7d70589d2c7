//! Causal grouped-query attention over a slot-indexed KV cache, one rayon task per
//! (query row, KV head): `out = softmax(q·Kᵀ / √d) · V` over positions `0..=pos` of the row's
//! slot, for the query heads that share that KV head one after another, so their keys and
//! values are read from memory once and from L1/L2 after that.
//! Softmax is taken in f32 with the maximum subtracted, as eager attention in transformers does.

use rayon::prelude::*;

use super::matmul::Isa;
use crate::backend::AttentionGeometry;
use crate::model::dtype::bf16_to_f32_slice;
use crate::simd::{dot, exp, widest_simd};

/// A KV cache element: f32, or bf16 bits (`u16`, stored little-endian as `model::dtype`
/// writes them) widened as they are read.
pub trait KvElem: Copy + Send + Sync {
    /// The slice itself where it is f32 already (read in place, no copy).
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// `dst.len()` values from `src`, as f32.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Sixteen values from `p` as f32.
    ///
    /// # Safety
    /// AVX-512F must be available and `p` valid for 16 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(&src[..dst.len()]);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: as the trait method's.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElem for u16 {
    fn as_f32(_: &[u16]) -> Option<&[f32]> {
        None
    }
    fn widen(src: &[u16], dst: &mut [f32]) {
        bf16_to_f32_slice(&src[..dst.len()], dst);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: as the trait method's; a bf16 is the upper half of an f32.
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
}

/// A rayon task's buffers: the scores of one head, and (bf16 caches off the AVX-512 path) its
/// KV head's keys and values widened once for the group's query heads.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

pub fn attention<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    slots: &[u32],
    positions: &[u32],
    geom: AttentionGeometry,
) {
    let AttentionGeometry {
        num_heads,
        num_kv_heads,
        head_dim,
        max_seq,
    } = geom;
    let group = num_heads / num_kv_heads;
    let kv_width = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let rows = slots.len();
    // The instruction set the matmuls use (so forcing a narrower one covers this too).
    let isa = Isa::current().unwrap_or_else(|_| Isa::detect());
    let wide = isa.has_avx512() && head_dim.is_multiple_of(16) && head_dim <= 16 * MAX_VECTORS;

    // A KV head's query heads are adjacent in a row (head = kv_head · group + g).
    out[..rows * num_heads * head_dim]
        .par_chunks_mut(group * head_dim)
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (task, o)| {
            let (row, kv_head) = (task / num_kv_heads, task % num_kv_heads);
            let (slot, pos) = (slots[row] as usize, positions[row] as usize);
            let base = slot * max_seq * kv_width + kv_head * head_dim;
            let kv = KvRows {
                k: &k_cache[base..],
                v: &v_cache[base..],
                stride: kv_width,
            };
            let qs = &q[(row * num_heads + kv_head * group) * head_dim..][..group * head_dim];
            attend_group(o, qs, head_dim, kv, scratch, pos + 1, scale, wide);
        });
}

/// The query heads `qs` (`[group, head_dim]`, out into `o`) that share one KV head, over its
/// first `len` rows. `wide`: the AVX-512 path may run (the caller checked the CPU and that the
/// head size is a multiple of 16 of at most [`MAX_VECTORS`] vectors).
#[allow(clippy::too_many_arguments)]
fn attend_group<T: KvElem>(
    o: &mut [f32],
    qs: &[f32],
    head_dim: usize,
    kv: KvRows<T>,
    scratch: &mut Scratch,
    len: usize,
    scale: f32,
    wide: bool,
) {
    // The AVX-512 kernel reads rows through raw pointers: the rows must be there.
    let rows_len = (len - 1)
        .checked_mul(kv.stride)
        .and_then(|n| n.checked_add(head_dim));
    assert!(
        rows_len.is_some_and(|n| n <= kv.k.len() && n <= kv.v.len()),
        "attention: {len} rows of {head_dim} values, {} apart, do not fit caches of {} and {}",
        kv.stride,
        kv.k.len(),
        kv.v.len()
    );
    let Scratch {
        scores,
        keys,
        values,
    } = scratch;
    let padded = len.next_multiple_of(EXP_CHUNK);
    if scores.len() < padded {
        scores.resize(padded, 0.0);
    }
    let heads = o.chunks_exact_mut(head_dim).zip(qs.chunks_exact(head_dim));
    #[cfg(target_arch = "x86_64")]
    if wide {
        for (o, qh) in heads {
            // SAFETY: `wide` says the CPU has AVX-512F and the head size is a multiple of 16
            // of at most 16 vectors; `kv` holds `len` rows (asserted above).
            unsafe { attend_avx512(o, qh, kv, scores, len, scale) };
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    let kv = match (T::as_f32(kv.k), T::as_f32(kv.v)) {
        (Some(k), Some(v)) => KvRows {
            k,
            v,
            stride: kv.stride,
        },
        _ => {
            // The group's rows, widened once into `[len, head_dim]`.
            keys.resize(len * head_dim, 0.0);
            values.resize(len * head_dim, 0.0);
            for t in 0..len {
                let at = t * kv.stride;
                T::widen(&kv.k[at..], &mut keys[t * head_dim..][..head_dim]);
                T::widen(&kv.v[at..], &mut values[t * head_dim..][..head_dim]);
            }
            KvRows {
                k: keys,
                v: values,
                stride: head_dim,
            }
        }
    };
    for (o, qh) in heads {
        attend(o, qh, kv, scores, len, scale);
    }
}

/// Scores exponentiated at a time (one AVX-512 vector), and positions scored at a time.
const EXP_CHUNK: usize = 16;
/// The widest head the AVX-512 path keeps in registers: 256 values (16 vectors).
const MAX_VECTORS: usize = 16;

/// One head's keys and values for one sequence: row `t` at `t · stride`.
struct KvRows<'a, T = f32> {
    k: &'a [T],
    v: &'a [T],
    stride: usize,
}

// Not derived: a derive would ask `T: Copy` of the struct's users too.
impl<T> Clone for KvRows<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for KvRows<'_, T> {}

/// Softmax in place over `scores_buf[..len]`, whose length is at least `len` rounded up to a
/// multiple of [`EXP_CHUNK`]: leaves `exp(s − max)` there (and 0 in the padding) and returns
/// the reciprocal of their sum.
#[inline(always)]
fn exp_scores(scores_buf: &mut [f32], len: usize) -> f32 {
    // Separate passes, so that the exponentials run as vectors (a running maximum or sum in
    // the same loop would serialise it).
    let max = scores_buf[..len]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    // In whole vectors of 16 (the padding past the scores is −∞, so it adds 0): a loop of a
    // few dozen would otherwise run in its scalar remainder.
    let padded = len.next_multiple_of(EXP_CHUNK);
    scores_buf[len..padded].fill(f32::NEG_INFINITY);
    for chunk in scores_buf[..padded].chunks_exact_mut(EXP_CHUNK) {
        let chunk: &mut [f32; EXP_CHUNK] = chunk.try_into().unwrap();
        for s in chunk.iter_mut() {
            *s = exp(*s - max);
        }
    }
    1.0 / scores_buf[..padded].iter().sum::<f32>()
}

widest_simd! {
    /// One query row of one head over its first `len` positions: the score of each key
    /// (`dot(q, key)`), softmax, and the weighted sum of the values into `o`, in portable
    /// lane arithmetic.
    fn attend(o: &mut [f32], q: &[f32], kv: KvRows, scores_buf: &mut [f32], len: usize, scale: f32) {
        let d = q.len();
        for (t, s) in scores_buf[..len].iter_mut().enumerate() {
            *s = dot(q, &kv.k[t * kv.stride..][..d]) * scale;
        }
        let inv = exp_scores(scores_buf, len);
        o.fill(0.0);
        for (t, &p) in scores_buf[..len].iter().enumerate() {
            let w = p * inv;
            for (o, v) in o.iter_mut().zip(&kv.v[t * kv.stride..][..d]) {
                *o += w * v;
            }
        }
    }
}

/// [`attend`] in AVX-512 for head sizes that are a multiple of 16, up to [`MAX_VECTORS`]
/// vectors: the query and the output stay in registers, and sixteen positions are scored at
/// a time with one transposing reduction instead of a horizontal sum per score (the old
/// per-score `reduce_add` and an output summed through memory were a ninth of an evaluation).
///
/// # Safety
/// AVX-512F must be available, `q.len()` a multiple of 16 of at most `16 · MAX_VECTORS`,
/// `o.len() == q.len()`, and `kv` must hold `len` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElem>(
    o: &mut [f32],
    q: &[f32],
    kv: KvRows<T>,
    scores_buf: &mut [f32],
    len: usize,
    scale: f32,
) {
    macro_rules! by_vectors {
        ($($n:literal)*) => {
            match q.len() / 16 {
                // SAFETY: as this function's, with the head size `16 · $n`.
                $($n => unsafe { attend_vectors::<$n, T>(o, q, kv, scores_buf, len, scale) },)*
                _ => unreachable!("head size checked by the caller"),
            }
        };
    }
    by_vectors!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// [`attend_avx512`] for a head of `N` vectors.
///
/// # Safety
/// As [`attend_avx512`]'s, with `q.len() == 16 · N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_vectors<const N: usize, T: KvElem>(
    o: &mut [f32],
    q: &[f32],
    kv: KvRows<T>,
    scores_buf: &mut [f32],
    len: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() == 16 * N && o.len() == q.len() && len >= 1);
    debug_assert!(kv.k.len() >= (len - 1) * kv.stride + q.len());
    debug_assert!(kv.v.len() >= (len - 1) * kv.stride + q.len());
    debug_assert!(scores_buf.len() >= len.next_multiple_of(EXP_CHUNK));
    let (k, v) = (kv.k.as_ptr(), kv.v.as_ptr());
    // SAFETY (every load and store below): rows `t < len` of `kv` hold `16 · N` values from
    // their start, `q` and `o` hold `16 · N`, and `scores_buf` a multiple of 16 past `len`.
    let qv: [__m512; N] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * j)) });
    let scale_v = _mm512_set1_ps(scale);
    let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut max = minus_inf;
    for block in (0..len).step_by(EXP_CHUNK) {
        // Past the last position, score the last row again (every read stays inside the rows
        // that exist) and set those lanes to −∞, which the softmax turns into 0.
        let acc: [__m512; EXP_CHUNK] = std::array::from_fn(|i| {
            let row = unsafe { k.add((block + i).min(len - 1) * kv.stride) };
            let mut a = _mm512_mul_ps(qv[0], unsafe { T::load16(row) });
            for (j, &qj) in qv.iter().enumerate().skip(1) {
                a = _mm512_fmadd_ps(qj, unsafe { T::load16(row.add(16 * j)) }, a);
            }
            a
        });
        let valid = (len - block).min(EXP_CHUNK);
        let scores = _mm512_mask_blend_ps(
            (u32::MAX >> (32 - valid)) as __mmask16,
            minus_inf,
            _mm512_mul_ps(sum_each(acc), scale_v),
        );
        max = _mm512_max_ps(max, scores);
        unsafe { _mm512_storeu_ps(scores_buf.as_mut_ptr().add(block), scores) };
    }
    let max = _mm512_reduce_max_ps(max);
    let padded = len.next_multiple_of(EXP_CHUNK);
    let mut total = _mm512_setzero_ps();
    for chunk in scores_buf[..padded].chunks_exact_mut(EXP_CHUNK) {
        let chunk: &mut [f32; EXP_CHUNK] = chunk.try_into().unwrap();
        for s in chunk.iter_mut() {
            *s = exp(*s - max);
        }
        total = _mm512_add_ps(total, unsafe { _mm512_loadu_ps(chunk.as_ptr()) });
    }
    let inv = 1.0 / _mm512_reduce_add_ps(total);
    let mut out = [_mm512_setzero_ps(); N];
    for (t, &p) in scores_buf[..len].iter().enumerate() {
        let w = _mm512_set1_ps(p * inv);
        let row = unsafe { v.add(t * kv.stride) };
        for (j, o) in out.iter_mut().enumerate() {
            *o = _mm512_fmadd_ps(w, unsafe { T::load16(row.add(16 * j)) }, *o);
        }
    }
    for (j, &sum) in out.iter().enumerate() {
        unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * j), sum) };
    }
}

/// The sums of sixteen vectors' lanes, as one vector (lane `i` = the sum of `x[i]`'s lanes):
/// pairs are folded by interleaving 32-bit lanes, then 64-bit lanes, then 128-bit blocks
/// twice, 15 shuffle pairs and adds for what sixteen horizontal sums do in about 60 dependent
/// steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_each(x: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Within each 128-bit block: lanes 0 and 2 hold x[2i]'s partial sums, 1 and 3 x[2i + 1]'s.
    let b: [__m512; 8] = std::array::from_fn(|i| {
        let (l, h) = (x[2 * i], x[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(l, h), _mm512_unpackhi_ps(l, h))
    });
    // Within each block: lane m holds x[4j + m]'s partial sum.
    let c: [__m512; 4] = std::array::from_fn(|j| {
        let (l, h) = (_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(l, h)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(l, h)),
        )
    });
    // Blocks (0 + 1, 2 + 3) of the first vector, then of the second.
    let fold = |l: __m512, h: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(l, h),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(l, h),
        )
    };
    let (d0, d1) = (fold(c[0], c[1]), fold(c[2], c[3]));
    // Block j: x[4j..4j + 4]'s whole sums.
    fold(d0, d1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, one (row, head) at a time.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        slots: &[u32],
        pos: &[u32],
        g: AttentionGeometry,
    ) -> Vec<f64> {
        let (h, kvh, d, max_seq) = (g.num_heads, g.num_kv_heads, g.head_dim, g.max_seq);
        let width = kvh * d;
        let mut out = vec![0.0; slots.len() * h * d];
        for row in 0..slots.len() {
            for head in 0..h {
                let base = slots[row] as usize * max_seq * width + head / (h / kvh) * d;
                let qh = &q[(row * h + head) * d..][..d];
                let scores: Vec<f64> = (0..=pos[row] as usize)
                    .map(|t| {
                        let kt = &k[base + t * width..][..d];
                        qh.iter()
                            .zip(kt)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (t, w) in e.iter().enumerate() {
                    for i in 0..d {
                        out[(row * h + head) * d + i] += w / sum * v[base + t * width + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn both_paths_match_softmax_attention_in_f64() {
        let mut rnd = crate::test_rng::uniform(11);
        // Head sizes on the AVX-512 path (multiples of 16, up to its widest) and off it;
        // contexts around the 16-position scoring and exponentiation chunks.
        for (head_dim, max_seq) in [(64, 40), (16, 17), (8, 33), (12, 5), (128, 20), (256, 3)] {
            let g = AttentionGeometry {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim,
                max_seq,
            };
            let slots_n = 3;
            let width = g.num_kv_heads * head_dim;
            let k: Vec<f32> = (0..slots_n * max_seq * width)
                .map(|_| 2.0 * rnd())
                .collect();
            let v: Vec<f32> = (0..slots_n * max_seq * width).map(|_| rnd()).collect();
            let slots = [0u32, 2, 1, 2];
            let positions = [
                0u32,
                max_seq as u32 - 1,
                15.min(max_seq as u32 - 1),
                16.min(max_seq as u32 - 1),
            ];
            let q: Vec<f32> = (0..slots.len() * g.num_heads * head_dim)
                .map(|_| rnd())
                .collect();
            let want = naive(&q, &k, &v, &slots, &positions, g);
            let mut got = vec![f32::NAN; want.len()];
            attention(&mut got, &q, &k, &v, &slots, &positions, g);
            // The portable body directly, whatever this CPU runs.
            let mut portable = vec![f32::NAN; want.len()];
            let mut scores = vec![0.0; max_seq.next_multiple_of(EXP_CHUNK)];
            for (task, o) in portable.chunks_mut(head_dim).enumerate() {
                let (row, head) = (task / g.num_heads, task % g.num_heads);
                let base = slots[row] as usize * max_seq * width + head / 3 * head_dim;
                let kv = KvRows {
                    k: &k[base..],
                    v: &v[base..],
                    stride: width,
                };
                let qh = &q[task * head_dim..][..head_dim];
                attend(
                    o,
                    qh,
                    kv,
                    &mut scores,
                    positions[row] as usize + 1,
                    1.0 / (head_dim as f32).sqrt(),
                );
            }
            for (name, out) in [("dispatched", &got), ("portable", &portable)] {
                for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5,
                        "{name} head_dim {head_dim} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// A bf16 cache (bit patterns) gives softmax attention over its values widened, on the
    /// dispatched path and on the portable one (which widens a group's rows once).
    #[test]
    fn bf16_caches_match_attention_over_their_values() {
        use crate::model::dtype::f32_to_bf16_slice;
        let mut rnd = crate::test_rng::uniform(12);
        for (head_dim, max_seq) in [(64, 40), (16, 17), (12, 5)] {
            let g = AttentionGeometry {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim,
                max_seq,
            };
            let len = 3 * max_seq * g.num_kv_heads * head_dim;
            // Stored as the cache stores them (little-endian bits).
            let bits = |scale: f32, rnd: &mut dyn FnMut() -> f32| -> Vec<u16> {
                let values: Vec<f32> = (0..len).map(|_| scale * rnd()).collect();
                let mut bits = vec![0u16; len];
                f32_to_bf16_slice(&values, &mut bits);
                bits
            };
            let (k, v) = (bits(2.0, &mut rnd), bits(1.0, &mut rnd));
            let wide = |b: &[u16]| -> Vec<f32> {
                b.iter()
                    .map(|&x| f32::from_bits((x as u32) << 16))
                    .collect()
            };
            let slots = [2u32, 0, 1];
            let positions = [max_seq as u32 - 1, 0, (max_seq as u32 - 1).min(16)];
            let q: Vec<f32> = (0..slots.len() * g.num_heads * head_dim)
                .map(|_| rnd())
                .collect();
            let want = naive(&q, &wide(&k), &wide(&v), &slots, &positions, g);
            let mut got = vec![f32::NAN; want.len()];
            attention(&mut got, &q, &k, &v, &slots, &positions, g);
            let mut portable = vec![f32::NAN; want.len()];
            let group_width = 3 * head_dim;
            for (task, o) in portable.chunks_mut(group_width).enumerate() {
                let (row, kv_head) = (task / 2, task % 2);
                let base = (slots[row] as usize * max_seq * 2 + kv_head) * head_dim;
                let kv = KvRows {
                    k: &k[base..],
                    v: &v[base..],
                    stride: 2 * head_dim,
                };
                let qs = &q[task * group_width..][..group_width];
                let len = positions[row] as usize + 1;
                let scale = 1.0 / (head_dim as f32).sqrt();
                let mut scratch = Scratch::default();
                attend_group(o, qs, head_dim, kv, &mut scratch, len, scale, false);
            }
            for (name, out) in [("dispatched", &got), ("portable", &portable)] {
                for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5,
                        "{name} head_dim {head_dim} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sum_each_puts_each_vectors_lane_sum_in_its_lane() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // Distinct lane values, so that a sum from the wrong vector or a lane counted twice
        // or missed shows.
        let values: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|l| ((i * 16 + l) * (i * 16 + l) % 977) as f32))
            .collect();
        let mut got = [0.0f32; 16];
        // SAFETY: AVX-512F is present; the arrays hold 16 values each.
        unsafe {
            let x: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(values[i].as_ptr()));
            _mm512_storeu_ps(got.as_mut_ptr(), sum_each(x));
        }
        for (i, v) in values.iter().enumerate() {
            assert_eq!(got[i], v.iter().sum::<f32>(), "lane {i}");
        }
    }
}
