//! Evolution operators. Merging (mergekit's methods) is here; task vectors, factorisation,
//! genomes, crossover, mutation and materialisation join it.

pub mod merge;

pub use merge::{merge_tensor, MergeOp};
