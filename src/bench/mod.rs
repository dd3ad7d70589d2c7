//! Performance measurement shared by the criterion benches and `cycleqd-engine bench`: the
//! machine's measured ceilings, against which every hot operation reports its fraction.

pub mod ceilings;

pub use ceilings::{cpu_copy_bandwidth, cpu_peak_flops, time_median};
