//! A merge configuration laid out tensor by tensor, as mergekit plans it: the embeddings from
//! the first slice's sources, each slice's layers renumbered one after another (input layer
//! `start + i`, gradient position `i / (n − 1)`, or 1 for a one-layer slice), the final norm and
//! `lm_head` from the last slice's sources (those three at position 0); every parameter resolved
//! per tensor (model's `parameters`, then the slice's, then the top level; the first scope whose
//! setting matches the tensor's name wins) and checked, before anything is written.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{same_model, MergeConfig, ModelRef, Params, Slice, Source};
use super::gta::{Gta, Sparsify};
use super::methods::MergeOp;
use super::mt::MaskStream;
use super::registry::{BaseRole, Fallback, Family, GtaSparsify, Kind, Method};
use super::settings::Scalar;
use super::sphere::Vectors;
use crate::error::{Error, Result};
use crate::model::ModelStore;

pub const LM_HEAD: &str = "lm_head.weight";
pub const EMBED: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";

/// A tensor read from one input model.
#[derive(Clone, Debug, PartialEq)]
pub struct Read {
    /// The model's name in the config (the key of its store).
    pub model: String,
    pub tensor: String,
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub base: Option<Read>,
    pub inputs: Vec<Read>,
    pub op: MergeOp,
}

impl TensorPlan {
    /// mergekit's execution order key (its random draws follow it): the largest name read.
    pub fn order_key(&self) -> &str {
        self.inputs
            .iter()
            .chain(&self.base)
            .map(|r| r.tensor.as_str())
            .max()
            .unwrap_or(&self.name)
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    /// In the output's order.
    pub tensors: Vec<TensorPlan>,
    pub num_layers: usize,
    /// The model whose config.json and tokenizer the output takes.
    pub donor: ModelRef,
    /// The seed of the random drops, when the method draws.
    pub seed: Option<u64>,
}

impl Plan {
    /// The tensors in the order they are merged: mergekit's (by [`TensorPlan::order_key`])
    /// when the method draws random masks, so that the same seed gives mergekit's masks.
    pub fn merge_order(&self) -> Vec<&TensorPlan> {
        let mut order: Vec<&TensorPlan> = self.tensors.iter().collect();
        if self.seed.is_some() {
            order.sort_by(|a, b| a.order_key().cmp(b.order_key()));
        }
        order
    }
}

/// Lays out `cfg` over the opened `stores` (keyed by model name). `seed` seeds the random
/// drops (DARE, DELLA).
pub fn plan(
    cfg: &MergeConfig,
    stores: &BTreeMap<String, ModelStore>,
    seed: u64,
    path: &Path,
) -> Result<Plan> {
    let err = |msg: String| Error::config(path, msg);
    let method = cfg.method;
    let donor = donor(cfg).clone();
    let donor_cfg = stores[&donor.name].config();
    let stream = method.is_random().then(|| MaskStream::new(seed));
    // Each slice's base source and other sources.
    let roles: Vec<(Option<&Source>, Vec<&Source>)> = cfg
        .slices
        .iter()
        .map(|s| roles(cfg, s, method, path))
        .collect::<Result<_>>()?;
    let layers = |s: &Source| -> Result<(usize, usize)> {
        let count = stores[&s.model.name].config().num_hidden_layers;
        match s.layer_range {
            None => Ok((0, count)),
            Some((a, b)) if b <= count => Ok((a, b)),
            Some((a, b)) => Err(err(format!(
                "`{}.layer_range` [{a}, {b}] is past `{}`'s {count} layers",
                s.at, s.model.name
            ))),
        }
    };
    let suffixes: Vec<String> = donor_cfg
        .expected_tensors()
        .into_iter()
        .filter_map(|(n, _)| n.strip_prefix("model.layers.0.").map(String::from))
        .collect();
    let ctx = Ctx {
        cfg,
        stores,
        method,
        stream: &stream,
        path,
    };
    let mut tensors = vec![];
    // Embeddings: the first slice's sources, position 0.
    tensors.push(ctx.tensor(EMBED, &cfg.slices[0], &roles[0], &|_| EMBED.into(), 0.0)?);
    let mut out_layer = 0;
    for (slice, role) in cfg.slices.iter().zip(&roles) {
        let ranges: Vec<(usize, usize)> =
            slice.sources.iter().map(layers).collect::<Result<_>>()?;
        let n = ranges[0].1 - ranges[0].0;
        if let Some((s, r)) = slice
            .sources
            .iter()
            .zip(&ranges)
            .find(|(_, r)| r.1 - r.0 != n)
        {
            return Err(err(format!(
                "`{}.layer_range` spans {} layers but `{}` spans {n}: the sources of a slice must line up",
                s.at,
                r.1 - r.0,
                slice.sources[0].at
            )));
        }
        for i in 0..n {
            let t = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                1.0
            };
            for suffix in &suffixes {
                let out = format!("model.layers.{out_layer}.{suffix}");
                let input = |s: &Source| {
                    let start = layers(s).map_or(0, |r| r.0);
                    format!("model.layers.{}.{suffix}", start + i)
                };
                tensors.push(ctx.tensor(&out, slice, role, &input, t)?);
            }
            out_layer += 1;
        }
    }
    // The final norm and lm_head: the last slice's sources, position 0.
    let (last, last_role) = (
        cfg.slices.last().expect("slices"),
        roles.last().expect("roles"),
    );
    tensors.push(ctx.tensor(NORM, last, last_role, &|_| NORM.into(), 0.0)?);
    // lm_head only if some input stores one (a tied input then gives its embeddings).
    if last
        .sources
        .iter()
        .any(|s| stores[&s.model.name].contains(LM_HEAD))
    {
        tensors.push(ctx.tensor(LM_HEAD, last, last_role, &|_| LM_HEAD.into(), 0.0)?);
    }
    Ok(Plan {
        tensors,
        num_layers: out_layer,
        donor,
        seed: stream.map(|_| seed),
    })
}

/// The model whose config.json and tokenizer the output takes: the base, else the first model.
pub fn donor(cfg: &MergeConfig) -> &ModelRef {
    cfg.base_model
        .as_ref()
        .unwrap_or(&cfg.slices[0].sources[0].model)
}

/// A slice's base source (when the method uses one) and its other sources.
fn roles<'a>(
    cfg: &MergeConfig,
    slice: &'a Slice,
    method: &Method,
    path: &Path,
) -> Result<(Option<&'a Source>, Vec<&'a Source>)> {
    let err = |msg: String| Error::config(path, msg);
    let base = slice.base_model.as_ref().or(cfg.base_model.as_ref());
    let base_src = base.map(|b| {
        slice
            .sources
            .iter()
            .find(|s| same_model(&s.model.path, &b.path) || s.model.name == b.name)
    });
    let (base_src, others): (Option<&Source>, Vec<&Source>) = match (method.base, base, base_src) {
        (BaseRole::Required, None, _) => {
            return Err(err(format!("`base_model` is required by {}", method.name)))
        }
        (BaseRole::Required | BaseRole::Optional, Some(b), Some(None)) => {
            return Err(err(format!(
                "`{}`: the base model `{}` is not among its sources",
                slice.at, b.name
            )))
        }
        (BaseRole::Required | BaseRole::Optional, Some(_), Some(Some(b))) => (
            Some(b),
            slice
                .sources
                .iter()
                .filter(|s| !std::ptr::eq(*s, b) && !same_model(&s.model.path, &b.model.path))
                .collect(),
        ),
        _ => (None, slice.sources.iter().collect()),
    };
    let what = if method.base == BaseRole::Ignored {
        "models"
    } else {
        "models besides the base"
    };
    if others.len() < method.min_models || method.max_models.is_some_and(|m| others.len() > m) {
        let want = match method.max_models {
            Some(m) if m == method.min_models => format!("exactly {m}"),
            Some(m) => format!("{} to {m}", method.min_models),
            None => format!("at least {}", method.min_models),
        };
        return Err(err(format!(
            "{} merges {want} {what}, and `{}` gives {}{}",
            method.name,
            slice.at,
            others.len(),
            if method.base == BaseRole::Ignored && base.is_some() {
                " (it takes no base: `base_model` counts as one more model)"
            } else {
                ""
            }
        )));
    }
    Ok((base_src, others))
}

struct Ctx<'a> {
    cfg: &'a MergeConfig,
    stores: &'a BTreeMap<String, ModelStore>,
    method: &'static Method,
    stream: &'a Option<MaskStream>,
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }

    /// The tensor a source gives for `name` (lm_head falls back to a tied input's embeddings).
    fn read(&self, s: &Source, name: String) -> Result<Read> {
        let store = &self.stores[&s.model.name];
        let tensor = if name == LM_HEAD && !store.contains(LM_HEAD) {
            EMBED.to_string()
        } else {
            name
        };
        if !store.contains(&tensor) {
            return Err(self.err(format!("model `{}` has no tensor `{tensor}`", s.model.name)));
        }
        Ok(Read {
            model: s.model.name.clone(),
            tensor,
        })
    }

    fn tensor(
        &self,
        out: &str,
        slice: &Slice,
        (base, others): &(Option<&Source>, Vec<&Source>),
        input_name: &dyn Fn(&Source) -> String,
        t: f64,
    ) -> Result<TensorPlan> {
        let base_read = base.map(|b| self.read(b, input_name(b))).transpose()?;
        let reads: Vec<Read> = others
            .iter()
            .map(|s| self.read(s, input_name(s)))
            .collect::<Result<_>>()?;
        // Every input of a tensor has one shape.
        let shape_of = |r: &Read| -> Result<Vec<usize>> {
            Ok(self.stores[&r.model].meta(&r.tensor)?.1.to_vec())
        };
        let first = reads
            .first()
            .or(base_read.as_ref())
            .expect("a tensor has inputs");
        let shape = shape_of(first)?;
        // With a rebuilt vocabulary, token-indexed tensors differ in rows (they are permuted
        // into the output's vocabulary before the merge).
        let rows_may_differ = self.cfg.tokenizer.is_some() && super::vocab::is_vocab_tensor(out);
        for r in reads.iter().chain(&base_read) {
            let s = shape_of(r)?;
            if s != shape && !(rows_may_differ && s[1..] == shape[1..]) {
                return Err(self.err(format!(
                    "`{out}`: `{}` has {} of shape {s:?} but `{}` has {} of shape {shape:?}; these models cannot be merged here",
                    r.model, r.tensor, first.model, first.tensor
                )));
            }
        }
        let op = self.op(out, slice, others, &reads, t)?;
        Ok(TensorPlan {
            name: out.to_string(),
            shape,
            base: base_read,
            inputs: reads,
            op,
        })
    }

    /// A parameter's value for this tensor: from the model's scope (per-model parameters, read
    /// with the model's tensor name), else the slice's, else the top level's, else the default.
    /// Returns the value and where it was set.
    fn value(
        &self,
        key: &str,
        slice: &Slice,
        source: Option<(&Source, &str)>,
        out: &str,
        t: f64,
    ) -> Result<Option<(f64, String)>> {
        let param = self.method.param(key).expect("the registry's parameter");
        let mut scopes: Vec<(&Params, String, &str)> = vec![];
        if let Some((s, name)) = source {
            scopes.push((&s.params, format!("{}.parameters.{key}", s.at), name));
        }
        let name = source.map_or(out, |(_, n)| n);
        scopes.push((
            &slice.params,
            format!("{}.parameters.{key}", slice.at),
            name,
        ));
        scopes.push((&self.cfg.params, format!("parameters.{key}"), name));
        for (params, at, name) in scopes {
            let Some(setting) = params.get(key) else {
                continue;
            };
            let Some(v) = setting.evaluate(name, t) else {
                continue;
            };
            let x = match (param.kind, v) {
                (Kind::Bool, Scalar::Bool(b)) => f64::from(u8::from(b)),
                (Kind::Bool, Scalar::Num(x)) if x == 0.0 || x == 1.0 => x,
                (Kind::Bool, _) => return Err(self.err(format!("`{at}` must be true or false"))),
                (Kind::Int, Scalar::Num(x)) if x.fract() == 0.0 && x >= 0.0 => x,
                (Kind::Int, _) => {
                    return Err(self.err(format!("`{at}` must be a whole number ≥ 0 (for `{out}`)")))
                }
                (Kind::Float, Scalar::Num(x)) => x,
                (Kind::Float, Scalar::Bool(_)) => {
                    return Err(self.err(format!("`{at}` must be a number")))
                }
            };
            return Ok(Some((x, at)));
        }
        match param.default {
            Fallback::Value(x) => Ok(Some((x, "the default".into()))),
            Fallback::Absent => Ok(None),
            Fallback::Required => Err(self.err(match source {
                Some((s, _)) if s.at == "base_model" => format!(
                    "{} takes the base as one more model, so it needs a `{key}`: list `{}` under `models:` with one",
                    self.method.name, s.model.name
                ),
                Some((s, _)) => format!(
                    "model `{}` has no `{key}` for `{out}` (required by {}; set it in `{}.parameters`)",
                    s.model.name, self.method.name, s.at
                ),
                None => format!("{} needs `parameters: {{{key}: …}}` (for `{out}`)", self.method.name),
            })),
        }
    }

    fn shared(&self, key: &str, slice: &Slice, out: &str, t: f64) -> Result<(f64, String)> {
        Ok(self
            .value(key, slice, None, out, t)?
            .expect("shared parameters have defaults or are required"))
    }

    fn op(
        &self,
        out: &str,
        slice: &Slice,
        others: &[&Source],
        reads: &[Read],
        t: f64,
    ) -> Result<MergeOp> {
        let m = self.method;
        let per_model = |key: &str| -> Result<Vec<(f64, String)>> {
            others
                .iter()
                .zip(reads)
                .map(|(s, r)| {
                    Ok(self
                        .value(key, slice, Some((s, &r.tensor)), out, t)?
                        .expect("per-model parameters have defaults or are required"))
                })
                .collect()
        };
        let flag = |key: &str| -> Result<bool> { Ok(self.shared(key, slice, out, t)?.0 != 0.0) };
        let in_range = |(x, at): &(f64, String), ok: bool, what: &str| -> Result<f64> {
            if ok {
                Ok(*x)
            } else {
                Err(self.err(format!("`{at}` is {x} for `{out}`, outside {what}")))
            }
        };
        let weights = |key: &str| -> Result<Vec<f32>> {
            Ok(per_model(key)?.into_iter().map(|(w, _)| w as f32).collect())
        };
        Ok(match m.family {
            Family::Linear => {
                let normalize = flag("normalize")?;
                let w = weights("weight")?;
                if normalize && w.iter().sum::<f32>() == 0.0 {
                    return Err(self.err(format!(
                        "linear weights for `{out}` sum to zero, so they cannot be normalised"
                    )));
                }
                MergeOp::Linear {
                    weights: w,
                    normalize,
                }
            }
            Family::Gta {
                sparsify,
                consensus,
            } => {
                let densities: Vec<f64> = if m.param("density").is_some() {
                    per_model("density")?
                        .iter()
                        .map(|d| in_range(d, d.0 > 0.0 && d.0 <= 1.0, "(0, 1]"))
                        .collect::<Result<_>>()?
                } else {
                    vec![1.0; others.len()]
                };
                if sparsify == GtaSparsify::None {
                    if let Some(d) = per_model("density")?.into_iter().find(|d| d.0 != 1.0) {
                        return Err(self.err(format!(
                            "`{}` is {} for `{out}`, but {} keeps whole task vectors (mergekit would ignore it); ties or dare_linear sparsify",
                            d.1, d.0, m.name
                        )));
                    }
                }
                let stream = || self.stream.clone().expect("random methods have a stream");
                let sparsify = match sparsify {
                    GtaSparsify::None => Sparsify::None,
                    GtaSparsify::Magnitude => Sparsify::Magnitude,
                    GtaSparsify::Random => Sparsify::Random(stream()),
                    GtaSparsify::Outliers => Sparsify::Outliers(
                        per_model("gamma")?
                            .iter()
                            .map(|g| in_range(g, (0.0..1.0).contains(&g.0), "[0, 1)"))
                            .collect::<Result<_>>()?,
                    ),
                    GtaSparsify::Della => {
                        let eps = per_model("epsilon")?;
                        for (e, &d) in eps.iter().zip(&densities) {
                            if d < 1.0 && (d + e.0 >= 1.0 || d - e.0 <= 0.0 || e.0 < 0.0) {
                                return Err(self.err(format!(
                                    "`{}` is {} for `{out}`: density ± epsilon must stay inside (0, 1), and density is {d}",
                                    e.1, e.0
                                )));
                            }
                        }
                        Sparsify::Della(stream(), eps.into_iter().map(|e| e.0).collect())
                    }
                };
                let lambda = self.shared("lambda", slice, out, t)?.0 as f32;
                MergeOp::Gta(Gta {
                    weights: weights("weight")?,
                    densities,
                    sparsify,
                    consensus,
                    normalize: flag("normalize")?,
                    rescale: flag("rescale")?,
                    lambda,
                })
            }
            Family::Slerp => {
                let t_val = self.shared("t", slice, out, t)?;
                MergeOp::Slerp {
                    t: in_range(&t_val, (0.0..=1.0).contains(&t_val.0), "[0, 1]")? as f32,
                }
            }
            Family::Nuslerp => {
                let w = weights("weight")?;
                let total = w[0] + w[1];
                let tt = if total.abs() < 1e-6 {
                    0.5
                } else {
                    w[1] / total
                };
                let vectors = if flag("nuslerp_flatten")? {
                    Vectors::Flat
                } else if flag("nuslerp_row_wise")? {
                    Vectors::Columns
                } else {
                    Vectors::Rows
                };
                MergeOp::Nuslerp { t: tt, vectors }
            }
            Family::Multislerp => {
                let eps = self.shared("eps", slice, out, t)?;
                MergeOp::Multislerp {
                    weights: weights("weight")?,
                    normalize_weights: flag("normalize_weights")?,
                    eps: in_range(&eps, eps.0 > 0.0, "(0, ∞)")?,
                }
            }
            Family::Karcher => {
                let tol = self.shared("tol", slice, out, t)?;
                MergeOp::Karcher {
                    max_iter: self.shared("max_iter", slice, out, t)?.0 as usize,
                    tol: in_range(&tol, tol.0 > 0.0, "(0, ∞)")?,
                }
            }
            Family::ModelStock => MergeOp::ModelStock {
                filter_wise: flag("filter_wise")?,
            },
            Family::Sce => {
                let k = self.shared("select_topk", slice, out, t)?;
                MergeOp::Sce {
                    select_topk: in_range(&k, k.0 > 0.0 && k.0 <= 1.0, "(0, 1]")?,
                }
            }
            Family::Passthrough => {
                let s = others[0];
                let scale = self
                    .value("scale", slice, Some((s, &reads[0].tensor)), out, t)?
                    .map(|(x, _)| x as f32);
                MergeOp::Passthrough { scale }
            }
        })
    }
}
