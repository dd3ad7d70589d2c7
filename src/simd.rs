//! Run-time choice of the widest SIMD build of a hot loop.

/// Defines `fn $name` whose body is compiled three times, for AVX-512 (F + BW), for AVX2 and
/// for the baseline, and runs the widest the CPU has. For loops whose result does not depend on
/// the width (integer bit operations, compares, lane-wise arithmetic in a fixed order): the
/// baseline x86-64 build (SSE2) moves a quarter of AVX-512's elements per instruction.
macro_rules! widest_simd {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use widest_simd;

/// Sums of per-element terms in eight f64 lanes: whole groups of eight have fixed trip counts,
/// which the compiler turns into vector code (a single running f64 sum is one add per cycle).
#[inline(always)]
pub(crate) fn lane_sums<const S: usize>(n: usize, term: impl Fn(usize) -> [f64; S]) -> [f64; S] {
    let mut lanes = [[0.0f64; 8]; S];
    let whole = n / 8 * 8;
    for g in (0..whole).step_by(8) {
        for l in 0..8 {
            for (lane, t) in lanes.iter_mut().zip(term(g + l)) {
                lane[l] += t;
            }
        }
    }
    for j in whole..n {
        for (lane, t) in lanes.iter_mut().zip(term(j)) {
            lane[0] += t;
        }
    }
    lanes.map(|l| l.iter().sum())
}
