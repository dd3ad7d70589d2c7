//! On-disk cache of the experts' task-vector factors: one safetensors file per (base, experts,
//! factorisation), keyed by a content fingerprint of every input tensor and by the algorithm
//! and its settings (never by a run's seed: runs with other seeds share it), written atomically
//! and verified by a checksum of its data on load, so that a stale or corrupted cache is
//! rebuilt, never trusted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::expert_set::TensorFactors;
use super::factorize::Factors;
use crate::durable::{self, fnv1a, hash_bytes, mix, write_atomic, Coverage};
use crate::error::{Error, Result};
use crate::model::safetensors::{build_header, parse_header, TensorSpec};
use crate::model::{dtype, DType, ModelStore};

/// Bumped whenever the factorisation or the file layout changes.
const CACHE_VERSION: &str = "2";

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

/// Fingerprint of a base and its experts, in order.
pub fn inputs_fingerprint(base: &ModelStore, experts: &[ModelStore]) -> Result<u64> {
    let mut h = fingerprint(base)?;
    for e in experts {
        h = mix(h, fingerprint(e)?);
    }
    Ok(h)
}

/// The cache file for inputs of fingerprint `inputs` ([`inputs_fingerprint`]), factorised by
/// the algorithm `algorithm` describes (its name, rank and every setting the result depends
/// on).
pub fn cache_path(dir: &Path, inputs: u64, algorithm: &str) -> PathBuf {
    let h = mix(
        mix(fnv1a(CACHE_VERSION.as_bytes()), inputs),
        fnv1a(algorithm.as_bytes()),
    );
    dir.join(format!("factors-{h:016x}.safetensors"))
}

/// Writes the factors (`{tensor}::{expert}::{U,S,VT}`, f32) with a data checksum and the
/// algorithm in the metadata: temporary file, fsync, rename.
pub fn save(path: &Path, tensors: &[TensorFactors], algorithm: &str) -> Result<()> {
    let mut specs = vec![];
    let mut data: Vec<u8> = vec![];
    let mut errors = BTreeMap::new();
    for tf in tensors {
        for (e, f) in tf.factors.iter().enumerate() {
            let r = f.rank();
            for (part, values, shape) in [
                ("U", &f.u[..], vec![f.m, r]),
                ("S", &f.s[..], vec![r]),
                ("VT", &f.vt[..], vec![r, f.n]),
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
    let mut metadata = BTreeMap::from([
        (
            "relative_errors".to_string(),
            serde_json::to_string(&errors).expect("JSON"),
        ),
        ("version".to_string(), CACHE_VERSION.to_string()),
        ("algorithm".to_string(), algorithm.to_string()),
    ]);
    metadata.insert("checksum".into(), durable::checksum(&data, &metadata));
    let (mut bytes, _) = build_header(&specs, &metadata);
    bytes.extend_from_slice(&data);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::durable::remove_stale_temporaries(dir);
    write_atomic(path, &bytes)
}

/// Loads cached factors into `tensors` (which carry names and shapes); `Ok(false)` when the
/// file is absent, and an error when it is present but invalid (the caller rebuilds).
pub fn load(path: &Path, tensors: &mut [TensorFactors], experts: usize) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, path)?;
    durable::verify(
        &bytes,
        &header,
        path,
        "factor cache",
        Coverage::DataAndMetadata,
    )?;
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
        .filter(|t| super::expert_set::is_factorised(&t.name, &t.shape))
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
                u: get("U")?.into(),
                s: get("S")?,
                vt: get("VT")?.into(),
            };
            if f.u.len() != m * f.rank() || f.vt.len() != nn * f.rank() {
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
