//! Files that survive a crash and betray corruption: whole-file writes that are fsynced, atomic
//! replacement (temporary name, fsync, rename, fsync of the folder), and the checksum that the
//! engine's own safetensors files (factor cache, checkpoints, genome files) carry in their
//! metadata over their data *and* the rest of their metadata, so an edited counter is caught as
//! surely as a flipped bit.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::safetensors::Header;

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

/// Word-at-a-time FNV-style hash: 8 bytes per step.
pub fn fnv1a(bytes: &[u8]) -> u64 {
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

/// Combines two hashes, order-sensitively.
pub fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31)
}

/// The `checksum` a file with this data section and metadata (its `checksum` key aside)
/// records.
pub fn checksum(data: &[u8], metadata: &BTreeMap<String, String>) -> String {
    let mut h = hash_bytes(data);
    for (k, v) in metadata.iter().filter(|(k, _)| k.as_str() != "checksum") {
        h = mix(h, fnv1a(k.as_bytes()));
        h = mix(h, fnv1a(v.as_bytes()));
    }
    format!("{h:016x}")
}

/// The checksum of an engine file's data section alone (files written before the checksum
/// covered the metadata: version-1 checkpoints).
pub fn data_checksum(data: &[u8]) -> String {
    format!("{:016x}", hash_bytes(data))
}

/// How much of a file its checksum covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    DataAndMetadata,
    DataOnly,
}

/// Checks the `checksum` metadata of a safetensors file (`bytes`, parsed into `header`);
/// tensors are written contiguously after the header. `what` names the file in the error.
pub fn verify(
    bytes: &[u8],
    header: &Header,
    path: &Path,
    what: &str,
    coverage: Coverage,
) -> Result<()> {
    let data_start = header
        .tensors
        .values()
        .map(|t| t.start)
        .min()
        .unwrap_or(bytes.len());
    let data = &bytes[data_start..];
    let want = header
        .metadata
        .get("checksum")
        .map(String::as_str)
        .unwrap_or_default();
    let got = match coverage {
        Coverage::DataAndMetadata => checksum(data, &header.metadata),
        Coverage::DataOnly => data_checksum(data),
    };
    if got != want {
        return Err(Error::format(
            path,
            format!("{what} checksum mismatch (corrupted or edited)"),
        ));
    }
    Ok(())
}

/// Writes a whole file and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes a whole file under a temporary name, fsyncs it, renames it into place and syncs the
/// folder: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => Ok(()),
    }
}

/// fsyncs a folder (a rename in it becomes durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_covers_the_metadata_but_not_itself() {
        let data = b"some tensor bytes";
        let mut md = BTreeMap::from([("state".to_string(), "{\"n\": 3}".to_string())]);
        let c = checksum(data, &md);
        md.insert("checksum".into(), c.clone());
        assert_eq!(checksum(data, &md), c, "its own key is not covered");
        md.insert("state".into(), "{\"n\": 4}".into());
        assert_ne!(checksum(data, &md), c, "an edited value changes it");
        assert_ne!(checksum(b"some tensor bytez", &md), checksum(data, &md));
    }
}
