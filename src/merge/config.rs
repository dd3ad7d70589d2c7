//! mergekit's YAML configuration, for the methods the engine supports (`linear`,
//! `task_arithmetic`, `ties`, `slerp`), resolved into a [`MergeOp`] and a list of inputs.
//!
//! Parameter lookup follows mergekit: a per-model value, else the top-level `parameters` value,
//! else the method's default. Unlike mergekit, which ignores keys it does not know, anything not
//! supported (other methods, `slices`, `filter` lists, gradients over layers, unknown keys or
//! parameters) is an error naming the key: a merge that silently differs from what the user
//! wrote is worse than one that refuses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::methods::MergeOp;
use crate::error::{Error, Result};
use crate::model::DType;

/// The supported merge methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    Slerp,
}

impl Method {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "linear" => Some(Method::Linear),
            "task_arithmetic" => Some(Method::TaskArithmetic),
            "ties" => Some(Method::Ties),
            "slerp" => Some(Method::Slerp),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::Slerp => "slerp",
        }
    }

    /// (global parameters, per-model parameters) the method reads.
    fn parameters(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Method::Linear => (&["normalize"], &["weight"]),
            Method::TaskArithmetic => (
                &["normalize", "lambda", "int8_mask", "rescale"],
                &["weight"],
            ),
            Method::Ties => (
                &["normalize", "lambda", "int8_mask", "rescale"],
                &["weight", "density"],
            ),
            Method::Slerp => (&["t"], &[]),
        }
    }
}

/// One input model as the config names it.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    /// The path as written in the config (shown in messages).
    pub name: String,
    /// Resolved against the current directory, as mergekit resolves local paths.
    pub path: PathBuf,
    params: BTreeMap<String, f64>,
}

/// A parsed merge configuration.
#[derive(Clone, Debug)]
pub struct MergeConfig {
    pub method: Method,
    pub base_model: Option<ModelEntry>,
    pub models: Vec<ModelEntry>,
    params: BTreeMap<String, f64>,
    /// mergekit's compute dtype; here it sets the output dtype when `out_dtype` is absent.
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    /// The YAML text, written next to the merged model as mergekit does.
    pub source_text: String,
}

/// What the merge runs: the op, the base input (if any) and the other inputs in op order.
#[derive(Clone, Debug)]
pub struct ResolvedMerge {
    pub op: MergeOp,
    pub base: Option<ModelEntry>,
    pub inputs: Vec<ModelEntry>,
    /// The model whose config.json and tokenizer the output takes.
    pub donor: ModelEntry,
}

const TOP_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
];
const NOT_YET: &[&str] = &["slices", "modules", "tokenizer", "chat_template"];

impl MergeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::config(path, msg);
        let doc: Value =
            serde_yaml::from_str(text).map_err(|e| err(format!("invalid YAML: {e}")))?;
        let Value::Mapping(top) = doc else {
            return Err(err("expected a mapping at the top level".into()));
        };
        for key in top.keys() {
            let k = key_str(key, path)?;
            if NOT_YET.contains(&k) {
                return Err(err(format!("`{k}` is not supported yet (use `models:`)")));
            }
            if !TOP_KEYS.contains(&k) {
                return Err(err(format!("unknown key `{k}`")));
            }
        }
        let method_name = top
            .get("merge_method")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing `merge_method`".into()))?;
        let method = Method::parse(method_name).ok_or_else(|| {
            err(format!(
                "`merge_method: {method_name}` is not supported (linear, task_arithmetic, ties, slerp)"
            ))
        })?;
        if let Some(v) = top.get("tokenizer_source") {
            if !matches!(v, Value::Null) && v.as_str() != Some("base") {
                return Err(err(
                    "`tokenizer_source` other than `base` is not supported yet".into(),
                ));
            }
        }
        let dtype_key = |k: &str| -> Result<Option<DType>> {
            match top.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| err(format!("`{k}` must be a string")))?;
                    DType::from_torch(s).map(Some).ok_or_else(|| {
                        err(format!(
                            "`{k}: {s}` is not supported (float32, float16, bfloat16)"
                        ))
                    })
                }
            }
        };
        let (global, per_model) = method.parameters();
        let params = match top.get("parameters") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(v) => parse_params(
                v,
                "parameters",
                global.iter().chain(per_model).copied(),
                method,
                path,
            )?,
        };
        let base_model = match top.get("base_model") {
            None | Some(Value::Null) => None,
            Some(v) => Some(ModelEntry {
                name: model_name(v, "base_model", path)?,
                path: PathBuf::new(),
                params: BTreeMap::new(),
            }),
        };
        let models = match top.get("models") {
            Some(Value::Sequence(list)) if !list.is_empty() => list
                .iter()
                .enumerate()
                .map(|(i, m)| parse_model(m, i, per_model, method, path))
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(err("`models` must be a non-empty list".into())),
        };
        let resolve = |mut e: ModelEntry| {
            e.path = PathBuf::from(&e.name);
            e
        };
        Ok(MergeConfig {
            method,
            base_model: base_model.map(resolve),
            models: models.into_iter().map(resolve).collect(),
            params,
            dtype: dtype_key("dtype")?,
            out_dtype: dtype_key("out_dtype")?,
            source_text: text.to_string(),
        })
    }

    /// A parameter for `model` (None: a global parameter), by mergekit's lookup order.
    fn param(&self, model: Option<&ModelEntry>, key: &str) -> Option<f64> {
        model
            .and_then(|m| m.params.get(key))
            .or_else(|| self.params.get(key))
            .copied()
    }

    /// Resolves the inputs and parameters into the op to run, validating values.
    pub fn resolve(&self, path: &Path) -> Result<ResolvedMerge> {
        let err = |msg: String| Error::config(path, msg);
        let method = self.method.name();
        let is_base = |m: &ModelEntry| {
            self.base_model
                .as_ref()
                .is_some_and(|b| same_model(&b.path, &m.path))
        };
        let flag =
            |key: &str, default: bool| self.param(None, key).map(|v| v != 0.0).unwrap_or(default);
        let lambda = self.param(None, "lambda").unwrap_or(1.0) as f32;
        let weight = |m: &ModelEntry| -> Result<f32> {
            self.param(Some(m), "weight")
                .map(|w| w as f32)
                .ok_or_else(|| {
                    err(format!(
                        "model `{}` has no `weight` (required by {method})",
                        m.name
                    ))
                })
        };
        if self.param(None, "rescale").is_some_and(|v| v != 0.0) {
            return Err(err("`rescale: true` is not supported yet".into()));
        }
        let needs_base = self.method != Method::Linear;
        let base = match (&self.base_model, needs_base) {
            (Some(b), _) => Some(b.clone()),
            (None, true) => return Err(err(format!("`base_model` is required by {method}"))),
            (None, false) => None,
        };
        let donor = base.clone().unwrap_or_else(|| self.models[0].clone());

        let (op, base, inputs) = match self.method {
            Method::Linear => {
                // mergekit adds an unlisted base_model to the inputs, weighted like the others.
                let mut inputs = self.models.clone();
                if let Some(b) = &base {
                    if !inputs.iter().any(|m| same_model(&m.path, &b.path)) {
                        inputs.push(b.clone());
                    }
                }
                let weights = inputs.iter().map(weight).collect::<Result<Vec<_>>>()?;
                let normalize = flag("normalize", true);
                if normalize && weights.iter().sum::<f32>() == 0.0 {
                    return Err(err(
                        "linear weights sum to zero, so they cannot be normalised".into(),
                    ));
                }
                (MergeOp::Linear { weights, normalize }, None, inputs)
            }
            Method::TaskArithmetic | Method::Ties => {
                let inputs: Vec<ModelEntry> = self
                    .models
                    .iter()
                    .filter(|m| !is_base(m))
                    .cloned()
                    .collect();
                if inputs.is_empty() {
                    return Err(err(format!(
                        "{method} needs at least one model besides the base"
                    )));
                }
                let weights = inputs.iter().map(weight).collect::<Result<Vec<_>>>()?;
                let normalize = flag("normalize", self.method == Method::Ties);
                if normalize
                    && self.method == Method::TaskArithmetic
                    && weights.iter().sum::<f32>() == 0.0
                {
                    return Err(err(
                        "task_arithmetic weights sum to zero, so they cannot be normalised".into(),
                    ));
                }
                let op = if self.method == Method::Ties {
                    let densities = inputs
                        .iter()
                        .map(|m| {
                            let d = self.param(Some(m), "density").unwrap_or(1.0);
                            if d > 0.0 && d <= 1.0 {
                                Ok(d)
                            } else {
                                Err(err(format!(
                                    "model `{}`: density {d} is outside (0, 1]",
                                    m.name
                                )))
                            }
                        })
                        .collect::<Result<Vec<_>>>()?;
                    MergeOp::Ties {
                        weights,
                        densities,
                        lambda,
                        normalize,
                    }
                } else {
                    MergeOp::TaskArithmetic {
                        weights,
                        lambda,
                        normalize,
                    }
                };
                (op, base, inputs)
            }
            Method::Slerp => {
                let others: Vec<ModelEntry> = self
                    .models
                    .iter()
                    .filter(|m| !is_base(m))
                    .cloned()
                    .collect();
                if others.len() != 1 {
                    return Err(err(format!(
                        "slerp merges exactly 2 models (base_model and one other), got {}",
                        others.len() + 1
                    )));
                }
                let t = self
                    .param(None, "t")
                    .ok_or_else(|| err("slerp needs `parameters: {t: ...}`".into()))?;
                if !(0.0..=1.0).contains(&t) {
                    return Err(err(format!("slerp `t` {t} is outside [0, 1]")));
                }
                (MergeOp::Slerp { t: t as f32 }, base, others)
            }
        };
        Ok(ResolvedMerge {
            op,
            base,
            inputs,
            donor,
        })
    }
}

fn same_model(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn key_str<'a>(k: &'a Value, path: &Path) -> Result<&'a str> {
    k.as_str()
        .ok_or_else(|| Error::config(path, format!("keys must be strings, got {k:?}")))
}

fn model_name(v: &Value, key: &str, path: &Path) -> Result<String> {
    match v {
        Value::String(s) if !s.is_empty() => {
            if s.contains('@') || s.contains('+') {
                return Err(Error::config(
                    path,
                    format!(
                        "`{key}: {s}`: revisions (@) and LoRA adapters (+) are not supported yet"
                    ),
                ));
            }
            Ok(s.clone())
        }
        _ => Err(Error::config(
            path,
            format!("`{key}` must be a local model path"),
        )),
    }
}

fn parse_model(
    v: &Value,
    i: usize,
    allowed: &[&str],
    method: Method,
    path: &Path,
) -> Result<ModelEntry> {
    let at = format!("models[{i}]");
    let Value::Mapping(m) = v else {
        return Err(Error::config(
            path,
            format!("`{at}` must be a mapping with `model:`"),
        ));
    };
    for key in m.keys() {
        let k = key_str(key, path)?;
        if k != "model" && k != "parameters" {
            return Err(Error::config(path, format!("unknown key `{at}.{k}`")));
        }
    }
    let name = model_name(
        m.get("model")
            .ok_or_else(|| Error::config(path, format!("`{at}` has no `model`")))?,
        &format!("{at}.model"),
        path,
    )?;
    let params = match m.get("parameters") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(p) => parse_params(
            p,
            &format!("{at}.parameters"),
            allowed.iter().copied(),
            method,
            path,
        )?,
    };
    Ok(ModelEntry {
        name,
        path: PathBuf::new(),
        params,
    })
}

fn parse_params<'a>(
    v: &Value,
    at: &str,
    allowed: impl Iterator<Item = &'a str> + Clone,
    method: Method,
    path: &Path,
) -> Result<BTreeMap<String, f64>> {
    let err = |msg: String| Error::config(path, msg);
    let Value::Mapping(m) = v else {
        return Err(err(format!("`{at}` must be a mapping")));
    };
    let mut out = BTreeMap::new();
    for (key, value) in m {
        let k = key_str(key, path)?;
        if !allowed.clone().any(|a| a == k) {
            return Err(err(format!(
                "`{at}.{k}` is not a parameter of {} here",
                method.name()
            )));
        }
        let x = match value {
            Value::Number(n) => n.as_f64().ok_or_else(|| err(format!("`{at}.{k}` is not a number")))?,
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| err(format!("`{at}.{k}` must be a number, got `{s}`")))?,
            Value::Sequence(_) => {
                return Err(err(format!(
                    "`{at}.{k}` is a list: gradients of parameters over layers are not supported yet"
                )))
            }
            Value::Mapping(_) => {
                return Err(err(format!(
                    "`{at}.{k}` is a mapping: per-tensor `filter`/`value` parameters are not supported yet"
                )))
            }
            _ => return Err(err(format!("`{at}.{k}` must be a number"))),
        };
        if !x.is_finite() {
            return Err(err(format!("`{at}.{k}` must be finite")));
        }
        out.insert(k.to_string(), x);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(yaml: &str) -> Result<ResolvedMerge> {
        let p = Path::new("m.yml");
        MergeConfig::parse(yaml, p)?.resolve(p)
    }

    fn err(yaml: &str) -> String {
        resolve(yaml).unwrap_err().to_string()
    }

    #[test]
    fn parameters_follow_mergekit_lookup_and_defaults() {
        let r = resolve(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: b\n  - model: x\n    parameters: {weight: 0.5}\n  - model: y\nparameters: {weight: 2, density: 0.3}\n",
        )
        .unwrap();
        assert_eq!(
            r.inputs.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
        assert_eq!(
            r.op,
            MergeOp::Ties {
                weights: vec![0.5, 2.0],
                densities: vec![0.3, 0.3],
                lambda: 1.0,
                normalize: true
            }
        );
        let r = resolve("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: x\n    parameters: {weight: 1}\n").unwrap();
        assert_eq!(
            r.op,
            MergeOp::TaskArithmetic {
                weights: vec![1.0],
                lambda: 1.0,
                normalize: false
            }
        );
        assert_eq!(r.donor.name, "b");
    }

    #[test]
    fn unsupported_keys_are_named() {
        assert!(err("merge_method: dare_ties\nmodels: [{model: a}]").contains("dare_ties"));
        assert!(err("merge_method: linear\nslices: []\nmodels: [{model: a}]").contains("`slices`"));
        assert!(err("merge_method: linear\nbogus: 1\nmodels: [{model: a}]").contains("`bogus`"));
        let e =
            err("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [0, 1]}\n");
        assert!(
            e.contains("models[0].parameters.weight") && e.contains("gradients"),
            "{e}"
        );
        let e = err("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: {filter: mlp, value: 1}}\n");
        assert!(e.contains("filter"), "{e}");
        let e = err("merge_method: linear\nmodels:\n  - model: a\n    parameters: {density: 0.5, weight: 1}\n");
        assert!(e.contains("`models[0].parameters.density`"), "{e}");
    }

    #[test]
    fn values_are_checked() {
        let e = err("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: -1}\n");
        assert!(e.contains("sum to zero"), "{e}");
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 1.5}\n");
        assert!(e.contains("density 1.5"), "{e}");
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0}\n");
        assert!(e.contains("density 0"), "{e}");
        let e = err("merge_method: slerp\nbase_model: b\nmodels: [{model: b}, {model: a}]\nparameters: {t: 1.2}\n");
        assert!(e.contains("outside [0, 1]"), "{e}");
        assert!(
            err("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]")
                .contains("base_model")
        );
        assert!(err("merge_method: linear\nmodels: [{model: a}]").contains("no `weight`"));
    }
}
