//! Evolution operators: merging (mergekit's methods), task-vector factorisation, genomes with
//! crossover, SVD mutation and materialisation.

pub mod batched_svd;
pub mod cache;
pub mod factorize;
pub mod genome;
pub mod materialize;
pub mod merge;

pub use factorize::{exact_svd, randomized_svd, Factors, RandomizedSvd};
pub use genome::{is_factorised, CacheStatus, ChildWeights, ExpertSet, Genome, Rank, TensorGenes};
pub use merge::{merge_tensor, MergeOp};
