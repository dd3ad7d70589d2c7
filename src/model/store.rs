//! The model store: a Hugging Face checkpoint directory opened for reading, its safetensors
//! shards memory-mapped and every tensor reachable by name as a zero-copy view.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::config::LlamaConfig;
use super::dtype::{self, DType};
use super::safetensors::{parse_header, TensorEntry};
use super::window::MappedFile;
use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The bytes of one tensor: a view into a memory-mapped shard, or a buffer the engine owns
/// (a merged or materialised tensor). Cloning is cheap either way.
#[derive(Clone, Debug)]
pub enum TensorBytes {
    Mapped {
        map: Arc<MappedFile>,
        range: Range<usize>,
    },
    Owned(Arc<Vec<u8>>),
}

/// A tensor in host memory, in its storage dtype. Shape is row-major, as safetensors stores it.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: TensorBytes,
}

impl HostTensor {
    /// An owned tensor from f32 values rounded to `dtype`.
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: DType) -> Self {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        HostTensor {
            dtype,
            shape,
            bytes: TensorBytes::Owned(Arc::new(dtype::from_f32(dtype, values))),
        }
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        match &self.bytes {
            TensorBytes::Mapped { map, range } => &map.map[range.clone()],
            TensorBytes::Owned(v) => v,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Drops this tensor's pages from the process's mapping once it has been consumed, so a
    /// stream over a large checkpoint does not accumulate it in resident memory (the page cache
    /// keeps the data; a later read faults it back in). No-op for owned tensors.
    pub fn release_pages(&self) {
        if let TensorBytes::Mapped { map, range } = &self.bytes {
            // SAFETY: the map is a read-only private file mapping: MADV_DONTNEED only drops the
            // mapped pages, and any later access reads the same bytes back from the file.
            let _ = unsafe {
                map.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
        }
    }

    /// Calls `f` with bytes `lo..hi` of the data, for a stream that reads each byte once in
    /// order (a merge's tiles): a mapped tensor's bytes come from positioned reads into this
    /// thread's windows (`window`), which cost less than faulting the pages into the map.
    pub fn with_stream_bytes<R>(&self, lo: usize, hi: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        match &self.bytes {
            TensorBytes::Mapped { map, range } => {
                map.with_range(range.start + lo, range.start + hi, range.end, f)
            }
            TensorBytes::Owned(v) => f(&v[lo..hi]),
        }
    }

    /// The index of the first NaN or ±Inf value, if any (bit tests over the stored bytes, in
    /// parallel: a whole checkpoint is checked at memory speed).
    pub fn first_non_finite(&self) -> Option<usize> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 20;
        let size = self.dtype.size();
        let per_chunk = CHUNK / size;
        self.data()
            .par_chunks(per_chunk * size)
            .enumerate()
            .filter_map(|(c, bytes)| {
                dtype::first_non_finite(self.dtype, bytes).map(|i| c * per_chunk + i)
            })
            .min()
    }

    /// The values upcast to f32 (a copy).
    pub fn to_f32(&self) -> Vec<f32> {
        dtype::to_f32_vec(self.dtype, self.data())
    }
}

struct Shard {
    path: PathBuf,
    map: Arc<MappedFile>,
}

/// Where a tensor lives: which shard, and its header entry.
#[derive(Clone, Debug)]
struct Located {
    shard: usize,
    entry: TensorEntry,
}

/// A checkpoint directory opened for reading.
pub struct ModelStore {
    dir: PathBuf,
    config: LlamaConfig,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Located>,
    /// Names the index lists, with the shard file it names (empty for a single file).
    index: BTreeMap<String, String>,
}

impl ModelStore {
    /// Opens `dir`: reads config.json, maps `model.safetensors` or the shards that
    /// `model.safetensors.index.json` lists, and validates every header. Reads no tensor data.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::format(
                &dir,
                "not a checkpoint directory (does not exist or is not a directory)",
            ));
        }
        let config = LlamaConfig::from_dir(&dir)?;
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (files, index) = if index_path.is_file() {
            let index = read_index(&index_path)?;
            let files: BTreeSet<String> = index.values().cloned().collect();
            (files.into_iter().collect::<Vec<_>>(), index)
        } else if single_path.is_file() {
            (vec![SINGLE_FILE.to_string()], BTreeMap::new())
        } else {
            return Err(Error::format(
                &dir,
                format!("no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is present"),
            ));
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            let path = dir.join(file);
            let map = map_file(&path)?;
            let header = parse_header(&map.map, &path)?;
            for (name, entry) in header.tensors {
                // With an index, the index decides what the checkpoint holds (as transformers'
                // loader does): tensors it does not list, or lists in another shard, are skipped.
                if !index.is_empty() && index.get(&name) != Some(file) {
                    continue;
                }
                if tensors.contains_key(&name) {
                    return Err(Error::format(
                        &path,
                        format!("tensor `{name}` is stored in two shards"),
                    ));
                }
                tensors.insert(name, Located { shard: i, entry });
            }
            shards.push(Shard {
                path,
                map: Arc::new(map),
            });
        }
        for (name, file) in &index {
            if !tensors.contains_key(name) {
                return Err(Error::format(
                    dir.join(file),
                    format!(
                        "tensor `{name}` is listed in {INDEX_FILE} but missing from this shard"
                    ),
                ));
            }
        }
        Ok(ModelStore {
            dir,
            config,
            shards,
            tensors,
            index,
        })
    }

    /// Opens `dir` and checks that it holds exactly what a Llama of its config needs.
    pub fn open_llama(dir: impl AsRef<Path>) -> Result<Self> {
        let store = Self::open(dir)?;
        store.validate_llama()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The shard files, in the order they were mapped.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Dtype and shape of a tensor without touching its data.
    pub fn meta(&self, name: &str) -> Result<(DType, &[usize])> {
        let loc = self.locate(name)?;
        Ok((loc.entry.dtype, &loc.entry.shape))
    }

    /// A zero-copy view of a tensor.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let loc = self.locate(name)?;
        Ok(HostTensor {
            dtype: loc.entry.dtype,
            shape: loc.entry.shape.clone(),
            bytes: TensorBytes::Mapped {
                map: Arc::clone(&self.shards[loc.shard].map),
                range: loc.entry.start..loc.entry.end,
            },
        })
    }

    /// Count of stored elements, per dtype.
    pub fn dtype_counts(&self) -> BTreeMap<DType, usize> {
        let mut out = BTreeMap::new();
        for loc in self.tensors.values() {
            *out.entry(loc.entry.dtype).or_insert(0) += loc.entry.numel();
        }
        out
    }

    /// The dtype most parameters are stored in (the checkpoint's dtype in practice).
    pub fn dominant_dtype(&self) -> DType {
        self.dtype_counts()
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
            .or(self.config.dtype)
            .unwrap_or(DType::F32)
    }

    /// Checks names and shapes against the config: every expected tensor present with its
    /// shape; with tied embeddings a stored `lm_head.weight` is ignored, as transformers does.
    pub fn validate_llama(&self) -> Result<()> {
        for (name, shape) in self.config.expected_tensors() {
            let Some(loc) = self.tensors.get(&name) else {
                let where_ = if self.index.is_empty() {
                    self.dir.join(SINGLE_FILE)
                } else {
                    self.dir.join(INDEX_FILE)
                };
                return Err(Error::format(where_, format!("tensor `{name}` is missing")));
            };
            if loc.entry.shape != shape {
                return Err(Error::format(
                    &self.shards[loc.shard].path,
                    format!(
                        "tensor `{name}` has shape {:?} but config.json implies {shape:?}",
                        loc.entry.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that every tensor holds only finite values: a NaN or Inf in a weight makes every
    /// score meaningless, so commands that compute with weights refuse it up front, naming the
    /// shard and the tensor.
    pub fn check_finite(&self) -> Result<()> {
        for (name, loc) in &self.tensors {
            if let Some(i) = self.tensor(name)?.first_non_finite() {
                return Err(Error::format(
                    &self.shards[loc.shard].path,
                    format!("tensor `{name}` holds NaN or Inf (element {i})"),
                ));
            }
        }
        Ok(())
    }

    fn locate(&self, name: &str) -> Result<&Located> {
        self.tensors.get(name).ok_or_else(|| {
            Error::format(
                &self.dir,
                format!("tensor `{name}` is not in this checkpoint"),
            )
        })
    }
}

/// Memory-maps a whole file read-only.
fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(Error::format(
            path,
            format!("truncated safetensors: {len} bytes, too short for the 8-byte header length"),
        ));
    }
    // SAFETY: the map is read-only and lives as long as the store's Arc; like every mmap-based
    // loader (safetensors, candle) we rely on checkpoint files not being truncated while open.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(MappedFile::new(map, file))
}

/// `weight_map` of `model.safetensors.index.json`: tensor name → shard file name.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|err| Error::Json {
        path: path.to_path_buf(),
        err,
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(path, "missing `weight_map` object"))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(path, format!("`weight_map.{name}` is not a file name"))
        })?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(Error::format(
                path,
                format!(
                    "`weight_map.{name}` names `{file}`, which is not a file in this directory"
                ),
            ));
        }
        out.insert(name.clone(), file.to_string());
    }
    if out.is_empty() {
        return Err(Error::format(path, "`weight_map` is empty"));
    }
    Ok(out)
}

/// Maps one safetensors file and returns views of all its tensors (test vectors, caches,
/// anything that is not a checkpoint directory).
pub fn read_safetensors_file(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let map = Arc::new(map_file(path)?);
    let header = parse_header(&map.map, path)?;
    Ok(header
        .tensors
        .into_iter()
        .map(|(name, e)| {
            let t = HostTensor {
                dtype: e.dtype,
                shape: e.shape,
                bytes: TensorBytes::Mapped {
                    map: Arc::clone(&map),
                    range: e.start..e.end,
                },
            };
            (name, t)
        })
        .collect())
}
