//! Random-weight Llama checkpoints: `N(0, 0.02²)` matrices (transformers' `initializer_range`),
//! RMSNorm weights near 1, generated tensor by tensor in parallel from a seed.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::Result;
use crate::model::{DType, HostTensor, LlamaConfig};

/// The shape of a Llama model.
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaShape {
    /// About 100M parameters: the CPU benchmark shape.
    pub const SMALL_100M: LlamaShape = LlamaShape {
        hidden_size: 768,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: 4,
        intermediate_size: 2048,
        vocab_size: 32000,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
    };

    /// The CPU `bench` shape: small enough for a 2-core machine in seconds.
    pub const TINY: LlamaShape = LlamaShape {
        hidden_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        intermediate_size: 688,
        vocab_size: 4096,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
    };

    /// Llama-3-8B's shape (226 matrices: 32 layers × 7, embeddings, lm_head).
    pub const LLAMA3_8B: LlamaShape = LlamaShape {
        hidden_size: 4096,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        intermediate_size: 14336,
        vocab_size: 128256,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
    };

    /// A config.json for this shape, in the transformers-5 key style.
    pub fn config_json(&self, dtype: DType) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.hidden_size / self.num_attention_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "dtype": dtype.torch_name(),
        })
    }

    pub fn config(&self, dtype: DType) -> Result<LlamaConfig> {
        let text = self.config_json(dtype).to_string();
        LlamaConfig::from_json_str(&text, std::path::Path::new("<synthetic config>"))
    }
}

/// A random Llama of `shape` in `dtype`: its config and its tensors in checkpoint order.
pub fn random_llama(
    shape: &LlamaShape,
    dtype: DType,
    seed: u64,
) -> Result<(LlamaConfig, Vec<(String, HostTensor)>)> {
    let cfg = shape.config(dtype)?;
    let specs = cfg.expected_tensors();
    let tensors = specs
        .into_par_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 1 {
                let d = Normal::new(1.0f32, 0.05).expect("valid normal");
                (0..n).map(|_| d.sample(&mut rng)).collect()
            } else {
                let d = Normal::new(0.0f32, 0.02).expect("valid normal");
                (0..n).map(|_| d.sample(&mut rng)).collect()
            };
            (name, HostTensor::from_f32(&values, shape, dtype))
        })
        .collect();
    Ok((cfg, tensors))
}

/// `len` values `(2·hash_uniform(seed, i) − 1)·scale`, uniform in [−scale, scale): the host
/// side of `fill_random_*` in `kernels/llama.cu`.
pub fn hash_values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    use rayon::prelude::*;
    (0..len as u64)
        .into_par_iter()
        .map(|i| (2.0 * hash_uniform(seed, i) - 1.0) * scale)
        .collect()
}

/// Element `i` of a pseudo-random tensor, uniform in [0, 1) with 24 bits: a SplitMix64 hash of
/// `(seed, i)`. `kernels/llama.cu` (`hash_uniform`) computes the same values on the device, so
/// benchmark weights generated there are reproducible here.
pub fn hash_uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}
