//! `out[rows, n] = x[rows, k] · wᵀ`, `w` `[n, k]` in f16/bf16/f32, f32 accumulation.
//!
//! Work is split over blocks of weight rows (`block_rows`): each task upcasts its block into an
//! L1/L2-resident f32 buffer once and reuses it for every input row, so decode (few rows) reads
//! each weight byte exactly once — the memory-bandwidth roofline — and prefill (many rows) reuses
//! the upcast block `rows` times (f32 weights are read in place). Register tiles of up to 6 input
//! rows × 4 weight rows; AVX-512, AVX2+FMA or portable code is chosen at run time ([`Isa`]).
//! On AVX-512, 16 input rows and more go through outer-product tiles against activations
//! packed into 16-row panels instead (`panels`): no horizontal sums, which at small k were most
//! of a dot-product tile's work. In bf16 [`Precision`] the activations are rounded to bf16 once
//! per call and, on CPUs with the bf16 dot product, bf16 weights are read as stored by
//! `vdpbf16ps` tiles (no upcast): for few rows (decode) as dot products, for 16 rows and more
//! as outer products.
//! Products that share their input (q/k/v, gate/up) run as one group: one parallel loop over
//! all their weight blocks, one rounding of the activations.

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use super::panels;
use crate::error::{Error, Result};
use crate::model::dtype;
use crate::model::{DType, HostTensor};

/// Weight rows per task when many input rows reuse each block: 16 rows × k=4096 × 4 B =
/// 256 KiB upcast buffer (fits L2).
const W_BLOCK: usize = 16;
/// Input rows up to which a task is memory-bound (decode): blocks then grow so that each
/// rayon task streams at least `MIN_TASK_BYTES` of weights, amortising scheduling.
const FEW_ROWS: usize = 4;
const MIN_TASK_BYTES: usize = 128 << 10;

/// Weight rows per task for this shape: a multiple of 4 (the register tile).
fn block_rows(rows: usize, n: usize, k: usize, esize: usize) -> usize {
    if rows > FEW_ROWS {
        return W_BLOCK;
    }
    let by_bytes = MIN_TASK_BYTES.div_ceil((k * esize).max(1));
    // Still at least 4 tasks per thread, for load balance.
    let by_balance = n / (4 * rayon::current_num_threads()).max(1);
    by_bytes.min(by_balance).max(W_BLOCK).next_multiple_of(4)
}

/// A raw output pointer that tasks write disjoint elements through.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the output columns of its own weight block, so writes from
// different threads never alias; the pointer outlives the parallel scope.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A writer of block-local `(row, column)` results into `out[row * n + j0 + column]`.
    #[inline(always)]
    fn storer(self, n: usize, j0: usize) -> impl Fn(usize, usize, f32) {
        // SAFETY: callers pass r < rows and j0 + c < j1 <= n (in bounds), and each block owns
        // its columns, so no other thread writes these elements.
        move |r, c, v| unsafe { *self.0.add(r * n + j0 + c) = v }
    }
}

/// The instruction set a kernel runs with, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// [`Isa::Avx512Bf16`], and Intel's AMX tiles for bf16 products of 16 input rows and more
    /// (`amx`), where the CPU has AMX-BF16, Linux grants the tile state and the tiles pass
    /// their first-use check.
    AmxBf16,
    /// AVX-512 with the bf16 dot product (`vdpbf16ps`): bf16 weights are read as they are
    /// stored, two products per lane per instruction.
    Avx512Bf16,
    Avx512,
    Avx2Fma,
    Generic,
}

const ALL_ISAS: [Isa; 5] = [
    Isa::AmxBf16,
    Isa::Avx512Bf16,
    Isa::Avx512,
    Isa::Avx2Fma,
    Isa::Generic,
];

/// `Isa::force`'s choice: an index into `ALL_ISAS`, or `NO_ISA` for "as detected".
static FORCED_ISA: AtomicU8 = AtomicU8::new(NO_ISA);
const NO_ISA: u8 = u8::MAX;

impl Isa {
    /// The widest set this CPU supports, detected once (with AVX-512 BF16, this asks whether
    /// the AMX tiles are usable: `amx::usable`).
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| match Isa::detect_vector() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 if super::amx::usable().is_ok() => Isa::AmxBf16,
            vector => vector,
        })
    }

    /// The widest set of vector instructions this CPU supports (AMX not asked).
    fn detect_vector() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    if is_x86_feature_detected!("avx512bf16") {
                        return Isa::Avx512Bf16;
                    }
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2Fma;
                }
            }
            Isa::Generic
        })
    }

    /// The set the kernels use: the one [`Isa::force`] chose, else `$CYCLEQD_CPU_ISA`
    /// (`amxbf16`, `avx512bf16`, `avx512`, `avx2`, `generic`; a set this CPU lacks is an
    /// error), else the detected one. Forcing a narrower set is how every path is tested on one
    /// machine.
    pub fn current() -> Result<Isa> {
        let forced = FORCED_ISA.load(Ordering::Relaxed);
        if forced != NO_ISA {
            return Ok(ALL_ISAS[forced as usize]);
        }
        static FROM_ENV: std::sync::OnceLock<std::result::Result<Isa, String>> =
            std::sync::OnceLock::new();
        FROM_ENV
            .get_or_init(|| match std::env::var("CYCLEQD_CPU_ISA") {
                Ok(name) if !name.is_empty() => {
                    let isa = Isa::parse(&name).ok_or_else(|| {
                        format!(
                            "CYCLEQD_CPU_ISA={name}: not one of amxbf16, avx512bf16, avx512, \
                             avx2, generic"
                        )
                    })?;
                    if isa.is_supported() {
                        Ok(isa)
                    } else {
                        Err(format!(
                            "CYCLEQD_CPU_ISA={name}: this CPU does not support it (best: {})",
                            Isa::detect().name()
                        ))
                    }
                }
                _ => Ok(Isa::detect()),
            })
            .clone()
            .map_err(Error::invalid)
    }

    /// Makes every later matmul of this process use `isa` (`None`: back to the default).
    /// Process-wide: tests that force a set run in a test binary of their own.
    pub fn force(isa: Option<Isa>) {
        if let Some(isa) = isa {
            assert!(isa.is_supported(), "{isa:?} is not supported by this CPU");
        }
        let index = isa.map_or(NO_ISA, |i| i.rank() as u8);
        FORCED_ISA.store(index, Ordering::Relaxed);
    }

    /// This ISA and every weaker one, for tests that cover all paths the CPU can run.
    pub fn available() -> Vec<Isa> {
        ALL_ISAS[Isa::detect().rank()..].to_vec()
    }

    /// Whether this CPU can run `self` (checked on every matmul: no allocation). Only
    /// [`Isa::AmxBf16`] asks for the tiles' probe, so a set forced narrower
    /// (`$CYCLEQD_CPU_ISA=avx512bf16`) never runs a tile instruction.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::AmxBf16 => Isa::detect() == Isa::AmxBf16,
            _ => self.rank() >= Isa::detect_vector().rank(),
        }
    }

    /// Position in `ALL_ISAS`, widest first.
    fn rank(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::AmxBf16 => "amxbf16",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2",
            Isa::Generic => "generic",
        }
    }

    pub fn parse(name: &str) -> Option<Isa> {
        ALL_ISAS.into_iter().find(|i| i.name() == name)
    }

    /// Whether the set has the bf16 dot product (`vdpbf16ps`).
    pub fn has_bf16_dot(self) -> bool {
        matches!(self, Isa::AmxBf16 | Isa::Avx512Bf16)
    }

    /// Whether the set has AVX-512F.
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::AmxBf16 | Isa::Avx512Bf16 | Isa::Avx512)
    }
}

/// The arithmetic of the matmuls with bf16 weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// bf16 on CPUs with the bf16 dot product ([`Isa::Avx512Bf16`], [`Isa::AmxBf16`]), f32
    /// elsewhere.
    Auto,
    /// Weights upcast to f32, activations in f32: the reference's arithmetic.
    F32,
    /// Activations rounded to bf16 at each matmul, bf16 weights, f32 accumulation: what
    /// transformers and vLLM compute on CPUs. On a CPU without the bf16 dot product the same
    /// numbers come from the f32 kernels (bf16 products are exact in f32), without its speed.
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(PRECISION_UNSET);
const PRECISION_UNSET: u8 = u8::MAX;

impl Precision {
    /// The process's setting: [`Precision::set`]'s, else `$CYCLEQD_PRECISION`
    /// (`auto`, `f32`, `bf16`), else f32 — exact against the f32 reference. The command line
    /// sets it from `--precision`, whose default is `auto`.
    pub fn current() -> Precision {
        static FROM_ENV: std::sync::OnceLock<Precision> = std::sync::OnceLock::new();
        match PRECISION.load(Ordering::Relaxed) {
            // Read once: this is asked on every matmul.
            PRECISION_UNSET => *FROM_ENV.get_or_init(|| {
                std::env::var("CYCLEQD_PRECISION")
                    .ok()
                    .and_then(|v| Precision::parse(&v))
                    .unwrap_or(Precision::F32)
            }),
            p => [Precision::Auto, Precision::F32, Precision::Bf16][p as usize],
        }
    }

    pub fn set(p: Precision) {
        PRECISION.store(p as u8, Ordering::Relaxed);
    }

    pub fn parse(name: &str) -> Option<Precision> {
        match name {
            "auto" => Some(Precision::Auto),
            "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }

    /// Whether a matmul with `dtype` weights computes in bf16 under this setting on `isa`.
    pub fn uses_bf16(self, dtype: DType, isa: Isa) -> bool {
        dtype == DType::BF16
            && match self {
                Precision::Auto => isa.has_bf16_dot(),
                Precision::F32 => false,
                Precision::Bf16 => true,
            }
    }
}

pub fn matmul_t(out: &mut [f32], x: &[f32], w: &HostTensor, rows: usize, n: usize, k: usize) {
    // An unsupported `$CYCLEQD_CPU_ISA` is reported by the command line as it starts;
    // here it falls back to the detected set rather than panicking mid-model.
    let isa = Isa::current().unwrap_or_else(|_| Isa::detect());
    matmul_t_with(isa, Precision::current(), out, x, w, rows, n, k)
}

/// [`matmul_t`] with a chosen instruction set (one of [`Isa::available`]), f32 arithmetic.
pub fn matmul_t_isa(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    w: &HostTensor,
    rows: usize,
    n: usize,
    k: usize,
) {
    matmul_t_with(isa, Precision::F32, out, x, w, rows, n, k)
}

/// [`matmul_t`] with a chosen instruction set and precision.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t_with(
    isa: Isa,
    precision: Precision,
    out: &mut [f32],
    x: &[f32],
    w: &HostTensor,
    rows: usize,
    n: usize,
    k: usize,
) {
    matmul_t_group_with(isa, precision, [Product { out, w, n }], x, rows, k)
}

/// One product of a group that shares its input: `out[rows, n] = x · wᵀ`, `w` `[n, k]`.
pub struct Product<'a> {
    pub out: &'a mut [f32],
    pub w: &'a HostTensor,
    pub n: usize,
}

/// Most products in one group (q/k/v is three).
pub const MAX_GROUP: usize = 4;

/// Several products of one input (q/k/v, gate/up) as one parallel region: their weight blocks
/// are the tasks of one loop, so a decode step pays one fork/join for them instead of one
/// each, and the activations are rounded to bf16 once. At most [`MAX_GROUP`] products (held
/// on the stack: no allocation per step).
pub fn matmul_t_group<'a>(
    products: impl IntoIterator<Item = Product<'a>>,
    x: &[f32],
    rows: usize,
    k: usize,
) {
    let isa = Isa::current().unwrap_or_else(|_| Isa::detect());
    matmul_t_group_with(isa, Precision::current(), products, x, rows, k)
}

/// [`matmul_t_group`] with a chosen instruction set and precision.
pub fn matmul_t_group_with<'a>(
    isa: Isa,
    precision: Precision,
    products: impl IntoIterator<Item = Product<'a>>,
    x: &[f32],
    rows: usize,
    k: usize,
) {
    assert!(isa.is_supported(), "{isa:?} is not supported by this CPU");
    let mut group: [Option<Product>; MAX_GROUP] = Default::default();
    let mut count = 0;
    for p in products {
        assert!(
            count < MAX_GROUP,
            "matmul_t_group: at most {MAX_GROUP} products"
        );
        group[count] = Some(p);
        count += 1;
    }
    assert!(x.len() >= rows * k, "matmul_t: input too small");
    for p in group.iter().flatten() {
        assert_eq!(
            p.w.numel(),
            p.n * k,
            "matmul_t: weight has {} elements, expected {}×{k}",
            p.w.numel(),
            p.n
        );
        assert!(p.out.len() >= rows * p.n, "matmul_t: output too small");
    }
    let bf16 = |p: &Product| precision.uses_bf16(p.w.dtype, isa);
    // The rounded activations live in a buffer this thread keeps between calls (no
    // allocation per decode step); taken out while in use, so a nested call on the same
    // thread (rayon may run one while this one waits) gets a fresh one instead.
    thread_local! {
        static X_BF16: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut x_bf16 = X_BF16.take();
    // Many rows on AVX-512: the outer-product tiles, from activations packed into panels
    // (kept per thread like `X_BF16`), rounded to bf16 for the bf16 products and as they are
    // for the f32 ones. Chosen per product, so a product computes the same in a group as alone.
    thread_local! {
        static X_PANELS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
        static X_PANELS_F32: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut x_panels = X_PANELS.take();
    let mut x_panels_f32 = X_PANELS_F32.take();
    // (k = 0 has nothing to pack: its products are zeros, which the dot tiles write.)
    let many_rows = rows >= panels::MIN_ROWS && k > 0;
    let bf16_panels = |p: &Product| bf16(p) && isa.has_bf16_dot() && many_rows;
    let f32_panels = |p: &Product| !bf16(p) && isa.has_avx512() && many_rows;
    let any_bf16 = group.iter().flatten().any(bf16);
    let use_panels = group.iter().flatten().any(bf16_panels);
    #[cfg(target_arch = "x86_64")]
    {
        if use_panels {
            // SAFETY: the bf16 dot product is only available on CPUs with AVX-512F.
            unsafe { panels::pack_bf16(&x[..rows * k], rows, k, &mut x_panels) };
        }
        if group.iter().flatten().any(f32_panels) {
            // SAFETY: f32 panels are only chosen on the AVX-512 paths.
            unsafe { panels::pack_f32(&x[..rows * k], rows, k, &mut x_panels_f32) };
        }
    }
    let round = any_bf16 && !use_panels;
    if round {
        // Only grown (see `panels::pack_bf16`), and rewritten in full.
        if x_bf16.len() < rows * k {
            x_bf16.resize(rows * k, 0);
        }
        dtype::f32_to_bf16_slice(&x[..rows * k], &mut x_bf16[..rows * k]);
    }
    let x_bf16_rows = &x_bf16[..if round { rows * k } else { 0 }];
    // Without the bf16 dot product, the same products from the f32 kernels: bf16 × bf16 is
    // exact in f32.
    let x_rounded: Vec<f32> = if !isa.has_bf16_dot() && round {
        x_bf16_rows
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect()
    } else {
        vec![]
    };
    let mut parts = [None; MAX_GROUP];
    for (slot, p) in parts.iter_mut().zip(group.iter_mut().flatten()) {
        let kernel = match (bf16(p), isa) {
            #[cfg(target_arch = "x86_64")]
            (true, _) if bf16_panels(p) => Kernel::Bf16Panels {
                x: &x_panels,
                w: WeightPtr(p.w.data().as_ptr()),
                tiles: super::amx::tiles_for(k, isa == Isa::AmxBf16),
            },
            #[cfg(target_arch = "x86_64")]
            (true, _) if isa.has_bf16_dot() => Kernel::Bf16Dot {
                x: x_bf16_rows,
                w: WeightPtr(p.w.data().as_ptr()),
            },
            (true, _) => Kernel::F32 {
                isa,
                x: &x_rounded,
                w: p.w,
            },
            #[cfg(target_arch = "x86_64")]
            (false, _) if f32_panels(p) => Kernel::F32Panels {
                x: &x_panels_f32,
                w: p.w,
            },
            (false, _) => Kernel::F32 { isa, x, w: p.w },
        };
        // Few rows on 16-bit weights: widened in registers, each weight byte read once.
        #[cfg(target_arch = "x86_64")]
        let kernel = match kernel {
            Kernel::F32 { isa, x, w } if rows <= FEW_ROWS && widens_in_registers(isa, w.dtype) => {
                Kernel::Widened { isa, x, w }
            }
            other => other,
        };
        let block = match kernel {
            Kernel::F32 { .. } => block_rows(rows, p.n, k, p.w.dtype.size()),
            #[cfg(target_arch = "x86_64")]
            Kernel::Widened { .. } => block_rows(rows, p.n, k, 2),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Dot { .. } => block_rows(rows, p.n, k, 2),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Panels { .. } | Kernel::F32Panels { .. } => panels::block_rows(p.n),
        };
        *slot = Some(Part {
            kernel,
            out: OutPtr(p.out.as_mut_ptr()),
            n: p.n,
            block,
        });
    }
    let parts = &parts[..count];
    // Task t is block t − first[i] of part i.
    let mut first = [0usize; MAX_GROUP + 1];
    for (i, p) in parts.iter().enumerate() {
        let p = p.as_ref().expect("filled above");
        first[i + 1] = first[i] + p.n.div_ceil(p.block);
    }
    (0..first[parts.len()]).into_par_iter().for_each(|t| {
        let i = first[1..=parts.len()].partition_point(|&f| f <= t);
        let part = parts[i].as_ref().expect("filled above");
        part.run(t - first[i], rows, k);
    });
    drop(x_rounded);
    X_BF16.set(x_bf16);
    X_PANELS.set(x_panels);
    X_PANELS_F32.set(x_panels_f32);
}

/// One product of a group, as its tasks see it.
#[derive(Clone, Copy)]
struct Part<'a> {
    kernel: Kernel<'a>,
    out: OutPtr,
    n: usize,
    /// Weight rows per task.
    block: usize,
}

/// How a part's blocks are computed.
#[derive(Clone, Copy)]
enum Kernel<'a> {
    /// Weights upcast block by block into an f32 buffer (read in place when f32 and
    /// aligned), f32 register tiles.
    F32 {
        isa: Isa,
        x: &'a [f32],
        w: &'a HostTensor,
    },
    /// bf16 weights straight from their bytes (no upcast buffer: half the bytes through the
    /// caches, and nothing written per block) against bf16-rounded activations.
    #[cfg(target_arch = "x86_64")]
    Bf16Dot { x: &'a [u16], w: WeightPtr },
    /// bf16 weights broadcast pair by pair against activations packed into 16-row panels
    /// (`panels`): outer products, for many input rows; with `tiles`, the same operands through
    /// the AMX tiles (`amx`).
    #[cfg(target_arch = "x86_64")]
    Bf16Panels {
        x: &'a [u32],
        w: WeightPtr,
        tiles: Option<super::amx::TileKind>,
    },
    /// f32 weights (read in place, or upcast block by block as for `F32`) broadcast one by
    /// one against f32 activations packed into panels.
    #[cfg(target_arch = "x86_64")]
    F32Panels { x: &'a [u32], w: &'a HostTensor },
    /// bf16 or f16 weights widened in registers by the f32 tiles (no upcast buffer), for few
    /// input rows; only on ISAs where [`widens_in_registers`].
    #[cfg(target_arch = "x86_64")]
    Widened {
        isa: Isa,
        x: &'a [f32],
        w: &'a HostTensor,
    },
}

impl Part<'_> {
    /// Computes the output columns of weight block `blk`.
    fn run(&self, blk: usize, rows: usize, k: usize) {
        let (n, out) = (self.n, self.out);
        let j0 = blk * self.block;
        let j1 = (j0 + self.block).min(n);
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: this kernel is only chosen on CPUs with AVX-512 BF16 (Isa::Avx512Bf16
            // and Isa::AmxBf16 are only available then), and the weight holds n·k bf16 values.
            Kernel::Bf16Dot { x, w } => unsafe { block_bf16_dot(out, x, w, rows, n, k, j0, j1) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; `x` was packed for these rows and k.
            Kernel::Bf16Panels { x, w, tiles } => unsafe {
                let wj = w.0.add(j0 * k * 2);
                match tiles {
                    // SAFETY: hardware tiles are chosen only on Isa::AmxBf16 (the tiles usable,
                    // AVX-512 BF16 present), and any tiles only for a k they take.
                    Some(kind) => super::amx::block_on(kind, out.0, x, wj, rows, n, k, j0, j1),
                    None => panels::block_bf16(out.0, x, wj, rows, n, k, j0, j1),
                }
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::F32Panels { x, w } => with_f32_rows(w, self.block, k, j0, j1, |wb| {
                // SAFETY: this kernel is only chosen on the AVX-512 paths; `x` was packed for
                // these rows and k, and `wb` holds weight rows j0..j1.
                unsafe { panels::block_f32(out.0, x, wb.as_ptr() as *const u8, rows, n, k, j0, j1) }
            }),
            #[cfg(target_arch = "x86_64")]
            Kernel::Widened { isa, x, w } => {
                let wp = w.data()[j0 * k * 2..].as_ptr();
                // SAFETY: chosen only where `widens_in_registers(isa, dtype)` (the CPU has the
                // ISA, and F16C for AVX2); the weight holds n·k values, read unaligned.
                unsafe {
                    match w.dtype {
                        DType::BF16 => {
                            widened(isa, out, x, wp as *const half::bf16, rows, n, k, j0, j1)
                        }
                        _ => widened(isa, out, x, wp as *const half::f16, rows, n, k, j0, j1),
                    }
                }
            }
            Kernel::F32 { isa, x, w } => with_f32_rows(w, self.block, k, j0, j1, |wb| match isa {
                // SAFETY: `isa` is one this CPU supports (asserted by the caller).
                #[cfg(target_arch = "x86_64")]
                Isa::AmxBf16 | Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
                    block_avx512(out, x, wb.as_ptr(), rows, n, k, j0, j1)
                },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { block_fma(out, x, wb, rows, n, k, j0, j1) },
                _ => block_generic(out, x, wb, rows, n, k, j0, j1),
            }),
        }
    }
}

/// Weight rows `j0..j1` (`w` at row `j0`) of 16-bit weights widened in registers, in the
/// tiles of `isa`.
///
/// # Safety
/// As [`block_avx512`] or [`block_fma_narrow`], whichever `isa` picks.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn widened<W: Weight>(
    isa: Isa,
    out: OutPtr,
    x: &[f32],
    w: *const W,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    if isa == Isa::Avx2Fma {
        block_fma_narrow(out, x, w, rows, n, k, j0, j1)
    } else {
        block_avx512(out, x, w, rows, n, k, j0, j1)
    }
}

/// Whether the f32 tiles of `isa` read `dtype` weights widened in registers (16-bit weights on
/// AVX-512, and on AVX2 where the CPU has F16C, as every AVX2 CPU so far does).
#[cfg(target_arch = "x86_64")]
fn widens_in_registers(isa: Isa, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && match isa {
            Isa::AmxBf16 | Isa::Avx512 | Isa::Avx512Bf16 => true,
            Isa::Avx2Fma => is_x86_feature_detected!("f16c"),
            Isa::Generic => false,
        }
}

/// Runs `f` on weight rows `j0..j1` of `w` as f32: f32 weights where they lie when aligned
/// (their "upcast" would be a plain copy), others upcast into a buffer of `block` rows kept
/// per thread between calls (no allocation, and no zeroing of it, per step); taken out while
/// in use, so a nested call gets its own.
fn with_f32_rows(
    w: &HostTensor,
    block: usize,
    k: usize,
    j0: usize,
    j1: usize,
    f: impl FnOnce(&[f32]),
) {
    let data = w.data();
    let direct: Option<&[f32]> = match w.dtype {
        DType::F32 => bytemuck::try_cast_slice(data).ok(),
        _ => None,
    };
    if let Some(all) = direct {
        return f(&all[j0 * k..j1 * k]);
    }
    thread_local! {
        static UPCAST: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let esize = w.dtype.size();
    let mut buf = UPCAST.take();
    // Only grown (see `panels::pack_bf16`): no zeroing when widths alternate.
    if buf.len() < block * k {
        buf.resize(block * k, 0.0);
    }
    let wb = &mut buf[..(j1 - j0) * k];
    dtype::to_f32(w.dtype, &data[j0 * k * esize..j1 * k * esize], wb);
    f(wb);
    UPCAST.set(buf);
}

/// A block's products in register tiles of `$tile` (its sizes taken from the argument
/// arrays): up to `$max` input rows (the listed heights, one monomorphised tile each, since
/// the accumulators are sized at compile time) × 4 weight rows, then the weight rows past a
/// multiple of 4 one product at a time. `$xs(i)` is input row `i`, `$ws(c)` the block's weight
/// row `c`. Shared by the AVX-512 f32 and bf16 blocks and the AVX2 one.
#[cfg(target_arch = "x86_64")]
macro_rules! register_tiles {
    ($tile:path, heights: [$max:literal $($n:literal)*], rows: $rows:expr, cols: $cols:expr,
     xs: $xs:expr, ws: $ws:expr, k: $k:expr, store: $store:expr) => {{
        let (xs, ws, k, store) = ($xs, $ws, $k, $store);
        walk_tiles(
            $rows,
            $cols,
            $max,
            |r, rx, c| {
                let w4 = [ws(c), ws(c + 1), ws(c + 2), ws(c + 3)];
                let x = |i: usize| xs(r + i);
                match rx {
                    $max => emit($tile(std::array::from_fn::<_, $max, _>(x), w4, k), r, c, &store),
                    $($n => emit($tile(std::array::from_fn::<_, $n, _>(x), w4, k), r, c, &store),)*
                    _ => unreachable!("walk_tiles gives 1..={} rows", $max),
                }
            },
            |r, c| store(r, c, $tile([xs(r)], [ws(c)], k)[0][0]),
        )
    }};
}

/// The weights' bytes, shared by the tasks (read only).
#[derive(Clone, Copy)]
struct WeightPtr(*const u8);
// SAFETY: only read, and the slice outlives the parallel scope.
unsafe impl Send for WeightPtr {}
unsafe impl Sync for WeightPtr {}

/// bf16 register tiles: 6 input rows × 4 weight rows = 24 zmm accumulators, as the f32 tiles,
/// each `vdpbf16ps` doing 32 products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_bf16_dot(
    out: OutPtr,
    x: &[u16],
    w: WeightPtr,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let xp = x.as_ptr();
    let xs = |i: usize| xp.add(i * k);
    // Weight row j0 + c, as bf16 (the bytes may be at an odd address: loads are unaligned).
    let ws = |c: usize| w.0.add((j0 + c) * k * 2) as *const u16;
    register_tiles!(
        bf16_dot::tile,
        heights: [6 5 4 3 2 1],
        rows: rows,
        cols: j1 - j0,
        xs: xs,
        ws: ws,
        k: k,
        store: out.storer(n, j0)
    );
}

#[cfg(target_arch = "x86_64")]
mod bf16_dot {
    use std::arch::x86_64::*;

    /// Dot products of `A` bf16 input rows with `B` bf16 weight rows of length `k` in zmm
    /// accumulators (`vdpbf16ps`: pairs of products added into each f32 lane); the tail past
    /// a multiple of 32 in scalar f32 (bf16 products are exact there).
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be available; every pointer must be valid for `k`
    /// (possibly unaligned) u16 reads.
    #[inline(always)]
    pub unsafe fn tile<const A: usize, const B: usize>(
        x: [*const u16; A],
        w: [*const u16; B],
        k: usize,
    ) -> [[f32; B]; A] {
        let mut acc = [[_mm512_setzero_ps(); B]; A];
        let main = k - k % 32;
        let mut i = 0;
        while i < main {
            let mut wv = [_mm512_setzero_si512(); B];
            for b in 0..B {
                wv[b] = _mm512_loadu_si512(w[b].add(i) as *const _);
            }
            for a in 0..A {
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x[a].add(i) as *const _));
                for b in 0..B {
                    let wb: __m512bh = std::mem::transmute(wv[b]);
                    acc[a][b] = _mm512_dpbf16_ps(acc[a][b], xv, wb);
                }
            }
            i += 32;
        }
        let widen = |p: *const u16| f32::from_bits((p.read_unaligned() as u32) << 16);
        let mut out = [[0.0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                let mut s = _mm512_reduce_add_ps(acc[a][b]);
                for t in main..k {
                    s = widen(x[a].add(t)).mul_add(widen(w[b].add(t)), s);
                }
                out[a][b] = s;
            }
        }
        out
    }
}

/// AVX2 register tiles: 3 input rows × 4 weight rows = 12 ymm accumulators plus 7 loads per
/// 12 FMAs, which keeps two FMA ports busy within the 16 ymm registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_fma(
    out: OutPtr,
    x: &[f32],
    wb: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    fma_tiles(out, x, wb.as_ptr(), rows, n, k, j0, j1)
}

/// [`block_fma`] on 16-bit weights widened in registers (`w` at weight row `j0`, possibly
/// unaligned).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` must hold rows `j0..j1` of `k` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_fma_narrow<W: Weight>(
    out: OutPtr,
    x: &[f32],
    w: *const W,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    fma_tiles(out, x, w, rows, n, k, j0, j1)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn fma_tiles<W: Weight>(
    out: OutPtr,
    x: &[f32],
    w: *const W,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let xp = x.as_ptr();
    let xs = |i: usize| xp.add(i * k);
    let ws = |j: usize| w.add(j * k);
    register_tiles!(
        avx2::tile,
        heights: [3 2 1],
        rows: rows,
        cols: j1 - j0,
        xs: xs,
        ws: ws,
        k: k,
        store: out.storer(n, j0)
    );
}

/// AVX-512 register tiles: 6 input rows × 4 weight rows = 24 zmm accumulators, 4 weight and
/// 1 input registers per step (29 of 32), 2.4 FMAs per load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512<W: Weight>(
    out: OutPtr,
    x: &[f32],
    w: *const W,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let xp = x.as_ptr();
    let xs = |i: usize| xp.add(i * k);
    let ws = |j: usize| w.add(j * k);
    register_tiles!(
        avx512::tile,
        heights: [6 5 4 3 2 1],
        rows: rows,
        cols: j1 - j0,
        xs: xs,
        ws: ws,
        k: k,
        store: out.storer(n, j0)
    );
}

/// A weight element as the f32 tiles read it: f32 as it is, or bf16 / f16 widened in
/// registers, so a decode step on 16-bit weights in f32 arithmetic reads each weight byte once
/// instead of upcasting a block into a buffer and reading that back (half the speed).
#[cfg(target_arch = "x86_64")]
trait Weight: Copy {
    /// Sixteen values from `p` as f32 (AVX-512F).
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Eight values from `p` as f32 (AVX2).
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// The value at `p` as f32.
    unsafe fn get(p: *const Self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl Weight for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn get(p: *const f32) -> f32 {
        *p
    }
}

#[cfg(target_arch = "x86_64")]
impl Weight for half::bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
    }
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }
    #[inline(always)]
    unsafe fn get(p: *const Self) -> f32 {
        p.read_unaligned().to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
impl Weight for half::f16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    /// Needs F16C besides AVX2.
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn get(p: *const Self) -> f32 {
        p.read_unaligned().to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Dot products of `A` input rows with `B` weight rows of length `k` (f32, or bf16 / f16
    /// widened in registers) in zmm accumulators; the tail past a multiple of 16 is done in
    /// scalar FMAs.
    ///
    /// # Safety
    /// AVX-512F must be available; every pointer must be valid for `k` reads.
    #[inline(always)]
    pub unsafe fn tile<W: super::Weight, const A: usize, const B: usize>(
        x: [*const f32; A],
        w: [*const W; B],
        k: usize,
    ) -> [[f32; B]; A] {
        let mut acc = [[_mm512_setzero_ps(); B]; A];
        let main = k - k % 16;
        let mut i = 0;
        while i < main {
            let mut wv = [_mm512_setzero_ps(); B];
            for b in 0..B {
                wv[b] = W::load16(w[b].add(i));
            }
            for a in 0..A {
                let xv = _mm512_loadu_ps(x[a].add(i));
                for b in 0..B {
                    acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
                }
            }
            i += 16;
        }
        let mut out = [[0.0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                let mut s = _mm512_reduce_add_ps(acc[a][b]);
                for t in main..k {
                    s = (*x[a].add(t)).mul_add(W::get(w[b].add(t)), s);
                }
                out[a][b] = s;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Dot products of `A` input rows with `B` weight rows of length `k` (f32, or bf16 / f16
    /// widened in registers), in `A·B` ymm accumulators; the tail past a multiple of 8 is done
    /// in scalar FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available, and F16C for f16 weights; every pointer must be valid
    /// for `k` reads.
    #[inline(always)]
    pub unsafe fn tile<W: super::Weight, const A: usize, const B: usize>(
        x: [*const f32; A],
        w: [*const W; B],
        k: usize,
    ) -> [[f32; B]; A] {
        let mut acc = [[_mm256_setzero_ps(); B]; A];
        let main = k - k % 8;
        let mut i = 0;
        while i < main {
            let mut wv = [_mm256_setzero_ps(); B];
            for b in 0..B {
                wv[b] = W::load8(w[b].add(i));
            }
            for a in 0..A {
                let xv = _mm256_loadu_ps(x[a].add(i));
                for b in 0..B {
                    acc[a][b] = _mm256_fmadd_ps(xv, wv[b], acc[a][b]);
                }
            }
            i += 8;
        }
        let mut out = [[0.0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                let v = acc[a][b];
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                let mut s = _mm_cvtss_f32(s1);
                for t in main..k {
                    s = (*x[a].add(t)).mul_add(W::get(w[b].add(t)), s);
                }
                out[a][b] = s;
            }
        }
        out
    }
}

/// Portable tiles: 3 input rows × 4 weight rows of 8-lane accumulators (what LLVM can keep in
/// SSE registers).
#[allow(clippy::too_many_arguments)]
fn block_generic(
    out: OutPtr,
    x: &[f32],
    wb: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let xs = |r: usize| &x[r * k..(r + 1) * k];
    let ws = |c: usize| &wb[c * k..(c + 1) * k];
    let store = out.storer(n, j0);
    walk_tiles(
        rows,
        j1 - j0,
        3,
        |r, rx, c| {
            let w4 = [ws(c), ws(c + 1), ws(c + 2), ws(c + 3)];
            match rx {
                3 => emit(
                    tile::<3, 4>([xs(r), xs(r + 1), xs(r + 2)], w4),
                    r,
                    c,
                    &store,
                ),
                2 => emit(tile::<2, 4>([xs(r), xs(r + 1)], w4), r, c, &store),
                _ => emit(tile::<1, 4>([xs(r)], w4), r, c, &store),
            }
        },
        |r, c| store(r, c, tile::<1, 1>([xs(r)], [ws(c)])[0][0]),
    );
}

/// Walks a block's `rows × cols` output in register tiles of up to `rx_max × 4`: `tile(r, rx, c)`
/// computes the `rx × 4` tile at `(r, c)`; the last `cols % 4` columns go through `one(r, c)`.
#[inline(always)]
fn walk_tiles(
    rows: usize,
    cols: usize,
    rx_max: usize,
    mut tile: impl FnMut(usize, usize, usize),
    mut one: impl FnMut(usize, usize),
) {
    let mut r = 0;
    while r < rows {
        let rx = (rows - r).min(rx_max);
        let mut c = 0;
        while c + 4 <= cols {
            tile(r, rx, c);
            c += 4;
        }
        for c in c..cols {
            for i in r..r + rx {
                one(i, c);
            }
        }
        r += rx;
    }
}

#[inline(always)]
fn emit<const A: usize, const B: usize>(
    t: [[f32; B]; A],
    r: usize,
    c: usize,
    store: &impl Fn(usize, usize, f32),
) {
    for (i, row) in t.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            store(r + i, c + j, v);
        }
    }
}

/// Lanes of the portable accumulators (one SSE/AVX register's worth for LLVM).
const LANES: usize = 8;

/// Dot products of `A` input rows with `B` weight rows (all of length k).
#[inline(always)]
fn tile<const A: usize, const B: usize>(x: [&[f32]; A], w: [&[f32]; B]) -> [[f32; B]; A] {
    let k = x[0].len();
    let main = k - k % LANES;
    let mut acc = [[[0.0f32; LANES]; B]; A];
    let mut i = 0;
    while i < main {
        for a in 0..A {
            let xs = &x[a][i..i + LANES];
            for b in 0..B {
                let ws = &w[b][i..i + LANES];
                for l in 0..LANES {
                    acc[a][b][l] += xs[l] * ws[l];
                }
            }
        }
        i += LANES;
    }
    let mut out = [[0.0f32; B]; A];
    for a in 0..A {
        for b in 0..B {
            let mut s = hsum(&acc[a][b]);
            for t in main..k {
                s += x[a][t] * w[b][t];
            }
            out[a][b] = s;
        }
    }
    out
}

#[inline(always)]
fn hsum(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DType;

    /// The slow composition the fused kernel must equal: f64 dot products of upcast values.
    fn matmul_slow(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matches_slow_reference_for_every_dtype_and_ragged_shape() {
        let mut rnd = crate::test_rng::uniform(7);
        for (rows, n, k) in [
            (1, 37, 19),
            (5, 16, 64),
            (3, 70, 129),
            (13, 40, 300),
            (7, 9, 97),
            // From 16 rows the bf16 dot product takes the panel tiles: one, two, three and
            // four panels (the last partial), tails of every tile width, odd and even k.
            (16, 37, 19),
            (33, 70, 129),
            (47, 25, 64),
            (61, 53, 2),
            (16, 1, 1),
            // No inner dimension: zeros, with few rows and with many.
            (3, 4, 0),
            (16, 5, 0),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            // What bf16 precision computes with: the activations rounded to bf16.
            let x_bf16: Vec<f32> = x
                .iter()
                .map(|&v| f32::from_bits((dtype::f32_to_bf16_bits(v) as u32) << 16))
                .collect();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let w = HostTensor::from_f32(&wv, vec![n, k], dt);
                let want_f32 = matmul_slow(&x, &w.to_f32(), rows, n, k);
                let want_bf16 = matmul_slow(&x_bf16, &w.to_f32(), rows, n, k);
                // Every path this CPU can run, not only the widest (an AVX-512 machine runs
                // the AVX2 and portable tiles too), in both precisions.
                for isa in Isa::available() {
                    for precision in [Precision::F32, Precision::Bf16, Precision::Auto] {
                        let bf16 = precision.uses_bf16(dt, isa);
                        let want = if bf16 { &want_bf16 } else { &want_f32 };
                        let mut got = vec![f32::NAN; rows * n];
                        matmul_t_with(isa, precision, &mut got, &x, &w, rows, n, k);
                        for (i, (g, e)) in got.iter().zip(want).enumerate() {
                            assert!(
                                (g - e).abs() <= 1e-5 + 1e-5 * e.abs(),
                                "{isa:?} {precision:?} {dt} {rows}x{n}x{k} [{i}]: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
        assert!(Isa::available().contains(&Isa::Generic));
        // The tiles are an instruction set of their own only where they passed their probe.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Isa::AmxBf16.is_supported(),
            super::super::amx::usable().is_ok()
        );
        assert_eq!(Isa::parse("amxbf16"), Some(Isa::AmxBf16));
        // Only bf16 weights change arithmetic, and `auto` only where the dot product is.
        assert!(Precision::Bf16.uses_bf16(DType::BF16, Isa::Generic));
        assert!(!Precision::Bf16.uses_bf16(DType::F16, Isa::Avx512Bf16));
        assert!(Precision::Auto.uses_bf16(DType::BF16, Isa::Avx512Bf16));
        assert!(Precision::Auto.uses_bf16(DType::BF16, Isa::AmxBf16));
        assert!(!Precision::Auto.uses_bf16(DType::BF16, Isa::Avx512));
        assert!(!Precision::F32.uses_bf16(DType::BF16, Isa::Avx512Bf16));
    }

    #[test]
    fn a_group_gives_each_products_own_result() {
        let mut rnd = crate::test_rng::uniform(3);
        let k = 67;
        for rows in [1, 7, 21] {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            // Widths and dtypes that differ within the group, as q/k/v's widths do.
            let shapes = [
                (96, DType::BF16),
                (20, DType::BF16),
                (33, DType::F16),
                (8, DType::F32),
            ];
            let ws: Vec<HostTensor> = shapes
                .iter()
                .map(|&(n, dt)| {
                    let v: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
                    HostTensor::from_f32(&v, vec![n, k], dt)
                })
                .collect();
            for isa in Isa::available() {
                for precision in [Precision::F32, Precision::Bf16] {
                    let want: Vec<Vec<f32>> = ws
                        .iter()
                        .map(|w| {
                            let n = w.shape[0];
                            let mut out = vec![f32::NAN; rows * n];
                            matmul_t_with(isa, precision, &mut out, &x, w, rows, n, k);
                            out
                        })
                        .collect();
                    let mut got: Vec<Vec<f32>> = ws
                        .iter()
                        .map(|w| vec![f32::NAN; rows * w.shape[0]])
                        .collect();
                    let products = got.iter_mut().zip(&ws).map(|(out, w)| Product {
                        out,
                        w,
                        n: w.shape[0],
                    });
                    matmul_t_group_with(isa, precision, products, &x, rows, k);
                    assert_eq!(got, want, "{isa:?} {precision:?} rows {rows}");
                }
            }
        }
    }
}
