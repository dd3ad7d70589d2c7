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

/// Refuses an output folder that would clobber what it must not: an existing file, one of the
/// `inputs` (a model being read, a run folder), a folder inside one, or a folder holding one.
pub fn check_output_dir(out: &Path, inputs: &[&Path]) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::format(
            out,
            "is an existing file, not a folder; give a folder to write into",
        ));
    }
    let out_abs = resolved(out);
    for input in inputs {
        let inp = resolved(input);
        let relation = if out_abs == inp {
            "is"
        } else if out_abs.starts_with(&inp) {
            "is inside"
        } else if inp.starts_with(&out_abs) {
            "holds"
        } else {
            continue;
        };
        return Err(Error::format(
            out,
            format!(
                "{relation} the input {}; writing there would destroy it, choose another output folder",
                input.display()
            ),
        ));
    }
    Ok(())
}

/// `p` made absolute with symlinks and `..` resolved as far as it exists (the rest appended),
/// so two spellings of one folder compare equal.
fn resolved(p: &Path) -> std::path::PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut head = abs.clone();
    let mut tail = vec![];
    loop {
        if let Ok(c) = fs::canonicalize(&head) {
            let mut out = c;
            out.extend(tail.iter().rev());
            return out;
        }
        match (head.file_name().map(|n| n.to_owned()), head.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name);
                head = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Removes the temporaries that killed writers of this engine left in `dir`: `.NAME.tmp-PID-N`
/// and `.NAME.old-PID-N` (checkpoint directories being exported or swapped) and `NAME.tmp-PID`
/// (files being replaced), but only where process `PID` is gone. Returns what it removed.
/// Nothing else is touched, and a missing `dir` is not an error.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![];
    };
    let mut removed = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = e.path();
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The pid in one of this engine's temporary names, if `name` is one.
fn temporary_owner(name: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(hidden) = name.strip_prefix('.') {
        for what in [".tmp-", ".old-"] {
            if let Some(at) = hidden.rfind(what) {
                let (pid, n) = hidden[at + what.len()..].split_once('-')?;
                if at > 0 && digits(pid) && digits(n) {
                    return pid.parse().ok();
                }
            }
        }
        return None;
    }
    let at = name.rfind(".tmp-")?;
    let pid = &name[at + ".tmp-".len()..];
    (at > 0 && digits(pid)).then(|| pid.parse().ok()).flatten()
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_writers_go_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let me = std::process::id();
        let make_dir = |n: &str| fs::create_dir_all(dir.path().join(n)).unwrap();
        let make_file = |n: &str| fs::write(dir.path().join(n), b"x").unwrap();
        make_dir(&format!(".final.tmp-{dead_pid}-123"));
        make_dir(&format!(".merged.old-{dead_pid}-9"));
        make_file(&format!("checkpoint.tmp-{dead_pid}"));
        // Kept: a live writer's (this process), and names that only look alike.
        make_dir(&format!(".final.tmp-{me}-5"));
        make_file(&format!("summary.tmp-{me}"));
        make_file("notes.tmp-draft");
        make_file(".tmp-1-2");
        make_file("model.safetensors");
        let mut gone: Vec<String> = remove_stale_temporaries(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        gone.sort();
        let mut want = vec![
            format!(".final.tmp-{dead_pid}-123"),
            format!(".merged.old-{dead_pid}-9"),
            format!("checkpoint.tmp-{dead_pid}"),
        ];
        want.sort();
        assert_eq!(gone, want);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), 5, "{left:?}");
    }

    #[test]
    fn outputs_that_would_clobber_an_input_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("models/base");
        fs::create_dir_all(&model).unwrap();
        fs::write(dir.path().join("file"), b"mine").unwrap();
        let ok = dir.path().join("out/merged");
        check_output_dir(&ok, &[&model]).unwrap();
        for (out, want) in [
            (dir.path().join("file"), "existing file"),
            (model.clone(), "is the input"),
            (dir.path().join("models/base/../base"), "is the input"),
            (model.join("sub"), "is inside the input"),
            (dir.path().join("models"), "holds the input"),
        ] {
            let e = check_output_dir(&out, &[&model]).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", out.display());
        }
        assert_eq!(fs::read(dir.path().join("file")).unwrap(), b"mine");
    }

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
