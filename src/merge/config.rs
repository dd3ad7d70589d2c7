//! mergekit's YAML configuration: `merge_method`, `base_model`, `models:` or `slices:` (sources
//! with `layer_range`), `parameters` at the top, per slice and per model (values, gradients
//! over layers, `{filter, value}` conditions), `dtype`, `out_dtype`, `tokenizer_source`,
//! `tokenizer: {source, pad_to_multiple_of}` and `chat_template`.
//! Models are local folders or Hub ids found in the local Hub cache.
//!
//! Unlike mergekit, which ignores keys it does not know, anything not supported (`modules`,
//! `tokenizer.tokens`, unknown keys, a parameter the method does not take) is an
//! error naming the key: a merge that silently differs from what the user wrote is worse than
//! one that refuses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::registry::{self, Method, Scope};
use super::settings::Setting;
use crate::error::{Error, Result};
use crate::model::DType;

pub type Params = BTreeMap<String, Setting>;

/// A model as the config names it, and where it is.
#[derive(Clone, Debug)]
pub struct ModelRef {
    /// As written (shown in messages).
    pub name: String,
    /// A local folder (relative to the current directory, as mergekit resolves it) or the Hub
    /// cache's snapshot.
    pub path: PathBuf,
}

/// One input of a slice.
#[derive(Clone, Debug)]
pub struct Source {
    pub model: ModelRef,
    /// `[start, end)`; `None`: every layer (`models:`).
    pub layer_range: Option<(usize, usize)>,
    pub params: Params,
    /// Where it is in the file (`models[1]`, `slices[0].sources[2]`).
    pub at: String,
}

#[derive(Clone, Debug)]
pub struct Slice {
    pub sources: Vec<Source>,
    pub base_model: Option<ModelRef>,
    pub params: Params,
    pub at: String,
}

/// A parsed merge configuration.
#[derive(Clone, Debug)]
pub struct MergeConfig {
    pub method: &'static Method,
    pub base_model: Option<ModelRef>,
    /// `models:` is one slice of whole models (the base appended when not listed).
    pub slices: Vec<Slice>,
    /// Written with `slices:` (the output's layer count is theirs).
    pub sliced: bool,
    pub params: Params,
    /// mergekit's compute dtype; here it sets the output dtype when `out_dtype` is absent.
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    /// The YAML text, written next to the merged model as mergekit does.
    pub source_text: String,
    /// `tokenizer_source` / `tokenizer:`; `None` copies the donor's tokenizer untouched.
    pub tokenizer: Option<TokenizerSpec>,
    /// `chat_template`: `auto`, a built-in name, or Jinja text.
    pub chat_template: Option<String>,
}

/// Where the output's vocabulary comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerSource {
    Base,
    /// Every model's tokens, the base's first (new ones appended).
    Union,
    /// One of the merge's models, by its name in the configuration.
    Model(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerSpec {
    pub source: TokenizerSource,
    /// Rows added up to a multiple of this (each the mean of the real rows).
    pub pad_to_multiple_of: Option<usize>,
}

const TOP_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
];
const NOT_YET: &[&str] = &["modules"];

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
                return Err(err(format!("`{k}` is not supported yet")));
            }
            if !TOP_KEYS.contains(&k) {
                return Err(err(format!("unknown key `{k}`")));
            }
        }
        let method_name = top
            .get("merge_method")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing `merge_method`".into()))?;
        let method = registry::find(method_name).ok_or_else(|| {
            err(format!(
                "`merge_method: {method_name}` is not supported ({})",
                registry::names()
            ))
        })?;
        let tokenizer = parse_tokenizer(&top, path)?;
        let chat_template = match top.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(_) => return Err(err("`chat_template` must be a string".into())),
        };
        let dtype_key = |k: &str| -> Result<Option<DType>> {
            match top.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| err(format!("`{k}` must be a string")))?;
                    DType::from_torch(s.trim_start_matches("torch."))
                        .map(Some)
                        .ok_or_else(|| {
                            err(format!(
                                "`{k}: {s}` is not supported (float32, float16, bfloat16)"
                            ))
                        })
                }
            }
        };
        let params = parse_params(
            top.get("parameters"),
            "parameters",
            method,
            Level::Global,
            path,
        )?;
        let base_model = match top.get("base_model") {
            None | Some(Value::Null) => None,
            Some(v) => Some(model_ref(v, "base_model", path)?),
        };
        let (slices, sliced) = match (top.get("models"), top.get("slices")) {
            (Some(_), Some(_)) => {
                return Err(err("give either `models` or `slices`, not both".into()))
            }
            (Some(Value::Sequence(list)), None) if !list.is_empty() => {
                let mut sources = list
                    .iter()
                    .enumerate()
                    .map(|(i, m)| parse_source(m, &format!("models[{i}]"), false, method, path))
                    .collect::<Result<Vec<_>>>()?;
                // mergekit appends an unlisted base model to the inputs.
                if let Some(b) = &base_model {
                    if !sources.iter().any(|s| same_model(&s.model.path, &b.path)) {
                        sources.push(Source {
                            model: b.clone(),
                            layer_range: None,
                            params: Params::new(),
                            at: "base_model".into(),
                        });
                    }
                }
                let slice = Slice {
                    sources,
                    base_model: None,
                    params: Params::new(),
                    at: "models".into(),
                };
                (vec![slice], false)
            }
            (None, Some(Value::Sequence(list))) if !list.is_empty() => (
                list.iter()
                    .enumerate()
                    .map(|(i, s)| parse_slice(s, i, method, path))
                    .collect::<Result<Vec<_>>>()?,
                true,
            ),
            (Some(_), None) => return Err(err("`models` must be a non-empty list".into())),
            (None, Some(_)) => return Err(err("`slices` must be a non-empty list".into())),
            (None, None) => return Err(err("give `models` or `slices`".into())),
        };
        Ok(MergeConfig {
            method,
            base_model,
            slices,
            sliced,
            params,
            dtype: dtype_key("dtype")?,
            out_dtype: dtype_key("out_dtype")?,
            source_text: text.to_string(),
            tokenizer,
            chat_template,
        })
    }
}

/// `tokenizer_source: base|union|<model>` or `tokenizer: {source, pad_to_multiple_of}` (whose
/// `source` defaults to `union`, as in mergekit).
fn parse_tokenizer(top: &serde_yaml::Mapping, path: &Path) -> Result<Option<TokenizerSpec>> {
    let err = |msg: String| Error::config(path, msg);
    let source = |v: &Value, key: &str| -> Result<TokenizerSource> {
        match v.as_str() {
            Some("base") => Ok(TokenizerSource::Base),
            Some("union") => Ok(TokenizerSource::Union),
            Some(m) if !m.is_empty() => Ok(TokenizerSource::Model(m.to_string())),
            _ => Err(err(format!(
                "`{key}` must be `base`, `union` or one of the merge's models"
            ))),
        }
    };
    let legacy = match top.get("tokenizer_source") {
        None | Some(Value::Null) => None,
        Some(v) => Some(source(v, "tokenizer_source")?),
    };
    let block = match top.get("tokenizer") {
        None | Some(Value::Null) => None,
        Some(Value::Mapping(m)) => {
            let mut spec = TokenizerSpec {
                source: TokenizerSource::Union,
                pad_to_multiple_of: None,
            };
            for (k, v) in m {
                match key_str(k, path)? {
                    "source" => spec.source = source(v, "tokenizer.source")?,
                    "pad_to_multiple_of" => match v.as_u64() {
                        Some(n) if n >= 1 => spec.pad_to_multiple_of = Some(n as usize),
                        _ => {
                            return Err(err(
                                "`tokenizer.pad_to_multiple_of` must be a whole number ≥ 1".into(),
                            ))
                        }
                    },
                    "tokens" => {
                        return Err(err(
                            "`tokenizer.tokens` (per-token embedding sources) is not supported yet"
                                .into(),
                        ))
                    }
                    k => return Err(err(format!("unknown key `tokenizer.{k}`"))),
                }
            }
            Some(spec)
        }
        Some(_) => return Err(err("`tokenizer` must be a mapping".into())),
    };
    match (legacy, block) {
        (Some(_), Some(_)) => Err(err(
            "give either `tokenizer_source` or `tokenizer`, not both".into(),
        )),
        (Some(source), None) => Ok(Some(TokenizerSpec {
            source,
            pad_to_multiple_of: None,
        })),
        (None, block) => Ok(block),
    }
}

impl MergeConfig {
    /// Every model's folder: a local one as written (relative to the current directory, as
    /// mergekit resolves it), else a Hub id found in the local Hub cache (no downloads).
    pub fn locate_models(&mut self, path: &Path) -> Result<()> {
        let locate = |m: &mut ModelRef| -> Result<()> {
            m.path = crate::model::hub::resolve_model(&m.name)
                .map_err(|e| Error::config(path, format!("model {e}")))?;
            Ok(())
        };
        if let Some(b) = &mut self.base_model {
            locate(b)?;
        }
        for s in &mut self.slices {
            if let Some(b) = &mut s.base_model {
                locate(b)?;
            }
            for src in &mut s.sources {
                locate(&mut src.model)?;
            }
        }
        Ok(())
    }
}

/// Where a `parameters` block is, which decides the parameters it may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Global,
    Model,
}

fn parse_params(
    v: Option<&Value>,
    at: &str,
    method: &Method,
    level: Level,
    path: &Path,
) -> Result<Params> {
    let err = |msg: String| Error::config(path, msg);
    let m = match v {
        None | Some(Value::Null) => return Ok(Params::new()),
        Some(Value::Mapping(m)) => m,
        Some(_) => return Err(err(format!("`{at}` must be a mapping"))),
    };
    let mut out = Params::new();
    for (key, value) in m {
        let k = key_str(key, path)?;
        let param = method.param(k).ok_or_else(|| {
            err(format!(
                "`{at}.{k}` is not a parameter of {} (it takes {})",
                method.name,
                method
                    .params
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if level == Level::Model && param.scope == Scope::Shared {
            return Err(err(format!(
                "`{at}.{k}` is set per model, but {} takes one `{k}` for all: set it under the top-level (or slice) `parameters`",
                method.name
            )));
        }
        let setting = Setting::parse(value, &format!("{at}.{k}")).map_err(err)?;
        out.insert(k.to_string(), setting);
    }
    Ok(out)
}

fn parse_source(v: &Value, at: &str, sliced: bool, method: &Method, path: &Path) -> Result<Source> {
    let err = |msg: String| Error::config(path, msg);
    let Value::Mapping(m) = v else {
        return Err(err(format!("`{at}` must be a mapping with `model:`")));
    };
    for key in m.keys() {
        let k = key_str(key, path)?;
        let known = k == "model" || k == "parameters" || (sliced && k == "layer_range");
        if !known {
            return Err(err(format!("unknown key `{at}.{k}`")));
        }
    }
    let model = model_ref(
        m.get("model")
            .ok_or_else(|| err(format!("`{at}` has no `model`")))?,
        &format!("{at}.model"),
        path,
    )?;
    let layer_range = if sliced {
        let r = m
            .get("layer_range")
            .ok_or_else(|| err(format!("`{at}` has no `layer_range` ([start, end))")))?;
        let pair: Option<(usize, usize)> = match r {
            Value::Sequence(v) if v.len() == 2 => match (v[0].as_u64(), v[1].as_u64()) {
                (Some(a), Some(b)) => Some((a as usize, b as usize)),
                _ => None,
            },
            _ => None,
        };
        let (a, b) = pair.ok_or_else(|| {
            err(format!(
                "`{at}.layer_range` must be [start, end], two layer numbers"
            ))
        })?;
        if a >= b {
            return Err(err(format!(
                "`{at}.layer_range` [{a}, {b}] is empty (end is exclusive)"
            )));
        }
        Some((a, b))
    } else {
        None
    };
    let params = parse_params(
        m.get("parameters"),
        &format!("{at}.parameters"),
        method,
        Level::Model,
        path,
    )?;
    Ok(Source {
        model,
        layer_range,
        params,
        at: at.to_string(),
    })
}

fn parse_slice(v: &Value, i: usize, method: &Method, path: &Path) -> Result<Slice> {
    let err = |msg: String| Error::config(path, msg);
    let at = format!("slices[{i}]");
    let Value::Mapping(m) = v else {
        return Err(err(format!("`{at}` must be a mapping with `sources:`")));
    };
    for key in m.keys() {
        let k = key_str(key, path)?;
        // `residual_weight` is accepted and unused by mergekit too.
        if !["sources", "base_model", "parameters", "residual_weight"].contains(&k) {
            return Err(err(format!("unknown key `{at}.{k}`")));
        }
    }
    let sources = match m.get("sources") {
        Some(Value::Sequence(list)) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(j, s)| parse_source(s, &format!("{at}.sources[{j}]"), true, method, path))
            .collect::<Result<Vec<_>>>()?,
        _ => return Err(err(format!("`{at}.sources` must be a non-empty list"))),
    };
    let base_model = match m.get("base_model") {
        None | Some(Value::Null) => None,
        Some(v) => Some(model_ref(v, &format!("{at}.base_model"), path)?),
    };
    let params = parse_params(
        m.get("parameters"),
        &format!("{at}.parameters"),
        method,
        Level::Global,
        path,
    )?;
    Ok(Slice {
        sources,
        base_model,
        params,
        at,
    })
}

pub fn same_model(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn key_str<'a>(k: &'a Value, path: &Path) -> Result<&'a str> {
    k.as_str()
        .ok_or_else(|| Error::config(path, format!("keys must be strings, got {k:?}")))
}

/// A model name, its path still as written ([`MergeConfig::locate_models`] finds it).
fn model_ref(v: &Value, key: &str, path: &Path) -> Result<ModelRef> {
    match v {
        Value::String(s) if !s.is_empty() => {
            if s.contains('+') {
                return Err(Error::config(
                    path,
                    format!("`{key}: {s}`: LoRA adapters (+) are not supported yet"),
                ));
            }
            Ok(ModelRef {
                name: s.clone(),
                path: PathBuf::from(s),
            })
        }
        _ => Err(Error::config(
            path,
            format!("`{key}` must be a model path or Hub id"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        MergeConfig::parse(yaml, Path::new("m.yml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn models_become_one_slice_with_the_base_appended() {
        let c = MergeConfig::parse(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n    parameters: {weight: 0.5}\n  - model: y\nparameters: {weight: 2, density: 0.3}\n",
            Path::new("m.yml"),
        )
        .unwrap();
        let names: Vec<&str> = c.slices[0]
            .sources
            .iter()
            .map(|s| s.model.name.as_str())
            .collect();
        assert_eq!(names, ["x", "y", "b"]);
        assert!(!c.sliced);
    }

    #[test]
    fn unsupported_keys_and_misplaced_parameters_are_named() {
        assert!(err("merge_method: frankenstein\nmodels: [{model: a}]").contains("frankenstein"));
        assert!(
            err("merge_method: linear\nmodules: {}\nmodels: [{model: a}]").contains("`modules`")
        );
        assert!(err("merge_method: linear\nbogus: 1\nmodels: [{model: a}]").contains("`bogus`"));
        let e = err("merge_method: linear\nmodels:\n  - model: a\n    parameters: {density: 0.5, weight: 1}\n");
        assert!(
            e.contains("`models[0].parameters.density` is not a parameter of linear"),
            "{e}"
        );
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {normalize: true, weight: 1}\n");
        assert!(
            e.contains("`models[0].parameters.normalize` is set per model"),
            "{e}"
        );
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: [], density: 0.5}\n");
        assert!(
            e.contains("`models[0].parameters.weight` is an empty list"),
            "{e}"
        );
        let e = err("merge_method: ties\nmodels: [{model: a}]\nslices: []\n");
        assert!(e.contains("not both"), "{e}");
        let e = err("merge_method: passthrough\nslices:\n  - sources: [{model: a}]\n");
        assert!(
            e.contains("`slices[0].sources[0]` has no `layer_range`"),
            "{e}"
        );
        let e = err(
            "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [3, 3]}]\n",
        );
        assert!(e.contains("is empty"), "{e}");
        let e = err("merge_method: breadcrumbs\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, epsilon: 0.1}\n");
        assert!(
            e.contains("`models[0].parameters.epsilon` is not a parameter of breadcrumbs"),
            "{e}"
        );
    }
}
