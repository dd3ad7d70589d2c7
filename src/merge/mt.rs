//! The random drops of DARE and DELLA, drawn as mergekit draws them: one MT19937 stream seeded
//! once (`--random-seed`), one 32-bit draw per element in row-major order, an element kept when
//! `(draw & 0xFFFFFF) · 2⁻²⁴ < p` with `p` in f32 (PyTorch's CPU `bernoulli`). With the same
//! seed and the same tensor order, the masks are mergekit's, so the merges are too.

use std::sync::{Arc, Mutex};

use crate::simd::widest_simd;

const N: usize = 624;
const M: usize = 397;

/// The 32-bit Mersenne Twister (Matsumoto and Nishimura, 1998), standard seeding and tempering.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; N],
    next: usize,
}

#[inline(always)]
fn mix(cur: u32, following: u32, far: u32) -> u32 {
    let y = (cur & 0x8000_0000) | (following & 0x7fff_ffff);
    far ^ (y >> 1) ^ ((y & 1).wrapping_neg() & 0x9908_b0df)
}

#[inline(always)]
fn temper(mut y: u32) -> u32 {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c_5680;
    y ^= (y << 15) & 0xefc6_0000;
    y ^ (y >> 18)
}

widest_simd! {
    /// The next state block, in three loops without index wrapping (each vectorises: the
    /// second reads words the first wrote 227 places earlier).
    fn twist(state: &mut [u32; N]) {
        for i in 0..N - M {
            state[i] = mix(state[i], state[i + 1], state[i + M]);
        }
        for i in N - M..N - 1 {
            state[i] = mix(state[i], state[i + 1], state[i + M - N]);
        }
        state[N - 1] = mix(state[N - 1], state[0], state[M - 1]);
    }
}

widest_simd! {
    fn temper_into(state: &[u32], out: &mut [u32]) {
        out.iter_mut().zip(state).for_each(|(o, &s)| *o = temper(s));
    }
}

impl Mt19937 {
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, next: N }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            twist(&mut self.state);
            self.next = 0;
        }
        let y = self.state[self.next];
        self.next += 1;
        temper(y)
    }

    /// The next `out.len()` outputs, as many calls of [`Mt19937::next_u32`] would give.
    pub fn fill(&mut self, out: &mut [u32]) {
        let mut done = 0;
        while done < out.len() {
            if self.next >= N {
                twist(&mut self.state);
                self.next = 0;
            }
            let k = (N - self.next).min(out.len() - done);
            temper_into(
                &self.state[self.next..self.next + k],
                &mut out[done..done + k],
            );
            self.next += k;
            done += k;
        }
    }
}

/// Draws per block of [`MaskStream`]'s drawing (16 KiB on the stack).
const DRAWS: usize = 64 * 64;

/// A drop-mask stream shared by every tensor of one merge (they draw from it in turn).
#[derive(Clone)]
pub struct MaskStream(Arc<Mutex<Mt19937>>);

impl MaskStream {
    pub fn new(seed: u64) -> Self {
        // torch.manual_seed keeps the low 32 bits for the CPU Mersenne Twister.
        MaskStream(Arc::new(Mutex::new(Mt19937::new(seed as u32))))
    }

    /// `keep[j] = uniform < p` for `n` elements in order, packed in 64-bit words.
    pub fn bernoulli(&self, n: usize, p: f32) -> Vec<u64> {
        // uniform = k · 2⁻²⁴ for the 24-bit integer k, so `uniform < p` is `k < ⌈p · 2²⁴⌉`
        // (p · 2²⁴ is exact in f64), an integer compare.
        let threshold = (f64::from(p) * 16_777_216.0)
            .ceil()
            .clamp(0.0, 16_777_217.0) as u32;
        self.draw(n, |draws, _, bits| pack_below(draws, threshold, bits))
    }

    /// `keep[j] = uniform < probs[j]` for every element in order, packed in 64-bit words.
    pub fn bernoulli_each(&self, probs: &[f32]) -> Vec<u64> {
        self.draw(probs.len(), |draws, at, bits| {
            pack_uniform_below(draws, &probs[at..at + draws.len()], bits)
        })
    }

    /// Draws `n` words in blocks and lets `pack(draws, first element, words)` set their bits.
    fn draw(&self, n: usize, pack: impl Fn(&[u32], usize, &mut [u64])) -> Vec<u64> {
        let mut rng = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut bits = vec![0u64; n.div_ceil(64)];
        let mut draws = [0u32; DRAWS];
        for (b, words) in bits.chunks_mut(DRAWS / 64).enumerate() {
            let at = b * DRAWS;
            let k = DRAWS.min(n - at);
            rng.fill(&mut draws[..k]);
            pack(&draws[..k], at, words);
        }
        bits
    }
}

widest_simd! {
    /// Bit `j` of `bits` = the low 24 bits of `draws[j]` are below `threshold`.
    fn pack_below(draws: &[u32], threshold: u32, bits: &mut [u64]) {
        for (word, d) in bits.iter_mut().zip(draws.chunks(64)) {
            *word = d.iter().enumerate().fold(0u64, |w, (k, &x)| {
                w | (u64::from((x & 0x00ff_ffff) < threshold) << k)
            });
        }
    }
}

widest_simd! {
    /// Bit `j` of `bits` = the uniform of `draws[j]` (PyTorch's CPU `bernoulli`) is below
    /// `probs[j]`.
    fn pack_uniform_below(draws: &[u32], probs: &[f32], bits: &mut [u64]) {
        for ((word, d), p) in bits.iter_mut().zip(draws.chunks(64)).zip(probs.chunks(64)) {
            *word = d.iter().zip(p).enumerate().fold(0u64, |w, (k, (&x, &p))| {
                let uniform = (x & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
                w | (u64::from(uniform < p) << k)
            });
        }
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

    /// PyTorch's rule, one draw at a time: a uniform on the 2⁻²⁴ grid, compared in f32.
    fn slow_bernoulli(rng: &mut Mt19937, probs: &[f32]) -> Vec<bool> {
        probs
            .iter()
            .map(|&p| ((rng.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)) < p)
            .collect()
    }

    #[test]
    fn bulk_drawing_matches_one_draw_at_a_time() {
        let mut a = Mt19937::new(7);
        let mut b = Mt19937::new(7);
        let mut out = vec![0u32; 3 * N + 5];
        a.next_u32(); // start mid-block
        b.next_u32();
        a.fill(&mut out);
        assert!(out.iter().all(|&x| x == b.next_u32()));
        // Constant probabilities at and around the grid, and a ragged length.
        let n = 3 * DRAWS + 77;
        let grid = 1.0 / 16_777_216.0f32;
        for p in [
            0.0,
            grid,
            0.3,
            0.5 + grid / 2.0,
            0.999_999_9,
            1.0,
            1.5,
            -0.1,
        ] {
            let s = MaskStream::new(11);
            let got = s.bernoulli(n, p);
            let want = slow_bernoulli(&mut Mt19937::new(11), &vec![p; n]);
            assert!((0..n).all(|j| bit(&got, j) == want[j]), "p = {p}");
            assert!(got[n / 64] >> (n % 64) == 0, "bits past the end stay clear");
        }
        // Per-element probabilities.
        let probs: Vec<f32> = (0..n).map(|j| (j % 101) as f32 / 100.0).collect();
        let got = MaskStream::new(3).bernoulli_each(&probs);
        let want = slow_bernoulli(&mut Mt19937::new(3), &probs);
        assert!((0..n).all(|j| bit(&got, j) == want[j]));
    }

    #[test]
    fn bernoulli_keeps_about_p_and_consumes_one_draw_per_element() {
        let s = MaskStream::new(42);
        let n = 100_000;
        let m = s.bernoulli(n, 0.3);
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
