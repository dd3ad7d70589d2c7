//! How a task is scored: settings that a task file may carry in its own `{"settings": {…}}`
//! line, that a run configuration's `[[tasks]]` table and `eval`'s flags may set, merged in that
//! order of precedence (flags over the configuration over the file over the defaults), and
//! resolved into a checked [`Scoring`] that remembers where each value came from.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sandbox::Limits;
use super::task::Metric;

/// A few-shot example: shown before the prompt (as earlier chat turns with a chat template,
/// as `prompt answer` blocks without one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shot {
    pub prompt: String,
    pub answer: String,
}

/// Every setting, each optional (absent: a lower layer's value or the default).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    /// `exact_match`, `contains`, `regex` (with `pattern`) or `python_tests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// A generation is cut at the first of these (and stops there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Render prompts with the model's chat template (lines with `messages` always are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<bool>,
    /// A system prompt (the first message with a chat template, a preamble without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fewshot: Option<Vec<Shot>>,
    /// Generations per prompt (`n` of pass@k).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
    /// 0: greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The `k` of pass@k (at most `samples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_k: Option<usize>,
    /// Seed of the sampled generations (the same for every model scored: common random
    /// numbers make children comparable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The Python interpreter of `python_tests` (a name on PATH or a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
    /// Wall-clock limit of one program, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Memory of one program (address space and cgroup), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

/// Where a value came from, lowest precedence first.
pub const SOURCES: [&str; 4] = ["default", "task file", "config", "flag"];

impl TaskSettings {
    /// Merges layers, each `(source name, settings)`, later layers winning per key; returns the
    /// merged settings and, per key set, the layer it came from.
    pub fn merge(
        layers: &[(&'static str, &TaskSettings)],
    ) -> (TaskSettings, BTreeMap<String, &'static str>) {
        let mut merged = serde_json::Map::new();
        let mut from = BTreeMap::new();
        for (source, s) in layers {
            if let Value::Object(o) = serde_json::to_value(s).expect("settings serialise") {
                for (k, v) in o {
                    from.insert(k.clone(), *source);
                    merged.insert(k, v);
                }
            }
        }
        let settings =
            serde_json::from_value(Value::Object(merged)).expect("merged settings are settings");
        (settings, from)
    }

    /// Checks each key that is set on its own (a layer's values before they are merged with
    /// the others); the error names the key.
    pub fn check_keys(&self) -> Result<(), (&'static str, String)> {
        if let Some(m) = &self.metric {
            // A pattern may come from another layer: check the name only.
            let pattern = (m == "regex").then_some(".");
            Metric::parse(m, pattern).map_err(|e| ("metric", e))?;
        }
        if let Some(p) = &self.pattern {
            Metric::parse("regex", Some(p)).map_err(|e| ("pattern", e))?;
        }
        let positive = |k: &'static str, v: Option<usize>| match v {
            Some(0) => Err((k, "must be at least 1".to_string())),
            _ => Ok(()),
        };
        positive("max_new_tokens", self.max_new_tokens)?;
        positive("samples", self.samples)?;
        positive("pass_k", self.pass_k)?;
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err((
                    "temperature",
                    format!("must be a finite number ≥ 0, got {t}"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(("top_p", format!("must be in (0, 1], got {p}")));
            }
        }
        if let Some(t) = self.timeout_s {
            if !(t.is_finite() && t > 0.0) {
                return Err((
                    "timeout_s",
                    format!("must be a positive number of seconds, got {t}"),
                ));
            }
        }
        Ok(())
    }

    /// Checks and completes the settings into a [`Scoring`]; errors name the key.
    pub fn resolve(&self) -> Result<Scoring, String> {
        self.resolve_with(None)
    }

    /// [`TaskSettings::resolve`] for completions that exist already (`score`): up to
    /// `samples` per example, however they were made.
    pub fn resolve_for_completions(&self, samples: usize) -> Result<Scoring, String> {
        self.resolve_with(Some(samples))
    }

    fn resolve_with(&self, given: Option<usize>) -> Result<Scoring, String> {
        let metric_name = self.metric.as_deref().unwrap_or("exact_match");
        let metric = Metric::parse(metric_name, self.pattern.as_deref())?;
        let code = matches!(metric, Metric::PythonTests);
        let max_new_tokens = self.max_new_tokens.unwrap_or(if code { 512 } else { 32 });
        if max_new_tokens == 0 {
            return Err("`max_new_tokens` must be at least 1".into());
        }
        let samples = given.or(self.samples).unwrap_or(1);
        if samples == 0 {
            return Err("`samples` must be at least 1".into());
        }
        let temperature = self.temperature.unwrap_or(0.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(format!(
                "`temperature` must be a finite number ≥ 0, got {temperature}"
            ));
        }
        if samples > 1 && temperature == 0.0 && given.is_none() {
            return Err(format!(
                "`samples` = {samples} needs `temperature` > 0 (greedy generations are all the same)"
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("`top_p` must be in (0, 1], got {top_p}"));
        }
        let pass_k = self.pass_k.unwrap_or(1);
        if pass_k == 0 || pass_k > samples {
            return Err(format!(
                "`pass_k` must be between 1 and `samples` ({samples}), got {pass_k}"
            ));
        }
        let mut limits = Limits::default();
        if let Some(t) = self.timeout_s {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!(
                    "`timeout_s` must be a positive number of seconds, got {t}"
                ));
            }
            limits.timeout = Duration::from_secs_f64(t);
            limits.cpu_seconds = t.ceil() as u64;
        }
        if let Some(m) = self.memory_mb {
            if m < 16 {
                return Err(format!("`memory_mb` must be at least 16, got {m}"));
            }
            limits.memory_bytes = m.saturating_mul(1 << 20);
        }
        if let Some(s) = &self.system {
            if s.is_empty() {
                return Err("`system` is empty".into());
            }
        }
        Ok(Scoring {
            metric,
            max_new_tokens,
            stop: self.stop.clone().unwrap_or_default(),
            chat_template: self.chat_template.unwrap_or(false),
            system: self.system.clone(),
            fewshot: self.fewshot.clone().unwrap_or_default(),
            samples,
            temperature,
            top_p,
            pass_k,
            seed: self.seed.unwrap_or(0),
            interpreter: self.interpreter.clone().unwrap_or_else(|| "python3".into()),
            limits,
        })
    }
}

/// A task's checked settings.
#[derive(Clone, Debug)]
pub struct Scoring {
    pub metric: Metric,
    pub max_new_tokens: usize,
    /// The generation is cut at the first occurrence of any of these.
    pub stop: Vec<String>,
    pub chat_template: bool,
    pub system: Option<String>,
    pub fewshot: Vec<Shot>,
    pub samples: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub pass_k: usize,
    pub seed: u64,
    pub interpreter: String,
    pub limits: Limits,
}

impl Default for Scoring {
    fn default() -> Self {
        TaskSettings::default()
            .resolve()
            .expect("the defaults are valid")
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

    /// Whether generations are sampled (else greedy).
    pub fn sampled(&self) -> bool {
        self.temperature > 0.0
    }
}

/// The values used and where each came from, on one line (`max_new_tokens=1 (task file),
/// metric=exact_match (default), …`).
pub fn describe(s: &Scoring, from: &BTreeMap<String, &'static str>) -> String {
    let src = |k: &str| from.get(k).copied().unwrap_or("default");
    let mut parts = vec![
        format!("metric={} ({})", s.metric.name(), src("metric")),
        format!(
            "max_new_tokens={} ({})",
            s.max_new_tokens,
            src("max_new_tokens")
        ),
        format!("stop={:?} ({})", s.stop, src("stop")),
        format!(
            "chat_template={} ({})",
            s.chat_template,
            src("chat_template")
        ),
    ];
    if s.system.is_some() {
        parts.push(format!("system ({})", src("system")));
    }
    if !s.fewshot.is_empty() {
        parts.push(format!("fewshot={} ({})", s.fewshot.len(), src("fewshot")));
    }
    if s.samples > 1 || s.sampled() {
        parts.push(format!(
            "samples={} temperature={} top_p={} pass_k={} seed={}",
            s.samples, s.temperature, s.top_p, s.pass_k, s.seed
        ));
    }
    if matches!(s.metric, Metric::PythonTests) {
        parts.push(format!(
            "interpreter={} timeout_s={} memory_mb={}",
            s.interpreter,
            s.limits.timeout.as_secs_f64(),
            s.limits.memory_bytes >> 20
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> TaskSettings {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn layers_merge_per_key_and_remember_their_source() {
        let file = settings(r#"{"max_new_tokens": 4, "stop": ["\n"], "metric": "contains"}"#);
        let config = settings(r#"{"max_new_tokens": 8}"#);
        let flags = settings(r#"{"metric": "exact_match"}"#);
        let (m, from) =
            TaskSettings::merge(&[("task file", &file), ("config", &config), ("flag", &flags)]);
        assert_eq!(m.max_new_tokens, Some(8));
        assert_eq!(m.stop, Some(vec!["\n".to_string()]));
        assert_eq!(m.metric.as_deref(), Some("exact_match"));
        assert_eq!(from["max_new_tokens"], "config");
        assert_eq!(from["stop"], "task file");
        assert_eq!(from["metric"], "flag");
        let s = m.resolve().unwrap();
        let d = describe(&s, &from);
        assert!(
            d.contains("max_new_tokens=8 (config)") && d.contains("chat_template=false (default)"),
            "{d}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (json, want) in [
            (r#"{"samples": 0}"#, "`samples`"),
            (r#"{"samples": 4}"#, "needs `temperature`"),
            (
                r#"{"samples": 4, "temperature": 0.8, "pass_k": 5}"#,
                "`pass_k`",
            ),
            (r#"{"top_p": 0}"#, "`top_p`"),
            (r#"{"temperature": -1}"#, "`temperature`"),
            (r#"{"max_new_tokens": 0}"#, "`max_new_tokens`"),
            (r#"{"metric": "bleu"}"#, "unknown metric"),
            (r#"{"timeout_s": 0}"#, "`timeout_s`"),
        ] {
            let e = settings(json).resolve().unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
        assert!(serde_json::from_str::<TaskSettings>(r#"{"max_tokens": 3}"#).is_err());
    }

    #[test]
    fn code_tasks_get_room_to_write_a_program() {
        let s = settings(r#"{"metric": "python_tests"}"#).resolve().unwrap();
        assert_eq!(s.max_new_tokens, 512);
        assert_eq!(s.interpreter, "python3");
    }
}
