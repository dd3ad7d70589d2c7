//! Products of many input rows on Intel AMX (AMX-BF16: Xeon Sapphire Rapids and later), the
//! bf16 path of the big CPU servers: one `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a
//! 32 × 16 one into 16 × 16 f32 accumulators (16 384 FLOPs, against 64 for `vdpbf16ps`).
//!
//! The operands are the ones the AVX-512 panels already have, so nothing new is packed: the
//! product is computed transposed, `outᵀ = w · xᵀ`. A weight tile (`A`) is 16 weight rows × 32
//! values straight from the weight's bytes (a row stride of `2k`), and an activation tile
//! (`B`) is 16 bf16 pairs × 16 input rows — exactly 16 consecutive units of a packed panel
//! (`panels::pack_bf16`), 64 contiguous bytes a unit. Two weight tiles × two panels give four
//! accumulator tiles (the 2 × 2 register blocking of Intel's own kernels: 4 loads for 4
//! products, 8 tiles in all); each accumulator leaves through a 1 KiB buffer and the panels'
//! transposing store.
//!
//! The tile walk is written once over [`Tiles`]: [`Hardware`] runs the instructions, and
//! [`Emulated`] computes what Intel's pseudo-code for them says, so the walk, the operand
//! addresses and the stores are tested on every x86 machine, AMX or not. On a CPU with AMX
//! the first use compares the two on a small product and keeps AMX only if they agree
//! ([`usable`]), since this project's machines have no AMX to run the tests on.

use std::arch::x86_64::*;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::panels::{self, LANES};

/// Values of `k` an activation tile covers: 16 units of a bf16 pair.
pub const K_STEP: usize = 32;

/// Whether AMX takes a product of this depth: whole tiles along `k` only (every Llama width
/// is a multiple of 32; other products stay on the AVX-512 tiles).
pub fn takes(k: usize) -> bool {
    k > 0 && k.is_multiple_of(K_STEP)
}

/// Which tiles a product's blocks run on: decided once per product, so that every block of it
/// runs on the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileKind {
    Hardware,
    Emulated,
}

/// The tiles a bf16 product of depth `k` takes where `hardware` (the matmuls' instruction set
/// is `Isa::AmxBf16`): emulated ones while [`emulate_in_matmuls`] is on, none where the tiles
/// do not take `k`.
pub fn tiles_for(k: usize, hardware: bool) -> Option<TileKind> {
    if !takes(k) {
        None
    } else if emulating() {
        Some(TileKind::Emulated)
    } else if hardware {
        Some(TileKind::Hardware)
    } else {
        None
    }
}

/// [`block`] on the tiles of `kind`; emulated blocks are counted in [`emulated_blocks`].
///
/// # Safety
/// As [`block`]; [`TileKind::Hardware`] only where [`usable`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_on(
    kind: TileKind,
    out: *mut f32,
    xp: &[u32],
    w: *const u8,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    match kind {
        TileKind::Hardware => block(&mut Hardware, out, xp, w, rows, n, k, j0, j1),
        TileKind::Emulated => {
            EMULATED_BLOCKS.fetch_add(1, Ordering::Relaxed);
            block(&mut Emulated::default(), out, xp, w, rows, n, k, j0, j1)
        }
    }
}

/// The tile instructions the walk uses. Tiles 0–3 are accumulators (`C[a][b]` is tile
/// `2a + b`), 4–5 weight tiles, 6–7 activation tiles; every tile is 16 rows of 64 bytes.
pub trait Tiles {
    /// Loads the 16 × 64-byte configuration of all 8 tiles (`ldtilecfg`).
    ///
    /// # Safety
    /// On hardware, the process must hold AMX permission ([`usable`]).
    unsafe fn configure(&mut self);
    /// Clears accumulator `T` (`tilezero`).
    ///
    /// # Safety
    /// After [`Tiles::configure`].
    unsafe fn zero<const T: u8>(&mut self);
    /// Loads tile `T` from 16 rows of 64 bytes, `stride` bytes apart (`tileloadd`).
    ///
    /// # Safety
    /// After [`Tiles::configure`]; the 16 rows must be readable.
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize);
    /// `C += A · B` with bf16 pairs into f32 (`tdpbf16ps`).
    ///
    /// # Safety
    /// After [`Tiles::configure`].
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
    /// Stores tile `T` as 16 rows of 64 bytes, `stride` bytes apart (`tilestored`).
    ///
    /// # Safety
    /// After [`Tiles::configure`]; the 16 rows must be writable.
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize);
    /// Returns the tiles to their initial state (`tilerelease`), so that context switches
    /// stop saving 8 KiB of tile data.
    ///
    /// # Safety
    /// After [`Tiles::configure`].
    unsafe fn release(&mut self);
}

/// The AMX instructions themselves, one `asm!` each. The tile registers live from one to the
/// next, which the compiler does not know of: it never uses them itself (it emits AMX code only
/// for AMX intrinsics, which this project does not use), and between [`Tiles::configure`] and
/// [`Tiles::release`] the walk calls nothing that could (no rayon, no allocation, no I/O).
pub struct Hardware;

/// The `ldtilecfg` operand: palette 1, every tile 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const ALL_FULL: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    };
}

impl Tiles for Hardware {
    #[inline(always)]
    unsafe fn configure(&mut self) {
        let cfg = TileConfig::ALL_FULL;
        std::arch::asm!(
            "ldtilecfg [{}]",
            in(reg) cfg.0.as_ptr(),
            options(nostack, readonly, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn zero<const T: u8>(&mut self) {
        std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags));
    }
    #[inline(always)]
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize) {
        std::arch::asm!(
            "tileloadd tmm{t}, [{src} + {stride}*1]",
            t = const T,
            src = in(reg) src,
            stride = in(reg) stride,
            options(nostack, readonly, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        std::arch::asm!(
            "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
            c = const C,
            a = const A,
            b = const B,
            options(nostack, nomem, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize) {
        std::arch::asm!(
            "tilestored [{dst} + {stride}*1], tmm{t}",
            t = const T,
            dst = in(reg) dst,
            stride = in(reg) stride,
            options(nostack, preserves_flags)
        );
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}

/// The instructions in software, as the Intel SDM's pseudo-code defines them. `tdpbf16ps`:
/// for each accumulator, the even and the odd products of the pairs are summed apart, from
/// zero, along the 16 pairs; their two sums are added, and that sum to the accumulator. Every
/// addition rounds to nearest even (the products of two bf16 values are exact in f32), and
/// bf16 inputs and f32 results below the normal range are zero.
pub struct Emulated {
    tiles: [[u32; 256]; 8],
    configured: bool,
}

impl Default for Emulated {
    fn default() -> Self {
        Emulated {
            tiles: [[0; 256]; 8],
            configured: false,
        }
    }
}

impl Emulated {
    fn tile(&mut self, t: u8) -> &mut [u32; 256] {
        assert!(self.configured, "tile {t} used before ldtilecfg");
        &mut self.tiles[t as usize]
    }
}

/// A bf16 value widened, denormals as zero (the instruction's DAZ).
fn bf16_daz(bits: u16) -> f32 {
    ftz(f32::from_bits((bits as u32) << 16))
}

/// An f32 value flushed to zero below the normal range (the instruction's FTZ; its DAZ too,
/// a widened bf16 being subnormal exactly when the bf16 is).
fn ftz(v: f32) -> f32 {
    if v.is_subnormal() {
        0.0f32.copysign(v)
    } else {
        v
    }
}

impl Tiles for Emulated {
    unsafe fn configure(&mut self) {
        self.configured = true;
    }
    unsafe fn zero<const T: u8>(&mut self) {
        self.tile(T).fill(0);
    }
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize) {
        let tile = self.tile(T);
        for (r, row) in tile.chunks_exact_mut(16).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                // SAFETY: the caller guarantees 16 readable rows of 64 bytes.
                *v = unsafe { (src.add(r * stride + 4 * c) as *const u32).read_unaligned() };
            }
        }
    }
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        assert!(C < 4 && (4..8).contains(&A) && (4..8).contains(&B));
        let (a, b) = (*self.tile(A), *self.tile(B));
        let c = self.tile(C);
        for m in 0..16 {
            for n in 0..16 {
                let (mut even, mut odd) = (0.0f32, 0.0f32);
                for kk in 0..16 {
                    let (pa, pb) = (a[m * 16 + kk], b[kk * 16 + n]);
                    even = ftz(even + bf16_daz(pa as u16) * bf16_daz(pb as u16));
                    odd = ftz(odd + bf16_daz((pa >> 16) as u16) * bf16_daz((pb >> 16) as u16));
                }
                let acc = ftz(f32::from_bits(c[m * 16 + n]));
                c[m * 16 + n] = ftz(acc + ftz(even + odd)).to_bits();
            }
        }
    }
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize) {
        let tile = *self.tile(T);
        for (r, row) in tile.chunks_exact(16).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                // SAFETY: the caller guarantees 16 writable rows of 64 bytes.
                unsafe { (dst.add(r * stride + 4 * c) as *mut u32).write_unaligned(v) };
            }
        }
    }
    unsafe fn release(&mut self) {
        self.configured = false;
    }
}

/// `out[rows, n]` columns `j0..j1` of `x · wᵀ` on tiles, as [`panels::block_bf16`] computes
/// them: `xp` the activations packed by [`panels::pack_bf16`], `w` weight row `j0` of `k`
/// bf16 values. Columns past the last whole 16 go to the AVX-512 panels.
///
/// # Safety
/// AVX-512F and AVX-512 BF16 must be available, and for [`Hardware`] the AMX permission
/// ([`usable`]); [`takes`]`(k)`; otherwise as [`panels::block_bf16`].
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block<T: Tiles>(
    tiles: &mut T,
    out: *mut f32,
    xp: &[u32],
    w: *const u8,
    rows: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    debug_assert!(takes(k));
    let panel_count = rows.div_ceil(LANES);
    let whole = j0 + (j1 - j0) / LANES * LANES;
    let walk = Walk {
        out,
        xp: xp.as_ptr() as *const u8,
        w,
        j0,
        rows,
        n,
        k,
    };
    if whole > j0 {
        tiles.configure();
        let mut j = j0;
        while j < whole {
            let two_weight_tiles = whole - j >= 2 * LANES;
            for p in (0..panel_count).step_by(2) {
                match (two_weight_tiles, panel_count - p >= 2) {
                    (true, true) => walk.pass::<T, 2, 2>(tiles, p, j),
                    (true, false) => walk.pass::<T, 2, 1>(tiles, p, j),
                    (false, true) => walk.pass::<T, 1, 2>(tiles, p, j),
                    (false, false) => walk.pass::<T, 1, 1>(tiles, p, j),
                }
            }
            j += if two_weight_tiles { 2 * LANES } else { LANES };
        }
        tiles.release();
    }
    if whole < j1 {
        panels::block_bf16(out, xp, w.add((whole - j0) * 2 * k), rows, n, k, whole, j1);
    }
}

/// One block's operands: the output, the packed panels' bytes, weight row `j0`.
struct Walk {
    out: *mut f32,
    xp: *const u8,
    w: *const u8,
    j0: usize,
    rows: usize,
    n: usize,
    k: usize,
}

impl Walk {
    /// One `NA × NB` block of accumulator tiles over the whole of `k`, then its store: weight
    /// rows `j..j + 16·NA` against panels `p..p + NB`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pass<T: Tiles, const NA: usize, const NB: usize>(
        &self,
        tiles: &mut T,
        p: usize,
        j: usize,
    ) {
        let k = self.k;
        // A weight row; a panel (k/2 units of 16 lanes); a k-step of one (16 units); a unit.
        let w_row = 2 * k;
        let panel_bytes = k / 2 * LANES * 4;
        let step_bytes = K_STEP / 2 * LANES * 4;
        let unit_bytes = LANES * 4;
        let wj = self.w.add((j - self.j0) * w_row);
        let xs = self.xp.add(p * panel_bytes);
        let a_bytes = LANES * w_row;
        tiles.zero::<0>();
        if NB == 2 {
            tiles.zero::<1>();
        }
        if NA == 2 {
            tiles.zero::<2>();
            if NB == 2 {
                tiles.zero::<3>();
            }
        }
        for s in 0..k / K_STEP {
            tiles.load::<4>(wj.add(s * 2 * K_STEP), w_row);
            tiles.load::<6>(xs.add(s * step_bytes), unit_bytes);
            tiles.dot::<0, 4, 6>();
            if NB == 2 {
                tiles.load::<7>(xs.add(panel_bytes + s * step_bytes), unit_bytes);
                tiles.dot::<1, 4, 7>();
            }
            if NA == 2 {
                tiles.load::<5>(wj.add(a_bytes + s * 2 * K_STEP), w_row);
                tiles.dot::<2, 5, 6>();
                if NB == 2 {
                    tiles.dot::<3, 5, 7>();
                }
            }
        }
        // Accumulator `2a + b` row `c` is weight row `j + 16a + c` for panel `p + b`'s 16
        // rows: one column of the output, as the panels' store takes them.
        let mut acc = [[0.0f32; 256]; 4];
        tiles.store::<0>(acc[0].as_mut_ptr() as *mut u8, unit_bytes);
        if NB == 2 {
            tiles.store::<1>(acc[1].as_mut_ptr() as *mut u8, unit_bytes);
        }
        if NA == 2 {
            tiles.store::<2>(acc[2].as_mut_ptr() as *mut u8, unit_bytes);
            if NB == 2 {
                tiles.store::<3>(acc[3].as_mut_ptr() as *mut u8, unit_bytes);
            }
        }
        for a in 0..NA {
            let cols: [[__m512; NB]; LANES] = std::array::from_fn(|c| {
                std::array::from_fn(|b| _mm512_loadu_ps(acc[2 * a + b][c * LANES..].as_ptr()))
            });
            panels::store::<LANES, NB>(cols, self.out, self.rows, self.n, p * LANES, j + a * LANES);
        }
    }
}

/// Whether the matmuls run their AMX path on [`Emulated`] tiles (see [`emulate_in_matmuls`]).
static EMULATING: AtomicBool = AtomicBool::new(false);
/// Blocks the matmuls have run on [`Emulated`] tiles.
static EMULATED_BLOCKS: AtomicUsize = AtomicUsize::new(0);

/// Makes every later matmul that would take the AMX tiles on an AMX CPU take them on
/// [`Emulated`] tiles, on any CPU with the bf16 dot product: how the matmuls' AMX path (the
/// choice of products, the blocks' operands) is tested on machines without AMX.
/// Process-wide, like `Isa::force`: tests that set it run in a test binary of their own.
pub fn emulate_in_matmuls(on: bool) {
    EMULATING.store(on, Ordering::Relaxed);
}

/// Whether [`emulate_in_matmuls`] is on.
pub fn emulating() -> bool {
    EMULATING.load(Ordering::Relaxed)
}

/// How many weight blocks the matmuls have run on [`Emulated`] tiles in this process.
pub fn emulated_blocks() -> usize {
    EMULATED_BLOCKS.load(Ordering::Relaxed)
}

/// FLOPs of one round of [`dot_chains`]: four `tdpbf16ps`, each 16 × 16 × 32 products and
/// their sums.
pub const CHAIN_FLOPS: usize = 4 * 16 * 16 * 32 * 2;

/// `reps` rounds of four independent `tdpbf16ps` on register-resident tiles: the tiles' peak
/// rate, for the bench's ceilings.
///
/// # Safety
/// The tiles must be usable ([`usable`]).
pub unsafe fn dot_chains(reps: usize) {
    let zeros = [0u8; 1024];
    let mut t = Hardware;
    t.configure();
    t.zero::<0>();
    t.zero::<1>();
    t.zero::<2>();
    t.zero::<3>();
    t.load::<4>(zeros.as_ptr(), 64);
    t.load::<5>(zeros.as_ptr(), 64);
    t.load::<6>(zeros.as_ptr(), 64);
    t.load::<7>(zeros.as_ptr(), 64);
    for _ in 0..reps {
        t.dot::<0, 4, 6>();
        t.dot::<1, 4, 7>();
        t.dot::<2, 5, 6>();
        t.dot::<3, 5, 7>();
    }
    t.release();
}

static USABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Whether this process can run the AMX tiles, decided once: the CPU has AMX-BF16 (and the
/// AVX-512 BF16 the walk's edges use), Linux grants the process the tile state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and a small product on the tiles agrees with
/// [`Emulated`]. `Err` says which of these failed.
pub fn usable() -> Result<(), String> {
    USABLE
        .get_or_init(|| {
            #[cfg(target_os = "linux")]
            {
                if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
                {
                    return Err("no AVX-512 BF16".into());
                }
                if !cpu_has_amx_bf16() {
                    return Err("no AMX-BF16".into());
                }
                request_tile_permission()?;
                self_check()
            }
            #[cfg(not(target_os = "linux"))]
            Err("AMX is used on x86-64 Linux only".into())
        })
        .clone()
}

/// Whether the CPU has AMX-BF16 (whether or not this process may use it).
fn cpu_has_amx_bf16() -> bool {
    if __cpuid(0).eax < 7 {
        return false; // no leaf 7: a CPU from before AVX2
    }
    // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Why the matmuls do not use the AMX this CPU has, once [`usable`] has been asked; `None`
/// where they do, where there is none, or where nothing asked (an instruction set forced
/// narrower, which is how to skip the probe). For a one-line note when a command starts.
pub fn unused_reason() -> Option<String> {
    if cpu_has_amx_bf16() {
        return USABLE.get().and_then(|u| u.clone().err());
    }
    None
}

/// Asks Linux for the tile data state, which a process must do before its first tile
/// instruction (without it, `ldtilecfg` faults).
#[cfg(target_os = "linux")]
fn request_tile_permission() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if rc != 0 {
        // ENOSPC: a thread's signal stack is too small for the tile state; EOPNOTSUPP: the
        // kernel has not enabled it; EINVAL: a kernel before 5.16.
        return Err(format!(
            "Linux refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM: {})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A 40 × 56 × 64 product (both walks, one and two tiles of each kind, a partial panel, a
/// column tail) on the tiles and in [`Emulated`], which must agree to the rounding of a sum.
#[cfg(target_os = "linux")]
fn self_check() -> Result<(), String> {
    let (rows, n, k) = (40, 56, 64);
    let (x, w) = sample(rows, n, k);
    // SAFETY: AVX-512 BF16 and AMX-BF16 are present and the permission granted (checked by
    // the caller); k = 64 takes whole tiles.
    let (hw, emulated) = unsafe {
        (
            product(&mut Hardware, &x, &w, rows, n, k, n),
            product(&mut Emulated::default(), &x, &w, rows, n, k, n),
        )
    };
    match disagreement(&hw, &emulated, &x, &w, rows, n, k) {
        None => Ok(()),
        Some(what) => Err(format!(
            "the tiles disagree with their emulation on a {rows}×{n}×{k} product ({what}); \
             kept off"
        )),
    }
}

/// Where two results of `x · wᵀ` differ by more than two sums of `k` terms can by rounding
/// alone (`2·k·ε·Σ|x·w|` per element, `x` rounded to bf16): the first such element, or `None`.
#[allow(clippy::too_many_arguments)]
pub fn disagreement(
    a: &[f32],
    b: &[f32],
    x: &[f32],
    w: &[u16],
    rows: usize,
    n: usize,
    k: usize,
) -> Option<String> {
    let (_, magnitude) = exact_product(x, w, rows, n, k);
    for (i, ((&u, &v), m)) in a.iter().zip(b).zip(magnitude).enumerate() {
        let bound = 2.0 * k as f64 * f32::EPSILON as f64 * m;
        if (u as f64 - v as f64).abs() > bound || u.is_nan() != v.is_nan() {
            let (r, j) = (i / n, i % n);
            return Some(format!(
                "row {r}, column {j}: {u} against {v}, bound {bound:e}"
            ));
        }
    }
    None
}

/// `x · wᵀ` in f64 from the bf16-rounded activations (its rounding far below f32's), and each
/// element's `Σ|x·w|`, the scale of the rounding errors an f32 sum of the same terms can make.
pub fn exact_product(
    x: &[f32],
    w: &[u16],
    rows: usize,
    n: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let xr: Vec<f64> = x[..rows * k]
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f64())
        .collect();
    let wr: Vec<f64> = w[..n * k]
        .iter()
        .map(|&b| half::bf16::from_bits(b).to_f64())
        .collect();
    let mut exact = vec![0.0; rows * n];
    let mut magnitude = vec![0.0; rows * n];
    for r in 0..rows {
        for j in 0..n {
            for i in 0..k {
                let t = xr[r * k + i] * wr[j * k + i];
                exact[r * n + j] += t;
                magnitude[r * n + j] += t.abs();
            }
        }
    }
    (exact, magnitude)
}

/// Deterministic activations `[rows, k]` and bf16 weights `[n, k]` of mixed signs.
pub fn sample(rows: usize, n: usize, k: usize) -> (Vec<f32>, Vec<u16>) {
    let x = (0..rows * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let w = (0..n * k)
        .map(|i| half::bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 40.0).to_bits())
        .collect();
    (x, w)
}

/// The panels of [`panels::pack_bf16`], packed value by value on the calling thread: the
/// first-use check runs while the instruction set is being decided, where a rayon task could
/// be waiting on that decision (a deadlock if the check waited on rayon in turn).
pub fn pack_on_this_thread(x: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let units = k.div_ceil(2);
    let mut xp = vec![0u32; rows.div_ceil(LANES) * units * LANES];
    let bf16 = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
    for r in 0..rows {
        let row = &x[r * k..(r + 1) * k];
        for u in 0..units {
            let high = row.get(2 * u + 1).map_or(0, |&v| bf16(v));
            xp[((r / LANES) * units + u) * LANES + r % LANES] = bf16(row[2 * u]) | high << 16;
        }
    }
    xp
}

/// `x · wᵀ` (`x` `[rows, k]` f32, rounded to bf16 as the matmuls do; `w` `[n, k]` bf16 bits)
/// through [`block`] on `tiles`, in blocks of `block_cols` weight rows, on this thread.
///
/// # Safety
/// As [`block`].
pub unsafe fn product<T: Tiles>(
    tiles: &mut T,
    x: &[f32],
    w: &[u16],
    rows: usize,
    n: usize,
    k: usize,
    block_cols: usize,
) -> Vec<f32> {
    assert!(x.len() >= rows * k && w.len() >= n * k && takes(k) && rows > 0);
    let xp = pack_on_this_thread(x, rows, k);
    let mut out = vec![0.0f32; rows * n];
    let wb = w.as_ptr() as *const u8;
    for j0 in (0..n).step_by(block_cols.max(1)) {
        let j1 = (j0 + block_cols).min(n);
        block(
            tiles,
            out.as_mut_ptr(),
            &xp,
            wb.add(j0 * k * 2),
            rows,
            n,
            k,
            j0,
            j1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says why a test did not run, past the harness's capture of passing tests' output (in
    /// lower case: `gpu_checks.sh` fails on "SKIPPED", which marks a GPU test skipped).
    fn skip(why: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{why}");
    }

    /// Why the tile tests cannot run here, if they cannot: the walk's edges and the packing
    /// use AVX-512 BF16.
    fn missing_avx512_bf16() -> Option<&'static str> {
        let ok = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16");
        (!ok).then_some("skipped: this CPU has no AVX-512 BF16, which the tile walk's edges use")
    }

    /// Within the rounding error that `k` f32 additions can make.
    fn assert_close(got: &[f32], want: &(Vec<f64>, Vec<f64>), k: usize, what: &str) {
        for (i, (&g, (&e, &m))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
            let bound = k as f64 * f32::EPSILON as f64 * m + 1e-30;
            assert!(
                (g as f64 - e).abs() <= bound,
                "{what}: element {i}: {g} against {e} (bound {bound:e})"
            );
        }
    }

    #[test]
    fn tiles_compute_the_product_on_ragged_shapes_in_emulation() {
        if let Some(why) = missing_avx512_bf16() {
            skip(why);
            return;
        }
        // Partial panels (17, 33, 40 rows), odd panel counts, one and two weight tiles, column
        // tails that go to the AVX-512 panels (7, 40, 72), and depths of 1, 3 and 24 steps.
        for &(rows, n, k) in &[
            (16, 16, 32),
            (17, 40, 64),
            (33, 72, 96),
            (40, 7, 32),
            (64, 48, 768),
            (20, 96, 64),
        ] {
            let (x, w) = sample(rows, n, k);
            let want = exact_product(&x, &w, rows, n, k);
            for block_cols in [16, 32, n] {
                // SAFETY: AVX-512 BF16 is present (checked above); every k is a multiple of 32.
                let got =
                    unsafe { product(&mut Emulated::default(), &x, &w, rows, n, k, block_cols) };
                assert_close(
                    &got,
                    &want,
                    k,
                    &format!("{rows}×{n}×{k}, blocks of {block_cols}"),
                );
            }
        }
    }

    #[test]
    fn tiles_agree_with_the_avx512_panels() {
        if let Some(why) = missing_avx512_bf16() {
            skip(why);
            return;
        }
        let (rows, n, k) = (48, 64, 256);
        let (x, w) = sample(rows, n, k);
        // SAFETY: AVX-512 BF16 is present (checked above).
        let (tiles, avx512) = unsafe {
            let tiles = product(&mut Emulated::default(), &x, &w, rows, n, k, 32);
            let mut xp = vec![];
            panels::pack_bf16(&x, rows, k, &mut xp);
            let mut out = vec![0.0f32; rows * n];
            panels::block_bf16(
                out.as_mut_ptr(),
                &xp,
                w.as_ptr() as *const u8,
                rows,
                n,
                k,
                0,
                n,
            );
            (tiles, out)
        };
        if let Some(what) = disagreement(&tiles, &avx512, &x, &w, rows, n, k) {
            panic!("the tiles disagree with the AVX-512 panels: {what}");
        }
    }

    #[test]
    fn packing_on_one_thread_gives_the_panels() {
        if let Some(why) = missing_avx512_bf16() {
            skip(why);
            return;
        }
        for &(rows, k) in &[(16, 32), (17, 7), (40, 64), (5, 1)] {
            let (x, _) = sample(rows, 1, k);
            let mut xp = vec![];
            // SAFETY: AVX-512 is present (checked above).
            unsafe { panels::pack_bf16(&x, rows, k, &mut xp) };
            let serial = pack_on_this_thread(&x, rows, k);
            assert_eq!(xp[..serial.len()], serial[..], "{rows}×{k}");
        }
    }

    #[test]
    fn emulated_dot_follows_intels_pseudocode() {
        // Accumulator (0, 0) starts at 1, and its pair's two products are 2⁻²⁴ each: summed
        // apart and then together they make 2⁻²³, and 1 + 2⁻²³ is a float; added to the
        // accumulator one at a time, each would round away (ties to even), leaving 1.
        let tiny = half::bf16::from_f32(2f32.powi(-12)).to_bits() as u32;
        let one = half::bf16::from_f32(1.0).to_bits() as u32;
        let mut a = [0u32; 256];
        let mut b = [0u32; 256];
        a[0] = tiny | tiny << 16;
        b[0] = tiny | tiny << 16;
        // Accumulator (1, 1): a denormal bf16 (exponent 0) counts as zero, so of the pair
        // (denormal·1, 1·1) only the second product adds: 1 + 1.
        a[16] = 0x0040 | one << 16;
        b[1] = one | one << 16;
        // Accumulator (2, 2), over two pairs: the even products 2²⁶ and −2²⁶ cancel in their own
        // sum before the odd ones (1 and 1) join; added one at a time, 1 + 2²⁶ would round the
        // 1 away (3 against 1).
        let big = half::bf16::from_f32(8192.0).to_bits() as u32;
        let minus_big = half::bf16::from_f32(-8192.0).to_bits() as u32;
        a[2 * 16] = big | one << 16;
        a[2 * 16 + 1] = minus_big | one << 16;
        b[2] = big | one << 16;
        b[16 + 2] = big | one << 16;
        let ones = [f32::to_bits(1.0); 256];
        let mut t = Emulated::default();
        // SAFETY: the emulation reads and writes only the arrays given, 16 rows of 64 bytes.
        let c = unsafe {
            t.configure();
            t.load::<0>(ones.as_ptr() as *const u8, 64);
            t.load::<4>(a.as_ptr() as *const u8, 64);
            t.load::<6>(b.as_ptr() as *const u8, 64);
            t.dot::<0, 4, 6>();
            let mut c = [0u32; 256];
            t.store::<0>(c.as_mut_ptr() as *mut u8, 64);
            t.release();
            c
        };
        let at = |m: usize, n: usize| f32::from_bits(c[m * 16 + n]);
        assert_eq!(
            at(0, 0),
            1.0 + 2f32.powi(-23),
            "products summed apart first"
        );
        assert_eq!(at(1, 1), 2.0, "denormal input as zero");
        assert_eq!(at(2, 2), 3.0, "even and odd sums along the pairs");
        // Row 3 of A is zero: its accumulators stay at 1.
        assert_eq!(at(3, 5), 1.0);
    }

    #[test]
    fn hardware_tiles_match_their_emulation() {
        if let Err(why) = usable() {
            skip(&format!("skipped: AMX tiles not usable here ({why})"));
            return;
        }
        for &(rows, n, k, cols) in &[(64, 96, 768, 32), (33, 40, 96, 16), (16, 16, 32, 16)] {
            let (x, w) = sample(rows, n, k);
            // SAFETY: `usable` checked the CPU, the permission and AVX-512 BF16.
            let (hw, emulated) = unsafe {
                (
                    product(&mut Hardware, &x, &w, rows, n, k, cols),
                    product(&mut Emulated::default(), &x, &w, rows, n, k, cols),
                )
            };
            assert_close(&hw, &exact_product(&x, &w, rows, n, k), k, "hardware");
            if let Some(what) = disagreement(&hw, &emulated, &x, &w, rows, n, k) {
                panic!("{rows}×{n}×{k}: the tiles disagree with their emulation: {what}");
            }
        }
    }
}
