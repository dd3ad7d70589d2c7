//! `serve` with real HTTP clients (curl, and the `openai` Python package where installed):
//! completions and chat completions equal `generate`'s greedy output for the same prompts,
//! streaming included; 32 concurrent requests all succeed; bad input is a 4xx with OpenAI's
//! error body and the server stays up; a client gone mid-stream frees its slot; and a run's
//! task scored by an evaluator through `{base_url}` gives the built-in metric's scores with no
//! per-child export.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{bin, copy_dir, demo, events, llama_dir, read, run, run_with, stderr};
use serde_json::{json, Value};

/// A running `serve`; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, extra: &[&str]) -> Server {
    let mut child = bin()
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--device",
            "cpu",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in `{line}`"))
        .to_string();
    Server { child, url }
}

/// POSTs JSON with curl: (HTTP status, body).
fn post(url: &str, path: &str, body: &Value, extra: &[&str]) -> (u16, String) {
    let o = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
        ])
        .args(extra)
        .args(["-d", &body.to_string(), &format!("{url}{path}")])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// The same model with a chat template over tokens its vocabulary has.
fn chat_model(tmp: &Path) -> PathBuf {
    let dir = tmp.join("chat-model");
    copy_dir(&llama_dir("tiny-gqa-bf16"), &dir);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
               "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"})
        .to_string(),
    )
    .unwrap();
    dir
}

/// `generate`'s greedy text for prompt ids or text.
fn generate(model: &Path, input: &[&str], n: usize) -> String {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend(input);
    let n = n.to_string();
    args.extend(["--max-new-tokens", &n, "--json"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

/// The data of a server-sent-event stream, concatenated per field.
fn stream_text(body: &str, field: &dyn Fn(&Value) -> Option<String>) -> (String, usize) {
    let (mut text, mut done) = (String::new(), 0);
    for line in body.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                done += 1;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(t) = field(&v) {
                text.push_str(&t);
            }
        }
    }
    (text, done)
}

#[test]
fn completions_and_chat_equal_generate_streaming_included() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let s = serve(&model, &[]);
    for prompt in ["Simple is better than", "Readability counts."] {
        let want = generate(&model, &["--prompt", prompt], 12);
        let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
        let (code, out) = post(&s.url, "/completions", &body, &[]);
        assert_eq!(code, 200, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["choices"][0]["text"], want, "{prompt}");
        assert_eq!(v["usage"]["completion_tokens"], 12);
        assert_eq!(v["object"], "text_completion");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (code, out) = post(&s.url, "/completions", &streamed, &["-N"]);
        assert_eq!(code, 200);
        let (text, done) = stream_text(&out, &|v| {
            v["choices"][0]["text"].as_str().map(String::from)
        });
        assert_eq!((text.as_str(), done), (want.as_str(), 1), "{out}");
    }
    // Chat: the template's rendering, generated from its ids.
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explicit is better than"}]);
    let mf = tmp.path().join("m.json");
    std::fs::write(&mf, messages.to_string()).unwrap();
    let rendered = String::from_utf8(
        run(&[
            "prompt",
            "--model",
            model.to_str().unwrap(),
            "--messages",
            mf.to_str().unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    let ids = cycleqd_engine::model::Tokenizer::from_dir(&model)
        .unwrap()
        .encode_plain(&rendered)
        .unwrap();
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let want = generate(&model, &["--ids", &ids.join(",")], 10);
    let body = json!({"messages": messages, "max_tokens": 10, "temperature": 0});
    let (code, out) = post(&s.url, "/chat/completions", &body, &[]);
    assert_eq!(code, 200, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], want);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, out) = post(&s.url, "/chat/completions", &streamed, &["-N"]);
    let (text, done) = stream_text(&out, &|v| {
        v["choices"][0]["delta"]["content"]
            .as_str()
            .map(String::from)
    });
    assert_eq!((text.as_str(), done), (want.as_str(), 1), "{out}");
    // Tokenised prompts in one request, as lm-eval's `local-completions` sends them, with
    // more stop strings than OpenAI takes (harnesses add the EOS text to a task's list).
    let tok = cycleqd_engine::model::Tokenizer::from_dir(&model).unwrap();
    let batch: Vec<Vec<u32>> = ["Errors should never pass", "Now is better than never."]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let stops: Vec<String> = (0..6).map(|i| format!("@@{i}@@")).collect();
    let body = json!({"prompt": batch, "max_tokens": 8, "temperature": 0, "stop": stops});
    let (code, out) = post(&s.url, "/completions", &body, &[]);
    assert_eq!(code, 200, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for (i, ids) in batch.iter().enumerate() {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let want = generate(&model, &["--ids", &ids.join(",")], 8);
        let choice = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["index"] == i)
            .unwrap();
        assert_eq!(choice["text"], want, "prompt {i}");
    }
    // /v1/models and /health.
    let o = Command::new("curl")
        .args(["-s", &format!("{}/models", s.url)])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["data"][0]["id"], "chat-model");
}

#[test]
fn thirty_two_concurrent_requests_all_succeed() {
    let model = llama_dir("tiny-gqa-bf16");
    let s = serve(&model, &["--max-batch", "16"]);
    let want = generate(&model, &["--prompt", "Beautiful is better than"], 16);
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let url = s.url.clone();
            std::thread::spawn(move || {
                // Half greedy (compared), half sampled with their own seeds.
                let body = if i % 2 == 0 {
                    json!({"prompt": "Beautiful is better than", "max_tokens": 16, "temperature": 0})
                } else {
                    json!({"prompt": "Beautiful is better than", "max_tokens": 16, "temperature": 0.8, "seed": i})
                };
                post(&url, "/completions", &body, &[])
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (code, out) = t.join().unwrap();
        assert_eq!(code, 200, "request {i}: {out}");
        if i % 2 == 0 {
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["choices"][0]["text"], want, "request {i}");
        }
    }
}

#[test]
fn bad_requests_are_openai_errors_and_the_server_stays_up() {
    let model = llama_dir("tiny-gqa-bf16");
    let s = serve(&model, &["--api-key", "k3y"]);
    let auth = ["-H", "authorization: Bearer k3y"];
    let (code, out) = post(&s.url, "/completions", &json!({"prompt": "x"}), &[]);
    assert_eq!(code, 401, "{out}");
    for (body, want_code, want) in [
        (json!({"prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
        (
            json!({"prompt": "x", "max_tokens": 100000}),
            400,
            "maximum context length",
        ),
        (
            json!({"prompt": "x", "frobnicate": true}),
            400,
            "unknown field `frobnicate`",
        ),
        (
            json!({"prompt": "x", "model": "gpt-9"}),
            404,
            "does not exist",
        ),
        (
            json!({"prompt": "x", "temperature": -1}),
            400,
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            400,
            "no chat template",
        ),
    ] {
        let path = if body.get("messages").is_some() {
            "/chat/completions"
        } else {
            "/completions"
        };
        let (code, out) = post(&s.url, path, &body, &auth);
        assert_eq!(code, want_code, "{body}: {out}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out}"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{out}"
        );
        assert!(v["error"]["type"].is_string());
    }
    // Malformed JSON.
    let o = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "authorization: Bearer k3y",
            "-H",
            "content-type: application/json",
            "-d",
            "{not json",
            &format!("{}/completions", s.url),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("400"));
    let (code, _) = post(
        &s.url,
        "/completions",
        &json!({"prompt": "still up", "max_tokens": 2}),
        &auth,
    );
    assert_eq!(code, 200);
}

#[test]
fn a_full_queue_is_429_and_a_client_gone_mid_stream_frees_its_slot() {
    let model = llama_dir("tiny-gqa-bf16");
    let s = serve(&model, &["--max-batch", "1", "--max-queue", "2"]);
    // A stream cut after a moment: its slot must serve the next request.
    let o = Command::new("curl")
        .args(["-s", "-N", "--max-time", "0.3", "-H", "content-type: application/json", "-d"])
        .arg(json!({"prompt": "Now is better than never.", "max_tokens": 240, "stream": true, "temperature": 0.7}).to_string())
        .arg(format!("{}/completions", s.url))
        .output()
        .unwrap();
    let _ = o;
    let (code, _) = post(
        &s.url,
        "/completions",
        &json!({"prompt": "next", "max_tokens": 4, "temperature": 0}),
        &["--max-time", "20"],
    );
    assert_eq!(code, 200, "the slot of the vanished client was not freed");
    // Many requests at once on one slot and a queue of 2: some are refused with 429, every
    // other one completes.
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let url = s.url.clone();
            std::thread::spawn(move || post(&url, "/completions", &json!({"prompt": "Errors should never pass silently.", "max_tokens": 100, "temperature": 0}), &[]))
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap().0).collect();
    assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
    assert!(codes.contains(&429) && codes.contains(&200), "{codes:?}");
}

/// A Python with the `openai` package: `$CYCLEQD_OPENAI_PYTHON` (.ci/run sets it), else
/// `python3` if it has the package.
fn openai_python() -> Option<String> {
    let candidates = std::env::var("CYCLEQD_OPENAI_PYTHON")
        .into_iter()
        .chain(["python3".to_string()]);
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import openai"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

#[test]
fn the_openai_client_gets_what_generate_gives() {
    let Some(python) = openai_python() else {
        println!("SKIPPED the_openai_client_gets_what_generate_gives: no Python with the `openai` package (.ci/run installs one)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let s = serve(&model, &[]);
    let want = generate(&model, &["--prompt", "Flat is better than"], 10);
    let script = r#"
import json, sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="none")
r = c.completions.create(model="chat-model", prompt="Flat is better than", max_tokens=10, temperature=0)
s = "".join(ch.choices[0].text for ch in c.completions.create(model="chat-model", prompt="Flat is better than", max_tokens=10, temperature=0, stream=True))
m = c.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
ms = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True))
print(json.dumps({"text": r.choices[0].text, "stream": s, "usage": r.usage.total_tokens, "chat": m.choices[0].message.content, "chat_stream": ms}))
"#;
    let o = Command::new(&python)
        .args(["-c", script, &s.url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["text"], want);
    assert_eq!(v["stream"], want);
    assert_eq!(v["chat"], v["chat_stream"]);
}

#[test]
fn a_served_evaluator_scores_what_the_built_in_metric_scores_with_no_export() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| common::set_key(t, "generations", "12"));
    let demo_dir = cfg.parent().unwrap().to_path_buf();
    let builtin = dir.path().join("builtin");
    run_with(&cfg, &builtin, &["--workers", "1"]);
    // Task alpha scored by the example evaluator through the endpoint instead.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/serve/exact_match.py");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let served_cfg = text.replacen(
        "fitness = \"tasks/alpha.fitness.jsonl\"\nheldout = \"tasks/alpha.heldout.jsonl\"",
        &format!(
            "evaluator = [\"python3\", \"{}\", \"{{base_url}}\", \"{{model_name}}\", \"tasks/alpha.fitness.jsonl\"]\nserve = true",
            script.display()
        ),
        1,
    );
    assert_ne!(served_cfg, text, "the demo's alpha task was not found");
    let cfg2 = demo_dir.join("served.toml");
    std::fs::write(&cfg2, served_cfg).unwrap();
    let served = dir.path().join("served");
    run_with(&cfg2, &served, &["--workers", "1"]);
    let scores =
        |out: &Path| -> Vec<Value> { events(out).iter().map(|e| e["scores"].clone()).collect() };
    assert_eq!(scores(&builtin), scores(&served));
    for f in [
        "archives/alpha.json",
        "archives/beta.json",
        "archives/gamma.json",
    ] {
        // The same elites in the same cells (the served task has no per-example results).
        let cells = |out: &Path| -> Vec<(Value, Value, Value)> {
            let v: Value = serde_json::from_slice(&read(&out.join(f))).unwrap();
            v["elites"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["id"].clone(), e["cell"].clone(), e["objective"].clone()))
                .collect()
        };
        assert!(cells(&builtin) == cells(&served), "{f} differs");
    }
    // No checkpoint was exported for any child, and each child's event says so.
    assert!(!served.join("work").exists(), "children were exported");
    for e in events(&served) {
        assert_eq!(e["served"], serde_json::json!(["alpha"]), "{e}");
        assert_eq!(e["checkpoint_written"], false, "{e}");
    }
}
