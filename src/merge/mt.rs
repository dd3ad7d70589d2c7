//! The random drops of DARE and DELLA, drawn as mergekit draws them: one MT19937 stream seeded
//! once (`--random-seed`), one 32-bit draw per element in row-major order, an element kept when
//! `(draw & 0xFFFFFF) · 2⁻²⁴ < p` with `p` in f32 (PyTorch's CPU `bernoulli`). With the same
//! seed and the same tensor order, the masks are mergekit's, so the merges are too.

use std::sync::{Arc, Mutex};

/// The 32-bit Mersenne Twister (Matsumoto and Nishimura, 1998), standard seeding and tempering.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, next: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.next = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A uniform in [0, 1) on a 2⁻²⁴ grid, as PyTorch's CPU `bernoulli` compares it.
    #[inline]
    pub fn uniform24(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }
}

/// A drop-mask stream shared by every tensor of one merge (they draw from it in turn).
#[derive(Clone)]
pub struct MaskStream(Arc<Mutex<Mt19937>>);

impl MaskStream {
    pub fn new(seed: u64) -> Self {
        // torch.manual_seed keeps the low 32 bits for the CPU Mersenne Twister.
        MaskStream(Arc::new(Mutex::new(Mt19937::new(seed as u32))))
    }

    /// `keep[j] = uniform < p(j)` for `n` elements in order, packed in 64-bit words.
    pub fn bernoulli(&self, n: usize, p: impl Fn(usize) -> f32) -> Vec<u64> {
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut bits = vec![0u64; n.div_ceil(64)];
        for (w, word) in bits.iter_mut().enumerate() {
            let lo = w * 64;
            let mut v = 0u64;
            for j in lo..(lo + 64).min(n) {
                v |= u64::from(rng.uniform24() < p(j)) << (j - lo);
            }
            *word = v;
        }
        bits
    }
}

impl PartialEq for MaskStream {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskStream")
    }
}

/// Whether bit `j` of a packed mask is set.
#[inline]
pub fn bit(mask: &[u64], j: usize) -> bool {
    mask[j / 64] >> (j % 64) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_sequence() {
        // The reference implementation's first outputs for the default seed 5489, and the
        // 10000th (the C++ standard's check value for std::mt19937).
        let mut r = Mt19937::new(5489);
        assert_eq!(r.next_u32(), 3_499_211_612);
        assert_eq!(r.next_u32(), 581_869_302);
        let mut r = Mt19937::new(5489);
        let last = (0..10_000).map(|_| r.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn bernoulli_keeps_about_p_and_consumes_one_draw_per_element() {
        let s = MaskStream::new(42);
        let n = 100_000;
        let m = s.bernoulli(n, |_| 0.3);
        let kept = (0..n).filter(|&j| bit(&m, j)).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
        // The stream moved by exactly n draws.
        let mut r = Mt19937::new(42);
        (0..n).for_each(|_| {
            r.next_u32();
        });
        let s2 = s.0.lock().unwrap().next_u32();
        assert_eq!(s2, r.next_u32());
    }
}
