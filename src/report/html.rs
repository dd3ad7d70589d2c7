//! `report.html`: one page, no network and no script: the pictures embedded as PNG data URIs,
//! the table, the final model's lineage, the configuration and the timing.

use std::fmt::Write;

use base64::Engine;
use serde_json::Value;

use super::run_folder::lineage;
use super::{table_rows, FinalModel, ReportInputs};

/// `&`, `<`, `>`, `"` escaped for HTML text and attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "–".into()
    }
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1300px;margin:24px auto;padding:0 16px;\
color:#222}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;\
text-align:right}td:first-child,th:first-child{text-align:left}tr.chosen{background:#e8f4ff;\
font-weight:bold}img{max-width:100%;border:1px solid #eee;margin:8px 0}pre{background:#f6f6f6;\
padding:12px;overflow:auto}.muted{color:#666}";

/// The page; `pictures` are `(file, title, PNG bytes)`.
pub(super) fn page(
    inputs: &ReportInputs,
    finals: &FinalModel,
    pictures: &[(String, String, Vec<u8>)],
) -> String {
    let pop = inputs.pop;
    let mut h = String::new();
    let status = if inputs.summary.is_some() {
        "finished"
    } else {
        "running or interrupted (shown as of the last child in events.jsonl)"
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>CycleQD run: {}</title><style>{STYLE}</style></head><body>\n\
         <h1>CycleQD run: {}</h1>\n<p>Status: <b id=\"status\">{status}</b>. \
         Children applied: <b id=\"children\">{}</b>, failed: <b id=\"failed\">{}</b>, \
         evaluations: <b id=\"evaluations\">{}</b>.</p>\n",
        escape(&pop.tasks.join(", ")),
        escape(&pop.tasks.join(", ")),
        pop.children_done,
        pop.failed,
        pop.evaluations()
    );
    let picture = |h: &mut String, file: &str| {
        if let Some((f, title, png)) = pictures.iter().find(|(f, _, _)| f == file) {
            let _ = writeln!(
                h,
                "<figure><img alt=\"{}\" src=\"data:image/png;base64,{}\">\
                 <figcaption class=\"muted\">{}</figcaption></figure>",
                escape(title),
                base64::engine::general_purpose::STANDARD.encode(png),
                escape(f)
            );
        }
    };

    h.push_str("<h2>Final table</h2>\n");
    match table_rows(inputs.summary) {
        Some(t) => {
            h.push_str("<table id=\"final-table\"><tr><th>model</th>");
            for (task, split) in t
                .tasks
                .iter()
                .zip(t.split.iter().chain(std::iter::repeat(&String::new())))
            {
                let _ = write!(
                    h,
                    "<th>{} <span class=\"muted\">({})</span></th>",
                    escape(task),
                    escape(split)
                );
            }
            h.push_str("<th>mean</th></tr>\n");
            for ((model, scores), mean) in t.rows.iter().zip(&t.means) {
                let chosen = *model == t.chosen;
                let _ = write!(
                    h,
                    "<tr{}><td>{}{}</td>",
                    if chosen { " class=\"chosen\"" } else { "" },
                    escape(model),
                    if chosen { " ← final/" } else { "" }
                );
                for s in scores {
                    let _ = write!(h, "<td>{}</td>", num(*s));
                }
                let _ = writeln!(h, "<td>{}</td></tr>", num(*mean));
            }
            h.push_str("</table>\n");
            if let Some(v) = inputs.summary.and_then(|s| s["verdict"].as_str()) {
                let _ = writeln!(h, "<p>{}</p>", escape(v));
            }
            picture(&mut h, "table.png");
        }
        None => h.push_str("<p class=\"muted\">Written when the run finishes.</p>\n"),
    }

    h.push_str("<h2>Progress</h2>\n");
    picture(&mut h, "curves.png");
    h.push_str("<table id=\"archives\"><tr><th>archive</th><th>elites</th><th>coverage</th><th>QD score</th><th>best objective</th></tr>\n");
    for (a, t) in pop.archives.iter().zip(&pop.tasks) {
        let s = a.stats();
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(t),
            s.num_elites,
            num(s.coverage),
            num(s.qd_score),
            num(s.obj_max.unwrap_or(f64::NAN))
        );
    }
    h.push_str("</table>\n<h2>Archives</h2>\n");
    for t in &pop.tasks {
        picture(&mut h, &format!("archive_{t}.png"));
    }

    let _ = writeln!(
        h,
        "<h2>Lineage of the final model</h2>\n<p>{}: made of {}. Its ancestors, in the \
         order they were made, back to the experts:</p>",
        escape(&finals.label),
        escape(&finals.members.join(", "))
    );
    let members: Vec<&str> = finals.members.iter().map(String::as_str).collect();
    let line = lineage(inputs.events, &members);
    h.push_str(
        "<table id=\"lineage\"><tr><th>id</th><th>child</th><th>quality task</th><th>parents</th>",
    );
    for t in &pop.tasks {
        let _ = write!(h, "<th>{}</th>", escape(t));
    }
    h.push_str("</tr>\n");
    const SHOWN: usize = 300;
    for a in line.iter().rev().take(SHOWN) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            escape(&a.id),
            a.child.map_or("expert".into(), |c| c.to_string()),
            escape(a.quality_task.as_deref().unwrap_or("")),
            escape(&a.parents.join(" × "))
        );
        let fitness = a.fitness.clone().or_else(|| {
            pop.experts
                .iter()
                .find(|e| e.id == a.id)
                .map(|e| e.fitness.clone())
        });
        for v in fitness.unwrap_or_default() {
            let _ = write!(h, "<td>{}</td>", num(v));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    if line.len() > SHOWN {
        let _ = writeln!(
            h,
            "<p class=\"muted\">{} more not shown.</p>",
            line.len() - SHOWN
        );
    }

    h.push_str("<h2>Timing</h2>\n");
    match inputs.summary.map(|s| &s["timing"]) {
        Some(Value::Object(t)) => {
            h.push_str("<table id=\"timing\">");
            for (k, v) in t {
                let v = match v {
                    Value::Number(n) => num(n.as_f64().unwrap_or(f64::NAN)),
                    other => other.to_string(),
                };
                let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(&v));
            }
            h.push_str("</table>\n");
        }
        _ => h.push_str("<p class=\"muted\">Written when the run finishes.</p>\n"),
    }
    h.push_str("<h2>Configuration</h2>\n");
    let _ = writeln!(
        h,
        "<pre id=\"config\">{}</pre>\n</body></html>",
        escape(inputs.config_text.unwrap_or("(config.toml not found)"))
    );
    h
}
