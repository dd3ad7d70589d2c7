//! Evaluation end to end: multiple-choice scoring against transformers' own logits, prompts
//! through a chat template against `generate` on the same ids, code scored by running it
//! (reference and wrong completions, pass@k, hostile programs), sampled scoring independent of
//! the batch, a task file's own settings, and bad task input as one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{copy_dir, expected, llama_dir, run, stderr, REFERENCE_MODELS};
use cycleqd_engine::backend::cpu::CpuBackend;
use cycleqd_engine::eval::prompt::{continuation, render};
use cycleqd_engine::eval::{Input, Scoring};
use cycleqd_engine::llama::{score_continuations, LlamaModel};
use cycleqd_engine::model::{read_safetensors_file, ModelStore, Tokenizer};
use serde_json::{json, Value};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/code")
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&v| v as f64 - z).collect()
}

fn run_ok(args: &[&str]) -> std::process::Output {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

fn json_of(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn multiple_choice_log_likelihoods_are_transformers() {
    let mut checked = 0;
    for name in REFERENCE_MODELS {
        let dir = llama_dir(name);
        let store = ModelStore::open_llama(&dir).unwrap();
        let model = LlamaModel::load(&CpuBackend, &store).unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let logits = read_safetensors_file(&dir.join("expected.safetensors")).unwrap();
        let vocab = store.config().vocab_size;
        let tmp = tempfile::tempdir().unwrap();
        let mut lines = vec![];
        let mut decisive = vec![];
        for (i, e) in expected(&dir).iter().enumerate() {
            let all = logits[&format!("logits_{i}")].to_f32();
            let last = log_softmax(&all[(e.ids.len() - 1) * vocab..e.ids.len() * vocab]);
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|a, b| last[*b].total_cmp(&last[*a]));
            // One-token continuations: the engine's log p(c | prompt) is transformers'.
            let cands = [order[0], order[1], order[2], order[vocab / 2]];
            let pairs: Vec<(Vec<u32>, Vec<u32>)> = cands
                .iter()
                .map(|&c| (e.ids.clone(), vec![c as u32]))
                .collect();
            let got = score_continuations(&model, &CpuBackend, &pairs).unwrap();
            for (k, &c) in cands.iter().enumerate() {
                assert!(
                    (got[k][0] as f64 - last[c]).abs() < 1e-4,
                    "{name} prompt {i} token {c}"
                );
                checked += 1;
            }
            // Two greedy tokens: the sum of transformers' recorded log-probabilities.
            let g = &e.greedy_new_ids[..2];
            let two =
                score_continuations(&model, &CpuBackend, &[(e.ids.clone(), g.to_vec())]).unwrap();
            let want = e.greedy_logprobs[0] as f64 + e.greedy_logprobs[1] as f64;
            let sum: f64 = two[0].iter().map(|&v| v as f64).sum();
            assert!(
                (sum - want).abs() < 2e-4,
                "{name} prompt {i}: {sum} vs {want}"
            );

            // The same choice through a task file, where the choice texts round-trip to the
            // candidate tokens (as lm-eval takes continuations).
            let rendered =
                render(&tok, &Scoring::default(), &Input::Prompt(e.text.clone())).unwrap();
            if rendered.ids != e.ids {
                continue;
            }
            let mut choices = vec![];
            for &c in &cands[..3] {
                let text = tok.decode(&[c as u32]).unwrap();
                if continuation(&tok, &rendered, &text).unwrap() == vec![c as u32] {
                    choices.push((text, last[c]));
                }
            }
            if choices.len() < 2 {
                continue;
            }
            // The best first in the reference; put it last in the file.
            choices.rotate_left(1);
            let best = choices.len() - 1;
            decisive.push(
                choices[best].1 - choices[0].1.max(choices[choices.len().saturating_sub(2)].1)
                    > 1e-3,
            );
            lines.push(json!({"prompt": e.text, "choices": choices.iter().map(|c| &c.0).collect::<Vec<_>>(), "answer_index": best}).to_string());
        }
        assert!(!lines.is_empty(), "{name}: no choice example round-trips");
        let task = tmp.path().join("choice.jsonl");
        std::fs::write(&task, lines.join("\n")).unwrap();
        let o = run_ok(&[
            "eval",
            "--model",
            dir.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
        ]);
        let per = json_of(&o)["per_example"].as_array().unwrap().clone();
        for (k, d) in decisive.iter().enumerate() {
            if *d {
                assert_eq!(per[k], 1.0, "{name}: choice example {k}");
            }
        }
    }
    assert!(checked >= 16);
}

/// A copy of a reference model with a chat template whose markers are in its vocabulary.
fn chat_model(tmp: &Path) -> PathBuf {
    let dir = tmp.join("chat-model");
    copy_dir(&llama_dir("tiny-gqa-bf16"), &dir);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
        })
        .to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn chat_prompts_generate_what_generate_gives_for_the_same_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = chat_model(tmp.path());
    let task = tmp.path().join("chat.jsonl");
    std::fs::write(
        &task,
        "{\"settings\": {\"chat_template\": true, \"system\": \"Be brief.\", \"max_new_tokens\": 6, \
         \"fewshot\": [{\"prompt\": \"Name a colour.\", \"answer\": \"Blue.\"}]}}\n\
         {\"prompt\": \"Simple is better than\", \"answer\": \"complex\"}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Readability counts\"}], \"answer\": \"x\"}\n",
    )
    .unwrap();
    let saved = tmp.path().join("completions.jsonl");
    run_ok(&[
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--device",
        "cpu",
        "--save-completions",
        saved.to_str().unwrap(),
    ]);
    let completions: Vec<String> = std::fs::read_to_string(&saved)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["completion"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(completions.len(), 2);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    for (k, msgs) in [
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Simple is better than"}]),
        // A messages line keeps its own messages; the system prompt and few-shot turns come first.
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Readability counts"}]),
    ]
    .iter()
    .enumerate()
    {
        let mf = tmp.path().join(format!("m{k}.json"));
        std::fs::write(&mf, msgs.to_string()).unwrap();
        let rendered = String::from_utf8(run_ok(&["prompt", "--model", dir.to_str().unwrap(), "--messages", mf.to_str().unwrap()]).stdout).unwrap();
        assert!(rendered.starts_with("<|begin_of_text|>system: Be brief.\nuser: Name a colour.\n"), "{rendered}");
        let ids = tok.encode_plain(&rendered).unwrap();
        // The template's BOS is the only one.
        assert_eq!(ids[0], 0);
        assert_ne!(ids[1], 0);
        let ids_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let g = json_of(&run_ok(&["generate", "--model", dir.to_str().unwrap(), "--device", "cpu", "--ids", &ids_arg.join(","), "--max-new-tokens", "6", "--json"]));
        assert_eq!(completions[k], g["text"].as_str().unwrap(), "example {k}");
    }
}

#[test]
fn code_is_scored_by_running_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = examples_dir();
    let task = ex.join("tasks/code.heldout.jsonl");
    let reference = ex.join("completions/reference.heldout.jsonl");
    let score = |completions: &Path, extra: &[&str]| -> Value {
        let mut args = vec![
            "score",
            "--task",
            task.to_str().unwrap(),
            "--completions",
            completions.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        json_of(&run_ok(&args))
    };
    assert_eq!(score(&reference, &[])["score"], 1.0);

    let refs: Vec<String> = std::fs::read_to_string(&reference)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["completion"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let n = refs.len();
    let write = |name: &str, lines: Vec<Value>| -> PathBuf {
        let p = tmp.path().join(name);
        std::fs::write(
            &p,
            lines
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        p
    };
    // A program that returns the wrong thing, and one without a code block (the whole
    // completion is the program): wrong everywhere but on the first example.
    let mut wrong: Vec<Value> = (0..n)
        .map(|_| json!({"completion": "def f():\n    return None"}))
        .collect();
    wrong[0] = json!({"completion": refs[0].replace("```python\n", "").replace("\n```", "")});
    let w = score(&write("wrong.jsonl", wrong), &[]);
    assert!(
        (w["score"].as_f64().unwrap() - 1.0 / n as f64).abs() < 1e-12,
        "{w}"
    );
    assert_eq!(w["per_example"][0], 1.0);

    // Three samples per example, one right: pass@1 = 1/3, pass@2 = 2/3, pass@3 = 1.
    let samples: Vec<Value> = refs
        .iter()
        .map(|r| json!({"completions": ["```python\nraise SystemExit(1)\n```", r, "nonsense ("]}))
        .collect();
    let p = write("samples.jsonl", samples);
    for (k, want) in [("1", 1.0 / 3.0), ("2", 2.0 / 3.0), ("3", 1.0)] {
        let s = score(&p, &["--pass-k", k]);
        assert!(
            (s["score"].as_f64().unwrap() - want).abs() < 1e-12,
            "pass@{k}: {s}"
        );
    }
}

#[test]
fn hostile_completions_score_zero_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let task = tmp.path().join("t.jsonl");
    let canary = tmp.path().join("canary.txt");
    std::fs::write(&canary, "intact").unwrap();
    let me = std::process::id();
    let hostile = [
        "while True:\n    pass".to_string(),
        "import os\nwhile True:\n    os.fork()".to_string(),
        "x = bytearray(8 << 30)".to_string(),
        format!("open({:?}, 'w').write('owned')", canary.display().to_string()),
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)".to_string(),
        format!("import os, signal\nos.kill({me}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)"),
        "import sys\nwhile True:\n    sys.stdout.write('x' * 100000)".to_string(),
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(300)".to_string(),
    ];
    let mut lines =
        vec![json!({"settings": {"metric": "python_tests", "timeout_s": 3}}).to_string()];
    let mut comps = vec![];
    for h in &hostile {
        // Each would pass its test if its sabotage went unnoticed: the test is trivially true.
        lines.push(json!({"prompt": "p", "tests": ["assert True"]}).to_string());
        comps.push(
            json!({"completion": format!("```python\n{h}\nraise SystemExit(3)\n```")}).to_string(),
        );
    }
    std::fs::write(&task, lines.join("\n")).unwrap();
    let cf = tmp.path().join("c.jsonl");
    std::fs::write(&cf, comps.join("\n")).unwrap();
    let t = Instant::now();
    let s = json_of(&run_ok(&[
        "score",
        "--task",
        task.to_str().unwrap(),
        "--completions",
        cf.to_str().unwrap(),
        "--json",
    ]));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_eq!(s["score"], 0.0, "{s}");
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "intact");
    // The sandbox says what it enforced.
    assert!(
        s["sandbox"].as_str().unwrap().starts_with("sandbox: "),
        "{s}"
    );
}

#[test]
fn sampled_scores_do_not_depend_on_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = common::demo(tmp.path(), |t| t);
    let dir = demo.parent().unwrap();
    let task = dir.join("tasks/alpha.heldout.jsonl");
    let model = dir.join("experts/alpha");
    let per = |batch: &str| -> Value {
        json_of(&run_ok(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--device",
            "cpu",
            "--samples",
            "4",
            "--temperature",
            "1.5",
            "--pass-k",
            "2",
            "--batch",
            batch,
            "--json",
        ]))["per_example"]
            .clone()
    };
    let (one, many) = (per("1"), per("64"));
    assert_eq!(one, many);
    // Sampled at that temperature, some examples are neither always right nor always wrong.
    assert!(
        one.as_array().unwrap().iter().any(|v| {
            let v = v.as_f64().unwrap();
            v > 0.0 && v < 1.0
        }),
        "{one}"
    );
}

#[test]
fn a_task_files_own_settings_are_used_and_said() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = common::demo(tmp.path(), |t| t);
    let dir = demo.parent().unwrap();
    let o = run_ok(&[
        "eval",
        "--model",
        dir.join("experts/alpha").to_str().unwrap(),
        "--task",
        dir.join("tasks/alpha.fitness.jsonl").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let said = stderr(&o);
    assert!(said.contains("max_new_tokens=1 (task file)"), "{said}");
    let out = String::from_utf8_lossy(&o.stdout);
    let score: f64 = out
        .split(": ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(score >= 0.9, "{out}");
    // A flag overrides the file, and says so.
    let o = run_ok(&[
        "eval",
        "--model",
        dir.join("experts/alpha").to_str().unwrap(),
        "--task",
        dir.join("tasks/alpha.fitness.jsonl").to_str().unwrap(),
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
        "--stop",
        " ",
    ]);
    assert!(
        stderr(&o).contains("max_new_tokens=2 (flag)")
            && stderr(&o).contains("stop=[\" \"] (flag)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_task_input_is_one_line_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let chat = chat_model(tmp.path());
    let plain = llama_dir("tiny-gqa-bf16");
    let code = "{\"settings\": {\"metric\": \"python_tests\"}}\n";
    let cases: Vec<(&str, String, &Path, &str)> = vec![
        ("no tests under python_tests", format!("{code}{{\"prompt\": \"p\", \"answer\": \"a\"}}\n"), &plain, ":2: the metric is python_tests"),
        ("tests that do not parse", format!("{code}{{\"prompt\": \"p\", \"tests\": [\"assert f(1) ==\"]}}\n"), &plain, ":2: test 0 is not valid Python"),
        ("a setup that does not parse", format!("{code}{{\"prompt\": \"p\", \"tests\": [\"pass\"], \"setup\": \"def (\"}}\n"), &plain, ":2: `setup` is not valid Python"),
        ("a missing interpreter", "{\"settings\": {\"metric\": \"python_tests\", \"interpreter\": \"python-nope\"}}\n{\"prompt\": \"p\", \"tests\": [\"pass\"]}\n".into(), &plain, "`python-nope` not found"),
        ("tests without python_tests", "{\"prompt\": \"p\", \"tests\": [\"pass\"]}\n".into(), &plain, ":1: this line has `tests`"),
        ("an unknown role", "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}], \"answer\": \"a\"}\n".into(), &chat, ":1: message 0: unknown role `bot`"),
        ("messages without a chat template", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"answer\": \"a\"}\n".into(), &plain, ":1: the model"),
        ("a template that raises", "{\"settings\": {\"chat_template\": true}}\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"answer\": \"a\"}\n".into(), &chat, "boom"),
        ("samples without temperature", "{\"settings\": {\"samples\": 3}}\n{\"prompt\": \"p\", \"answer\": \"a\"}\n".into(), &plain, "needs `temperature`"),
    ];
    for (what, text, model, want) in cases {
        let model = if what == "a template that raises" {
            let d = tmp.path().join("raising");
            copy_dir(model, &d);
            std::fs::write(
                d.join("chat_template.jinja"),
                "{{ raise_exception('boom: no user turns here') }}",
            )
            .unwrap();
            d
        } else {
            model.to_path_buf()
        };
        let task = tmp.path().join("bad.jsonl");
        std::fs::write(&task, text).unwrap();
        let o = run(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{what}: {e}");
        assert!(
            e.contains("bad.jsonl") && e.contains(want),
            "{what}: `{e}` lacks `{want}`"
        );
    }
    // `score` with a completions file of the wrong length, or a bad line.
    let ex = examples_dir();
    let task = ex.join("tasks/code.heldout.jsonl");
    let short = tmp.path().join("short.jsonl");
    std::fs::write(&short, "{\"completion\": \"x\"}\n").unwrap();
    let o = run(&[
        "score",
        "--task",
        task.to_str().unwrap(),
        "--completions",
        short.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("1 completion lines for the 12 examples"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&short, "{\"answer\": \"x\"}\n").unwrap();
    let o = run(&[
        "score",
        "--task",
        task.to_str().unwrap(),
        "--completions",
        short.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("short.jsonl:1: expected"),
        "{}",
        stderr(&o)
    );
}
