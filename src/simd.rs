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

/// A dot product in 16 independent lanes, summed as a tree (a single running sum cannot
/// vectorise: float addition is not reassociated; a running sum of the lanes would be a
/// chain of 15 dependent adds per call). For attention's scores and RMSNorm's sum of squares.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut lanes = [0.0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[f32; L], &[f32; L]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..L {
            lanes[l] += x[l] * y[l];
        }
    }
    let h8: [f32; 8] = std::array::from_fn(|l| lanes[l] + lanes[l + 8]);
    let h4: [f32; 4] = std::array::from_fn(|l| h8[l] + h8[l + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3]) + tail
}

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

/// `eˣ` in branch-free lane arithmetic, so loops over it vectorise (libm's `expf` is a call
/// per element: a twentieth of a prefill's time went to it). Cody–Waite reduction
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, a degree-7 Taylor polynomial (truncation below 1e-8
/// relative), and `2ⁿ` applied in two halves so that results near the ends of the range
/// overflow to ∞ and underflow gradually, as `expf` does; NaN stays NaN. Within 2 ulp of the
/// exact value (checked against f64 over the whole range in the tests).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    // `max`/`min` (not `clamp`) so that a NaN becomes a finite value here: the conversion
    // to an integer below may then skip Rust's saturating `as` (several scalar instructions
    // a lane, which stopped this loop from vectorising); NaN's result is restored at the end.
    #[allow(clippy::manual_clamp)] // `clamp` keeps NaN, which is the point of not using it
    let c = x.max(-104.0).min(88.8);
    let n = (c * LOG2_E + ROUND) - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for coefficient in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + coefficient;
    }
    // SAFETY: `c` is finite and within [−104, 88.8], so `n` is an integer-valued float in
    // [−151, 129], which i32 holds.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let half = n >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * pow2(half) * pow2(n - half);
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_sums_every_product_including_the_tail() {
        let mut rnd = crate::test_rng::uniform(5);
        for n in [0, 1, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n {n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn exp_is_within_two_ulp_everywhere_and_keeps_the_special_values() {
        let ulp = |v: f32| (f32::from_bits(v.to_bits() + 1) - v).abs();
        let mut worst = 0.0f64;
        // Every 97th f32 bit pattern from −104 to 89, both signs: ~40 million points.
        for bits in (0u32..0x7f80_0000).step_by(97) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                if !(-104.0..89.0).contains(&x) {
                    continue;
                }
                let want = (x as f64).exp();
                let got = exp(x);
                let want32 = want as f32;
                if want32 == 0.0 || want32.is_infinite() {
                    assert!(
                        got == want32 || (got - want32).abs() <= f32::from_bits(1),
                        "{x}: {got} vs {want}"
                    );
                    continue;
                }
                let err = (got as f64 - want).abs() / ulp(want32) as f64;
                worst = worst.max(err);
                assert!(err <= 2.0, "exp({x}) = {got}, want {want} ({err} ulp)");
            }
        }
        assert!(worst > 0.0, "the comparison ran");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
