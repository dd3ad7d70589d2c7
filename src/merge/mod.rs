//! `cycleqd-engine merge`: a mergekit configuration executed by streaming, tensor by tensor,
//! from memory-mapped inputs through the backend's merge operator into an atomic export.
//! Peak memory is a few tiles per thread plus the mapped pages of the tensor in flight.

pub mod config;
pub mod methods;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::Backend;
use crate::error::{Error, Result};

use crate::model::{CheckpointWriter, HostTensor, LlamaConfig, ModelStore, TensorSpec};

pub use config::{MergeConfig, Method, ResolvedMerge};
pub use methods::{merge_tensor, MergeOp, Sink};

/// What a merge did, for the CLI's report and the benchmark.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    pub method: String,
    pub tensors: usize,
    pub out_dtype: String,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    /// Peak resident memory of the process (Linux), mapped input pages included.
    pub peak_rss_bytes: Option<u64>,
}

const LM_HEAD: &str = "lm_head.weight";
const EMBED: &str = "model.embed_tokens.weight";

/// Runs the merge `config_path` describes into `out_dir`.
pub fn run_merge<B: Backend>(
    backend: &B,
    config_path: &Path,
    out_dir: &Path,
    max_shard_bytes: u64,
    progress: bool,
) -> Result<MergeReport> {
    let started = Instant::now();
    let cfg = MergeConfig::from_file(config_path)?;
    let plan = cfg.resolve(config_path)?;
    let inputs: Vec<&Path> = plan
        .inputs
        .iter()
        .chain(&plan.base)
        .chain([&plan.donor])
        .map(|m| m.path.as_path())
        .collect();
    crate::durable::check_output_dir(out_dir, &inputs)?;

    // Open every model once; the donor gives config.json and the tokenizer.
    let mut stores: BTreeMap<String, ModelStore> = BTreeMap::new();
    for m in plan.inputs.iter().chain(&plan.base).chain([&plan.donor]) {
        if !stores.contains_key(&m.name) {
            let s = ModelStore::open_llama(&m.path)
                .map_err(|e| Error::invalid(format!("model `{}`: {e}", m.name)))?;
            stores.insert(m.name.clone(), s);
        }
    }
    let donor = &stores[&plan.donor.name];
    for (name, s) in &stores {
        check_same_shape(donor.config(), &plan.donor.name, s.config(), name)?;
    }

    // The output holds what a Llama of the donor's shape holds; lm_head only if some input
    // stores one (a tied input then contributes its embeddings, as mergekit does).
    let any_lm_head = stores.values().any(|s| s.contains(LM_HEAD));
    let mut names: Vec<(String, Vec<usize>)> = donor
        .config()
        .expected_tensors()
        .into_iter()
        .filter(|(n, _)| n != LM_HEAD)
        .collect();
    if any_lm_head {
        names.push((
            LM_HEAD.to_string(),
            vec![donor.config().vocab_size, donor.config().hidden_size],
        ));
    }
    let source = |store: &ModelStore, name: &str| -> Result<HostTensor> {
        if name == LM_HEAD && !store.contains(LM_HEAD) {
            store.tensor(EMBED)
        } else {
            store.tensor(name)
        }
    };

    let out_dtype = cfg
        .out_dtype
        .or(cfg.dtype)
        .unwrap_or_else(|| donor.dominant_dtype());
    let specs: Vec<TensorSpec> = names
        .iter()
        .map(|(n, shape)| TensorSpec {
            name: n.clone(),
            dtype: out_dtype,
            shape: shape.clone(),
        })
        .collect();
    let writer = CheckpointWriter::create(out_dir, specs.clone(), max_shard_bytes)?;

    let bar = if progress {
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
    for spec in &specs {
        let name = &spec.name;
        let inputs: Vec<HostTensor> = plan
            .inputs
            .iter()
            .map(|m| source(&stores[&m.name], name))
            .collect::<Result<_>>()?;
        let base = plan
            .base
            .as_ref()
            .filter(|_| plan.op.needs_base())
            .map(|b| source(&stores[&b.name], name))
            .transpose()?;
        let refs: Vec<&HostTensor> = inputs.iter().collect();
        backend.merge(
            name,
            &plan.op,
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
    writer.finish(
        &donor.config().to_json_with_dtype(out_dtype),
        Some(donor.dir()),
    )?;
    let bytes_written = specs.iter().map(|s| s.nbytes() as u64).sum();
    Ok(MergeReport {
        method: format!("{:?}", cfg.method),
        tensors: specs.len(),
        out_dtype: out_dtype.torch_name().to_string(),
        bytes_read,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::bench::peak_rss_bytes(),
    })
}

fn check_same_shape(a: &LlamaConfig, a_name: &str, b: &LlamaConfig, b_name: &str) -> Result<()> {
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
        if x != y {
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
