//! The output vocabulary of a merge (`tokenizer_source` / `tokenizer:`), as mergekit builds it:
//! the base's (the donor's) tokenizer, one model's, or the union of every model's tokens; and
//! the embedding rows (`model.embed_tokens.weight`, `lm_head.weight`) of every input permuted
//! into it before the merge.
//!
//! Union: the base's vocabulary keeps its ids; every other model's tokens it lacks are appended
//! as added tokens, regular tokens first (models in configuration order, each in its own id
//! order: mergekit's order there is a hash map's), then the models' added tokens (special ones
//! keep their settings; the first model's settings win).
//!
//! A row for a token some input lacks: the row of the one model that has it; the base's when
//! the base is an input of that tensor and has it; else the mean of the inputs that have it;
//! zeros when none has it. Rows padded up to `pad_to_multiple_of` are each input's mean row.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::config::{TokenizerSource, TokenizerSpec};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor, TensorBytes};

/// The tensors indexed by token (their first axis).
pub fn is_vocab_tensor(name: &str) -> bool {
    name == "model.embed_tokens.weight" || name == "lm_head.weight"
}

/// One checkpoint's tokenizer: the `tokenizer.json` document and its token ids below the
/// model's `vocab_size` (rows past it have no token).
pub struct ModelVocab {
    pub json: Value,
    pub ids: HashMap<String, usize>,
    /// Contents of the added tokens (`added_tokens`), with their entries.
    pub added: Vec<(usize, Value)>,
}

impl ModelVocab {
    pub fn read(dir: &Path, vocab_size: usize) -> Result<ModelVocab> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("{e}")))?;
        let bad = |what: &str| Error::format(&path, what.to_string());
        let mut ids = HashMap::new();
        match &json["model"]["vocab"] {
            // BPE, WordPiece, WordLevel: {token: id}.
            Value::Object(m) => {
                for (tok, id) in m {
                    let id = id
                        .as_u64()
                        .ok_or_else(|| bad("a vocabulary id is not a number"))?;
                    ids.insert(tok.clone(), id as usize);
                }
            }
            // Unigram: [[piece, score], …], the id is the position.
            Value::Array(pieces) => {
                for (id, p) in pieces.iter().enumerate() {
                    let tok = p[0]
                        .as_str()
                        .ok_or_else(|| bad("a Unigram piece is not a string"))?;
                    ids.insert(tok.to_string(), id);
                }
            }
            _ => return Err(bad("has no `model.vocab`")),
        }
        let mut added = vec![];
        for t in json["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
                return Err(bad("an `added_tokens` entry lacks `id` or `content`"));
            };
            ids.insert(content.to_string(), id as usize);
            added.push((id as usize, t.clone()));
        }
        ids.retain(|_, id| *id < vocab_size);
        added.retain(|(id, _)| *id < vocab_size);
        Ok(ModelVocab { json, ids, added })
    }

    fn is_added(&self, tok: &str) -> bool {
        self.added.iter().any(|(_, t)| t["content"] == tok)
    }

    /// Tokens by id, ascending.
    fn in_id_order(&self) -> Vec<(&str, usize)> {
        let mut v: Vec<(&str, usize)> = self.ids.iter().map(|(t, &i)| (t.as_str(), i)).collect();
        v.sort_by_key(|&(t, i)| (i, t));
        v
    }
}

/// The merge's output vocabulary and every model's place in it.
pub struct VocabPlan {
    /// `tokenizer.json` to write (`None`: the source's own file is copied).
    pub tokenizer_json: Option<Value>,
    /// Added entries for `tokenizer_config.json`'s `added_tokens_decoder` (union only).
    pub new_added: Vec<(usize, Value)>,
    /// Tokens by output id.
    pub tokens: Vec<String>,
    /// Rows of the vocabulary tensors (≥ `tokens.len()` when padded).
    pub rows: usize,
    /// Per model (by name): the row each output token comes from in that model, if it has it.
    pub perms: BTreeMap<String, Vec<Option<usize>>>,
    /// Whose tokenizer files the output starts from.
    pub source: String,
}

impl VocabPlan {
    /// `vocabs` holds every model of the merge by name, `base` names the donor.
    pub fn build(
        spec: &TokenizerSpec,
        vocabs: &BTreeMap<String, ModelVocab>,
        order: &[String],
        base: &str,
    ) -> Result<VocabPlan> {
        let base_vocab = &vocabs[base];
        let (source, tokenizer_json, new_added, by_id): (String, _, _, Vec<(String, usize)>) =
            match &spec.source {
                TokenizerSource::Base => (
                    base.to_string(),
                    None,
                    vec![],
                    owned(base_vocab.in_id_order()),
                ),
                TokenizerSource::Model(m) => {
                    let v = vocabs.get(m).ok_or_else(|| {
                        Error::invalid(format!(
                            "`tokenizer_source: {m}` is not one of the merge's models ({})",
                            order.join(", ")
                        ))
                    })?;
                    (m.clone(), None, vec![], owned(v.in_id_order()))
                }
                TokenizerSource::Union => {
                    let Union {
                        json,
                        added,
                        tokens,
                    } = union(vocabs, order, base);
                    (base.to_string(), Some(json), added, tokens)
                }
            };
        let len = by_id.iter().map(|(_, i)| i + 1).max().unwrap_or(0);
        let mut tokens = vec![String::new(); len];
        for (t, i) in by_id {
            tokens[i] = t;
        }
        if let Some(i) = tokens.iter().position(String::is_empty) {
            return Err(Error::invalid(format!(
                "the tokenizer of `{source}` has no token with id {i} (its ids must be 0..{len})"
            )));
        }
        let rows = match spec.pad_to_multiple_of {
            Some(k) => len.div_ceil(k) * k,
            None => len,
        };
        let perms = vocabs
            .iter()
            .map(|(name, v)| {
                let p = tokens.iter().map(|t| v.ids.get(t).copied()).collect();
                (name.clone(), p)
            })
            .collect();
        Ok(VocabPlan {
            tokenizer_json,
            new_added,
            tokens,
            rows,
            perms,
            source,
        })
    }

    /// The vocabulary tensor `name` of every input (`inputs[i]` of model `models[i]`, the base
    /// among them when `base` is its index), permuted into the output vocabulary in f32.
    pub fn permute(
        &self,
        name: &str,
        inputs: &[&HostTensor],
        models: &[&str],
        base: Option<usize>,
    ) -> Result<Vec<HostTensor>> {
        let width = inputs[0].numel() / inputs[0].shape[0].max(1);
        let rows: Vec<Vec<f32>> = inputs.iter().map(|t| t.to_f32()).collect();
        let perms: Vec<&Vec<Option<usize>>> = models.iter().map(|m| &self.perms[*m]).collect();
        for (m, (t, p)) in models.iter().zip(inputs.iter().zip(&perms)) {
            if let Some(r) = p.iter().flatten().find(|&&r| r >= t.shape[0]) {
                return Err(Error::tensor(
                    name,
                    format!(
                        "model `{m}` has {} rows but its tokenizer has id {r}",
                        t.shape[0]
                    ),
                ));
            }
        }
        let row = |i: usize, r: usize| &rows[i][r * width..(r + 1) * width];
        // One default row per token some input lacks.
        let defaults: Vec<Option<Vec<f32>>> = (0..self.tokens.len())
            .map(|tok| {
                let having: Vec<usize> = (0..inputs.len())
                    .filter(|&i| perms[i][tok].is_some())
                    .collect();
                if having.len() == inputs.len() {
                    return None;
                }
                Some(match (having.len(), base) {
                    (0, _) => vec![0.0; width],
                    (1, _) => row(having[0], perms[having[0]][tok].unwrap()).to_vec(),
                    (_, Some(b)) if perms[b][tok].is_some() => {
                        row(b, perms[b][tok].unwrap()).to_vec()
                    }
                    (n, _) => {
                        let mut acc = vec![0.0f32; width];
                        for &i in &having {
                            for (a, x) in acc.iter_mut().zip(row(i, perms[i][tok].unwrap())) {
                                *a += x;
                            }
                        }
                        acc.iter_mut().for_each(|a| *a /= n as f32);
                        acc
                    }
                })
            })
            .collect();
        (0..inputs.len())
            .map(|i| {
                let mut out = vec![0.0f32; self.rows * width];
                for tok in 0..self.tokens.len() {
                    let dst = &mut out[tok * width..(tok + 1) * width];
                    match (perms[i][tok], &defaults[tok]) {
                        (Some(r), _) => dst.copy_from_slice(row(i, r)),
                        (None, Some(d)) => dst.copy_from_slice(d),
                        (None, None) => unreachable!("a token every input has"),
                    }
                }
                if self.rows > self.tokens.len() {
                    let n = self.tokens.len();
                    let mut mean = vec![0.0f64; width];
                    for r in 0..n {
                        for (m, &x) in mean.iter_mut().zip(&out[r * width..(r + 1) * width]) {
                            *m += x as f64;
                        }
                    }
                    let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
                    for r in n..self.rows {
                        out[r * width..(r + 1) * width].copy_from_slice(&mean);
                    }
                }
                Ok(HostTensor {
                    dtype: DType::F32,
                    shape: vec![self.rows, width],
                    bytes: TensorBytes::Owned(Arc::new(bytemuck::cast_slice(&out).to_vec())),
                })
            })
            .collect()
    }

    /// The output's `tokenizer_config.json` from the source's: the union's added tokens in
    /// `added_tokens_decoder`, where the source has one.
    pub fn tokenizer_config(&self, source: Option<Value>) -> Option<Value> {
        let mut cfg = source?;
        if let Some(Value::Object(dec)) = cfg.get_mut("added_tokens_decoder") {
            for (id, t) in &self.new_added {
                let mut entry = t.clone();
                if let Value::Object(e) = &mut entry {
                    e.remove("id");
                }
                dec.insert(id.to_string(), entry);
            }
        }
        Some(cfg)
    }
}

fn owned(v: Vec<(&str, usize)>) -> Vec<(String, usize)> {
    v.into_iter().map(|(t, i)| (t.to_string(), i)).collect()
}

/// The union tokenizer, as [`union`] builds it.
struct Union {
    /// The base's tokenizer.json with the other models' tokens appended as added tokens.
    json: Value,
    /// The appended entries, with their output ids.
    added: Vec<(usize, Value)>,
    /// Every token with its output id.
    tokens: Vec<(String, usize)>,
}

fn union(vocabs: &BTreeMap<String, ModelVocab>, order: &[String], base: &str) -> Union {
    let base_vocab = &vocabs[base];
    let models: Vec<&ModelVocab> = std::iter::once(base)
        .chain(order.iter().map(String::as_str).filter(|m| *m != base))
        .map(|m| &vocabs[m])
        .collect();
    let mut regular: Vec<&str> = vec![];
    let mut seen: HashSet<&str> = HashSet::new();
    let mut added: Vec<&Value> = vec![];
    let mut added_seen: HashSet<&str> = HashSet::new();
    for v in &models {
        for (tok, _) in v.in_id_order() {
            if !v.is_added(tok) && seen.insert(tok) {
                regular.push(tok);
            }
        }
        for (_, t) in &v.added {
            let c = t["content"].as_str().unwrap_or_default();
            if added_seen.insert(c) {
                added.push(t);
            }
        }
    }
    let mut tokens = owned(base_vocab.in_id_order());
    let mut present: HashSet<String> = base_vocab.ids.keys().cloned().collect();
    let mut next = tokens.iter().map(|(_, i)| i + 1).max().unwrap_or(0);
    let mut new_added: Vec<(usize, Value)> = vec![];
    for tok in regular {
        if added_seen.contains(tok) || !present.insert(tok.to_string()) {
            continue;
        }
        let entry = json!({"id": next, "content": tok, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": true, "special": false});
        tokens.push((tok.to_string(), next));
        new_added.push((next, entry));
        next += 1;
    }
    for t in added {
        let c = t["content"].as_str().unwrap_or_default();
        if !present.insert(c.to_string()) {
            continue;
        }
        let mut entry = t.clone();
        entry["id"] = json!(next);
        tokens.push((c.to_string(), next));
        new_added.push((next, entry));
        next += 1;
    }
    let mut json = base_vocab.json.clone();
    if !json["added_tokens"].is_array() {
        json["added_tokens"] = json!([]);
    }
    let list = json["added_tokens"].as_array_mut().expect("an array");
    list.extend(new_added.iter().map(|(_, e)| e.clone()));
    Union {
        json,
        added: new_added,
        tokens,
    }
}
