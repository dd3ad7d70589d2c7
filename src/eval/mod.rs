//! Evaluation: task files (JSONL), scoring a model with the engine's own batched inference, and
//! external evaluator commands run on an exported checkpoint.

pub mod external;
pub mod sandbox;
pub mod score;
pub mod suite;
pub mod task;

pub use external::{ExternalEvaluator, ExternalFailure};
pub use score::{evaluate, PreparedTask, TaskResult};
pub use suite::{Scored, TaskScorer, TaskSuite};
pub use task::{Example, Metric, Scoring, TaskFile};
