//! Every CPU instruction-set path through the whole Llama forward, forced one at a time, in
//! both precisions. Forcing is process-wide, so this test binary holds a single test.
//!
//! - f32: every path gives transformers' f32 logits (the shared reference) within 1e-4.
//! - bf16 (activations rounded to bf16 at each matmul, bf16 weights, f32 accumulation): every
//!   path gives the same logits as every other to within bf16's rounding (bf16 products are
//!   exact in f32, so only the summation order differs, which can tip a rounding), and they
//!   are as close to transformers' own bf16 logits (`tests/data/llama-bf16`, written by
//!   `scripts/transformers_bf16_reference.py`) as bf16 lets two implementations be: within
//!   twice the distance between transformers' bf16 and f32 logits of the same prompt (3e-2 at
//!   most on these prompts). Ours is also no farther from the f32 truth than that.

mod common;

use std::path::PathBuf;

use common::*;
use cycleqd_engine::backend::cpu::{CpuBackend, Isa, Precision};
use cycleqd_engine::llama::LlamaModel;
use cycleqd_engine::model::{read_safetensors_file, DType, ModelStore};

const F32_TOL: f32 = 1e-4;
/// Between the bf16 paths: summation order differs by ~1e-7, but an activation that lands near a
/// bf16 rounding boundary can round the other way (a step of 2⁻⁸ of its value) and carry on.
/// Measured up to ~5e-3 here; a third of what separates transformers' bf16 from its f32.
const PATHS_TOL: f32 = 1e-2;

fn bf16_reference(name: &str) -> PathBuf {
    repo_file(&format!("tests/data/llama-bf16/{name}.safetensors"))
}

#[test]
fn every_isa_path_in_both_precisions_gives_the_reference_logits() {
    let isas = Isa::available();
    eprintln!(
        "paths on this CPU: {:?}",
        isas.iter().map(|i| i.name()).collect::<Vec<_>>()
    );
    assert!(isas.contains(&Isa::Generic), "{isas:?}");
    for name in REFERENCE_MODELS {
        let dir = llama_dir(name);
        let f32_ref = read_safetensors_file(&dir.join("expected.safetensors")).unwrap();
        let bf16_ref = std::fs::metadata(bf16_reference(name))
            .is_ok()
            .then(|| read_safetensors_file(&bf16_reference(name)).unwrap());
        // The KV cache follows the arithmetic: bf16 where the model's products are bf16 (as
        // transformers keeps a bf16 model's cache), f32 otherwise.
        let model = LlamaModel::load(&CpuBackend, &ModelStore::open_llama(&dir).unwrap()).unwrap();
        Precision::set(Precision::Bf16);
        let want = if bf16_ref.is_some() {
            DType::BF16
        } else {
            DType::F32
        };
        assert_eq!(model.kv_dtype(&CpuBackend), want, "{name} bf16 KV cache");
        Precision::set(Precision::F32);
        assert_eq!(
            model.kv_dtype(&CpuBackend),
            DType::F32,
            "{name} f32 KV cache"
        );
        for (i, e) in expected(&dir).iter().enumerate() {
            let truth = f32_ref[&format!("logits_{i}")].to_f32();
            let mut first_bf16: Option<Vec<f32>> = None;
            for &isa in &isas {
                Isa::force(Some(isa));
                Precision::set(Precision::F32);
                let got = prompt_logits(&dir, &e.ids);
                let d = max_abs_diff(&got, &truth);
                eprintln!(
                    "{name} prompt {i} {} f32: max |Δ| vs transformers f32 {d:.2e}",
                    isa.name()
                );
                assert!(
                    d <= F32_TOL,
                    "{name} prompt {i} {isa:?} f32: {d} > {F32_TOL}"
                );

                Precision::set(Precision::Bf16);
                let got = prompt_logits(&dir, &e.ids);
                let Some(bf16_ref) = &bf16_ref else {
                    // bf16 precision leaves f16 weights in f32 arithmetic.
                    let d = max_abs_diff(&got, &truth);
                    assert!(
                        d <= F32_TOL,
                        "{name} prompt {i} {isa:?} bf16 on f16 weights: {d}"
                    );
                    continue;
                };
                let theirs = bf16_ref[&format!("logits_{i}")].to_f32();
                let tol = 2.0 * max_abs_diff(&theirs, &truth);
                let (vs_theirs, vs_truth) =
                    (max_abs_diff(&got, &theirs), max_abs_diff(&got, &truth));
                eprintln!(
                    "{name} prompt {i} {} bf16: max |Δ| vs transformers bf16 {vs_theirs:.2e}, vs f32 {vs_truth:.2e} (tolerance {tol:.2e})",
                    isa.name()
                );
                assert!(
                    vs_theirs <= tol,
                    "{name} prompt {i} {isa:?} bf16: {vs_theirs} > {tol}"
                );
                assert!(
                    vs_truth <= tol,
                    "{name} prompt {i} {isa:?} bf16 vs f32: {vs_truth} > {tol}"
                );
                // Really rounded: bf16 arithmetic is not the f32 path's.
                assert!(
                    vs_truth > F32_TOL,
                    "{name} prompt {i} {isa:?}: bf16 equals f32"
                );
                match &first_bf16 {
                    None => first_bf16 = Some(got),
                    Some(first) => {
                        let d = max_abs_diff(&got, first);
                        eprintln!("  {} bf16 vs the widest path: {d:.2e}", isa.name());
                        assert!(
                            d <= PATHS_TOL,
                            "{name} prompt {i} {isa:?} bf16 vs widest: {d}"
                        );
                    }
                }
            }
        }
    }
    Isa::force(None);
}
