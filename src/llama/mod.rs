//! Llama inference: the forward pass (ragged batches over a slot-indexed KV cache), batched
//! greedy/sampled generation with per-token log-probabilities, and continuation scoring.

pub mod generate;
pub mod logits;
pub mod model;

pub use generate::{
    generate, generate_until, score_continuations, GenerateOptions, Generation, PromptOptions,
    Sampling, StopReason,
};
pub use model::{KvCache, LlamaModel, Probe, RunState, Step};
