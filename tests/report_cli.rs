//! A run's report: the pictures' sizes, `report.html`'s numbers against `summary.json`,
//! `report` on a finished run, on an interrupted one and on bad input, `--top`, and (where a
//! Chromium is installed) the page rendered by a real headless browser.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, demo, read, run, run_to_end, set_key, stderr};

/// A PNG's width and height, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = read(path);
    assert!(
        b.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let end = html[start..]
        .find("</table>")
        .map_or(html.len(), |e| start + e);
    &html[start..end]
}

fn finished_run(dir: &Path) -> PathBuf {
    let cfg = demo(dir, |t| set_key(t, "generations", "40"));
    let out = dir.join("run");
    let o = run_to_end(&cfg, &out);
    assert!(o.status.success(), "run: {}", stderr(&o));
    out
}

#[test]
fn the_report_shows_the_run_and_its_numbers_are_summary_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = finished_run(dir.path());
    let summary: serde_json::Value =
        serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    let tasks: Vec<&str> = summary["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let report = out.join("report");
    assert_eq!(png_size(&report.join("curves.png")), (1260, 420));
    for t in &tasks {
        // Three tasks: two measures, one grid beside the colour bar.
        assert_eq!(
            png_size(&report.join(format!("archive_{t}.png"))),
            (610, 484)
        );
    }
    let rows = summary["table"].as_array().unwrap();
    assert_eq!(
        png_size(&report.join("table.png")),
        (1100, 130 + 34 * rows.len() as u32)
    );

    let html = String::from_utf8(read(&report.join("report.html"))).unwrap();
    assert!(!html.contains("<script"), "the page needs no script");
    assert!(!html.contains("http://") && !html.contains("https://"));
    for (id, key) in [
        ("children", "children"),
        ("failed", "failed_children"),
        ("evaluations", "evaluations"),
    ] {
        let want = summary[key].to_string();
        assert!(
            html.contains(&format!("id=\"{id}\">{want}<")),
            "#{id} is not {want}"
        );
    }
    let table = section(&html, "final-table");
    let html_rows: Vec<&str> = table.split("<tr").skip(2).collect();
    assert_eq!(html_rows.len(), rows.len());
    for (r, h) in rows.iter().zip(&html_rows) {
        let model = r["model"].as_str().unwrap();
        assert!(h.contains(model), "{model} not in {h}");
        for v in r["heldout"].as_array().unwrap() {
            let s = format!("<td>{:.4}</td>", v.as_f64().unwrap());
            assert!(h.contains(&s), "{model}: {s} not in {h}");
        }
        let mean = format!("<td>{:.4}</td>", r["mean"].as_f64().unwrap());
        assert!(
            h.ends_with(&format!("{mean}</tr>\n")),
            "{model}: mean {mean}"
        );
        let chosen = summary["final"]["model"].as_str().unwrap() == model;
        assert_eq!(h.contains("class=\"chosen\""), chosen, "{model}");
    }
    for (a, t) in summary["archives"].as_array().unwrap().iter().zip(&tasks) {
        let s = &a["stats"];
        let row = format!(
            "<tr><td>{t}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td>",
            s["num_elites"],
            s["coverage"].as_f64().unwrap(),
            s["qd_score"].as_f64().unwrap()
        );
        assert!(section(&html, "archives").contains(&row), "{row}");
    }
    // The lineage reaches the experts.
    let lineage = section(&html, "lineage");
    assert!(lineage.contains("<td>expert</td>"), "{lineage}");
    assert_eq!(
        html.matches("data:image/png;base64,").count(),
        2 + tasks.len()
    );

    // `report` rebuilds the same pictures elsewhere, and --json says what it wrote.
    let again = dir.path().join("again");
    let o = run(&[
        "report",
        out.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "report: {}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["finished"], true);
    for p in j["pictures"].as_array().unwrap() {
        let f = p["file"].as_str().unwrap();
        assert_eq!(png_size(&again.join(f)), png_size(&report.join(f)), "{f}");
    }
    assert_eq!(
        read(&again.join("curves.png")),
        read(&report.join("curves.png"))
    );

    // --top lists an archive's best elites, as archives/<task>.json holds them.
    let o = run(&[
        "report",
        out.to_str().unwrap(),
        "--top",
        "3",
        "--task",
        tasks[0],
        "--json",
    ]);
    assert!(o.status.success(), "report --top: {}", stderr(&o));
    let top: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let archive: serde_json::Value =
        serde_json::from_slice(&read(&out.join(format!("archives/{}.json", tasks[0])))).unwrap();
    let mut best: Vec<f64> = archive["elites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["objective"].as_f64().unwrap())
        .collect();
    best.sort_by(|a, b| b.total_cmp(a));
    let got: Vec<f64> = top
        .iter()
        .map(|e| e["objective"].as_f64().unwrap())
        .collect();
    assert_eq!(got, best[..got.len().min(3)].to_vec());
    assert!(top
        .iter()
        .all(|e| !e["experts"].as_array().unwrap().is_empty()));
    let o = run(&[
        "report",
        out.to_str().unwrap(),
        "--top",
        "3",
        "--task",
        "nope",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("no task `nope`"));
}

#[test]
fn report_works_on_an_interrupted_run_and_refuses_bad_folders() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo(dir.path(), |t| set_key(t, "generations", "80"));
    let out = dir.path().join("run");
    let o = bin()
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("CYCLEQD_SIGNAL_AT", "50:KILL")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!out.join("summary.json").exists());
    std::fs::remove_dir_all(out.join("report")).ok();
    let o = run(&["report", out.to_str().unwrap()]);
    assert!(o.status.success(), "report: {}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    // The log's 50 children, whatever the last checkpoint counted.
    assert!(
        text.contains("not finished") && text.contains("50 children"),
        "{text}"
    );
    let html = String::from_utf8(read(&out.join("report/report.html"))).unwrap();
    assert!(html.contains("running or interrupted"));
    assert!(png_size(&out.join("report/curves.png")).0 > 0);
    assert!(!out.join("report/table.png").exists());

    // Not a run folder; a corrupted log: one line each, non-zero.
    let o = run(&["report", dir.path().to_str().unwrap()]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("not a run folder"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let log = out.join("events.jsonl");
    let mut bytes = read(&log);
    // The third event loses its closing brace (bytes inside a string would still parse).
    let third_end = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(2)
        .unwrap()
        .0;
    assert_eq!(bytes[third_end - 1], b'}');
    bytes[third_end - 1] = b' ';
    std::fs::write(&log, bytes).unwrap();
    let o = run(&["report", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("events.jsonl"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A Chromium from the distribution's packages, if one is installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|c| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(c))
                .find(|p| p.is_file())
        })
}

#[test]
fn a_headless_browser_renders_the_report() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: no chromium on PATH (Debian: apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = finished_run(dir.path());
    let shot = dir.path().join("shot.png");
    let o = std::process::Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1300,2400",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!(
            "file://{}",
            out.join("report/report.html").display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&shot), (1300, 2400));
    // A page that rendered its pictures is far from blank: many distinct colours.
    let decoder = png::Decoder::new(std::io::Cursor::new(read(&shot)));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()]
        .chunks(px)
        .map(|c| &c[..3])
        .collect();
    assert!(colours.len() > 200, "{} colours", colours.len());
}
