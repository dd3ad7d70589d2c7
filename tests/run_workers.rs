//! Several workers on one run, through the CLI on the synthetic demo: the batch schedule gives
//! the same archives for any number of workers, a run SIGKILLed or stopped by SIGINT resumes to
//! the uninterrupted run's archives, a locked run folder is refused, and a run folder's paths
//! work from anywhere.

mod common;

use std::path::Path;

use common::{
    assert_same_archives, bin, demo, events, read, run, run_with, set_key, stderr, with_evolution,
};

const TASKS: [&str; 3] = ["alpha", "beta", "gamma"];

/// Runs until the process signals itself with `sig` right after applying child `at`
/// (`CYCLEQD_SIGNAL_AT`: a chosen point, not a race); returns the exit code (`None` when the
/// signal killed it).
fn signal_at(cfg: &Path, out: &Path, args: &[&str], at: usize, sig: &str) -> Option<i32> {
    let o = bin()
        .args(["run", "--config", cfg.to_str().unwrap(), "--out"])
        .arg(out)
        .args(args)
        .env("CYCLEQD_SIGNAL_AT", format!("{at}:{sig}"))
        .output()
        .unwrap();
    o.status.code()
}

#[test]
fn two_workers_give_the_archives_of_one_at_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| {
        with_evolution(set_key(t, "generations", "96"), "batch = 4")
    });
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_with(&cfg, &one, &["--workers", "1", "--device", "cpu"]);
    run_with(&cfg, &two, &["--workers", "2", "--device", "cpu"]);
    assert_same_archives(&one, &two, &TASKS);
    assert_eq!(
        events(&one),
        events(&two),
        "events (timings and workers aside)"
    );
    // Both workers did work.
    let text = String::from_utf8(read(&two.join("events.jsonl"))).unwrap();
    for w in ["\"worker\":\"cpu:0\"", "\"worker\":\"cpu:1\""] {
        assert!(text.contains(w), "no child ran on {w}");
    }
    // The resolved batch is recorded with the run.
    let saved = std::fs::read_to_string(two.join("config.toml")).unwrap();
    assert!(saved.contains("batch = 4"), "{saved}");
}

#[test]
fn resume_after_sigkill_with_two_workers_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints every 9 children fall inside batches of 4: children in flight are saved.
    let cfg = demo(dir.path(), |t| {
        with_evolution(
            set_key(set_key(t, "generations", "160"), "checkpoint_every", "9"),
            "batch = 4\nworkers = 2",
        )
    });
    let whole = dir.path().join("whole");
    run_with(&cfg, &whole, &["--device", "cpu"]);

    let cut = dir.path().join("cut");
    let mut kills = 0;
    for at in [1usize, 30, 31, 90, 130] {
        if signal_at(&cfg, &cut, &["--device", "cpu"], at, "KILL").is_none() {
            kills += 1;
        }
    }
    assert_eq!(kills, 5, "every kill landed mid-run");
    run_with(&cfg, &cut, &["--device", "cpu"]);
    assert_same_archives(&whole, &cut, &TASKS);
    assert_eq!(events(&whole), events(&cut), "events.jsonl differs");
    let children: Vec<u64> = events(&cut)
        .iter()
        .map(|e| e["child"].as_u64().unwrap())
        .collect();
    assert_eq!(
        children,
        (1..=160).collect::<Vec<_>>(),
        "each child once, in order"
    );

    // A finished run is not redone: the same command prints its table again.
    let again = run_with(&cfg, &cut, &["--device", "cpu"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("← final/"));
    assert_eq!(events(&cut).len(), 160);
}

#[test]
fn sigint_stops_with_a_checkpoint_and_the_run_resumes_to_the_same_archives() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| {
        with_evolution(set_key(t, "generations", "120"), "batch = 4\nworkers = 2")
    });
    let whole = dir.path().join("whole");
    run_with(&cfg, &whole, &["--device", "cpu"]);

    let cut = dir.path().join("cut");
    let code = signal_at(&cfg, &cut, &["--device", "cpu"], 20, "INT");
    assert_eq!(code, Some(130), "a run stopped by SIGINT exits 128 + 2");
    let stopped = events(&cut).len();
    assert!(
        (20..120).contains(&stopped),
        "{stopped} children before the stop"
    );
    assert!(cut.join("checkpoint.safetensors").is_file());
    assert!(
        !cut.join("summary.json").exists(),
        "no outputs of an unfinished run"
    );
    run_with(&cfg, &cut, &["--device", "cpu"]);
    assert_same_archives(&whole, &cut, &TASKS);
    assert_eq!(events(&whole), events(&cut));
}

#[test]
fn a_locked_run_folder_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| set_key(t, "generations", "4"));
    let out = dir.path().join("run");
    let held = cycleqd_engine::run::RunLock::acquire(&out).unwrap();
    let o = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("another run is using this folder"),
        "{e}"
    );
    let files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, [".lock"], "the refused run wrote nothing");
    drop(held);
    run_with(&cfg, &out, &[]);
}

#[test]
fn run_folders_made_from_relative_paths_work_from_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path(), |t| set_key(t, "generations", "6"));
    // A user in `dir` runs `run --config demo/cycleqd.toml --out runs/r`, then moves away.
    let o = bin()
        .current_dir(dir.path())
        .args(["run", "--config", "demo/cycleqd.toml", "--out", "runs/r"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = std::fs::read_to_string(dir.path().join("runs/r/config.toml")).unwrap();
    assert!(
        saved.contains(&format!("base = \"{}", dir.path().display())),
        "absolute paths in the run folder: {saved}"
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let o = bin()
        .current_dir(elsewhere.path())
        .arg("export")
        .arg(dir.path().join("runs/r"))
        .args(["--final", "--out", "x"])
        .output()
        .unwrap();
    assert!(o.status.success(), "export from elsewhere: {}", stderr(&o));
    assert!(
        read(&elsewhere.path().join("x/model.safetensors"))
            == read(&dir.path().join("runs/r/final/model.safetensors"))
    );
}

#[test]
fn the_demo_runs_with_an_out_folder_and_no_config() {
    let dir = tempfile::tempdir().unwrap();
    for out in ["first", "second"] {
        let o = bin()
            .current_dir(dir.path())
            .args(["run", "--out", out, "--generations", "5"])
            .output()
            .unwrap();
        assert!(o.status.success(), "run --out {out}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(&format!("run folder: {out}")), "says where: {e}");
        assert!(
            !e.contains("Full") && !e.contains("Miss"),
            "no debug names: {e}"
        );
        assert!(dir
            .path()
            .join(out)
            .join("final/model.safetensors")
            .is_file());
    }
    assert!(dir.path().join("cycleqd-demo/cycleqd.toml").is_file());
}

#[test]
fn the_steady_schedule_runs_each_child_once_and_names_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| {
        with_evolution(set_key(t, "generations", "40"), "schedule = \"steady\"")
    });
    let out = dir.path().join("run");
    run_with(&cfg, &out, &["--workers", "2", "--device", "cpu"]);
    let text = String::from_utf8(read(&out.join("events.jsonl"))).unwrap();
    let mut children = vec![];
    let mut workers = std::collections::BTreeSet::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        children.push(v["child"].as_u64().unwrap());
        workers.insert(v["worker"].as_str().unwrap().to_string());
    }
    children.sort();
    assert_eq!(children, (1..=40).collect::<Vec<_>>());
    assert_eq!(workers.into_iter().collect::<Vec<_>>(), ["cpu:0", "cpu:1"]);
    let summary: serde_json::Value =
        serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["children"], 40);
    assert_eq!(summary["timing"]["schedule"], "steady");
}

#[test]
fn temporaries_left_by_killed_writers_are_removed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| set_key(t, "generations", "4"));
    let out = dir.path().join("run");
    std::fs::create_dir_all(out.join("archives")).unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let stale = [
        out.join(format!(".final.tmp-{pid}-77")),
        out.join(format!("checkpoint.tmp-{pid}")),
        out.join("archives").join(format!("genomes.tmp-{pid}")),
    ];
    std::fs::create_dir_all(&stale[0]).unwrap();
    std::fs::write(stale[0].join("model.safetensors"), vec![0u8; 1000]).unwrap();
    std::fs::write(&stale[1], b"partial").unwrap();
    std::fs::write(&stale[2], b"partial").unwrap();
    let o = run_with(&cfg, &out, &[]);
    for s in &stale {
        assert!(!s.exists(), "{} is still there", s.display());
    }
    assert!(
        stderr(&o).contains("left by a killed run"),
        "{}",
        stderr(&o)
    );
}
