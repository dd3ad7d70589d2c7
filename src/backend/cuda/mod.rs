//! The CUDA backend: hand-written kernels (`kernels/*.cu`) behind the same [`Backend`] seam as
//! the CPU reference, cuBLAS for the GEMMs whose batch is too large for the matvec kernel.
//! One context and one stream per device; modules are loaded once when the backend opens;
//! device memory is owned by cudarc's RAII slices; every launch returns its error.
//!
//! cudarc loads libcuda, libnvrtc and libcublas with dlopen, so this compiles and runs on
//! machines without CUDA: [`CudaBackend::open`] then returns an error (it never panics), and
//! callers fall back to the CPU backend.

mod device;
mod factorize;
mod gemm;
pub mod kernels;
pub mod launch;
mod materialize;
mod ops;

use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use crate::error::{Error, Result};
use crate::model::DType;

pub use device::{cuda_device_count, cuda_unavailable_reason, DeviceChoice, DeviceInfo};
pub use materialize::{CudaSources, ResidentTensor, StreamedTensor, TILE_BYTES};

/// A weight tensor in device memory, in its storage dtype.
pub struct CudaWeight {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: CudaSlice<u8>,
}

impl CudaWeight {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An f32 device buffer (activations, KV cache); empty until first sized.
#[derive(Default)]
pub struct CudaBuf {
    pub(crate) data: Option<CudaSlice<f32>>,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device slice; an error (not a panic) for a buffer never sized.
    pub(crate) fn dev(&self) -> Result<&CudaSlice<f32>> {
        self.data
            .as_ref()
            .ok_or_else(|| Error::invalid("CUDA: an unallocated buffer was used"))
    }

    pub(crate) fn dev_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        self.data
            .as_mut()
            .ok_or_else(|| Error::invalid("CUDA: an unallocated buffer was used"))
    }
}

/// One CUDA device: context, stream, cuBLAS handle and the loaded kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: kernels::LoadedKernels,
    name: String,
    /// Activations rounded to a 16-bit weight dtype for cuBLAS, reused across calls.
    cast_scratch: Mutex<Option<CudaSlice<u8>>>,
    index_uploads: UploadCache<u32>,
    freq_uploads: UploadCache<f32>,
    /// Largest low-rank tile of materialisation, in bytes.
    tile_bytes: std::sync::atomic::AtomicUsize,
}

/// Host arrays recently copied to the device, reused while ops pass the same ones: within a
/// layer the positions go to `rope` twice, `kv_store` twice and `attention` once, and
/// `inv_freq` is the model's for every call. Device copies are never written by kernels, so
/// equal host contents mean an equal device copy.
#[derive(Default)]
struct UploadCache<T> {
    entries: Mutex<Vec<Uploaded<T>>>,
}

/// A host array and its device copy.
type Uploaded<T> = (Vec<T>, Arc<CudaSlice<T>>);

/// Distinct arrays kept: a step passes token ids, slots, positions and logit rows.
const UPLOAD_CACHE_ENTRIES: usize = 4;

impl<T: DeviceRepr + ValidAsZeroBits + PartialEq + Clone> UploadCache<T> {
    fn get(&self, stream: &Arc<CudaStream>, v: &[T]) -> Result<Arc<CudaSlice<T>>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = entries.iter().position(|(host, _)| host.as_slice() == v) {
            let hit = entries.remove(i);
            let dev = hit.1.clone();
            entries.push(hit);
            return Ok(dev);
        }
        let dev = if v.is_empty() {
            stream.alloc_zeros::<T>(1)
        } else {
            stream.clone_htod(v)
        }
        .map_err(|e| cuda_err("copying to the device", e))?;
        let dev = Arc::new(dev);
        if entries.len() == UPLOAD_CACHE_ENTRIES {
            entries.remove(0);
        }
        entries.push((v.to_vec(), dev.clone()));
        Ok(dev)
    }
}

impl CudaBackend {
    /// Opens device `ordinal`: an error (never a panic) when there is no driver or device.
    pub fn open(ordinal: usize) -> Result<Self> {
        if let Some(why) = cuda_unavailable_reason() {
            return Err(Error::invalid(format!("CUDA is unavailable: {why}")));
        }
        let count = cudarc::driver::result::device::get_count()
            .map_err(|e| cuda_err("counting devices", e))? as usize;
        if ordinal >= count {
            return Err(Error::invalid(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        // SAFETY: only probes for the library with dlopen; cudarc panics on calls into a
        // missing one.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::invalid(
                "CUDA: libcublas.so.13 is not loadable (put the CUDA 13 lib64 on LD_LIBRARY_PATH)",
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("opening the context", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| {
            Error::invalid(format!(
                "CUDA: cuBLAS did not initialise ({e}); is libcublas.so.13 on the library path?"
            ))
        })?;
        let kernels = kernels::LoadedKernels::load(&ctx)?;
        let dev = ctx.name().unwrap_or_else(|_| "unknown".into());
        Ok(CudaBackend {
            name: format!("cuda:{ordinal} {dev}"),
            ctx,
            stream,
            blas,
            kernels,
            cast_scratch: Mutex::new(None),
            index_uploads: UploadCache::default(),
            freq_uploads: UploadCache::default(),
            tile_bytes: std::sync::atomic::AtomicUsize::new(TILE_BYTES),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| cuda_err("querying memory", e))
    }

    /// Where each kernel module's code came from (embedded fatbin, override file, NVRTC).
    pub fn kernel_sources(&self) -> Vec<(String, String)> {
        self.kernels
            .sources
            .iter()
            .map(|(m, s)| (m.to_string(), format!("{s:?}")))
            .collect()
    }

    fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| cuda_err("allocating device memory", e))
    }

    fn alloc_bytes(&self, len: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(len.max(1))
            .map_err(|e| cuda_err("allocating device memory", e))
    }

    /// A host index array (token ids, slots, positions) on the device.
    fn upload_u32(&self, v: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        self.index_uploads.get(&self.stream, v)
    }

    /// A weight of `shape` filled on the device with the deterministic pseudo-random values
    /// of `random::hash_uniform` (bench models without files).
    pub fn random_weight(
        &self,
        shape: &[usize],
        dtype: DType,
        seed: u64,
        scale: f32,
    ) -> Result<CudaWeight> {
        let len: usize = shape.iter().product();
        let mut data = self.alloc_bytes(len * dtype.size())?;
        let l = launch::fill_random(dtype, len, seed, scale);
        {
            let (p, _g) = data.device_ptr_mut(&self.stream);
            // SAFETY: `data` holds `len` elements of `dtype`; the kernel writes exactly those.
            unsafe { self.run(&l, &[p])? };
        }
        Ok(CudaWeight {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("CUDA: {what}: {e}"))
}

/// A struct kernel argument's bytes, passed by value (the driver reads the parameter's size).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct ParamBytes([u8; 256]);

// SAFETY: plain bytes; the driver copies as many as the kernel's parameter takes.
unsafe impl DeviceRepr for ParamBytes {}

/// An argument's value, stored where the launch builder can point at it.
enum ArgValue {
    U32(u32),
    U64(u64),
    F32(f32),
    Bytes(Box<ParamBytes>),
}

impl CudaBackend {
    /// Runs a launch description with `bufs[i]` the device address of its buffer `i`.
    ///
    /// # Safety
    /// Every buffer must hold what the description's kernel reads and writes there (the op
    /// that built the description checked the sizes).
    unsafe fn run(&self, l: &launch::Launch, bufs: &[u64]) -> Result<()> {
        let address = |buf: usize, offset: usize| -> Result<u64> {
            bufs.get(buf).map(|b| b + offset as u64).ok_or_else(|| {
                Error::invalid(format!(
                    "{}: buffer {buf} of {} missing",
                    l.kernel,
                    bufs.len()
                ))
            })
        };
        let values = l
            .args
            .iter()
            .map(|a| {
                Ok(match a {
                    launch::Arg::Buf { buf, offset } => ArgValue::U64(address(*buf, *offset)?),
                    launch::Arg::U32(v) => ArgValue::U32(*v),
                    launch::Arg::U64(v) => ArgValue::U64(*v),
                    launch::Arg::F32(v) => ArgValue::F32(*v),
                    launch::Arg::Struct { bytes, pointers } => {
                        let mut p = Box::new(ParamBytes([0; 256]));
                        if bytes.len() > p.0.len() {
                            return Err(Error::invalid(format!(
                                "{}: a {}-byte struct argument",
                                l.kernel,
                                bytes.len()
                            )));
                        }
                        p.0[..bytes.len()].copy_from_slice(bytes);
                        for sp in pointers {
                            let a = address(sp.buf, sp.offset)?;
                            p.0[sp.at..sp.at + 8].copy_from_slice(&a.to_le_bytes());
                        }
                        ArgValue::Bytes(p)
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let f = self.kernels.function(l.module, &l.kernel)?;
        let mut b = self.stream.launch_builder(&f);
        for v in &values {
            match v {
                ArgValue::U32(x) => b.arg(x),
                ArgValue::U64(x) => b.arg(x),
                ArgValue::F32(x) => b.arg(x),
                ArgValue::Bytes(x) => b.arg(&**x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block[0], l.block[1], l.block[2]),
            shared_mem_bytes: l.shared_bytes,
        };
        // SAFETY: the caller vouches for the buffers; the arguments are the kernel's, in
        // order, as the description packs them.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| cuda_err(&l.kernel, e))
    }
}
