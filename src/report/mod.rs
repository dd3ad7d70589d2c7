//! A run's report folder: `curves.json` (the archives' pyribs statistics against evaluations,
//! machine-readable), `curves.png` (qd_score, coverage and obj_max panels, one line per
//! archive) and `archive_<task>.png` (the archive's grid, cells coloured by objective; with
//! more than two measures, the best objective over the others is shown).

mod canvas;

use std::path::Path;

use serde_json::json;

use crate::durable::write_synced;
use crate::error::{Error, Result};
use crate::qd::Population;

use canvas::{Canvas, Rgb};

/// Line colours per archive (colour-blind friendly, from Okabe & Ito).
const PALETTE: [Rgb; 6] = [
    [0, 114, 178],
    [213, 94, 0],
    [0, 158, 115],
    [204, 121, 167],
    [230, 159, 0],
    [86, 180, 233],
];

pub fn write_report(dir: &Path, pop: &Population) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let curves = json!({
        "tasks": pop.tasks,
        "points": pop.history,
    });
    write_synced(
        &dir.join("curves.json"),
        &serde_json::to_vec(&curves).expect("JSON serialises"),
    )?;
    write_png(&dir.join("curves.png"), &curves_png(pop))?;
    for (q, name) in pop.tasks.iter().enumerate() {
        write_png(
            &dir.join(format!("archive_{name}.png")),
            &heatmap_png(pop, q),
        )?;
    }
    Ok(())
}

fn write_png(path: &Path, c: &Canvas) -> Result<()> {
    write_synced(path, &c.encode_png())
}

fn curves_png(pop: &Population) -> Canvas {
    let (pw, ph) = (300usize, 220usize);
    let mut c = Canvas::new(pw * 3 + 40, ph + 70);
    let xs: Vec<f64> = pop.history.iter().map(|p| p.evaluations as f64).collect();
    let x_max = xs.iter().copied().fold(1.0, f64::max);
    type Stat = fn(&crate::qd::ArchiveStats) -> f64;
    let panels: [(&str, Stat); 3] = [
        ("QD SCORE", |s| s.qd_score),
        ("COVERAGE", |s| s.coverage),
        ("OBJ MAX", |s| s.obj_max.unwrap_or(0.0)),
    ];
    for (i, (title, f)) in panels.iter().enumerate() {
        let (x0, y0) = (20 + i * (pw + 10), 30);
        let series: Vec<Vec<f64>> = (0..pop.tasks.len())
            .map(|q| pop.history.iter().map(|p| f(&p.stats[q])).collect())
            .collect();
        let y_max = series.iter().flatten().copied().fold(1e-9, f64::max);
        c.rect_outline(x0, y0, pw, ph, [0, 0, 0]);
        c.text(x0 + 4, y0 - 14, title, [0, 0, 0]);
        c.text(x0 + 4, y0 + 4, &format!("{y_max:.3}"), [90, 90, 90]);
        c.text(x0 + 4, y0 + ph + 6, "EVALUATIONS", [90, 90, 90]);
        c.text(
            x0 + pw - 40,
            y0 + ph + 6,
            &format!("{x_max:.0}"),
            [90, 90, 90],
        );
        for (q, ys) in series.iter().enumerate() {
            let col = PALETTE[q % PALETTE.len()];
            let pt = |j: usize| {
                (
                    x0 as f64 + xs[j] / x_max * (pw - 1) as f64,
                    (y0 + ph - 1) as f64 - ys[j] / y_max * (ph - 12) as f64,
                )
            };
            for j in 1..ys.len() {
                let (a, b) = (pt(j - 1), pt(j));
                c.line(a, b, col);
            }
        }
    }
    for (q, name) in pop.tasks.iter().enumerate() {
        c.text(
            20 + q * 120,
            ph + 52,
            &name.to_uppercase(),
            PALETTE[q % PALETTE.len()],
        );
    }
    c
}

/// The most squares along one axis of an archive heatmap.
const MAX_SHOWN_BINS: usize = 120;

fn heatmap_png(pop: &Population, q: usize) -> Canvas {
    let a = &pop.archives[q];
    let b = a.bins();
    let dims = a.measure_dims();
    let measure_names: Vec<&String> = pop
        .tasks
        .iter()
        .enumerate()
        .filter(|&(d, _)| d != q)
        .map(|(_, n)| n)
        .collect();
    // More bins than a picture has room for are shown a block of bins per square (the best
    // elite of the block), so the image stays a few hundred pixels whatever `bins` is.
    let shown = b.min(MAX_SHOWN_BINS);
    let squeeze = |i: usize| i * shown / b;
    let (cols, rows) = if dims >= 2 {
        (shown, shown)
    } else {
        (shown, 1)
    };
    let cell = (24 * 15 / shown).clamp(4, 24);
    let (x0, y0) = (60usize, 40usize);
    let mut c = Canvas::new(x0 + cols * cell + 40, y0 + rows * cell + 60);
    let mut best = vec![f64::NAN; cols * rows];
    for e in a.elites() {
        let (i, j) = (
            squeeze(e.cell[0]),
            if dims >= 2 { squeeze(e.cell[1]) } else { 0 },
        );
        let v = &mut best[j * cols + i];
        if v.is_nan() || e.objective > *v {
            *v = e.objective;
        }
    }
    for j in 0..rows {
        for i in 0..cols {
            let v = best[j * cols + i];
            let col = if v.is_nan() {
                [235, 235, 235]
            } else {
                canvas::viridis(v.clamp(0.0, 1.0))
            };
            // Measure 2 grows upwards.
            let y = y0 + (rows - 1 - j) * cell;
            c.fill(x0 + i * cell + 1, y + 1, cell - 2, cell - 2, col);
        }
    }
    c.text(
        x0,
        6,
        &format!("ARCHIVE {} - OBJECTIVE 0 TO 1", pop.tasks[q].to_uppercase()),
        [0, 0, 0],
    );
    c.text(
        x0,
        y0 + rows * cell + 10,
        &format!("{} >", measure_names[0].to_uppercase()),
        [0, 0, 0],
    );
    if dims >= 2 {
        c.text(
            4,
            y0 - 14,
            &format!("^ {}", measure_names[1].to_uppercase()),
            [0, 0, 0],
        );
    }
    for s in 0..=10 {
        let v = s as f64 / 10.0;
        c.fill(
            x0 + s * 16,
            y0 + rows * cell + 30,
            16,
            10,
            canvas::viridis(v),
        );
    }
    c
}
