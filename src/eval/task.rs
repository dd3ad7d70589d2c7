//! Task files: JSONL, one example per line, of two kinds —
//! `{"prompt": "...", "answer": "..."}` scored on a greedy generation, and
//! `{"prompt": "...", "choices": ["...", ...], "answer_index": k}` scored by the answer's
//! log-likelihood. Other keys on a line (ids, metadata) are ignored, as dataset tools do.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One example of a task.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Greedy generation from `prompt`, compared with `answer` by the task's metric.
    Generate { prompt: String, answer: String },
    /// The choice with the highest summed log-probability after `prompt` must be `answer_index`.
    Choice {
        prompt: String,
        choices: Vec<String>,
        answer_index: usize,
    },
}

/// How a generation is compared with its answer (both trimmed).
#[derive(Clone, Debug)]
pub enum Metric {
    ExactMatch,
    Contains,
    /// The pattern's first capture group (the whole match if it has none) must equal the answer.
    Regex(Regex),
}

impl Metric {
    /// `exact_match`, `contains`, or `regex` (with `pattern`).
    pub fn parse(name: &str, pattern: Option<&str>) -> std::result::Result<Metric, String> {
        match (name, pattern) {
            ("exact_match", None) => Ok(Metric::ExactMatch),
            ("contains", None) => Ok(Metric::Contains),
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
            ("exact_match" | "contains", Some(_)) => Err(format!(
                "`pattern` is only used by metric `regex`, not `{name}`"
            )),
            (other, _) => Err(format!(
                "unknown metric `{other}` (exact_match, contains or regex)"
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::Contains => "contains",
            Metric::Regex(_) => "regex",
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
        }
    }
}

/// How generative examples are run and scored.
#[derive(Clone, Debug)]
pub struct Scoring {
    pub metric: Metric,
    pub max_new_tokens: usize,
    /// The generation is cut at the first occurrence of any of these.
    pub stop: Vec<String>,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            metric: Metric::ExactMatch,
            max_new_tokens: 32,
            stop: vec![],
        }
    }
}

impl Scoring {
    /// `text` up to the first stop string.
    pub fn cut<'a>(&self, text: &'a str) -> &'a str {
        let end = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
            .unwrap_or(text.len());
        &text[..end]
    }
}

/// The examples of one task file.
#[derive(Clone, Debug)]
pub struct TaskFile {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// The 1-based line of each example, for errors found later.
    pub lines: Vec<usize>,
}

#[derive(Deserialize)]
struct Line {
    prompt: Option<String>,
    answer: Option<serde_json::Value>,
    choices: Option<Vec<String>>,
    answer_index: Option<serde_json::Value>,
}

impl TaskFile {
    /// Reads a JSONL task file; blank lines are skipped. Errors name `file:line`.
    pub fn load(path: &Path) -> Result<TaskFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let (mut examples, mut lines) = (vec![], vec![]);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |msg: String| Error::format(format!("{}:{}", path.display(), i + 1), msg);
            let l: Line =
                serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
            examples.push(parse_example(l).map_err(at)?);
            lines.push(i + 1);
        }
        if examples.is_empty() {
            return Err(Error::format(path, "task file has no examples"));
        }
        Ok(TaskFile {
            path: path.to_path_buf(),
            examples,
            lines,
        })
    }
}

fn parse_example(l: Line) -> std::result::Result<Example, String> {
    let prompt = l.prompt.ok_or("missing `prompt`")?;
    if prompt.is_empty() {
        return Err("`prompt` is empty".into());
    }
    match (l.answer, l.choices, l.answer_index) {
        (Some(a), None, None) => match a {
            serde_json::Value::String(answer) => Ok(Example::Generate { prompt, answer }),
            other => Err(format!("`answer` must be a string, got {other}")),
        },
        (None, Some(choices), Some(k)) => {
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
            Ok(Example::Choice {
                prompt,
                choices,
                answer_index,
            })
        }
        (None, Some(_), None) => Err("`choices` without `answer_index`".into()),
        (None, None, Some(_)) => Err("`answer_index` without `choices`".into()),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(
            "a line is either {prompt, answer} or {prompt, choices, answer_index}, not both".into(),
        ),
        (None, None, None) => Err("missing `answer` (or `choices` and `answer_index`)".into()),
    }
}

/// Writes examples as JSONL text (used by `synth`).
pub fn to_jsonl(examples: &[Example]) -> String {
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Out<'a> {
        Generate {
            prompt: &'a str,
            answer: &'a str,
        },
        Choice {
            prompt: &'a str,
            choices: &'a [String],
            answer_index: usize,
        },
    }
    let mut s = String::new();
    for e in examples {
        let o = match e {
            Example::Generate { prompt, answer } => Out::Generate { prompt, answer },
            Example::Choice {
                prompt,
                choices,
                answer_index,
            } => Out::Choice {
                prompt,
                choices,
                answer_index: *answer_index,
            },
        };
        s.push_str(&serde_json::to_string(&o).expect("examples serialise"));
        s.push('\n');
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
        assert_eq!(
            t.examples[0],
            Example::Generate {
                prompt: "2+2=".into(),
                answer: "4".into()
            }
        );
        let again = load(&to_jsonl(&t.examples)).unwrap();
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
            ("{\"prompt\": \"a\"}", ":1: missing `answer`"),
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
        let s = Scoring {
            stop: vec!["\n".into()],
            ..Scoring::default()
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
}
