//! Shared helpers of the integration tests: where the reference data lives, the built binary,
//! and small file surgery for bad-input fixtures.
#![allow(dead_code)]

pub mod kernel_cases;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::Backend;
use cycleqd_engine::llama::{LlamaModel, Step};
use cycleqd_engine::model::ModelStore;

/// `../shared/testdata` beside the checkout (CI places `shared/` there), or
/// `$CYCLEQD_TESTDATA` (test binaries copied to a GPU machine, where the checkout moves).
pub fn testdata() -> PathBuf {
    let p = std::env::var_os("CYCLEQD_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata"));
    assert!(
        p.is_dir(),
        "reference data not found at {}: the tests need ../shared/testdata beside the checkout \
         (or CYCLEQD_TESTDATA)",
        p.display()
    );
    p
}

/// A file of this repository (`tests/data/…`): under the checkout the binary was built in, or,
/// where that is gone (test binaries copied to a GPU machine, run in a copy of the tree), under
/// the working directory.
pub fn repo_file(rel: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if built.exists() {
        built
    } else {
        PathBuf::from(rel)
    }
}

pub fn llama_dir(name: &str) -> PathBuf {
    testdata().join("llama").join(name)
}

pub const REFERENCE_MODELS: [&str; 2] = ["tiny-gqa-bf16", "tiny-mha-tied-f16"];

/// The built binary, or `$CYCLEQD_BIN` (test binaries copied to another machine).
pub fn bin() -> Command {
    Command::new(
        std::env::var_os("CYCLEQD_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_cycleqd-engine").into()),
    )
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copies the files of a directory (no recursion) into `dst`, made writable.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            let to = dst.join(e.file_name());
            std::fs::copy(e.path(), &to).unwrap();
            let mut perm = std::fs::metadata(&to).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&to, perm).unwrap();
        }
    }
}

/// Full logits `[len, vocab]` of one prompt through the CPU path.
pub fn prompt_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    prompt_logits_on(&CpuBackend, dir, ids)
}

/// One prompt's logits at every position, on backend `be`.
pub fn prompt_logits_on<B: Backend>(be: &B, dir: &Path, ids: &[u32]) -> Vec<f32>
where
    B::Buf: Default,
{
    let store = ModelStore::open_llama(dir).unwrap();
    let model = LlamaModel::load(be, &store).unwrap();
    let mut step = Step::default();
    for (p, &t) in ids.iter().enumerate() {
        step.push(t, 0, p, true);
    }
    let mut cache = model.new_cache(be, 1, ids.len()).unwrap();
    let mut st = model.new_state();
    let mut logits = vec![];
    model
        .forward(be, &step, &mut cache, &mut st, &mut logits)
        .unwrap();
    logits
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The recorded prompts of a reference model's expected.json.
pub struct Expected {
    pub text: String,
    pub ids: Vec<u32>,
    pub greedy_new_ids: Vec<u32>,
    pub greedy_logprobs: Vec<f32>,
    pub margins: Vec<f32>,
}

pub fn expected(dir: &Path) -> Vec<Expected> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let nums = |p: &serde_json::Value, k: &str| -> Vec<f64> {
        p[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Expected {
            text: p["text"].as_str().unwrap().to_string(),
            ids: nums(p, "ids").iter().map(|&x| x as u32).collect(),
            greedy_new_ids: nums(p, "greedy_new_ids")
                .iter()
                .map(|&x| x as u32)
                .collect(),
            greedy_logprobs: nums(p, "greedy_logprobs")
                .iter()
                .map(|&x| x as f32)
                .collect(),
            margins: nums(p, "greedy_top2_margins")
                .iter()
                .map(|&x| x as f32)
                .collect(),
        })
        .collect()
}

/// Number of leading greedy steps whose top-2 margin is decisive (≥ 1e-2).
pub fn decisive_steps(margins: &[f32]) -> usize {
    margins
        .iter()
        .position(|&m| m < 1e-2)
        .unwrap_or(margins.len())
}

/// The demo (synth output) in `dir/demo`, with `edit` applied to its `cycleqd.toml`.
pub fn demo(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let d = dir.join("demo");
    let o = run(&["synth", "--out", d.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "synth: {}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in report["requirements"].as_array().unwrap() {
        assert!(
            r[1].as_bool().unwrap(),
            "synth requirement not met: {}",
            r[0]
        );
    }
    let cfg = d.join("cycleqd.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, edit(text)).unwrap();
    cfg
}

pub fn set_key(text: String, key: &str, value: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run_to_end(cfg: &Path, out: &Path) -> std::process::Output {
    let o = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "run: {}", stderr(&o));
    o
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The events without their timings and the names of the workers that ran them.
pub fn events(out: &Path) -> Vec<serde_json::Value> {
    String::from_utf8(read(&out.join("events.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v.as_object_mut().unwrap().remove("worker");
            v
        })
        .collect()
}

/// `extra` lines added to the `[evolution]` table of a configuration.
pub fn with_evolution(text: String, extra: &str) -> String {
    text.replacen("[evolution]\n", &format!("[evolution]\n{extra}\n"), 1)
}

/// `run --config cfg --out out` with `args` added, which must succeed.
pub fn run_with(cfg: &Path, out: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(o.status.success(), "run {args:?}: {}", stderr(&o));
    o
}

/// The files of a run folder that must not depend on how it was run: the archives, their
/// genomes and the final model.
pub fn assert_same_archives(a: &Path, b: &Path, tasks: &[&str]) {
    for f in tasks.iter().map(|t| format!("archives/{t}.json")).chain([
        "archives/genomes.safetensors".into(),
        "final/model.safetensors".into(),
    ]) {
        assert!(read(&a.join(&f)) == read(&b.join(&f)), "{f} differs");
    }
}
