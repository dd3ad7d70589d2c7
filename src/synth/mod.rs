//! Synthetic models: random-weight Llamas of any shape, generated in memory, for benchmarks
//! and tests (and, with the skill implants of the demo, for `cycleqd-engine synth`).

pub mod random;

pub use random::{hash_uniform, hash_values, random_llama, LlamaShape};
pub mod skills;

pub use skills::{synthesize, word_level_tokenizer_json, SynthOptions, SynthReport};
