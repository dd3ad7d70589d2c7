//! `bench --device cpu`: the report names the device, measures its ceilings first, and gives
//! every operation a time and a fraction of the ceiling that bounds it.

mod common;

use common::*;

#[test]
fn cpu_bench_reports_every_operation_against_a_measured_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = run(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--out",
        json_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert!(report["device"].as_str().unwrap().starts_with("cpu"));
    let c = &report["ceilings"];
    assert!(c["copy_bytes_per_s"].as_f64().unwrap() > 1e8);
    assert!(c["flops_per_s"].as_f64().unwrap() > 1e8);
    let ops = report["ops"].as_array().unwrap();
    let names: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
    for want in [
        "materialize",
        "factorize",
        "decode batch 1",
        "decode batch 64",
        "decode batch 256",
        "prefill",
        "attention",
        "evaluate",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} missing from {names:?}"
        );
    }
    for o in ops {
        let secs = o["seconds"].as_f64().unwrap();
        assert!(secs > 0.0 && secs.is_finite(), "{o}");
        // Fractions of a measured ceiling: every operation has one (the evaluation's is its
        // floor — prefill at the FLOP peak, then each decode step at its bound — over its
        // time), positive, and not wildly above 1 (a wrong bytes or FLOPs model shows here).
        let f = o["fraction_of_ceiling"].as_f64().unwrap_or(f64::NAN);
        assert!(f > 0.0 && f < 2.0, "{}: fraction {f}", o["op"]);
    }
    // The factorisation's accuracy check compares against the exact SVD's optimum.
    let fact = ops
        .iter()
        .find(|o| o["op"].as_str().unwrap().starts_with("factorize"))
        .unwrap();
    for e in fact["detail"]["error_vs_exact"].as_array().unwrap() {
        let (rnd, opt) = (
            e["randomized"].as_f64().unwrap(),
            e["optimal"].as_f64().unwrap(),
        );
        assert!(rnd <= 1.5 * opt + 1e-6, "randomized {rnd} vs optimal {opt}");
    }
}

/// The 8B shape needs ~27 GB on the CPU (16 GB of bf16 weights, then the KV cache of 256
/// sequences): on a machine with less available it is refused up front in one line naming
/// the need and what is free, rather than killed for memory half-way.
#[test]
fn an_8b_cpu_bench_that_does_not_fit_is_refused_in_one_line() {
    let avail = cycleqd_engine::backend::cpu::available_memory();
    if avail.is_none_or(|a| a > 26_000_000_000) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED an_8b_cpu_bench_that_does_not_fit_is_refused_in_one_line: {avail:?} bytes \
             available, enough that the 8B bench would run"
        );
        return;
    }
    let out = run(&["bench", "--device", "cpu", "--shape", "llama3-8b"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("needs about") && err.contains("weights 16.1 GB") && err.contains("available"),
        "{err}"
    );
}
