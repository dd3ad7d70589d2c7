//! The run configuration (`cycleqd.toml`): the base, one expert and task per skill, the
//! factorisation rank, the operators' parameters and the scheduling of workers. Unknown keys
//! are errors (a typo must not silently fall back to a default); every value is checked with an
//! error naming its key. Paths are relative to the configuration file and are made absolute
//! when it is read, so the resolved copy a run folder keeps works from anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::evolve::crossover::ParamValue;
use crate::evolve::{CrossoverMethod, Rank};
use crate::qd::EliteSampling;

/// `rank = "full"` or `rank = 64`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RankSpec {
    Name(String),
    Value(usize),
}

impl RankSpec {
    pub fn resolve(&self) -> std::result::Result<Rank, String> {
        match self {
            RankSpec::Name(n) if n == "full" => Ok(Rank::Full),
            RankSpec::Name(n) => Err(format!("`{n}` is not \"full\" or a positive integer")),
            RankSpec::Value(0) => Err("must be at least 1".into()),
            RankSpec::Value(r) => Ok(Rank::Truncated(*r)),
        }
    }
}

/// A measure range: `[lo, hi]`, or `"experts"` for the paper's rule (85% of the weakest
/// expert's score to 115% of the strongest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RangeSpec {
    Explicit([f64; 2]),
    Rule(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    /// The expert checkpoint of this task's skill.
    pub expert: PathBuf,
    /// JSONL examples scored as fitness (or use `evaluator`).
    #[serde(default)]
    pub fitness: Option<PathBuf>,
    /// JSONL examples never used for selection, scored for the final table.
    #[serde(default)]
    pub heldout: Option<PathBuf>,
    // How the built-in tasks are scored: each key, when set, overrides the task file's own
    // `{"settings": …}` line (see `eval::TaskSettings` for their meaning and defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_k: Option<usize>,
    /// Seed of the task's sampled generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The Python interpreter of `python_tests` tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
    /// Wall-clock limit of one program of a `python_tests` task, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Range of this task's score where it is a measure (default `[0, 1]`).
    #[serde(default)]
    pub measure_range: Option<RangeSpec>,
    /// An external evaluator command (argument list) instead of `fitness`.
    #[serde(default)]
    pub evaluator: Option<Vec<String>>,
    #[serde(default = "default_evaluator_timeout")]
    pub evaluator_timeout_s: f64,
    /// The evaluator's working directory (default: the configuration file's folder, so its
    /// relative paths mean what they say in the file).
    #[serde(default)]
    pub evaluator_dir: Option<PathBuf>,
    /// The evaluator talks to the child through an OpenAI-compatible endpoint the engine
    /// serves for its lifetime (`{base_url}`, `{model_name}` in its arguments) instead of
    /// reading an exported copy (`{model}`): no checkpoint is written per child.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serve: bool,
    /// `"full"` or `"racing"`, overriding `evolution.evaluation` for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationKind>,
}

/// How much of a task a child is scored on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvaluationKind {
    /// Every example.
    Full,
    /// Examples in rounds, stopping once the child cannot enter any archive (at
    /// `racing_confidence`); a child that enters is always scored on every example.
    Racing,
}

impl TaskConfig {
    /// The scoring settings this table sets (the rest come from the task file or defaults).
    pub fn settings(&self) -> crate::eval::TaskSettings {
        crate::eval::TaskSettings {
            metric: self.metric.clone(),
            pattern: self.pattern.clone(),
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            chat_template: self.chat_template,
            system: self.system.clone(),
            fewshot: None,
            samples: self.samples,
            temperature: self.temperature,
            top_p: self.top_p,
            pass_k: self.pass_k,
            seed: self.seed,
            interpreter: self.interpreter.clone(),
            timeout_s: self.timeout_s,
            memory_mb: self.memory_mb,
        }
    }

    /// Drops settings equal to what an unset key meant before task files had settings
    /// (`metric = "exact_match"`, `max_new_tokens = 32`, `stop = []`), so a run folder made
    /// then resumes as the same run.
    fn normalized(&self) -> TaskConfig {
        let mut t = self.clone();
        if t.metric.as_deref() == Some("exact_match") {
            t.metric = None;
        }
        if t.max_new_tokens == Some(32) {
            t.max_new_tokens = None;
        }
        if t.stop.as_ref().is_some_and(|s| s.is_empty()) {
            t.stop = None;
        }
        t
    }
}

/// How crossover coefficients are drawn: one pair for the model (CycleQD's code), per layer,
/// or per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Model,
    Layer,
    Tensor,
}

/// `workers = N` or `"auto"`: one worker per GPU found, or one CPU worker using every core.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WorkersSpec {
    Count(usize),
    Name(String),
}

impl WorkersSpec {
    /// `None` for `"auto"`.
    pub fn count(&self) -> std::result::Result<Option<usize>, String> {
        match self {
            WorkersSpec::Count(0) => Err("must be at least 1 (or \"auto\")".into()),
            WorkersSpec::Count(n) => Ok(Some(*n)),
            WorkersSpec::Name(n) if n == "auto" => Ok(None),
            WorkersSpec::Name(n) => Err(format!("`{n}` is not a number or \"auto\"")),
        }
    }
}

/// When results reach the archives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `batch` children are bred from one snapshot of the archives and applied in child order:
    /// the archives are the same for any number of workers (and any failures).
    Batch,
    /// Every worker always holds a child, and its result is applied when it arrives
    /// (CycleQD's asynchronous mode; the archives depend on timing).
    Steady,
}

/// Which model `final/` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalRule {
    /// The archive elite with the highest mean fitness across tasks.
    BestMean,
    /// The paper's `Σ softmax(f)_k · g_k` over each archive's best elite.
    Softmax,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evolution {
    #[serde(default = "default_generations")]
    pub generations: u64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_bins")]
    pub bins: usize,
    #[serde(default = "one")]
    pub crossover_mean: f32,
    #[serde(default = "default_crossover_std")]
    pub crossover_std: f32,
    #[serde(default = "default_granularity")]
    pub crossover_granularity: Granularity,
    /// `linear` (CycleQD), or a mergekit task-vector method that combines a genome's experts
    /// (`ties`, `dare_ties`, …; see [`crate::evolve::crossover`]).
    #[serde(default = "default_crossover")]
    pub crossover: String,
    /// The method's parameters, with mergekit's names (`density`, `lambda`, `normalize`, …).
    #[serde(default)]
    pub crossover_parameters: BTreeMap<String, ParamValue>,
    #[serde(default = "default_w_max")]
    pub mutation_w_max: f32,
    /// `code` (weights in [0.5, 1.3]), `paper` ([alpha_low, alpha_high], default [0.5, 0.8])
    /// or `uniform`.
    #[serde(default = "default_sampling")]
    pub elite_sampling: String,
    #[serde(default)]
    pub alpha_low: Option<f64>,
    #[serde(default)]
    pub alpha_high: Option<f64>,
    #[serde(default = "default_final")]
    pub final_model: FinalRule,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// `N` or `"auto"` (one per GPU found, else one CPU worker on every core).
    #[serde(default = "default_workers")]
    pub workers: WorkersSpec,
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// Children bred per archive snapshot with `schedule = "batch"` (default: the number of
    /// workers of the run's first start; recorded in the run folder's `config.toml`).
    #[serde(default)]
    pub batch: Option<usize>,
    /// Sequences per forward batch when scoring.
    #[serde(default = "default_batch")]
    pub eval_batch: usize,
    /// `"full"` or `"racing"` (per task overridable).
    #[serde(default = "default_evaluation")]
    pub evaluation: EvaluationKind,
    /// Racing: the probability that a child stopped early could in fact have entered an
    /// archive is at most `1 − racing_confidence`.
    #[serde(default = "default_racing_confidence")]
    pub racing_confidence: f64,
    /// Racing: examples per task in the first round.
    #[serde(default = "default_racing_batch")]
    pub racing_batch: usize,
    /// Racing: each round's examples as a multiple of the round before (1: equal rounds).
    #[serde(default = "default_racing_growth")]
    pub racing_growth: f64,
    /// Workers over a broker: evaluations a child may take (a worker that dies or errs on it
    /// costs one) before it is marked failed.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Workers over a broker: how long a child held by a silent worker (its process gone) waits
    /// before another worker takes it over. A working worker renews its hold.
    #[serde(default = "default_visibility")]
    pub visibility_timeout_s: f64,
}

impl Default for Evolution {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub base: PathBuf,
    #[serde(default = "default_rank")]
    pub rank: RankSpec,
    /// Where factors are cached (default: `factors/` in the run folder).
    #[serde(default)]
    pub factor_cache: Option<PathBuf>,
    #[serde(default)]
    pub evolution: Evolution,
    pub tasks: Vec<TaskConfig>,
}

fn default_evaluator_timeout() -> f64 {
    600.0
}
fn default_generations() -> u64 {
    1200
}
fn default_bins() -> usize {
    15
}
fn one() -> f32 {
    1.0
}
fn default_workers() -> WorkersSpec {
    WorkersSpec::Name("auto".into())
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Batch
}
fn default_crossover() -> String {
    "linear".into()
}
fn default_crossover_std() -> f32 {
    0.01
}
fn default_granularity() -> Granularity {
    Granularity::Model
}
fn default_w_max() -> f32 {
    0.1
}
fn default_sampling() -> String {
    "code".into()
}
fn default_final() -> FinalRule {
    FinalRule::BestMean
}
fn default_checkpoint_every() -> u64 {
    25
}
fn default_batch() -> usize {
    256
}
fn default_evaluation() -> EvaluationKind {
    EvaluationKind::Full
}
fn default_racing_confidence() -> f64 {
    0.95
}
fn default_racing_batch() -> usize {
    16
}
fn default_racing_growth() -> f64 {
    2.0
}
fn default_max_attempts() -> u32 {
    2
}
fn default_visibility() -> f64 {
    60.0
}
fn default_rank() -> RankSpec {
    RankSpec::Name("full".into())
}

impl RunConfig {
    /// Reads, resolves paths against the file's folder, and validates.
    pub fn load(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut c: RunConfig = toml::from_str(&text).map_err(|e| {
            // toml's messages span lines (a source excerpt): keep them on one, with the line
            // and the key the error is on.
            let msg = e.message().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line_no = text[..s.start].lines().count().max(1);
                    let line = text[..s.start].rsplit('\n').next().unwrap_or("");
                    let line_end = text[s.start..].split('\n').next().unwrap_or("");
                    let whole = format!("{line}{line_end}");
                    match whole.split_once('=') {
                        Some((key, _)) if !key.trim().is_empty() => {
                            format!("line {line_no}, `{}`: ", key.trim())
                        }
                        _ => format!("line {line_no}: "),
                    }
                })
                .unwrap_or_default();
            Error::config(path, format!("{at}{msg}"))
        })?;
        let parent = path.parent().unwrap_or(Path::new("."));
        let dir = std::path::absolute(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
        .map_err(|e| Error::io(path, e))?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        abs(&mut c.base);
        if let Some(p) = &mut c.factor_cache {
            abs(p);
        }
        for t in &mut c.tasks {
            abs(&mut t.expert);
            if let Some(p) = &mut t.fitness {
                abs(p);
            }
            if let Some(p) = &mut t.heldout {
                abs(p);
            }
            if t.evaluator.is_some() {
                let d = t.evaluator_dir.get_or_insert_with(|| dir.clone());
                abs(d);
            }
        }
        c.validate().map_err(|m| Error::config(path, m))?;
        Ok(c)
    }

    /// A resolved configuration (every path absolute, as a run folder's `config.toml` or a
    /// broker holds it), checked; `origin` names where it came from in errors.
    pub fn parse_resolved(text: &str, origin: &str) -> Result<RunConfig> {
        let c: RunConfig = toml::from_str(text)
            .map_err(|e| Error::config(origin, e.message().replace('\n', " ")))?;
        c.validate().map_err(|m| Error::config(origin, m))?;
        Ok(c)
    }

    /// Rewrites every path that starts with a `from` prefix to start with its `to` instead
    /// (`worker --path-map`: the same files under another mount point on another node).
    pub fn map_paths(&mut self, maps: &[(PathBuf, PathBuf)]) {
        let map = |p: &mut PathBuf| {
            for (from, to) in maps {
                if let Ok(rest) = p.strip_prefix(from) {
                    *p = to.join(rest);
                    return;
                }
            }
        };
        map(&mut self.base);
        if let Some(p) = &mut self.factor_cache {
            map(p);
        }
        for t in &mut self.tasks {
            map(&mut t.expert);
            for p in [&mut t.fitness, &mut t.heldout, &mut t.evaluator_dir]
                .into_iter()
                .flatten()
            {
                map(p);
            }
        }
    }

    /// Checks every value; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.rank.resolve().map_err(|m| format!("`rank`: {m}"))?;
        if self.tasks.len() < 2 {
            return Err(format!(
                "`tasks`: CycleQD needs at least 2 tasks (one expert each), got {}",
                self.tasks.len()
            ));
        }
        for (i, t) in self.tasks.iter().enumerate() {
            let key = |k: &str| format!("`tasks[{i}].{k}` ({})", t.name);
            if t.name.is_empty() || t.name.contains(['/', '\\']) {
                return Err(format!(
                    "{}: must be non-empty, without slashes",
                    key("name")
                ));
            }
            if self.tasks[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("{}: duplicate task name", key("name")));
            }
            match (&t.fitness, &t.evaluator) {
                (None, None) => {
                    return Err(format!(
                        "{}: a task needs `fitness` or `evaluator`",
                        key("fitness")
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{}: give `fitness` or `evaluator`, not both",
                        key("evaluator")
                    ))
                }
                (_, Some(cmd)) if cmd.is_empty() => {
                    return Err(format!("{}: the command is empty", key("evaluator")))
                }
                _ => {}
            }
            if t.serve {
                match &t.evaluator {
                    None => {
                        return Err(format!(
                            "{}: `serve = true` serves the child to an `evaluator`, and this task has none",
                            key("serve")
                        ))
                    }
                    Some(cmd) if cmd.iter().any(|a| a.contains("{model}")) => {
                        return Err(format!(
                            "{}: a served evaluator gets {{base_url}} and {{model_name}}, not {{model}} (no checkpoint is written)",
                            key("evaluator")
                        ))
                    }
                    _ => {}
                }
            }
            if !(t.evaluator_timeout_s > 0.0 && t.evaluator_timeout_s.is_finite()) {
                return Err(format!("{}: must be > 0", key("evaluator_timeout_s")));
            }
            t.settings()
                .check_keys()
                .map_err(|(k, m)| format!("{}: {m}", key(k)))?;
            match &t.measure_range {
                Some(RangeSpec::Explicit([lo, hi]))
                    if lo.partial_cmp(hi) != Some(std::cmp::Ordering::Less) =>
                {
                    return Err(format!(
                        "{}: lo ({lo}) must be below hi ({hi})",
                        key("measure_range")
                    ))
                }
                Some(RangeSpec::Rule(r)) if r != "experts" => {
                    return Err(format!(
                        "{}: `{r}` is not [lo, hi] or \"experts\"",
                        key("measure_range")
                    ))
                }
                _ => {}
            }
        }
        let e = &self.evolution;
        if e.bins < 2 {
            // One bin per measure leaves one cell per archive: never two elites to breed.
            return Err(format!(
                "`evolution.bins`: must be at least 2 (one cell per archive cannot hold the two parents a child needs), got {}",
                e.bins
            ));
        }
        let dims = self.tasks.len() as u32 - 1;
        if (e.bins as u64).checked_pow(dims).is_none() {
            return Err(format!(
                "`evolution.bins`: {} bins over {dims} measures is more cells than a 64-bit count holds",
                e.bins
            ));
        }
        if !(e.racing_confidence > 0.0 && e.racing_confidence < 1.0) {
            return Err(format!(
                "`evolution.racing_confidence`: must be in (0, 1), got {}",
                e.racing_confidence
            ));
        }
        if e.racing_batch == 0 {
            return Err("`evolution.racing_batch`: must be at least 1".into());
        }
        if !(e.racing_growth.is_finite() && e.racing_growth >= 1.0) {
            return Err(format!(
                "`evolution.racing_growth`: must be a number ≥ 1 (1: equal rounds), got {}",
                e.racing_growth
            ));
        }
        if e.max_attempts == 0 {
            return Err("`evolution.max_attempts`: must be at least 1".into());
        }
        if !(e.visibility_timeout_s.is_finite() && e.visibility_timeout_s > 0.0) {
            return Err(
                "`evolution.visibility_timeout_s`: must be a positive number of seconds".into(),
            );
        }
        if !(e.crossover_mean.is_finite() && e.crossover_mean > 0.0) {
            return Err("`evolution.crossover_mean`: must be > 0".into());
        }
        if !(e.crossover_std.is_finite() && e.crossover_std >= 0.0) {
            return Err("`evolution.crossover_std`: must be ≥ 0".into());
        }
        CrossoverMethod::parse(&e.crossover, &e.crossover_parameters)?;
        if !(e.mutation_w_max.is_finite() && e.mutation_w_max >= 0.0) {
            return Err("`evolution.mutation_w_max`: must be ≥ 0".into());
        }
        self.elite_sampling()?;
        if e.checkpoint_every == 0 {
            return Err("`evolution.checkpoint_every`: must be at least 1".into());
        }
        e.workers
            .count()
            .map_err(|m| format!("`evolution.workers`: {m}"))?;
        match (e.schedule, e.batch) {
            (_, Some(0)) => return Err("`evolution.batch`: must be at least 1".into()),
            (ScheduleKind::Steady, Some(_)) => {
                return Err(
                    "`evolution.batch`: not used by schedule = \"steady\" (each worker holds one child)"
                        .into(),
                )
            }
            _ => {}
        }
        if e.eval_batch == 0 {
            return Err("`evolution.eval_batch`: must be at least 1".into());
        }
        Ok(())
    }

    pub fn rank(&self) -> Rank {
        self.rank.resolve().expect("validated")
    }

    pub fn elite_sampling(&self) -> std::result::Result<EliteSampling, String> {
        let e = &self.evolution;
        let (lo, hi) = match e.elite_sampling.as_str() {
            "code" => (0.5, 1.3),
            "paper" => (0.5, 0.8),
            "uniform" => {
                if e.alpha_low.is_some() || e.alpha_high.is_some() {
                    return Err(
                        "`evolution.alpha_low`/`alpha_high`: not used by uniform sampling".into(),
                    );
                }
                return Ok(EliteSampling::Uniform);
            }
            other => {
                return Err(format!(
                    "`evolution.elite_sampling`: `{other}` is not code, paper or uniform"
                ))
            }
        };
        let (alpha_low, alpha_high) = (e.alpha_low.unwrap_or(lo), e.alpha_high.unwrap_or(hi));
        if !(alpha_low.is_finite()
            && alpha_high.is_finite()
            && 0.0 < alpha_low
            && alpha_low <= alpha_high)
        {
            return Err(format!(
                "`evolution.alpha_low`/`alpha_high`: need 0 < low ≤ high, got {alpha_low}, {alpha_high}"
            ));
        }
        Ok(EliteSampling::Weighted {
            alpha_low,
            alpha_high,
        })
    }

    /// The configuration as TOML (the run folder's `config.toml`, paths resolved).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }

    /// Whether a run folder made with `saved` (its resolved configuration) can be continued
    /// with this one: everything that shapes the run must agree. The number of children (a
    /// run may be extended) and the workers (a run may move to another machine) may differ;
    /// an unset `batch` takes the saved one.
    /// The crossover's merge method (`None`: linear), checked by [`RunConfig::validate`].
    pub fn crossover(&self) -> Result<Option<CrossoverMethod>> {
        CrossoverMethod::parse(
            &self.evolution.crossover,
            &self.evolution.crossover_parameters,
        )
        .map_err(Error::invalid)
    }

    pub fn same_run_as(&mut self, saved: &RunConfig) -> bool {
        if self.evolution.batch.is_none() {
            self.evolution.batch = saved.evolution.batch;
        }
        let mut prev = saved.clone();
        prev.evolution.generations = self.evolution.generations;
        prev.evolution.workers = self.evolution.workers.clone();
        // How failures are retried and detected does not change what a child scores.
        prev.evolution.max_attempts = self.evolution.max_attempts;
        prev.evolution.visibility_timeout_s = self.evolution.visibility_timeout_s;
        let mut now = self.clone();
        for t in prev.tasks.iter_mut().chain(now.tasks.iter_mut()) {
            *t = t.normalized();
        }
        prev == now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
base = "base"
[evolution]
generations = 10
[[tasks]]
name = "a"
expert = "ea"
fitness = "a.jsonl"
[[tasks]]
name = "b"
expert = "eb"
fitness = "b.jsonl"
measure_range = [0.0, 0.5]
"#;

    fn load(text: &str) -> Result<RunConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cycleqd.toml");
        std::fs::write(&p, text).unwrap();
        RunConfig::load(&p)
    }

    #[test]
    fn defaults_resolve_and_round_trip() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.rank(), Rank::Full);
        assert!(c.base.is_absolute() && c.tasks[0].fitness.as_ref().unwrap().is_absolute());
        assert_eq!(c.evolution.generations, 10);
        assert_eq!(c.evolution.mutation_w_max, 0.1);
        assert_eq!(c.evolution.crossover_std, 0.01);
        assert_eq!(c.evolution.final_model, FinalRule::BestMean);
        assert_eq!(c.tasks[0].max_new_tokens, None);
        assert_eq!(c.evolution.workers, WorkersSpec::Name("auto".into()));
        assert_eq!(c.evolution.schedule, ScheduleKind::Batch);
        assert_eq!(c.evolution.batch, None);
        let again: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn relative_paths_resolve_from_the_file_and_stay_valid_when_saved_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("cfg");
        std::fs::create_dir_all(&sub).unwrap();
        let text = GOOD.replace(
            "fitness = \"a.jsonl\"",
            "evaluator = [\"sh\", \"score.sh\"]",
        );
        std::fs::write(sub.join("cycleqd.toml"), &text).unwrap();
        // Read through a path relative to the working directory (`../../tmp/…/cfg/…`).
        let cwd = std::env::current_dir().unwrap();
        let up: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
        let relative = up.join(sub.strip_prefix("/").unwrap()).join("cycleqd.toml");
        assert!(relative.is_relative());
        let c = RunConfig::load(&relative).unwrap();
        let same = |p: &Path, want: &Path| {
            assert!(p.is_absolute(), "{}", p.display());
            assert_eq!(
                std::fs::canonicalize(p.parent().unwrap())
                    .unwrap()
                    .join(p.file_name().unwrap()),
                std::fs::canonicalize(want.parent().unwrap())
                    .unwrap()
                    .join(want.file_name().unwrap())
            );
        };
        same(&c.base, &sub.join("base"));
        same(c.tasks[1].fitness.as_deref().unwrap(), &sub.join("b.jsonl"));
        let d = c.tasks[0].evaluator_dir.as_deref().unwrap();
        assert_eq!(
            std::fs::canonicalize(d).unwrap(),
            std::fs::canonicalize(&sub).unwrap()
        );
        // The resolved copy, read from another folder, means the same files.
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("config.toml"), c.to_toml()).unwrap();
        assert_eq!(RunConfig::load(&run.join("config.toml")).unwrap(), c);
    }

    #[test]
    fn a_run_may_change_its_length_and_workers_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let p = dir.path().join("cycleqd.toml");
            std::fs::write(&p, text).unwrap();
            RunConfig::load(&p).unwrap()
        };
        let mut saved = load(GOOD);
        saved.evolution.batch = Some(4);
        let edit = |with: &str| load(&GOOD.replace("generations = 10", with));
        let mut c = edit("generations = 20\nworkers = 3");
        assert!(c.same_run_as(&saved));
        assert_eq!(
            c.evolution.batch,
            Some(4),
            "an unset batch takes the saved one"
        );
        assert!(!edit("generations = 10\nbatch = 2").same_run_as(&saved));
        assert!(!edit("generations = 10\nseed = 5").same_run_as(&saved));
        assert!(!edit("generations = 10\nschedule = \"steady\"").same_run_as(&saved));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        for (edit, want) in [
            (
                ("generations = 10", "generation = 10"),
                "unknown field `generation`",
            ),
            (("[0.0, 0.5]", "[0.5, 0.5]"), "measure_range"),
            (("[0.0, 0.5]", "\"paper\""), "measure_range"),
            (
                ("generations = 10", "generations = 10\nbins = 0"),
                "evolution.bins",
            ),
            (
                ("generations = 10", "generations = 10\nbins = 1"),
                "two parents",
            ),
            (
                ("generations = 10", "generations = 10\nworkers = 0"),
                "evolution.workers",
            ),
            (
                ("generations = 10", "generations = 10\nworkers = \"all\""),
                "evolution.workers",
            ),
            (
                ("generations = 10", "generations = 10\nbatch = 0"),
                "evolution.batch",
            ),
            (
                (
                    "generations = 10",
                    "generations = 10\nschedule = \"steady\"\nbatch = 4",
                ),
                "evolution.batch",
            ),
            (
                ("generations = 10", "generations = 10\nschedule = \"async\""),
                "schedule",
            ),
            (
                ("generations = 10", "generations = 10\nracing_growth = 0.5"),
                "evolution.racing_growth",
            ),
            (
                (
                    "generations = 10",
                    "generations = 10\nelite_sampling = \"x\"",
                ),
                "elite_sampling",
            ),
            (
                (
                    "fitness = \"a.jsonl\"",
                    "fitness = \"a.jsonl\"\nmetric = \"bleu\"",
                ),
                "tasks[0].metric",
            ),
            (
                (
                    "fitness = \"a.jsonl\"",
                    "evaluator = [\"x\"]\nfitness = \"a.jsonl\"",
                ),
                "not both",
            ),
            (("base = \"base\"", "base = \"base\"\nrank = 0"), "`rank`"),
            (("name = \"b\"", "name = \"a\""), "duplicate"),
        ] {
            let text = GOOD.replacen(edit.0, edit.1, 1);
            let e = load(&text).unwrap_err().to_string();
            assert!(
                e.contains("cycleqd.toml") && e.contains(want),
                "{edit:?}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
