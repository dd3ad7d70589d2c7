//! The factor cache: reused when inputs are unchanged, recomputed when an expert changes, and
//! a corrupted file is detected and rebuilt rather than trusted.

mod common;

use std::path::Path;

use common::{copy_dir, testdata};
use cycleqd_engine::evolve::{CacheStatus, ExpertSet, Rank};
use cycleqd_engine::model::{export_tensors, HostTensor, ModelStore};

fn build(set_dir: &Path, cache: &Path) -> ExpertSet {
    let open = |n: &str| ModelStore::open_llama(set_dir.join(n)).unwrap();
    ExpertSet::build_cached(
        open("base"),
        vec![open("expert_a"), open("expert_b"), open("expert_c")],
        Rank::Truncated(8),
        Some(cache),
    )
    .unwrap()
}

fn cache_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn cache_is_reused_invalidated_and_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let set_dir = tmp.path().join("set");
    for m in ["base", "expert_a", "expert_b", "expert_c"] {
        copy_dir(&testdata().join("merge/set").join(m), &set_dir.join(m));
    }
    let cache = tmp.path().join("cache");

    let first = build(&set_dir, &cache);
    assert_eq!(first.cache_status, CacheStatus::Miss);
    assert_eq!(cache_files(&cache).len(), 1);
    let again = build(&set_dir, &cache);
    assert_eq!(again.cache_status, CacheStatus::Hit);
    for (a, b) in first.tensors.iter().zip(&again.tensors) {
        assert_eq!(a.factors, b.factors, "{}", a.name);
        assert_eq!(a.relative_error, b.relative_error, "{}", a.name);
    }

    // A corrupted cache file is detected by its checksum and rebuilt.
    let file = cache_files(&cache)[0].clone();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let rebuilt = build(&set_dir, &cache);
    assert!(
        matches!(&rebuilt.cache_status, CacheStatus::Rebuilt(why) if why.contains("checksum")),
        "{:?}",
        rebuilt.cache_status
    );
    assert_eq!(build(&set_dir, &cache).cache_status, CacheStatus::Hit);

    // So is an edit of its metadata (the checksum covers it): a recorded error changed.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(b"\"relative_errors\"".len())
        .position(|w| w == b"\"relative_errors\"")
        .expect("the header records the errors");
    let digit = at + bytes[at..].iter().position(|b| b.is_ascii_digit()).unwrap();
    bytes[digit] = if bytes[digit] == b'7' { b'8' } else { b'7' };
    std::fs::write(&file, &bytes).unwrap();
    assert!(matches!(
        build(&set_dir, &cache).cache_status,
        CacheStatus::Rebuilt(why) if why.contains("checksum")
    ));
    assert_eq!(build(&set_dir, &cache).cache_status, CacheStatus::Hit);

    // Changing an expert's weights changes the key: the factors are recomputed.
    let store = ModelStore::open(set_dir.join("expert_b")).unwrap();
    let tensors: Vec<(String, HostTensor)> = store
        .names()
        .map(|n| {
            let t = store.tensor(n).unwrap();
            let v: Vec<f32> = t.to_f32().iter().map(|x| x * 1.01).collect();
            (
                n.to_string(),
                HostTensor::from_f32(&v, t.shape.clone(), t.dtype),
            )
        })
        .collect();
    let cfg = store.config().to_json_with_dtype(store.dominant_dtype());
    let src = set_dir.join("expert_b");
    drop(store);
    export_tensors(&src, &tensors, &cfg, None, u64::MAX).unwrap();
    let changed = build(&set_dir, &cache);
    assert_eq!(changed.cache_status, CacheStatus::Miss);
    assert_eq!(cache_files(&cache).len(), 2);
    assert_ne!(changed.tensors[1].factors, first.tensors[1].factors);
}
