//! Writing a Hugging Face checkpoint directory atomically.
//!
//! Everything goes into a hidden temporary directory beside the target; files are fsynced, then
//! the directory is renamed into place. A crash or an error at any point leaves either the old
//! target or the new one, never a half-written directory under the target's name.
//!
//! Tensors may be written in any order and from several threads: every tensor's shard and offset
//! are fixed up front from its spec, so a streaming producer (merge, materialise) writes each
//! tensor as soon as it exists, with `pwrite`, and never holds more than it is working on.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use super::direct::{DirectFiles, DIRECT_ALIGN};
use super::safetensors::{build_header_aligned, TensorSpec};
use super::store::{HostTensor, INDEX_FILE, SINGLE_FILE};
use crate::durable::{sync_dir, write_synced};
use crate::error::{Error, Result};

/// transformers' `save_pretrained` default shard size (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Files besides weights and config that make a checkpoint usable, copied when present.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
];

struct Slot {
    shard: usize,
    offset: u64,
    spec: TensorSpec,
    written_bytes: AtomicUsize,
}

/// A checkpoint being written. Dropping it before [`CheckpointWriter::finish`] removes the
/// temporary directory.
pub struct CheckpointWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    /// The shard files' names, and the files being written (taken by `finish`).
    shards: Vec<String>,
    files: Option<DirectFiles>,
    slots: HashMap<String, Slot>,
    order: Vec<String>,
    finished: bool,
    /// Companion files [`CheckpointWriter::finish`] must not copy.
    withheld: Vec<String>,
}

impl CheckpointWriter {
    /// Lays out `specs` over shards of at most `max_shard_bytes` (a tensor larger than that gets
    /// a shard of its own) and creates the files under a temporary directory.
    pub fn create(out_dir: &Path, specs: Vec<TensorSpec>, max_shard_bytes: u64) -> Result<Self> {
        let tmp_dir = sibling(out_dir, "tmp")?;
        // Earlier exports here that were killed mid-write leave hidden copies behind.
        let parent = tmp_dir.parent().filter(|p| !p.as_os_str().is_empty());
        crate::durable::remove_stale_temporaries(parent.unwrap_or(Path::new(".")));
        fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        let mut w = CheckpointWriter {
            final_dir: out_dir.to_path_buf(),
            tmp_dir,
            shards: vec![],
            files: None,
            slots: HashMap::new(),
            order: vec![],
            finished: false,
            withheld: vec![],
        };

        let mut groups: Vec<Vec<TensorSpec>> = vec![];
        let mut current_bytes = 0u64;
        let mut seen = std::collections::HashSet::new();
        for spec in specs {
            if !seen.insert(spec.name.clone()) {
                return Err(Error::invalid(format!(
                    "tensor `{}` is written twice",
                    spec.name
                )));
            }
            let n = spec.nbytes() as u64;
            match groups.last_mut() {
                Some(g) if current_bytes + n <= max_shard_bytes => g.push(spec.clone()),
                _ => {
                    groups.push(vec![spec.clone()]);
                    current_bytes = 0;
                }
            }
            current_bytes += n;
            w.order.push(spec.name);
        }
        if groups.is_empty() {
            groups.push(vec![]);
        }

        let count = groups.len();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut headers = vec![];
        let mut files = vec![];
        for (i, group) in groups.into_iter().enumerate() {
            let name = if count == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{count:05}.safetensors", i + 1)
            };
            // Data from a block boundary: tensors whose sizes are whole blocks are then written
            // without partial blocks.
            let (header, offsets) = build_header_aligned(&group, &metadata, DIRECT_ALIGN);
            let total = header.len() as u64 + group.iter().map(|s| s.nbytes() as u64).sum::<u64>();
            files.push((w.tmp_dir.join(&name), total));
            for (spec, off) in group.into_iter().zip(offsets) {
                w.slots.insert(
                    spec.name.clone(),
                    Slot {
                        shard: i,
                        offset: header.len() as u64 + off as u64,
                        spec,
                        written_bytes: AtomicUsize::new(0),
                    },
                );
            }
            w.shards.push(name);
            headers.push(header);
        }
        let direct = DirectFiles::create(&files)?;
        for (i, header) in headers.iter().enumerate() {
            direct.write(i, 0, header)?;
        }
        w.files = Some(direct);
        Ok(w)
    }

    /// Writes one tensor's bytes (its storage dtype, little-endian). Callable from many threads.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_part(name, 0, bytes)
    }

    /// Writes `bytes` at byte `offset` within tensor `name`, so a producer can stream a large
    /// tensor in pieces from several threads. The pieces must not overlap.
    pub fn write_part(&self, name: &str, offset: usize, bytes: &[u8]) -> Result<()> {
        let slot = self.slots.get(name).ok_or_else(|| {
            Error::invalid(format!("tensor `{name}` was not declared for this export"))
        })?;
        let need = slot.spec.nbytes();
        if offset + bytes.len() > need {
            return Err(Error::tensor(
                name,
                format!(
                    "export got bytes [{offset}, {}) past its {need} bytes",
                    offset + bytes.len()
                ),
            ));
        }
        if slot.written_bytes.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len() > need {
            return Err(Error::tensor(name, "written twice during export"));
        }
        let files = self.files.as_ref().expect("open until finish");
        files.write(slot.shard, slot.offset + offset as u64, bytes)
    }

    /// Adds a small file (e.g. the merge recipe) to the checkpoint being written.
    pub fn add_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_synced(&self.tmp_dir.join(name), bytes)
    }

    /// Keeps [`CheckpointWriter::finish`] from copying companion file `name` (one that would
    /// contradict files added here, such as a `tokenizer.model` beside a rebuilt vocabulary).
    pub fn withhold(&mut self, name: &str) {
        self.withheld.push(name.to_string());
    }

    /// Checks every tensor was written, writes the index (when sharded), `config_json` and the
    /// companion files found in `companions_from` (not those added or withheld), syncs, and moves the directory into place
    /// (replacing an existing one only once the new one is complete).
    pub fn finish(mut self, config_json: &Value, companions_from: Option<&Path>) -> Result<()> {
        for name in &self.order {
            let slot = &self.slots[name];
            let done = slot.written_bytes.load(Ordering::Acquire);
            if done != slot.spec.nbytes() {
                let what = if done == 0 {
                    "never written".to_string()
                } else {
                    format!("only {done} of {} bytes written", slot.spec.nbytes())
                };
                return Err(Error::tensor(
                    name.as_str(),
                    format!("{what} during export"),
                ));
            }
        }
        self.files.take().expect("open until finish").finish()?;
        if self.shards.len() > 1 {
            let weight_map: serde_json::Map<String, Value> = self
                .order
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        Value::String(self.shards[self.slots[n].shard].clone()),
                    )
                })
                .collect();
            let total: usize = self.slots.values().map(|s| s.spec.nbytes()).sum();
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            write_synced(&self.tmp_dir.join(INDEX_FILE), &pretty(&index))?;
        }
        write_synced(&self.tmp_dir.join("config.json"), &pretty(config_json))?;
        if let Some(src) = companions_from {
            for name in COMPANION_FILES {
                let from = src.join(name);
                // Files added with `add_file` win over the companions.
                let taken =
                    self.tmp_dir.join(name).exists() || self.withheld.iter().any(|w| w == name);
                if from.is_file() && !taken {
                    let bytes = fs::read(&from).map_err(|e| Error::io(&from, e))?;
                    write_synced(&self.tmp_dir.join(name), &bytes)?;
                }
            }
        }
        sync_dir(&self.tmp_dir)?;

        if self.final_dir.exists() {
            let old = sibling(&self.final_dir, "old")?;
            fs::rename(&self.final_dir, &old).map_err(|e| Error::io(&self.final_dir, e))?;
            fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| Error::io(&self.final_dir, e))?;
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        } else {
            fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| Error::io(&self.final_dir, e))?;
        }
        if let Some(parent) = self.final_dir.parent() {
            sync_dir(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            })?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.files = None; // its writer threads stop before the files go
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

/// Exports in-memory tensors as a checkpoint (names in the given order).
pub fn export_tensors(
    out_dir: &Path,
    tensors: &[(String, HostTensor)],
    config_json: &Value,
    companions_from: Option<&Path>,
    max_shard_bytes: u64,
) -> Result<()> {
    let specs = tensors
        .iter()
        .map(|(name, t)| TensorSpec {
            name: name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let writer = CheckpointWriter::create(out_dir, specs, max_shard_bytes)?;
    for (name, t) in tensors {
        writer.write(name, t.data())?;
    }
    writer.finish(config_json, companions_from)
}

/// A hidden path beside `target` that no other process of ours uses.
fn sibling(target: &Path, what: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::format(target, "output path has no directory name"))?;
    let parent = target.parent().unwrap_or(Path::new(""));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Ok(parent.join(format!(
        ".{}.{what}-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("JSON values serialise");
    s.push(b'\n');
    s
}
