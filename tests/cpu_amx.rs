//! The matmuls' AMX path through the whole Llama forward, on emulated tiles
//! (`amx::emulate_in_matmuls`, process-wide, hence a test binary of its own): which products
//! take the tiles, and each block's operands, checked on machines without AMX. The
//! instructions themselves are checked against the emulation by `amx`'s own tests and by the
//! first-use check on a CPU that has them.
#![cfg(target_arch = "x86_64")]

mod common;

use common::*;
use cycleqd_engine::backend::cpu::{amx, Isa, Precision};
use cycleqd_engine::model::read_safetensors_file;

/// As in `tests/cpu_isa.rs`: two bf16 paths differ only in summation order, which can tip an
/// activation's rounding to bf16.
const PATHS_TOL: f32 = 1e-2;

#[test]
fn emulated_tiles_give_the_bf16_paths_logits() {
    if !Isa::available().contains(&Isa::Avx512Bf16) {
        use std::io::Write;
        // Past the harness's capture, in lower case (see `amx`'s tests).
        let _ = writeln!(
            std::io::stderr(),
            "skipped: this CPU has no AVX-512 BF16, which the tile walk's edges use"
        );
        return;
    }
    let name = "tiny-gqa-bf16";
    let dir = llama_dir(name);
    let truth = read_safetensors_file(&dir.join("expected.safetensors")).unwrap();
    let theirs_path = repo_file(&format!("tests/data/llama-bf16/{name}.safetensors"));
    let theirs = read_safetensors_file(&theirs_path).unwrap();
    Isa::force(Some(Isa::Avx512Bf16));
    Precision::set(Precision::Bf16);
    let mut longest = 0;
    for (i, e) in expected(&dir).iter().enumerate() {
        amx::emulate_in_matmuls(false);
        let panels = prompt_logits(&dir, &e.ids);
        let before = amx::emulated_blocks();
        amx::emulate_in_matmuls(true);
        let tiles = prompt_logits(&dir, &e.ids);
        let blocks = amx::emulated_blocks() - before;
        // The panels (hence the tiles) take products of 16 rows and more.
        if e.ids.len() >= 16 {
            assert!(blocks > 0, "prompt {i}: no product took the tiles");
        } else {
            assert_eq!(blocks, 0, "prompt {i}: {} rows took the tiles", e.ids.len());
        }
        longest = longest.max(e.ids.len());
        let truth = truth[&format!("logits_{i}")].to_f32();
        let theirs = theirs[&format!("logits_{i}")].to_f32();
        let tol = 2.0 * max_abs_diff(&theirs, &truth);
        let (vs_panels, vs_theirs) = (max_abs_diff(&tiles, &panels), max_abs_diff(&tiles, &theirs));
        eprintln!(
            "prompt {i} ({} tokens, {blocks} tile blocks): max |Δ| vs the AVX-512 panels \
             {vs_panels:.2e}, vs transformers bf16 {vs_theirs:.2e} (tolerance {tol:.2e})",
            e.ids.len()
        );
        assert!(vs_panels <= PATHS_TOL, "prompt {i}: {vs_panels}");
        assert!(vs_theirs <= tol, "prompt {i}: {vs_theirs} > {tol}");
    }
    assert!(
        longest >= 16,
        "no reference prompt is long enough for the tiles"
    );
    amx::emulate_in_matmuls(false);
    Isa::force(None);
}
