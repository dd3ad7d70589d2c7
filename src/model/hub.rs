//! Models named by Hugging Face Hub id (`org/name`, `org/name@revision`), found offline in the
//! local Hub cache that `huggingface_hub` fills: `<cache>/models--org--name/snapshots/<commit>`,
//! with `refs/<branch or tag>` naming the commit. Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The Hub caches to look in, in `huggingface_hub`'s order of precedence: `$HF_HUB_CACHE`
/// (or the older `$HUGGINGFACE_HUB_CACHE`), `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`,
/// `~/.cache/huggingface/hub`. Every one set is searched, first match wins.
pub fn cache_dirs() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs = vec![];
    dirs.extend(var("HF_HUB_CACHE"));
    dirs.extend(var("HUGGINGFACE_HUB_CACHE"));
    dirs.extend(var("HF_HOME").map(|h| h.join("hub")));
    dirs.extend(var("XDG_CACHE_HOME").map(|h| h.join("huggingface").join("hub")));
    dirs.extend(var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")));
    let mut unique = vec![];
    for d in dirs {
        if !unique.contains(&d) {
            unique.push(d);
        }
    }
    unique
}

/// Whether `spec` reads as a Hub id rather than a path: `name` or `org/name`, each part of
/// letters, digits, `-`, `_` and `.` (not `.` or `..`), optionally `@revision`.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split_once('@').map_or(spec, |(id, _)| id);
    let parts: Vec<&str> = id.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// Where `spec` is: an existing local folder as it is, else a Hub id (`org/name[@revision]`,
/// revision `main` by default: a branch, a tag or a commit hash) resolved in the local caches.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.exists() || !looks_like_hub_id(spec) {
        return Ok(local.to_path_buf());
    }
    resolve_in(spec, &cache_dirs())
}

/// [`resolve_model`] for a Hub id, in the given caches.
pub fn resolve_in(spec: &str, caches: &[PathBuf]) -> Result<PathBuf> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev),
        Some(_) => {
            return Err(Error::invalid(format!(
                "`{spec}`: an empty revision after `@`"
            )))
        }
        None => (spec, "main"),
    };
    let folder = format!("models--{}", id.replace('/', "--"));
    let mut looked = vec![];
    for cache in caches {
        let repo = cache.join(&folder);
        looked.push(repo.display().to_string());
        if !repo.is_dir() {
            continue;
        }
        // A branch or tag names a commit in refs/; a commit is a snapshot's own name.
        let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        let snapshot = repo.join("snapshots").join(&commit);
        if commit.chars().all(|c| c.is_ascii_alphanumeric()) && snapshot.is_dir() {
            return Ok(snapshot);
        }
        let cached: Vec<String> = std::fs::read_dir(repo.join("snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(Error::invalid(format!(
            "`{spec}`: revision `{revision}` is not in the local Hub cache {} (snapshots there: {}); \
             download it first, e.g. `hf download {id} --revision {revision}`",
            repo.display(),
            if cached.is_empty() {
                "none".to_string()
            } else {
                cached.join(", ")
            }
        )));
    }
    Err(Error::invalid(format!(
        "`{spec}` is not a local folder and not in the local Hub cache (looked in {}); \
         download it first (`hf download {id}`) or give a path",
        if looked.is_empty() {
            "no cache: set HF_HUB_CACHE or HF_HOME".to_string()
        } else {
            looked.join(", ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(cache: &Path, id: &str, commit: &str, refs: &[&str]) -> PathBuf {
        let repo = cache.join(format!("models--{}", id.replace('/', "--")));
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        for r in refs {
            std::fs::write(repo.join("refs").join(r), commit).unwrap();
        }
        snap
    }

    #[test]
    fn hub_ids_resolve_through_refs_and_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let main = snapshot(&b, "meta-llama/Llama-3.1-8B", "abc123", &["main"]);
        let tagged = snapshot(&b, "meta-llama/Llama-3.1-8B", "def456", &["v1.0"]);
        std::fs::create_dir_all(&a).unwrap();
        let caches = [a, b.clone()];
        assert_eq!(
            resolve_in("meta-llama/Llama-3.1-8B", &caches).unwrap(),
            main
        );
        assert_eq!(
            resolve_in("meta-llama/Llama-3.1-8B@v1.0", &caches).unwrap(),
            tagged
        );
        assert_eq!(
            resolve_in("meta-llama/Llama-3.1-8B@def456", &caches).unwrap(),
            tagged
        );
        let e = resolve_in("meta-llama/Llama-3.1-8B@v2", &caches)
            .unwrap_err()
            .to_string();
        assert!(e.contains("revision `v2`") && e.contains("abc123"), "{e}");
        let e = resolve_in("org/missing", &caches).unwrap_err().to_string();
        assert!(
            e.contains("models--org--missing") && e.contains(&b.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn paths_are_not_hub_ids() {
        assert!(looks_like_hub_id("org/name"));
        assert!(looks_like_hub_id("gpt2@main"));
        assert!(!looks_like_hub_id("./org/name"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
        assert_eq!(resolve_model("./x/y").unwrap(), PathBuf::from("./x/y"));
    }
}
