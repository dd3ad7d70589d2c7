//! The CPU Llama path against transformers' reference vectors (`../shared/testdata/llama`):
//! full logits of every prompt, greedy continuations up to the first indecisive step, the
//! tokenizer's ids, and batched generation equal to one-at-a-time generation.

mod common;

use common::*;
use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::llama::{generate, score_continuations, GenerateOptions, LlamaModel};
use cycleqd_engine::model::{read_safetensors_file, ModelStore, Tokenizer};

/// transformers computes in f32 on the same upcast weights; only summation order differs.
const LOGIT_TOL: f32 = 1e-4;

#[test]
fn full_logits_match_transformers() {
    for name in REFERENCE_MODELS {
        let dir = llama_dir(name);
        let want = read_safetensors_file(&dir.join("expected.safetensors")).unwrap();
        for (i, e) in expected(&dir).iter().enumerate() {
            let got = prompt_logits(&dir, &e.ids);
            let reference = want[&format!("logits_{i}")].to_f32();
            let d = max_abs_diff(&got, &reference);
            eprintln!("{name} prompt {i}: max |Δlogit| = {d:.2e}");
            assert!(
                d <= LOGIT_TOL,
                "{name} prompt {i}: max |Δlogit| {d} > {LOGIT_TOL}"
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers_while_decisive() {
    let be = CpuBackend;
    for name in REFERENCE_MODELS {
        let dir = llama_dir(name);
        let store = ModelStore::open_llama(&dir).unwrap();
        let model = LlamaModel::load(&be, &store).unwrap();
        let exp = expected(&dir);
        let prompts: Vec<Vec<u32>> = exp.iter().map(|e| e.ids.clone()).collect();
        let opts = GenerateOptions {
            max_new_tokens: 12,
            eos: vec![],
            sampling: None,
            per_prompt: vec![],
        };
        let got = generate(&model, &be, &prompts, &opts).unwrap();
        for (i, (g, e)) in got.iter().zip(&exp).enumerate() {
            let n = decisive_steps(&e.margins);
            assert_eq!(g.new_ids[..n], e.greedy_new_ids[..n], "{name} prompt {i}");
            for (j, (a, b)) in g.logprobs[..n].iter().zip(&e.greedy_logprobs).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name} prompt {i} step {j}: logprob {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let be = CpuBackend;
    let dir = llama_dir("tiny-gqa-bf16");
    let store = ModelStore::open_llama(&dir).unwrap();
    let model = LlamaModel::load(&be, &store).unwrap();
    let prompts: Vec<Vec<u32>> = expected(&dir).iter().map(|e| e.ids.clone()).collect();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        eos: vec![],
        sampling: None,
        per_prompt: vec![],
    };
    let batched = generate(&model, &be, &prompts, &opts).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let alone = generate(&model, &be, std::slice::from_ref(p), &opts).unwrap();
        assert_eq!(alone[0].new_ids, b.new_ids);
        assert!(max_abs_diff(&alone[0].logprobs, &b.logprobs) < 1e-5);
    }
    // Scoring the generated continuation gives back the generation's own log-probabilities.
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = prompts
        .iter()
        .cloned()
        .zip(batched.iter().map(|g| g.new_ids.clone()))
        .collect();
    let scores = score_continuations(&model, &be, &pairs).unwrap();
    for (s, g) in scores.iter().zip(&batched) {
        assert!(
            max_abs_diff(s, &g.logprobs) < 1e-4,
            "{s:?} vs {:?}",
            g.logprobs
        );
    }
}

#[test]
fn tokenizer_gives_the_recorded_ids() {
    for name in REFERENCE_MODELS {
        let dir = llama_dir(name);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        for e in expected(&dir) {
            assert_eq!(tok.encode(&e.text).unwrap(), e.ids, "{name}: {:?}", e.text);
        }
    }
}

#[test]
fn generate_cli_prints_one_json_object_with_the_reference_answer() {
    for name in REFERENCE_MODELS {
        let dir = llama_dir(name);
        let e = &expected(&dir)[1];
        let o = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            &e.text,
            "--max-new-tokens",
            "12",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids = |k: &str| -> Vec<u32> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        assert_eq!(ids("prompt_ids"), e.ids);
        let n = decisive_steps(&e.margins);
        assert_eq!(ids("new_ids")[..n], e.greedy_new_ids[..n]);
        assert_eq!(
            v["logprobs"].as_array().unwrap().len(),
            ids("new_ids").len()
        );
        assert!(v["text"].is_string());
        // --ids with the same tokens gives the same continuation.
        let id_list: Vec<String> = e.ids.iter().map(u32::to_string).collect();
        let o2 = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            &id_list.join(","),
            "--max-new-tokens",
            "12",
            "--json",
        ]);
        let v2: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
        assert_eq!(v2["new_ids"], v["new_ids"]);
    }
}

#[test]
fn sampled_generation_is_reproducible_by_seed_and_well_formed() {
    let dir = llama_dir("tiny-gqa-bf16");
    let vocab = cycleqd_engine::model::LlamaConfig::from_dir(&dir)
        .unwrap()
        .vocab_size;
    let sample = |seed: u32| -> serde_json::Value {
        let o = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            "1,2,3",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            &seed.to_string(),
            "--json",
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let runs: Vec<serde_json::Value> = [4, 4, 5, 6, 7].into_iter().map(sample).collect();
    assert_eq!(
        runs[0]["new_ids"], runs[1]["new_ids"],
        "one seed, one continuation"
    );
    assert!(
        runs[2..].iter().any(|r| r["new_ids"] != runs[0]["new_ids"]),
        "other seeds sample other continuations"
    );
    for r in &runs {
        for id in r["new_ids"].as_array().unwrap() {
            assert!((id.as_u64().unwrap() as usize) < vocab);
        }
        for lp in r["logprobs"].as_array().unwrap() {
            let lp = lp.as_f64().unwrap();
            assert!(lp.is_finite() && lp <= 0.0, "{lp}");
        }
    }
}
