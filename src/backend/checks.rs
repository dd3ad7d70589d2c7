//! The argument checks every backend makes before an op, one function per op, so the CPU
//! reference refuses exactly what the CUDA kernels refuse (an error naming the op and the
//! values, never a panic or an out-of-bounds write). Buffer sizes are the backends' own (they
//! know their buffers); these are the checks of shapes and host index arrays.

use super::AttentionGeometry;
use crate::error::{Error, Result};

/// Rows of `dim` values in a table of `numel` values (0 for `dim == 0`).
pub fn rows_of(numel: usize, dim: usize) -> usize {
    numel.checked_div(dim).unwrap_or(0)
}

/// Every token id is below `vocab`.
pub fn embedding(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::invalid(format!(
            "token id {id} is out of range (vocab size {vocab})"
        )));
    }
    Ok(())
}

/// One weight per value of a row.
pub fn rms_norm(weight_len: usize, dim: usize) -> Result<()> {
    if weight_len != dim {
        return Err(Error::invalid(format!(
            "rms_norm: weight of {weight_len} values for rows of {dim}"
        )));
    }
    Ok(())
}

/// A `matmul_t` weight holds exactly `[n, k]`.
pub fn matmul_weight(shape: &[usize], numel: usize, n: usize, k: usize) -> Result<()> {
    if numel != n * k {
        return Err(Error::invalid(format!(
            "matmul_t: weight of shape {shape:?} used as [{n}, {k}]"
        )));
    }
    Ok(())
}

/// A group of products sharing one input names one output and one width per weight.
pub fn shared_products(outs: usize, weights: usize, widths: usize) -> Result<()> {
    if outs != weights || widths != weights {
        return Err(Error::invalid(format!(
            "matmul_t_shared: {outs} outputs, {weights} weights and {widths} widths"
        )));
    }
    Ok(())
}

/// One inverse frequency per rotated pair.
pub fn rope(inv_freq_len: usize, head_dim: usize) -> Result<()> {
    if inv_freq_len < head_dim / 2 {
        return Err(Error::invalid(format!(
            "rope: {inv_freq_len} inverse frequencies for head_dim {head_dim}"
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

fn positions_below(op: &str, positions: &[u32], max_seq: usize) -> Result<()> {
    if let Some(&p) = positions.iter().find(|&&p| p as usize >= max_seq) {
        return Err(Error::invalid(format!(
            "{op}: position {p} is past the KV cache length {max_seq}"
        )));
    }
    Ok(())
}

/// One position per slot, every position inside the cache, and no two rows writing one cache
/// row (their order on a GPU is not defined).
pub fn kv_store(slots: &[u32], positions: &[u32], max_seq: usize) -> Result<()> {
    same_len("kv_store", slots, positions)?;
    positions_below("kv_store", positions, max_seq)?;
    let mut rows: Vec<(u32, u32)> = slots
        .iter()
        .copied()
        .zip(positions.iter().copied())
        .collect();
    rows.sort_unstable();
    if let Some(w) = rows.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::invalid(format!(
            "kv_store: two rows write slot {} position {} (which one lands is undefined)",
            w[0].0, w[0].1
        )));
    }
    Ok(())
}

/// Heads that group evenly over the KV heads, one position per slot inside the cache.
pub fn attention(slots: &[u32], positions: &[u32], geom: AttentionGeometry) -> Result<()> {
    same_len("attention", slots, positions)?;
    if geom.num_kv_heads == 0 || !geom.num_heads.is_multiple_of(geom.num_kv_heads) {
        return Err(Error::invalid(format!(
            "attention: {} heads over {} KV heads",
            geom.num_heads, geom.num_kv_heads
        )));
    }
    positions_below("attention", positions, geom.max_seq)
}

/// The values a KV cache of `slots` needs for `geom`'s slot `max(slots)`.
pub fn kv_cache_len(slots: &[u32], geom: AttentionGeometry) -> usize {
    kv_len(slots, &[geom.max_seq, geom.num_kv_heads, geom.head_dim])
}

/// The values a KV cache needs to hold slot `max(slots)` of `max_seq` rows of `width`.
pub fn kv_store_len(slots: &[u32], max_seq: usize, width: usize) -> usize {
    kv_len(slots, &[max_seq, width])
}

/// `(max(slots) + 1) · Π dims` (0 without slots), or `usize::MAX` where that overflows, which
/// no cache holds: the caller's length check then refuses the call instead of a wrapped
/// product letting a kernel address memory past the cache.
fn kv_len(slots: &[u32], dims: &[usize]) -> usize {
    slots.iter().max().map_or(0, |&s| {
        dims.iter()
            .try_fold(s as usize + 1, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX)
    })
}

/// Rows of logits need at least one logit each.
pub fn argmax_rows(rows: usize, vocab: usize) -> Result<()> {
    if rows > 0 && vocab == 0 {
        return Err(Error::invalid("argmax_rows: rows of zero logits"));
    }
    Ok(())
}
