//! The CPU backend: rayon over rows/heads/weight blocks, f32 accumulation. It is the reference
//! every other backend's kernels are checked against, and the backend CI and most machines run.

#[cfg(target_arch = "x86_64")]
pub mod amx;
mod attention;
mod kv;
mod materialize;
mod matmul;
mod panels;

use rayon::prelude::*;

use std::sync::Arc;

use super::materialize::{Placement, TensorCoefficients, TensorSources};
use super::{checks, AttentionGeometry, Backend};
use crate::error::{Error, Result};
use crate::merge::methods::{merge_tensor, MergeOp, Sink};
use crate::model::{dtype, DType, HostTensor, TensorBytes};
use crate::simd::{dot, exp, widest_simd};

pub use attention::attention;
pub use kv::KvBuf;
pub use materialize::materialize;
pub use matmul::{
    matmul_t, matmul_t_group, matmul_t_group_with, matmul_t_isa, matmul_t_with, Isa, Precision,
    Product, MAX_GROUP,
};

/// The rayon CPU backend (uses the global thread pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

widest_simd! {
    /// `g ← silu(g) · u`, silu(g) = g / (1 + e⁻ᵍ).
    fn silu_mul(g: &mut [f32], u: &[f32]) {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

/// Rows per rayon task for cheap element-wise row ops: enough work to amortise scheduling.
const ROW_CHUNK: usize = 8;

impl Backend for CpuBackend {
    const HOST_COMPUTE: bool = true;

    type Weight = HostTensor;
    type Buf = Vec<f32>;
    type KvBuf = KvBuf;
    type Sources = Vec<TensorSources>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_weight(&self, t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }

    fn zeros_weight(&self, shape: &[usize], dtype: DType) -> Result<HostTensor> {
        let bytes = checked_numel(shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::invalid(format!("a {shape:?} weight overflows memory sizes")))?;
        check_memory("a weight", bytes)?;
        Ok(HostTensor {
            dtype,
            shape: shape.to_vec(),
            bytes: TensorBytes::Owned(Arc::new(vec![0u8; bytes])),
        })
    }

    fn download_weight(&self, w: &HostTensor) -> Result<HostTensor> {
        Ok(w.clone())
    }

    fn check_room(&self, what: &str, bytes: usize) -> Result<()> {
        check_memory(what, bytes)
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        let bytes = len
            .checked_mul(4)
            .ok_or_else(|| Error::invalid(format!("a buffer of {len} values overflows sizes")))?;
        check_memory("a buffer", bytes)?;
        Ok(vec![0.0; len])
    }

    fn upload(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        check_len("upload", dst.len(), src.len())?;
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&self, dst: &mut [f32], src: &Vec<f32>) -> Result<()> {
        check_len("download", src.len(), dst.len())?;
        dst.copy_from_slice(&src[..dst.len()]);
        Ok(())
    }

    fn embedding(
        &self,
        out: &mut Vec<f32>,
        table: &HostTensor,
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        check_len("embedding", out.len(), ids.len() * dim)?;
        let vocab = checks::rows_of(table.numel(), dim);
        checks::embedding(ids, vocab)?;
        if dim == 0 {
            return Ok(());
        }
        let esize = table.dtype.size();
        let data = table.data();
        for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::invalid(format!(
                    "token id {id} is out of range (vocab size {vocab})"
                )));
            }
            dtype::to_f32(
                table.dtype,
                &data[id * dim * esize..(id + 1) * dim * esize],
                row,
            );
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        weight: &HostTensor,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("rms_norm", out.len().min(x.len()), rows * dim)?;
        checks::rms_norm(weight.numel(), dim)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let w = weight.to_f32();
        out[..rows * dim]
            .par_chunks_mut(dim * ROW_CHUNK)
            .zip(x[..rows * dim].par_chunks(dim * ROW_CHUNK))
            .for_each(|(o, xi)| {
                for (orow, xrow) in o.chunks_exact_mut(dim).zip(xi.chunks_exact(dim)) {
                    rms_norm_row(orow, xrow, &w, eps);
                }
            });
        Ok(())
    }

    fn matmul_t(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &HostTensor,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        check_product(out, x, w, rows, n, k)?;
        matmul_t(out, x, w, rows, n, k);
        Ok(())
    }

    fn matmul_t_shared(
        &self,
        outs: &mut [&mut Vec<f32>],
        x: &Vec<f32>,
        ws: &[&HostTensor],
        ns: &[usize],
        rows: usize,
        k: usize,
    ) -> Result<()> {
        checks::shared_products(outs.len(), ws.len(), ns.len())?;
        for ((out, w), &n) in outs.iter().zip(ws).zip(ns) {
            check_product(out, x, w, rows, n, k)?;
        }
        if outs.len() > MAX_GROUP {
            for ((out, w), &n) in outs.iter_mut().zip(ws).zip(ns) {
                matmul_t(out, x, w, rows, n, k);
            }
        } else {
            let group = outs
                .iter_mut()
                .zip(ws)
                .zip(ns)
                .map(|((out, &w), &n)| Product {
                    out: out.as_mut_slice(),
                    w,
                    n,
                });
            matmul_t_group(group, x, rows, k);
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        let width = heads * head_dim;
        check_len("rope", x.len(), positions.len() * width)?;
        checks::rope(inv_freq.len(), head_dim)?;
        if width == 0 || head_dim < 2 {
            return Ok(());
        }
        let half = head_dim / 2;
        x[..positions.len() * width]
            .par_chunks_mut(width)
            .zip(positions.par_iter())
            .for_each_init(
                || (vec![0.0f32; half], vec![0.0f32; half]),
                |(cos, sin), (row, &pos)| {
                    for i in 0..half {
                        // torch computes the angle in f32 before cos/sin: do the same.
                        let angle = inv_freq[i] * pos as f32;
                        cos[i] = angle.cos();
                        sin[i] = angle.sin();
                    }
                    for h in row.chunks_exact_mut(head_dim) {
                        let (a, b) = h.split_at_mut(half);
                        for i in 0..half {
                            let (x1, x2) = (a[i], b[i]);
                            a[i] = x1 * cos[i] - x2 * sin[i];
                            b[i] = x2 * cos[i] + x1 * sin[i];
                        }
                    }
                },
            );
        Ok(())
    }

    /// bf16 where this process computes the K projection's products in bf16 (what
    /// transformers keeps for a bf16 model), f32 otherwise.
    fn kv_dtype(&self, k_proj: &HostTensor) -> DType {
        let isa = Isa::current().unwrap_or_else(|_| Isa::detect());
        if Precision::current().uses_bf16(k_proj.dtype, isa) {
            DType::BF16
        } else {
            DType::F32
        }
    }

    fn kv_zeros(&self, len: usize, dtype: DType) -> Result<KvBuf> {
        let bytes = len.checked_mul(dtype.size()).ok_or_else(|| {
            Error::invalid(format!("a KV buffer of {len} values overflows sizes"))
        })?;
        check_memory("a KV buffer", bytes)?;
        KvBuf::zeros(len, dtype)
    }

    fn kv_upload(&self, dst: &mut KvBuf, src: &[f32]) -> Result<()> {
        check_len("kv_upload", dst.len(), src.len())?;
        dst.store(0, src);
        Ok(())
    }

    fn kv_download(&self, dst: &mut [f32], src: &KvBuf) -> Result<()> {
        check_len("kv_download", src.len(), dst.len())?;
        src.load(0, dst);
        Ok(())
    }

    fn kv_store(
        &self,
        cache: &mut KvBuf,
        src: &Vec<f32>,
        slots: &[u32],
        positions: &[u32],
        max_seq: usize,
        width: usize,
    ) -> Result<()> {
        check_len("kv_store src", src.len(), slots.len() * width)?;
        checks::kv_store(slots, positions, max_seq)?;
        if let Some(&s) = slots.iter().max() {
            check_len(
                "kv_store cache",
                cache.len(),
                checks::kv_store_len(&[s], max_seq, width),
            )?;
        }
        for (i, (&s, &p)) in slots.iter().zip(positions).enumerate() {
            let (s, p) = (s as usize, p as usize);
            let at = (s * max_seq + p) * width;
            check_len("kv_store cache", cache.len(), at + width)?;
            cache.store(at, &src[i * width..(i + 1) * width]);
        }
        Ok(())
    }

    fn attention(
        &self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        k_cache: &KvBuf,
        v_cache: &KvBuf,
        slots: &[u32],
        positions: &[u32],
        geom: AttentionGeometry,
    ) -> Result<()> {
        let width = geom.num_heads * geom.head_dim;
        check_len("attention out", out.len().min(q.len()), slots.len() * width)?;
        checks::attention(slots, positions, geom)?;
        let cache = checks::kv_cache_len(slots, geom);
        check_len("attention k_cache", k_cache.len(), cache)?;
        check_len("attention v_cache", v_cache.len(), cache)?;
        if width == 0 {
            return Ok(());
        }
        match (k_cache, v_cache) {
            (KvBuf::F32(k), KvBuf::F32(v)) => {
                attention(out, q, k, v, slots, positions, geom);
            }
            (KvBuf::Bf16(k), KvBuf::Bf16(v)) => {
                attention(out, q, k, v, slots, positions, geom);
            }
            (k, v) => {
                return Err(Error::invalid(format!(
                    "attention: a {:?} key cache with a {:?} value cache",
                    k.dtype(),
                    v.dtype()
                )))
            }
        }
        Ok(())
    }

    fn swiglu(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        check_len("swiglu", gate.len().min(up.len()), len)?;
        gate[..len]
            .par_chunks_mut(4096)
            .zip(up[..len].par_chunks(4096))
            .for_each(|(g, u)| silu_mul(g, u));
        Ok(())
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        check_len("add_assign", x.len().min(y.len()), len)?;
        x[..len]
            .par_chunks_mut(4096)
            .zip(y[..len].par_chunks(4096))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        Ok(())
    }

    fn gather_rows(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        rows: &[u32],
        width: usize,
    ) -> Result<()> {
        check_len("gather_rows", out.len(), rows.len() * width)?;
        if width == 0 {
            return Ok(());
        }
        for (o, &r) in out.chunks_exact_mut(width).zip(rows) {
            let r = r as usize;
            check_len("gather_rows x", x.len(), (r + 1) * width)?;
            o.copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn argmax_rows(
        &self,
        out: &mut [u32],
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        check_len("argmax_rows", logits.len(), rows * vocab)?;
        check_len("argmax_rows out", out.len(), rows)?;
        checks::argmax_rows(rows, vocab)?;
        // A decode step's rows (64 × 32k logits at the demo's batch) on every core.
        out[..rows]
            .par_iter_mut()
            .zip(logits.par_chunks_exact(vocab.max(1)))
            .for_each(|(o, row)| *o = crate::llama::logits::argmax(row));
        Ok(())
    }

    fn random_weight(
        &self,
        shape: &[usize],
        dtype: DType,
        seed: u64,
        scale: f32,
    ) -> Result<HostTensor> {
        let values = crate::synth::hash_values(shape.iter().product(), seed, scale);
        Ok(HostTensor::from_f32(&values, shape.to_vec(), dtype))
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
        merge_tensor(name, op, base, models, out_dtype, sink)
    }

    fn place_sources(
        &self,
        tensors: Vec<TensorSources>,
        _placement: Placement,
    ) -> Result<Vec<TensorSources>> {
        // The host is where the sources already are: the views are kept as they are.
        tensors.iter().try_for_each(TensorSources::check)?;
        Ok(tensors)
    }

    fn describe_sources(&self, sources: &Vec<TensorSources>) -> String {
        let bytes: usize = sources.iter().map(TensorSources::bytes).sum();
        format!(
            "host memory ({} tensors, {:.2} GB mapped and factors)",
            sources.len(),
            bytes as f64 / 1e9
        )
    }

    fn materialize_into(
        &self,
        outs: &mut [&mut HostTensor],
        sources: &mut Vec<TensorSources>,
        coefs: &[TensorCoefficients],
    ) -> Result<()> {
        crate::backend::materialize::check_counts(outs.len(), coefs.len(), sources.len())?;
        for ((out, src), coef) in outs.iter_mut().zip(sources.iter()).zip(coefs) {
            if out.numel() != src.numel() {
                return Err(Error::tensor(
                    &src.name,
                    format!("materialize: output of shape {:?}", out.shape),
                ));
            }
            let dtype = out.dtype;
            let bytes = unique_bytes(out);
            src.check_call(bytes.len(), dtype, coef)?;
            materialize(bytes, dtype, src, coef);
        }
        Ok(())
    }

    fn materialize(
        &self,
        out: &mut [u8],
        out_dtype: DType,
        src: &TensorSources,
        coef: &TensorCoefficients,
    ) -> Result<()> {
        src.check()?;
        src.check_call(out.len(), out_dtype, coef)?;
        materialize(out, out_dtype, src, coef);
        Ok(())
    }
}

/// The bytes of an owned weight, to write in place. A buffer still shared (a clone handed to
/// an export, a model built over the previous child) or mapped from a file is replaced, never
/// written under its other holders.
fn unique_bytes(w: &mut HostTensor) -> &mut [u8] {
    let len = w.data().len();
    if !matches!(&w.bytes, TensorBytes::Owned(a) if Arc::strong_count(a) == 1 && Arc::weak_count(a) == 0)
    {
        w.bytes = TensorBytes::Owned(Arc::new(vec![0u8; len]));
    }
    match &mut w.bytes {
        TensorBytes::Owned(a) => Arc::get_mut(a).expect("unique after the check above"),
        TensorBytes::Mapped { .. } => unreachable!("replaced by an owned buffer above"),
    }
}

/// Refuses an allocation of `bytes` that the machine cannot give (an error naming the need and
/// what is available, where allocating would abort the process). Small allocations are not
/// checked: reading the memory figures costs more than they do.
pub fn check_memory(what: &str, bytes: usize) -> Result<()> {
    const CHECKED_FROM: usize = 256 << 20;
    if bytes < CHECKED_FROM {
        return Ok(());
    }
    match available_memory() {
        Some(avail) if bytes as u64 > avail => Err(Error::invalid(format!(
            "{what} of {:.2} GB is needed and {:.2} GB of memory is available",
            bytes as f64 / 1e9,
            avail as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes (Linux; `None` elsewhere).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `Π shape`, or an error when it overflows.
fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::invalid(format!("a tensor of shape {shape:?} overflows sizes")))
}

widest_simd! {
    /// One row of RMSNorm, as transformers' LlamaRMSNorm computes it in f32 (the sum of
    /// squares in 16 lanes: a single running sum was a chain of dependent scalar adds, 1–2% of
    /// a prefill).
    pub fn rms_norm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        let ss = dot(x, x) / x.len() as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// The buffers and weight of one `matmul_t` fit `[rows, k] · [n, k]ᵀ`.
fn check_product(
    out: &[f32],
    x: &[f32],
    w: &HostTensor,
    rows: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    check_len("matmul_t out", out.len(), rows * n)?;
    check_len("matmul_t x", x.len(), rows * k)?;
    checks::matmul_weight(&w.shape, w.numel(), n, k)
}

fn check_len(op: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::invalid(format!(
            "{op}: buffer holds {have} values, needs {need}"
        )));
    }
    Ok(())
}
