//! An example's input as token ids. With a chat template (the task's `chat_template = true`,
//! or a line with `messages`), the conversation is the system prompt, each few-shot example as
//! a user turn and an assistant turn (lm-eval's multi-turn few-shot), then the prompt as the
//! last user turn (or the line's messages); it is rendered with the generation prompt and
//! tokenised as transformers does (special tokens in the text are special tokens, nothing is
//! added: a BOS the template wrote is the only one). Without a template, the text is the system
//! prompt and the few-shot blocks (`prompt answer`, lm-eval's delimiters) before the prompt,
//! tokenised with the tokenizer's own special tokens (BOS for Llama).

use minijinja::Value;

use super::settings::Scoring;
use super::task::Input;
use crate::model::Tokenizer;

/// lm-eval's defaults: between a few-shot prompt and its answer, and between examples.
const TARGET_DELIMITER: &str = " ";
const FEWSHOT_DELIMITER: &str = "\n\n";

/// An input ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    /// The text the ids encode (a choice's continuation is appended to it).
    pub text: String,
    /// Rendered with the chat template (then a continuation is encoded without special
    /// tokens too).
    pub chat: bool,
}

fn message(role: &str, content: &str) -> Value {
    Value::from_pairs([
        ("role", Value::from(role)),
        ("content", Value::from(content)),
    ])
}

/// Renders and tokenises `input` under `scoring`'s settings.
pub fn render(tok: &Tokenizer, scoring: &Scoring, input: &Input) -> Result<Rendered, String> {
    let chat = scoring.chat_template || matches!(input, Input::Messages(_));
    if chat {
        let template = tok
            .chat_template()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "the model {} has no chat template (no chat_template.jinja, and no \
                     `chat_template` in tokenizer_config.json); set chat_template = false \
                     and use `prompt` lines",
                    tok.dir().display()
                )
            })?;
        let mut messages = vec![];
        let has_system = matches!(input, Input::Messages(m) if m.first().is_some_and(|m| {
            m.get_attr("role").ok().and_then(|r| r.as_str().map(|r| r == "system")).unwrap_or(false)
        }));
        if let (Some(system), false) = (&scoring.system, has_system) {
            messages.push(message("system", system));
        }
        for shot in &scoring.fewshot {
            messages.push(message("user", &shot.prompt));
            messages.push(message("assistant", &shot.answer));
        }
        match input {
            Input::Prompt(p) => messages.push(message("user", p)),
            Input::Messages(m) => messages.extend(m.iter().cloned()),
        }
        let text = template
            .render(&messages, true)
            .map_err(|e| e.to_string())?;
        let ids = tok.encode_plain(&text).map_err(|e| e.to_string())?;
        Ok(Rendered { ids, text, chat })
    } else {
        let Input::Prompt(prompt) = input else {
            unreachable!("messages are always rendered with the template")
        };
        let mut text = String::new();
        if let Some(system) = &scoring.system {
            text.push_str(system);
            text.push_str(FEWSHOT_DELIMITER);
        }
        for shot in &scoring.fewshot {
            text.push_str(&shot.prompt);
            text.push_str(TARGET_DELIMITER);
            text.push_str(&shot.answer);
            text.push_str(FEWSHOT_DELIMITER);
        }
        text.push_str(prompt);
        let ids = tok.encode(&text).map_err(|e| e.to_string())?;
        Ok(Rendered { ids, text, chat })
    }
}

/// The ids of `choice` after a rendered prompt, as lm-eval-harness takes them: the encoding of
/// the prompt and choice together minus the prompt's ids when those are a prefix (merges
/// across the boundary kept), else the choice encoded alone.
pub fn continuation(tok: &Tokenizer, prompt: &Rendered, choice: &str) -> Result<Vec<u32>, String> {
    let joined = format!("{}{choice}", prompt.text);
    let whole = if prompt.chat {
        tok.encode_plain(&joined)
    } else {
        tok.encode(&joined)
    }
    .map_err(|e| e.to_string())?;
    if whole.len() > prompt.ids.len() && whole.starts_with(&prompt.ids) {
        Ok(whole[prompt.ids.len()..].to_vec())
    } else {
        tok.encode_plain(choice).map_err(|e| e.to_string())
    }
}
