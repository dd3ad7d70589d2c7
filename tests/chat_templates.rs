//! Chat templates against transformers: `prompt` must print exactly what
//! `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=…)` rendered
//! (tests/data/chat/*/expected.json, written by scripts/chat_template_reference.py with
//! transformers), and the rendered text must tokenise to transformers' ids (control tokens as
//! special tokens, no BOS added a second time). A template's own `raise_exception` is a one-line
//! error with its message.

mod common;

use std::path::{Path, PathBuf};

use common::{run, stderr};
use cycleqd_engine::model::chat::{messages_from_json, ChatTemplate};
use cycleqd_engine::model::Tokenizer;
use serde_json::Value;

const STYLES: [&str; 6] = ["llama3", "llama31", "mistral", "chatml", "gemma", "phi3"];

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat")
}

/// A checkpoint folder of one style: its template files and the shared tokenizer.
fn style_dir(style: &str, into: &Path) -> PathBuf {
    let dir = into.join(style);
    common::copy_dir(&data().join(style), &dir);
    std::fs::copy(data().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir
}

/// Today's date as the Llama 3.1 style prints it (`strftime_now("%d %b %Y")`), from the C
/// library as Python's `datetime.strftime` does.
fn today() -> String {
    // SAFETY: plain libc calls into buffers owned here.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        let mut buf = [0u8; 64];
        let n = libc::strftime(
            buf.as_mut_ptr().cast(),
            buf.len(),
            c"%d %b %Y".as_ptr(),
            &tm,
        );
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[test]
fn prompt_prints_what_transformers_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for style in STYLES {
        let dir = style_dir(style, tmp.path());
        let bytes = std::fs::read(dir.join("expected.json")).unwrap();
        let expected: Value = serde_json::from_slice(&bytes).unwrap();
        // The messages in the key order they are written in (serde_json's maps sort keys, and
        // a template printing a message with `tojson` shows that order).
        let ordered: minijinja::Value = serde_json::from_slice(&bytes).unwrap();
        let ordered_cases: Vec<minijinja::Value> = ordered
            .get_attr("cases")
            .unwrap()
            .try_iter()
            .unwrap()
            .collect();
        let date = expected["date_rendered"].as_str().unwrap();
        for (case, ordered) in expected["cases"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&ordered_cases)
        {
            let what = format!("{style}/{}", case["conversation"]);
            let msgs = tmp.path().join(format!("{style}-msgs.json"));
            let messages_json =
                serde_json::to_string(&ordered.get_attr("messages").unwrap()).unwrap();
            std::fs::write(&msgs, &messages_json).unwrap();
            let args = |gen: bool| {
                let mut a = vec![
                    "prompt".to_string(),
                    "--model".into(),
                    dir.display().to_string(),
                    "--messages".into(),
                    msgs.display().to_string(),
                ];
                if !gen {
                    a.push("--no-generation-prompt".into());
                }
                a
            };
            if let Some(err) = case["error"].as_str() {
                let a = args(true);
                let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
                let e = stderr(&o);
                assert_eq!(o.status.code(), Some(1), "{what}: {e}");
                assert_eq!(e.trim_end().lines().count(), 1, "{what}: {e}");
                assert!(e.contains(err) && e.contains("msgs.json"), "{what}: {e}");
                checked += 1;
                continue;
            }
            for (gen, key) in [(true, "text_generation_prompt"), (false, "text")] {
                let a = args(gen);
                let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
                assert!(o.status.success(), "{what}: {}", stderr(&o));
                let want = case[key].as_str().unwrap().replace(date, &today());
                assert_eq!(String::from_utf8(o.stdout).unwrap(), want, "{what} ({key})");
                checked += 1;
            }
            // The rendered text's ids: special tokens as special tokens, BOS only where the
            // template wrote it.
            let template = ChatTemplate::from_dir(&dir).unwrap().unwrap();
            let messages = messages_from_json(&messages_json).unwrap();
            // With the reference's date in place of today's, as transformers rendered it.
            let rendered = template
                .render(&messages, true)
                .unwrap()
                .replace(&today(), date);
            let ids = Tokenizer::from_dir(&dir)
                .unwrap()
                .encode_plain(&rendered)
                .unwrap();
            let want: Vec<u32> =
                serde_json::from_value(case["ids_generation_prompt"].clone()).unwrap();
            assert_eq!(ids, want, "{what}: ids");
        }
    }
    assert!(checked >= 30, "only {checked} renderings checked");
}

#[test]
fn models_without_a_template_and_bad_messages_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = style_dir("llama3", tmp.path());
    let msgs = tmp.path().join("m.json");
    for (text, want) in [
        (
            r#"[{"role": "robot", "content": "x"}]"#,
            "unknown role `robot`",
        ),
        (r#"[{"content": "x"}]"#, "has no `role`"),
        (r#"[]"#, "at least one message"),
        (r#"{"messages": 3}"#, "must be a list"),
        (r#"[{"role": "user", "#, "invalid JSON"),
    ] {
        std::fs::write(&msgs, text).unwrap();
        let o = run(&[
            "prompt",
            "--model",
            dir.to_str().unwrap(),
            "--messages",
            msgs.to_str().unwrap(),
        ]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{text}: {e}");
        assert!(e.contains(want) && e.contains("m.json"), "{text}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::write(&msgs, r#"[{"role": "user", "content": "x"}]"#).unwrap();
    let o = run(&[
        "prompt",
        "--model",
        bare.to_str().unwrap(),
        "--messages",
        msgs.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("has no chat template"),
        "{}",
        stderr(&o)
    );
}
