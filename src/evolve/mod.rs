//! Evolution operators: task-vector factorisation, the expert set, genomes with crossover and
//! SVD mutation, and the coefficients a genome sets for materialisation.

pub mod batched_svd;
pub mod cache;
pub mod crossover;
pub mod expert_set;
pub mod factorize;
pub mod genome;

pub use crossover::CrossoverMethod;
pub use expert_set::{is_factorised, CacheStatus, ExpertSet, Rank, TensorFactors};
pub use factorize::{exact_svd, Factors, RandomizedSvd};
pub use genome::{Genome, TensorGenes};
