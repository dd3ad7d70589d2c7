//! The kernel images: built by build.rs (fatbin with sm_90 code and compute_90 PTX), or, in a
//! binary built without nvcc, compiled at run time from the embedded sources with NVRTC.
//! `CYCLEQD_KERNEL_DIR` overrides either with `<module>.fatbin`/`.cubin`/`.ptx` files, so
//! kernels can be rebuilt on a GPU machine without rebuilding the Rust binary.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::error::{Error, Result};

/// One `kernels/*.cu` file: its compiled image (empty without nvcc) and its source.
pub struct KernelModule {
    pub name: &'static str,
    pub fatbin: &'static [u8],
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Whether this binary carries nvcc-built images (otherwise NVRTC compiles at run time).
pub fn images_embedded() -> bool {
    MODULES.iter().all(|m| !m.fatbin.is_empty())
}

/// Where a module's code came from, for `bench` and error messages.
#[derive(Clone, Debug)]
pub enum ImageSource {
    Embedded,
    Override(PathBuf),
    Nvrtc,
}

/// Every module loaded into `ctx`, functions looked up by name.
pub struct LoadedKernels {
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    pub sources: Vec<(&'static str, ImageSource)>,
}

impl LoadedKernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::invalid(format!("CUDA: compute capability: {e}")))?;
        let mut modules = vec![];
        let mut sources = vec![];
        for m in MODULES {
            let (ptx, source) = image(m, major, minor)?;
            let module = ctx.load_module(ptx).map_err(|e| {
                Error::invalid(format!(
                    "CUDA: loading kernel module `{}` ({source:?}) on sm_{major}{minor}: {e}",
                    m.name
                ))
            })?;
            modules.push((m.name, module));
            sources.push((m.name, source));
        }
        Ok(LoadedKernels { modules, sources })
    }

    /// The kernel `name` of module `module`.
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let (_, m) = self
            .modules
            .iter()
            .find(|(n, _)| *n == module)
            .ok_or_else(|| Error::invalid(format!("CUDA: no kernel module `{module}`")))?;
        m.load_function(name)
            .map_err(|e| Error::invalid(format!("CUDA: kernel `{name}` in `{module}`: {e}")))
    }
}

fn image(m: &KernelModule, major: i32, minor: i32) -> Result<(Ptx, ImageSource)> {
    if let Some(dir) = std::env::var_os("CYCLEQD_KERNEL_DIR") {
        for ext in ["fatbin", "cubin", "ptx"] {
            let path = PathBuf::from(&dir).join(format!("{}.{ext}", m.name));
            if path.is_file() {
                let mut bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                if ext == "ptx" {
                    bytes.push(0); // cuModuleLoadData reads PTX as a C string
                }
                return Ok((Ptx::from_binary(bytes), ImageSource::Override(path)));
            }
        }
    }
    // The embedded images hold sm_90 code and compute_90 PTX: they load on sm_90 and newer.
    if !m.fatbin.is_empty() && major >= 9 {
        return Ok((Ptx::from_binary(m.fatbin.to_vec()), ImageSource::Embedded));
    }
    // NVRTC takes the architecture as a `&'static str`: leak one short string per process.
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    Ok((nvrtc_compile(m, arch)?, ImageSource::Nvrtc))
}

/// Compiles a module's source for this device with NVRTC, splicing `common.cuh` in place of its
/// include (NVRTC has no file system view of `kernels/`).
pub fn nvrtc_compile(m: &KernelModule, arch: &'static str) -> Result<Ptx> {
    let source = m.source.replace("#include \"common.cuh\"", COMMON_HEADER);
    let mut include_paths = vec![];
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            include_paths.push(format!("{home}/include"));
        }
    }
    include_paths.push("/usr/local/cuda/include".to_string());
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths,
        name: Some(format!("{}.cu", m.name)),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    // SAFETY: only probes for the shared library with dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::invalid(format!(
            "CUDA: this binary was built without nvcc and libnvrtc.so.13 is not loadable, so \
             kernel module `{}` cannot be compiled (put the CUDA 13 lib64 on LD_LIBRARY_PATH, \
             or rebuild with nvcc)",
            m.name
        )));
    }
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        Error::invalid(format!(
            "CUDA: NVRTC failed on kernel module `{}`: {e}",
            m.name
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_sources_compile_with_nvrtc_and_export_every_launched_kernel() {
        // SAFETY: only probes for the shared library with dlopen.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED embedded_sources_compile_with_nvrtc: libnvrtc.so.13 is not loadable \
                 (CI puts the nvcc wheel's lib/ on LD_LIBRARY_PATH)"
            );
            return;
        }
        let names = super::super::launch::kernel_names();
        for m in MODULES {
            assert!(
                names.iter().any(|(module, _)| *module == m.name),
                "{} unused",
                m.name
            );
            let ptx = nvrtc_compile(m, "compute_90").unwrap().to_src();
            for (_, name) in names.iter().filter(|(module, _)| *module == m.name) {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "kernel `{name}` is not an entry of module `{}`",
                    m.name
                );
            }
        }
    }
}
