//! Device discovery and selection: whether CUDA can run here, which device `--device` names,
//! and NVML telemetry (name, memory, power, clocks) for `bench` and logs.

use serde::Serialize;

use crate::error::{Error, Result};

/// What `--device` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// A CUDA device; `None` = device 0 when present (the default: CUDA when available).
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(Some(n))),
                _ => Err(format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
            },
        }
    }
}

/// Why CUDA cannot be used on this machine, or `None` when the driver library loads.
pub fn cuda_unavailable_reason() -> Option<String> {
    // SAFETY: only probes for the driver library with dlopen. cudarc panics on calls into a
    // missing library, so nothing else in CUDA is touched before this says yes.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver (libcuda.so.1 not found)".into());
    }
    match cudarc::driver::result::init() {
        Err(e) => Some(format!("the CUDA driver did not initialise: {e}")),
        Ok(()) => match cudarc::driver::result::device::get_count() {
            Ok(0) => Some("no CUDA device".into()),
            Ok(_) => None,
            Err(e) => Some(format!("counting CUDA devices failed: {e}")),
        },
    }
}

/// Number of CUDA devices (0 without a driver).
pub fn cuda_device_count() -> Result<usize> {
    if cuda_unavailable_reason().is_some() {
        return Ok(0);
    }
    cudarc::driver::result::device::get_count()
        .map(|n| n as usize)
        .map_err(|e| Error::invalid(format!("CUDA: counting devices: {e}")))
}

/// NVML's view of one device, recorded beside every benchmark.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceInfo {
    pub name: Option<String>,
    pub driver_version: Option<String>,
    pub cuda_driver_version: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    pub power_draw_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub sm_clock_max_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub temperature_c: Option<u32>,
}

impl DeviceInfo {
    /// Reads NVML for device `index`; fields NVML cannot give stay `None` (no driver: all).
    pub fn query(index: usize) -> DeviceInfo {
        use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
        let Ok(nvml) = nvml_wrapper::Nvml::init() else {
            return DeviceInfo::default();
        };
        let mut info = DeviceInfo {
            driver_version: nvml.sys_driver_version().ok(),
            cuda_driver_version: nvml.sys_cuda_driver_version().ok().map(|v| {
                format!(
                    "{}.{}",
                    nvml_wrapper::cuda_driver_version_major(v),
                    nvml_wrapper::cuda_driver_version_minor(v)
                )
            }),
            ..DeviceInfo::default()
        };
        if let Ok(d) = nvml.device_by_index(index as u32) {
            info.name = d.name().ok();
            if let Ok(m) = d.memory_info() {
                info.memory_total_bytes = Some(m.total);
                info.memory_free_bytes = Some(m.free);
            }
            info.power_draw_w = d.power_usage().ok().map(|mw| mw as f64 / 1000.0);
            info.power_limit_w = d.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0);
            info.sm_clock_mhz = d.clock_info(Clock::SM).ok();
            info.sm_clock_max_mhz = d.max_clock_info(Clock::SM).ok();
            info.mem_clock_mhz = d.clock_info(Clock::Memory).ok();
            info.temperature_c = d.temperature(TemperatureSensor::Gpu).ok();
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(None)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(Some(3))));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn no_driver_is_reported_not_panicked() {
        // Holds on every machine: either a reason, or a count of at least one device.
        match cuda_unavailable_reason() {
            Some(why) => {
                println!("CUDA unavailable here: {why}");
                assert_eq!(cuda_device_count().unwrap(), 0);
            }
            None => assert!(cuda_device_count().unwrap() >= 1),
        }
    }
}
