//! `config.json` of a Hugging Face Llama checkpoint, in both key styles:
//! legacy (`rope_theta`, `rope_scaling`, `torch_dtype`, as in Meta's releases) and
//! transformers 5 (`rope_parameters`, `dtype`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::dtype::DType;
use crate::error::{Error, Result};

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The Llama hyper-parameters the engine needs, with Hugging Face names.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// What ends a generation: `eos_token_ids` and those of `generation_config.json` beside
    /// it, as transformers' `generate` takes them (Llama 3 Instruct ends its turns with
    /// `<|eot_id|>`, which only generation_config.json names in some releases).
    pub stop_token_ids: Vec<u32>,
    /// The whole file, kept so that an export writes every key back unchanged.
    pub raw: Map<String, Value>,
}

impl LlamaConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen) = std::fs::read_to_string(&gen_path) {
            let v: Value = serde_json::from_str(&gen).map_err(|err| Error::Json {
                path: gen_path.clone(),
                err,
            })?;
            let Value::Object(raw) = v else {
                return Err(Error::config(&gen_path, "expected a JSON object"));
            };
            let r = Reader {
                raw: &raw,
                path: &gen_path,
            };
            for id in r.opt_token("eos_token_id")? {
                if !cfg.stop_token_ids.contains(&id) {
                    cfg.stop_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|err| Error::Json {
            path: path.to_path_buf(),
            err,
        })?;
        let Value::Object(raw) = value else {
            return Err(Error::config(path, "expected a JSON object"));
        };
        let r = Reader { raw: &raw, path };

        match r.opt_str("model_type")? {
            Some("llama") => {}
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!("unknown model_type `{other}` (supported: llama)"),
                ))
            }
            None => return Err(Error::config(path, "missing key `model_type`")),
        }
        if let Some(act) = r.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(Error::config(
                    path,
                    format!("hidden_act `{act}` is not supported (Llama uses silu)"),
                ));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if r.opt_bool(key)?.unwrap_or(false) {
                return Err(Error::config(
                    path,
                    format!("`{key}: true` is not supported"),
                ));
            }
        }

        let hidden_size = r.usize("hidden_size")?;
        let num_attention_heads = r.usize("num_attention_heads")?;
        let num_key_value_heads = r
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(Error::config(
                path,
                "attention head counts must be positive",
            ));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads ({num_attention_heads}) is not a multiple of \
                     num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = match r.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::config(
                        path,
                        "hidden_size is not a multiple of num_attention_heads and head_dim is absent",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }

        let (rope_theta, rope_scaling) = r.rope()?;
        let dtype = match r.opt_str("dtype")?.or(r.opt_str("torch_dtype")?) {
            None => None,
            Some(s) => Some(DType::from_torch(s).ok_or_else(|| {
                Error::config(
                    path,
                    format!("dtype `{s}` is not supported (float16, bfloat16, float32)"),
                )
            })?),
        };

        let cfg = LlamaConfig {
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            dtype,
            bos_token_id: r.opt_token("bos_token_id")?.into_iter().next(),
            eos_token_ids: r.opt_token("eos_token_id")?,
            stop_token_ids: r.opt_token("eos_token_id")?,
            raw: raw.clone(),
        };
        for (key, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_hidden_layers),
            ("max_position_embeddings", cfg.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(Error::config(path, format!("`{key}` must be positive")));
            }
        }
        if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps > 0.0 && cfg.rms_norm_eps < 1.0) {
            return Err(Error::config(
                path,
                format!("`rms_norm_eps` must be in (0, 1), got {}", cfg.rms_norm_eps),
            ));
        }
        if !cfg.rope_theta.is_finite() {
            return Err(Error::config(path, "`rope_theta` must be finite"));
        }
        // Sizes computed from the config must not overflow (a wrapped size would pass every
        // later check and allocate nonsense).
        let h = cfg.hidden_size;
        let checked = [
            cfg.vocab_size.checked_mul(h),
            cfg.intermediate_size.checked_mul(h),
            cfg.num_attention_heads
                .checked_mul(cfg.head_dim)
                .and_then(|q| q.checked_mul(h)),
            cfg.num_hidden_layers.checked_mul(h),
        ];
        if checked.iter().any(Option::is_none) || cfg.num_parameters_checked().is_none() {
            return Err(Error::config(path, "the shapes it gives overflow sizes"));
        }
        Ok(cfg)
    }

    /// [`LlamaConfig::num_parameters`], or `None` when it overflows.
    pub fn num_parameters_checked(&self) -> Option<usize> {
        let h = self.hidden_size;
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let per_layer = [
            2usize.checked_mul(h)?,
            h.checked_mul(q)?,
            h.checked_mul(kv)?.checked_mul(2)?,
            q.checked_mul(h)?,
            h.checked_mul(self.intermediate_size)?.checked_mul(3)?,
        ]
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))?;
        let embed = self.vocab_size.checked_mul(h)?;
        per_layer
            .checked_mul(self.num_hidden_layers)?
            .checked_add(embed.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?)?
            .checked_add(h)
    }

    /// Number of parameters the config implies (lm_head counted only when untied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * per_layer + h + head
    }

    /// Every tensor a Llama checkpoint of this shape must hold, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// The config as it should be written next to weights stored in `dtype`: every original key,
    /// with the dtype key of the file's own style updated.
    pub fn to_json_with_dtype(&self, dtype: DType) -> Value {
        let mut raw = self.raw.clone();
        let key = if raw.contains_key("dtype") || !raw.contains_key("torch_dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        raw.insert(
            key.to_string(),
            Value::String(dtype.torch_name().to_string()),
        );
        Value::Object(raw)
    }
}

/// Typed access to config keys with errors that name the key and the file.
struct Reader<'a> {
    raw: &'a Map<String, Value>,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(PathBuf::from(self.path), msg)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(format!("`{key}` must be a non-negative integer, got {v}"))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing key `{key}`")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a string, got {v}"))),
        }
    }

    /// A token id that may be one integer or a list of them (`eos_token_id: [128001, 128009]`).
    fn opt_token(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || self.err(format!("`{key}` must be a token id or a list of token ids"));
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(bad))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(bad)? as u32]),
        }
    }

    /// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (legacy).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let (params, where_) = match self.get("rope_parameters") {
            Some(Value::Object(p)) => (Some(p), "rope_parameters"),
            Some(v) => {
                return Err(self.err(format!("`rope_parameters` must be an object, got {v}")))
            }
            None => match self.get("rope_scaling") {
                Some(Value::Object(p)) => (Some(p), "rope_scaling"),
                Some(v) => {
                    return Err(self.err(format!("`rope_scaling` must be an object, got {v}")))
                }
                None => (None, ""),
            },
        };
        let theta_in_params = params
            .and_then(|p| p.get("rope_theta"))
            .filter(|v| !v.is_null());
        let theta = match theta_in_params {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{where_}.rope_theta` must be a number")))?,
            None => self.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        if theta <= 0.0 {
            return Err(self.err(format!("rope_theta must be positive, got {theta}")));
        }
        let Some(p) = params else {
            return Ok((theta, RopeScaling::None));
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        // Every scaling parameter is a finite, positive number (a factor of 0 divides the
        // frequencies by zero; a negative one reverses them).
        let num = |k: &str| -> Result<f64> {
            let v = p
                .get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| self.err(format!("`{where_}.{k}` is missing or not a number")))?;
            if !(v.is_finite() && v > 0.0) {
                return Err(self.err(format!("`{where_}.{k}` must be a positive number, got {v}")));
            }
            Ok(v)
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = s
                {
                    if high_freq_factor <= low_freq_factor {
                        return Err(self.err(format!(
                            "`{where_}`: high_freq_factor must exceed low_freq_factor"
                        )));
                    }
                }
                s
            }
            other => {
                return Err(self.err(format!(
                    "`{where_}.rope_type` `{other}` is not supported (default, linear, llama3)"
                )))
            }
        };
        Ok((theta, scaling))
    }
}

/// Inverse RoPE frequencies (`head_dim / 2` of them) with the configured scaling applied, as
/// transformers' `ROPE_INIT_FUNCTIONS` compute them (in f64, then rounded to f32 like torch).
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let half = cfg.head_dim / 2;
    (0..half)
        .map(|i| {
            // transformers computes base ** (arange(0, dim, 2).float() / dim) in f32.
            let exponent = (2 * i) as f32 / cfg.head_dim as f32;
            let inv = 1.0f32 / (cfg.rope_theta as f32).powf(exponent);
            match cfg.rope_scaling {
                RopeScaling::None => inv,
                RopeScaling::Linear { factor } => inv / factor as f32,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => {
                    let (factor, lo, hi, old) = (
                        factor as f32,
                        low_freq_factor as f32,
                        high_freq_factor as f32,
                        original_max_position_embeddings as f32,
                    );
                    let low_freq_wavelen = old / lo;
                    let high_freq_wavelen = old / hi;
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    if wavelen > low_freq_wavelen {
                        inv / factor
                    } else if wavelen < high_freq_wavelen {
                        inv
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * inv / factor + smooth * inv
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json_str(text, Path::new("test/config.json"))
    }

    const BASE: &str = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2"#;

    #[test]
    fn generation_config_adds_stop_tokens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{{BASE},"eos_token_id":1}}"#),
        )
        .unwrap();
        let c = LlamaConfig::from_dir(dir.path()).unwrap();
        assert_eq!(
            (c.eos_token_ids.clone(), c.stop_token_ids),
            (vec![1], vec![1])
        );
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [1, 7, 9]}"#,
        )
        .unwrap();
        let c = LlamaConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c.eos_token_ids, vec![1]);
        assert_eq!(c.stop_token_ids, vec![1, 7, 9]);
        std::fs::write(dir.path().join("generation_config.json"), "{").unwrap();
        let e = LlamaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("invalid JSON"),
            "{e}"
        );
    }

    #[test]
    fn legacy_and_new_rope_keys_agree() {
        let legacy = parse(&format!(
            r#"{{{BASE},"rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}},
            "torch_dtype":"bfloat16"}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#"{{{BASE},"rope_parameters":{{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}},
            "dtype":"bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(legacy.rope_theta, new.rope_theta);
        assert_eq!(legacy.rope_scaling, new.rope_scaling);
        assert_eq!(legacy.dtype, Some(DType::BF16));
        assert_eq!(new.dtype, Some(DType::BF16));
        assert_eq!(legacy.num_key_value_heads, 2);
        assert_eq!(legacy.head_dim, 4);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(e.contains("test/config.json") && e.contains("gpt2"), "{e}");
        let e = parse(r#"{"model_type":"llama","hidden_size":8}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = parse(&format!(r#"{{{BASE},"num_key_value_heads":3}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = parse(&format!(
            r#"{{{BASE},"rope_scaling":{{"rope_type":"yarn","factor":2.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("yarn"), "{e}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let cfg = parse(&format!(
            r#"{{{BASE},"head_dim":64,"rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#
        ))
        .unwrap();
        let scaled = rope_inv_freq(&cfg);
        let plain: Vec<f32> = (0..32)
            .map(|i| 1.0 / 500000f32.powf((2 * i) as f32 / 64.0))
            .collect();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 8.0).abs() <= 1e-12);
        assert!(scaled
            .iter()
            .zip(&plain)
            .all(|(s, p)| s <= p && *s >= p / 8.0));
    }
}
