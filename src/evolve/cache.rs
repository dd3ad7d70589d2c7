//! On-disk cache of the experts' task-vector factors: one safetensors file per (base, experts,
//! rank, seed), keyed by a content fingerprint of every input tensor, written atomically and
//! verified by a checksum of its data on load, so that a stale or corrupted cache is rebuilt,
//! never trusted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::factorize::Factors;
use super::genome::TensorFactors;
use crate::error::{Error, Result};
use crate::model::safetensors::{build_header, parse_header, Header, TensorSpec};
use crate::model::{dtype, DType, ModelStore};

/// Bumped whenever the factorisation or the file layout changes.
const CACHE_VERSION: &str = "1";

/// 64-bit hash of bytes: FNV-1a over 1 MiB chunks hashed in parallel, then over the chunk
/// hashes in order (fast enough to fingerprint multi-GB checkpoints at memory speed).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    const CHUNK: usize = 1 << 20;
    let parts: Vec<u64> = bytes.par_chunks(CHUNK).map(fnv1a).collect();
    let mut h = fnv1a(&(bytes.len() as u64).to_le_bytes());
    for p in parts {
        h = mix(h, p);
    }
    h
}

fn fnv1a(bytes: &[u8]) -> u64 {
    // Word-at-a-time FNV-style mixing: 8 bytes per step.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31)
}

/// Fingerprint of a checkpoint's content: every tensor's name, dtype, shape and bytes.
pub fn fingerprint(store: &ModelStore) -> Result<u64> {
    let mut h = 0u64;
    for name in store.names() {
        let t = store.tensor(name)?;
        h = mix(h, fnv1a(name.as_bytes()));
        h = mix(h, fnv1a(format!("{:?}{:?}", t.dtype, t.shape).as_bytes()));
        h = mix(h, hash_bytes(t.data()));
    }
    Ok(h)
}

/// The cache file for these inputs.
pub fn cache_path(
    dir: &Path,
    base: &ModelStore,
    experts: &[ModelStore],
    rank_tag: &str,
    seed: u64,
) -> Result<PathBuf> {
    let mut h = mix(fnv1a(CACHE_VERSION.as_bytes()), fingerprint(base)?);
    for e in experts {
        h = mix(h, fingerprint(e)?);
    }
    h = mix(h, fnv1a(rank_tag.as_bytes()));
    h = mix(h, seed);
    Ok(dir.join(format!("factors-{h:016x}.safetensors")))
}

/// Writes the factors (`{tensor}::{expert}::{U,S,V}`, f32) with a data checksum in the
/// metadata: temporary file, fsync, rename.
pub fn save(path: &Path, tensors: &[TensorFactors]) -> Result<()> {
    let mut specs = vec![];
    let mut data: Vec<u8> = vec![];
    let mut errors = BTreeMap::new();
    for tf in tensors {
        for (e, f) in tf.factors.iter().enumerate() {
            let r = f.rank();
            for (part, values, shape) in [
                ("U", &f.u, vec![f.m, r]),
                ("S", &f.s, vec![r]),
                ("V", &f.v, vec![f.n, r]),
            ] {
                specs.push(TensorSpec {
                    name: format!("{}::{e}::{part}", tf.name),
                    dtype: DType::F32,
                    shape,
                });
                data.extend_from_slice(bytemuck::cast_slice(values));
            }
            errors.insert(format!("{}::{e}", tf.name), tf.relative_error[e]);
        }
    }
    let metadata = BTreeMap::from([
        ("checksum".to_string(), checksum_hex(&data)),
        (
            "relative_errors".to_string(),
            serde_json::to_string(&errors).expect("JSON"),
        ),
        ("version".to_string(), CACHE_VERSION.to_string()),
    ]);
    let (mut bytes, _) = build_header(&specs, &metadata);
    bytes.extend_from_slice(&data);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::model::export::write_atomic(path, &bytes)
}

/// The checksum recorded in a safetensors file's metadata for its data section.
pub fn checksum_hex(data: &[u8]) -> String {
    format!("{:016x}", hash_bytes(data))
}

/// Checks the `checksum` metadata of a safetensors file (`bytes`, parsed into `header`) against
/// its data section (tensors are written contiguously after the header).
pub fn verify_checksum(bytes: &[u8], header: &Header, path: &Path, what: &str) -> Result<()> {
    let data_start = header
        .tensors
        .values()
        .map(|t| t.start)
        .min()
        .unwrap_or(bytes.len());
    let want = header
        .metadata
        .get("checksum")
        .map(String::as_str)
        .unwrap_or_default();
    if checksum_hex(&bytes[data_start..]) != want {
        return Err(Error::format(
            path,
            format!("{what} checksum mismatch (corrupted)"),
        ));
    }
    Ok(())
}

/// Loads cached factors into `tensors` (which carry names and shapes); `Ok(false)` when the
/// file is absent, and an error when it is present but invalid (the caller rebuilds).
pub fn load(path: &Path, tensors: &mut [TensorFactors], experts: usize) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, path)?;
    verify_checksum(&bytes, &header, path, "factor cache")?;
    let errors: BTreeMap<String, f64> = serde_json::from_str(
        header
            .metadata
            .get("relative_errors")
            .map(String::as_str)
            .unwrap_or("{}"),
    )
    .map_err(|e| Error::format(path, format!("cache metadata: {e}")))?;
    for tf in tensors
        .iter_mut()
        .filter(|t| super::genome::is_factorised(&t.name, &t.shape))
    {
        let (m, nn) = (tf.shape[0], tf.shape[1]);
        tf.factors.clear();
        tf.relative_error.clear();
        for e in 0..experts {
            let get = |part: &str| {
                header
                    .tensors
                    .get(&format!("{}::{e}::{part}", tf.name))
                    .map(|t| dtype::to_f32_vec(t.dtype, &bytes[t.start..t.end]))
                    .ok_or_else(|| {
                        Error::format(path, format!("cache lacks `{}::{e}::{part}`", tf.name))
                    })
            };
            let f = Factors {
                m,
                n: nn,
                u: get("U")?,
                s: get("S")?,
                v: get("V")?,
            };
            if f.u.len() != m * f.rank() || f.v.len() != nn * f.rank() {
                return Err(Error::format(
                    path,
                    format!("cache factors of `{}` have the wrong shape", tf.name),
                ));
            }
            tf.relative_error.push(
                errors
                    .get(&format!("{}::{e}", tf.name))
                    .copied()
                    .unwrap_or(f64::NAN),
            );
            tf.factors.push(f);
        }
    }
    Ok(true)
}
