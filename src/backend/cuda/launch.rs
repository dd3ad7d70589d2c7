//! One launch description per op: the kernel, its grid, block, shared memory and the packing of
//! its arguments, computed once here and executed by whoever runs kernels — the cudarc launch
//! of [`super::CudaBackend`] on a GPU, and the software device of the test suite (the kernels
//! compiled as host C++ under sanitizers) on any machine. Both therefore run the geometry the
//! GPU gets, not a copy of it. Pure functions of shapes and host index arrays, which they check
//! with [`crate::backend::checks`] (the CPU backend's checks too).
//!
//! A description names its buffers by position (each function documents its list); pointer
//! arguments are `(buffer, byte offset)`.

use crate::backend::{checks, AttentionGeometry};
use crate::error::{Error, Result};
use crate::model::DType;

/// Threads per block of the element-wise and row kernels (`THREADS` in the sources).
pub const THREADS: u32 = 256;
/// Batches of up to this many rows use the matvec kernel; larger ones go to cuBLAS.
pub const MATVEC_MAX_ROWS: usize = 32;
/// Rows per matvec launch (`MATVEC_ROWS` in llama.cu).
pub const MATVEC_GROUP: usize = 8;
/// Warps per attention block (`ATT_WARPS`) and the largest head_dim it serves.
pub const ATTENTION_THREADS: u32 = 128;
pub const MAX_HEAD_DIM: usize = 256;
/// `MAX_SOURCES` in materialize.cu.
pub const MAX_SOURCES: usize = 16;

/// One kernel argument, as the kernel's parameter list takes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A pointer into buffer `buf`, `offset` bytes in.
    Buf {
        buf: usize,
        offset: usize,
    },
    U32(u32),
    U64(u64),
    F32(f32),
    /// A struct passed by value, with the byte offsets of its pointer fields.
    Struct {
        bytes: Vec<u8>,
        pointers: Vec<StructPointer>,
    },
}

/// A pointer field of a struct argument: at byte `at`, into buffer `buf` at `offset` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StructPointer {
    pub at: usize,
    pub buf: usize,
    pub offset: usize,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The `kernels/<module>.cu` file.
    pub module: &'static str,
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
}

fn buf(buf: usize) -> Arg {
    Arg::Buf { buf, offset: 0 }
}

/// The kernel-name suffix of a storage dtype.
pub fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// A grid-stride launch over `len` items: enough blocks to fill an H100/H200, no more.
fn grid_stride(len: usize) -> ([u32; 3], [u32; 3]) {
    let blocks = len.div_ceil(THREADS as usize).clamp(1, 132 * 16) as u32;
    ([blocks, 1, 1], [THREADS, 1, 1])
}

/// One block of `THREADS` per row.
fn per_row(rows: usize) -> ([u32; 3], [u32; 3]) {
    ([rows.max(1) as u32, 1, 1], [THREADS, 1, 1])
}

fn launch(
    module: &'static str,
    kernel: String,
    (grid, block): ([u32; 3], [u32; 3]),
    args: Vec<Arg>,
) -> Launch {
    Launch {
        module,
        kernel,
        grid,
        block,
        shared_bytes: 0,
        args,
    }
}

fn small(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(format!("{op}: {what} {v} exceeds 2³²")))
}

/// `out[r, :] = table[ids[r], :]`. Buffers: `[out, table, ids]`. Ids must be below `vocab`.
pub fn embedding(dtype: DType, ids: &[u32], vocab: usize, dim: usize) -> Result<Option<Launch>> {
    checks::embedding(ids, vocab)?;
    if ids.is_empty() || dim == 0 {
        return Ok(None);
    }
    Ok(Some(launch(
        "llama",
        format!("embedding_{}", dtype_suffix(dtype)),
        per_row(ids.len()),
        vec![
            buf(0),
            buf(1),
            buf(2),
            Arg::U32(small("embedding", "dim", dim)?),
        ],
    )))
}

/// Row-wise RMSNorm. Buffers: `[out, x, weight]`.
pub fn rms_norm(
    dtype: DType,
    rows: usize,
    dim: usize,
    eps: f32,
    weight_len: usize,
) -> Result<Option<Launch>> {
    checks::rms_norm(weight_len, dim)?;
    if rows == 0 || dim == 0 {
        return Ok(None);
    }
    Ok(Some(launch(
        "llama",
        format!("rms_norm_{}", dtype_suffix(dtype)),
        per_row(rows),
        vec![
            buf(0),
            buf(1),
            buf(2),
            Arg::U32(small("rms_norm", "dim", dim)?),
            Arg::F32(eps),
        ],
    )))
}

/// `out[rows, n] = x[rows, k] · wᵀ` for `rows ≤ MATVEC_MAX_ROWS`, one launch per group of
/// `MATVEC_GROUP` rows (each reads `w` once). Buffers: `[out (f32), x (f32), w]`.
pub fn matvec(dtype: DType, rows: usize, n: usize, k: usize) -> Result<Vec<Launch>> {
    if rows > MATVEC_MAX_ROWS {
        return Err(Error::invalid(format!(
            "matvec: {rows} rows, at most {MATVEC_MAX_ROWS} (larger batches are GEMMs)"
        )));
    }
    if rows == 0 || n == 0 || k == 0 {
        return Ok(vec![]);
    }
    let warps_per_block = (THREADS / 32) as usize;
    let geometry = (
        [small("matvec", "n", n.div_ceil(warps_per_block))?, 1, 1],
        [THREADS, 1, 1],
    );
    let (n32, k32) = (small("matvec", "n", n)?, small("matvec", "k", k)?);
    Ok((0..rows)
        .step_by(MATVEC_GROUP)
        .map(|r0| {
            let g = MATVEC_GROUP.min(rows - r0);
            launch(
                "llama",
                format!("matvec_{}", dtype_suffix(dtype)),
                geometry,
                vec![
                    Arg::Buf {
                        buf: 0,
                        offset: r0 * n * 4,
                    },
                    Arg::Buf {
                        buf: 1,
                        offset: r0 * k * 4,
                    },
                    buf(2),
                    Arg::U32(g as u32),
                    Arg::U32(n32),
                    Arg::U32(k32),
                ],
            )
        })
        .collect())
}

/// f32 activations rounded to `dtype`. Buffers: `[out, x]`.
pub fn cast_from_f32(dtype: DType, len: usize) -> Launch {
    launch(
        "llama",
        format!("cast_from_f32_{}", dtype_suffix(dtype)),
        grid_stride(len),
        vec![buf(0), buf(1), Arg::U64(len as u64)],
    )
}

/// Rotate-half RoPE in place. Buffers: `[x, positions, inv_freq]`.
pub fn rope(
    rows: usize,
    heads: usize,
    head_dim: usize,
    inv_freq_len: usize,
) -> Result<Option<Launch>> {
    checks::rope(inv_freq_len, head_dim)?;
    if rows == 0 || heads == 0 || head_dim < 2 {
        return Ok(None);
    }
    Ok(Some(launch(
        "llama",
        "rope".into(),
        (
            [
                small("rope", "rows", rows)?,
                small("rope", "heads", heads)?,
                1,
            ],
            [small("rope", "head_dim", head_dim / 2)?, 1, 1],
        ),
        vec![
            buf(0),
            buf(1),
            Arg::U32(heads as u32),
            Arg::U32(head_dim as u32),
            buf(2),
        ],
    )))
}

/// `cache[slots[i], positions[i], :] = src[i, :]`. Buffers: `[cache, src, slots, positions]`.
/// Positions must be below `max_seq`, and no two rows may write one cache row (their order on
/// a GPU is not defined).
pub fn kv_store(
    slots: &[u32],
    positions: &[u32],
    max_seq: usize,
    width: usize,
) -> Result<Option<Launch>> {
    checks::kv_store(slots, positions, max_seq)?;
    if slots.is_empty() || width == 0 {
        return Ok(None);
    }
    Ok(Some(launch(
        "llama",
        "kv_store".into(),
        per_row(slots.len()),
        vec![
            buf(0),
            buf(1),
            buf(2),
            buf(3),
            Arg::U32(small("kv_store", "max_seq", max_seq)?),
            Arg::U32(small("kv_store", "width", width)?),
        ],
    )))
}

/// Causal GQA attention. Buffers: `[out, q, k_cache, v_cache, slots, positions]`.
pub fn attention(
    slots: &[u32],
    positions: &[u32],
    geom: AttentionGeometry,
) -> Result<Option<Launch>> {
    checks::attention(slots, positions, geom)?;
    if geom.head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid(format!(
            "attention: head_dim {} (CUDA supports head_dim ≤ {MAX_HEAD_DIM})",
            geom.head_dim
        )));
    }
    if slots.is_empty() || geom.num_heads == 0 || geom.head_dim == 0 {
        return Ok(None);
    }
    let nh = small("attention", "heads", geom.num_heads)?;
    Ok(Some(launch(
        "llama",
        "attention".into(),
        (
            [small("attention", "rows", slots.len())?, nh, 1],
            [ATTENTION_THREADS, 1, 1],
        ),
        vec![
            buf(0),
            buf(1),
            buf(2),
            buf(3),
            buf(4),
            buf(5),
            Arg::U32(nh),
            Arg::U32(geom.num_kv_heads as u32),
            Arg::U32(geom.head_dim as u32),
            Arg::U32(small("attention", "max_seq", geom.max_seq)?),
        ],
    )))
}

/// `swiglu` or `add_assign`: `x = f(x, y)` over `len` values. Buffers: `[x, y]`.
pub fn elementwise(kernel: &'static str, len: usize) -> Option<Launch> {
    (len > 0).then(|| {
        launch(
            "llama",
            kernel.into(),
            grid_stride(len),
            vec![buf(0), buf(1), Arg::U64(len as u64)],
        )
    })
}

/// `out[i, :] = x[rows[i], :]`. Buffers: `[out, x, rows]`.
pub fn gather_rows(rows: usize, width: usize) -> Result<Option<Launch>> {
    if rows == 0 || width == 0 {
        return Ok(None);
    }
    Ok(Some(launch(
        "llama",
        "gather_rows".into(),
        per_row(rows),
        vec![
            buf(0),
            buf(1),
            buf(2),
            Arg::U32(small("gather_rows", "width", width)?),
        ],
    )))
}

/// `out[r] = argmax_j logits[r, j]` (NaN counts as the largest value and the first maximum
/// wins, as in torch and numpy). Buffers: `[out (u32), logits]`.
pub fn argmax_rows(rows: usize, vocab: usize) -> Result<Option<Launch>> {
    checks::argmax_rows(rows, vocab)?;
    if rows == 0 {
        return Ok(None);
    }
    Ok(Some(launch(
        "llama",
        "argmax_rows".into(),
        ([small("argmax_rows", "rows", rows)?, 1, 1], [1024, 1, 1]),
        vec![
            buf(0),
            buf(1),
            Arg::U32(small("argmax_rows", "vocab", vocab)?),
        ],
    )))
}

/// Deterministic pseudo-random weights. Buffers: `[out]`.
pub fn fill_random(dtype: DType, len: usize, seed: u64, scale: f32) -> Launch {
    launch(
        "llama",
        format!("fill_random_{}", dtype_suffix(dtype)),
        grid_stride(len),
        vec![
            buf(0),
            Arg::U64(len as u64),
            Arg::U64(seed),
            Arg::F32(scale),
        ],
    )
}

/// `out[i, k] = u[i, k] · coef[k]` over a row-major `[rows, cols]` matrix. Buffers:
/// `[out, u, coef]`.
pub fn scale_columns(rows: usize, cols: usize) -> Result<Launch> {
    Ok(launch(
        "materialize",
        "scale_columns".into(),
        grid_stride(rows * cols),
        vec![
            buf(0),
            buf(1),
            buf(2),
            Arg::U64(rows as u64),
            Arg::U32(small("scale_columns", "cols", cols)?),
        ],
    ))
}

/// The fused weighted sum over `len` elements from element `offset` of every source and the
/// output: `out = Σ_s coefs[s]·source_s (+ tile)`. Buffers: `[out, tile, source 0, source 1,
/// …]` (`tile`, the low-rank product's f32 rows from its start, only when `low_rank`; the
/// sources follow it either way at buffer 2).
pub fn materialize(
    dtype: DType,
    coefs: &[f32],
    len: usize,
    offset: usize,
    low_rank: bool,
) -> Result<Launch> {
    if coefs.is_empty() || coefs.len() > MAX_SOURCES {
        return Err(Error::invalid(format!(
            "materialize: {} sources (1 to {MAX_SOURCES} on CUDA)",
            coefs.len()
        )));
    }
    // struct Sources { const void* ptr[16]; float coef[16]; int count; } (200 bytes).
    let mut bytes = vec![0u8; sources_struct_size()];
    for (i, c) in coefs.iter().enumerate() {
        let at = 8 * MAX_SOURCES + 4 * i;
        bytes[at..at + 4].copy_from_slice(&c.to_le_bytes());
    }
    let at = 12 * MAX_SOURCES;
    bytes[at..at + 4].copy_from_slice(&(coefs.len() as i32).to_le_bytes());
    let esize = dtype.size();
    let pointers = (0..coefs.len())
        .map(|s| StructPointer {
            at: 8 * s,
            buf: 2 + s,
            offset: offset * esize,
        })
        .collect();
    let (grid, block) = grid_stride(len / 8 + 1);
    Ok(Launch {
        module: "materialize",
        kernel: format!("materialize_{}", dtype_suffix(dtype)),
        grid,
        block,
        shared_bytes: 0,
        args: vec![
            Arg::Buf {
                buf: 0,
                offset: offset * esize,
            },
            Arg::Struct { bytes, pointers },
            if low_rank { buf(1) } else { Arg::U64(0) },
            Arg::U64(len as u64),
        ],
    })
}

/// The byte size of materialize.cu's `struct Sources` (16 pointers, 16 floats, an int, padded
/// to the pointers' alignment).
pub const fn sources_struct_size() -> usize {
    (8 * MAX_SOURCES + 4 * MAX_SOURCES + 4).div_ceil(8) * 8
}

/// Every kernel the descriptions above launch, by module: what a software device or a loaded
/// GPU module must provide (checked by the tests).
pub fn kernel_names() -> Vec<(&'static str, String)> {
    let mut v = vec![];
    for d in [DType::F32, DType::F16, DType::BF16] {
        let s = dtype_suffix(d);
        for k in [
            "embedding",
            "rms_norm",
            "matvec",
            "cast_from_f32",
            "fill_random",
        ] {
            v.push(("llama", format!("{k}_{s}")));
        }
        v.push(("materialize", format!("materialize_{s}")));
    }
    for k in [
        "rope",
        "kv_store",
        "attention",
        "swiglu",
        "add_assign",
        "gather_rows",
        "argmax_rows",
    ] {
        v.push(("llama", k.to_string()));
    }
    v.push(("materialize", "scale_columns".to_string()));
    v
}
