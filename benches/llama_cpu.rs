//! CPU Llama throughput on a ~100M-parameter random Llama (bf16, generated here): decode
//! tokens/s at batch 1, 16 and 64 and prefill tokens/s at batch 1 and 16, then each as a
//! fraction of this machine's measured ceilings. Napkin math: a decode step reads every weight
//! byte once plus the KV cache of every sequence (memory: achieved bytes/s ÷ copy bandwidth,
//! and ÷ read bandwidth: on some machines reads stream well above the copy rate) and costs 2
//! FLOPs per weight per sequence (compute: achieved FLOP/s ÷ the measured FMA or bf16 dot
//! peak); whichever of the two takes longer at its ceiling is the bound the `of bound` column
//! compares with (batch 1 is memory-bound, batch 64 compute-bound on a 2-core AVX-512 CPU). A
//! prefill costs 2 FLOPs per layer weight per token, plus the output projection for the one
//! position per sequence whose logits it computes (compute-bound). Attention's own FLOPs (under
//! 0.5% at 32 positions) are not counted.
//!
//! Run: `cargo bench --bench llama_cpu` (the criterion part in the process default, f32 unless
//! `$CYCLEQD_PRECISION` says otherwise; the summary table in f32 and, where the CPU has it, bf16).

use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};

use cycleqd_engine::backend::cpu::{CpuBackend, Isa, Precision};
use cycleqd_engine::bench::{
    cpu_copy_bandwidth, cpu_peak_bf16_flops, cpu_peak_flops, cpu_read_bandwidth, time_median,
};
use cycleqd_engine::llama::{KvCache, LlamaModel, RunState, Step};
use cycleqd_engine::model::DType;
use cycleqd_engine::synth::{random_llama, LlamaShape};

const PROMPT: usize = 32;
const PREFILL_BATCHES: [usize; 2] = [1, 16];
/// 64: one child's evaluation workload decodes its 64 prompts together.
const DECODE_BATCHES: [usize; 3] = [1, 16, 64];

struct Fixture {
    model: LlamaModel<CpuBackend>,
    weight_bytes: usize,
    /// Weights of the decoder layers' products (every token goes through them).
    layer_params: usize,
    /// Weights of the output projection (only positions whose logits are asked for).
    head_params: usize,
    /// Keys and values one position of one sequence holds, over all layers (values: their
    /// bytes depend on the cache's dtype, which follows the precision).
    kv_values_per_position: usize,
}

fn fixture() -> Fixture {
    let shape = LlamaShape::SMALL_100M;
    let (cfg, tensors) = random_llama(&shape, DType::BF16, 1).expect("random model");
    let weight_bytes = tensors.iter().map(|(_, t)| t.data().len()).sum();
    let norms = cfg.hidden_size * (2 * cfg.num_hidden_layers + 1);
    let head_params = cfg.vocab_size * cfg.hidden_size;
    // The embedding is a lookup, not a product; untied, the output projection is counted too.
    let embeddings = if cfg.tie_word_embeddings { 1 } else { 2 } * head_params;
    let layer_params = cfg.num_parameters() - norms - embeddings;
    let kv_values_per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim;
    let map: std::collections::HashMap<_, _> = tensors.into_iter().collect();
    let model = LlamaModel::from_tensors(&CpuBackend, cfg, |n| Ok(map[n].clone())).expect("model");
    Fixture {
        model,
        weight_bytes,
        layer_params,
        head_params,
        kv_values_per_position,
    }
}

/// A step of `batch` sequences: a `len`-token prefill at positions `start..start+len`.
fn step(batch: usize, start: usize, len: usize) -> Step {
    let mut s = Step::default();
    for b in 0..batch {
        for p in start..start + len {
            s.push(
                ((b * 131 + p * 17) % 30000 + 2) as u32,
                b,
                p,
                p + 1 == start + len,
            );
        }
    }
    s
}

struct Ctx {
    cache: KvCache<CpuBackend>,
    state: RunState<CpuBackend>,
    logits: Vec<f32>,
}

fn ctx(f: &Fixture, batch: usize) -> Ctx {
    let be = CpuBackend;
    let mut c = Ctx {
        cache: f.model.new_cache(&be, batch, PROMPT + 1).unwrap(),
        state: f.model.new_state(),
        logits: vec![],
    };
    f.model
        .forward(
            &be,
            &step(batch, 0, PROMPT),
            &mut c.cache,
            &mut c.state,
            &mut c.logits,
        )
        .unwrap();
    c
}

fn run(f: &Fixture, c: &mut Ctx, s: &Step) {
    f.model
        .forward(&CpuBackend, s, &mut c.cache, &mut c.state, &mut c.logits)
        .unwrap();
}

fn bench(cr: &mut Criterion) {
    let f = fixture();
    let mut g = cr.benchmark_group("llama_cpu_100m_bf16");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for batch in DECODE_BATCHES {
        let mut c = ctx(&f, batch);
        let decode = step(batch, PROMPT, 1);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("decode/batch{batch}"), |b| {
            b.iter(|| run(&f, &mut c, &decode))
        });
    }
    for batch in PREFILL_BATCHES {
        let mut c = ctx(&f, batch);
        let prefill = step(batch, 0, PROMPT);
        g.throughput(Throughput::Elements((batch * PROMPT) as u64));
        g.bench_function(format!("prefill{PROMPT}/batch{batch}"), |b| {
            b.iter(|| run(&f, &mut c, &prefill))
        });
    }
    g.finish();
    roofline(&f);
}

/// Tokens/s and the fraction of the measured ceiling, printed as one summary table per
/// precision: f32 (weights upcast), and bf16 (activations rounded, bf16 dot products) where
/// the CPU has the bf16 dot product.
fn roofline(f: &Fixture) {
    let bw = cpu_copy_bandwidth(512 << 20);
    let read_bw = cpu_read_bandwidth(512 << 20);
    let peak = cpu_peak_flops();
    let peak_bf16 = cpu_peak_bf16_flops();
    println!(
        "\nceilings: copy bandwidth {:.1} GB/s, read bandwidth {:.1} GB/s, f32 FMA peak {:.1} GFLOP/s, bf16 peak {} ({} threads, {})",
        bw / 1e9,
        read_bw / 1e9,
        peak / 1e9,
        peak_bf16.map_or("none".into(), |p| format!("{:.1} GFLOP/s", p / 1e9)),
        rayon::current_num_threads(),
        Isa::current().map_or("?", |i| i.name()),
    );
    let mut precisions = vec![(Precision::F32, peak)];
    if let Some(p) = peak_bf16 {
        precisions.push((Precision::Bf16, p));
    }
    for (precision, peak) in precisions {
        Precision::set(precision);
        println!(
            "\n{:?}: {:<16} {:>12} {:>14} {:>10}",
            precision, "op", "tokens/s", "achieved", "fraction"
        );
        for batch in DECODE_BATCHES {
            let mut c = ctx(f, batch);
            let decode = step(batch, PROMPT, 1);
            let t = time_median(10, || run(f, &mut c, &decode)).as_secs_f64();
            // The step reads the cache of all PROMPT + 1 positions, the new one included.
            let kv_bytes = f.kv_values_per_position * f.model.kv_dtype(&CpuBackend).size();
            let bytes = f.weight_bytes + batch * (PROMPT + 1) * kv_bytes;
            let flops = 2.0 * ((f.layer_params + f.head_params) * batch) as f64;
            let (gbs, gflops) = (bytes as f64 / t, flops / t);
            let memory_s = bytes as f64 / bw.max(read_bw);
            let compute_s = flops / peak;
            let (bound, bound_s) = if memory_s >= compute_s {
                ("memory", memory_s)
            } else {
                ("compute", compute_s)
            };
            println!(
                "{:<22} {:>12.1} {:>9.1} GB/s {:>9.1}% of copy, {:.1}% of read; {:.1} GFLOP/s, {:.1}% of peak; {:.1}% of bound ({bound})",
                format!("decode/batch{batch}"),
                batch as f64 / t,
                gbs / 1e9,
                100.0 * gbs / bw,
                100.0 * gbs / read_bw,
                gflops / 1e9,
                100.0 * gflops / peak,
                100.0 * bound_s / t,
            );
        }
        for batch in PREFILL_BATCHES {
            let mut c = ctx(f, batch);
            let prefill = step(batch, 0, PROMPT);
            let t = time_median(3, || run(f, &mut c, &prefill)).as_secs_f64();
            let flops = 2.0 * (f.layer_params * batch * PROMPT + f.head_params * batch) as f64 / t;
            println!(
                "{:<22} {:>12.1} {:>6.1} GFLOP/s {:>9.1}%",
                format!("prefill{PROMPT}/batch{batch}"),
                (batch * PROMPT) as f64 / t,
                flops / 1e9,
                100.0 * flops / peak
            );
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
