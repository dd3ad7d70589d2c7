//! `cycleqd-engine merge`: a mergekit configuration executed by streaming, tensor by tensor,
//! from the input shards (positioned reads into per-thread windows, `model::window`) through
//! the backend's merge operator into an atomic export. Peak memory is a few tiles and windows
//! per thread, plus the bit masks and scores of the tensor in flight.

pub mod chat_template;
pub mod config;
pub mod gta;
pub mod methods;
pub mod mt;
pub mod plan;
pub mod registry;
pub mod select;
pub mod settings;
pub mod sphere;
pub mod stock;
pub mod tiles;
pub mod vocab;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::Backend;
use crate::error::{Error, Result};

use crate::model::{CheckpointWriter, HostTensor, LlamaConfig, ModelStore, TensorSpec};

pub use config::MergeConfig;
pub use methods::{merge_tensor, MergeOp, Sink};

/// How `merge` runs.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Largest shard in bytes.
    pub max_shard_bytes: u64,
    /// Replace a non-empty output folder.
    pub overwrite: bool,
    /// Seed of the random drops (DARE, DELLA): mergekit's `--random-seed`. `None`: one is drawn
    /// and reported.
    pub random_seed: Option<u64>,
    pub progress: bool,
}

/// What a merge did, for the CLI's report and the benchmark.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    pub method: String,
    pub tensors: usize,
    pub layers: usize,
    pub out_dtype: String,
    /// The seed of the random drops, for methods that draw them.
    pub random_seed: Option<u64>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    /// Peak resident memory of the process (Linux), mapped input pages included.
    pub peak_rss_bytes: Option<u64>,
}

/// Runs the merge `config_path` describes into `out_dir`.
pub fn run_merge<B: Backend>(
    backend: &B,
    config_path: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let started = Instant::now();
    let mut cfg = MergeConfig::from_file(config_path)?;
    cfg.locate_models(config_path)?;
    let models: Vec<&config::ModelRef> = cfg
        .base_model
        .iter()
        .chain(cfg.slices.iter().flat_map(|s| {
            s.base_model
                .iter()
                .chain(s.sources.iter().map(|src| &src.model))
        }))
        .collect();
    let paths: Vec<&Path> = models.iter().map(|m| m.path.as_path()).collect();
    crate::durable::check_output_dir(out_dir, &paths)?;
    let occupied = std::fs::read_dir(out_dir).is_ok_and(|mut d| d.next().is_some());
    if occupied && !opts.overwrite {
        return Err(Error::format(
            out_dir,
            "exists and is not empty; pass --overwrite to replace it (the merge is written \
             beside it and swapped in only when complete)",
        ));
    }

    // Open every model once.
    let mut stores: BTreeMap<String, ModelStore> = BTreeMap::new();
    for m in &models {
        if !stores.contains_key(&m.name) {
            let s = ModelStore::open_llama(&m.path)
                .map_err(|e| Error::invalid(format!("model `{}`: {e}", m.name)))?;
            stores.insert(m.name.clone(), s);
        }
    }
    let donor_name = &plan::donor(&cfg).name;
    let donor = &stores[donor_name];
    for (name, s) in &stores {
        check_same_shape(
            donor.config(),
            donor_name,
            s.config(),
            name,
            cfg.sliced,
            cfg.tokenizer.is_some(),
        )?;
    }
    let seed = opts
        .random_seed
        .unwrap_or_else(|| rand::random::<u32>() as u64);
    let plan = plan::plan(&cfg, &stores, seed, config_path)?;
    let vocab = match &cfg.tokenizer {
        None => None,
        Some(spec) => {
            let vocabs = stores
                .iter()
                .map(|(name, s)| {
                    let v = vocab::ModelVocab::read(s.dir(), s.config().vocab_size)
                        .map_err(|e| Error::invalid(format!("model `{name}`: {e}")))?;
                    Ok((name.clone(), v))
                })
                .collect::<Result<BTreeMap<_, _>>>()?;
            let mut order: Vec<String> = vec![];
            for m in &models {
                if !order.contains(&m.name) {
                    order.push(m.name.clone());
                }
            }
            Some(vocab::VocabPlan::build(spec, &vocabs, &order, donor_name)?)
        }
    };

    let out_dtype = cfg
        .out_dtype
        .or(cfg.dtype)
        .unwrap_or_else(|| donor.dominant_dtype());
    // Laid out in the order they are merged: the writer's partial blocks at tensor boundaries
    // then complete as soon as the next tensor is written.
    let specs: Vec<TensorSpec> = plan
        .merge_order()
        .into_iter()
        .map(|t| {
            let mut shape = t.shape.clone();
            if let Some(v) = vocab.as_ref().filter(|_| vocab::is_vocab_tensor(&t.name)) {
                shape[0] = v.rows;
            }
            TensorSpec {
                name: t.name.clone(),
                dtype: out_dtype,
                shape,
            }
        })
        .collect();
    let mut writer = CheckpointWriter::create(out_dir, specs.clone(), opts.max_shard_bytes)?;

    let bar = if opts.progress {
        let b = ProgressBar::new(specs.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} merge [{bar:30}] {pos}/{len} tensors {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };

    let mut bytes_read = 0u64;
    for t in plan.merge_order() {
        let name = &t.name;
        let load = |r: &plan::Read| stores[&r.model].tensor(&r.tensor);
        let mut inputs: Vec<HostTensor> = t.inputs.iter().map(load).collect::<Result<_>>()?;
        let mut base = t.base.as_ref().map(load).transpose()?;
        if let Some(v) = vocab.as_ref().filter(|_| vocab::is_vocab_tensor(name)) {
            // Every input's rows in the output vocabulary, the base among them.
            let names: Vec<&str> = t
                .inputs
                .iter()
                .chain(&t.base)
                .map(|r| r.model.as_str())
                .collect();
            let all: Vec<&HostTensor> = inputs.iter().chain(&base).collect();
            let base_at = t.base.as_ref().map(|_| inputs.len()).or_else(|| {
                let b = cfg.base_model.as_ref()?;
                t.inputs.iter().position(|r| r.model == b.name)
            });
            let mut permuted = v.permute(name, &all, &names, base_at)?;
            if base.is_some() {
                base = permuted.pop();
            }
            inputs = permuted;
        }
        let refs: Vec<&HostTensor> = inputs.iter().collect();
        backend.merge(
            name,
            &t.op,
            base.as_ref(),
            &refs,
            out_dtype,
            &|off, bytes| {
                // A non-finite output is never written: it means a NaN/Inf input, or weights
                // whose merge overflows the output dtype.
                if let Some(i) = crate::model::dtype::first_non_finite(out_dtype, bytes) {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "the merge gives a non-finite value at element {} (an input holds \
                             NaN/Inf, or the weights overflow {out_dtype}); nothing was written",
                            off / out_dtype.size() + i
                        ),
                    ));
                }
                writer.write_part(name, off, bytes)
            },
        )?;
        let read: usize = inputs.iter().chain(&base).map(|t| t.data().len()).sum();
        bytes_read += read as u64;
        for t in inputs.iter().chain(&base) {
            t.release_pages();
        }
        bar.set_message(name.clone());
        bar.inc(1);
    }
    bar.finish_and_clear();

    writer.add_file("mergekit_config.yml", cfg.source_text.as_bytes())?;
    let mut config = donor.config().to_json_with_dtype(out_dtype);
    if cfg.sliced {
        config["num_hidden_layers"] = serde_json::json!(plan.num_layers);
    }
    if let Some(v) = &vocab {
        config["vocab_size"] = serde_json::json!(v.rows);
    }
    let dirs: Vec<&Path> = models.iter().map(|m| m.path.as_path()).collect();
    write_tokenizer(
        &mut writer,
        &cfg,
        vocab.as_ref(),
        &stores,
        donor.dir(),
        &dirs,
    )?;
    writer.finish(&config, Some(donor.dir()))?;
    let bytes_written = specs.iter().map(|s| s.nbytes() as u64).sum();
    Ok(MergeReport {
        method: cfg.method.name.to_string(),
        tensors: specs.len(),
        layers: plan.num_layers,
        out_dtype: out_dtype.torch_name().to_string(),
        random_seed: plan.seed,
        bytes_read,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::bench::peak_rss_bytes(),
    })
}

/// The output's tokenizer files when the configuration rebuilds the vocabulary or sets a chat
/// template (otherwise the donor's are copied as they are by the writer).
fn write_tokenizer(
    writer: &mut CheckpointWriter,
    cfg: &MergeConfig,
    vocab: Option<&vocab::VocabPlan>,
    stores: &BTreeMap<String, ModelStore>,
    donor_dir: &Path,
    model_dirs: &[&Path],
) -> Result<()> {
    let template = match &cfg.chat_template {
        Some(spec) => chat_template::resolve(spec, model_dirs)?,
        None => None,
    };
    if vocab.is_none() && template.is_none() {
        return Ok(());
    }
    let source_dir = vocab.map_or(donor_dir, |v| stores[&v.source].dir());
    let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
        let p = source_dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| Error::format(&p, format!("{e}"))),
            Err(_) => Ok(None),
        }
    };
    let copy = |writer: &CheckpointWriter, name: &str| -> Result<()> {
        let p = source_dir.join(name);
        if p.is_file() {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            writer.add_file(name, &bytes)?;
        }
        Ok(())
    };
    match vocab.and_then(|v| v.tokenizer_json.as_ref()) {
        Some(json) => writer.add_file("tokenizer.json", &pretty(json))?,
        None => copy(writer, "tokenizer.json")?,
    }
    copy(writer, "special_tokens_map.json")?;
    let union = vocab.is_some_and(|v| v.tokenizer_json.is_some());
    if union {
        // A SentencePiece model would not know the appended tokens.
        writer.withhold("tokenizer.model");
    } else {
        copy(writer, "tokenizer.model")?;
    }
    let mut tok_cfg = read_json("tokenizer_config.json")?;
    if let Some(v) = vocab {
        tok_cfg = v.tokenizer_config(tok_cfg);
    }
    match &template {
        Some(t) => {
            if let Some(serde_json::Value::Object(c)) = &mut tok_cfg {
                c.remove("chat_template");
            }
            writer.add_file(crate::model::chat::TEMPLATE_FILE, t.as_bytes())?;
        }
        None => copy(writer, crate::model::chat::TEMPLATE_FILE)?,
    }
    if let Some(c) = &tok_cfg {
        writer.add_file("tokenizer_config.json", &pretty(c))?;
    }
    // The donor's must not fill in what the source lacks.
    for name in crate::model::export::COMPANION_FILES {
        if name.starts_with("tokenizer") || *name == "special_tokens_map.json" {
            writer.withhold(name);
        }
    }
    if template.is_some() || vocab.is_some() {
        writer.withhold(crate::model::chat::TEMPLATE_FILE);
    }
    Ok(())
}

fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("JSON values serialise");
    b.push(b'\n');
    b
}

/// Models of one merge share their widths (and, without `slices:`, their depth).
fn check_same_shape(
    a: &LlamaConfig,
    a_name: &str,
    b: &LlamaConfig,
    b_name: &str,
    sliced: bool,
    vocab_rebuilt: bool,
) -> Result<()> {
    let fields = [
        ("vocab_size", a.vocab_size, b.vocab_size),
        ("hidden_size", a.hidden_size, b.hidden_size),
        (
            "intermediate_size",
            a.intermediate_size,
            b.intermediate_size,
        ),
        (
            "num_hidden_layers",
            a.num_hidden_layers,
            b.num_hidden_layers,
        ),
        (
            "num_attention_heads",
            a.num_attention_heads,
            b.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            a.num_key_value_heads,
            b.num_key_value_heads,
        ),
        ("head_dim", a.head_dim, b.head_dim),
    ];
    for (key, x, y) in fields {
        let may_differ =
            (sliced && key == "num_hidden_layers") || (vocab_rebuilt && key == "vocab_size");
        if x != y && !may_differ {
            return Err(Error::invalid(format!(
                "model `{b_name}` has {key} {y} but `{a_name}` has {x}: models of different shapes cannot be merged"
            )));
        }
    }
    Ok(())
}

/// Merges every tensor of `base` with `models` in memory (the run's baseline merges), in the
/// base's dtype and tensor order.
pub fn merge_in_memory<B: Backend>(
    backend: &B,
    base: &ModelStore,
    models: &[&ModelStore],
    op: &MergeOp,
) -> Result<Vec<(String, HostTensor)>> {
    base.names()
        .map(|name| {
            let b = base.tensor(name)?;
            let xs: Vec<HostTensor> = models
                .iter()
                .map(|m| m.tensor(name))
                .collect::<Result<_>>()?;
            let refs: Vec<&HostTensor> = xs.iter().collect();
            let out = std::sync::Mutex::new(vec![0u8; b.data().len()]);
            let sink = |off: usize, bytes: &[u8]| -> Result<()> {
                out.lock().expect("merge sink")[off..off + bytes.len()].copy_from_slice(bytes);
                Ok(())
            };
            let base_arg = op.needs_base().then_some(&b);
            backend.merge(name, op, base_arg, &refs, b.dtype, &sink)?;
            let bytes = out.into_inner().expect("merge sink");
            Ok((
                name.to_string(),
                HostTensor {
                    dtype: b.dtype,
                    shape: b.shape.clone(),
                    bytes: crate::model::TensorBytes::Owned(std::sync::Arc::new(bytes)),
                },
            ))
        })
        .collect()
}
