//! `cycleqd-engine prompt --model DIR --messages FILE.json`: a conversation rendered with the
//! checkpoint's chat template, printed exactly (no newline added), to compare with
//! transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Args;

use cycleqd_engine::model::chat::{
    messages_from_json, ChatTemplate, TEMPLATE_FILE, TOKENIZER_CONFIG,
};

#[derive(Args, Debug)]
pub struct PromptArgs {
    /// Checkpoint directory (tokenizer_config.json or chat_template.jinja).
    #[arg(long)]
    model: PathBuf,
    /// A JSON list of {"role", "content"} messages (or an object holding `messages`).
    #[arg(long)]
    messages: PathBuf,
    /// Render without the assistant header that asks the model to answer.
    #[arg(long)]
    no_generation_prompt: bool,
}

pub fn run(a: PromptArgs) -> anyhow::Result<ExitCode> {
    let template = ChatTemplate::from_dir(&a.model)?.ok_or_else(|| {
        anyhow!(
            "{}: has no chat template (no {TEMPLATE_FILE}, and no `chat_template` in {TOKENIZER_CONFIG})",
            a.model.display()
        )
    })?;
    let text =
        std::fs::read_to_string(&a.messages).with_context(|| a.messages.display().to_string())?;
    let messages =
        messages_from_json(&text).map_err(|e| anyhow!("{}: {e}", a.messages.display()))?;
    let rendered = template
        .render(&messages, !a.no_generation_prompt)
        .map_err(|e| anyhow!("{}: {e}", a.messages.display()))?;
    let mut out = std::io::stdout().lock();
    out.write_all(rendered.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
