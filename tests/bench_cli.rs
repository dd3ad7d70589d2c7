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
        // Fractions of a measured ceiling: positive, and not wildly above 1 (a wrong bytes or
        // FLOPs model would show here). The end-to-end evaluation has no single bound (null).
        if let Some(f) = o["fraction_of_ceiling"].as_f64() {
            assert!(f > 0.0 && f < 2.0, "{}: fraction {f}", o["op"]);
        }
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
