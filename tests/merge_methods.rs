//! Every merge method against mergekit 0.1.5's own outputs on the same inputs
//! (`tests/data/merge`, written by `scripts/mergekit_reference.py`): gradients over layers,
//! `{filter, value}` conditions, slices with `layer_range` (frankenmerges that change the layer
//! count), and DARE/DELLA with `--random-seed 42`, whose drop masks are mergekit's own. Plus
//! the errors a config can earn.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use cycleqd_engine::model::{read_safetensors_file, LlamaConfig, ModelStore};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/merge")
}

fn merge(cwd: &Path, config: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    let o = bin()
        .current_dir(cwd)
        .args(["merge", config, out.to_str().unwrap(), "--json"])
        .args(extra)
        .output()
        .unwrap();
    (o.status.success(), stderr(&o))
}

#[test]
fn every_method_matches_mergekit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cases: Vec<String> = std::fs::read_dir(data().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".yml").map(String::from))
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "{cases:?}");
    let mut report = vec![];
    for case in &cases {
        let out = tmp.path().join(case);
        let (ok, err) = merge(
            &data(),
            &format!("cases/{case}.yml"),
            &out,
            &["--random-seed", "42"],
        );
        assert!(ok, "{case}: {err}");
        let want_dir = data().join("mergekit_out").join(case);
        let got = read_safetensors_file(&out.join("model.safetensors")).unwrap();
        let want = read_safetensors_file(&want_dir.join("model.safetensors")).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{case}: tensor names"
        );
        // With a rebuilt vocabulary, token rows are compared by token (mergekit numbers the
        // union's new tokens in a hash map's order); padding rows by position.
        let rows = want_dir
            .join("tokenizer.json")
            .is_file()
            .then(|| token_rows(&out, &want_dir, want["model.embed_tokens.weight"].shape[0]));
        let mut worst = (0.0f32, String::new());
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{case} {name}");
            let (g32, mut w32) = (g.to_f32(), w.to_f32());
            if let (Some(rows), true) = (&rows, name.contains("embed") || name == "lm_head.weight")
            {
                let width = w.shape[1];
                let orig = w32.clone();
                for &(gi, wi) in rows {
                    w32[gi * width..(gi + 1) * width]
                        .copy_from_slice(&orig[wi * width..(wi + 1) * width]);
                }
            }
            // Absolute for small values, relative for large ones (Karcher's reach ~3).
            for (a, b) in g32.iter().zip(w32) {
                let d = (a - b).abs() / b.abs().max(1.0);
                if d > worst.0 {
                    worst = (d, name.clone());
                }
            }
        }
        report.push(format!("{case}: {:.1e} ({})", worst.0, worst.1));
        assert!(
            worst.0 <= 1e-6,
            "{case}: max |Δ| {:.2e} in {} vs mergekit",
            worst.0,
            worst.1
        );
        let (a, b) = (
            LlamaConfig::from_dir(&out).unwrap(),
            LlamaConfig::from_dir(&want_dir).unwrap(),
        );
        assert_eq!(
            (a.num_hidden_layers, a.hidden_size, a.vocab_size),
            (b.num_hidden_layers, b.hidden_size, b.vocab_size),
            "{case}: config"
        );
        ModelStore::open_llama(&out).unwrap();
    }
    eprintln!("{}", report.join("\n"));
}

/// Every token's id in a `tokenizer.json` (vocabulary and added tokens).
fn token_ids(dir: &Path) -> std::collections::BTreeMap<String, usize> {
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let mut ids: std::collections::BTreeMap<String, usize> = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
        .collect();
    for a in t["added_tokens"].as_array().unwrap() {
        ids.insert(
            a["content"].as_str().unwrap().to_string(),
            a["id"].as_u64().unwrap() as usize,
        );
    }
    ids
}

/// `(our row, mergekit's row)` for every row of a vocabulary tensor of `rows` rows: the same
/// token's, then the padding rows by position. The two vocabularies must hold the same tokens.
fn token_rows(got: &Path, want: &Path, rows: usize) -> Vec<(usize, usize)> {
    let (g, w) = (token_ids(got), token_ids(want));
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{}: the output vocabulary",
        got.display()
    );
    let mut pairs: Vec<(usize, usize)> = w.iter().map(|(t, &wi)| (g[t], wi)).collect();
    pairs.extend((w.len()..rows).map(|i| (i, i)));
    pairs
}

#[test]
fn random_drops_are_reproducible_and_follow_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = |out: &Path| std::fs::read(out.join("model.safetensors")).unwrap();
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let (ok, err) = merge(
            &data(),
            "cases/dare_ties.yml",
            &out,
            &["--random-seed", seed],
        );
        assert!(ok, "{err}");
        out
    };
    let (a, b, c) = (run("a", "7"), run("b", "7"), run("c", "8"));
    assert_eq!(weights(&a), weights(&b));
    assert_ne!(weights(&a), weights(&c));
    // Without a seed one is drawn and reported, and reproduces the merge.
    let d = tmp.path().join("d");
    let o = bin()
        .current_dir(data())
        .args([
            "merge",
            "cases/dare_ties.yml",
            d.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let seed = r["random_seed"]
        .as_u64()
        .expect("a drawn seed is reported")
        .to_string();
    let e = run("e", &seed);
    assert_eq!(weights(&d), weights(&e));
}

#[test]
fn the_output_tokenizer_and_chat_template_load() {
    let tmp = tempfile::tempdir().unwrap();
    // The union: the base's ids kept, the new tokens after them; `chat_template` written as
    // the output's chat_template.jinja (which the engine's own chat rendering then uses).
    let yaml = "merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 0.5}}\n  - {model: expert_v, parameters: {weight: 0.5}}\ntokenizer_source: union\nchat_template: chatml\n";
    std::fs::write(tmp.path().join("u.yml"), yaml).unwrap();
    let out = tmp.path().join("u");
    let o = bin()
        .current_dir(data())
        .args(["merge", tmp.path().join("u.yml").to_str().unwrap()])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ids = token_ids(&out);
    let base = token_ids(&data().join("base"));
    for (t, i) in &base {
        assert_eq!(ids[t], *i, "the base's `{t}` moved");
    }
    assert_eq!(ids.len(), base.len() + 3, "{ids:?}");
    for t in ["x0", "x1", "<|im_end|>"] {
        assert!(ids[t] >= base.len(), "{t}");
    }
    let tok = cycleqd_engine::model::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.token_id("x1"), Some(ids["x1"] as u32));
    assert_eq!(
        tok.encode_plain("w5 x0").unwrap(),
        vec![5, ids["x0"] as u32]
    );
    let template = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");
    let config = LlamaConfig::from_dir(&out).unwrap();
    assert_eq!(config.vocab_size, base.len() + 3);
    let store = ModelStore::open_llama(&out).unwrap();
    assert_eq!(
        store.tensor("lm_head.weight").unwrap().shape,
        vec![base.len() + 3, 16]
    );
    assert!(!out.join("tokenizer.model").exists());
}

#[test]
fn bad_configs_are_one_line_errors_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    for m in ["base", "expert_a", "expert_b"] {
        copy_dir(&data().join(m), &cwd.join(m));
    }
    let cases = [
        (
            "merge_method: ties\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1, density: 1.5}\n",
            "`models[0].parameters.density` is 1.5",
        ),
        (
            "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1, density: [0.5, 0]}\n",
            "outside (0, 1]",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: expert_a, layer_range: [2, 9]}]\n",
            "`slices[0].sources[0].layer_range` [2, 9] is past `expert_a`'s 4 layers",
        ),
        (
            "merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nslices:\n  - sources: [{model: base, layer_range: [0, 2]}, {model: expert_a, layer_range: [0, 1]}]\n",
            "must line up",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: expert_a\n    parameters: {weight: []}\n",
            "`models[0].parameters.weight` is an empty list",
        ),
        (
            "merge_method: ties\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1, gamma: 0.1}\n",
            "`models[0].parameters.gamma` is not a parameter of ties",
        ),
        (
            "merge_method: della\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1, density: 0.1, epsilon: 0.2}\n",
            "density ± epsilon must stay inside (0, 1)",
        ),
        (
            "merge_method: ties\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {density: 0.5}\n",
            "model `expert_a` has no `weight`",
        ),
        (
            "merge_method: model_stock\nbase_model: base\nmodels: [{model: expert_a}]\n",
            "model_stock merges at least 2 models besides the base",
        ),
        (
            "merge_method: passthrough\nbase_model: base\nmodels: [{model: expert_a}]\n",
            "passthrough merges exactly 1 models",
        ),
        (
            "merge_method: slerp\nbase_model: base\nmodels: [{model: base}, {model: expert_a}]\nparameters: {t: [0, 1.5]}\n",
            "`parameters.t` is",
        ),
        (
            "merge_method: ties\nbase_model: base\nmodels: [{model: expert_a, parameters: {weight: 1}}]\ntokenizer_source: expert_z\n",
            "`tokenizer_source: expert_z` is not one of the merge's models",
        ),
        (
            "merge_method: linear\nmodels: [{model: expert_a, parameters: {weight: 1}}]\ntokenizer: {tokens: {x: {source: expert_a}}}\n",
            "`tokenizer.tokens` (per-token embedding sources) is not supported yet",
        ),
        (
            "merge_method: linear\nmodels: [{model: expert_a, parameters: {weight: 1}}]\ntokenizer_source: base\ntokenizer: {source: union}\n",
            "either `tokenizer_source` or `tokenizer`, not both",
        ),
        (
            "merge_method: linear\nmodels: [{model: expert_a, parameters: {weight: 1}}]\ntokenizer: {pad_to_multiple_of: 0}\n",
            "`tokenizer.pad_to_multiple_of` must be a whole number",
        ),
        (
            "merge_method: linear\nmodels: [{model: expert_a, parameters: {weight: 1}}]\nchat_template: vicuna\n",
            "`chat_template: vicuna` is neither",
        ),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let f = format!("c{i}.yml");
        std::fs::write(cwd.join(&f), yaml).unwrap();
        let out = cwd.join(format!("out{i}"));
        let (ok, err) = merge(cwd, &f, &out, &[]);
        assert!(
            !ok && err.contains(want),
            "case {i}: want `{want}`, got: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "case {i}: {err}");
        assert_eq!(
            err.matches(&f).count(),
            1,
            "case {i} names its file once: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "case {i} wrote an output");
    }
}
