//! Checkpoint round trips: export (single file and sharded) → load gives bit-identical tensors
//! and the same logits; an export that does not finish leaves nothing that looks complete.

mod common;

use std::path::Path;

use common::*;
use cycleqd_engine::model::{export_tensors, CheckpointWriter, HostTensor, ModelStore, TensorSpec};

fn reexport(src: &Path, dst: &Path, max_shard_bytes: u64) {
    let store = ModelStore::open_llama(src).unwrap();
    let tensors: Vec<(String, HostTensor)> = store
        .names()
        .map(|n| (n.to_string(), store.tensor(n).unwrap()))
        .collect();
    let dtype = store.dominant_dtype();
    export_tensors(
        dst,
        &tensors,
        &store.config().to_json_with_dtype(dtype),
        Some(src),
        max_shard_bytes,
    )
    .unwrap();
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (sa, sb) = (ModelStore::open(a).unwrap(), ModelStore::open(b).unwrap());
    assert_eq!(
        sa.names().collect::<Vec<_>>(),
        sb.names().collect::<Vec<_>>()
    );
    for n in sa.names() {
        let (ta, tb) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
        assert_eq!((ta.dtype, &ta.shape), (tb.dtype, &tb.shape), "{n}");
        assert!(ta.data() == tb.data(), "{n}: bytes differ");
    }
}

/// The checkpoint in `out` gives transformers' logits recorded for the reference model `src`
/// (an independent reference: loading the copy's shards and config is what is tested).
fn assert_transformers_logits(src: &Path, out: &Path, name: &str) {
    let want =
        cycleqd_engine::model::read_safetensors_file(&src.join("expected.safetensors")).unwrap();
    for (i, e) in expected(src).iter().enumerate() {
        let d = max_abs_diff(
            &prompt_logits(out, &e.ids),
            &want[&format!("logits_{i}")].to_f32(),
        );
        assert!(
            d <= 1e-4,
            "{name} prompt {i}: max |Δlogit| {d} against transformers"
        );
    }
}

#[test]
fn export_roundtrip_is_bit_identical_with_same_logits() {
    for name in REFERENCE_MODELS {
        let src = llama_dir(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("copy");
        reexport(&src, &out, u64::MAX);
        assert!(out.join("model.safetensors").is_file());
        assert!(!out.join("model.safetensors.index.json").exists());
        assert!(out.join("tokenizer.json").is_file());
        assert_same_tensors(&src, &out);
        // The copy is loaded from its own files: transformers' logits of the original.
        assert_transformers_logits(&src, &out, name);
        // The config keeps its own key style.
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        let orig: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg, orig, "{name}: config.json changed in a round trip");
    }
}

#[test]
fn sharded_checkpoint_loads_with_the_same_logits() {
    for name in REFERENCE_MODELS {
        let src = llama_dir(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("sharded");
        reexport(&src, &out, 40_000);
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            shards.len() > 2,
            "{name}: expected several shards, got {shards:?}"
        );
        assert!(!out.join("model.safetensors").exists());
        let store = ModelStore::open_llama(&out).unwrap();
        assert_eq!(store.shard_paths().len(), shards.len());
        assert_same_tensors(&src, &out);
        assert_transformers_logits(&src, &out, name);
        // Each shard carries the metadata transformers expects.
        let first = out.join(shards.iter().next().unwrap());
        let bytes = std::fs::read(first).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "pt");
        assert_eq!((8 + n) % 8, 0, "data section must be 8-byte aligned");
    }
}

#[test]
fn unfinished_export_leaves_no_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let specs = vec![
        TensorSpec {
            name: "a".into(),
            dtype: cycleqd_engine::model::DType::F32,
            shape: vec![4],
        },
        TensorSpec {
            name: "b".into(),
            dtype: cycleqd_engine::model::DType::F32,
            shape: vec![4],
        },
    ];
    let w = CheckpointWriter::create(&out, specs.clone(), u64::MAX).unwrap();
    w.write("a", &[0u8; 16]).unwrap();
    // Finishing with a tensor never written fails, and nothing appears under the target name.
    let err = w
        .finish(&serde_json::json!({}), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`b`") && err.contains("never written"),
        "{err}"
    );
    assert!(!out.exists());
    // Dropped midway (an error elsewhere): the temporary directory is gone too.
    let w = CheckpointWriter::create(&out, specs, u64::MAX).unwrap();
    w.write("b", &[0u8; 16]).unwrap();
    drop(w);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary files left behind"
    );
}

#[test]
fn export_replaces_an_existing_directory_only_when_complete() {
    let src = llama_dir("tiny-mha-tied-f16");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), b"old").unwrap();
    reexport(&src, &out, u64::MAX);
    assert!(!out.join("stale.txt").exists());
    assert_same_tensors(&src, &out);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "old or temporary directory left behind"
    );
}
