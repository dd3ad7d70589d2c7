//! Hugging Face checkpoints: config (both key styles), memory-mapped safetensors (single or
//! sharded), tokenizer and chat template, and atomic export.

pub mod chat;
pub mod config;
pub mod direct;
pub mod dtype;
pub mod export;
pub mod hub;
pub mod safetensors;
pub mod store;
pub mod tokenizer;
pub mod window;

pub use chat::ChatTemplate;
pub use config::{LlamaConfig, RopeScaling};
pub use dtype::DType;
pub use export::{export_tensors, CheckpointWriter, DEFAULT_MAX_SHARD_BYTES};
pub use safetensors::TensorSpec;
pub use store::{read_safetensors_file, HostTensor, ModelStore, TensorBytes};
pub use tokenizer::Tokenizer;
