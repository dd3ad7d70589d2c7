//! [`Backend`] for [`CudaBackend`]: each operation checks its sizes on the host (cudarc asserts
//! on mismatches; we return errors instead), uploads the host index arrays it is given, and
//! launches its kernel on the backend's stream.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{
    cuda_err, dtype_suffix, grid_stride, per_row, CudaBackend, CudaBuf, CudaSources, CudaWeight,
};
use crate::backend::materialize::{Placement, TensorCoefficients, TensorSources};
use crate::backend::{AttentionGeometry, Backend};
use crate::error::{Error, Result};
use crate::merge::methods::{merge_tensor, MergeOp, Sink};
use crate::model::{DType, HostTensor, TensorBytes};

/// Batches of up to this many rows use the matvec kernel (one read of the weights per 8 rows);
/// larger ones go to cuBLAS.
const MATVEC_MAX_ROWS: usize = 32;
const MATVEC_GROUP: usize = 8;

fn buf(b: &CudaBuf, op: &str, need: usize) -> Result<()> {
    if b.len() < need {
        return Err(Error::invalid(format!(
            "{op}: device buffer holds {} values, needs {need}",
            b.len()
        )));
    }
    Ok(())
}

fn same_len(op: &str, slots: &[u32], positions: &[u32]) -> Result<()> {
    if slots.len() != positions.len() {
        return Err(Error::invalid(format!(
            "{op}: {} slots but {} positions",
            slots.len(),
            positions.len()
        )));
    }
    Ok(())
}

/// A launch's error, named by its op.
fn launch_err(op: &str, r: std::result::Result<impl Sized, impl std::fmt::Display>) -> Result<()> {
    r.map(|_| ()).map_err(|e| cuda_err(op, e))
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Buf = CudaBuf;
    type Sources = CudaSources;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload_weight(&self, t: &HostTensor) -> Result<CudaWeight> {
        let data = self
            .stream
            .clone_htod(t.data())
            .map_err(|e| cuda_err("uploading a weight", e))?;
        Ok(CudaWeight {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
        })
    }

    fn zeros_weight(&self, shape: &[usize], dtype: DType) -> Result<CudaWeight> {
        let len = shape
            .iter()
            .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("a {shape:?} weight overflows memory sizes")))?;
        Ok(CudaWeight {
            dtype,
            shape: shape.to_vec(),
            data: self.alloc_bytes(len)?,
        })
    }

    fn download_weight(&self, w: &CudaWeight) -> Result<HostTensor> {
        let len = w.numel() * w.dtype.size();
        let mut bytes = vec![0u8; len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&w.data.slice(..len), &mut bytes)
                .map_err(|e| cuda_err("downloading a weight", e))?;
            self.synchronize()?;
        }
        Ok(HostTensor {
            dtype: w.dtype,
            shape: w.shape.clone(),
            bytes: TensorBytes::Owned(std::sync::Arc::new(bytes)),
        })
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        Ok(CudaBuf {
            data: Some(self.alloc_f32(len)?),
        })
    }

    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        buf(dst, "upload", src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let d = dst.data.as_mut().expect("sized above");
        let mut view = d.slice_mut(..src.len());
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(|e| cuda_err("upload", e))
    }

    fn download(&self, dst: &mut [f32], src: &CudaBuf) -> Result<()> {
        buf(src, "download", dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let s = src.data.as_ref().expect("sized above");
        let view = s.slice(..dst.len());
        self.stream
            .memcpy_dtoh(&view, dst)
            .map_err(|e| cuda_err("download", e))?;
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronising the stream", e))
    }

    fn embedding(
        &self,
        out: &mut CudaBuf,
        table: &CudaWeight,
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        buf(out, "embedding", ids.len() * dim)?;
        let vocab = table.numel() / dim.max(1);
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {id} is out of range (vocab size {vocab})"
            )));
        }
        if ids.is_empty() || dim == 0 {
            return Ok(());
        }
        let ids_d = self.upload_u32(ids)?;
        let f = self
            .kernels
            .function("llama", &format!("embedding_{}", dtype_suffix(table.dtype)))?;
        let dim32 = dim as u32;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out.dev_mut()?)
            .arg(&table.data)
            .arg(&*ids_d)
            .arg(&dim32);
        // SAFETY: sizes checked above; ids are in range.
        launch_err("embedding", unsafe { b.launch(per_row(ids.len())) })
    }

    fn rms_norm(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        weight: &CudaWeight,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        buf(out, "rms_norm out", rows * dim)?;
        buf(x, "rms_norm x", rows * dim)?;
        if weight.numel() != dim {
            return Err(Error::invalid(format!(
                "rms_norm: weight of {} values for rows of {dim}",
                weight.numel()
            )));
        }
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let f = self
            .kernels
            .function("llama", &format!("rms_norm_{}", dtype_suffix(weight.dtype)))?;
        let dim32 = dim as u32;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out.dev_mut()?)
            .arg(x.dev()?)
            .arg(&weight.data)
            .arg(&dim32)
            .arg(&eps);
        // SAFETY: sizes checked above.
        launch_err("rms_norm", unsafe { b.launch(per_row(rows)) })
    }

    fn matmul_t(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaWeight,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        buf(out, "matmul_t out", rows * n)?;
        buf(x, "matmul_t x", rows * k)?;
        if w.numel() != n * k {
            return Err(Error::invalid(format!(
                "matmul_t: weight of shape {:?} used as [{n}, {k}]",
                w.shape
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        if n == 0 || k == 0 {
            return Ok(());
        }
        let out_d = out.dev_mut()?;
        let x_d = x.dev()?;
        if rows <= MATVEC_MAX_ROWS {
            let f = self
                .kernels
                .function("llama", &format!("matvec_{}", dtype_suffix(w.dtype)))?;
            let warps_per_block = (super::THREADS / 32) as usize;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(warps_per_block) as u32, 1, 1),
                block_dim: (super::THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            for r0 in (0..rows).step_by(MATVEC_GROUP) {
                let g = MATVEC_GROUP.min(rows - r0);
                let mut o = out_d.slice_mut(r0 * n..(r0 + g) * n);
                let xv = x_d.slice(r0 * k..(r0 + g) * k);
                let (g32, n32, k32) = (g as u32, n as u32, k as u32);
                let mut b = self.stream.launch_builder(&f);
                b.arg(&mut o)
                    .arg(&xv)
                    .arg(&w.data)
                    .arg(&g32)
                    .arg(&n32)
                    .arg(&k32);
                // SAFETY: views sized to g rows; weight is [n, k].
                launch_err("matvec", unsafe { b.launch(cfg) })?;
            }
            return Ok(());
        }
        let stream = &self.stream;
        if w.dtype == DType::F32 {
            let (o, _go) = out_d.device_ptr_mut(stream);
            let (xp, _gx) = x_d.device_ptr(stream);
            let (wp, _gw) = w.data.device_ptr(stream);
            // SAFETY: sizes checked above.
            return unsafe { self.gemm_xwt(o, xp, wp, DType::F32, rows, n, k) };
        }
        // 16-bit weights: round the activations to the weights' dtype so the GEMM runs on
        // tensor cores (as vLLM and transformers do for bf16 models), accumulate in f32.
        let mut scratch = self.cast_scratch.lock().unwrap_or_else(|p| p.into_inner());
        let need = rows * k * w.dtype.size();
        if scratch.as_ref().is_none_or(|s| s.len() < need) {
            *scratch = Some(self.alloc_bytes(need)?);
        }
        let s = scratch.as_mut().unwrap();
        let f = self
            .kernels
            .function("llama", &format!("cast_from_f32_{}", dtype_suffix(w.dtype)))?;
        let len = (rows * k) as u64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut *s).arg(x_d).arg(&len);
        // SAFETY: scratch holds rows·k elements of the weight dtype.
        launch_err("cast", unsafe { b.launch(grid_stride(rows * k)) })?;
        let (o, _go) = out_d.device_ptr_mut(stream);
        let (xp, _gx) = s.device_ptr(stream);
        let (wp, _gw) = w.data.device_ptr(stream);
        // SAFETY: sizes checked above.
        unsafe { self.gemm_xwt(o, xp, wp, w.dtype, rows, n, k) }
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        buf(x, "rope", positions.len() * heads * head_dim)?;
        if inv_freq.len() < head_dim / 2 {
            return Err(Error::invalid(format!(
                "rope: {} inverse frequencies for head_dim {head_dim}",
                inv_freq.len()
            )));
        }
        if positions.is_empty() || heads == 0 || head_dim < 2 {
            return Ok(());
        }
        let pos_d = self.upload_u32(positions)?;
        let freq_d = self.freq_uploads.get(&self.stream, inv_freq)?;
        let f = self.kernels.function("llama", "rope")?;
        let (h32, d32) = (heads as u32, head_dim as u32);
        let cfg = LaunchConfig {
            grid_dim: (positions.len() as u32, heads as u32, 1),
            block_dim: ((head_dim / 2).max(1) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(x.dev_mut()?)
            .arg(&*pos_d)
            .arg(&h32)
            .arg(&d32)
            .arg(&*freq_d);
        // SAFETY: x holds positions·heads·head_dim values.
        launch_err("rope", unsafe { b.launch(cfg) })
    }

    fn kv_store(
        &self,
        cache: &mut CudaBuf,
        src: &CudaBuf,
        slots: &[u32],
        positions: &[u32],
        max_seq: usize,
        width: usize,
    ) -> Result<()> {
        buf(src, "kv_store src", slots.len() * width)?;
        same_len("kv_store", slots, positions)?;
        for (&s, &p) in slots.iter().zip(positions) {
            if p as usize >= max_seq {
                return Err(Error::invalid(format!(
                    "position {p} is past the KV cache length {max_seq}"
                )));
            }
            buf(
                cache,
                "kv_store cache",
                (s as usize * max_seq + p as usize + 1) * width,
            )?;
        }
        if slots.is_empty() || width == 0 {
            return Ok(());
        }
        let (slots_d, pos_d) = (self.upload_u32(slots)?, self.upload_u32(positions)?);
        let f = self.kernels.function("llama", "kv_store")?;
        let (ms, w) = (max_seq as u32, width as u32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(cache.dev_mut()?)
            .arg(src.dev()?)
            .arg(&*slots_d)
            .arg(&*pos_d)
            .arg(&ms)
            .arg(&w);
        // SAFETY: every destination row was bounds-checked above.
        launch_err("kv_store", unsafe { b.launch(per_row(slots.len())) })
    }

    fn attention(
        &self,
        out: &mut CudaBuf,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        slots: &[u32],
        positions: &[u32],
        geom: AttentionGeometry,
    ) -> Result<()> {
        let width = geom.num_heads * geom.head_dim;
        same_len("attention", slots, positions)?;
        buf(out, "attention out", slots.len() * width)?;
        buf(q, "attention q", slots.len() * width)?;
        if geom.head_dim > 256
            || geom.num_kv_heads == 0
            || !geom.num_heads.is_multiple_of(geom.num_kv_heads)
        {
            return Err(Error::invalid(format!(
                "attention: {} heads over {} KV heads of dim {} (CUDA supports head_dim ≤ 256)",
                geom.num_heads, geom.num_kv_heads, geom.head_dim
            )));
        }
        let kv_width = geom.num_kv_heads * geom.head_dim;
        for &s in slots {
            buf(
                k_cache,
                "attention k_cache",
                (s as usize + 1) * geom.max_seq * kv_width,
            )?;
            buf(
                v_cache,
                "attention v_cache",
                (s as usize + 1) * geom.max_seq * kv_width,
            )?;
        }
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= geom.max_seq) {
            return Err(Error::invalid(format!(
                "attention: position {p} is past the KV cache length {}",
                geom.max_seq
            )));
        }
        if slots.is_empty() || width == 0 {
            return Ok(());
        }
        let (slots_d, pos_d) = (self.upload_u32(slots)?, self.upload_u32(positions)?);
        let f = self.kernels.function("llama", "attention")?;
        let (nh, nkv, hd, ms) = (
            geom.num_heads as u32,
            geom.num_kv_heads as u32,
            geom.head_dim as u32,
            geom.max_seq as u32,
        );
        let cfg = LaunchConfig {
            grid_dim: (slots.len() as u32, nh, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(out.dev_mut()?)
            .arg(q.dev()?)
            .arg(k_cache.dev()?)
            .arg(v_cache.dev()?)
            .arg(&*slots_d)
            .arg(&*pos_d)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&ms);
        // SAFETY: q, out and both caches were bounds-checked above.
        launch_err("attention", unsafe { b.launch(cfg) })
    }

    fn swiglu(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize) -> Result<()> {
        self.elementwise("swiglu", gate, up, len)
    }

    fn add_assign(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) -> Result<()> {
        self.elementwise("add_assign", x, y, len)
    }

    fn gather_rows(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        rows: &[u32],
        width: usize,
    ) -> Result<()> {
        buf(out, "gather_rows", rows.len() * width)?;
        if let Some(&r) = rows.iter().max() {
            buf(x, "gather_rows x", (r as usize + 1) * width)?;
        } else {
            return Ok(());
        }
        if width == 0 {
            return Ok(());
        }
        let rows_d = self.upload_u32(rows)?;
        let f = self.kernels.function("llama", "gather_rows")?;
        let w = width as u32;
        let mut b = self.stream.launch_builder(&f);
        b.arg(out.dev_mut()?).arg(x.dev()?).arg(&*rows_d).arg(&w);
        // SAFETY: bounds checked above.
        launch_err("gather_rows", unsafe { b.launch(per_row(rows.len())) })
    }

    fn argmax_rows(
        &self,
        out: &mut [u32],
        logits: &CudaBuf,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        buf(logits, "argmax_rows", rows * vocab)?;
        if out.len() < rows {
            return Err(Error::invalid("argmax_rows: output shorter than rows"));
        }
        if rows == 0 {
            return Ok(());
        }
        if vocab == 0 {
            return Err(Error::invalid("argmax_rows: rows of zero logits"));
        }
        let mut ids = self
            .stream
            .alloc_zeros::<u32>(rows)
            .map_err(|e| cuda_err("argmax_rows", e))?;
        let f = self.kernels.function("llama", "argmax_rows")?;
        let v = vocab as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut ids).arg(logits.dev()?).arg(&v);
        // SAFETY: logits holds rows·vocab values.
        launch_err("argmax_rows", unsafe { b.launch(cfg) })?;
        self.stream
            .memcpy_dtoh(&ids, &mut out[..rows])
            .map_err(|e| cuda_err("argmax_rows", e))?;
        self.synchronize()
    }

    fn random_weight(
        &self,
        shape: &[usize],
        dtype: DType,
        seed: u64,
        scale: f32,
    ) -> Result<CudaWeight> {
        CudaBackend::random_weight(self, shape, dtype, seed, scale)
    }

    fn merge(
        &self,
        name: &str,
        op: &MergeOp,
        base: Option<&HostTensor>,
        models: &[&HostTensor],
        out_dtype: DType,
        sink: &Sink,
    ) -> Result<()> {
        // Offline merges stream checkpoints from disk and are bound by it; the CPU path is the
        // one that keeps up with the disk, so the CUDA backend delegates.
        merge_tensor(name, op, base, models, out_dtype, sink)
    }

    fn place_sources(
        &self,
        tensors: Vec<TensorSources>,
        placement: Placement,
    ) -> Result<CudaSources> {
        self.place(tensors, placement)
    }

    fn describe_sources(&self, sources: &CudaSources) -> String {
        format!(
            "{} on {} ({} tensors, {:.2} GB)",
            if sources.is_resident() {
                "resident in device memory"
            } else {
                "streamed from pinned host memory"
            },
            self.name,
            sources.len(),
            sources.bytes as f64 / 1e9
        )
    }

    fn materialize_into(
        &self,
        outs: &mut [&mut CudaWeight],
        sources: &mut CudaSources,
        coefs: &[TensorCoefficients],
    ) -> Result<()> {
        self.materialize_placed(outs, sources, coefs)
    }

    fn materialize(
        &self,
        out: &mut [u8],
        out_dtype: DType,
        src: &TensorSources,
        coef: &TensorCoefficients,
    ) -> Result<()> {
        self.materialize_host(out, out_dtype, src, coef)
    }
}

impl CudaBackend {
    /// `swiglu` / `add_assign`: `x = f(x, y)` over `len` values.
    fn elementwise(&self, kernel: &str, x: &mut CudaBuf, y: &CudaBuf, len: usize) -> Result<()> {
        buf(x, kernel, len)?;
        buf(y, kernel, len)?;
        if len == 0 {
            return Ok(());
        }
        let f = self.kernels.function("llama", kernel)?;
        let len64 = len as u64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x.dev_mut()?).arg(y.dev()?).arg(&len64);
        // SAFETY: both buffers hold `len` values.
        launch_err(kernel, unsafe { b.launch(grid_stride(len)) })
    }
}
