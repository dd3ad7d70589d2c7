//! One table of kernel cases (llama.cpp's test-backend-ops is the model) and three ways to run
//! it: the CPU backend (the reference), the software device (the kernels compiled as host C++
//! under sanitizers, launched with the very descriptions `backend::cuda::launch` gives the GPU),
//! and a real GPU through `CudaBackend`'s ops. Every case is the CPU reference against one of
//! the other two, output by output, with a tolerance relative to the output's largest value;
//! a NaN where the reference has none fails, Inf must match Inf of the same sign.

use std::collections::BTreeSet;

use cycleqd_engine::backend::cuda::launch::{self, Launch};
use cycleqd_engine::backend::cuda::CudaBackend;
use cycleqd_engine::backend::{
    AttentionGeometry, Backend, LowRankFactors, TensorCoefficients, TensorSources,
};
use cycleqd_engine::model::{dtype, DType, HostTensor};
use cycleqd_engine::synth::hash_values;

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// One op with its shapes; inputs are made from the case's seed.
#[derive(Clone, Debug)]
pub enum Op {
    Embedding {
        dtype: DType,
        vocab: usize,
        dim: usize,
        ids: Vec<u32>,
    },
    RmsNorm {
        dtype: DType,
        rows: usize,
        dim: usize,
        specials: bool,
    },
    Matmul {
        dtype: DType,
        rows: usize,
        n: usize,
        k: usize,
    },
    Cast {
        dtype: DType,
        len: usize,
    },
    Rope {
        rows: usize,
        heads: usize,
        head_dim: usize,
    },
    KvStore {
        slots: Vec<u32>,
        positions: Vec<u32>,
        max_seq: usize,
        width: usize,
    },
    Attention {
        slots: Vec<u32>,
        positions: Vec<u32>,
        geom: AttentionGeometry,
        cache_slots: usize,
    },
    Elementwise {
        kernel: &'static str,
        len: usize,
        specials: bool,
    },
    Gather {
        rows: Vec<u32>,
        source_rows: usize,
        width: usize,
    },
    Argmax {
        rows: usize,
        vocab: usize,
        specials: bool,
    },
    FillRandom {
        dtype: DType,
        len: usize,
        seed: u64,
        scale: f32,
    },
    ScaleColumns {
        rows: usize,
        cols: usize,
    },
    /// One tensor, `tile_rows` rows of low-rank product at a time; `offset` elements into the
    /// buffers (an offset that breaks 16-byte alignment takes the kernel's scalar path).
    Materialize {
        dtype: DType,
        m: usize,
        n: usize,
        ranks: Vec<usize>,
        tile_rows: usize,
        offset: usize,
    },
}

pub struct Case {
    pub name: String,
    pub op: Op,
    pub seed: u64,
    /// Largest |Δ| allowed, relative to the largest reference value of an output.
    pub tol: f32,
}

/// The table: dims that are not multiples of the vector width or the block, rows across several
/// blocks and tiles, GQA with several KV heads, positions > 0, batches of several sequences,
/// 1 to 32 matvec rows, every dtype, both paths of materialise, NaN and Inf inputs.
pub fn cases() -> Vec<Case> {
    let mut v = vec![];
    let mut add = |name: String, op: Op, tol: f32| {
        let seed = 1000 + v.len() as u64 * 17;
        v.push(Case {
            name,
            op,
            seed,
            tol,
        });
    };
    for dt in DTYPES {
        add(
            format!("embedding {dt}"),
            Op::Embedding {
                dtype: dt,
                vocab: 50,
                dim: 97,
                ids: vec![3, 0, 49, 7, 7],
            },
            0.0,
        );
        for (rows, dim, specials) in [(5, 96, false), (3, 1000, false), (4, 33, true)] {
            add(
                format!(
                    "rms_norm {dt} {rows}×{dim}{}",
                    if specials { " with Inf/NaN" } else { "" }
                ),
                Op::RmsNorm {
                    dtype: dt,
                    rows,
                    dim,
                    specials,
                },
                2e-5,
            );
        }
        // 16-byte loads (k a multiple of 8) and the scalar path (k = 29); one and several
        // row groups of 8; columns that leave a block's last warps idle (n = 17).
        for (rows, n, k) in [(1, 17, 29), (5, 72, 136), (13, 17, 29), (32, 72, 136)] {
            add(
                format!("matvec {dt} {rows}×{k} · {n}×{k}ᵀ"),
                Op::Matmul {
                    dtype: dt,
                    rows,
                    n,
                    k,
                },
                1e-5,
            );
        }
        add(
            format!("cast_from_f32 {dt}"),
            Op::Cast {
                dtype: dt,
                len: 1003,
            },
            0.0,
        );
        add(
            format!("fill_random {dt}"),
            Op::FillRandom {
                dtype: dt,
                len: 561,
                seed: 9,
                scale: 0.25,
            },
            0.0,
        );
        let ranks = vec![5, 3];
        for (m, n, tile_rows, offset) in [
            (70, 48, 16, 0),
            (33, 31, 7, 0),
            (40, 24, 40, 1),
            (1, 97, 1, 0),
        ] {
            let ranks = if m == 1 { vec![] } else { ranks.clone() };
            add(
                format!("materialize {dt} {m}×{n} tiles of {tile_rows} offset {offset}"),
                Op::Materialize {
                    dtype: dt,
                    m,
                    n,
                    ranks,
                    tile_rows,
                    offset,
                },
                match dt {
                    DType::F32 => 2e-6,
                    DType::F16 => 1e-3,
                    DType::BF16 => 8e-3,
                },
            );
        }
    }
    add(
        "rope 9 rows × 6 heads × 64".into(),
        Op::Rope {
            rows: 9,
            heads: 6,
            head_dim: 64,
        },
        1e-5,
    );
    add(
        "rope 3 rows × 2 heads × 10".into(),
        Op::Rope {
            rows: 3,
            heads: 2,
            head_dim: 10,
        },
        1e-5,
    );
    // A prefill of 7 tokens in slot 1 and decode rows in slots 0 and 2 at later positions.
    let slots: Vec<u32> = [1u32; 7].into_iter().chain([0, 2]).collect();
    let positions: Vec<u32> = (0..7).chain([20, 39]).collect();
    add(
        "kv_store 9 rows into 3 slots".into(),
        Op::KvStore {
            slots: slots.clone(),
            positions: positions.clone(),
            max_seq: 40,
            width: 2 * 64,
        },
        0.0,
    );
    for (heads, kv, head_dim) in [(6, 2, 64), (4, 4, 40), (8, 1, 128)] {
        add(
            format!("attention {heads} heads over {kv} KV heads of {head_dim}"),
            Op::Attention {
                slots: slots.clone(),
                positions: positions.clone(),
                geom: AttentionGeometry {
                    num_heads: heads,
                    num_kv_heads: kv,
                    head_dim,
                    max_seq: 40,
                },
                cache_slots: 3,
            },
            1e-4,
        );
    }
    for kernel in ["swiglu", "add_assign"] {
        add(
            format!("{kernel} 1000"),
            Op::Elementwise {
                kernel,
                len: 1000,
                specials: false,
            },
            1e-6,
        );
        add(
            format!("{kernel} with Inf/NaN"),
            Op::Elementwise {
                kernel,
                len: 77,
                specials: true,
            },
            1e-6,
        );
    }
    add(
        "gather_rows".into(),
        Op::Gather {
            rows: vec![9, 0, 3, 3],
            source_rows: 10,
            width: 100,
        },
        0.0,
    );
    add(
        "argmax_rows 2 × 100".into(),
        Op::Argmax {
            rows: 2,
            vocab: 100,
            specials: false,
        },
        0.0,
    );
    add(
        "argmax_rows 2 × 5000".into(),
        Op::Argmax {
            rows: 2,
            vocab: 5000,
            specials: false,
        },
        0.0,
    );
    add(
        "argmax_rows with NaN and -Inf rows".into(),
        Op::Argmax {
            rows: 4,
            vocab: 300,
            specials: true,
        },
        0.0,
    );
    add(
        "scale_columns 37 × 9".into(),
        Op::ScaleColumns { rows: 37, cols: 9 },
        0.0,
    );
    v
}

/// `len` values; with `specials`, some are ±Inf and NaN.
fn values(len: usize, seed: u64, scale: f32, specials: bool) -> Vec<f32> {
    let mut v = hash_values(len, seed, scale);
    if specials {
        for (i, x) in v.iter_mut().enumerate() {
            match i % 11 {
                3 => *x = f32::INFINITY,
                5 => *x = f32::NEG_INFINITY,
                8 => *x = f32::NAN,
                _ => {}
            }
        }
    }
    v
}

fn weight(len: usize, seed: u64, scale: f32, dt: DType, shape: Vec<usize>) -> HostTensor {
    HostTensor::from_f32(&values(len, seed, scale, false), shape, dt)
}

fn inv_freq(head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

/// The materialise case's sources and coefficients.
fn materialize_inputs(
    dt: DType,
    m: usize,
    n: usize,
    ranks: &[usize],
    seed: u64,
) -> (TensorSources, TensorCoefficients) {
    let t = |k: u64| weight(m * n, seed + k, 0.5, dt, vec![m, n]);
    let src = TensorSources {
        name: "t".into(),
        base: t(0),
        experts: vec![t(1), t(2)],
        factors: ranks
            .iter()
            .enumerate()
            .map(|(e, &r)| LowRankFactors {
                u: hash_values(m * r, seed + 10 + e as u64, 0.3).into(),
                vt: hash_values(r * n, seed + 20 + e as u64, 0.3).into(),
                rank: r,
            })
            .collect(),
        m,
        n,
    };
    let coef = TensorCoefficients {
        a: vec![0.4, 0.7],
        c: hash_values(src.total_rank(), seed + 30, 1.0),
    };
    (src, coef)
}

/// A case's outputs: (label, values).
pub type Outputs = Vec<(String, Vec<f32>)>;

fn up<B: Backend>(be: &B, v: &[f32]) -> B::Buf {
    let mut b = be.zeros(v.len()).unwrap();
    be.upload(&mut b, v).unwrap();
    b
}

/// An f32 KV buffer holding `v` (the dtype every backend's kernels take).
fn kv_up<B: Backend>(be: &B, v: &[f32]) -> B::KvBuf {
    let mut b = be.kv_zeros(v.len(), DType::F32).unwrap();
    be.kv_upload(&mut b, v).unwrap();
    b
}

fn down<B: Backend>(be: &B, b: &B::Buf, len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    be.download(&mut out, b).unwrap();
    out
}

/// A case's inputs, made once from its seed so that every executor gets the same ones: the
/// weight of the ops that take one, and the f32 arrays in the op's order (noted per op).
struct Inputs {
    weight: Option<HostTensor>,
    data: Vec<Vec<f32>>,
}

fn inputs(case: &Case) -> Inputs {
    let s = case.seed;
    let w = |t: HostTensor| Some(t);
    let (weight, data) = match &case.op {
        Op::Embedding {
            dtype, vocab, dim, ..
        } => (
            w(weight(vocab * dim, s, 0.5, *dtype, vec![*vocab, *dim])),
            vec![],
        ),
        // [x]
        Op::RmsNorm {
            dtype,
            rows,
            dim,
            specials,
        } => (
            w(weight(*dim, s, 1.0, *dtype, vec![*dim])),
            vec![values(rows * dim, s + 1, 2.0, *specials)],
        ),
        // [x]
        Op::Matmul { dtype, rows, n, k } => (
            w(weight(n * k, s, 0.1, *dtype, vec![*n, *k])),
            vec![values(rows * k, s + 1, 1.0, false)],
        ),
        // [x]
        Op::Cast { len, .. } => (None, vec![values(*len, s, 3.0, false)]),
        // [x]
        Op::Rope {
            rows,
            heads,
            head_dim,
        } => (None, vec![values(rows * heads * head_dim, s, 1.0, false)]),
        // [cache, src]
        Op::KvStore {
            slots,
            max_seq,
            width,
            ..
        } => (
            None,
            vec![
                values(3 * max_seq * width, s, 1.0, false),
                values(slots.len() * width, s + 1, 1.0, false),
            ],
        ),
        // [q, k_cache, v_cache]
        Op::Attention {
            slots,
            geom,
            cache_slots,
            ..
        } => {
            let len = cache_slots * geom.max_seq * geom.num_kv_heads * geom.head_dim;
            (
                None,
                vec![
                    values(
                        slots.len() * geom.num_heads * geom.head_dim,
                        s + 2,
                        1.0,
                        false,
                    ),
                    values(len, s, 1.0, false),
                    values(len, s + 1, 1.0, false),
                ],
            )
        }
        // [x, y]
        Op::Elementwise { len, specials, .. } => (
            None,
            vec![
                values(*len, s, 4.0, *specials),
                values(*len, s + 1, 4.0, *specials),
            ],
        ),
        // [x]
        Op::Gather {
            source_rows, width, ..
        } => (None, vec![values(source_rows * width, s, 1.0, false)]),
        // [logits]
        Op::Argmax {
            rows,
            vocab,
            specials,
        } => (None, vec![argmax_logits(*rows, *vocab, s, *specials)]),
        // [u, coef]
        Op::ScaleColumns { rows, cols } => (
            None,
            vec![
                values(rows * cols, s, 1.0, false),
                values(*cols, s + 1, 1.0, false),
            ],
        ),
        Op::FillRandom { .. } | Op::Materialize { .. } => (None, vec![]),
    };
    Inputs { weight, data }
}

/// The positions of a RoPE case.
fn rope_positions(rows: usize) -> Vec<u32> {
    (0..rows as u32).map(|p| p * 3 + 1).collect()
}

/// The case through a backend's ops (the CPU reference, or a GPU).
pub fn on_backend<B: Backend>(be: &B, case: &Case) -> Outputs {
    let inp = inputs(case);
    let d = &inp.data;
    let weight = || {
        be.upload_weight(inp.weight.as_ref().expect("the op has a weight"))
            .unwrap()
    };
    let out = |label: &str, v: Vec<f32>| vec![(label.to_string(), v)];
    match &case.op {
        Op::Embedding { dim, ids, .. } => {
            let mut o = be.zeros(ids.len() * dim).unwrap();
            be.embedding(&mut o, &weight(), ids, *dim).unwrap();
            out("out", down(be, &o, ids.len() * dim))
        }
        Op::RmsNorm { rows, dim, .. } => {
            let mut o = be.zeros(rows * dim).unwrap();
            be.rms_norm(&mut o, &up(be, &d[0]), &weight(), *rows, *dim, 1e-5)
                .unwrap();
            out("out", down(be, &o, rows * dim))
        }
        Op::Matmul { rows, n, k, .. } => {
            let mut o = be.zeros(rows * n).unwrap();
            be.matmul_t(&mut o, &up(be, &d[0]), &weight(), *rows, *n, *k)
                .unwrap();
            out("out", down(be, &o, rows * n))
        }
        // The host's rounding (what the GPU's cast must equal before its cuBLAS GEMM).
        Op::Cast { dtype, .. } => out(
            "out",
            dtype::to_f32_vec(*dtype, &dtype::from_f32(*dtype, &d[0])),
        ),
        Op::Rope {
            rows,
            heads,
            head_dim,
        } => {
            let mut x = up(be, &d[0]);
            be.rope(
                &mut x,
                &rope_positions(*rows),
                *heads,
                *head_dim,
                &inv_freq(*head_dim),
            )
            .unwrap();
            out("x", down(be, &x, d[0].len()))
        }
        Op::KvStore {
            slots,
            positions,
            max_seq,
            width,
        } => {
            let mut cache = kv_up(be, &d[0]);
            be.kv_store(
                &mut cache,
                &up(be, &d[1]),
                slots,
                positions,
                *max_seq,
                *width,
            )
            .unwrap();
            let mut host = vec![0.0; d[0].len()];
            be.kv_download(&mut host, &cache).unwrap();
            out("cache", host)
        }
        Op::Attention {
            slots,
            positions,
            geom,
            ..
        } => {
            let mut o = be.zeros(d[0].len()).unwrap();
            let (q, k, v) = (up(be, &d[0]), kv_up(be, &d[1]), kv_up(be, &d[2]));
            be.attention(&mut o, &q, &k, &v, slots, positions, *geom)
                .unwrap();
            out("out", down(be, &o, d[0].len()))
        }
        Op::Elementwise { kernel, len, .. } => {
            let (mut x, y) = (up(be, &d[0]), up(be, &d[1]));
            match *kernel {
                "swiglu" => be.swiglu(&mut x, &y, *len).unwrap(),
                _ => be.add_assign(&mut x, &y, *len).unwrap(),
            }
            out("x", down(be, &x, *len))
        }
        Op::Gather { rows, width, .. } => {
            let mut o = be.zeros(rows.len() * width).unwrap();
            be.gather_rows(&mut o, &up(be, &d[0]), rows, *width)
                .unwrap();
            out("out", down(be, &o, rows.len() * width))
        }
        Op::Argmax { rows, vocab, .. } => {
            let mut ids = vec![0u32; *rows];
            be.argmax_rows(&mut ids, &up(be, &d[0]), *rows, *vocab)
                .unwrap();
            out("ids", ids.iter().map(|&i| i as f32).collect())
        }
        Op::FillRandom {
            dtype,
            len,
            seed,
            scale,
        } => {
            let w = be.random_weight(&[*len], *dtype, *seed, *scale).unwrap();
            // Read back as an embedding of one row: the weight's values, upcast, on any backend.
            let mut o = be.zeros(*len).unwrap();
            be.embedding(&mut o, &w, &[0], *len).unwrap();
            out("weight", down(be, &o, *len))
        }
        Op::ScaleColumns { cols, .. } => {
            let (u, c) = (&d[0], &d[1]);
            out("out", (0..u.len()).map(|i| u[i] * c[i % cols]).collect())
        }
        Op::Materialize {
            dtype, m, n, ranks, ..
        } => {
            let (src, coef) = materialize_inputs(*dtype, *m, *n, ranks, case.seed);
            let mut o = vec![0u8; m * n * dtype.size()];
            be.materialize(&mut o, *dtype, &src, &coef).unwrap();
            out("out", dtype::to_f32_vec(*dtype, &o))
        }
    }
}

/// Logits for argmax: with `specials`, row 1 holds NaNs, row 2 is all -Inf, row 3 has NaN first.
fn argmax_logits(rows: usize, vocab: usize, seed: u64, specials: bool) -> Vec<f32> {
    let mut l = values(rows * vocab, seed, 5.0, false);
    // Ties: the maximum of row 0 appears twice.
    let m = l[..vocab].iter().copied().fold(f32::MIN, f32::max);
    l[vocab - 1] = m;
    if specials {
        l[vocab + 17] = f32::NAN;
        l[vocab + 200] = f32::NAN;
        l[2 * vocab..3 * vocab]
            .iter_mut()
            .for_each(|x| *x = f32::NEG_INFINITY);
        l[3 * vocab] = f32::NAN;
    }
    l
}

/// The software device, with the kernels its launches have used.
pub struct Soft {
    pub device: softcuda::Device,
    pub used: BTreeSet<String>,
    launches: u64,
}

impl Soft {
    pub fn start() -> Soft {
        Soft {
            device: softcuda::Device::start().expect("the softcuda runner starts"),
            used: BTreeSet::new(),
            launches: 0,
        }
    }

    /// Runs a launch description over `bufs`, blocks in a shuffled order.
    pub fn run(&mut self, l: &Launch, bufs: &mut [Vec<u8>]) -> Result<(), String> {
        self.launches += 1;
        self.used.insert(l.kernel.clone());
        let args: Vec<softcuda::Arg> = l
            .args
            .iter()
            .map(|a| match a {
                launch::Arg::Buf { buf, offset } => softcuda::Arg::Buf {
                    buf: *buf,
                    offset: *offset,
                },
                launch::Arg::U32(v) => softcuda::Arg::Scalar(v.to_le_bytes().to_vec()),
                launch::Arg::U64(v) => softcuda::Arg::Scalar(v.to_le_bytes().to_vec()),
                launch::Arg::F32(v) => softcuda::Arg::Scalar(v.to_le_bytes().to_vec()),
                launch::Arg::Struct { bytes, pointers } => softcuda::Arg::Struct {
                    bytes: bytes.clone(),
                    pointers: pointers.iter().map(|p| (p.at, p.buf, p.offset)).collect(),
                },
            })
            .collect();
        let geometry = softcuda::Geometry {
            grid: l.grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
            order_seed: 0x9e37_79b9 ^ self.launches,
        };
        self.device.launch(&l.kernel, &geometry, &args, bufs)
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn back(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The case on the software device, through the GPU's launch descriptions.
pub fn on_soft(soft: &mut Soft, case: &Case) -> Result<Outputs, String> {
    let inp = inputs(case);
    let d = &inp.data;
    let weight = || {
        inp.weight
            .as_ref()
            .expect("the op has a weight")
            .data()
            .to_vec()
    };
    let e = |r: cycleqd_engine::Result<Option<Launch>>| {
        r.map_err(|e| e.to_string())?
            .ok_or_else(|| "the case launches nothing".to_string())
    };
    let zeros = |values: usize| vec![0u8; values * 4];
    // Runs `l` over `bufs` and returns buffer 0 as f32.
    let mut run = |l: &Launch, mut bufs: Vec<Vec<u8>>| -> Result<Vec<f32>, String> {
        soft.run(l, &mut bufs)?;
        Ok(back(&bufs[0]))
    };
    Ok(match &case.op {
        Op::Embedding {
            dtype,
            vocab,
            dim,
            ids,
        } => {
            let l = e(launch::embedding(*dtype, ids, *vocab, *dim))?;
            vec![(
                "out".into(),
                run(&l, vec![zeros(ids.len() * dim), weight(), u32s(ids)])?,
            )]
        }
        Op::RmsNorm {
            dtype, rows, dim, ..
        } => {
            let l = e(launch::rms_norm(*dtype, *rows, *dim, 1e-5, *dim))?;
            vec![(
                "out".into(),
                run(&l, vec![zeros(rows * dim), f32s(&d[0]), weight()])?,
            )]
        }
        Op::Matmul { dtype, rows, n, k } => {
            let mut bufs = vec![zeros(rows * n), f32s(&d[0]), weight()];
            for l in launch::matvec(*dtype, *rows, *n, *k).map_err(|e| e.to_string())? {
                soft.run(&l, &mut bufs)?;
            }
            vec![("out".into(), back(&bufs[0]))]
        }
        Op::Cast { dtype, len } => {
            let mut bufs = vec![vec![0u8; len * dtype.size()], f32s(&d[0])];
            soft.run(&launch::cast_from_f32(*dtype, *len), &mut bufs)?;
            vec![("out".into(), dtype::to_f32_vec(*dtype, &bufs[0]))]
        }
        Op::Rope {
            rows,
            heads,
            head_dim,
        } => {
            let freq = inv_freq(*head_dim);
            let l = e(launch::rope(*rows, *heads, *head_dim, freq.len()))?;
            let bufs = vec![f32s(&d[0]), u32s(&rope_positions(*rows)), f32s(&freq)];
            vec![("x".into(), run(&l, bufs)?)]
        }
        Op::KvStore {
            slots,
            positions,
            max_seq,
            width,
        } => {
            let l = e(launch::kv_store(slots, positions, *max_seq, *width))?;
            let bufs = vec![f32s(&d[0]), f32s(&d[1]), u32s(slots), u32s(positions)];
            vec![("cache".into(), run(&l, bufs)?)]
        }
        Op::Attention {
            slots,
            positions,
            geom,
            ..
        } => {
            let l = e(launch::attention(slots, positions, *geom))?;
            let bufs = vec![
                zeros(d[0].len()),
                f32s(&d[0]),
                f32s(&d[1]),
                f32s(&d[2]),
                u32s(slots),
                u32s(positions),
            ];
            vec![("out".into(), run(&l, bufs)?)]
        }
        Op::Elementwise { kernel, len, .. } => {
            let l = launch::elementwise(kernel, *len).ok_or("an empty case")?;
            vec![("x".into(), run(&l, vec![f32s(&d[0]), f32s(&d[1])])?)]
        }
        Op::Gather { rows, width, .. } => {
            let l = e(launch::gather_rows(rows.len(), *width))?;
            let bufs = vec![zeros(rows.len() * width), f32s(&d[0]), u32s(rows)];
            vec![("out".into(), run(&l, bufs)?)]
        }
        Op::Argmax { rows, vocab, .. } => {
            let l = e(launch::argmax_rows(*rows, *vocab))?;
            // Buffer 0 holds u32 ids: read back as f32 bits, then as the ids they are.
            let ids = run(&l, vec![zeros(*rows), f32s(&d[0])])?;
            vec![(
                "ids".into(),
                ids.iter().map(|v| v.to_bits() as f32).collect(),
            )]
        }
        Op::FillRandom {
            dtype,
            len,
            seed,
            scale,
        } => {
            let mut bufs = vec![vec![0u8; len * dtype.size()]];
            soft.run(&launch::fill_random(*dtype, *len, *seed, *scale), &mut bufs)?;
            vec![("weight".into(), dtype::to_f32_vec(*dtype, &bufs[0]))]
        }
        Op::ScaleColumns { rows, cols } => {
            let l = launch::scale_columns(*rows, *cols).map_err(|e| e.to_string())?;
            vec![(
                "out".into(),
                run(&l, vec![zeros(rows * cols), f32s(&d[0]), f32s(&d[1])])?,
            )]
        }
        Op::Materialize {
            dtype,
            m,
            n,
            ranks,
            tile_rows,
            offset,
        } => soft_materialize(soft, *dtype, *m, *n, ranks, *tile_rows, *offset, case.seed)?,
    })
}

/// The GPU's fused materialisation with the software device for its kernels: `U·diag(c)` by
/// `scale_columns`, the low-rank tile (cuBLAS on a GPU) as an f32 product here, then the fused
/// kernel over each tile's rows, every buffer `offset` elements in.
#[allow(clippy::too_many_arguments)]
fn soft_materialize(
    soft: &mut Soft,
    dt: DType,
    m: usize,
    n: usize,
    ranks: &[usize],
    tile_rows: usize,
    offset: usize,
    seed: u64,
) -> Result<Outputs, String> {
    let (src, coef) = materialize_inputs(dt, m, n, ranks, seed);
    let k = src.total_rank();
    // Concatenated factors, as the GPU places them.
    let mut u = Vec::with_capacity(m * k);
    for i in 0..m {
        for f in &src.factors {
            u.extend_from_slice(&f.u[i * f.rank..(i + 1) * f.rank]);
        }
    }
    let vt: Vec<f32> = src
        .factors
        .iter()
        .flat_map(|f| f.vt.iter().copied())
        .collect();
    let us = if k > 0 {
        let mut bufs = vec![vec![0u8; m * k * 4], f32s(&u), f32s(&coef.c)];
        soft.run(
            &launch::scale_columns(m, k).map_err(|e| e.to_string())?,
            &mut bufs,
        )?;
        back(&bufs[0])
    } else {
        vec![]
    };
    let esize = dt.size();
    let pad = |t: &HostTensor| {
        let mut b = vec![0x55u8; offset * esize];
        b.extend_from_slice(t.data());
        b
    };
    let mut out = vec![0u8; (offset + m * n) * esize];
    let sources: Vec<Vec<u8>> = std::iter::once(&src.base)
        .chain(&src.experts)
        .map(pad)
        .collect();
    let source_coefs: Vec<f32> = std::iter::once(1.0 - coef.a.iter().sum::<f32>())
        .chain(coef.a.iter().copied())
        .collect();
    for r0 in (0..m).step_by(tile_rows) {
        let rows = tile_rows.min(m - r0);
        let tile: Vec<f32> = (0..rows * n)
            .map(|idx| {
                let (i, j) = (r0 + idx / n, idx % n);
                (0..k)
                    .map(|t| us[i * k + t] as f64 * vt[t * n + j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let l = launch::materialize(dt, &source_coefs, rows * n, offset + r0 * n, k > 0)
            .map_err(|e| e.to_string())?;
        let mut bufs = vec![std::mem::take(&mut out), f32s(&tile)];
        bufs.extend(sources.iter().cloned());
        soft.run(&l, &mut bufs)?;
        out = bufs.swap_remove(0);
    }
    Ok(vec![(
        "out".into(),
        dtype::to_f32_vec(dt, &out[offset * esize..]),
    )])
}

/// The case through a real GPU's ops; `None` for a kernel the GPU runs only inside another
/// op (the cast before a cuBLAS GEMM, `scale_columns` inside materialisation), whose cases there
/// cover it.
pub fn on_gpu(gpu: &CudaBackend, case: &Case) -> Option<Outputs> {
    match &case.op {
        Op::Cast { .. } | Op::ScaleColumns { .. } => None,
        Op::Materialize { tile_rows, n, .. } => {
            gpu.set_materialize_tile_bytes(tile_rows * n * 4);
            Some(on_backend(gpu, case))
        }
        _ => Some(on_backend(gpu, case)),
    }
}

/// Compares outputs with the reference; `Err` names the first difference.
pub fn compare(case: &Case, got: &Outputs, want: &Outputs) -> Result<(), String> {
    for ((label, g), (_, w)) in got.iter().zip(want) {
        if g.len() != w.len() {
            return Err(format!(
                "{}: {label} has {} values, want {}",
                case.name,
                g.len(),
                w.len()
            ));
        }
        let scale = w
            .iter()
            .filter(|v| v.is_finite())
            .fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let ok = if b.is_nan() {
                a.is_nan()
            } else if b.is_infinite() {
                a == b
            } else {
                a.is_finite() && (a - b).abs() <= case.tol * scale
            };
            if !ok {
                return Err(format!(
                    "{}: {label}[{i}] = {a}, reference {b} (tolerance {} of {scale})",
                    case.name, case.tol
                ));
            }
        }
    }
    Ok(())
}
