//! Performance measurement shared by the criterion benches and `cycleqd-engine bench`: the
//! machine's measured ceilings, against which every hot operation reports its fraction.

pub mod ceilings;
pub mod cuda;
pub mod racing;
pub mod sandbox;
pub mod scheduler;
pub mod serve;
pub mod suite;

pub use ceilings::{
    cpu_copy_bandwidth, cpu_peak_bf16_flops, cpu_peak_flops, cpu_read_bandwidth, time_median,
};

/// Peak resident set size of this process so far (`VmHWM`), in bytes; `None` off Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
