//! [`Backend`] for [`CudaBackend`]: each operation checks its device buffers' sizes on the host
//! (cudarc asserts on mismatches; we return errors instead), takes its launch from
//! [`super::launch`] (which checks the rest), uploads the host index arrays it is given, and
//! runs the launch on the backend's stream.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::launch::{self, MATVEC_MAX_ROWS};
use super::{cuda_err, CudaBackend, CudaBuf, CudaSources, CudaWeight};
use crate::backend::materialize::{Placement, TensorCoefficients, TensorSources};
use crate::backend::{checks, AttentionGeometry, Backend};
use crate::error::{Error, Result};
use crate::merge::methods::{merge_tensor, MergeOp, Sink};
use crate::model::{DType, HostTensor, TensorBytes};

fn buf(b: &CudaBuf, op: &str, need: usize) -> Result<()> {
    if b.len() < need {
        return Err(Error::invalid(format!(
            "{op}: device buffer holds {} values, needs {need}",
            b.len()
        )));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Buf = CudaBuf;
    /// f32: the attention and kv_store kernels read and write f32 caches.
    type KvBuf = CudaBuf;
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

    fn check_room(&self, what: &str, bytes: usize) -> Result<()> {
        let (free, _) = self.memory()?;
        if bytes > free {
            return Err(Error::invalid(format!(
                "{}: {what} of {:.2} GB is needed and {:.2} GB of device memory is free",
                self.name,
                bytes as f64 / 1e9,
                free as f64 / 1e9
            )));
        }
        Ok(())
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
        let Some(l) = launch::embedding(table.dtype, ids, vocab, dim)? else {
            return Ok(());
        };
        let ids_d = self.upload_u32(ids)?;
        let s = &self.stream;
        let (o, _go) = out.dev_mut()?.device_ptr_mut(s);
        let (t, _gt) = table.data.device_ptr(s);
        let (i, _gi) = ids_d.device_ptr(s);
        // SAFETY: out holds ids·dim values; ids are in range of the table.
        unsafe { self.run(&l, &[o, t, i]) }
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
        let Some(l) = launch::rms_norm(weight.dtype, rows, dim, eps, weight.numel())? else {
            return Ok(());
        };
        let s = &self.stream;
        let (o, _go) = out.dev_mut()?.device_ptr_mut(s);
        let (xp, _gx) = x.dev()?.device_ptr(s);
        let (w, _gw) = weight.data.device_ptr(s);
        // SAFETY: sizes checked above.
        unsafe { self.run(&l, &[o, xp, w]) }
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
        checks::matmul_weight(&w.shape, w.numel(), n, k)?;
        if rows == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        let stream = &self.stream;
        let out_d = out.dev_mut()?;
        let x_d = x.dev()?;
        if rows <= MATVEC_MAX_ROWS {
            let (o, _go) = out_d.device_ptr_mut(stream);
            let (xp, _gx) = x_d.device_ptr(stream);
            let (wp, _gw) = w.data.device_ptr(stream);
            for l in launch::matvec(w.dtype, rows, n, k)? {
                // SAFETY: out holds rows·n, x rows·k values; the weight is [n, k].
                unsafe { self.run(&l, &[o, xp, wp])? };
            }
            return Ok(());
        }
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
        let sc = scratch.as_mut().expect("allocated above");
        {
            let (cp, _gc) = sc.device_ptr_mut(stream);
            let (xp, _gx) = x_d.device_ptr(stream);
            // SAFETY: scratch holds rows·k elements of the weight dtype, x rows·k values.
            unsafe { self.run(&launch::cast_from_f32(w.dtype, rows * k), &[cp, xp])? };
        }
        let (o, _go) = out_d.device_ptr_mut(stream);
        let (xp, _gx) = sc.device_ptr(stream);
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
        let Some(l) = launch::rope(positions.len(), heads, head_dim, inv_freq.len())? else {
            return Ok(());
        };
        let pos_d = self.upload_u32(positions)?;
        let freq_d = self.freq_uploads.get(&self.stream, inv_freq)?;
        let s = &self.stream;
        let (xp, _gx) = x.dev_mut()?.device_ptr_mut(s);
        let (pp, _gp) = pos_d.device_ptr(s);
        let (fp, _gf) = freq_d.device_ptr(s);
        // SAFETY: x holds positions·heads·head_dim values, inv_freq head_dim/2.
        unsafe { self.run(&l, &[xp, pp, fp]) }
    }

    fn kv_dtype(&self, _k_proj: &CudaWeight) -> DType {
        DType::F32
    }

    fn kv_zeros(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        if dtype != DType::F32 {
            return Err(Error::invalid(format!(
                "a {dtype:?} KV cache: the CUDA kernels keep KV caches in f32"
            )));
        }
        self.zeros(len)
    }

    fn kv_upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        self.upload(dst, src)
    }

    fn kv_download(&self, dst: &mut [f32], src: &CudaBuf) -> Result<()> {
        self.download(dst, src)
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
        let Some(l) = launch::kv_store(slots, positions, max_seq, width)? else {
            return Ok(());
        };
        if let Some(&s) = slots.iter().max() {
            buf(
                cache,
                "kv_store cache",
                checks::kv_store_len(&[s], max_seq, width),
            )?;
        }
        let (slots_d, pos_d) = (self.upload_u32(slots)?, self.upload_u32(positions)?);
        let s = &self.stream;
        let (c, _gc) = cache.dev_mut()?.device_ptr_mut(s);
        let (sp, _gs) = src.dev()?.device_ptr(s);
        let (sl, _gl) = slots_d.device_ptr(s);
        let (pp, _gp) = pos_d.device_ptr(s);
        // SAFETY: every destination row is inside the cache (checked above).
        unsafe { self.run(&l, &[c, sp, sl, pp]) }
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
        buf(out, "attention out", slots.len() * width)?;
        buf(q, "attention q", slots.len() * width)?;
        let Some(l) = launch::attention(slots, positions, geom)? else {
            return Ok(());
        };
        if let Some(&s) = slots.iter().max() {
            let need = checks::kv_cache_len(&[s], geom);
            buf(k_cache, "attention k_cache", need)?;
            buf(v_cache, "attention v_cache", need)?;
        }
        let (slots_d, pos_d) = (self.upload_u32(slots)?, self.upload_u32(positions)?);
        let s = &self.stream;
        let (o, _go) = out.dev_mut()?.device_ptr_mut(s);
        let (qp, _gq) = q.dev()?.device_ptr(s);
        let (kp, _gk) = k_cache.dev()?.device_ptr(s);
        let (vp, _gv) = v_cache.dev()?.device_ptr(s);
        let (sl, _gl) = slots_d.device_ptr(s);
        let (pp, _gp) = pos_d.device_ptr(s);
        // SAFETY: q, out and both caches were bounds-checked above.
        unsafe { self.run(&l, &[o, qp, kp, vp, sl, pp]) }
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
        let Some(&r) = rows.iter().max() else {
            return Ok(());
        };
        buf(x, "gather_rows x", (r as usize + 1) * width)?;
        let Some(l) = launch::gather_rows(rows.len(), width)? else {
            return Ok(());
        };
        let rows_d = self.upload_u32(rows)?;
        let s = &self.stream;
        let (o, _go) = out.dev_mut()?.device_ptr_mut(s);
        let (xp, _gx) = x.dev()?.device_ptr(s);
        let (rp, _gr) = rows_d.device_ptr(s);
        // SAFETY: bounds checked above.
        unsafe { self.run(&l, &[o, xp, rp]) }
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
        let Some(l) = launch::argmax_rows(rows, vocab)? else {
            return Ok(());
        };
        let mut ids = self
            .stream
            .alloc_zeros::<u32>(rows)
            .map_err(|e| cuda_err("argmax_rows", e))?;
        {
            let s = &self.stream;
            let (ip, _gi) = ids.device_ptr_mut(s);
            let (lp, _gl) = logits.dev()?.device_ptr(s);
            // SAFETY: logits holds rows·vocab values, ids rows.
            unsafe { self.run(&l, &[ip, lp])? };
        }
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
    fn elementwise(
        &self,
        kernel: &'static str,
        x: &mut CudaBuf,
        y: &CudaBuf,
        len: usize,
    ) -> Result<()> {
        buf(x, kernel, len)?;
        buf(y, kernel, len)?;
        let Some(l) = launch::elementwise(kernel, len) else {
            return Ok(());
        };
        let s = &self.stream;
        let (xp, _gx) = x.dev_mut()?.device_ptr_mut(s);
        let (yp, _gy) = y.dev()?.device_ptr(s);
        // SAFETY: both buffers hold `len` values.
        unsafe { self.run(&l, &[xp, yp]) }
    }
}
