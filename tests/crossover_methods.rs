//! mergekit's task-vector methods as the run's crossover (`evolution.crossover`): a child of two
//! experts' seeds is exactly `merge`'s result on the two experts, task_arithmetic is CycleQD's
//! linear materialisation, DARE's drops are reproducible per genome and keep the density, and a
//! run with `crossover = "dare_ties"` exports the same final model it wrote.

mod common;

use std::collections::BTreeMap;

use common::{demo, read, run, run_to_end, set_key, stderr, testdata};
use cycleqd_engine::evolve::crossover::ParamValue;
use cycleqd_engine::evolve::{CrossoverMethod, ExpertSet, Genome, Rank};
use cycleqd_engine::merge::{merge_tensor, MergeOp};
use cycleqd_engine::model::{DType, HostTensor, ModelStore};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn open(name: &str) -> ModelStore {
    ModelStore::open_llama(testdata().join("merge/set").join(name)).unwrap()
}

fn set_with(method: &str, params: &[(&str, f64)]) -> ExpertSet {
    let params: BTreeMap<String, ParamValue> = params
        .iter()
        .map(|(k, v)| (k.to_string(), ParamValue::Number(*v)))
        .collect();
    let crossover = CrossoverMethod::parse(method, &params).unwrap();
    ExpertSet::build(
        open("base"),
        ["expert_a", "expert_b", "expert_c"]
            .iter()
            .map(|e| open(e))
            .collect(),
        Rank::Full,
    )
    .unwrap()
    .with_crossover(crossover)
}

/// `merge`'s own operator on host tensors, as f32.
fn merged(op: &MergeOp, base: &HostTensor, models: &[&HostTensor]) -> Vec<f32> {
    let out = std::sync::Mutex::new(vec![0u8; base.numel() * 4]);
    let sink = |off: usize, b: &[u8]| {
        out.lock().unwrap()[off..off + b.len()].copy_from_slice(b);
        Ok(())
    };
    merge_tensor("t", op, Some(base), models, DType::F32, &sink).unwrap();
    bytemuck::cast_slice(&out.into_inner().unwrap()).to_vec()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_ties_child_of_two_experts_is_the_ties_merge_of_the_two() {
    let set = set_with("ties", &[("density", 0.4)]);
    let linear = set_with("linear", &[]);
    let (w1, w2) = (1.013f32, 0.987f32);
    let child = Genome::crossover(&Genome::seed(&set, 0), &Genome::seed(&set, 2), w1, w2);
    let weights = vec![w1 / (w1 + w2), w2 / (w1 + w2)];
    let mut sparsified = 0;
    for (t, tf) in set.tensors.iter().enumerate() {
        let got = set.materialize_tensor(&child, t).unwrap().to_f32();
        let base = set.base.tensor(&tf.name).unwrap();
        let a = set.experts[0].tensor(&tf.name).unwrap();
        let c = set.experts[2].tensor(&tf.name).unwrap();
        let op = MergeOp::ties(weights.clone(), vec![0.4, 0.4], 1.0, true);
        let want = merged(&op, &base, &[&a, &c]);
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(
            max_abs_diff(&got, &want) <= 1e-6 * scale.max(1.0),
            "{}: ties crossover differs from the ties merge by {}",
            tf.name,
            max_abs_diff(&got, &want)
        );
        // And it is not the linear child: TIES dropped something.
        let linear = linear.materialize_tensor(&child, t).unwrap().to_f32();
        if max_abs_diff(&got, &linear) > 1e-4 {
            sparsified += 1;
        }
    }
    assert!(sparsified > set.tensors.len() / 2, "{sparsified} tensors");
}

#[test]
fn task_arithmetic_crossover_is_the_linear_materialisation() {
    let ta = set_with("task_arithmetic", &[]);
    let linear = set_with("linear", &[]);
    // A child several crossovers and SVD mutations deep, so every a_e and γ_e is general.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut g: Vec<Genome> = (0..3).map(|e| Genome::seed(&ta, e)).collect();
    for step in 0..6 {
        let mut child = Genome::crossover(&g[step % 3], &g[(step + 1) % 3], 1.01, 0.98);
        let w = Genome::draw_mutation(&ta, step % 3, 0.1, &mut rng);
        child.mutate(&ta, step % 3, &w, 0.1);
        g.push(child);
    }
    let child = g.last().unwrap();
    for t in 0..ta.tensors.len() {
        let got = ta.materialize_tensor(child, t).unwrap().to_f32();
        let want = linear.materialize_tensor(child, t).unwrap().to_f32();
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(
            max_abs_diff(&got, &want) <= 2e-6 * scale.max(1.0),
            "{}: {}",
            ta.tensors[t].name,
            max_abs_diff(&got, &want)
        );
    }
}

#[test]
fn dare_drops_are_reproducible_per_genome_and_keep_the_density() {
    let density = 0.3;
    let set = set_with("dare_linear", &[("density", density)]);
    let seed = Genome::seed(&set, 1);
    let child = Genome::crossover(&Genome::seed(&set, 0), &seed, 1.0, 1.0);
    let (mut kept, mut total) = (0usize, 0usize);
    let mut child_differs = false;
    for (t, tf) in set.tensors.iter().enumerate() {
        let once = set.materialize_tensor(&seed, t).unwrap();
        let twice = set.materialize_tensor(&seed, t).unwrap();
        assert_eq!(once.data(), twice.data(), "{}: not reproducible", tf.name);
        let base = set.base.tensor(&tf.name).unwrap().to_f32();
        let expert = set.experts[1].tensor(&tf.name).unwrap().to_f32();
        for ((x, b), e) in once.to_f32().iter().zip(&base).zip(&expert) {
            if e != b {
                total += 1;
                kept += usize::from(x != b);
            }
        }
        child_differs |= set.materialize_tensor(&child, t).unwrap().data() != once.data();
    }
    // Binomial(total, density): the kept fraction within 5 standard deviations.
    let frac = kept as f64 / total as f64;
    let sd = (density * (1.0 - density) / total as f64).sqrt();
    assert!(
        (frac - density).abs() < 5.0 * sd,
        "kept {frac:.4} of {total}, density {density}"
    );
    assert!(child_differs);
}

#[test]
fn a_run_with_dare_ties_crossover_exports_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| {
        set_key(t, "generations", "12").replace(
            "[evolution]",
            "[evolution]\ncrossover = \"dare_ties\"\ncrossover_parameters = { density = 0.6 }",
        )
    });
    let out = dir.path().join("run");
    let o = run_to_end(&cfg, &out);
    assert!(o.status.success(), "run: {}", stderr(&o));
    let saved = String::from_utf8(read(&out.join("config.toml"))).unwrap();
    assert!(saved.contains("crossover = \"dare_ties\""), "{saved}");
    let again = dir.path().join("again");
    let o = run(&[
        "export",
        out.to_str().unwrap(),
        "--final",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    assert_eq!(
        read(&again.join("model.safetensors")),
        read(&out.join("final/model.safetensors"))
    );
    // A method that is not a task-vector merge is refused before anything runs.
    let bad = demo(&dir.path().join("bad"), |t| {
        t.replace("[evolution]", "[evolution]\ncrossover = \"slerp\"")
    });
    let o = run(&[
        "run",
        "--config",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("bad-run").to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("evolution.crossover"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
