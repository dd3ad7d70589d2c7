//! Chat templates, rendered as transformers' `apply_chat_template` renders them: the Jinja
//! template from `chat_template.jinja` (or `tokenizer_config.json`'s `chat_template`, a string
//! or a list of named templates), with `trim_blocks` and `lstrip_blocks`, loop controls, the
//! globals transformers adds (`raise_exception`, `strftime_now`), its `tojson` (Python's
//! `json.dumps`, not HTML-escaping), Python's string and dict methods, the named special tokens
//! (`bos_token`, `eos_token`, …) as variables, and Python's way of printing values (`None`,
//! `True`, `[1, 'a']`). The engine is minijinja, a maintained Jinja implementation in Rust; no
//! string replacement stands in for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// The file that holds a checkpoint's default template (transformers ≥ 4.43 writes it).
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// Named extra templates beside it (`<name>.jinja`).
pub const TEMPLATE_DIR: &str = "additional_chat_templates";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// The special tokens transformers passes to every template by name (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Roles a message may have. Anything else is refused before rendering (a typo such as
/// `"asistant"` would otherwise be rendered silently, or not at all, by most templates).
pub const ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "ipython",
    "developer",
];

/// A checkpoint's chat template, ready to render.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// Where the template came from, for errors.
    origin: PathBuf,
    /// `bos_token`, `eos_token`, … as strings.
    special: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.origin.display())
    }
}

impl ChatTemplate {
    /// The default template of checkpoint `dir`, or `None` when it has none. Like transformers,
    /// `chat_template.jinja` wins over `tokenizer_config.json`; a set of named templates needs
    /// one named `default`.
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str::<Json>(&text).map_err(|err| Error::Json {
                    path: config_path.clone(),
                    err,
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&config_path, e)),
        };
        let mut special = BTreeMap::new();
        // special_tokens_map.json is the legacy home of the same names; tokenizer_config wins.
        let legacy_path = dir.join("special_tokens_map.json");
        if let Ok(text) = std::fs::read_to_string(&legacy_path) {
            let legacy: Json = serde_json::from_str(&text).map_err(|err| Error::Json {
                path: legacy_path.clone(),
                err,
            })?;
            read_special_tokens(&legacy, &mut special);
        }
        if let Some(c) = &config {
            read_special_tokens(c, &mut special);
        }

        let file = dir.join(TEMPLATE_FILE);
        let (source, origin) = if file.is_file() {
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
            (text, file)
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(Json::Null) => return Ok(None),
                Some(Json::String(s)) => (s.clone(), config_path.clone()),
                Some(Json::Array(list)) => (default_of(list, &config_path)?, config_path.clone()),
                Some(other) => {
                    return Err(Error::format(
                        &config_path,
                        format!(
                        "`chat_template` must be a string or a list of {{name, template}}, got {}",
                        kind_of(other)
                    ),
                    ))
                }
            }
        };
        Self::new(&source, origin, special).map(Some)
    }

    /// A template from its source; `special` holds the special-token variables.
    pub fn new(
        source: &str,
        origin: PathBuf,
        special: BTreeMap<String, String>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            if !value.is_undefined() {
                out.write_str(&python_str(value))?;
            }
            Ok(())
        });
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        let source = without_generation_tags(source);
        env.add_template_owned("chat_template", source)
            .map_err(|e| Error::format(&origin, format!("chat template: {}", one_line(&e))))?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            origin,
            special,
        })
    }

    /// Where the template was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The value of a special-token variable (`bos_token`), if the tokenizer sets it.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special.get(name).map(String::as_str)
    }

    /// Renders `messages` (each a map with a known `role`), with the generation prompt when
    /// asked, exactly as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=…)` does.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::invalid(
                "a chat needs at least one message (transformers refuses an empty one too)",
            ));
        }
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                normalize_message(m).map_err(|e| Error::invalid(format!("message {i}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut ctx: Vec<(String, Value)> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        ctx.extend([
            ("messages".to_string(), Value::from(messages)),
            ("tools".to_string(), Value::from(())),
            ("documents".to_string(), Value::from(())),
            (
                "add_generation_prompt".to_string(),
                Value::from(add_generation_prompt),
            ),
        ]);
        let tmpl = self
            .env
            .get_template("chat_template")
            .expect("added at construction");
        tmpl.render(Value::from_pairs(ctx)).map_err(|e| {
            Error::format(
                &self.origin,
                format!("chat template failed to render: {}", one_line(&e)),
            )
        })
    }
}

/// Reads the named special tokens of a tokenizer configuration: a string, or an `AddedToken`
/// object (`{"content": …}`).
fn read_special_tokens(config: &Json, out: &mut BTreeMap<String, String>) {
    for name in SPECIAL_TOKEN_NAMES {
        let token = match config.get(name) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(String::from),
            _ => None,
        };
        if let Some(t) = token {
            out.insert(name.to_string(), t);
        }
    }
}

/// The template named `default` in a list of `{name, template}`.
fn default_of(list: &[Json], path: &Path) -> Result<String> {
    let mut names = vec![];
    for t in list {
        let (Some(name), Some(template)) = (
            t.get("name").and_then(Json::as_str),
            t.get("template").and_then(Json::as_str),
        ) else {
            return Err(Error::format(
                path,
                "`chat_template` list entries must be {\"name\": …, \"template\": …}",
            ));
        };
        if name == "default" {
            return Ok(template.to_string());
        }
        names.push(name.to_string());
    }
    Err(Error::format(
        path,
        format!(
            "`chat_template` has several templates ({}) and none named `default`",
            names.join(", ")
        ),
    ))
}

fn kind_of(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// A minijinja error on one line, with the template line when it has one.
fn one_line(e: &minijinja::Error) -> String {
    let mut s = e
        .detail()
        .map(String::from)
        .unwrap_or_else(|| e.kind().to_string());
    if e.kind() != ErrorKind::InvalidOperation || e.detail().is_none() {
        s = e.to_string();
    }
    if let Some(line) = e.line() {
        if !s.contains("line") {
            s.push_str(&format!(" (template line {line})"));
        }
    }
    s.replace('\n', " ")
}

/// transformers' `{% generation %}…{% endgeneration %}` marks the assistant's spans for a
/// training mask and renders its body unchanged: the same as an `if true` block, whitespace
/// controls kept.
fn without_generation_tags(source: &str) -> String {
    let re = regex::Regex::new(r"\{%(-|\+)?\s*(end)?generation\s*(-|\+)?%\}").expect("valid regex");
    re.replace_all(source, |c: &regex::Captures| {
        let (open, close) = (
            c.get(1).map_or("", |m| m.as_str()),
            c.get(3).map_or("", |m| m.as_str()),
        );
        let tag = if c.get(2).is_some() {
            "endif"
        } else {
            "if true"
        };
        format!("{{%{open} {tag} {close}%}}")
    })
    .into_owned()
}

/// A message as transformers 5 hands it to the template: keys whose value is null dropped, and
/// the reasoning under every name templates read (`thinking`, `reasoning_content`).
fn normalize_message(m: &Value) -> std::result::Result<Value, String> {
    if m.kind() != ValueKind::Map {
        return Err(format!(
            "must be an object with `role` and `content`, got {}",
            m.kind()
        ));
    }
    let mut pairs: Vec<(String, Value)> = vec![];
    for key in m.try_iter().map_err(|e| e.to_string())? {
        let v = m.get_item(&key).map_err(|e| e.to_string())?;
        if !v.is_none() {
            pairs.push((key.to_string(), v));
        }
    }
    let role = pairs
        .iter()
        .find(|(k, _)| k == "role")
        .map(|(_, v)| v.clone())
        .ok_or("has no `role`")?;
    match role.as_str() {
        Some(r) if ROLES.contains(&r) => {}
        Some(r) => return Err(format!("unknown role `{r}` (one of {})", ROLES.join(", "))),
        None => return Err(format!("`role` must be a string, got {}", role.kind())),
    }
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    let reasoning = REASONING.iter().find_map(|name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    });
    if let Some(r) = reasoning {
        // {"thinking": r, **message, "reasoning_content": r}, in Python's key order.
        let mut out: Vec<(String, Value)> = vec![("thinking".into(), r.clone())];
        for (k, v) in pairs {
            match k.as_str() {
                "thinking" => out[0].1 = r.clone(),
                "reasoning_content" => out.push((k, r.clone())),
                _ => out.push((k, v)),
            }
        }
        if !out.iter().any(|(k, _)| k == "reasoning_content") {
            out.push(("reasoning_content".into(), r));
        }
        pairs = out;
    }
    Ok(Value::from_pairs(pairs))
}

/// `datetime.now().strftime(fmt)`: local time, formatted by the C library as Python does.
fn strftime_now(fmt: &str) -> std::result::Result<String, minijinja::Error> {
    let c_fmt = std::ffi::CString::new(fmt).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: NUL in the format",
        )
    })?;
    // SAFETY: `time` and `localtime_r` write only into the `tm` we own; `strftime` writes at most
    // `buf.len()` bytes and returns how many.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: the local time is unavailable",
            ));
        }
        let mut buf = vec![0u8; 256 + fmt.len() * 8];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_fmt.as_ptr(), &tm);
        buf.truncate(n);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with those keyword arguments.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            match (
                parts.first().and_then(|v| v.as_str()),
                parts.get(1).and_then(|v| v.as_str()),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonStyle {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    opts.write(&value, 0, &mut out)?;
    Ok(out)
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(
        &self,
        v: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(v)),
            ValueKind::String => json_string(v.as_str().unwrap_or(""), self.ensure_ascii, out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(key_text);
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    json_string(&key_text(k), self.ensure_ascii, out);
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {} is not JSON serializable", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// A dict key as `json.dumps` writes it (strings as they are, numbers and booleans as text).
fn key_text(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or("").to_string(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Number => python_number(k),
        _ => k.to_string(),
    }
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A number as Python prints it: integers as they are, floats by `repr` (`1.0`, `1e+16`,
/// `1e-05`, `inf`→`Infinity` in JSON is handled by the caller's context).
fn python_number(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    match f64::try_from(v.clone()) {
        Ok(x) => python_float_repr(x),
        Err(_) => v.to_string(),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation for
/// exponents in [-4, 16) (always with a fractional part), else in scientific notation with a
/// signed two-digit exponent.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

/// Python's `str()` of a value, which is what Jinja2 prints: strings as they are, `None`,
/// `True`/`False`, floats by `repr`, and containers by `repr`.
fn python_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or("").to_string(),
        _ => python_repr(v),
    }
}

fn python_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => (if v.is_true() { "True" } else { "False" }).into(),
        ValueKind::Number => {
            if v.is_integer() {
                v.to_string()
            } else {
                match f64::try_from(v.clone()) {
                    Ok(x) if x.is_nan() => "nan".into(),
                    Ok(x) if x.is_infinite() => (if x > 0.0 { "inf" } else { "-inf" }).into(),
                    Ok(x) => python_float_repr(x),
                    Err(_) => v.to_string(),
                }
            }
        }
        ValueKind::String => python_string_repr(v.as_str().unwrap_or("")),
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter().map(|i| i.collect()).unwrap_or_default();
            let items: Vec<String> = keys
                .iter()
                .map(|k| {
                    let val = v.get_item(k).unwrap_or(Value::UNDEFINED);
                    format!("{}: {}", python_repr(k), python_repr(&val))
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = v
                .try_iter()
                .map(|i| i.map(|x| python_repr(&x)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text has one and no double quote.
fn python_string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Messages from JSON text (a list, or an object with `messages`), in the order their keys
/// are written (templates that print a message with `tojson` show them in that order).
pub fn messages_from_json(text: &str) -> std::result::Result<Vec<Value>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let list = if v.kind() == ValueKind::Map {
        v.get_attr("messages")
            .ok()
            .filter(|m| !m.is_undefined())
            .ok_or("an object must hold `messages`")?
    } else {
        v
    };
    if list.kind() != ValueKind::Seq {
        return Err(format!("messages must be a list, got {}", list.kind()));
    }
    Ok(list.try_iter().map_err(|e| e.to_string())?.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        let special = BTreeMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ]);
        ChatTemplate::new(src, PathBuf::from("t.jinja"), special).unwrap()
    }

    fn msgs(json: &str) -> Vec<Value> {
        messages_from_json(json).unwrap()
    }

    #[test]
    fn python_float_repr_matches_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.0, "123456789012345.0"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (3.0e100, "3e+100"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = template(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|\
             {{ messages[0] | tojson(sort_keys=true, separators=(',', ':')) }}",
        );
        let out = t
            .render(
                &msgs(
                    r#"[{"role": "user", "content": "a\"<é>\n", "x": [1, 2.5, true, null, {}]}]"#,
                ),
                false,
            )
            .unwrap();
        let parts: Vec<&str> = out.split('|').collect();
        assert_eq!(
            parts[0],
            r#"{"role": "user", "content": "a\"<é>\n", "x": [1, 2.5, true, null, {}]}"#
        );
        assert_eq!(
            parts[1],
            "{\n  \"role\": \"user\",\n  \"content\": \"a\\\"<é>\\n\",\n  \"x\": [\n    1,\n    2.5,\n    true,\n    null,\n    {}\n  ]\n}"
        );
        assert_eq!(
            parts[2],
            r#"{"content":"a\"<é>\n","role":"user","x":[1,2.5,true,null,{}]}"#
        );
    }

    #[test]
    fn values_print_as_python_prints_them() {
        let t = template(
            "{{ messages[0].x }} {{ messages[0].n }} {{ messages[0].b }} {{ messages[0].f }}",
        );
        let out = t
            .render(
                &msgs(r#"[{"role": "user", "x": [1, "it's", {"k": 1.0}], "n": 3, "b": false, "f": 1e-5}]"#),
                false,
            )
            .unwrap();
        assert_eq!(out, r#"[1, "it's", {'k': 1.0}] 3 False 1e-05"#);
    }

    #[test]
    fn trims_blocks_and_strips_them_as_transformers_configures_jinja() {
        let t = template(
            "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n[U]{{ m.content | trim }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}[A]{% endif %}",
        );
        let out = t
            .render(&msgs(r#"[{"role": "user", "content": " hi "}]"#), true)
            .unwrap();
        assert_eq!(out, "<s>\n[U]hi\n[A]");
    }

    #[test]
    fn globals_methods_and_loop_controls() {
        let t = template(
            "{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}\
             {{ m.content.strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}{% endfor %}\
             {% if messages | length > 2 %}{{ raise_exception('too many: ' ~ messages | length) }}{% endif %}",
        );
        let two =
            msgs(r#"[{"role": "user", "content": " ab "}, {"role": "assistant", "content": "c"}]"#);
        assert_eq!(t.render(&two, false).unwrap(), "AB!C");
        let three = msgs(
            r#"[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]"#,
        );
        let e = t.render(&three, false).unwrap_err().to_string();
        assert!(e.contains("t.jinja") && e.contains("too many: 3"), "{e}");
        assert_eq!(e.lines().count(), 1);
        let year = template("{{ strftime_now('%Y') }}")
            .render(&two, false)
            .unwrap();
        assert!(year.len() == 4 && year.starts_with("20"), "{year}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = template("{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}");
        assert_eq!(
            t.render(&msgs(r#"[{"role": "assistant", "content": "x"}]"#), false)
                .unwrap(),
            "<x>"
        );
    }

    #[test]
    fn messages_are_checked_and_normalised() {
        let t = template("{% for m in messages %}{{ m | tojson }}{% endfor %}");
        let e = t
            .render(&msgs(r#"[{"role": "asistant", "content": "x"}]"#), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown role `asistant`"), "{e}");
        assert!(t.render(&msgs(r#"[{"content": "x"}]"#), false).is_err());
        assert!(t.render(&[], false).is_err());
        let out = t
            .render(
                &msgs(r#"[{"role": "assistant", "content": "x", "tool_calls": null, "reasoning": "r"}]"#),
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            r#"{"thinking": "r", "role": "assistant", "content": "x", "reasoning": "r", "reasoning_content": "r"}"#
        );
    }

    #[test]
    fn templates_come_from_the_jinja_file_or_the_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG),
            r#"{"bos_token": {"content": "<B>", "special": true}, "chat_template": [
                {"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        let m = msgs(r#"[{"role": "user", "content": "x"}]"#);
        assert_eq!(t.render(&m, false).unwrap(), "<B>D");
        std::fs::write(dir.path().join(TEMPLATE_FILE), "J{{ eos_token }}").unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&m, false).unwrap(), "J");
        std::fs::write(dir.path().join(TEMPLATE_FILE), "{% if %}").unwrap();
        let e = ChatTemplate::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains(TEMPLATE_FILE) && e.lines().count() == 1, "{e}");
    }
}
