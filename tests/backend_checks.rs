//! Bad calls into a backend are errors naming the op, never panics or writes out of bounds,
//! and the CPU reference refuses exactly what the CUDA backend refuses (one check per op,
//! `backend::checks`). Runs on the CPU here and on a GPU where there is one.

mod common;

use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::{cuda_unavailable_reason, CudaBackend};
use cycleqd_engine::backend::{AttentionGeometry, Backend};
use cycleqd_engine::model::{DType, HostTensor};

/// Each bad call with what its error must say.
fn bad_calls<B: Backend>(be: &B) -> Vec<(&'static str, cycleqd_engine::Result<()>, &'static str)> {
    let w = |n: usize| {
        be.upload_weight(&HostTensor::from_f32(&vec![0.5; n], vec![n], DType::F32))
            .unwrap()
    };
    let buf = |n: usize| be.zeros(n).unwrap();
    let kv = |n: usize| be.kv_zeros(n, DType::F32).unwrap();
    let geom = AttentionGeometry {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        max_seq: 4,
    };
    vec![
        (
            "embedding id past the vocab",
            be.embedding(&mut buf(16), &w(32), &[1, 4], 8),
            "token id 4",
        ),
        (
            "rms_norm weight of the wrong length",
            be.rms_norm(&mut buf(16), &buf(16), &w(7), 2, 8, 1e-5),
            "weight of 7",
        ),
        (
            "rope with too few frequencies",
            be.rope(&mut buf(32), &[0, 1], 2, 8, &[1.0, 0.5]),
            "2 inverse frequencies",
        ),
        (
            "kv_store past the cache",
            be.kv_store(&mut kv(64), &buf(16), &[0, 1], &[1, 4], 4, 8),
            "position 4",
        ),
        (
            "kv_store, two rows for one cache row",
            be.kv_store(&mut kv(64), &buf(16), &[1, 1], &[2, 2], 4, 8),
            "two rows write slot 1 position 2",
        ),
        (
            "kv_store slots and positions differ in length",
            be.kv_store(&mut kv(64), &buf(16), &[0, 1], &[1], 4, 8),
            "2 slots but 1 positions",
        ),
        (
            "attention heads that do not group",
            {
                let g = AttentionGeometry {
                    num_kv_heads: 3,
                    ..geom
                };
                be.attention(&mut buf(32), &buf(32), &kv(64), &kv(64), &[0], &[0], g)
            },
            "4 heads over 3 KV heads",
        ),
        (
            "attention in a slot past the cache",
            be.attention(&mut buf(32), &buf(32), &kv(64), &kv(64), &[3], &[0], geom),
            "needs",
        ),
        (
            "attention position past the cache",
            be.attention(&mut buf(32), &buf(32), &kv(256), &kv(256), &[0], &[4], geom),
            "position 4",
        ),
        (
            "argmax over rows of no logits",
            be.argmax_rows(&mut [0u32; 2], &buf(0), 2, 0),
            "zero logits",
        ),
    ]
}

fn check<B: Backend>(be: &B) {
    for (what, r, want) in bad_calls(be) {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{}: {what} was accepted", be.name()))
            .to_string();
        assert!(
            e.contains(want),
            "{}: {what}: `{e}` lacks `{want}`",
            be.name()
        );
    }
}

#[test]
fn bad_calls_are_refused_alike_by_every_backend() {
    check(&CpuBackend);
    match cuda_unavailable_reason() {
        None => check(&CudaBackend::open(0).expect("a GPU is present")),
        Some(why) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED bad_calls on CUDA: {why}");
        }
    }
}
