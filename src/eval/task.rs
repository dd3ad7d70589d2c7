//! Task files: JSONL, one example per line. The input is a `"prompt"` (text) or `"messages"`
//! (a chat, rendered with the model's chat template); the target is one of
//! - `"answer"`: compared with a generation by the task's metric;
//! - `"choices"` and `"answer_index"`: the choice with the highest log-likelihood must be it;
//! - `"tests"` (with optional `"setup"` and `"entry_point"`): the program in a generation must
//!   pass them (metric `python_tests`).
//!
//! The first non-blank line may be `{"settings": {…}}`: the task's own settings
//! ([`TaskSettings`]: metric, max_new_tokens, stop, chat_template, …). Other keys on a line
//! (ids, metadata) are ignored, as dataset tools do.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value as Json;

use super::settings::TaskSettings;
use crate::error::{Error, Result};
use crate::model::chat::ROLES;

/// What a model is given.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Prompt(String),
    /// Chat messages, each a map with `role` and `content` (in their written key order).
    Messages(Vec<minijinja::Value>),
}

/// A program's tests: statements run after the program (and `setup`) in one interpreter.
#[derive(Clone, Debug, PartialEq)]
pub struct CodeTests {
    pub tests: Vec<String>,
    pub setup: Option<String>,
    /// The function under test, for a completion that continues a prompt holding its signature.
    pub entry_point: Option<String>,
}

/// What an answer is checked against.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Answer(String),
    Choices {
        choices: Vec<String>,
        answer_index: usize,
    },
    Tests(CodeTests),
}

/// One example of a task.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub input: Input,
    pub target: Target,
}

impl Example {
    /// A `{prompt, answer}` example.
    pub fn answer(prompt: impl Into<String>, answer: impl Into<String>) -> Example {
        Example {
            input: Input::Prompt(prompt.into()),
            target: Target::Answer(answer.into()),
        }
    }

    /// Whether it is scored on a generation (not by choice log-likelihoods).
    pub fn is_generative(&self) -> bool {
        !matches!(self.target, Target::Choices { .. })
    }

    /// The prompt text (`None` for messages).
    pub fn prompt(&self) -> Option<&str> {
        match &self.input {
            Input::Prompt(p) => Some(p),
            Input::Messages(_) => None,
        }
    }
}

/// How a generation is compared with its answer (both trimmed), or that its program is run.
#[derive(Clone, Debug)]
pub enum Metric {
    ExactMatch,
    Contains,
    /// The pattern's first capture group (the whole match if it has none) must equal the answer.
    Regex(Regex),
    /// The program in the generation must pass the example's tests (run in a sandbox).
    PythonTests,
}

impl Metric {
    /// `exact_match`, `contains`, `regex` (with `pattern`) or `python_tests`.
    pub fn parse(name: &str, pattern: Option<&str>) -> std::result::Result<Metric, String> {
        match (name, pattern) {
            ("exact_match", None) => Ok(Metric::ExactMatch),
            ("contains", None) => Ok(Metric::Contains),
            ("python_tests", None) => Ok(Metric::PythonTests),
            ("regex", Some(p)) => Regex::new(p)
                .map(Metric::Regex)
                // regex's messages draw a caret under the pattern over several lines.
                .map_err(|e| {
                    let msg = e.to_string();
                    let reason = msg.lines().last().unwrap_or("").trim().to_string();
                    format!(
                        "invalid regex `{p}`: {}",
                        reason.trim_start_matches("error: ")
                    )
                }),
            ("regex", None) => Err("metric `regex` needs a `pattern`".into()),
            ("exact_match" | "contains" | "python_tests", Some(_)) => Err(format!(
                "`pattern` is only used by metric `regex`, not `{name}`"
            )),
            (other, _) => Err(format!(
                "unknown metric `{other}` (exact_match, contains, regex or python_tests)"
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::Contains => "contains",
            Metric::Regex(_) => "regex",
            Metric::PythonTests => "python_tests",
        }
    }

    /// Whether `generated` (already cut at the first stop string) answers `answer`.
    pub fn matches(&self, generated: &str, answer: &str) -> bool {
        let (g, a) = (generated.trim(), answer.trim());
        match self {
            Metric::ExactMatch => g == a,
            Metric::Contains => g.contains(a),
            Metric::Regex(re) => re
                .captures(g)
                .and_then(|c| c.get(1).or_else(|| c.get(0)))
                .is_some_and(|m| m.as_str().trim() == a),
            Metric::PythonTests => false,
        }
    }
}

/// The examples of one task file.
#[derive(Clone, Debug)]
pub struct TaskFile {
    pub path: PathBuf,
    /// The file's own settings (empty without a settings line).
    pub settings: TaskSettings,
    pub examples: Vec<Example>,
    /// The 1-based line of each example, for errors found later.
    pub lines: Vec<usize>,
}

#[derive(Deserialize)]
struct Line {
    prompt: Option<Json>,
    messages: Option<minijinja::Value>,
    answer: Option<Json>,
    choices: Option<Vec<String>>,
    answer_index: Option<Json>,
    tests: Option<Json>,
    setup: Option<Json>,
    entry_point: Option<Json>,
    settings: Option<Json>,
}

impl TaskFile {
    /// Reads a JSONL task file; blank lines are skipped. Errors name `file:line`.
    pub fn load(path: &Path) -> Result<TaskFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let (mut examples, mut lines) = (vec![], vec![]);
        let mut settings = None;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |msg: String| Error::format(format!("{}:{}", path.display(), i + 1), msg);
            let l: Line =
                serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
            if let Some(s) = l.settings {
                if !examples.is_empty() || settings.is_some() {
                    return Err(at("a `settings` line must be the file's first line".into()));
                }
                settings = Some(
                    serde_json::from_value::<TaskSettings>(s)
                        .map_err(|e| at(format!("invalid settings: {e}")))?,
                );
                continue;
            }
            examples.push(parse_example(l).map_err(at)?);
            lines.push(i + 1);
        }
        if examples.is_empty() {
            return Err(Error::format(path, "task file has no examples"));
        }
        Ok(TaskFile {
            path: path.to_path_buf(),
            settings: settings.unwrap_or_default(),
            examples,
            lines,
        })
    }

    /// `file:line` of example `i`.
    pub fn at(&self, i: usize) -> String {
        format!("{}:{}", self.path.display(), self.lines[i])
    }
}

fn string(v: Json, key: &str) -> std::result::Result<String, String> {
    match v {
        Json::String(s) => Ok(s),
        other => Err(format!("`{key}` must be a string, got {other}")),
    }
}

fn parse_messages(v: minijinja::Value) -> std::result::Result<Vec<minijinja::Value>, String> {
    use minijinja::value::ValueKind;
    if v.kind() != ValueKind::Seq {
        return Err(format!("`messages` must be a list, got {}", v.kind()));
    }
    let list: Vec<minijinja::Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
    if list.is_empty() {
        return Err("`messages` is empty".into());
    }
    for (i, m) in list.iter().enumerate() {
        let role = m.get_attr("role").ok().filter(|r| !r.is_undefined());
        match role.as_ref().and_then(|r| r.as_str()) {
            Some(r) if ROLES.contains(&r) => {}
            Some(r) => {
                return Err(format!(
                    "message {i}: unknown role `{r}` (one of {})",
                    ROLES.join(", ")
                ))
            }
            None => return Err(format!("message {i}: needs a string `role`")),
        }
    }
    Ok(list)
}

fn parse_example(l: Line) -> std::result::Result<Example, String> {
    let input = match (l.prompt, l.messages) {
        (Some(p), None) => {
            let p = string(p, "prompt")?;
            if p.is_empty() {
                return Err("`prompt` is empty".into());
            }
            Input::Prompt(p)
        }
        (None, Some(m)) => Input::Messages(parse_messages(m)?),
        (Some(_), Some(_)) => return Err("give `prompt` or `messages`, not both".into()),
        (None, None) => return Err("missing `prompt` (or `messages`)".into()),
    };
    let target = match (l.answer, l.choices, l.answer_index, l.tests) {
        (Some(a), None, None, None) => Target::Answer(string(a, "answer")?),
        (None, Some(choices), Some(k), None) => {
            let answer_index = k
                .as_u64()
                .map(|k| k as usize)
                .ok_or_else(|| format!("`answer_index` must be a non-negative integer, got {k}"))?;
            if choices.len() < 2 {
                return Err(format!(
                    "`choices` needs at least 2 entries, got {}",
                    choices.len()
                ));
            }
            if answer_index >= choices.len() {
                return Err(format!(
                    "`answer_index` {answer_index} is out of range for {} choices",
                    choices.len()
                ));
            }
            Target::Choices {
                choices,
                answer_index,
            }
        }
        (None, None, None, Some(t)) => {
            let tests: Vec<String> = match t {
                Json::Array(a) => a
                    .into_iter()
                    .map(|x| string(x, "tests[]"))
                    .collect::<std::result::Result<_, _>>()?,
                Json::String(s) => vec![s],
                other => return Err(format!("`tests` must be a list of strings, got {other}")),
            };
            if tests.iter().all(|t| t.trim().is_empty()) {
                return Err("`tests` has no test".into());
            }
            Target::Tests(CodeTests {
                tests,
                setup: l.setup.map(|s| string(s, "setup")).transpose()?,
                entry_point: l
                    .entry_point
                    .map(|s| string(s, "entry_point"))
                    .transpose()?,
            })
        }
        (None, Some(_), None, _) => return Err("`choices` without `answer_index`".into()),
        (None, None, Some(_), _) => return Err("`answer_index` without `choices`".into()),
        (None, None, None, None) => {
            return Err(
                "missing a target: `answer`, `choices` with `answer_index`, or `tests`".into(),
            )
        }
        _ => {
            return Err(
                "a line has one target: `answer`, `choices` with `answer_index`, or `tests`".into(),
            )
        }
    };
    Ok(Example { input, target })
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("task values serialise")
}

/// Writes examples as JSONL text, after a settings line when `settings` has any (used by
/// `synth` and the example task sets).
pub fn to_jsonl(settings: Option<&TaskSettings>, examples: &[Example]) -> String {
    let mut s = String::new();
    if let Some(st) = settings.filter(|st| **st != TaskSettings::default()) {
        s.push_str(
            &serde_json::to_string(&serde_json::json!({ "settings": st }))
                .expect("settings serialise"),
        );
        s.push('\n');
    }
    for e in examples {
        // Written by hand so that messages keep their key order (serde_json's maps sort).
        let mut fields: Vec<(&str, String)> = vec![];
        match &e.input {
            Input::Prompt(p) => fields.push(("prompt", json(p))),
            Input::Messages(m) => fields.push(("messages", json(m))),
        }
        match &e.target {
            Target::Answer(a) => fields.push(("answer", json(a))),
            Target::Choices {
                choices,
                answer_index,
            } => {
                fields.push(("choices", json(choices)));
                fields.push(("answer_index", json(answer_index)));
            }
            Target::Tests(t) => {
                fields.push(("tests", json(&t.tests)));
                if let Some(x) = &t.setup {
                    fields.push(("setup", json(x)));
                }
                if let Some(x) = &t.entry_point {
                    fields.push(("entry_point", json(x)));
                }
            }
        }
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        s.push('{');
        s.push_str(&body.join(","));
        s.push_str("}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<TaskFile> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, text).unwrap();
        TaskFile::load(&p)
    }

    #[test]
    fn reads_both_kinds_and_round_trips() {
        let t = load(
            "{\"prompt\": \"2+2=\", \"answer\": \"4\", \"id\": 7}\n\n\
             {\"prompt\": \"sky?\", \"choices\": [\"blue\", \"green\"], \"answer_index\": 0}\n",
        )
        .unwrap();
        assert_eq!(t.examples.len(), 2);
        assert_eq!(t.examples[0], Example::answer("2+2=", "4"));
        let again = load(&to_jsonl(Some(&t.settings), &t.examples)).unwrap();
        assert_eq!(again.examples, t.examples);
    }

    #[test]
    fn invalid_lines_name_file_and_line() {
        for (text, want) in [
            (
                "{\"prompt\": \"a\", \"answer\": \"b\"}\n{oops",
                ":2: invalid JSON",
            ),
            ("{\"answer\": \"b\"}", ":1: missing `prompt`"),
            ("{\"prompt\": \"a\"}", ":1: missing a target"),
            (
                "{\"prompt\": \"a\", \"tests\": []}",
                ":1: `tests` has no test",
            ),
            (
                "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}], \"answer\": \"b\"}",
                ":1: message 0: unknown role `robot`",
            ),
            (
                "{\"prompt\": \"a\", \"answer\": \"b\"}\n{\"settings\": {}}",
                ":2: a `settings` line must be the file's first line",
            ),
            (
                "{\"settings\": {\"max_tokens\": 3}}",
                ":1: invalid settings",
            ),
            (
                "{\"prompt\": \"a\", \"choices\": [\"x\", \"y\"], \"answer_index\": 2}",
                "out of range",
            ),
            ("{\"prompt\": \"a\", \"answer\": 3}", "must be a string"),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains("t.jsonl") && e.contains(want), "{e}");
        }
        let e = load("\n\n").unwrap_err().to_string();
        assert!(e.contains("no examples"), "{e}");
    }

    #[test]
    fn metrics_trim_cut_and_extract() {
        let s = crate::eval::Scoring {
            stop: vec!["\n".into()],
            ..crate::eval::Scoring::default()
        };
        assert_eq!(s.cut(" 42\nmore"), " 42");
        assert!(Metric::ExactMatch.matches(" 42 ", "42"));
        assert!(!Metric::ExactMatch.matches("420", "42"));
        assert!(Metric::Contains.matches("the answer is 42.", "42"));
        let re = Metric::parse("regex", Some(r"answer is (\d+)")).unwrap();
        assert!(re.matches("so the answer is 42.", "42"));
        assert!(!re.matches("so the answer is 41.", "42"));
        assert!(Metric::parse("regex", None).is_err());
        assert!(Metric::parse("bleu", None).is_err());
    }

    #[test]
    fn settings_messages_and_tests_round_trip() {
        let t = load(
            "{\"settings\": {\"max_new_tokens\": 4, \"stop\": [\"\\n\"]}}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"hi\", \"name\": \"u\"}], \"answer\": \"b\"}\n\
             {\"prompt\": \"def f(x):\", \"tests\": [\"assert f(1) == 2\"], \"entry_point\": \"f\"}\n",
        )
        .unwrap();
        assert_eq!(t.settings.max_new_tokens, Some(4));
        assert_eq!(t.lines, vec![2, 3]);
        assert!(
            matches!(&t.examples[1].target, Target::Tests(c) if c.entry_point.as_deref() == Some("f"))
        );
        let text = to_jsonl(Some(&t.settings), &t.examples);
        // Key order of messages is kept.
        assert!(
            text.contains(r#"{"role":"user","content":"hi","name":"u"}"#),
            "{text}"
        );
        let again = load(&text).unwrap();
        assert_eq!(again.examples, t.examples);
        assert_eq!(again.settings, t.settings);
    }
}
