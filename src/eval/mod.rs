//! Evaluation: task files (JSONL) and their settings, prompts (plain or through the model's
//! chat template), scoring a model with the engine's own batched inference, programs run in
//! a sandbox (pass@k), and external evaluator commands run on an exported checkpoint.

pub mod external;
pub mod program;
pub mod prompt;
pub mod racing;
pub mod sandbox;
pub mod score;
pub mod settings;
pub mod suite;
pub mod task;

pub use external::{ExternalEvaluator, ExternalFailure};
pub use score::{
    evaluate, evaluate_some, evaluate_with, score_completions, PreparedTask, TaskResult,
};
pub use settings::{Scoring, Shot, TaskSettings};
pub use suite::{Evaluation, RaceDecision, Racing, Scored, TaskScorer, TaskSuite};
pub use task::{Example, Input, Metric, Target, TaskFile};
