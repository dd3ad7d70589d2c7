//! mergekit's task-vector methods as the run's crossover (`evolution.crossover = "ties"`, …).
//!
//! A child must stay a genome (`cycleqd.md` §7): coefficients, not 16 GB of weights. So the
//! crossover itself stays CycleQD's normalised average of the parents' coefficients, and the
//! method decides how a genome's experts are combined when it is materialised: with `a_e` the
//! genome's coefficient of expert `e` for a tensor and `τ'_e = τ_e + U_e·diag(γ_e/a_e − S_e)·V_eᵀ`
//! the expert's task vector moved by the child's SVD mutations,
//!
//! ```text
//! linear:  θ = θ_b + Σ_e a_e·τ'_e                       (CycleQD; the default, exact genome)
//! method:  θ = merge(base θ_b, models θ_b + τ'_e, weight a_e, the method's parameters)
//! ```
//!
//! For two experts' seeds crossed with coefficients `ω_1, ω_2`, this is exactly mergekit's merge
//! of the two parents with weights `ω_i/(ω_1+ω_2)`; later children are the method's merge of
//! the experts under their evolved weights (Akiba et al.'s evolutionary merge), which never
//! sparsifies an already sparsified model. Only methods that merge weighted task vectors over
//! a base qualify: the generalised task arithmetic family. The random ones (DARE, DELLA) draw
//! their masks from a seed that is a hash of the genome and the tensor name, so one genome is
//! always the same model (in every worker, after a resume, in `export`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::merge::methods::{Gta, MergeOp, Sparsify};
use crate::merge::mt::MaskStream;
use crate::merge::registry::{self, Fallback, Family, GtaSparsify, Kind, Method};

/// A parameter as the configuration writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Number(f64),
}

/// A task-vector merge method with its parameters resolved (defaults filled in).
#[derive(Clone, Debug)]
pub struct CrossoverMethod {
    method: &'static Method,
    density: f64,
    lambda: f32,
    normalize: bool,
    rescale: bool,
    gamma: f64,
    epsilon: f64,
}

const KEY: &str = "evolution.crossover";
const PARAMS_KEY: &str = "evolution.crossover_parameters";

impl CrossoverMethod {
    /// `name` with its parameters; `None` for `linear` (the genome's own materialisation).
    pub fn parse(
        name: &str,
        params: &BTreeMap<String, ParamValue>,
    ) -> std::result::Result<Option<CrossoverMethod>, String> {
        if name == "linear" {
            if let Some(k) = params.keys().next() {
                return Err(format!(
                    "`{PARAMS_KEY}.{k}`: linear crossover takes no parameters (its coefficients are \
                     `evolution.crossover_mean` and `evolution.crossover_std`)"
                ));
            }
            return Ok(None);
        }
        let method = registry::find(name)
            .ok_or_else(|| format!("`{KEY}`: unknown method `{name}` (linear, {})", gta_names()))?;
        if !matches!(method.family, Family::Gta { .. }) {
            return Err(format!(
                "`{KEY}`: {name} merges whole models, not weighted task vectors over the base, so \
                 its children would not be genomes; use one of linear, {}",
                gta_names()
            ));
        }
        let value = |key: &str| -> std::result::Result<f64, String> {
            let param = method.param(key).expect("every GTA method's parameter");
            let at = format!("{PARAMS_KEY}.{key}");
            match (params.get(key), param.kind) {
                (None, _) => match param.default {
                    Fallback::Value(x) => Ok(x),
                    _ => unreachable!("GTA parameters other than weight have defaults"),
                },
                (Some(ParamValue::Bool(b)), Kind::Bool) => Ok(f64::from(u8::from(*b))),
                (Some(ParamValue::Number(x)), Kind::Float) if x.is_finite() => Ok(*x),
                (Some(_), Kind::Bool) => Err(format!("`{at}` must be true or false")),
                (Some(_), _) => Err(format!("`{at}` must be a number")),
            }
        };
        for key in params.keys() {
            let known = method.param(key).is_some() && key != "weight";
            if !known {
                return Err(format!(
                    "`{PARAMS_KEY}.{key}` is not a parameter of {name}{}",
                    if key == "weight" {
                        " as a crossover: the genome's coefficients are the weights"
                    } else {
                        ""
                    }
                ));
            }
        }
        let Family::Gta { sparsify, .. } = method.family else {
            unreachable!("checked above")
        };
        let density = value("density")?;
        if !(density > 0.0 && density <= 1.0) {
            return Err(format!(
                "`{PARAMS_KEY}.density` is {density}, outside (0, 1]"
            ));
        }
        if sparsify == GtaSparsify::None && density != 1.0 {
            return Err(format!(
                "`{PARAMS_KEY}.density` is {density}, but task_arithmetic keeps whole task vectors; \
                 ties or dare_linear sparsify"
            ));
        }
        let gamma = if method.param("gamma").is_some() {
            value("gamma")?
        } else {
            0.0
        };
        if !(0.0..1.0).contains(&gamma) {
            return Err(format!("`{PARAMS_KEY}.gamma` is {gamma}, outside [0, 1)"));
        }
        let epsilon = if method.param("epsilon").is_some() {
            value("epsilon")?
        } else {
            0.0
        };
        if sparsify == GtaSparsify::Della
            && density < 1.0
            && (epsilon < 0.0 || density + epsilon >= 1.0 || density - epsilon <= 0.0)
        {
            return Err(format!(
                "`{PARAMS_KEY}.epsilon` is {epsilon}: density ± epsilon must stay inside (0, 1), \
                 and density is {density}"
            ));
        }
        Ok(Some(CrossoverMethod {
            method,
            density,
            lambda: value("lambda")? as f32,
            normalize: value("normalize")? != 0.0,
            rescale: value("rescale")? != 0.0,
            gamma,
            epsilon,
        }))
    }

    pub fn name(&self) -> &'static str {
        self.method.name
    }

    /// Everything the merged weights depend on, for the expert set's fingerprint.
    pub fn tag(&self) -> String {
        format!(
            "{} density={} lambda={} normalize={} rescale={} gamma={} epsilon={}",
            self.method.name,
            self.density,
            self.lambda,
            self.normalize,
            self.rescale,
            self.gamma,
            self.epsilon
        )
    }

    /// The merge of `weights.len()` experts' task vectors with these weights; `seed` is the
    /// random drops' (DARE, DELLA).
    pub fn op(&self, weights: Vec<f32>, seed: u64) -> MergeOp {
        let Family::Gta {
            sparsify,
            consensus,
        } = self.method.family
        else {
            unreachable!("parse admits only the GTA family")
        };
        let n = weights.len();
        let sparsify = match sparsify {
            GtaSparsify::None => Sparsify::None,
            GtaSparsify::Magnitude => Sparsify::Magnitude,
            GtaSparsify::Random => Sparsify::Random(MaskStream::new(seed)),
            GtaSparsify::Outliers => Sparsify::Outliers(vec![self.gamma; n]),
            GtaSparsify::Della => Sparsify::Della(MaskStream::new(seed), vec![self.epsilon; n]),
        };
        MergeOp::Gta(Gta {
            weights,
            densities: vec![self.density; n],
            sparsify,
            consensus,
            normalize: self.normalize,
            rescale: self.rescale,
            lambda: self.lambda,
        })
    }

    /// Whether the merge draws random masks (and so needs a per-genome seed).
    pub fn is_random(&self) -> bool {
        self.method.is_random()
    }
}

fn gta_names() -> String {
    registry::METHODS
        .iter()
        .filter(|m| matches!(m.family, Family::Gta { .. }))
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The random drops' seed for one tensor of one genome (`content_id` is the genome's).
pub fn tensor_seed(content_id: &str, tensor: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in content_id.bytes().chain([0]).chain(tensor.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // MT19937 takes 32 bits; fold the high half in.
    (h ^ (h >> 32)) & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        name: &str,
        toml_params: &str,
    ) -> std::result::Result<Option<CrossoverMethod>, String> {
        let params: BTreeMap<String, ParamValue> = toml::from_str(toml_params).unwrap();
        CrossoverMethod::parse(name, &params)
    }

    #[test]
    fn defaults_follow_mergekit() {
        let ties = parse("ties", "density = 0.3").unwrap().unwrap();
        assert_eq!(ties.density, 0.3);
        assert!(ties.normalize && !ties.rescale);
        let dare = parse("dare_ties", "").unwrap().unwrap();
        assert!(dare.rescale && !dare.normalize && dare.is_random());
        let della = parse("della", "density = 0.5").unwrap().unwrap();
        assert_eq!(della.epsilon, 0.15);
        assert!(parse("linear", "").unwrap().is_none());
    }

    #[test]
    fn bad_parameters_name_their_key() {
        let err = |n: &str, p: &str| parse(n, p).unwrap_err();
        assert!(err("slerp", "").contains("merges whole models"));
        assert!(err("frankenmerge", "").contains("unknown method"));
        assert!(err("ties", "density = 0").contains("evolution.crossover_parameters.density"));
        assert!(err("ties", "density = 1.5").contains("outside (0, 1]"));
        assert!(err("ties", "weight = 1").contains("genome's coefficients are the weights"));
        assert!(err("ties", "gamma = 0.1").contains("not a parameter of ties"));
        assert!(err("task_arithmetic", "density = 0.5").contains("whole task vectors"));
        assert!(err("ties", "normalize = 2").contains("true or false"));
        assert!(err("della", "density = 0.9\nepsilon = 0.2").contains("inside (0, 1)"));
        assert!(err("linear", "density = 0.5").contains("takes no parameters"));
    }

    #[test]
    fn seeds_differ_by_tensor_and_genome() {
        let a = tensor_seed("00ff", "model.layers.0.mlp.up_proj.weight");
        assert_eq!(a, tensor_seed("00ff", "model.layers.0.mlp.up_proj.weight"));
        assert_ne!(a, tensor_seed("00fe", "model.layers.0.mlp.up_proj.weight"));
        assert_ne!(a, tensor_seed("00ff", "model.layers.1.mlp.up_proj.weight"));
        assert!(a <= u32::MAX as u64);
    }
}
