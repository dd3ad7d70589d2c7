//! Bad input through the CLI: each case exits non-zero with one line that names the file (or
//! argument) and the problem, and never panics.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Runs `generate` on `dir` and returns stderr, asserting a clean failure.
fn generate_fails(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--max-new-tokens",
        "2",
    ];
    if !extra.contains(&"--ids") {
        args.extend(["--prompt", "Simple is better than"]);
    }
    args.extend(extra);
    let o = run(&args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line: {err}"
    );
    err
}

fn fixture(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&llama_dir(name), &dir);
    (tmp, dir)
}

/// Splits a safetensors file into (header JSON, data section).
fn split(path: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join(path: &Path, header: &Value, data: &[u8]) {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn edit_header(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("model.safetensors");
    let (mut h, data) = split(&p);
    f(&mut h);
    join(&p, &h, &data);
}

fn has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "`{p}` not in: {err}");
    }
}

#[test]
fn missing_config() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    has(&generate_fails(&dir, &[]), &["config.json", "No such file"]);
}

#[test]
fn unknown_model_type() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"llama\"", "\"mamba\"");
    std::fs::write(&p, text).unwrap();
    has(
        &generate_fails(&dir, &[]),
        &["config.json", "unknown model_type `mamba`"],
    );
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    has(
        &generate_fails(&dir, &[]),
        &["model.safetensors", "truncated"],
    );
    std::fs::write(&p, &bytes[..5]).unwrap();
    has(
        &generate_fails(&dir, &[]),
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn header_length_past_end_of_file() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let past = bytes.len() as u64 + 10;
    bytes[..8].copy_from_slice(&past.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    has(
        &generate_fails(&dir, &[]),
        &["model.safetensors", "header length", "past the end"],
    );
}

#[test]
fn overlapping_tensor_offsets() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    edit_header(&dir, |h| {
        let a = h["model.norm.weight"]["data_offsets"].clone();
        // Point another tensor of the same size at the same bytes.
        h["model.layers.0.input_layernorm.weight"]["data_offsets"] = a;
    });
    has(
        &generate_fails(&dir, &[]),
        &["model.safetensors", "overlap"],
    );
}

#[test]
fn out_of_bounds_tensor_offsets() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    let data_len = split(&dir.join("model.safetensors")).1.len() as u64;
    edit_header(&dir, |h| {
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([data_len, data_len + 128]);
    });
    has(
        &generate_fails(&dir, &[]),
        &["model.safetensors", "`model.norm.weight`", "past the end"],
    );
}

#[test]
fn unsupported_dtype() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    edit_header(&dir, |h| h["model.norm.weight"]["dtype"] = "I16".into());
    has(
        &generate_fails(&dir, &[]),
        &[
            "model.safetensors",
            "`model.norm.weight`",
            "I16",
            "not supported",
        ],
    );
}

#[test]
fn tensor_missing_from_index() {
    let (_t, src) = fixture("tiny-gqa-bf16");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    let store = cycleqd_engine::model::ModelStore::open(&src).unwrap();
    let tensors: Vec<_> = store
        .names()
        .map(|n| (n.to_string(), store.tensor(n).unwrap()))
        .collect();
    cycleqd_engine::model::export_tensors(
        &dir,
        &tensors,
        &store.config().to_json_with_dtype(store.dominant_dtype()),
        Some(&src),
        50_000,
    )
    .unwrap();
    let p = dir.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.mlp.up_proj.weight");
    std::fs::write(&p, serde_json::to_vec(&index).unwrap()).unwrap();
    has(
        &generate_fails(&dir, &[]),
        &[
            "model.safetensors.index.json",
            "`model.layers.1.mlp.up_proj.weight`",
            "missing",
        ],
    );
}

#[test]
fn shape_disagrees_with_config() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    edit_header(&dir, |h| {
        h["model.layers.0.mlp.up_proj.weight"]["shape"] = serde_json::json!([64, 176]);
    });
    has(
        &generate_fails(&dir, &[]),
        &[
            "model.safetensors",
            "`model.layers.0.mlp.up_proj.weight`",
            "[64, 176]",
            "[176, 64]",
            "config.json",
        ],
    );
}

#[test]
fn tokenizer_missing_or_invalid() {
    let (_t, dir) = fixture("tiny-mha-tied-f16");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    has(&generate_fails(&dir, &[]), &["tokenizer.json", "missing"]);
    std::fs::write(dir.join("tokenizer.json"), b"{\"model\": 3}").unwrap();
    has(&generate_fails(&dir, &[]), &["tokenizer.json", "invalid"]);
}

#[test]
fn token_id_out_of_vocab() {
    let dir = llama_dir("tiny-mha-tied-f16");
    has(
        &generate_fails(&dir, &["--ids", "0,12,400"]),
        &["token id 400", "vocab_size 400", "config.json"],
    );
}

#[test]
fn prompt_longer_than_max_positions() {
    let dir = llama_dir("tiny-mha-tied-f16");
    let ids = vec!["5"; 129].join(",");
    has(
        &generate_fails(&dir, &["--ids", &ids]),
        &["129 tokens", "max_position_embeddings (128)"],
    );
}

#[test]
fn inspect_reports_problems_with_nonzero_exit() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    edit_header(&dir, |h| {
        h["model.layers.0.mlp.up_proj.weight"]["shape"] = serde_json::json!([64, 176]);
    });
    let o = run(&["inspect", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("problem:") && out.contains("up_proj"), "{out}");
    let ok = run(&[
        "inspect",
        llama_dir("tiny-gqa-bf16").to_str().unwrap(),
        "--json",
    ]);
    assert!(ok.status.success());
    let v: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["parameters_stored"], v["parameters_config"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn nonsensical_numbers_in_config_json_are_refused() {
    // (what, a JSON edit of config.json, what the error names)
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "rope factor 0",
            |c| c["rope_scaling"]["factor"] = 0.0.into(),
            "factor` must be a positive number",
        ),
        (
            "negative low_freq_factor",
            |c| c["rope_scaling"]["low_freq_factor"] = (-1.0).into(),
            "low_freq_factor` must be a positive",
        ),
        (
            "negative rms_norm_eps",
            |c| c["rms_norm_eps"] = (-1e-5).into(),
            "rms_norm_eps",
        ),
        (
            "rms_norm_eps of 0",
            |c| c["rms_norm_eps"] = 0.0.into(),
            "rms_norm_eps",
        ),
        (
            "sizes that overflow",
            |c| {
                c["vocab_size"] = (1u64 << 62).into();
                c["hidden_size"] = 1024.into();
            },
            "overflow",
        ),
    ];
    for (what, edit, want) in cases {
        let (_t, dir) = fixture("tiny-gqa-bf16");
        let p = dir.join("config.json");
        let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
        let err = generate_fails(&dir, &[]);
        assert!(
            err.contains("config.json") && err.contains(want),
            "{what}: {err}"
        );
    }
}

#[test]
fn a_shape_whose_product_wraps_is_refused_by_inspect_and_every_reader() {
    let (_t, dir) = fixture("tiny-gqa-bf16");
    // 2^32 × 2^32 wraps to 0 in 64 bits: an empty tensor to a careless reader.
    edit_header(&dir, |h| {
        let off = h["model.norm.weight"]["data_offsets"][0].clone();
        h["model.norm.weight"]["shape"] = serde_json::json!([1u64 << 32, 1u64 << 32]);
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([off, off]);
    });
    has(
        &generate_fails(&dir, &[]),
        &["`model.norm.weight`", "overflows"],
    );
    let o = run(&["inspect", dir.to_str().unwrap()]);
    assert!(!o.status.success(), "inspect accepted it");
    assert!(
        stderr(&o).contains("overflows")
            || String::from_utf8_lossy(&o.stdout).contains("overflows")
    );
}

#[test]
fn a_weight_holding_nan_or_inf_is_refused_by_every_command_that_reads_weights() {
    for (poison, what) in [(0x7fc0u16, "NaN"), (0x7f80u16, "+Inf"), (0xff80u16, "-Inf")] {
        let (_t, dir) = fixture("tiny-gqa-bf16");
        // Element 5 of a bf16 weight in the middle of the file.
        let p = dir.join("model.safetensors");
        let (h, mut data) = split(&p);
        let start = h["model.layers.1.mlp.down_proj.weight"]["data_offsets"][0]
            .as_u64()
            .unwrap() as usize;
        data[start + 10..start + 12].copy_from_slice(&poison.to_le_bytes());
        join(&p, &h, &data);
        let want = [
            "model.safetensors",
            "`model.layers.1.mlp.down_proj.weight`",
            "NaN or Inf",
            "element 5",
        ];
        has(&generate_fails(&dir, &[]), &want);

        let task = dir.join("t.jsonl");
        std::fs::write(&task, "{\"prompt\": \"a\", \"answer\": \"b\"}\n").unwrap();
        let o = run(&[
            "eval",
            "--model",
            dir.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: eval accepted it");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        has(&err, &want);

        let o = run(&["inspect", dir.to_str().unwrap()]);
        assert!(!o.status.success(), "{what}: inspect found no problem");
        has(&String::from_utf8_lossy(&o.stdout), &want);
    }
}

#[test]
fn usage_errors_and_missing_files_are_one_line_each() {
    let o = run(&["bench", "--shape", "huge"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    has(&err, &["'huge'", "possible values"]);

    let dir = llama_dir("tiny-gqa-bf16");
    let o = run(&[
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--task",
        "/nonexistent/t.jsonl",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // The cause once, not repeated by the error chain.
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    has(&err, &["/nonexistent/t.jsonl"]);
}

#[test]
fn a_bad_cpu_isa_or_precision_is_one_line_naming_it() {
    let dir = llama_dir("tiny-gqa-bf16");
    let dir = dir.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        dir,
        "--max-new-tokens",
        "2",
        "--prompt",
        "Hi",
    ];
    for (var, value, needle) in [
        ("CYCLEQD_CPU_ISA", "sse9", "CYCLEQD_CPU_ISA=sse9"),
        ("CYCLEQD_PRECISION", "f64", "CYCLEQD_PRECISION=f64"),
    ] {
        let o = bin().args(args).env(var, value).output().unwrap();
        let err = stderr(&o);
        assert!(
            !o.status.success() && !err.contains("panicked"),
            "{var}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{var}: {err}");
        assert!(err.contains(needle), "{var}: {err}");
    }
    let mut with_flag = args.to_vec();
    with_flag.extend(["--precision", "f64"]);
    let o = run(&with_flag);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("--precision"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Every path and precision the flag and variable name run.
    for precision in ["auto", "f32", "bf16"] {
        let mut a = args.to_vec();
        a.extend(["--precision", precision]);
        let o = bin()
            .args(&a)
            .env("CYCLEQD_CPU_ISA", "generic")
            .output()
            .unwrap();
        assert!(o.status.success(), "{precision}: {}", stderr(&o));
    }
}
