//! Quality diversity: MAP-Elites archives and CycleQD's elite sampling. The cycle loop and
//! checkpoint/resume join them.

pub mod archive;

pub use archive::{AddStatus, ArchiveStats, Elite, EliteSampling, GridArchive};
