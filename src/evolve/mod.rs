//! Evolution operators. Merging (mergekit's methods) is here; task vectors, factorisation,
//! genomes, crossover, mutation and materialisation join it.

pub mod factorize;
pub mod merge;

pub use factorize::{exact_svd, randomized_svd, Factors, RandomizedSvd};
pub use merge::{merge_tensor, MergeOp};
