//! `merge` against mergekit's own outputs (`../shared/testdata/merge/set`), run as a user runs
//! it (in the set's folder, model paths relative to it), plus half-precision inputs/outputs and
//! configuration errors.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use cycleqd_engine::model::{
    dtype, export_tensors, read_safetensors_file, DType, HostTensor, LlamaConfig, ModelStore,
};

const METHODS: [&str; 4] = ["linear", "task_arithmetic", "ties", "slerp"];

fn set_dir() -> PathBuf {
    testdata().join("merge/set")
}

/// Runs `cycleqd-engine merge CONFIG OUT` in `cwd`; returns (success, stderr).
fn merge_in(cwd: &Path, config: &str, out: &Path) -> (bool, String) {
    let o = bin()
        .current_dir(cwd)
        .args(["merge", config, out.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    (o.status.success(), stderr(&o))
}

#[test]
fn merges_match_mergekit() {
    let tmp = tempfile::tempdir().unwrap();
    for m in METHODS {
        let out = tmp.path().join(m);
        let (ok, err) = merge_in(&set_dir(), &format!("{m}.yml"), &out);
        assert!(ok, "{m}: {err}");
        let got = read_safetensors_file(&out.join("model.safetensors")).unwrap();
        let want =
            read_safetensors_file(&set_dir().join(format!("mergekit_out/{m}/model.safetensors")))
                .unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{m}: tensor names"
        );
        let mut worst = 0.0f32;
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{m} {name}");
            worst = worst.max(max_abs_diff(&g.to_f32(), &w.to_f32()));
        }
        eprintln!("{m}: max |Δ| vs mergekit = {worst:.2e}");
        assert!(worst <= 1e-6, "{m}: max |Δ| {worst} > 1e-6");
        // The config describes the same model, and the checkpoint loads as a Llama.
        let a = LlamaConfig::from_dir(&out).unwrap();
        let b = LlamaConfig::from_dir(&set_dir().join(format!("mergekit_out/{m}"))).unwrap();
        assert_eq!(
            format!(
                "{:?}",
                (
                    a.hidden_size,
                    a.num_hidden_layers,
                    a.vocab_size,
                    a.rope_theta,
                    a.tie_word_embeddings,
                    a.dtype
                )
            ),
            format!(
                "{:?}",
                (
                    b.hidden_size,
                    b.num_hidden_layers,
                    b.vocab_size,
                    b.rope_theta,
                    b.tie_word_embeddings,
                    b.dtype
                )
            )
        );
        ModelStore::open_llama(&out).unwrap();
        assert!(out.join("tokenizer.json").is_file() && out.join("mergekit_config.yml").is_file());
    }
}

/// Copies the merge set with every tensor rounded to `dt`, and returns its folder.
fn cast_set(dst: &Path, dt: DType) {
    for m in ["base", "expert_a", "expert_b", "expert_c"] {
        let src = set_dir().join(m);
        let store = ModelStore::open(&src).unwrap();
        let tensors: Vec<(String, HostTensor)> = store
            .names()
            .map(|n| {
                let t = store.tensor(n).unwrap();
                (
                    n.to_string(),
                    HostTensor::from_f32(&t.to_f32(), t.shape.clone(), dt),
                )
            })
            .collect();
        export_tensors(
            &dst.join(m),
            &tensors,
            &store.config().to_json_with_dtype(dt),
            Some(&src),
            u64::MAX,
        )
        .unwrap();
    }
}

#[test]
fn half_precision_inputs_and_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (h16, h32) = (tmp.path().join("bf16"), tmp.path().join("f32"));
    cast_set(&h16, DType::BF16);
    // The same bf16-rounded values stored as f32: the engine upcasts exactly and rounds once, so
    // merging the bf16 files must equal merging these and rounding the result.
    {
        let src = h16.clone();
        for m in ["base", "expert_a", "expert_b", "expert_c"] {
            let store = ModelStore::open(src.join(m)).unwrap();
            let tensors: Vec<_> = store
                .names()
                .map(|n| {
                    let t = store.tensor(n).unwrap();
                    (
                        n.to_string(),
                        HostTensor::from_f32(&t.to_f32(), t.shape.clone(), DType::F32),
                    )
                })
                .collect();
            export_tensors(
                &h32.join(m),
                &tensors,
                &store.config().to_json_with_dtype(DType::F32),
                Some(&src.join(m)),
                u64::MAX,
            )
            .unwrap();
        }
    }
    for m in METHODS {
        let yml = std::fs::read_to_string(set_dir().join(format!("{m}.yml"))).unwrap();
        for (dir, out_dtype) in [(&h16, "bfloat16"), (&h16, "float16"), (&h32, "float32")] {
            let text = yml.replace("dtype: float32", &format!("dtype: {out_dtype}"));
            std::fs::write(dir.join(format!("{m}-{out_dtype}.yml")), text).unwrap();
        }
        let out = |d: &Path, t: &str| d.join(format!("out-{m}-{t}"));
        for (dir, t) in [(&h16, "bfloat16"), (&h16, "float16"), (&h32, "float32")] {
            let (ok, err) = merge_in(dir, &format!("{m}-{t}.yml"), &out(dir, t));
            assert!(ok, "{m} {t}: {err}");
        }
        let exact = read_safetensors_file(&out(&h32, "float32").join("model.safetensors")).unwrap();
        let mergekit =
            read_safetensors_file(&set_dir().join(format!("mergekit_out/{m}/model.safetensors")))
                .unwrap();
        for (t, dt) in [("bfloat16", DType::BF16), ("float16", DType::F16)] {
            let got = read_safetensors_file(&out(&h16, t).join("model.safetensors")).unwrap();
            assert_eq!(
                ModelStore::open_llama(out(&h16, t)).unwrap().config().dtype,
                Some(dt)
            );
            for (name, g) in &got {
                assert_eq!(g.dtype, dt, "{m} {name}");
                let rounded = dtype::from_f32(dt, &exact[name].to_f32());
                assert!(
                    g.data() == rounded.as_slice(),
                    "{m} {t} {name}: not the once-rounded f32 merge"
                );
                // And close to mergekit's f32 merge of the unrounded inputs (not for TIES: rounding
                // the inputs moves entries across the magnitude cut, a legitimate change).
                if m != "ties" {
                    let d = max_abs_diff(&g.to_f32(), &mergekit[name].to_f32());
                    assert!(d < 0.05, "{m} {t} {name}: {d} from mergekit's f32 result");
                }
            }
        }
    }
}

#[test]
fn mismatched_or_missing_models_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    copy_dir(&set_dir().join("base"), &cwd.join("base"));
    copy_dir(&llama_dir("tiny-mha-tied-f16"), &cwd.join("other"));
    std::fs::write(
        cwd.join("bad.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: other\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let (ok, err) = merge_in(cwd, "bad.yml", &cwd.join("out"));
    assert!(
        !ok && err.contains("`other`") && err.contains("intermediate_size 160"),
        "{err}"
    );
    std::fs::write(
        cwd.join("missing.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: nowhere\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let (ok, err) = merge_in(cwd, "missing.yml", &cwd.join("out"));
    assert!(
        !ok && err.contains("`nowhere`") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::write(
        cwd.join("bad_key.yml"),
        "merge_method: linear\nmodels: [{model: base, parameters: {weight: 1}}]\nslices: []\n",
    )
    .unwrap();
    let (ok, err) = merge_in(cwd, "bad_key.yml", &cwd.join("out"));
    assert!(
        !ok && err.contains("bad_key.yml") && err.contains("`slices`"),
        "{err}"
    );
    assert!(
        !cwd.join("out").exists(),
        "a failed merge left an output directory"
    );
}

#[test]
fn an_output_that_would_clobber_an_input_or_a_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    for m in ["base", "expert_a"] {
        copy_dir(&set_dir().join(m), &cwd.join(m));
    }
    std::fs::write(
        cwd.join("ta.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    std::fs::write(cwd.join("notes.txt"), b"keep me").unwrap();
    let before = std::fs::read(cwd.join("expert_a/model.safetensors")).unwrap();
    for (out, want) in [
        ("expert_a", "is the input"),
        ("base/merged", "is inside the input"),
        (".", "holds the input"),
        ("notes.txt", "existing file"),
    ] {
        let (ok, err) = merge_in(cwd, "ta.yml", &cwd.join(out));
        assert!(!ok && err.contains(want), "{out}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(
        std::fs::read(cwd.join("expert_a/model.safetensors")).unwrap(),
        before
    );
    assert_eq!(std::fs::read(cwd.join("notes.txt")).unwrap(), b"keep me");
}

#[test]
fn a_merge_that_would_write_nan_or_inf_writes_nothing() {
    use cycleqd_engine::model::{export_tensors, HostTensor, ModelStore};
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    copy_dir(&set_dir().join("base"), &cwd.join("base"));
    // expert_a with one NaN.
    let store = ModelStore::open(set_dir().join("expert_a")).unwrap();
    let mut poisoned = false;
    let tensors: Vec<(String, HostTensor)> = store
        .names()
        .map(|n| {
            let t = store.tensor(n).unwrap();
            let mut v = t.to_f32();
            if !poisoned && v.len() > 5 {
                v[5] = f32::NAN;
                poisoned = true;
            }
            (
                n.to_string(),
                HostTensor::from_f32(&v, t.shape.clone(), t.dtype),
            )
        })
        .collect();
    let cfg = store.config().to_json_with_dtype(store.dominant_dtype());
    export_tensors(
        &cwd.join("expert_a"),
        &tensors,
        &cfg,
        Some(&set_dir().join("expert_a")),
        u64::MAX,
    )
    .unwrap();
    std::fs::write(
        cwd.join("ta.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let (ok, err) = merge_in(cwd, "ta.yml", &cwd.join("out"));
    assert!(
        !ok && err.contains("non-finite value at element 5"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!cwd.join("out").exists());
    let leftovers: Vec<_> = std::fs::read_dir(cwd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_non_empty_output_is_replaced_only_with_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    for m in ["base", "expert_a"] {
        copy_dir(&set_dir().join(m), &cwd.join(m));
    }
    std::fs::write(
        cwd.join("ta.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let out = cwd.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let (ok, err) = merge_in(cwd, "ta.yml", &out);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    let o = bin()
        .current_dir(cwd)
        .args(["merge", "ta.yml", "out", "--overwrite", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists());
    ModelStore::open_llama(&out).unwrap();
    // An empty folder needs no flag.
    let empty = cwd.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, err) = merge_in(cwd, "ta.yml", &empty);
    assert!(ok, "{err}");
}

#[test]
fn hub_ids_resolve_in_the_local_cache_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    // The set's models as huggingface_hub lays out org/base and org/expert_a (a tag for it).
    for (m, commit, r) in [("base", "0123abc", "main"), ("expert_a", "4567def", "v1")] {
        let repo = cache.join(format!("models--org--{m}"));
        copy_dir(&set_dir().join(m), &repo.join("snapshots").join(commit));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(r), commit).unwrap();
    }
    let cwd = tmp.path().join("work");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(
        cwd.join("ta.yml"),
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/expert_a@v1\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let run = |yml: &str| {
        bin()
            .current_dir(&cwd)
            .env("HF_HUB_CACHE", &cache)
            .args(["merge", yml, "out", "--json"])
            .output()
            .unwrap()
    };
    let o = run("ta.yml");
    assert!(o.status.success(), "{}", stderr(&o));
    // The same merge from local paths gives the same bytes.
    let local = tmp.path().join("local");
    for m in ["base", "expert_a"] {
        copy_dir(&set_dir().join(m), &local.join(m));
    }
    std::fs::write(
        local.join("ta.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: expert_a\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let (ok, err) = merge_in(&local, "ta.yml", &local.join("out"));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(cwd.join("out/model.safetensors")).unwrap(),
        std::fs::read(local.join("out/model.safetensors")).unwrap()
    );
    std::fs::write(
        cwd.join("missing.yml"),
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/expert_a@v2\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let o = run("missing.yml");
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("revision `v2`") && e.contains("models--org--expert_a"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}
