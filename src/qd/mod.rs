//! Quality diversity: MAP-Elites archives with CycleQD's elite sampling, the cycle loop over
//! genomes, the run configuration and checkpoints.

pub mod archive;
pub mod checkpoint;
pub mod config;
pub mod cycle;
pub mod racing;

pub use archive::{AddStatus, ArchiveStats, Elite, EliteSampling, GridArchive};
pub use config::RunConfig;
pub use cycle::{
    child_id, ChildEvent, ChildSpec, ExampleScores, Individual, Operators, Outcome, Population,
};
pub use racing::{RaceBounds, RacingConfig};
