//! Evolution core on a ~100M-parameter synthetic set (base + 3 experts, bf16; generated on
//! first run under `target/evolve-bench`): factorise time (batched randomized SVD, rank 64, all
//! 2-D task vectors) and materialise throughput of one genome, as GB/s of sources read + weights
//! written against the measured copy bandwidth.
//!
//! Napkin math for materialise: it reads base + 3 experts (4 × 200 MB bf16) and U, Vᵀ of the
//! factors (f32), and writes 200 MB: memory-bound, so the ceiling is the copy bandwidth.
//!
//! Run: `cargo bench --bench evolve_cpu`.

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::{Backend, Placement, TensorCoefficients};
use cycleqd_engine::bench::{cpu_copy_bandwidth, cpu_peak_flops, time_median};
use cycleqd_engine::evolve::{ExpertSet, Genome, Rank};
use cycleqd_engine::model::{export_tensors, DType, HostTensor, ModelStore};
use cycleqd_engine::synth::{random_llama, LlamaShape};

const RANK: usize = 64;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/evolve-bench");
    let names = ["base", "expert_0", "expert_1", "expert_2"];
    if !names
        .iter()
        .all(|n| dir.join(n).join("config.json").is_file())
    {
        let shape = LlamaShape::SMALL_100M;
        let (_, base) = random_llama(&shape, DType::BF16, 1).unwrap();
        let cfg = shape.config_json(DType::BF16);
        export_tensors(&dir.join("base"), &base, &cfg, None, u64::MAX).unwrap();
        for e in 0..3 {
            // Expert = base + a low-rank-dominated task vector plus noise, like a fine-tune.
            let mut rng = ChaCha8Rng::seed_from_u64(100 + e);
            let tensors: Vec<(String, HostTensor)> = base
                .iter()
                .map(|(n, t)| {
                    let v: Vec<f32> = t
                        .to_f32()
                        .iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let lowrank = ((i % 97) as f32 / 97.0 - 0.5) * 0.004 * (e as f32 + 1.0);
                            x + lowrank + (rng.random::<f32>() - 0.5) * 0.001
                        })
                        .collect();
                    (
                        n.clone(),
                        HostTensor::from_f32(&v, t.shape.clone(), DType::BF16),
                    )
                })
                .collect();
            export_tensors(
                &dir.join(names[e as usize + 1]),
                &tensors,
                &cfg,
                None,
                u64::MAX,
            )
            .unwrap();
        }
    }
    let open = |n: &str| ModelStore::open_llama(dir.join(n)).unwrap();
    let t = Instant::now();
    let set = ExpertSet::build(
        open("base"),
        names[1..].iter().map(|n| open(n)).collect(),
        Rank::Truncated(RANK),
    )
    .unwrap();
    let factorise_s = t.elapsed().as_secs_f64();
    let matrices: usize = set.tensors.iter().map(|t| t.factors.len()).sum();
    let worst = set
        .tensors
        .iter()
        .flat_map(|t| t.relative_error.iter().copied())
        .fold(0.0, f64::max);
    println!("factorise: {matrices} task-vector matrices, rank {RANK}, {factorise_s:.1} s (validation and task vectors included); worst relative error {worst:.3}");

    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let seeds: Vec<Genome> = (0..3).map(|e| Genome::seed(&set, e)).collect();
    let mut child = Genome::crossover(&seeds[0], &seeds[1], 1.0, 1.0);
    let w = Genome::draw_mutation(&set, 2, 0.1, &mut rng);
    child.mutate(&set, 2, &w, 0.1);

    let bw = cpu_copy_bandwidth(512 << 20);
    let bytes: usize = set
        .tensors
        .iter()
        .map(|tf| {
            let weights = set.base.tensor(&tf.name).unwrap().data().len();
            let factors: usize = tf
                .factors
                .iter()
                .map(|f| (f.u.len() + f.vt.len()) * 4)
                .sum();
            5 * weights + factors
        })
        .sum();
    // The loop's steady state: every tensor written in place into weights allocated once.
    let mut sources = CpuBackend
        .place_sources(
            (0..set.tensors.len())
                .map(|t| set.tensor_sources(t).unwrap())
                .collect(),
            Placement::Resident,
        )
        .unwrap();
    let mut weights: Vec<HostTensor> = set
        .tensors
        .iter()
        .map(|tf| {
            let (dt, shape) = set.base.meta(&tf.name).unwrap();
            CpuBackend.zeros_weight(shape, dt).unwrap()
        })
        .collect();
    let coefs: Vec<TensorCoefficients> = (0..set.tensors.len())
        .map(|t| {
            let mut c = TensorCoefficients::default();
            set.coefficients_into(&child, t, &mut c);
            c
        })
        .collect();
    let secs = time_median(3, || {
        let mut outs: Vec<&mut HostTensor> = weights.iter_mut().collect();
        CpuBackend
            .materialize_into(&mut outs, &mut sources, &coefs)
            .unwrap();
        std::hint::black_box(&weights);
    })
    .as_secs_f64();
    // The low-rank products are GEMMs of 2·m·n·r FLOPs per expert: at rank 64 they, not the
    // memory traffic, bound materialisation on a CPU.
    let flops: f64 = set
        .tensors
        .iter()
        .flat_map(|tf| tf.factors.iter())
        .map(|f| 2.0 * (f.m * f.n * f.rank()) as f64)
        .sum();
    let peak = cpu_peak_flops();
    println!(
        "materialise: low-rank products {:.1} GFLOP at {:.1} GFLOP/s = {:.1}% of measured f32 peak {:.1} GFLOP/s",
        flops / 1e9,
        flops / secs / 1e9,
        100.0 * flops / secs / peak,
        peak / 1e9
    );
    println!(
        "materialise: one genome, {:.2} GB moved in {:.3} s = {:.2} GB/s, {:.1}% of copy bandwidth {:.1} GB/s",
        bytes as f64 / 1e9,
        secs,
        bytes as f64 / secs / 1e9,
        100.0 * bytes as f64 / secs / bw,
        bw / 1e9
    );
}
