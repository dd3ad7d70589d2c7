//! Storage dtypes of checkpoint tensors and their conversion to and from f32.
//!
//! Weights stay in their stored dtype; compute upcasts to f32 (exact for f16 and bf16) and
//! accumulates in f32, as the transformers reference does.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use serde::{Deserialize, Serialize};

use crate::simd::widest_simd;

/// A floating-point storage dtype the engine reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The safetensors header spelling (`"F16"`, `"BF16"`, `"F32"`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        }
    }

    /// From the safetensors header spelling; `None` for dtypes the engine does not support.
    pub fn from_safetensors(name: &str) -> Option<Self> {
        match name {
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F32" => Some(DType::F32),
            _ => None,
        }
    }

    /// The torch spelling used in config.json (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
        }
    }

    /// From a torch / mergekit spelling (`float16`, `bfloat16`, `float32`, with or without `torch.`).
    pub fn from_torch(name: &str) -> Option<Self> {
        match name.trim_start_matches("torch.") {
            "float16" | "half" | "fp16" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float32" | "float" | "fp32" => Some(DType::F32),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Upcasts `src` (little-endian elements of `dtype`) into `dst`; `dst.len()` elements are read.
///
/// Works on unaligned byte slices: safetensors only guarantees alignment of the data section
/// start, and shards written by other tools are not always 4-byte aligned per tensor.
pub fn to_f32(dtype: DType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
            Ok(s) => dst.copy_from_slice(s),
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(src) {
            Ok(s) => bf16_to_f32_slice(s, dst),
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            Ok(s) => s.convert_to_f32_slice(dst),
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        },
    }
}

/// The index of the first NaN or ±Inf among `bytes` of `dtype` (bit tests, no conversion).
pub fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<usize> {
    match dtype {
        DType::F32 => first_all_ones(bytes, 0x7f80_0000u32, u32::from_le_bytes),
        DType::F16 => first_all_ones(bytes, 0x7c00u16, u16::from_le_bytes),
        DType::BF16 => first_all_ones(bytes, 0x7f80u16, u16::from_le_bytes),
    }
}

/// The index of the first element (little-endian, `N` bytes) whose `exponent` bits are all
/// set. Blocks are scanned without an early exit, which vectorises; only a block with a hit is
/// searched element by element.
fn first_all_ones<T, const N: usize>(
    bytes: &[u8],
    exponent: T,
    read: impl Fn([u8; N]) -> T + Copy,
) -> Option<usize>
where
    T: Copy + PartialEq + std::ops::BitAnd<Output = T>,
{
    const BLOCK: usize = 256;
    let hit = |c: &[u8]| read(c.try_into().expect("N bytes")) & exponent == exponent;
    bytes.chunks(BLOCK * N).enumerate().find_map(|(b, block)| {
        let any = block.chunks_exact(N).fold(false, |acc, c| acc | hit(c));
        any.then(|| b * BLOCK + block.chunks_exact(N).position(hit).expect("a hit"))
    })
}

/// Upcasts a whole tensor's bytes into a new f32 vector.
pub fn to_f32_vec(dtype: DType, src: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0f32; src.len() / dtype.size()];
    to_f32(dtype, src, &mut out);
    out
}

/// Rounds `src` to `dtype` (round-to-nearest-even, as torch's `.to()`), appending little-endian
/// bytes to `dst`.
pub fn from_f32_into(dtype: DType, src: &[f32], dst: &mut Vec<u8>) {
    let start = dst.len();
    dst.resize(start + src.len() * dtype.size(), 0);
    from_f32_slice(dtype, src, &mut dst[start..]);
}

/// Rounds `src` to `dtype` into `dst` (exactly `src.len()` elements' bytes), allocating nothing.
pub fn from_f32_slice(dtype: DType, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * dtype.size());
    match dtype {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, u16>(dst) {
            Ok(d) => f32_to_bf16_slice(src, d),
            Err(_) => {
                for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&f32_to_bf16_bits(x).to_le_bytes());
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(dst) {
            // half's slice conversion uses F16C where the CPU has it.
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => {
                for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
                }
            }
        },
    }
}

widest_simd! {
    /// A bf16 is the upper half of an f32.
    pub fn bf16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &b)| *d = f32::from_bits((u16::from_le(b) as u32) << 16))
    }
}

widest_simd! {
    /// Rounds each value to bf16 bits ([`f32_to_bf16_bits`]).
    pub fn f32_to_bf16_slice(src: &[f32], dst: &mut [u16]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = f32_to_bf16_bits(x).to_le())
    }
}

/// f32 → bf16 bits, round to nearest even (torch's rounding); NaN stays a quiet NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) as u16) | 0x0040;
    // A select on integer bits, no branch: the slice loops over this vectorise.
    if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// Rounds `src` to `dtype`, returning its little-endian bytes.
pub fn from_f32(dtype: DType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() * dtype.size());
    from_f32_into(dtype, src, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_is_exact_for_representable_values() {
        let vals = [0.0f32, 1.0, -2.5, 0.15625, 65280.0, -0.0];
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let bytes = from_f32(dt, &vals);
            assert_eq!(bytes.len(), vals.len() * dt.size());
            let back = to_f32_vec(dt, &bytes);
            assert_eq!(back, vals, "{dt}");
        }
    }

    #[test]
    fn first_non_finite_finds_the_first_nan_or_inf_at_any_position() {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let n = 1000;
            assert_eq!(first_non_finite(dt, &from_f32(dt, &vec![1.5; n])), None);
            for at in [0, 255, 256, 257, 999] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut v = vec![-2.0f32; n];
                    v[at] = bad;
                    if at + 300 < n {
                        v[at + 300] = f32::NAN; // a later one is not reported
                    }
                    assert_eq!(
                        first_non_finite(dt, &from_f32(dt, &v)),
                        Some(at),
                        "{dt} {at}"
                    );
                }
            }
        }
        // The largest finite values are not flagged.
        assert_eq!(
            first_non_finite(DType::F16, &from_f32(DType::F16, &[65504.0])),
            None
        );
        assert_eq!(
            first_non_finite(DType::F32, &from_f32(DType::F32, &[f32::MAX])),
            None
        );
    }

    #[test]
    fn unaligned_input_converts_like_aligned() {
        let vals = [1.5f32, -3.25, 7.0];
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let bytes = from_f32(dt, &vals);
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            let mut out = [0.0f32; 3];
            to_f32(dt, &shifted[1..], &mut out);
            assert_eq!(out, vals, "{dt}");
        }
    }

    #[test]
    fn bf16_conversion_agrees_with_half() {
        let mut x = 0x3C00_0001u32;
        for _ in 0..100_000 {
            x = x.wrapping_mul(2_654_435_761).wrapping_add(12345);
            let f = f32::from_bits(x);
            let want = bf16::from_f32(f);
            let got = f32_to_bf16_bits(f);
            if f.is_nan() {
                assert!(bf16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "{f:e}");
            }
            assert_eq!(
                to_f32_vec(DType::BF16, &got.to_le_bytes())[0].to_bits(),
                bf16::from_bits(got).to_f32().to_bits()
            );
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1.0).
        let x = 1.0f32 + 2f32.powi(-8);
        assert_eq!(to_f32_vec(DType::BF16, &from_f32(DType::BF16, &[x])), [1.0]);
        let y = 1.0f32 + 3.0 * 2f32.powi(-8);
        assert_eq!(
            to_f32_vec(DType::BF16, &from_f32(DType::BF16, &[y])),
            [1.0 + 2f32.powi(-6)]
        );
    }
}
