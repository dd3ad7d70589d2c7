//! Shared helpers of the integration tests: where the reference data lives, the built binary,
//! and small file surgery for bad-input fixtures.
#![allow(dead_code)]

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
