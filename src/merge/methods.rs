//! Model-merging operators, per tensor, as mergekit 0.1.5 defines them (CPU reference):
//! `linear` (`Σ w_i x_i / Σ w_i`), the generalised task arithmetic family ([`super::gta`]),
//! the spherical ones ([`super::sphere`]), `model_stock` and `sce` ([`super::stock`]), and
//! `passthrough` (one input, optionally scaled).
//!
//! Differences from mergekit, on purpose: inputs are upcast to f32 and every result is rounded
//! once to the output dtype (mergekit computes most methods in the input dtype, rounding bf16
//! at each step), and sums over a tensor accumulate in f64; for f32 inputs the two agree to
//! float rounding. Equal magnitudes at a top-k cut keep the lowest flat indices (mergekit's
//! order there depends on its sort); the random drops are mergekit's own ([`super::mt`]).
//!
//! Execution streams ([`super::tiles`]): passes over tiles in parallel, read from the input
//! files by positioned reads, so memory stays a few tiles per thread plus a bit mask per model.

use crate::error::{Error, Result};
use crate::model::{DType, HostTensor};
use crate::simd::widest_simd;

pub use super::gta::{Gta, Sparsify};
pub use super::sphere::Vectors;
use super::tiles;

/// A merge method with its parameters resolved for one tensor (one weight, density… per model,
/// in model order).
#[derive(Clone, Debug, PartialEq)]
pub enum MergeOp {
    Linear {
        weights: Vec<f32>,
        normalize: bool,
    },
    /// task_arithmetic, ties, dare_*, breadcrumbs*, della*.
    Gta(Gta),
    /// Base (t = 0) ↔ the one model (t = 1).
    Slerp {
        t: f32,
    },
    /// Two models, or their task vectors over the base when one is given.
    Nuslerp {
        t: f32,
        vectors: Vectors,
    },
    Multislerp {
        weights: Vec<f32>,
        normalize_weights: bool,
        eps: f64,
    },
    Karcher {
        max_iter: usize,
        tol: f64,
    },
    ModelStock {
        filter_wise: bool,
    },
    Sce {
        select_topk: f64,
    },
    Passthrough {
        scale: Option<f32>,
    },
}

impl MergeOp {
    /// `task_arithmetic`: `b + λ · Σ w_i τ_i [/ Σ w_i]`.
    pub fn task_arithmetic(weights: Vec<f32>, lambda: f32, normalize: bool) -> MergeOp {
        MergeOp::Gta(Gta {
            densities: vec![1.0; weights.len()],
            weights,
            sparsify: Sparsify::None,
            consensus: false,
            normalize,
            rescale: false,
            lambda,
        })
    }

    /// `ties`: magnitude top-k per task vector, sign consensus.
    pub fn ties(weights: Vec<f32>, densities: Vec<f64>, lambda: f32, normalize: bool) -> MergeOp {
        MergeOp::Gta(Gta {
            weights,
            densities,
            sparsify: Sparsify::Magnitude,
            consensus: true,
            normalize,
            rescale: false,
            lambda,
        })
    }

    /// Whether the op needs the base tensor (nuslerp and multislerp use one when given).
    pub fn needs_base(&self) -> bool {
        matches!(
            self,
            MergeOp::Gta(_)
                | MergeOp::Slerp { .. }
                | MergeOp::ModelStock { .. }
                | MergeOp::Sce { .. }
        )
    }

    /// Whether it draws from a random stream (tensors must then be merged in mergekit's order).
    pub fn is_random(&self) -> bool {
        matches!(self, MergeOp::Gta(g) if g.sparsify.is_random())
    }
}

/// Receives merged bytes: `(byte offset within the tensor, bytes in the output dtype)`.
pub type Sink<'a> = dyn Fn(usize, &[u8]) -> Result<()> + Sync + 'a;

/// Merges one tensor. `base` is the base model's tensor (SLERP: the t = 0 end), `models` the
/// others' (SLERP: exactly one, the t = 1 end). All share one shape; `name` is for errors.
pub fn merge_tensor(
    name: &str,
    op: &MergeOp,
    base: Option<&HostTensor>,
    models: &[&HostTensor],
    out_dtype: DType,
    sink: &Sink,
) -> Result<()> {
    let first = models
        .first()
        .copied()
        .or(base)
        .ok_or_else(|| Error::tensor(name, "merge has no input"))?;
    let n = first.numel();
    for t in models.iter().copied().chain(base) {
        if t.shape != first.shape {
            return Err(Error::tensor(
                name,
                format!(
                    "inputs differ in shape ({:?} vs {:?})",
                    t.shape, first.shape
                ),
            ));
        }
    }
    if op.needs_base() && base.is_none() {
        return Err(Error::tensor(name, "this merge method needs a base model"));
    }
    let count = |want: usize, what: &str| -> Result<()> {
        if models.len() == want {
            Ok(())
        } else {
            Err(Error::tensor(
                name,
                format!(
                    "{what} merges exactly {want} models besides the base, got {}",
                    models.len()
                ),
            ))
        }
    };
    if models.is_empty() && !matches!(op, MergeOp::Gta(_) | MergeOp::Sce { .. }) {
        return Err(Error::tensor(name, "merge has no model to merge"));
    }
    match op {
        MergeOp::Linear { weights, normalize } => {
            let total: f32 = weights.iter().sum();
            if *normalize && total == 0.0 {
                return Err(Error::tensor(
                    name,
                    "linear merge weights sum to zero; cannot normalise",
                ));
            }
            let divisor = normalize.then_some(total);
            tiles::output(n, models, out_dtype, sink, |_, xs, out| {
                linear_tile(xs, weights, divisor, out)
            })
        }
        MergeOp::Gta(g) => {
            let base = base.expect("checked above");
            if models.is_empty() {
                return tiles::output(n, &[base], out_dtype, sink, |_, xs, out| {
                    out.copy_from_slice(xs[0])
                });
            }
            super::gta::merge(name, g, base, models, out_dtype, sink)
        }
        MergeOp::Slerp { t } => {
            count(1, "slerp")?;
            super::sphere::slerp(base.expect("checked above"), models[0], *t, out_dtype, sink)
        }
        MergeOp::Nuslerp { t, vectors } => {
            count(2, "nuslerp")?;
            super::sphere::nuslerp(
                name, models[0], models[1], base, *t, *vectors, out_dtype, sink,
            )
        }
        MergeOp::Multislerp {
            weights,
            normalize_weights,
            eps,
        } => super::sphere::multislerp(
            name,
            models,
            base,
            weights,
            *normalize_weights,
            *eps,
            out_dtype,
            sink,
        ),
        MergeOp::Karcher { max_iter, tol } => {
            super::sphere::karcher(models, *max_iter, *tol, out_dtype, sink)
        }
        MergeOp::ModelStock { filter_wise } => super::stock::model_stock(
            name,
            base.expect("checked above"),
            models,
            *filter_wise,
            out_dtype,
            sink,
        ),
        MergeOp::Sce { select_topk } => {
            let base = base.expect("checked above");
            if models.is_empty() {
                return tiles::output(n, &[base], out_dtype, sink, |_, xs, out| {
                    out.copy_from_slice(xs[0])
                });
            }
            super::stock::sce(base, models, *select_topk, out_dtype, sink)
        }
        MergeOp::Passthrough { scale } => {
            count(1, "passthrough")?;
            if scale.is_none() && models[0].dtype == out_dtype {
                return tiles::copy(models[0], sink);
            }
            tiles::output(n, models, out_dtype, sink, |_, xs, out| match scale {
                None => out.copy_from_slice(xs[0]),
                Some(s) => out.iter_mut().zip(xs[0]).for_each(|(o, &x)| *o = x * s),
            })
        }
    }
}

widest_simd! {
    /// One linear output tile: `Σ w_i x_i`, divided by `divisor` when the weights are
    /// normalised. Model-outer loops vectorise; the sum order per element is mergekit's (and
    /// no fused multiply-add: torch rounds the product before the sum).
    fn linear_tile(xs: &[&[f32]], weights: &[f32], divisor: Option<f32>, out: &mut [f32]) {
        // The first product added to zero as it is written: the same sums (signed zeros
        // included) without a pass that clears the tile.
        let mut terms = xs.iter().zip(weights);
        if let Some((x, &w)) = terms.next() {
            out.iter_mut().zip(*x).for_each(|(o, &x)| *o = 0.0 + w * x);
        } else {
            out.fill(0.0);
        }
        for (x, &w) in terms {
            out.iter_mut().zip(*x).for_each(|(o, &x)| *o += w * x);
        }
        if let Some(d) = divisor {
            out.iter_mut().for_each(|o| *o /= d);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::merge::tiles::TILE;
    use crate::model::dtype;

    fn t(v: &[f32]) -> HostTensor {
        HostTensor::from_f32(v, vec![v.len()], DType::F32)
    }

    pub(crate) fn run(op: &MergeOp, base: Option<&HostTensor>, models: &[&HostTensor]) -> Vec<f32> {
        let n = models
            .first()
            .copied()
            .or(base)
            .map(|m| m.numel())
            .unwrap_or(0);
        let out = Mutex::new(vec![0u8; n * 4]);
        merge_tensor("t", op, base, models, DType::F32, &|off, b| {
            out.lock().unwrap()[off..off + b.len()].copy_from_slice(b);
            Ok(())
        })
        .unwrap();
        dtype::to_f32_vec(DType::F32, &out.into_inner().unwrap())
    }

    #[test]
    fn ties_keeps_top_k_elects_sign_and_normalises() {
        let base = t(&[0.0; 6]);
        let a = t(&[3.0, -1.0, 0.5, 2.0, 0.0, -4.0]);
        let b = t(&[-1.0, 2.0, 0.25, 1.0, 0.0, 1.0]);
        let op = MergeOp::ties(vec![1.0, 0.5], vec![0.5, 0.5], 1.0, true);
        // k = 3. a keeps -4, 3, 2 (indices 5, 0, 3). |b| = [1, 2, .25, 1, 0, 1]: b keeps 2 and,
        // of the three 1s tied at the cut, the two lowest indices (0 and 3).
        let got = run(&op, Some(&base), &[&a, &b]);
        // idx0: a 3, b -0.5 → + elected, a alone: 3 / 1.  idx1: b 1 → 1 / 0.5.
        // idx3: a 2, b 0.5 → 2.5 / 1.5.  idx5: a -4 (b dropped) → -4.  Others: base.
        assert_eq!(got, [3.0, 2.0, 0.0, 2.5 / 1.5, 0.0, -4.0]);
    }

    #[test]
    fn slerp_is_lerp_when_colinear_and_rotates_otherwise() {
        let a = t(&[1.0, 0.0]);
        let b = t(&[2.0, 0.0]);
        assert_eq!(
            run(&MergeOp::Slerp { t: 0.25 }, Some(&a), &[&b]),
            [1.25, 0.0]
        );
        let c = t(&[0.0, 1.0]);
        let got = run(&MergeOp::Slerp { t: 0.5 }, Some(&a), &[&c]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (got[0] - h).abs() < 1e-6 && (got[1] - h).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn linear_and_task_arithmetic_formulas() {
        let base = t(&[1.0, 1.0]);
        let a = t(&[2.0, 0.0]);
        let b = t(&[4.0, 3.0]);
        let lin = MergeOp::Linear {
            weights: vec![1.0, 3.0],
            normalize: true,
        };
        assert_eq!(run(&lin, None, &[&a, &b]), [3.5, 2.25]);
        let ta = MergeOp::task_arithmetic(vec![1.0, 0.5], 2.0, false);
        assert_eq!(
            run(&ta, Some(&base), &[&a, &b]),
            [1.0 + 2.0 * (1.0 + 1.5), 1.0 + 2.0 * (-1.0 + 1.0)]
        );
    }

    #[test]
    fn karcher_of_orthogonal_unit_vectors_is_their_bisector() {
        let a = t(&[2.0, 0.0]);
        let b = t(&[0.0, 2.0]);
        let got = run(
            &MergeOp::Karcher {
                max_iter: 50,
                tol: 1e-9,
            },
            None,
            &[&a, &b],
        );
        let h = 2.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (got[0] - h).abs() < 1e-5 && (got[1] - h).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn model_stock_of_orthogonal_task_vectors_stays_at_the_base() {
        // cos = 0 → t = 0: the base.
        let base = t(&[1.0, 1.0]);
        let a = t(&[2.0, 1.0]);
        let b = t(&[1.0, 2.0]);
        assert_eq!(
            run(
                &MergeOp::ModelStock { filter_wise: false },
                Some(&base),
                &[&a, &b]
            ),
            [1.0, 1.0]
        );
        // Identical task vectors: cos = 1 → t = 1, the average.
        let c = t(&[2.0, 1.0]);
        assert_eq!(
            run(
                &MergeOp::ModelStock { filter_wise: false },
                Some(&base),
                &[&a, &c]
            ),
            [2.0, 1.0]
        );
    }

    /// TIES on multi-tile tensors full of ties at the cut, against a slow per-entry reference
    /// (sort for the top-k, lowest index first among equals).
    #[test]
    fn ties_matches_slow_reference_across_tiles() {
        let n = 3 * TILE + 77;
        let mut s = 5u64;
        let mut level = |m: u64| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) % m) as f32 / 8.0 - 1.0
        };
        let base: Vec<f32> = (0..n).map(|_| level(5) * 0.5).collect();
        let models: Vec<Vec<f32>> = (0..3)
            .map(|_| base.iter().map(|b| b + level(17)).collect())
            .collect();
        let (weights, densities) = (vec![1.0f32, 0.7, -0.4], vec![0.3, 0.55, 1.0]);
        let op = MergeOp::ties(weights.clone(), densities.clone(), 0.8, true);
        let bt = t(&base);
        let mt: Vec<HostTensor> = models.iter().map(|m| t(m)).collect();
        let got = run(&op, Some(&bt), &mt.iter().collect::<Vec<_>>());

        let kept: Vec<Vec<bool>> = models
            .iter()
            .zip(&densities)
            .map(|(m, &d)| {
                let tau: Vec<f32> = m.iter().zip(&base).map(|(x, b)| x - b).collect();
                if d >= 1.0 {
                    return vec![true; n];
                }
                let k = (d * n as f64) as usize;
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| tau[b].abs().total_cmp(&tau[a].abs()).then(a.cmp(&b)));
                let mut keep = vec![false; n];
                order[..k].iter().for_each(|&j| keep[j] = true);
                keep
            })
            .collect();
        for j in 0..n {
            let wd: Vec<f32> = (0..3)
                .map(|i| {
                    if kept[i][j] {
                        (models[i][j] - base[j]) * weights[i]
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f32 = wd.iter().sum();
            let (mut mixed, mut div) = (0.0f32, 0.0f32);
            for i in 0..3 {
                if wd[i] != 0.0 && (wd[i] > 0.0) == (sum >= 0.0) {
                    mixed += wd[i];
                    div += weights[i];
                }
            }
            let want = base[j] + mixed / if div == 0.0 { 1.0 } else { div } * 0.8;
            assert!(
                (got[j] - want).abs() <= 1e-6,
                "entry {j}: {} vs {want}",
                got[j]
            );
        }
    }
}
