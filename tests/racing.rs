//! Racing through the CLI on the demo: children stopped early entered nothing and say so,
//! every child that entered an archive was scored on every example, per-example results are
//! in the events and the archives, and a raced run is the same for any number of workers and
//! after a SIGKILL (the bounds a child races against travel with it, in checkpoints too).

mod common;

use common::{
    assert_same_archives, demo, events, read, run, run_with, set_key, stderr, with_evolution,
};
use serde_json::Value;

/// The demo, raced, with 2 bins per measure (the archives fill within a few dozen children,
/// so racing has cells to rule out).
fn raced_demo(dir: &std::path::Path) -> std::path::PathBuf {
    demo(dir, |t| {
        let t = set_key(
            set_key(set_key(t, "generations", "60"), "bins", "2"),
            "checkpoint_every",
            "10",
        );
        with_evolution(t, "evaluation = \"racing\"\nracing_batch = 8\nbatch = 4")
    })
}

#[test]
fn stopped_children_entered_nothing_and_entering_ones_were_scored_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = raced_demo(dir.path());
    let out = dir.path().join("raced");
    run_with(&cfg, &out, &["--workers", "1"]);
    let evs: Vec<Value> = String::from_utf8(read(&out.join("events.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut stopped = 0;
    for e in &evs {
        let scored: Vec<u64> = serde_json::from_value(e["examples_scored"].clone()).unwrap();
        let full: Vec<u64> = serde_json::from_value(e["examples_full"].clone()).unwrap();
        assert_eq!(full, vec![96, 96, 96], "{e}");
        assert!(scored.iter().zip(&full).all(|(s, f)| s <= f), "{e}");
        // Per-example results, one character per example, '.' where not scored.
        for task in ["alpha", "beta", "gamma"] {
            let bits = e["examples"][task].as_str().unwrap();
            assert_eq!(bits.len(), 96);
            let counted = bits.chars().filter(|&c| c != '.').count() as u64;
            let k = ["alpha", "beta", "gamma"]
                .iter()
                .position(|t| *t == task)
                .unwrap();
            assert_eq!(counted, scored[k], "{e}");
        }
        if e["estimates"].is_array() {
            stopped += 1;
            assert!(
                e["scores"].is_null() && e["entered"].as_object().unwrap().is_empty(),
                "{e}"
            );
            assert!(scored.iter().sum::<u64>() < 288, "{e}");
            // Rounds of 8, 16, 32 (`racing_growth` 2 by default): it stopped at a round's end.
            assert!(
                scored.iter().all(|s| [8, 24, 56].contains(s)),
                "stopped off a round's end: {e}"
            );
        }
        if !e["entered"].as_object().unwrap().is_empty() {
            assert_eq!(scored, full, "a child entered an archive on estimates: {e}");
            // Its scores are the means of its examples.
            let bits = e["examples"]["alpha"].as_str().unwrap();
            let mean = bits.chars().filter(|&c| c == '1').count() as f64 / 96.0;
            assert!(
                (e["scores"][0].as_f64().unwrap() - mean).abs() < 1e-12,
                "{e}"
            );
        }
    }
    assert!(stopped >= 5, "racing stopped only {stopped} children");
    let summary: Value = serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["stopped_early"], stopped);
    assert!(
        summary["examples_scored"].as_u64().unwrap() < summary["examples_full"].as_u64().unwrap()
    );
    assert_eq!(summary["examples_full"], 60 * 288);
    // The archives' elites carry their examples too.
    let alpha: Value = serde_json::from_slice(&read(&out.join("archives/alpha.json"))).unwrap();
    for el in alpha["elites"].as_array().unwrap() {
        let bits = el["examples"]["alpha"].as_str().unwrap();
        assert!(bits.len() == 96 && !bits.contains('.'), "{el}");
    }
}

#[test]
fn raced_runs_do_not_depend_on_workers_or_crashes() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = raced_demo(dir.path());
    let one = dir.path().join("one");
    run_with(&cfg, &one, &["--workers", "1"]);
    let two = dir.path().join("two");
    run_with(&cfg, &two, &["--workers", "2"]);
    assert_same_archives(&one, &two, &["alpha", "beta", "gamma"]);
    assert_eq!(events(&one), events(&two));
    // Killed after child 33 (children 34..36 of its batch in flight), then resumed.
    let killed = dir.path().join("killed");
    let o = common::bin()
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            killed.to_str().unwrap(),
            "--workers",
            "2",
        ])
        .env("CYCLEQD_SIGNAL_AT", "33:KILL")
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(libc::SIGKILL), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        killed.to_str().unwrap(),
        "--workers",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_archives(&one, &killed, &["alpha", "beta", "gamma"]);
    assert_eq!(events(&one), events(&killed));
}
