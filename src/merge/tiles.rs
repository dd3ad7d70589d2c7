//! Streaming over a tensor's elements in tiles, in parallel: each tile of every input is upcast
//! to f32 into thread-local buffers, so memory stays a few tiles per thread whatever the tensor
//! size, and the inputs are read by positioned reads into per-thread windows (cheaper than
//! faulting their maps for bytes read once or twice: `model::window`). Methods are written as
//! passes: reductions (norms, dot products, histograms), then one output pass that rounds each
//! tile to the output dtype and hands it to a sink.

use rayon::prelude::*;

use crate::error::Result;
use crate::model::{dtype, DType, HostTensor};

use super::methods::Sink;

/// Elements per tile: 16 Ki × 4 B = 64 KiB per f32 buffer, so a tile's inputs and output stay
/// in L2 between the upcast and the arithmetic.
pub const TILE: usize = 1 << 14;
/// Tiles per task and per sink call (1 Mi elements: 2–4 MB of output): per-tile writes from
/// several threads would contend on the output file's lock.
const TILES_PER_CHUNK: usize = 64;

pub fn upcast_range(t: &HostTensor, lo: usize, hi: usize, dst: &mut [f32]) {
    let s = t.dtype.size();
    t.with_stream_bytes(lo * s, hi * s, |bytes| dtype::to_f32(t.dtype, bytes, dst));
}

/// Tile `tile`'s element range.
pub fn range(n: usize, tile: usize) -> (usize, usize) {
    (tile * TILE, ((tile + 1) * TILE).min(n))
}

/// Runs `f(first element, input tiles, out tile)` over every tile and sinks the results
/// rounded to `out_dtype`.
pub fn output(
    n: usize,
    inputs: &[&HostTensor],
    out_dtype: DType,
    sink: &Sink,
    f: impl Fn(usize, &[&[f32]], &mut [f32]) + Sync,
) -> Result<()> {
    let m = inputs.len();
    let chunk = TILE * TILES_PER_CHUNK;
    (0..n.div_ceil(chunk)).into_par_iter().try_for_each_init(
        || (vec![0.0f32; TILE * (m + 1)], Vec::with_capacity(chunk * 4)),
        |(buf, bytes), c| {
            bytes.clear();
            let first = c * TILES_PER_CHUNK;
            for tile in first..(first + TILES_PER_CHUNK).min(n.div_ceil(TILE)) {
                let (lo, hi) = range(n, tile);
                let len = hi - lo;
                let (ins, out) = buf.split_at_mut(TILE * m);
                for (i, t) in inputs.iter().enumerate() {
                    upcast_range(t, lo, hi, &mut ins[i * TILE..i * TILE + len]);
                }
                let xs: Vec<&[f32]> = (0..m).map(|i| &ins[i * TILE..i * TILE + len]).collect();
                f(lo, &xs, &mut out[..len]);
                dtype::from_f32_into(out_dtype, &out[..len], bytes);
            }
            sink(c * chunk * out_dtype.size(), bytes)
        },
    )
}

/// Sinks `input`'s bytes as they are (a merge that changes nothing), in the chunks of
/// [`output`].
pub fn copy(input: &HostTensor, sink: &Sink) -> Result<()> {
    let chunk = TILE * TILES_PER_CHUNK * input.dtype.size();
    let len = input.data().len();
    (0..len.div_ceil(chunk)).into_par_iter().try_for_each(|c| {
        let (lo, hi) = (c * chunk, ((c + 1) * chunk).min(len));
        input.with_stream_bytes(lo, hi, |part| sink(lo, part))
    })
}

/// Folds every tile of `inputs` into an accumulator per thread (`fold(acc, first element,
/// input tiles)`) and combines them. Floating-point sums should accumulate in f64: the order
/// of the tiles differs from run to run.
pub fn reduce<A: Send>(
    n: usize,
    inputs: &[&HostTensor],
    init: impl Fn() -> A + Sync + Send,
    fold: impl Fn(&mut A, usize, &[&[f32]]) + Sync + Send,
    combine: impl Fn(A, A) -> A + Sync + Send,
) -> A {
    let m = inputs.len();
    (0..n.div_ceil(TILE))
        .into_par_iter()
        .fold(
            || (init(), vec![0.0f32; TILE * m]),
            |(mut acc, mut buf), tile| {
                let (lo, hi) = range(n, tile);
                let len = hi - lo;
                for (i, t) in inputs.iter().enumerate() {
                    upcast_range(t, lo, hi, &mut buf[i * TILE..i * TILE + len]);
                }
                let xs: Vec<&[f32]> = (0..m).map(|i| &buf[i * TILE..i * TILE + len]).collect();
                fold(&mut acc, lo, &xs);
                (acc, buf)
            },
        )
        .map(|(acc, _)| acc)
        .reduce(&init, combine)
}

/// Element-wise sums of equal-length vectors (the `combine` of a vector accumulator).
pub fn add_vecs(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    a
}
