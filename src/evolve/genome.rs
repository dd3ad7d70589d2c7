//! Genomes: every individual CycleQD produces, as coefficients over the experts' factored task
//! vectors (`cycleqd.md` §7). Per 2-D tensor,
//! `θ = θ_b + Σ_e [a_e·R_e + U_e·diag(γ_e)·V_eᵀ]` with `R_e = τ_e − U_e diag(S_e) V_eᵀ`;
//! per 1-D (or `norm`) tensor, `θ = θ_b + Σ_e a_e·τ_e`. Crossover, SVD mutation and the final
//! merge are linear in these coefficients, so they act on genomes (KBs–MBs) and weights are
//! materialised only to evaluate a child.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::expert_set::{ExpertSet, Rank};
use crate::error::{Error, Result};

/// Coefficients of one tensor: `a[e]` and `gamma[e][k]` (empty for unfactorised tensors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorGenes {
    pub a: Vec<f32>,
    pub gamma: Vec<Vec<f32>>,
}

/// An individual, as coefficients per tensor in the expert set's order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Genome {
    pub tensors: Vec<TensorGenes>,
}

impl Genome {
    /// Expert `e` itself: `a_e = 1, γ_e = S_e`, every other expert 0.
    pub fn seed(set: &ExpertSet, e: usize) -> Genome {
        let k = set.experts.len();
        Genome {
            tensors: set
                .tensors
                .iter()
                .map(|tf| TensorGenes {
                    a: (0..k).map(|i| if i == e { 1.0 } else { 0.0 }).collect(),
                    gamma: tf
                        .factors
                        .iter()
                        .enumerate()
                        .map(|(i, f)| {
                            if i == e {
                                f.s.clone()
                            } else {
                                vec![0.0; f.rank()]
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// `Σ_k w_k · g_k` over genomes with weights `w` (each coefficient).
    pub fn weighted_sum(genomes: &[&Genome], w: &[f32]) -> Genome {
        let mut out = genomes[0].clone();
        for (t, tg) in out.tensors.iter_mut().enumerate() {
            for (e, a) in tg.a.iter_mut().enumerate() {
                *a = genomes
                    .iter()
                    .zip(w)
                    .map(|(g, &w)| w * g.tensors[t].a[e])
                    .sum();
            }
            for (e, gamma) in tg.gamma.iter_mut().enumerate() {
                for (k, v) in gamma.iter_mut().enumerate() {
                    *v = genomes
                        .iter()
                        .zip(w)
                        .map(|(g, &w)| w * g.tensors[t].gamma[e][k])
                        .sum();
                }
            }
        }
        out
    }

    /// CycleQD crossover (model-wise coefficients): `(ω₁ g₁ + ω₂ g₂) / (ω₁ + ω₂)`.
    pub fn crossover(p1: &Genome, p2: &Genome, w1: f32, w2: f32) -> Genome {
        let s = w1 + w2;
        Genome::weighted_sum(&[p1, p2], &[w1 / s, w2 / s])
    }

    /// Crossover with one coefficient pair per tensor (`w1[t]`, `w2[t]`): the per-layer and
    /// per-tensor options; equal to [`Genome::crossover`] when all pairs are equal.
    pub fn crossover_per_tensor(p1: &Genome, p2: &Genome, w1: &[f32], w2: &[f32]) -> Genome {
        let mix = |c1: f32, c2: f32, x: &[f32], y: &[f32]| -> Vec<f32> {
            x.iter().zip(y).map(|(a, b)| c1 * a + c2 * b).collect()
        };
        Genome {
            tensors: p1
                .tensors
                .iter()
                .zip(&p2.tensors)
                .enumerate()
                .map(|(t, (g1, g2))| {
                    let s = w1[t] + w2[t];
                    let (c1, c2) = (w1[t] / s, w2[t] / s);
                    TensorGenes {
                        a: mix(c1, c2, &g1.a, &g2.a),
                        gamma: g1
                            .gamma
                            .iter()
                            .zip(&g2.gamma)
                            .map(|(x, y)| mix(c1, c2, x, y))
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// All coefficients in order (per tensor: `a`, then each expert's `γ`): the genome's
    /// on-disk form (an f32 tensor in checkpoints and archives).
    pub fn to_flat(&self) -> Vec<f32> {
        let mut v = vec![];
        for t in &self.tensors {
            v.extend_from_slice(&t.a);
            t.gamma.iter().for_each(|g| v.extend_from_slice(g));
        }
        v
    }

    /// Inverse of [`Genome::to_flat`] for genomes of `set` (the layout comes from its factors).
    pub fn from_flat(set: &ExpertSet, flat: &[f32]) -> Result<Genome> {
        let k = set.experts.len();
        let want: usize = set
            .tensors
            .iter()
            .map(|tf| k + tf.factors.iter().map(|f| f.rank()).sum::<usize>())
            .sum();
        if flat.len() != want {
            return Err(Error::invalid(format!(
                "genome has {} coefficients, the expert set needs {want}",
                flat.len()
            )));
        }
        let mut it = flat.iter().copied();
        let mut take = |n: usize| -> Vec<f32> { it.by_ref().take(n).collect() };
        Ok(Genome {
            tensors: set
                .tensors
                .iter()
                .map(|tf| TensorGenes {
                    a: take(k),
                    gamma: tf.factors.iter().map(|f| take(f.rank())).collect(),
                })
                .collect(),
        })
    }

    /// SVD mutation toward expert `q` (the code's form): `γ_q += w ⊙ S_q` on every factorised
    /// tensor, with `w[t][k]` drawn by the caller; with truncated factors the residual gets its
    /// expected share, `a_q += E[w] = w_max / 2`.
    pub fn mutate(&mut self, set: &ExpertSet, q: usize, w: &[Vec<f32>], w_max: f32) {
        for ((tg, tf), wt) in self.tensors.iter_mut().zip(&set.tensors).zip(w) {
            if tf.factors.is_empty() {
                continue;
            }
            let s = &tf.factors[q].s;
            tg.gamma[q]
                .iter_mut()
                .zip(s)
                .zip(wt)
                .for_each(|((g, s), w)| *g += w * s);
            if set.rank != Rank::Full {
                tg.a[q] += w_max / 2.0;
            }
        }
    }

    /// The final model of CycleQD (§6): `Σ_k softmax(f)_k · g_k` over the best elite of each
    /// archive, `f` their objectives.
    pub fn softmax_merge(genomes: &[&Genome], objectives: &[f64]) -> Genome {
        let max = objectives.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = objectives.iter().map(|f| (f - max).exp()).collect();
        let z: f64 = e.iter().sum();
        let beta: Vec<f32> = e.iter().map(|x| (x / z) as f32).collect();
        Genome::weighted_sum(genomes, &beta)
    }

    /// A stable content id: FNV-1a (64-bit) over the little-endian coefficients in order.
    pub fn content_id(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: f32| {
            for b in x.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for t in &self.tensors {
            t.a.iter().copied().for_each(&mut eat);
            t.gamma.iter().flatten().copied().for_each(&mut eat);
        }
        format!("{h:016x}")
    }

    /// Draws the mutation weights `w ~ U[0, w_max)` for every factorised tensor.
    pub fn draw_mutation(
        set: &ExpertSet,
        q: usize,
        w_max: f32,
        rng: &mut impl Rng,
    ) -> Vec<Vec<f32>> {
        set.tensors
            .iter()
            .map(|tf| match tf.factors.get(q) {
                Some(f) => (0..f.rank()).map(|_| rng.random::<f32>() * w_max).collect(),
                None => vec![],
            })
            .collect()
    }
}
