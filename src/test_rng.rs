//! Deterministic test data without a dependency: a 64-bit LCG (Knuth's MMIX constants).

/// Values in [−0.5, 0.5) from the LCG seeded with `seed`, the same sequence for the same seed.
pub fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }
}
