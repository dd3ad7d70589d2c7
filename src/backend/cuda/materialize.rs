//! GPU materialisation: `θ = (1 − Σ a_e)·θ_b + Σ a_e·θ_e + U·diag(c)·Vᵀ` per tensor, with the
//! experts' factors concatenated (`U` `[m, K]`, `Vᵀ` `[K, n]`, `K = Σ r_e`) so the low-rank
//! term is one GEMM. The GEMM runs a few rows at a time into an f32 tile small enough to stay
//! in L2, and the fused kernel (`kernels/materialize.cu`) reads the sources once, adds the tile
//! and rounds once into the output weight.
//!
//! Two modes: **resident** (sources in device memory: a read of every source per child) and
//! **streamed** (sources in pinned host memory, copied tensor by tensor into two staging sets on
//! a copy stream while the previous tensor computes); the caller picks one from free memory
//! ([`CudaBackend::memory`]), as `bench` does.

use cudarc::driver::{
    CudaEvent, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};

use super::gemm::Precision;
use super::{cuda_err, dtype_suffix, grid_stride, CudaBackend, CudaWeight};
use crate::error::{Error, Result};
use crate::evolve::materialize::{check_shapes, LowRank};
use crate::model::{DType, HostTensor};

/// Largest f32 low-rank tile: read back by the fused pass while it is still in L2 (50 MB on
/// H100, 60 MB on H200).
const TILE_BYTES: usize = 16 << 20;
/// `MAX_SOURCES` in materialize.cu.
const MAX_SOURCES: usize = 16;

/// The kernel's `Sources` struct, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct Sources {
    ptr: [u64; MAX_SOURCES],
    coef: [f32; MAX_SOURCES],
    count: i32,
}

// SAFETY: plain old data with the C layout of `struct Sources` in materialize.cu.
unsafe impl DeviceRepr for Sources {}

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

/// `U` `[m, Σr]` and `Vᵀ` `[Σr, n]` concatenated over the experts' low-rank terms.
fn concat_factors(
    low_rank: &[(&[f32], &[f32], usize)],
    m: usize,
    n: usize,
) -> (Vec<f32>, Vec<f32>, usize) {
    let k: usize = low_rank.iter().map(|l| l.2).sum();
    let mut u = Vec::with_capacity(m * k);
    for i in 0..m {
        for &(ue, _, r) in low_rank {
            u.extend_from_slice(&ue[i * r..(i + 1) * r]);
        }
    }
    let mut vt = Vec::with_capacity(k * n);
    for &(_, vte, r) in low_rank {
        vt.extend_from_slice(&vte[..r * n]);
    }
    (u, vt, k)
}

/// Every source is `[m, n]` of the base's dtype.
fn check_sources(base: &HostTensor, experts: &[&HostTensor], m: usize, n: usize) -> Result<()> {
    if base.numel() != m * n
        || experts
            .iter()
            .any(|x| x.numel() != m * n || x.dtype != base.dtype)
    {
        return Err(Error::invalid(format!(
            "materialize: sources do not all hold a {m}×{n} tensor of {}",
            base.dtype
        )));
    }
    if experts.len() + 1 > MAX_SOURCES {
        return Err(Error::invalid(format!(
            "materialize: {} experts, at most {} on CUDA",
            experts.len(),
            MAX_SOURCES - 1
        )));
    }
    Ok(())
}

impl CudaBackend {
    fn upload_factors(
        &self,
        low_rank: &[(&[f32], &[f32], usize)],
        m: usize,
        n: usize,
    ) -> Result<Option<DeviceFactors>> {
        // Rank-0 terms contribute nothing (and cuBLAS refuses k = 0).
        let terms: Vec<_> = low_rank.iter().copied().filter(|t| t.2 > 0).collect();
        if terms.is_empty() {
            return Ok(None);
        }
        if terms
            .iter()
            .any(|&(u, vt, r)| u.len() < m * r || vt.len() < r * n)
        {
            return Err(Error::invalid(format!(
                "materialize: factors shorter than their rank for a {m}×{n} tensor"
            )));
        }
        let (u, vt, k) = concat_factors(&terms, m, n);
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

    /// Uploads one tensor's sources and factors (`(U [m, r], Vᵀ [r, n], r)` per expert).
    pub fn resident_tensor(
        &self,
        base: &HostTensor,
        experts: &[&HostTensor],
        low_rank: &[(&[f32], &[f32], usize)],
        m: usize,
        n: usize,
    ) -> Result<ResidentTensor> {
        use crate::backend::Backend;
        check_sources(base, experts, m, n)?;
        Ok(ResidentTensor {
            base: self.upload_weight(base)?,
            experts: experts
                .iter()
                .map(|x| self.upload_weight(x))
                .collect::<Result<_>>()?,
            factors: self.upload_factors(low_rank, m, n)?,
            m,
            n,
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

    /// Copies one tensor's sources into pinned host memory for the streamed mode.
    pub fn streamed_tensor(
        &self,
        base: &HostTensor,
        experts: &[&HostTensor],
        low_rank: &[(&[f32], &[f32], usize)],
        m: usize,
        n: usize,
    ) -> Result<StreamedTensor> {
        check_sources(base, experts, m, n)?;
        let mut sources = vec![];
        for t in std::iter::once(base).chain(experts.iter().copied()) {
            // SAFETY: the pinned buffer is fully written below before any read.
            let mut p = unsafe { self.ctx.alloc_pinned::<u8>(t.data().len().max(1)) }
                .map_err(|e| cuda_err("allocating pinned host memory", e))?;
            p.as_mut_slice()
                .map_err(|e| cuda_err("pinned host memory", e))?[..t.data().len()]
                .copy_from_slice(t.data());
            sources.push(p);
        }
        Ok(StreamedTensor {
            dtype: base.dtype,
            sources,
            factors: self.upload_factors(low_rank, m, n)?,
            m,
            n,
        })
    }

    /// Materialises a resident tensor into `out` (same shape and dtype as the base).
    /// `coef` is `γ − a·S` concatenated over the experts (length `K`).
    pub fn materialize_resident(
        &self,
        out: &mut CudaWeight,
        t: &ResidentTensor,
        a: &[f32],
        coef: &[f32],
    ) -> Result<()> {
        if out.dtype != t.base.dtype || out.numel() != t.m * t.n {
            return Err(Error::invalid(
                "materialize: output weight does not match the tensor",
            ));
        }
        let stream = &self.stream;
        let guards: Vec<_> = std::iter::once(&t.base)
            .chain(&t.experts)
            .map(|w| w.data.device_ptr(stream))
            .collect();
        let ptrs: Vec<u64> = guards.iter().map(|g| g.0).collect();
        let (o, _go) = out.data.device_ptr_mut(stream);
        self.fused(o, out.dtype, &ptrs, a, t.factors.as_ref(), coef, t.m, t.n)
    }

    /// Materialises streamed tensors into `outs` (one per tensor), overlapping each tensor's
    /// host-to-device copy with the previous tensor's compute. `genes[i]` = (a, coef).
    pub fn materialize_streamed(
        &self,
        outs: &mut [CudaWeight],
        tensors: &[StreamedTensor],
        genes: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<()> {
        if outs.len() != tensors.len() || genes.len() != tensors.len() {
            return Err(Error::invalid(
                "materialize_streamed: outputs, tensors and genes differ in number",
            ));
        }
        let Some(first) = tensors.first() else {
            return Ok(());
        };
        let n_sources = first.sources.len();
        let max_bytes = tensors
            .iter()
            .map(|t| t.m * t.n * t.dtype.size())
            .max()
            .unwrap_or(0);
        let copy = self
            .ctx
            .new_stream()
            .map_err(|e| cuda_err("creating the copy stream", e))?;
        let mut staging: [Vec<CudaSlice<u8>>; 2] = [vec![], vec![]];
        for slot in &mut staging {
            for _ in 0..n_sources {
                slot.push(self.alloc_bytes(max_bytes)?);
            }
        }
        let mut computed: [Option<CudaEvent>; 2] = [None, None];
        for (i, (t, out)) in tensors.iter().zip(outs.iter_mut()).enumerate() {
            if t.sources.len() != n_sources || out.dtype != t.dtype || out.numel() != t.m * t.n {
                return Err(Error::invalid(
                    "materialize_streamed: tensors differ in sources, or an output does not match",
                ));
            }
            let slot = i % 2;
            // The copy into this slot waits for the compute that last read it.
            if let Some(ev) = &computed[slot] {
                copy.wait(ev).map_err(|e| cuda_err("stream wait", e))?;
            }
            let bytes = t.m * t.n * t.dtype.size();
            for (src, dst) in t.sources.iter().zip(staging[slot].iter_mut()) {
                let mut view = dst.slice_mut(..bytes);
                copy.memcpy_htod(src, &mut view)
                    .map_err(|e| cuda_err("host-to-device copy", e))?;
            }
            let copied = copy
                .record_event(None)
                .map_err(|e| cuda_err("recording an event", e))?;
            self.stream
                .wait(&copied)
                .map_err(|e| cuda_err("stream wait", e))?;
            {
                let guards: Vec<_> = staging[slot]
                    .iter()
                    .map(|s| s.device_ptr(&self.stream))
                    .collect();
                let ptrs: Vec<u64> = guards.iter().map(|g| g.0).collect();
                let (o, _go) = out.data.device_ptr_mut(&self.stream);
                let (a, coef) = &genes[i];
                self.fused(o, t.dtype, &ptrs, a, t.factors.as_ref(), coef, t.m, t.n)?;
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
    /// (uploads, computes, downloads). The resident and streamed modes avoid the copies.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn materialize_host(
        &self,
        out: &mut [u8],
        out_dtype: DType,
        base: &HostTensor,
        experts: &[&HostTensor],
        a: &[f32],
        low_rank: &[LowRank],
        m: usize,
        n: usize,
    ) -> Result<()> {
        check_shapes(out.len(), out_dtype, base, experts, m, n)?;
        // Sources and output share one dtype on the device (`resident_tensor` checks sources).
        if base.dtype != out_dtype {
            return Err(Error::invalid(format!(
                "materialize: a {} output from {} sources (CUDA keeps one dtype)",
                out_dtype, base.dtype
            )));
        }
        let factors: Vec<(&[f32], &[f32], usize)> =
            low_rank.iter().map(|l| (l.u, l.vt, l.coef.len())).collect();
        let coef: Vec<f32> = low_rank
            .iter()
            .flat_map(|l| l.coef.iter().copied())
            .collect();
        let t = self.resident_tensor(base, experts, &factors, m, n)?;
        let mut w = CudaWeight {
            dtype: out_dtype,
            shape: vec![m, n],
            data: self.alloc_bytes(out.len())?,
        };
        self.materialize_resident(&mut w, &t, a, &coef)?;
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
        a: &[f32],
        factors: Option<&DeviceFactors>,
        coef: &[f32],
        m: usize,
        n: usize,
    ) -> Result<()> {
        if sources.len() > MAX_SOURCES || sources.len() != a.len() + 1 {
            return Err(Error::invalid(format!(
                "materialize: {} sources for {} coefficients (at most {MAX_SOURCES} sources)",
                sources.len(),
                a.len()
            )));
        }
        let mut src = Sources {
            ptr: [0; MAX_SOURCES],
            coef: [0.0; MAX_SOURCES],
            count: sources.len() as i32,
        };
        src.coef[0] = 1.0 - a.iter().sum::<f32>();
        src.coef[1..=a.len()].copy_from_slice(a);
        let esize = dtype.size() as u64;
        let kernel = self.kernels.function(
            "materialize",
            &format!("materialize_{}", dtype_suffix(dtype)),
        )?;

        // U·diag(c), once per tensor.
        let scaled = match factors {
            Some(f) => {
                if coef.len() != f.k {
                    return Err(Error::invalid(format!(
                        "materialize: {} low-rank coefficients for rank {}",
                        coef.len(),
                        f.k
                    )));
                }
                let coef_d = self
                    .stream
                    .clone_htod(coef)
                    .map_err(|e| cuda_err("uploading coefficients", e))?;
                let mut us = self.alloc_f32(m * f.k)?;
                let scale = self.kernels.function("materialize", "scale_columns")?;
                let (rows, cols) = (m as u64, f.k as u32);
                let mut b = self.stream.launch_builder(&scale);
                b.arg(&mut us).arg(&f.u).arg(&coef_d).arg(&rows).arg(&cols);
                // SAFETY: u and us hold m·K values, coef K.
                unsafe { b.launch(grid_stride(m * f.k)) }
                    .map_err(|e| cuda_err("scale_columns", e))?;
                Some(us)
            }
            None => None,
        };
        let tile_rows = match factors {
            Some(_) => (TILE_BYTES / (n * 4).max(1)).clamp(1, m.max(1)),
            None => m.max(1),
        };
        let mut tile = match factors {
            Some(_) => Some(self.alloc_f32(tile_rows * n)?),
            None => None,
        };
        for r0 in (0..m).step_by(tile_rows) {
            let rows = tile_rows.min(m - r0);
            let lr_ptr = match (factors, &scaled, &mut tile) {
                (Some(f), Some(us), Some(tile)) => {
                    let (tp, _gt) = tile.device_ptr_mut(&self.stream);
                    let (up, _gu) = us.device_ptr(&self.stream);
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
                _ => 0,
            };
            let off = (r0 * n) as u64 * esize;
            let mut chunk = src;
            for (p, &base) in chunk.ptr.iter_mut().zip(sources) {
                *p = base + off;
            }
            let (dst, len) = (out + off, (rows * n) as u64);
            let cfg: LaunchConfig = grid_stride(rows * n / 8 + 1);
            let mut b = self.stream.launch_builder(&kernel);
            b.arg(&dst).arg(&chunk).arg(&lr_ptr).arg(&len);
            // SAFETY: every pointer addresses rows·n elements from row r0 (null tile: none).
            unsafe { b.launch(cfg) }.map_err(|e| cuda_err("materialize", e))?;
        }
        Ok(())
    }
}
