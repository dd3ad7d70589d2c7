//! The library's error type: every message names the file, tensor or key and the problem, so a
//! user can act on it without a backtrace.

use std::path::{Path, PathBuf};

/// Errors of the cycleqd-engine library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- files and formats ----
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
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
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
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
