//! The library's error type: every message names the file, tensor or key and the problem, so a
//! user can act on it without a backtrace.

use std::path::{Path, PathBuf};

/// Errors of the cycleqd-engine library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- files and formats ----
    // The cause is part of the message, not a `source`: a context chain printed with `{:#}`
    // would repeat it otherwise ("x: No such file: No such file").
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: invalid JSON: {err}")]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },

    // ---- model configuration ----
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    // ---- weights ----
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    // ---- tokenizer ----
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    // ---- inference and other runtime checks ----
    #[error("{0}")]
    Invalid(String),

    /// The model computed NaN or Inf: its weights are broken (a child whose coefficients
    /// overflow, a checkpoint holding non-finite values), not the machine. A run marks such a
    /// child failed and goes on.
    #[error("{0}")]
    NonFiniteOutput(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
