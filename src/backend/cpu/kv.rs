//! The CPU's KV cache storage: f32, or bf16 where the model's products compute in bf16 (as
//! transformers and vLLM keep a bf16 model's cache), which halves the bytes attention reads
//! per decode step and the memory a batch of long sequences holds.

use crate::error::{Error, Result};
use crate::model::dtype::{bf16_to_f32_slice, f32_to_bf16_slice};
use crate::model::DType;

/// One layer's keys or values, `[slots, max_seq, width]`.
#[derive(Clone, Debug, PartialEq)]
pub enum KvBuf {
    F32(Vec<f32>),
    /// bf16 bit patterns (little-endian, as `model::dtype` writes them), rounded to nearest
    /// even from the f32 rows stored.
    Bf16(Vec<u16>),
}

impl KvBuf {
    /// A zeroed buffer of `len` values; f32 and bf16 are the dtypes a cache takes.
    pub fn zeros(len: usize, dtype: DType) -> Result<KvBuf> {
        match dtype {
            DType::F32 => Ok(KvBuf::F32(vec![0.0; len])),
            DType::BF16 => Ok(KvBuf::Bf16(vec![0; len])),
            other => Err(Error::invalid(format!(
                "a {other:?} KV cache: the CPU keeps KV caches in f32 or bf16"
            ))),
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
        let mut f = KvBuf::zeros(8, DType::F32).unwrap();
        let mut b = KvBuf::zeros(8, DType::BF16).unwrap();
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

    /// Through the backend: rows stored into a bf16 cache read back rounded, attention over
    /// it equals attention over an f32 cache holding the same rounded values (the same numbers
    /// reach the same kernel), and a cache pair of two dtypes is refused.
    #[test]
    fn the_backend_stores_reads_and_attends_over_bf16_caches() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::{AttentionGeometry, Backend};
        let be = CpuBackend;
        let geom = AttentionGeometry {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            max_seq: 5,
        };
        let width = geom.num_kv_heads * geom.head_dim;
        let len = 2 * geom.max_seq * width;
        let mut rnd = crate::test_rng::uniform(3);
        let rows: Vec<f32> = (0..len).map(|_| 3.0 * rnd()).collect();
        let (slots, positions): (Vec<u32>, Vec<u32>) = (0..2u32)
            .flat_map(|s| (0..5u32).map(move |p| (s, p)))
            .unzip();
        let stored = |dtype: DType| {
            let mut c = be.kv_zeros(len, dtype).unwrap();
            be.kv_store(&mut c, &rows, &slots, &positions, geom.max_seq, width)
                .unwrap();
            c
        };
        let (k16, v16) = (stored(DType::BF16), stored(DType::BF16));
        let mut back = vec![0.0; len];
        be.kv_download(&mut back, &k16).unwrap();
        let rounded: Vec<f32> = rows
            .iter()
            .map(|&x| f32::from_bits((crate::model::dtype::f32_to_bf16_bits(x) as u32) << 16))
            .collect();
        assert_eq!(back, rounded);
        assert_ne!(back, rows, "bf16 storage rounds");
        let mut k32 = be.kv_zeros(len, DType::F32).unwrap();
        be.kv_upload(&mut k32, &rounded).unwrap();
        let q: Vec<f32> = (0..2 * geom.num_heads * geom.head_dim)
            .map(|_| rnd())
            .collect();
        let (rows_slots, last) = (vec![1u32, 0], vec![4u32, 2]);
        let attend = |k: &KvBuf, v: &KvBuf| {
            let mut out = vec![0.0; q.len()];
            be.attention(&mut out, &q, k, v, &rows_slots, &last, geom)
                .map(|_| out)
        };
        assert_eq!(attend(&k16, &v16).unwrap(), attend(&k32, &k32).unwrap());
        let mixed = attend(&k16, &k32).unwrap_err().to_string();
        assert!(
            mixed.contains("BF16 key cache with a F32 value cache"),
            "{mixed}"
        );
        assert!(be.kv_zeros(4, DType::F16).is_err());
        // A geometry whose cache size overflows is refused, not wrapped into a small size
        // that would let the kernel read past the cache.
        let huge = AttentionGeometry {
            max_seq: 1 << 62,
            ..geom
        };
        let mut out = vec![0.0; q.len()];
        let e = be
            .attention(&mut out, &q, &k16, &v16, &[0, 1], &[0, 0], huge)
            .unwrap_err();
        assert!(e.to_string().contains("needs"), "{e}");
        let mut c = be.kv_zeros(len, DType::BF16).unwrap();
        let e = be
            .kv_store(&mut c, &rows[..width].to_vec(), &[1], &[0], 1 << 62, width)
            .unwrap_err();
        assert!(e.to_string().contains("needs"), "{e}");
    }
}
