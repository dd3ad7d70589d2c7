//! The backend seam: the only code that knows which device computes.
//!
//! Algorithm code (`llama/`, `evolve/`, `eval/`, `qd/`) is written once against [`Backend`].
//! `cpu` (rayon, f32 accumulation) is the reference every other backend is checked against.
//! Conventions: outputs first, shapes explicit, f32 activations, weights in their storage dtype;
//! host-side index arrays (token ids, KV slots, positions) are passed as slices and uploaded by
//! the backend if it needs them on the device.

pub mod checks;
pub mod cpu;
pub mod cuda;
pub mod materialize;

use crate::error::Result;
use crate::merge::methods::{MergeOp, Sink};
use crate::model::{DType, HostTensor};

pub use materialize::{LowRankFactors, Placement, TensorCoefficients, TensorSources};

/// Geometry of one attention call over a paged-by-slot KV cache.
///
/// The cache of one layer is `[slots, max_seq, num_kv_heads * head_dim]`; query row `i` belongs
/// to sequence slot `slots[i]` at position `positions[i]` and attends to cache positions
/// `0..=positions[i]` of its slot (causal; rows of one slot may be several prefill tokens).
#[derive(Clone, Copy, Debug)]
pub struct AttentionGeometry {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_seq: usize,
}

/// Runs `f`, a loop of `B`'s operations, where they compute best. A host backend's operations
/// are rayon loops: started from a thread outside rayon's pool, each is injected into the pool
/// and waited for (a sleep and a wake-up per loop, which on a small model costs more than the
/// loop); started on a pool thread, they run there and only split. Elsewhere `f` just runs.
pub fn on_compute_threads<B: Backend, T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if B::HOST_COMPUTE && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

pub trait Backend: Send + Sync {
    /// A weight tensor resident where this backend computes, in its storage dtype.
    type Weight: Send + Sync;
    /// An f32 buffer (activations) resident where this backend computes.
    type Buf: Send + Sync;
    /// One layer's keys or values, resident where this backend computes, in the dtype
    /// [`Backend::kv_dtype`] chose.
    type KvBuf: Send + Sync;
    /// A model's materialisation sources, placed where this backend computes
    /// ([`Backend::place_sources`]).
    type Sources: Send;

    /// Whether this backend computes on the host's cores (rayon's threads).
    const HOST_COMPUTE: bool = false;

    /// Human-readable device name (`cpu (2 threads)`, `cuda:0 NVIDIA H100`).
    fn name(&self) -> String;

    /// Makes a weight tensor available to kernels (zero-copy on the CPU).
    fn upload_weight(&self, t: &HostTensor) -> Result<Self::Weight>;
    /// A zero-filled weight: a child's weights, allocated once and rewritten in place by
    /// [`Backend::materialize_into`].
    fn zeros_weight(&self, shape: &[usize], dtype: DType) -> Result<Self::Weight>;
    /// A weight's contents on the host (zero-copy on the CPU), to export a child.
    fn download_weight(&self, w: &Self::Weight) -> Result<HostTensor>;
    /// A zero-filled buffer of `len` f32.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// Copies `src` into the start of `dst`.
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    /// Copies the first `dst.len()` values of `src` to the host.
    fn download(&self, dst: &mut [f32], src: &Self::Buf) -> Result<()>;

    /// `out[i, :] = table[ids[i], :]`; table `[vocab, dim]`, out `[ids.len(), dim]`.
    fn embedding(
        &self,
        out: &mut Self::Buf,
        table: &Self::Weight,
        ids: &[u32],
        dim: usize,
    ) -> Result<()>;
    /// Row-wise RMSNorm: `out = x / sqrt(mean(x²) + eps) * weight`; x, out `[rows, dim]`.
    fn rms_norm(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        weight: &Self::Weight,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · wᵀ` with `w` `[n, k]` (the nn.Linear layout).
    fn matmul_t(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()>;
    /// Several [`Backend::matmul_t`]s of one input (q/k/v, gate/up): `outs[i][rows, ns[i]] =
    /// x · ws[i]ᵀ`. Backends that can run them as one parallel region or launch override this;
    /// the results are those of the single products.
    #[allow(clippy::too_many_arguments)]
    fn matmul_t_shared(
        &self,
        outs: &mut [&mut Self::Buf],
        x: &Self::Buf,
        ws: &[&Self::Weight],
        ns: &[usize],
        rows: usize,
        k: usize,
    ) -> Result<()> {
        checks::shared_products(outs.len(), ws.len(), ns.len())?;
        for ((out, w), &n) in outs.iter_mut().zip(ws).zip(ns) {
            self.matmul_t(out, x, w, rows, n, k)?;
        }
        Ok(())
    }
    /// Rotary embedding in place (rotate-half convention) on `x` `[positions.len(), heads, head_dim]`.
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()>;
    /// The dtype a KV cache holds for a model whose K projection is `k_proj` (a checkpoint's
    /// V projection has its dtype): f32 unless the backend computes that weight's products in
    /// a narrower type.
    fn kv_dtype(&self, k_proj: &Self::Weight) -> DType;
    /// A zero-filled KV buffer of `len` values of `dtype` (one [`Backend::kv_dtype`] gave).
    fn kv_zeros(&self, len: usize, dtype: DType) -> Result<Self::KvBuf>;
    /// Copies `src` into the start of `dst`, rounded to its dtype.
    fn kv_upload(&self, dst: &mut Self::KvBuf, src: &[f32]) -> Result<()>;
    /// Copies the first `dst.len()` values of `src` to the host, as f32.
    fn kv_download(&self, dst: &mut [f32], src: &Self::KvBuf) -> Result<()>;
    /// `cache[slots[i], positions[i], :] = src[i, :]`; rows of `width` values, rounded to
    /// the cache's dtype.
    fn kv_store(
        &self,
        cache: &mut Self::KvBuf,
        src: &Self::Buf,
        slots: &[u32],
        positions: &[u32],
        max_seq: usize,
        width: usize,
    ) -> Result<()>;
    /// Causal GQA attention of query rows `q` `[rows, num_heads * head_dim]` over the caches;
    /// out has q's shape. See [`AttentionGeometry`].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::KvBuf,
        v_cache: &Self::KvBuf,
        slots: &[u32],
        positions: &[u32],
        geom: AttentionGeometry,
    ) -> Result<()>;
    /// SwiGLU in place: `gate = silu(gate) * up` over `len` values.
    fn swiglu(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize) -> Result<()>;
    /// `x += y` over `len` values.
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// `out[i, :] = x[rows[i], :]`; rows of `width` values.
    fn gather_rows(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        rows: &[u32],
        width: usize,
    ) -> Result<()>;

    /// Refuses, with an error naming the need, an allocation of `bytes` that this device's
    /// memory cannot hold (rather than let the allocation abort the process).
    fn check_room(&self, _what: &str, _bytes: usize) -> Result<()> {
        Ok(())
    }

    /// Waits until every queued operation has finished (timing; a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// `out[r] = argmax_j logits[r, j]` (first index on ties), for greedy decoding without
    /// copying whole logit rows to the host.
    fn argmax_rows(
        &self,
        out: &mut [u32],
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
    ) -> Result<()>;

    /// A `shape` weight of `dtype` with element `i` = `(2·hash_uniform(seed, i) − 1)·scale`
    /// (see [`crate::synth::hash_uniform`]): benchmark models made where they run.
    fn random_weight(
        &self,
        shape: &[usize],
        dtype: DType,
        seed: u64,
        scale: f32,
    ) -> Result<Self::Weight>;

    /// Merges one tensor from host inputs (see [`crate::merge::methods`]), handing the result
    /// to `sink` in `out_dtype`, piece by piece.
    fn merge(
        &self,
        name: &str,
        op: &MergeOp,
        base: Option<&HostTensor>,
        models: &[&HostTensor],
        out_dtype: DType,
        sink: &Sink,
    ) -> Result<()>;

    /// Places the sources of every tensor of a model where this backend computes, once per
    /// run (the CPU keeps views; CUDA uploads them or pins them, see [`Placement`]). Checks
    /// every tensor's sources.
    fn place_sources(
        &self,
        tensors: Vec<TensorSources>,
        placement: Placement,
    ) -> Result<Self::Sources>;

    /// How `sources` were placed, for the log (`host`, `resident, 1.2 GB`, …).
    fn describe_sources(&self, sources: &Self::Sources) -> String;

    /// Writes a child into `outs` in place, without allocating: `outs[i]` receives placed
    /// tensor `i` (its shape, in the base's dtype) with coefficients `coefs[i]`.
    fn materialize_into(
        &self,
        outs: &mut [&mut Self::Weight],
        sources: &mut Self::Sources,
        coefs: &[TensorCoefficients],
    ) -> Result<()>;

    /// One tensor of a child into host memory: `out` holds `m·n` elements of `out_dtype`
    /// (export and the final table).
    fn materialize(
        &self,
        out: &mut [u8],
        out_dtype: DType,
        src: &TensorSources,
        coef: &TensorCoefficients,
    ) -> Result<()>;
}
