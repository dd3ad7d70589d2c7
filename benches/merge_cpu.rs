//! Merge throughput on a ~1.1B-parameter synthetic set (TinyLlama shape; base + 3 experts,
//! bf16, generated here on first run): every method `merge` knows, through the release binary,
//! reported as GB/s of input read + output written, as a fraction of this machine's measured
//! copy bandwidth, of its page-cache read bandwidth (bytes read), and of the bound that reading
//! each input once and writing the output durably at the measured disk rate set ("of bound":
//! 100% is a merge as fast as its I/O), with peak RSS; and the same configs through
//! `mergekit-yaml` when
//! `MERGEKIT_YAML` names it (e.g. `MERGEKIT_YAML=/work/pyenv/bin/mergekit-yaml`).
//!
//! Napkin math: a task-arithmetic merge of 4 bf16 inputs reads 4 × 2.2 GB and writes 2.2 GB;
//! it is memory-bound, so its ceiling is the copy bandwidth. TIES reads each (base, expert) pair
//! three more times to find the magnitude cuts (2 histogram passes + 1 tie count), which this
//! accounting does not credit: its GB/s counts each byte once.
//!
//! Run: `cargo build --release && cargo bench --bench merge_cpu` (set `CYCLEQD_BENCH_DIR` to
//! choose where the 9 GB of inputs go, default `target/merge-bench`; `CYCLEQD_MERGE_METHODS=a,b`
//! to time only some methods). The random methods run with `--random-seed 42` on both sides.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use cycleqd_engine::bench::cpu_copy_bandwidth;
use cycleqd_engine::model::{dtype, CheckpointWriter, DType, TensorSpec};
use cycleqd_engine::synth::LlamaShape;

const SHAPE: LlamaShape = LlamaShape {
    hidden_size: 2048,
    num_hidden_layers: 22,
    num_attention_heads: 32,
    num_key_value_heads: 4,
    intermediate_size: 5632,
    vocab_size: 32000,
    max_position_embeddings: 2048,
    tie_word_embeddings: false,
};
const MODELS: [&str; 4] = ["base", "expert_1", "expert_2", "expert_3"];

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists targets: nothing to run.
    }
    let dir = std::env::var_os("CYCLEQD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/merge-bench"));
    std::fs::create_dir_all(&dir).unwrap();
    generate_set(&dir);
    write_configs(&dir);
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/cycleqd-engine");
    assert!(
        engine.is_file(),
        "build the binary first: cargo build --release"
    );

    let bw = cpu_copy_bandwidth(1 << 30);
    println!(
        "copy bandwidth (read + write): {:.1} GB/s, {} threads",
        bw / 1e9,
        rayon::current_num_threads()
    );
    read_inputs(&dir, 64 << 20);
    let read_big = read_bandwidth(&dir, 64 << 20);
    let read_small = read_bandwidth(&dir, 128 << 10);
    // The ceiling is the faster way: small reads whose buffer stays in L2 avoid writing
    // 64 MiB back to memory after each copy.
    let read_bw = read_big.max(read_small);
    println!(
        "page-cache read bandwidth (pread, files in parallel): {:.1} GB/s with 64 MiB buffers, \
         {:.1} GB/s with 128 KiB buffers",
        read_big / 1e9,
        read_small / 1e9
    );
    let disk_bw = durable_write_bandwidth(&dir);
    println!(
        "durable write bandwidth (O_DIRECT, 4 MiB writes, fsync): {:.2} GB/s",
        disk_bw / 1e9
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "merge", "seconds", "GB/s", "of copy", "of read", "of bound", "peak RSS"
    );
    let mergekit = std::env::var_os("MERGEKIT_YAML");
    let only = std::env::var("CYCLEQD_MERGE_METHODS").ok();
    let methods: Vec<&str> = METHODS
        .iter()
        .map(|(m, _)| *m)
        .filter(|m| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *m))
        })
        .collect();
    for method in methods {
        let out = dir.join(format!("out-engine-{method}"));
        read_inputs(&dir, 64 << 20);
        let o = Command::new(&engine)
            .current_dir(&dir)
            .args([
                "merge",
                &format!("{method}.yml"),
                out.to_str().unwrap(),
                "--json",
                "--random-seed",
                "42",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let bytes = r["bytes_read"].as_f64().unwrap() + r["bytes_written"].as_f64().unwrap();
        let secs = r["seconds"].as_f64().unwrap();
        let rss = r["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
        let read = r["bytes_read"].as_f64().unwrap();
        // The binding limit of a merge that reads each input once and writes its output
        // durably: the slower of reading at the page-cache rate and writing at the disk's.
        let bound = (read / read_bw).max(r["bytes_written"].as_f64().unwrap() / disk_bw);
        println!(
            "{:<28} {:>9.2} {:>9.2} {:>8.1}% {:>8.1}% {:>8.1}% {:>7.2} GB",
            format!("engine/{method}"),
            secs,
            bytes / secs / 1e9,
            100.0 * bytes / secs / bw,
            100.0 * read / secs / read_bw,
            100.0 * bound / secs,
            rss / 1e9
        );
        let _ = std::fs::remove_dir_all(&out);
        if let Some(mk) = &mergekit {
            let out = dir.join(format!("out-mergekit-{method}"));
            read_inputs(&dir, 64 << 20);
            let t = Instant::now();
            // No model card, offline: writing the card asks the Hub whether local paths are repos.
            let o = Command::new("python3")
                .current_dir(&dir)
                .env("HF_HUB_OFFLINE", "1")
                .args([
                    "-c",
                    "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); \
                     print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)",
                ])
                .arg(mk)
                .args([
                    &format!("{method}.yml"),
                    out.to_str().unwrap(),
                    "--no-write-model-card",
                    "--random-seed",
                    "42",
                ])
                .output()
                .unwrap();
            let secs_mk = t.elapsed().as_secs_f64();
            assert!(
                o.status.success(),
                "mergekit failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let rss_kb: f64 = String::from_utf8_lossy(&o.stdout)
                .trim()
                .lines()
                .last()
                .unwrap()
                .parse()
                .unwrap();
            println!(
                "{:<28} {:>9.2} {:>9.2} {:>8.1}% {:>8.1}% {:>8.1}% {:>7.2} GB   (engine {:.1}× faster, {:.0}% of its memory)",
                format!("mergekit/{method}"),
                secs_mk,
                bytes / secs_mk / 1e9,
                100.0 * bytes / secs_mk / bw,
                100.0 * read / secs_mk / read_bw,
                100.0 * bound / secs_mk,
                rss_kb * 1024.0 / 1e9,
                secs_mk / secs,
                100.0 * rss / (rss_kb * 1024.0)
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    if mergekit.is_none() {
        println!("mergekit comparison skipped: set MERGEKIT_YAML to a mergekit-yaml executable");
    }
}

/// base ~ N(0, 0.02²) (uniform of equal variance, for speed); expert e = base + a sparse-ish
/// task vector, so TIES has real magnitude structure to cut.
fn generate_set(dir: &Path) {
    if MODELS
        .iter()
        .all(|m| dir.join(m).join("config.json").is_file())
    {
        return;
    }
    let cfg = SHAPE.config(DType::BF16).unwrap();
    let specs: Vec<TensorSpec> = cfg
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| TensorSpec {
            name,
            dtype: DType::BF16,
            shape,
        })
        .collect();
    println!(
        "generating {} params × {} models (bf16) in {} ...",
        cfg.num_parameters(),
        MODELS.len(),
        dir.display()
    );
    let writers: Vec<CheckpointWriter> = MODELS
        .iter()
        .map(|m| CheckpointWriter::create(&dir.join(m), specs.clone(), 2_000_000_000).unwrap())
        .collect();
    for (ti, spec) in specs.iter().enumerate() {
        let n: usize = spec.shape.iter().product();
        let chunk = 1 << 20;
        let base: Vec<f32> = (0..n.div_ceil(chunk))
            .into_par_iter()
            .flat_map_iter(|c| {
                let mut rng = ChaCha8Rng::seed_from_u64((ti * 100_000 + c) as u64);
                let len = chunk.min(n - c * chunk);
                (0..len).map(move |_| rng.random_range(-0.0346f32..0.0346))
            })
            .collect();
        writers[0]
            .write(&spec.name, &dtype::from_f32(DType::BF16, &base))
            .unwrap();
        for (e, w) in writers.iter().enumerate().skip(1) {
            let expert: Vec<f32> = base
                .par_chunks(chunk)
                .enumerate()
                .flat_map_iter(|(c, b)| {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64((e * 1_000_000_007 + ti * 100_000 + c) as u64);
                    b.iter()
                        .map(move |&x| {
                            let u: f32 = rng.random();
                            x + if u < 0.1 {
                                (u - 0.05) * 0.1
                            } else {
                                (u - 0.55) * 0.002
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            w.write(&spec.name, &dtype::from_f32(DType::BF16, &expert))
                .unwrap();
        }
    }
    for w in writers {
        w.finish(&SHAPE.config_json(DType::BF16), None).unwrap();
    }
}

/// One configuration per method: the three experts over the base where the method takes one,
/// mergekit's usual parameters (density 0.3 for the sparsifying ones), bf16 out.
const METHODS: &[(&str, &str)] = &[
    ("linear", "models:\n{W}"),
    ("task_arithmetic", "base_model: base\nmodels:\n{W}"),
    ("ties", "base_model: base\nmodels:\n{WD}"),
    ("dare_linear", "base_model: base\nmodels:\n{WD}"),
    ("dare_ties", "base_model: base\nmodels:\n{WD}"),
    ("breadcrumbs", "base_model: base\nmodels:\n{WD}"),
    ("breadcrumbs_ties", "base_model: base\nmodels:\n{WD}"),
    ("della", "base_model: base\nmodels:\n{WD}parameters: {epsilon: 0.1}\n"),
    ("della_linear", "base_model: base\nmodels:\n{WD}parameters: {epsilon: 0.1}\n"),
    ("slerp", "base_model: base\nmodels: [{model: base}, {model: expert_1}]\nparameters: {t: 0.4}\n"),
    ("nuslerp", "base_model: base\nmodels:\n  - {model: expert_1, parameters: {weight: 0.6}}\n  - {model: expert_2, parameters: {weight: 0.4}}\n"),
    ("multislerp", "base_model: base\nmodels:\n{W}"),
    ("karcher", "models: [{model: expert_1}, {model: expert_2}, {model: expert_3}]\n"),
    ("model_stock", "base_model: base\nmodels: [{model: expert_1}, {model: expert_2}, {model: expert_3}]\n"),
    ("sce", "base_model: base\nmodels: [{model: expert_1}, {model: expert_2}, {model: expert_3}]\nparameters: {select_topk: 0.5}\n"),
    ("passthrough", "slices:\n  - sources: [{model: expert_1, layer_range: [0, 16]}]\n  - sources: [{model: expert_2, layer_range: [8, 22]}]\n"),
];

fn write_configs(dir: &Path) {
    let weights = "  - {model: expert_1, parameters: {weight: 0.7}}\n  - {model: expert_2, parameters: {weight: 0.5}}\n  - {model: expert_3, parameters: {weight: 0.3}}\n";
    let dense = weights.replace("}}", ", density: 0.3}}");
    for (method, body) in METHODS {
        let body = body.replace("{WD}", &dense).replace("{W}", weights);
        std::fs::write(
            dir.join(format!("{method}.yml")),
            format!("merge_method: {method}\n{body}dtype: bfloat16\n"),
        )
        .unwrap();
    }
}

/// The bandwidth of reading the (cached) inputs with `buffer`-byte preads, in bytes/s: the
/// best of three reads.
fn read_bandwidth(dir: &Path, buffer: usize) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let bytes = read_inputs(dir, buffer);
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// The rate at which this disk takes 1 GiB written with `O_DIRECT` in 4 MiB writes and
/// fsynced (what the engine's checkpoint writer does), in bytes/s.
fn durable_write_bandwidth(dir: &Path) -> f64 {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4 << 20;
    let path = dir.join("disk-probe.bin");
    let layout = std::alloc::Layout::from_size_align(BLOCK, 4096).unwrap();
    // SAFETY: a non-zero-sized layout; the block is filled before it is read and freed below.
    let block = unsafe {
        let p = std::alloc::alloc(layout);
        assert!(!p.is_null());
        std::ptr::write_bytes(p, 0x5a, BLOCK);
        std::slice::from_raw_parts_mut(p, BLOCK)
    };
    let t = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    for _ in 0..256 {
        f.write_all(block).unwrap();
    }
    f.sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    // SAFETY: allocated above with this layout; no reference to it is used past this point.
    unsafe { std::alloc::dealloc(block.as_mut_ptr(), layout) };
    std::fs::remove_file(&path).unwrap();
    (256 * BLOCK) as f64 / secs
}

/// Reads every input file once (pread into a reused `buffer`-byte buffer per thread, files in
/// parallel), returning the bytes read. Run before each timed merge, so that neither tool
/// starts with inputs the other's run (outputs, mergekit's ~8 GB resident) pushed out of the
/// page cache.
fn read_inputs(dir: &Path, buffer: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let files: Vec<PathBuf> = MODELS
        .iter()
        .flat_map(|m| std::fs::read_dir(dir.join(m)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files
        .par_iter()
        .map(|p| {
            let f = std::fs::File::open(p).unwrap();
            let mut buf = vec![0u8; buffer];
            let mut off = 0u64;
            loop {
                let n = f.read_at(&mut buf, off).unwrap();
                if n == 0 {
                    break off;
                }
                std::hint::black_box(&buf[..n]);
                off += n as u64;
            }
        })
        .sum()
}
