//! Genome arithmetic against the dense reference algorithm (`cycleqd.md` §4–6): with full-rank
//! factors, a chain of random crossovers and SVD mutations done on genomes and materialised must
//! equal the same chain done on dense weights.

mod common;

use common::testdata;
use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::{Backend, Placement, TensorCoefficients, TensorSources};
use cycleqd_engine::evolve::{exact_svd, is_factorised, ExpertSet, Factors, Genome, Rank};
use cycleqd_engine::llama::LlamaModel;
use cycleqd_engine::model::ModelStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn open(name: &str) -> ModelStore {
    ModelStore::open_llama(testdata().join("merge/set").join(name)).unwrap()
}

#[test]
fn genome_chain_equals_dense_chain_at_full_rank() {
    let experts = ["expert_a", "expert_b", "expert_c"];
    let set = ExpertSet::build(
        open("base"),
        experts.iter().map(|e| open(e)).collect(),
        Rank::Full,
    )
    .unwrap();
    let base: Vec<Vec<f32>> = set
        .tensors
        .iter()
        .map(|t| set.base.tensor(&t.name).unwrap().to_f32())
        .collect();
    let expert_w: Vec<Vec<Vec<f32>>> = set
        .experts
        .iter()
        .map(|e| {
            set.tensors
                .iter()
                .map(|t| e.tensor(&t.name).unwrap().to_f32())
                .collect()
        })
        .collect();
    // The mutation's SVDs, computed on their own from the dense task vectors.
    let svds: Vec<Vec<Option<Factors>>> = (0..3)
        .map(|q| {
            set.tensors
                .iter()
                .enumerate()
                .map(|(t, tf)| {
                    is_factorised(&tf.name, &tf.shape).then(|| {
                        let (m, n) = (tf.shape[0], tf.shape[1]);
                        let tau: Vec<f32> = expert_w[q][t]
                            .iter()
                            .zip(&base[t])
                            .map(|(x, b)| x - b)
                            .collect();
                        exact_svd(&tau, m, n, m.min(n)).unwrap()
                    })
                })
                .collect()
        })
        .collect();

    let mut genomes: Vec<Genome> = (0..3).map(|e| Genome::seed(&set, e)).collect();
    let mut dense: Vec<Vec<Vec<f32>>> = expert_w.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let omega = Normal::new(1.0f32, 0.01).unwrap();
    for step in 0..20 {
        let i = rng.random_range(0..genomes.len());
        let j = (i + rng.random_range(1..genomes.len())) % genomes.len();
        let (w1, w2) = (omega.sample(&mut rng), omega.sample(&mut rng));
        let q = step % 3;
        let w = Genome::draw_mutation(&set, q, 0.1, &mut rng);

        let mut child = Genome::crossover(&genomes[i], &genomes[j], w1, w2);
        child.mutate(&set, q, &w, 0.1);

        let mut d: Vec<Vec<f32>> = (0..set.tensors.len())
            .map(|t| {
                (0..base[t].len())
                    .map(|x| {
                        let (t1, t2) = (dense[i][t][x] - base[t][x], dense[j][t][x] - base[t][x]);
                        base[t][x] + (w1 * t1 + w2 * t2) / (w1 + w2)
                    })
                    .collect()
            })
            .collect();
        for (t, svd) in svds[q].iter().enumerate() {
            if let Some(f) = svd {
                let (n, r) = (set.tensors[t].shape[1], f.rank());
                for (x, val) in d[t].iter_mut().enumerate() {
                    let (row, col) = (x / n, x % n);
                    *val += (0..r)
                        .map(|k| f.u[row * r + k] * w[t][k] * f.s[k] * f.vt[k * n + col])
                        .sum::<f32>();
                }
            }
        }
        genomes.push(child);
        dense.push(d);
    }

    let relative = |got: &[f32], want: &[f32]| -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let mut worst = 0.0f64;
    for (g, d) in genomes.iter().zip(&dense).skip(3) {
        for (t, want) in d.iter().enumerate() {
            let got = set.materialize_tensor(g, t).unwrap().to_f32();
            worst = worst.max(relative(&got, want));
        }
    }
    eprintln!("worst relative difference, genome vs dense: {worst:.2e}");
    assert!(
        worst <= 1e-5,
        "genome chain differs from the dense chain by {worst}"
    );
    // The loop's path: every child written in place into one model's weights, over the
    // previous child's.
    let (mut model, mut sources, index) = child_model(&set);
    let mut worst = 0.0f64;
    for (g, d) in genomes.iter().zip(&dense).skip(3) {
        write_child(&set, &index, &mut model, &mut sources, g);
        for (w, &t) in model.weights().iter().zip(&index) {
            worst = worst.max(relative(&w.to_f32(), &d[t]));
        }
    }
    assert!(worst <= 1e-5, "in place: {worst} from the dense chain");
    // Seeds materialise to the experts themselves.
    let seed = set.materialize_tensor(&genomes[1], 3).unwrap().to_f32();
    let err: f32 = seed
        .iter()
        .zip(&expert_w[1][3])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn expert_set_rejects_bad_experts() {
    let one = ExpertSet::build(open("base"), vec![open("expert_a")], Rank::Full);
    assert!(one
        .err()
        .unwrap()
        .to_string()
        .contains("at least 2 experts"));
    let other = ModelStore::open_llama(common::llama_dir("tiny-gqa-bf16")).unwrap();
    let e = ExpertSet::build(open("base"), vec![open("expert_a"), other], Rank::Full)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tiny-gqa-bf16") && e.contains("differs from the base"),
        "{e}"
    );
}

#[test]
fn softmax_merge_ids_and_truncated_rank() {
    let experts = || {
        ["expert_a", "expert_b", "expert_c"]
            .iter()
            .map(|e| open(e))
            .collect::<Vec<_>>()
    };
    let set = ExpertSet::build(open("base"), experts(), Rank::Full).unwrap();
    let g: Vec<Genome> = (0..3).map(|e| Genome::seed(&set, e)).collect();
    // Equal objectives: the plain average; the a coefficients sum to 1 per tensor.
    let m = Genome::softmax_merge(&[&g[0], &g[1], &g[2]], &[0.5, 0.5, 0.5]);
    assert!(m
        .tensors
        .iter()
        .all(|t| t.a.iter().all(|a| (a - 1.0 / 3.0).abs() < 1e-6)));
    let f = [0.2f64, 0.9, 0.4];
    let m = Genome::softmax_merge(&[&g[0], &g[1], &g[2]], &f);
    let z: f64 = f.iter().map(|x| x.exp()).sum();
    assert!((m.tensors[0].a[1] as f64 - 0.9f64.exp() / z).abs() < 1e-6);
    // Ids distinguish genomes; serialisation round-trips.
    assert_ne!(g[0].content_id(), g[1].content_id());
    assert_ne!(g[0].content_id(), m.content_id());
    let back: Genome = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(back.content_id(), m.content_id());
    // Truncated ranks: reported errors are relative and below 1; too large a rank is an error.
    let t = ExpertSet::build(open("base"), experts(), Rank::Truncated(8)).unwrap();
    let errs: Vec<f64> = t
        .tensors
        .iter()
        .flat_map(|t| t.relative_error.clone())
        .collect();
    assert!(
        !errs.is_empty() && errs.iter().all(|e| (0.0..1.0).contains(e)),
        "{errs:?}"
    );
    let e = ExpertSet::build(open("base"), experts(), Rank::Truncated(65))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 65") && e.contains("tensor `"), "{e}");
    let e = ExpertSet::build(open("base"), experts(), Rank::Truncated(0))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 0"), "{e}");
}

#[test]
fn genomes_round_trip_and_per_tensor_crossover_generalises_model_wise() {
    let experts = Vec::from(["expert_a", "expert_b", "expert_c"].map(open));
    let set = ExpertSet::build(open("base"), experts, Rank::Truncated(8)).unwrap();
    let (g0, g1) = (Genome::seed(&set, 0), Genome::seed(&set, 1));
    let child = Genome::crossover(&g0, &g1, 1.02, 0.97);
    let flat = child.to_flat();
    assert_eq!(Genome::from_flat(&set, &flat).unwrap(), child);
    assert!(Genome::from_flat(&set, &flat[1..]).is_err());

    let n = set.tensors.len();
    let same = Genome::crossover_per_tensor(&g0, &g1, &vec![1.02; n], &vec![0.97; n]);
    assert_eq!(same, child);
    // Different coefficients per tensor: tensor t is exactly the model-wise merge with its pair.
    let w1: Vec<f32> = (0..n).map(|t| 1.0 + 0.01 * t as f32).collect();
    let w2: Vec<f32> = (0..n).map(|t| 1.0 - 0.005 * t as f32).collect();
    let mixed = Genome::crossover_per_tensor(&g0, &g1, &w1, &w2);
    for t in [0, n / 2, n - 1] {
        let whole = Genome::crossover(&g0, &g1, w1[t], w2[t]);
        assert_eq!(mixed.tensors[t], whole.tensors[t]);
    }
}

#[test]
fn child_weights_are_reused_and_never_written_under_a_reader() {
    let experts = Vec::from(["expert_a", "expert_b"].map(open));
    let set = ExpertSet::build(open("base"), experts, Rank::Truncated(4)).unwrap();
    let (g0, g1) = (Genome::seed(&set, 0), Genome::seed(&set, 1));
    let child = Genome::crossover(&g0, &g1, 0.6, 0.4);
    let (mut model, mut sources, index) = child_model(&set);
    let mut write = |model: &mut LlamaModel<CpuBackend>, g: &Genome| {
        write_child(&set, &index, model, &mut sources, g);
    };
    write(&mut model, &g0);
    let first_ptr = model.weights()[0].data().as_ptr();
    write(&mut model, &child);
    assert_eq!(
        model.weights()[0].data().as_ptr(),
        first_ptr,
        "buffer reused"
    );
    // Seed genomes are the experts themselves (to the factors' reconstruction error).
    write(&mut model, &g1);
    let expert = set.experts[1].tensor(&set.tensors[index[0]].name).unwrap();
    let worst = model.weights()[0]
        .to_f32()
        .iter()
        .zip(expert.to_f32())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-2, "seed 1 is expert 1: {worst}");

    // A reader still holding the previous child keeps its bytes; the writer moves on.
    let held = model.weights()[0].clone();
    let before = held.data().to_vec();
    write(&mut model, &g0);
    assert_eq!(held.data(), &before[..]);
    assert_ne!(model.weights()[0].data().as_ptr(), first_ptr);
    assert_ne!(
        model.weights()[0].data(),
        &before[..],
        "the new child was written"
    );
}

/// Writes genome `g` into `model` in place, as a worker does.
fn write_child(
    set: &ExpertSet,
    index: &[usize],
    model: &mut LlamaModel<CpuBackend>,
    sources: &mut Vec<TensorSources>,
    g: &Genome,
) {
    let coefs: Vec<TensorCoefficients> = index
        .iter()
        .map(|&t| {
            let mut c = TensorCoefficients::default();
            set.coefficients_into(g, t, &mut c);
            c
        })
        .collect();
    CpuBackend
        .materialize_into(&mut model.weights_mut(), sources, &coefs)
        .unwrap();
}

/// A zeroed child model over the set, its placed sources, and the set tensor of each weight.
fn child_model(set: &ExpertSet) -> (LlamaModel<CpuBackend>, Vec<TensorSources>, Vec<usize>) {
    let config = set.base.config().clone();
    let index: Vec<usize> = LlamaModel::<CpuBackend>::weight_names(&config)
        .iter()
        .map(|n| set.tensors.iter().position(|t| &t.name == n).unwrap())
        .collect();
    let model = LlamaModel::from_weights(config, |n| {
        let (dt, shape) = set.base.meta(n)?;
        CpuBackend.zeros_weight(shape, dt)
    })
    .unwrap();
    let sources = CpuBackend
        .place_sources(
            index
                .iter()
                .map(|&t| set.tensor_sources(t).unwrap())
                .collect(),
            Placement::Resident,
        )
        .unwrap();
    (model, sources, index)
}

#[test]
fn truncated_rank_mutation_gives_the_residual_its_expected_share() {
    let experts = Vec::from(["expert_a", "expert_b", "expert_c"].map(open));
    let set = ExpertSet::build(open("base"), experts, Rank::Truncated(4)).unwrap();
    let parent = Genome::crossover(&Genome::seed(&set, 0), &Genome::seed(&set, 1), 1.0, 1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (q, w_max) = (2, 0.2);
    let w = Genome::draw_mutation(&set, q, w_max, &mut rng);
    let mut child = parent.clone();
    child.mutate(&set, q, &w, w_max);
    for (t, tf) in set.tensors.iter().enumerate() {
        let (before, after) = (&parent.tensors[t], &child.tensors[t]);
        if tf.factors.is_empty() {
            assert_eq!(before, after, "{}: not factorised, not mutated", tf.name);
            continue;
        }
        // γ_q += w ⊙ S_q, and a_q += E[w] = w_max / 2 for the part the factors do not hold.
        let s = &tf.factors[q].s;
        assert_eq!(w[t].len(), s.len());
        for (k, (&wk, &sk)) in w[t].iter().zip(s).enumerate() {
            let want = before.gamma[q][k] + wk * sk;
            assert!((after.gamma[q][k] - want).abs() <= 1e-6 * want.abs().max(1.0));
            assert!((0.0..w_max).contains(&wk));
        }
        assert!(
            (after.a[q] - (before.a[q] + w_max / 2.0)).abs() < 1e-7,
            "{}",
            tf.name
        );
        for e in (0..3).filter(|&e| e != q) {
            assert_eq!(before.a[e], after.a[e]);
            assert_eq!(before.gamma[e], after.gamma[e]);
        }
    }
}
