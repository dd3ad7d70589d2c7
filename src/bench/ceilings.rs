//! Measured CPU ceilings: memory copy bandwidth (bytes read + written per second, all threads),
//! read bandwidth,
//! and peak f32 FMA throughput (independent register-resident FMA chains, all threads).
//! Roofline fractions divide an operation's achieved rate by these, not by datasheet numbers.

use std::time::{Duration, Instant};

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::{amx, Isa};
use crate::simd::widest_simd;

/// Median wall time of `iters` runs of `f` after one warm-up run.
pub fn time_median(iters: usize, f: impl FnMut()) -> Duration {
    let times = time_runs(iters, f);
    times[times.len() / 2]
}

/// Fastest of `iters` runs after a warm-up: a ceiling is what the machine can do, so noise
/// (other processes, frequency ramps) must not lower it.
fn time_best(iters: usize, f: impl FnMut()) -> Duration {
    time_runs(iters, f)[0]
}

fn time_runs(iters: usize, mut f: impl FnMut()) -> Vec<Duration> {
    f();
    let mut times: Vec<Duration> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// Copy bandwidth in bytes/s over `bytes`-sized buffers (well past the last-level cache),
/// counting each byte read and each byte written, as the roofline of a streaming op counts them.
pub fn cpu_copy_bandwidth(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    let t = time_best(7, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    std::hint::black_box(&dst);
    (2 * n * 4) as f64 / t.as_secs_f64()
}

/// Read bandwidth in bytes/s over a `bytes`-sized buffer (well past the last-level cache):
/// every thread sums its share in sixteen-lane vectors. The ceiling of an operation that only
/// streams its inputs (a decode step reads its weights and writes almost nothing); on some
/// machines it is well above the copy bandwidth, whose writes cost more than reads.
pub fn cpu_read_bandwidth(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1.0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    let t = time_best(7, || {
        let s: f32 = src.par_chunks(chunk).map(lane_sum).sum();
        std::hint::black_box(s);
    });
    (n * 4) as f64 / t.as_secs_f64()
}

widest_simd! {
    /// The sum of `x` in sixteen lanes (vectorised; a single running sum is one add a cycle).
    #[allow(clippy::needless_range_loop)]
    fn lane_sum(x: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for l in 0..16 {
                lanes[l] += c[l];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

/// Peak f32 FLOP/s (an FMA counts 2) with every rayon thread running independent FMA chains
/// in the widest vectors the CPU has (the ones the matmul kernels use).
pub fn cpu_peak_flops() -> f64 {
    const REPS: usize = 1_000_000;
    let lanes = fma_chains(0.0, 1).1;
    all_threads_rate(REPS * CHAINS * lanes * 2, |i| fma_chains(i as f32, REPS).0)
}

/// FLOP/s of `chains(thread index)`, `flops` of work, run on every rayon thread at once (the
/// fastest of 7 runs); what `chains` returns is summed so that its work is not optimised away.
fn all_threads_rate(flops: usize, chains: impl Fn(usize) -> f32 + Sync) -> f64 {
    let threads = rayon::current_num_threads();
    let t = time_best(7, || {
        let s: f32 = (0..threads).into_par_iter().map(&chains).sum();
        std::hint::black_box(s);
    });
    (threads * flops) as f64 / t.as_secs_f64()
}

/// Peak bf16 FLOP/s of the products the matmuls run in bf16 precision, every rayon thread
/// running independent chains: AMX's `tdpbf16ps` (16 384 FLOPs each) where the matmuls use
/// the tiles ([`Isa::AmxBf16`]), else `vdpbf16ps` (32 products and their sums, 64 FLOPs);
/// `None` without AVX-512 BF16.
pub fn cpu_peak_bf16_flops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Isa::current().is_ok_and(|i| i == Isa::AmxBf16) {
        const REPS: usize = 100_000;
        return Some(all_threads_rate(REPS * amx::CHAIN_FLOPS, |_| {
            // SAFETY: Isa::AmxBf16 is only chosen where the tiles are usable.
            unsafe { amx::dot_chains(REPS) };
            0.0
        }));
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
        const REPS: usize = 1_000_000;
        return Some(all_threads_rate(REPS * CHAINS * 64, |i| {
            // SAFETY: the CPU supports AVX-512F and AVX-512 BF16 (checked above).
            unsafe { bf16_dot_chains(i as f32, REPS) }
        }));
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot_chains(seed: f32, reps: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    // Small products, so the chains stay finite over a million steps.
    let a = _mm512_cvtne2ps_pbh(
        _mm512_set1_ps(std::hint::black_box(1e-4f32)),
        _mm512_set1_ps(std::hint::black_box(1e-4f32)),
    );
    let b = _mm512_cvtne2ps_pbh(
        _mm512_set1_ps(std::hint::black_box(1e-4f32)),
        _mm512_set1_ps(std::hint::black_box(1e-4f32)),
    );
    for _ in 0..reps {
        for c in acc.iter_mut() {
            *c = _mm512_dpbf16_ps(*c, a, b);
        }
    }
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

const CHAINS: usize = 12;

/// Runs the chains; returns their sum and the vector width used.
fn fma_chains(seed: f32, reps: usize) -> (f32, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above).
            return (unsafe { fma_chains_avx512(seed, reps) }, 16);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return (unsafe { fma_chains_avx2(seed, reps) }, 8);
        }
    }
    (fma_chains_body::<false, 8>(seed, reps), 8)
}

/// Explicit zmm chains: LLVM's default tuning may keep plain arrays in 256-bit registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(seed: f32, reps: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    let a = _mm512_set1_ps(std::hint::black_box(0.999_999f32));
    let b = _mm512_set1_ps(std::hint::black_box(1e-7f32));
    for _ in 0..reps {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(seed: f32, reps: usize) -> f32 {
    fma_chains_body::<true, 8>(seed, reps)
}

#[inline(always)]
fn fma_chains_body<const FMA: bool, const LANES: usize>(seed: f32, reps: usize) -> f32 {
    let mut acc = [[seed; LANES]; CHAINS];
    let a = std::hint::black_box(0.999_999f32);
    let b = std::hint::black_box(1e-7f32);
    for _ in 0..reps {
        for c in acc.iter_mut() {
            for v in c.iter_mut() {
                *v = if FMA { v.mul_add(a, b) } else { *v * a + b };
            }
        }
    }
    acc.iter().flatten().sum()
}
