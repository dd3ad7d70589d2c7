//! `cycleqd-engine run` end to end on the synthetic demo: resume after SIGKILL equals an
//! uninterrupted run, the outputs are complete and loadable, and bad inputs fail cleanly (or,
//! for a failing external evaluator, mark the child failed and go on).

mod common;

use common::{demo, events, read, run, run_to_end, set_key, stderr};
use cycleqd_engine::model::ModelStore;

#[test]
fn a_run_writes_loadable_outputs_and_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| set_key(t, "generations", "60"));
    let out = dir.path().join("run");
    let o = run_to_end(&cfg, &out);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    for row in [
        "base",
        "expert alpha",
        "linear merge",
        "task arithmetic λ=0.5",
        "task arithmetic λ=1",
        "TIES",
        "CycleQD softmax merge",
        "CycleQD best-mean elite",
        "← final/",
    ] {
        assert!(table.contains(row), "table lacks `{row}`:\n{table}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["children"], 60);
    assert_eq!(summary["table"].as_array().unwrap().len(), 1 + 3 + 4 + 2);
    // `eval` scores final/ by what it generates: a task whose answers are final/'s own
    // greedy continuations (from `generate`) scores 1, the same prompts with other answers 0.
    let demo_dir = cfg.parent().unwrap();
    let heldout = std::fs::read_to_string(demo_dir.join("tasks/beta.heldout.jsonl")).unwrap();
    let prompts: Vec<String> = heldout
        .lines()
        .filter(|l| !l.starts_with("{\"settings\""))
        .take(3)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let (mut own, mut other) = (String::new(), String::new());
    for p in &prompts {
        let o = run(&[
            "generate",
            "--model",
            out.join("final").to_str().unwrap(),
            "--prompt",
            p,
            "--max-new-tokens",
            "1",
            "--json",
        ]);
        assert!(o.status.success(), "generate: {}", stderr(&o));
        let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let text = g["text"].as_str().unwrap().trim().to_string();
        own.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p, "answer": text})
        ));
        other.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p, "answer": format!("not-{text}")})
        ));
    }
    for (answers, want) in [(own, 1.0), (other, 0.0)] {
        let task = dir.path().join("own.jsonl");
        std::fs::write(&task, answers).unwrap();
        let o = run(&[
            "eval",
            "--model",
            out.join("final").to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--max-new-tokens",
            "1",
            "--json",
        ]);
        assert!(o.status.success(), "eval: {}", stderr(&o));
        let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(e["score"], want, "{e}");
    }

    ModelStore::open_llama(out.join("final"))
        .unwrap()
        .validate_llama()
        .unwrap();
    assert!(out.join("final/tokenizer.json").is_file());
    for f in [
        "curves.json",
        "curves.png",
        "archive_alpha.png",
        "archive_gamma.png",
    ] {
        let b = read(&out.join("report").join(f));
        assert!(b.len() > 100, "report/{f} is nearly empty");
    }
    assert!(read(&out.join("report/curves.png")).starts_with(b"\x89PNG"));

    // export --final reproduces final/ from its genome; an elite exports too.
    let again = dir.path().join("again");
    let o = run(&[
        "export",
        out.to_str().unwrap(),
        "--final",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "export: {}", stderr(&o));
    assert_eq!(
        read(&again.join("model.safetensors")),
        read(&out.join("final/model.safetensors"))
    );
    // Any elite of an archive exports; an id no archive holds is a clean error.
    let alpha: serde_json::Value =
        serde_json::from_slice(&read(&out.join("archives/alpha.json"))).unwrap();
    let elite = alpha["elites"][0]["id"].as_str().unwrap();
    let o = run(&[
        "export",
        out.to_str().unwrap(),
        "--elite",
        elite,
        "--out",
        dir.path().join("elite").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "export --elite {elite}: {}", stderr(&o));
    ModelStore::open_llama(dir.path().join("elite")).unwrap();
    let o = run(&[
        "export",
        out.to_str().unwrap(),
        "--elite",
        "child-0",
        "--out",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("no genome `child-0`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_run_inputs_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| set_key(t, "generations", "5"));
    let demo_dir = cfg.parent().unwrap().to_path_buf();
    let original = std::fs::read_to_string(&cfg).unwrap();
    let fitness = demo_dir.join("tasks/alpha.fitness.jsonl");
    let good_fitness = std::fs::read_to_string(&fitness).unwrap();
    let bad_line = format!("{good_fitness}{{\"prompt\": 3}}\n");
    let at_line = format!("alpha.fitness.jsonl:{}", good_fitness.lines().count() + 1);
    let long_prompt = format!(
        "{good_fitness}{{\"prompt\": \"{}\", \"answer\": \"x\"}}\n",
        "d07 ".repeat(5000)
    );
    let long_at = format!("alpha.fitness.jsonl:{}", good_fitness.lines().count() + 1);
    let bad_regex = original.replacen(
        "metric = \"exact_match\"",
        "metric = \"regex\"\npattern = \"(unclosed\"",
        1,
    );
    let bad_range = original.replacen(
        "max_new_tokens = 1",
        "max_new_tokens = 1\nmeasure_range = [0.5, 0.2]",
        1,
    );
    // (what, cycleqd.toml, alpha's fitness file, expected in the error)
    let cases = [
        (
            "unknown key",
            original.replace("bins = 15", "binz = 15"),
            good_fitness.clone(),
            "unknown field `binz`",
        ),
        (
            "missing expert",
            original.replace("experts/beta", "experts/nope"),
            good_fitness.clone(),
            "experts/nope",
        ),
        (
            "range lo >= hi",
            bad_range,
            good_fitness.clone(),
            "measure_range",
        ),
        (
            "invalid task line",
            original.clone(),
            bad_line,
            at_line.as_str(),
        ),
        (
            "a prompt longer than the model",
            original.clone(),
            long_prompt,
            long_at.as_str(),
        ),
        (
            "a regex that does not compile",
            bad_regex,
            good_fitness.clone(),
            "invalid regex `(unclosed`",
        ),
        (
            "empty task",
            original.clone(),
            "\n".to_string(),
            "no examples",
        ),
    ];
    let cases = cases.into_iter().chain([(
        "one bin per measure",
        original.replace("bins = 15", "bins = 1"),
        good_fitness.clone(),
        "two parents",
    )]);
    for (what, config_text, fitness_text, want) in cases {
        std::fs::write(&cfg, config_text).unwrap();
        std::fs::write(&fitness, fitness_text).unwrap();
        let out = dir.path().join(format!("out-{}", what.replace(' ', "-")));
        let o = run(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {e}");
        assert!(e.contains(want), "{what}: `{e}` lacks `{want}`");
        let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{what}: not one error line: {e}");
        assert!(errors[0].contains(want), "{what}: {e}");
        assert!(!e.contains("panicked"), "{what}: {e}");
    }
    // Output folders that would clobber an input: the demo folder holds the base, and a
    // folder inside an expert would nest the run in a model.
    std::fs::write(&cfg, &original).unwrap();
    std::fs::write(&fitness, &good_fitness).unwrap();
    for (out, want) in [
        (demo_dir.clone(), "holds the input"),
        (demo_dir.join("experts/alpha/run"), "is inside the input"),
        (fitness.clone(), "is an existing file"),
    ] {
        let before = std::fs::read_dir(&demo_dir).unwrap().count();
        let o = run(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {e}", out.display());
        assert!(e.contains(want) && e.lines().count() == 1, "{e}");
        assert_eq!(std::fs::read_dir(&demo_dir).unwrap().count(), before);
        assert!(!demo_dir.join("experts/alpha/run").exists());
    }
}

#[test]
fn children_whose_weights_overflow_fail_and_the_run_goes_on() {
    // A mutation step of 3e38 gives children whose forward pass overflows: each is marked
    // failed with the reason (never scored 0 from NaN logits), and the run still finishes.
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| {
        set_key(set_key(t, "generations", "6"), "mutation_w_max", "3e38")
    });
    let out = dir.path().join("run");
    run_to_end(&cfg, &out);
    let ev = events(&out);
    assert_eq!(ev.len(), 6);
    for e in &ev {
        let why = e["failed"]
            .as_str()
            .unwrap_or_else(|| panic!("not failed: {e}"));
        assert!(why.contains("not finite or overflow"), "{why}");
        assert!(e["scores"].is_null(), "{e}");
    }
    assert!(out.join("final/model.safetensors").is_file());
}

#[test]
fn failing_external_evaluators_mark_children_failed_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Experts score; children crash, hang (killed at the timeout) or print garbage in turn.
    let script = dir.path().join("ev.sh");
    std::fs::write(
        &script,
        "case \"$1\" in\n\
         *child-1) echo boom >&2; exit 3;;\n\
         *child-2) sleep 20;;\n\
         *child-3) echo 'not json'; exit 0;;\n\
         esac\n\
         echo '{\"score\": 0.5}'\n",
    )
    .unwrap();
    let script_s = script.to_str().unwrap().to_string();
    let cfg = demo(dir.path(), |t| {
        let t = set_key(t, "generations", "5");
        // Task gamma is scored by the script instead of its JSONL file.
        t.replace(
            "fitness = \"tasks/gamma.fitness.jsonl\"\nheldout = \"tasks/gamma.heldout.jsonl\"",
            &format!(
                "evaluator = [\"sh\", \"{script_s}\", \"{{model}}\"]\nevaluator_timeout_s = 1.0"
            ),
        )
    });
    assert!(std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("evaluator = "));
    let out = dir.path().join("run");
    // The hang is cut at the timeout: its failure says so (below), and the run ends.
    let o = run_to_end(&cfg, &out);
    let ev = events(&out);
    assert_eq!(ev.len(), 5);
    for (i, want) in [(0, "boom"), (1, "timed out"), (2, "not JSON")] {
        let f = ev[i]["failed"]
            .as_str()
            .unwrap_or_else(|| panic!("child {} not failed", i + 1));
        assert!(f.contains(want), "child {}: {f}", i + 1);
        assert!(ev[i]["scores"].is_null());
    }
    assert!(ev[3]["failed"].is_null() && ev[3]["scores"][2] == 0.5);
    let summary: serde_json::Value =
        serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["failed_children"], 3);
    assert!(String::from_utf8_lossy(&o.stdout).contains("gamma(external)"));
}

#[test]
fn a_run_with_very_many_bins_draws_heatmaps_of_bounded_size() {
    // 10^5 bins per measure is 10^10 cells: the archives are sparse, and a heatmap shows
    // blocks of bins instead of allocating a square per cell.
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| {
        set_key(set_key(t, "generations", "3"), "bins", "100000")
    });
    let out = dir.path().join("run");
    run_to_end(&cfg, &out);
    let png = read(&out.join("report/archive_alpha.png"));
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert!(w <= 2000 && h <= 2000, "{w}×{h}");
}
