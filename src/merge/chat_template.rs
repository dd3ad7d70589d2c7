//! `chat_template:` of a merge configuration, as mergekit reads it: `auto` (the template most
//! of the input models have, the first seen on a tie; none when no model has one), a built-in
//! name, or Jinja text. The result is written as the output's `chat_template.jinja`.

use std::path::Path;

use crate::error::{Error, Result};

/// The built-in templates (the formats' usual renderings).
const BUILT_IN: &[(&str, &str)] = &[
    (
        "chatml",
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
         message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}\
         {{ '<|im_start|>assistant\\n' }}{% endif %}",
    ),
    (
        "llama3",
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + \
         '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\
         {% endif %}",
    ),
];

/// The template text `spec` stands for; `models` are the merge's input folders (for `auto`).
pub fn resolve(spec: &str, models: &[&Path]) -> Result<Option<String>> {
    if spec == "auto" {
        let mut seen: Vec<(String, usize)> = vec![];
        for dir in models {
            if let Some(t) = model_template(dir)? {
                let t = t.trim().to_string();
                match seen.iter_mut().find(|(s, _)| *s == t) {
                    Some((_, n)) => *n += 1,
                    None => seen.push((t, 1)),
                }
            }
        }
        // The first of the most frequent (Counter.most_common keeps insertion order on ties).
        let best = seen.iter().map(|(_, n)| *n).max();
        return Ok(best.and_then(|b| seen.into_iter().find(|(_, n)| *n == b).map(|(t, _)| t)));
    }
    if let Some((_, t)) = BUILT_IN.iter().find(|(n, _)| *n == spec) {
        return Ok(Some(t.to_string()));
    }
    if spec.len() < 20 || !spec.contains('{') {
        let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        return Err(Error::invalid(format!(
            "`chat_template: {spec}` is neither `auto`, a built-in template ({}) nor Jinja text",
            names.join(", ")
        )));
    }
    Ok(Some(spec.to_string()))
}

/// A model folder's own template: `chat_template.jinja`, else `tokenizer_config.json`'s
/// `chat_template` (a string, or the `default` of a named list).
fn model_template(dir: &Path) -> Result<Option<String>> {
    let file = dir.join(crate::model::chat::TEMPLATE_FILE);
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|e| Error::io(&file, e));
    }
    let cfg = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&cfg) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&cfg, format!("{e}")))?;
    Ok(match &v["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path, name: &str, template: Option<&str>) -> std::path::PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = match template {
            Some(t) => serde_json::json!({ "chat_template": t }),
            None => serde_json::json!({}),
        };
        std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        d
    }

    #[test]
    fn auto_takes_the_most_common_template() {
        let dir = tempfile::tempdir().unwrap();
        let a = model(dir.path(), "a", Some("{{ 'A' }} template one"));
        let b = model(dir.path(), "b", Some("{{ 'B' }} template two"));
        let c = model(dir.path(), "c", Some("{{ 'B' }} template two\n"));
        let d = model(dir.path(), "d", None);
        let got = resolve("auto", &[&a, &b, &c, &d]).unwrap();
        assert_eq!(got.as_deref(), Some("{{ 'B' }} template two"));
        // A tie goes to the first seen; no template anywhere gives none.
        let got = resolve("auto", &[&a, &b]).unwrap();
        assert_eq!(got.as_deref(), Some("{{ 'A' }} template one"));
        assert_eq!(resolve("auto", &[&d]).unwrap(), None);
    }

    #[test]
    fn names_and_text() {
        assert!(resolve("chatml", &[])
            .unwrap()
            .unwrap()
            .contains("<|im_start|>"));
        assert!(resolve("llama3", &[])
            .unwrap()
            .unwrap()
            .contains("<|eot_id|>"));
        let jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
        assert_eq!(resolve(jinja, &[]).unwrap().as_deref(), Some(jinja));
        let e = resolve("vicuna", &[]).unwrap_err().to_string();
        assert!(
            e.contains("`chat_template: vicuna`") && e.contains("chatml"),
            "{e}"
        );
    }
}
