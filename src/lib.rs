//! cycleqd-engine: quality-diversity evolution of large language models by model merging
//! (CycleQD, Kuroki et al., ICLR 2025), with a CPU reference backend and CUDA kernels.
//!
//! Data flows one way: Hugging Face checkpoints (`model`) → task vectors and their factors →
//! genomes → materialised weights → Llama inference (`llama`) → archives → final merge → export.

pub mod backend;
pub mod broker;
pub mod durable;
pub mod error;
pub mod eval;
pub mod evolve;
pub mod llama;
pub mod merge;
pub mod model;
pub mod qd;
pub mod report;
pub mod run;
pub mod serve;
mod simd;
#[cfg(test)]
mod test_rng;

pub use error::{Error, Result};
pub mod bench;
pub mod synth;
