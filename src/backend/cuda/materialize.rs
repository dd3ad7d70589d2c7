//! GPU materialisation: `θ = (1 − Σ a_e)·θ_b + Σ a_e·θ_e + U·diag(c)·Vᵀ` per tensor, with the
//! experts' factors concatenated (`U` `[m, K]`, `Vᵀ` `[K, n]`, `K = Σ r_e`) so the low-rank
//! term is one GEMM. The GEMM runs a few rows at a time into an f32 tile small enough to stay
//! in L2, and the fused kernel (`kernels/materialize.cu`) reads the sources once, adds the tile
//! and rounds once into the output weight.
//!
//! Two placements of a model's sources ([`CudaSources`]): **resident** (sources in device
//! memory: a read of every source per child) and **streamed** (sources in pinned host memory,
//! copied tensor by tensor into two staging sets on a copy stream while the previous tensor
//! computes). [`crate::backend::Backend::place_sources`] picks one from free memory. Scratch
//! (the scaled `U`, the tile, the coefficients, the staging sets) is allocated once with the
//! sources, so a child costs no device allocation.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice};

use super::gemm::Precision;
use super::{cuda_err, CudaBackend, CudaWeight};
use crate::backend::materialize::{Placement, TensorCoefficients, TensorSources};
use crate::error::{Error, Result};
use crate::model::DType;

/// Default largest f32 low-rank tile: read back by the fused pass while it is still in L2
/// (50 MB on H100, 60 MB on H200).
pub const TILE_BYTES: usize = 16 << 20;
use super::launch::{self, MAX_SOURCES};

/// The concatenated factors of one tensor, in device memory.
pub struct DeviceFactors {
    /// `[m, K]` row-major.
    u: CudaSlice<f32>,
    /// `[K, n]` row-major.
    vt: CudaSlice<f32>,
    k: usize,
}

/// One tensor with every source in device memory.
pub struct ResidentTensor {
    pub base: CudaWeight,
    pub experts: Vec<CudaWeight>,
    factors: Option<DeviceFactors>,
    pub m: usize,
    pub n: usize,
}

/// One tensor with its sources in pinned host memory (factors stay on the device: they are
/// small next to the weights).
pub struct StreamedTensor {
    dtype: DType,
    /// Base first, then the experts.
    sources: Vec<PinnedHostSlice<u8>>,
    factors: Option<DeviceFactors>,
    pub m: usize,
    pub n: usize,
}

/// Device scratch of [`CudaBackend::fused`], sized for the largest tensor it serves.
struct Scratch {
    /// `U·diag(c)`, `[m, K]`.
    us: CudaSlice<f32>,
    /// The low-rank tile, `[tile_rows, n]`.
    tile: CudaSlice<f32>,
    /// `c`, `[K]`.
    coef: CudaSlice<f32>,
}

/// The streamed placement's copy machinery: a copy stream and two staging sets of
/// `1 + experts` buffers of the largest tensor's size.
struct Staging {
    copy: Arc<CudaStream>,
    slots: [Vec<CudaSlice<u8>>; 2],
}

enum Placed {
    Resident(Vec<ResidentTensor>),
    Streamed(Vec<StreamedTensor>, Staging),
}

/// A model's materialisation sources on one device ([`crate::backend::Backend::Sources`]).
pub struct CudaSources {
    placed: Placed,
    scratch: Scratch,
    /// Bytes of sources (weights and factors) this placement holds.
    pub bytes: usize,
}

impl CudaSources {
    pub fn is_resident(&self) -> bool {
        matches!(self.placed, Placed::Resident(_))
    }

    /// Tensors placed, in order.
    pub fn len(&self) -> usize {
        match &self.placed {
            Placed::Resident(t) => t.len(),
            Placed::Streamed(t, _) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `U` `[m, Σr]` and `Vᵀ` `[Σr, n]` concatenated over the experts' low-rank terms.
fn concat_factors(src: &TensorSources) -> (Vec<f32>, Vec<f32>, usize) {
    let (m, n, k) = (src.m, src.n, src.total_rank());
    let mut u = Vec::with_capacity(m * k);
    for i in 0..m {
        for f in &src.factors {
            u.extend_from_slice(&f.u[i * f.rank..(i + 1) * f.rank]);
        }
    }
    let mut vt = Vec::with_capacity(k * n);
    for f in &src.factors {
        vt.extend_from_slice(&f.vt[..f.rank * n]);
    }
    (u, vt, k)
}

fn check_source_count(src: &TensorSources) -> Result<()> {
    if src.experts.len() + 1 > MAX_SOURCES {
        return Err(Error::tensor(
            &src.name,
            format!(
                "materialize: {} experts, at most {} on CUDA",
                src.experts.len(),
                MAX_SOURCES - 1
            ),
        ));
    }
    Ok(())
}

impl CudaBackend {
    /// The low-rank tile size in bytes (default [`TILE_BYTES`]; tests make it small so small
    /// tensors cross several tiles).
    pub fn set_materialize_tile_bytes(&self, bytes: usize) {
        self.tile_bytes
            .store(bytes.max(4), std::sync::atomic::Ordering::Relaxed);
    }

    fn tile_rows(&self, m: usize, n: usize) -> usize {
        let bytes = self.tile_bytes.load(std::sync::atomic::Ordering::Relaxed);
        (bytes / (n * 4).max(1)).clamp(1, m.max(1))
    }

    fn upload_factors(&self, src: &TensorSources) -> Result<Option<DeviceFactors>> {
        // Rank-0 terms contribute nothing (and cuBLAS refuses k = 0).
        if src.total_rank() == 0 {
            return Ok(None);
        }
        let (u, vt, k) = concat_factors(src);
        let up = |v: &[f32]| {
            self.stream
                .clone_htod(v)
                .map_err(|e| cuda_err("uploading factors", e))
        };
        Ok(Some(DeviceFactors {
            u: up(&u)?,
            vt: up(&vt)?,
            k,
        }))
    }

    /// Uploads one tensor's sources and factors.
    pub fn resident_tensor(&self, src: &TensorSources) -> Result<ResidentTensor> {
        use crate::backend::Backend;
        src.check()?;
        check_source_count(src)?;
        Ok(ResidentTensor {
            base: self.upload_weight(&src.base)?,
            experts: src
                .experts
                .iter()
                .map(|x| self.upload_weight(x))
                .collect::<Result<_>>()?,
            factors: self.upload_factors(src)?,
            m: src.m,
            n: src.n,
        })
    }

    /// A resident tensor of random sources and factors generated on the device (`bench`).
    pub fn random_resident(
        &self,
        m: usize,
        n: usize,
        dtype: DType,
        experts: usize,
        rank: usize,
        seed: u64,
    ) -> Result<ResidentTensor> {
        let k = experts * rank;
        let f32_buf = |len: usize, seed: u64| -> Result<CudaSlice<f32>> {
            let w = self.random_weight(&[len], DType::F32, seed, 0.01)?;
            // SAFETY: the buffer holds `len` f32 values (4 bytes each) and is not used again.
            let view = unsafe { w.data.transmute::<f32>(len) }
                .ok_or_else(|| Error::invalid("random_resident: factor buffer size"))?;
            self.stream
                .clone_dtod(&view)
                .map_err(|e| cuda_err("copying factors", e))
        };
        Ok(ResidentTensor {
            base: self.random_weight(&[m, n], dtype, seed, 0.03)?,
            experts: (0..experts)
                .map(|e| self.random_weight(&[m, n], dtype, seed + 1 + e as u64, 0.03))
                .collect::<Result<_>>()?,
            factors: (k > 0)
                .then(|| -> Result<DeviceFactors> {
                    Ok(DeviceFactors {
                        u: f32_buf(m * k, seed + 100)?,
                        vt: f32_buf(k * n, seed + 200)?,
                        k,
                    })
                })
                .transpose()?,
            m,
            n,
        })
    }

    /// Copies one tensor's sources into pinned host memory for the streamed placement.
    pub fn streamed_tensor(&self, src: &TensorSources) -> Result<StreamedTensor> {
        src.check()?;
        check_source_count(src)?;
        let mut sources = vec![];
        for t in std::iter::once(&src.base).chain(&src.experts) {
            // SAFETY: the pinned buffer is fully written below before any read.
            let mut p = unsafe { self.ctx.alloc_pinned::<u8>(t.data().len().max(1)) }
                .map_err(|e| cuda_err("allocating pinned host memory", e))?;
            p.as_mut_slice()
                .map_err(|e| cuda_err("pinned host memory", e))?[..t.data().len()]
                .copy_from_slice(t.data());
            sources.push(p);
        }
        Ok(StreamedTensor {
            dtype: src.base.dtype,
            sources,
            factors: self.upload_factors(src)?,
            m: src.m,
            n: src.n,
        })
    }

    /// Scratch for tensors of these `(m, n, K)`.
    fn scratch(&self, dims: impl Iterator<Item = (usize, usize, usize)>) -> Result<Scratch> {
        let (mut us, mut tile, mut coef) = (1, 1, 1);
        for (m, n, k) in dims {
            if k > 0 {
                us = us.max(m * k);
                tile = tile.max(self.tile_rows(m, n) * n);
                coef = coef.max(k);
            }
        }
        Ok(Scratch {
            us: self.alloc_f32(us)?,
            tile: self.alloc_f32(tile)?,
            coef: self.alloc_f32(coef)?,
        })
    }

    /// Resident sources of a model, with their scratch.
    pub fn resident_sources(&self, tensors: Vec<ResidentTensor>) -> Result<CudaSources> {
        let scratch = self.scratch(tensors.iter().map(|t| (t.m, t.n, rank_of(&t.factors))))?;
        let bytes = tensors
            .iter()
            .map(|t| placed_bytes(1 + t.experts.len(), t.base.dtype, t.m, t.n, &t.factors))
            .sum();
        Ok(CudaSources {
            placed: Placed::Resident(tensors),
            scratch,
            bytes,
        })
    }

    /// Streamed sources of a model, with their scratch, copy stream and staging sets.
    pub fn streamed_sources(&self, tensors: Vec<StreamedTensor>) -> Result<CudaSources> {
        let n_sources = tensors.first().map_or(0, |t| t.sources.len());
        if tensors.iter().any(|t| t.sources.len() != n_sources) {
            return Err(Error::invalid(
                "materialize: streamed tensors differ in their number of sources",
            ));
        }
        let max_bytes = tensors
            .iter()
            .map(|t| t.m * t.n * t.dtype.size())
            .max()
            .unwrap_or(0);
        let copy = self
            .ctx
            .new_stream()
            .map_err(|e| cuda_err("creating the copy stream", e))?;
        let mut slots: [Vec<CudaSlice<u8>>; 2] = [vec![], vec![]];
        for slot in &mut slots {
            for _ in 0..n_sources {
                slot.push(self.alloc_bytes(max_bytes)?);
            }
        }
        let scratch = self.scratch(tensors.iter().map(|t| (t.m, t.n, rank_of(&t.factors))))?;
        let bytes = tensors
            .iter()
            .map(|t| placed_bytes(t.sources.len(), t.dtype, t.m, t.n, &t.factors))
            .sum();
        Ok(CudaSources {
            placed: Placed::Streamed(tensors, Staging { copy, slots }),
            scratch,
            bytes,
        })
    }

    /// [`crate::backend::Backend::place_sources`]: resident when the sources fit in free
    /// device memory with the reserve left over, else streamed.
    pub(super) fn place(
        &self,
        tensors: Vec<TensorSources>,
        placement: Placement,
    ) -> Result<CudaSources> {
        let need: usize = tensors.iter().map(|t| t.bytes()).sum();
        let resident = match placement {
            Placement::Resident => true,
            Placement::Streamed => false,
            Placement::Auto { reserve_bytes } => {
                let (free, _) = self.memory()?;
                need.saturating_add(reserve_bytes) <= free
            }
        };
        if resident {
            let placed = tensors
                .iter()
                .map(|t| self.resident_tensor(t))
                .collect::<Result<_>>()?;
            self.resident_sources(placed)
        } else {
            let placed = tensors
                .iter()
                .map(|t| self.streamed_tensor(t))
                .collect::<Result<_>>()?;
            self.streamed_sources(placed)
        }
    }

    /// Writes a child into `outs` (one per placed tensor, in order): resident sources are read
    /// in place; streamed ones overlap each tensor's host-to-device copy with the previous
    /// tensor's compute.
    pub fn materialize_placed(
        &self,
        outs: &mut [&mut CudaWeight],
        sources: &mut CudaSources,
        coefs: &[TensorCoefficients],
    ) -> Result<()> {
        crate::backend::materialize::check_counts(outs.len(), coefs.len(), sources.len())?;
        let CudaSources {
            placed, scratch, ..
        } = sources;
        match placed {
            Placed::Resident(tensors) => {
                for ((t, out), coef) in tensors.iter().zip(outs.iter_mut()).zip(coefs) {
                    check_output(out, t.base.dtype, t.m, t.n)?;
                    let guards: Vec<_> = std::iter::once(&t.base)
                        .chain(&t.experts)
                        .map(|w| w.data.device_ptr(&self.stream))
                        .collect();
                    let ptrs: Vec<u64> = guards.iter().map(|g| g.0).collect();
                    let (o, _go) = out.data.device_ptr_mut(&self.stream);
                    self.fused(
                        o,
                        t.base.dtype,
                        &ptrs,
                        coef,
                        t.factors.as_ref(),
                        scratch,
                        t.m,
                        t.n,
                    )?;
                }
                Ok(())
            }
            Placed::Streamed(tensors, staging) => {
                self.materialize_streamed(outs, tensors, staging, scratch, coefs)
            }
        }
    }

    fn materialize_streamed(
        &self,
        outs: &mut [&mut CudaWeight],
        tensors: &[StreamedTensor],
        staging: &mut Staging,
        scratch: &mut Scratch,
        coefs: &[TensorCoefficients],
    ) -> Result<()> {
        let mut computed: [Option<CudaEvent>; 2] = [None, None];
        for (i, ((t, out), coef)) in tensors.iter().zip(outs.iter_mut()).zip(coefs).enumerate() {
            check_output(out, t.dtype, t.m, t.n)?;
            let slot = i % 2;
            // The copy into this slot waits for the compute that last read it.
            if let Some(ev) = &computed[slot] {
                staging
                    .copy
                    .wait(ev)
                    .map_err(|e| cuda_err("stream wait", e))?;
            }
            let bytes = t.m * t.n * t.dtype.size();
            for (src, dst) in t.sources.iter().zip(staging.slots[slot].iter_mut()) {
                let mut view = dst.slice_mut(..bytes);
                staging
                    .copy
                    .memcpy_htod(src, &mut view)
                    .map_err(|e| cuda_err("host-to-device copy", e))?;
            }
            let copied = staging
                .copy
                .record_event(None)
                .map_err(|e| cuda_err("recording an event", e))?;
            self.stream
                .wait(&copied)
                .map_err(|e| cuda_err("stream wait", e))?;
            {
                let guards: Vec<_> = staging.slots[slot]
                    .iter()
                    .map(|s| s.device_ptr(&self.stream))
                    .collect();
                let ptrs: Vec<u64> = guards.iter().map(|g| g.0).collect();
                let (o, _go) = out.data.device_ptr_mut(&self.stream);
                self.fused(
                    o,
                    t.dtype,
                    &ptrs,
                    coef,
                    t.factors.as_ref(),
                    scratch,
                    t.m,
                    t.n,
                )?;
            }
            computed[slot] = Some(
                self.stream
                    .record_event(None)
                    .map_err(|e| cuda_err("recording an event", e))?,
            );
        }
        Ok(())
    }

    /// The [`crate::backend::Backend::materialize`] entry: host sources in, host weights out
    /// (uploads, computes, downloads). The placed sources avoid the copies.
    pub(super) fn materialize_host(
        &self,
        out: &mut [u8],
        out_dtype: DType,
        src: &TensorSources,
        coef: &TensorCoefficients,
    ) -> Result<()> {
        src.check()?;
        src.check_call(out.len(), out_dtype, coef)?;
        // Sources and output share one dtype on the device.
        if src.base.dtype != out_dtype {
            return Err(Error::tensor(
                &src.name,
                format!(
                    "materialize: a {} output from {} sources (CUDA keeps one dtype)",
                    out_dtype, src.base.dtype
                ),
            ));
        }
        let mut sources = self.resident_sources(vec![self.resident_tensor(src)?])?;
        let mut w = CudaWeight {
            dtype: out_dtype,
            shape: vec![src.m, src.n],
            data: self.alloc_bytes(out.len())?,
        };
        self.materialize_placed(&mut [&mut w], &mut sources, std::slice::from_ref(coef))?;
        self.stream
            .memcpy_dtoh(&w.data.slice(..out.len()), out)
            .map_err(|e| cuda_err("downloading the weight", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronising the stream", e))
    }

    /// The low-rank GEMM tile by tile, each followed by the fused pass over that tile's rows.
    #[allow(clippy::too_many_arguments)]
    fn fused(
        &self,
        out: u64,
        dtype: DType,
        sources: &[u64],
        coef: &TensorCoefficients,
        factors: Option<&DeviceFactors>,
        scratch: &mut Scratch,
        m: usize,
        n: usize,
    ) -> Result<()> {
        let a = &coef.a;
        if sources.len() > MAX_SOURCES || sources.len() != a.len() + 1 {
            return Err(Error::invalid(format!(
                "materialize: {} sources for {} coefficients (at most {MAX_SOURCES} sources)",
                sources.len(),
                a.len()
            )));
        }
        // Source 0 is the base with coefficient 1 − Σ a_e; sources 1.. are the experts.
        let source_coefs: Vec<f32> = std::iter::once(1.0 - a.iter().sum::<f32>())
            .chain(a.iter().copied())
            .collect();
        let expected_k = factors.map_or(0, |f| f.k);
        if coef.c.len() != expected_k {
            return Err(Error::invalid(format!(
                "materialize: {} low-rank coefficients for rank {expected_k}",
                coef.c.len(),
            )));
        }
        let tile_rows = match factors {
            Some(_) => self.tile_rows(m, n),
            None => m.max(1),
        };
        // U·diag(c), once per tensor, into the scratch.
        if let Some(f) = factors {
            if scratch.us.len() < m * f.k
                || scratch.coef.len() < f.k
                || scratch.tile.len() < tile_rows * n
            {
                return Err(Error::invalid(
                    "materialize: scratch smaller than the tensor (sources placed for another model?)",
                ));
            }
            let mut coef_view = scratch.coef.slice_mut(..f.k);
            self.stream
                .memcpy_htod(&coef.c[..], &mut coef_view)
                .map_err(|e| cuda_err("uploading coefficients", e))?;
            let l = launch::scale_columns(m, f.k)?;
            let (usp, _gus) = scratch.us.device_ptr_mut(&self.stream);
            let (up, _gu) = f.u.device_ptr(&self.stream);
            let (cp, _gc) = scratch.coef.device_ptr(&self.stream);
            // SAFETY: u and us hold at least m·K values, coef K.
            unsafe { self.run(&l, &[usp, up, cp])? };
        }
        for r0 in (0..m).step_by(tile_rows) {
            let rows = tile_rows.min(m - r0);
            let lr_ptr = match factors {
                Some(f) => {
                    let (tp, _gt) = scratch.tile.device_ptr_mut(&self.stream);
                    let (up, _gu) = scratch.us.device_ptr(&self.stream);
                    let (vp, _gv) = f.vt.device_ptr(&self.stream);
                    let precision = if dtype == DType::BF16 {
                        Precision::Tf32
                    } else {
                        Precision::F32
                    };
                    // SAFETY: tile holds rows·n, us rows·K from row r0, vt K·n.
                    unsafe {
                        self.gemm_f32(
                            tp,
                            up + (r0 * f.k * 4) as u64,
                            vp,
                            rows,
                            n,
                            f.k,
                            0.0,
                            precision,
                        )?
                    };
                    tp
                }
                None => 0,
            };
            let l = launch::materialize(dtype, &source_coefs, rows * n, r0 * n, lr_ptr != 0)?;
            let bufs: Vec<u64> = [out, lr_ptr]
                .into_iter()
                .chain(sources.iter().copied())
                .collect();
            // SAFETY: every pointer addresses rows·n elements from row r0 (null tile: none).
            unsafe { self.run(&l, &bufs)? };
        }
        Ok(())
    }
}

/// The concatenated rank `K` of a tensor's placed factors (0 without).
fn rank_of(f: &Option<DeviceFactors>) -> usize {
    f.as_ref().map_or(0, |f| f.k)
}

/// Bytes a placed tensor holds: `sources` weights of `dtype` and its f32 factors.
fn placed_bytes(
    sources: usize,
    dtype: DType,
    m: usize,
    n: usize,
    f: &Option<DeviceFactors>,
) -> usize {
    sources * m * n * dtype.size() + rank_of(f) * (m + n) * 4
}

/// An output weight of `m·n` elements of `dtype`.
fn check_output(out: &CudaWeight, dtype: DType, m: usize, n: usize) -> Result<()> {
    if out.dtype != dtype || out.numel() != m * n {
        return Err(Error::invalid(format!(
            "materialize: output weight {} {:?} does not match a {m}×{n} tensor of {dtype}",
            out.dtype, out.shape
        )));
    }
    Ok(())
}
