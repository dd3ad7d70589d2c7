//! `tokenizer.json` through the `tokenizers` crate, with errors that name the file, and the
//! checkpoint's chat template beside it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::chat::ChatTemplate;
use crate::error::{Error, Result};

/// A Hugging Face fast tokenizer loaded from a checkpoint directory.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// The folder's chat template, read when first asked for (a model whose template is
    /// broken is fine for tasks that do not use it).
    chat: Arc<OnceLock<std::result::Result<Option<ChatTemplate>, String>>>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: "file is missing".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("invalid tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            chat: Arc::default(),
        })
    }

    /// The chat template of the tokenizer's folder (`chat_template.jinja` or
    /// `tokenizer_config.json`), `None` when it has none.
    pub fn chat_template(&self) -> Result<Option<&ChatTemplate>> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.chat
            .get_or_init(|| ChatTemplate::from_dir(dir).map_err(|e| e.to_string()))
            .as_ref()
            .map(Option::as_ref)
            .map_err(|e| Error::invalid(e.clone()))
    }

    /// The folder the tokenizer was read from.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds (BOS for
    /// Llama), as `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without special tokens (a continuation after a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given by its text (e.g. `<|end_of_text|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}
