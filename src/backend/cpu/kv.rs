//! The CPU's KV cache storage: f32, or bf16 where the model's products compute in bf16 (as
//! transformers and vLLM keep a bf16 model's cache), which halves the bytes attention reads
//! per decode step and the memory a batch of long sequences holds.

use crate::model::dtype::{bf16_to_f32_slice, f32_to_bf16_slice};
use crate::model::DType;

/// One layer's keys or values, `[slots, max_seq, width]`.
#[derive(Clone, Debug, PartialEq)]
pub enum KvBuf {
    F32(Vec<f32>),
    /// bf16 bit patterns, rounded to nearest even from the f32 rows stored.
    Bf16(Vec<u16>),
}

impl KvBuf {
    pub fn zeros(len: usize, dtype: DType) -> KvBuf {
        match dtype {
            DType::BF16 => KvBuf::Bf16(vec![0; len]),
            _ => KvBuf::F32(vec![0.0; len]),
        }
    }

    /// Values held (not bytes).
    pub fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            KvBuf::F32(_) => DType::F32,
            KvBuf::Bf16(_) => DType::BF16,
        }
    }

    /// Writes `row` at value offset `at`, rounded to the storage dtype.
    pub fn store(&mut self, at: usize, row: &[f32]) {
        match self {
            KvBuf::F32(v) => v[at..at + row.len()].copy_from_slice(row),
            KvBuf::Bf16(v) => f32_to_bf16_slice(row, &mut v[at..at + row.len()]),
        }
    }

    /// The values `at..at + dst.len()` as f32.
    pub fn load(&self, at: usize, dst: &mut [f32]) {
        match self {
            KvBuf::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
            KvBuf::Bf16(v) => bf16_to_f32_slice(&v[at..at + dst.len()], dst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_storage_rounds_to_nearest_even_and_reads_back_widened() {
        let row = [
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -2.5,
            f32::INFINITY,
        ];
        let mut f = KvBuf::zeros(8, DType::F32);
        let mut b = KvBuf::zeros(8, DType::BF16);
        f.store(2, &row);
        b.store(2, &row);
        let (mut fr, mut br) = ([0.0f32; 5], [0.0f32; 5]);
        f.load(2, &mut fr);
        b.load(2, &mut br);
        assert_eq!(fr, row);
        // 1 + 2⁻⁸ is a tie between 1 and 1 + 2⁻⁷: to even (1); 1 + 3·2⁻⁸ rounds up to 1 + 2⁻⁶.
        assert_eq!(br, [1.0, 1.0, 1.0 + 1.0 / 64.0, -2.5, f32::INFINITY]);
        assert_eq!((b.dtype(), b.len()), (DType::BF16, 8));
    }
}
