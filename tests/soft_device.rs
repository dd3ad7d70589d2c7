//! Every CUDA kernel executed in every CI run: the software device (softcuda: the kernels
//! compiled as host C++ under AddressSanitizer and UndefinedBehaviorSanitizer, one host thread
//! per CUDA thread, blocks in a shuffled order, shared memory poisoned) runs the case table
//! with the launch descriptions the GPU gets, against the CPU backend. A kernel without a case
//! fails the suite; so does a description that passes the wrong argument sizes.

mod common;

use std::collections::BTreeSet;

use common::kernel_cases::{cases, compare, on_backend, on_soft, Soft};
use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::backend::cuda::launch;

#[test]
fn every_kernel_matches_the_cpu_on_the_software_device() {
    let mut soft = Soft::start();
    eprintln!("softcuda sanitizers: {}", softcuda::SANITIZERS);
    let mut failures = vec![];
    let table = cases();
    for case in &table {
        let want = on_backend(&CpuBackend, case);
        match on_soft(&mut soft, case) {
            Ok(got) => {
                if let Err(e) = compare(case, &got, &want) {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );

    // Every kernel of kernels/ ran, and every kernel the descriptions launch exists there.
    let built: BTreeSet<String> = soft
        .device
        .kernels()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .filter(|n| !n.starts_with("softcuda_selftest_"))
        .collect();
    let untested: Vec<&String> = built.difference(&soft.used).collect();
    assert!(untested.is_empty(), "kernels without a case: {untested:?}");
    for (_, name) in launch::kernel_names() {
        assert!(
            built.contains(&name),
            "`{name}` is launched but not in kernels/"
        );
    }
}

#[test]
fn the_software_device_catches_what_it_promises_to() {
    let mut soft = Soft::start();
    // An out-of-bounds read: add_assign over one value more than the buffers hold.
    let l = launch::elementwise("add_assign", 101).unwrap();
    let mut bufs = vec![vec![0u8; 400], vec![0u8; 400]];
    let e = soft.run(&l, &mut bufs).unwrap_err();
    if softcuda::SANITIZERS != "none" {
        assert!(e.contains("heap-buffer-overflow"), "{e}");
    }
    // The device restarts after a report: the next launch runs.
    let l = launch::elementwise("add_assign", 100).unwrap();
    soft.run(&l, &mut bufs).unwrap();
    // A misaligned 16-byte load is reported; an aligned one runs.
    let geometry = softcuda::Geometry {
        grid: [1, 1, 1],
        block: [1, 1, 1],
        shared_bytes: 0,
        order_seed: 0,
    };
    let ptr = |buf, offset| softcuda::Arg::Buf { buf, offset };
    let mut bufs = vec![vec![0u8; 4], vec![0u8; 32]];
    let load = "softcuda_selftest_vector_load";
    soft.device
        .launch(load, &geometry, &[ptr(0, 0), ptr(1, 16)], &mut bufs)
        .unwrap();
    let e = soft
        .device
        .launch(load, &geometry, &[ptr(0, 0), ptr(1, 4)], &mut bufs)
        .unwrap_err();
    if softcuda::SANITIZERS != "none" {
        assert!(e.contains("misaligned address"), "{e}");
    }
    // Shared memory is poisoned before every block.
    let mut bufs = vec![vec![0u8; 16]];
    let g4 = softcuda::Geometry {
        grid: [4, 1, 1],
        block: [32, 1, 1],
        ..geometry.clone()
    };
    soft.device
        .launch(
            "softcuda_selftest_shared_poison",
            &g4,
            &[ptr(0, 0)],
            &mut bufs,
        )
        .unwrap();
    assert!(bufs[0].iter().all(|&b| b == 0xff), "{:?}", bufs[0]);
    // Blocks run in a shuffled order when asked, in order otherwise.
    let order = |seed: u64, soft: &mut Soft| -> Vec<u32> {
        let mut bufs = vec![vec![0u8; 64 * 4], vec![0u8; 4]];
        let g = softcuda::Geometry {
            grid: [64, 1, 1],
            block: [1, 1, 1],
            shared_bytes: 0,
            order_seed: seed,
        };
        soft.device
            .launch(
                "softcuda_selftest_block_order",
                &g,
                &[ptr(0, 0), ptr(1, 0)],
                &mut bufs,
            )
            .unwrap();
        bufs[0]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(order(0, &mut soft), (0..64).collect::<Vec<_>>());
    let shuffled = order(7, &mut soft);
    assert_ne!(shuffled, (0..64).collect::<Vec<_>>());
    let mut sorted = shuffled.clone();
    sorted.sort();
    assert_eq!(sorted, (0..64).collect::<Vec<_>>(), "every block ran once");
    // An argument of the wrong size is refused before anything runs.
    let mut l = launch::elementwise("add_assign", 100).unwrap();
    l.args[2] = launch::Arg::U32(100);
    let mut bufs = vec![vec![0u8; 400], vec![0u8; 400]];
    let e = soft.run(&l, &mut bufs).unwrap_err();
    assert!(e.contains("argument 2") && e.contains("8"), "{e}");
    // Divergent shuffles are reported, not hung: argmax in a partial warp.
    let mut l = launch::argmax_rows(1, 10).unwrap().unwrap();
    l.block = [40, 1, 1];
    let mut bufs = vec![vec![0u8; 4], vec![0u8; 40]];
    let e = soft.run(&l, &mut bufs).unwrap_err();
    assert!(e.contains("partial warp"), "{e}");
}

#[test]
fn kv_store_refuses_two_rows_for_one_cache_row() {
    let e = launch::kv_store(&[0, 1, 0], &[3, 3, 3], 8, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("slot 0 position 3"), "{e}");
    assert!(launch::kv_store(&[0, 1, 0], &[3, 3, 4], 8, 4).is_ok());
}
