//! The report's pictures, drawn with plotters into RGB buffers and encoded as PNG: the
//! archives' statistics against evaluations, one heatmap per archive, and the final table.
//! Text uses a TrueType font shipped with a crate (Ubuntu Light), so a machine without fonts
//! draws the same picture.

use std::sync::OnceLock;

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, KeyPointWeight};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::qd::cycle::HistoryPoint;
use crate::qd::GridArchive;

const FONT: &str = "sans-serif";

/// Okabe & Ito's colour-blind-safe palette, black last.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

fn font() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .unwrap_or_else(|_| panic!("the bundled font parses"));
    });
}

fn plot_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::invalid(format!("drawing the report: {e:?}"))
}

/// An RGB picture being drawn.
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Picture {
    fn new(width: u32, height: u32) -> Picture {
        font();
        Picture {
            width,
            height,
            rgb: vec![255; (width * height * 3) as usize],
        }
    }

    fn area(&mut self) -> DrawingArea<BitMapBackend<'_>, plotters::coord::Shift> {
        BitMapBackend::with_buffer(&mut self.rgb, (self.width, self.height)).into_drawing_area()
    }

    pub fn encode_png(&self) -> Result<Vec<u8>> {
        let mut out = vec![];
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(plot_err)?;
        w.write_image_data(&self.rgb).map_err(plot_err)?;
        w.finish().map_err(plot_err)?;
        Ok(out)
    }
}

/// Matplotlib's viridis at `t ∈ [0, 1]` (a few of its knots, linearly interpolated).
pub fn viridis(t: f64) -> RGBColor {
    const KNOTS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let x = t.clamp(0.0, 1.0) * (KNOTS.len() - 1) as f64;
    let i = (x.floor() as usize).min(KNOTS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (KNOTS[i], KNOTS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A linear axis whose ticks are given (bin edges, row centres) instead of chosen.
#[derive(Clone)]
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(r: Range<f64>, ticks: Vec<f64>) -> Ticked {
        Ticked {
            lo: r.start,
            hi: r.end,
            ticks,
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        match hint.weight() {
            KeyPointWeight::Bold if hint.max_num_points() > 0 => self.ticks.clone(),
            _ => vec![],
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// Short numbers for axes: `0.25`, `1200`, `3.1e4`.
fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// `curves.png`: qd_score, coverage and obj_max of every archive against evaluations.
pub fn curves(tasks: &[String], history: &[HistoryPoint]) -> Result<Picture> {
    let mut pic = Picture::new(1260, 420);
    {
        let root = pic.area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, panels) = root.split_vertically(36);
        top.titled(
            "Archives against evaluations (one line per archive)",
            (FONT, 20),
        )
        .map_err(plot_err)?;
        type Stat = fn(&crate::qd::ArchiveStats) -> f64;
        let stats: [(&str, Stat); 3] = [
            ("QD score", |s| s.qd_score),
            ("coverage (occupied ÷ all cells)", |s| s.coverage),
            ("best objective (obj_max)", |s| {
                s.obj_max.unwrap_or(f64::NAN)
            }),
        ];
        let x_max = history
            .iter()
            .map(|p| p.evaluations as f64)
            .fold(1.0, f64::max);
        for (panel, (title, stat)) in panels.split_evenly((1, 3)).iter().zip(stats) {
            let values = || {
                history
                    .iter()
                    .flat_map(|p| p.stats.iter().map(stat))
                    .filter(|v| v.is_finite())
            };
            let (lo, hi) = (
                values().fold(f64::INFINITY, f64::min).min(0.0),
                values().fold(f64::NEG_INFINITY, f64::max),
            );
            let hi = if hi.is_finite() && hi > lo {
                hi + 0.05 * (hi - lo)
            } else {
                lo + 1.0
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(title, (FONT, 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(0.0..x_max, lo..hi)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("evaluations")
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&|v| num(*v))
                .y_label_formatter(&|v| num(*v))
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(plot_err)?;
            for (q, name) in tasks.iter().enumerate() {
                let colour = PALETTE[q % PALETTE.len()];
                let points = history
                    .iter()
                    .map(|p| (p.evaluations as f64, stat(&p.stats[q])))
                    .filter(|(_, v)| v.is_finite());
                chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(pic)
}

/// A point drawn over a heatmap: the experts, the final model, the softmax merge's members.
pub struct Marker {
    pub label: String,
    pub kind: MarkerKind,
    /// Fitness per task, in task order.
    pub fitness: Vec<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MarkerKind {
    Expert,
    Member,
    Final,
}

/// One archive's heatmap (`archive_<task>.png`): each cell coloured by its elite's objective
/// (for more than two measures, the best over the measures not shown), grey when empty. One
/// measure: a strip; two: a grid; more: one grid per pair of measures (small multiples).
pub fn heatmap(
    tasks: &[String],
    q: usize,
    archive: &GridArchive<String>,
    markers: &[Marker],
) -> Result<Picture> {
    let measures: Vec<usize> = (0..tasks.len()).filter(|&d| d != q).collect();
    let pairs: Vec<(usize, usize)> = if measures.len() == 1 {
        vec![(0, usize::MAX)]
    } else {
        (0..measures.len())
            .flat_map(|a| (a + 1..measures.len()).map(move |b| (a, b)))
            .collect()
    };
    let per_row = pairs.len().min(3);
    let rows = pairs.len().div_ceil(per_row);
    let (panel_w, panel_h) = if measures.len() == 1 {
        (860u32, 250u32)
    } else {
        (460, 440)
    };
    let legend_w = 150u32;
    let mut pic = Picture::new(
        panel_w * per_row as u32 + legend_w,
        panel_h * rows as u32 + 44,
    );
    let (lo, hi) = objective_range(archive, q, markers);
    {
        let root = pic.area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, body) = root.split_vertically(44);
        top.titled(
            &format!(
                "Archive `{}`: objective = {} score, {} bins per measure, {} of {} cells filled",
                tasks[q],
                tasks[q],
                archive.bins(),
                archive.len(),
                archive.cells_total()
            ),
            (FONT, 18),
        )
        .map_err(plot_err)?;
        let (grids, side) = body.split_horizontally(panel_w * per_row as u32);
        let panels = grids.split_evenly((rows, per_row));
        for (panel, &(a, b)) in panels.iter().zip(&pairs) {
            grid_panel(panel, tasks, &measures, archive, (a, b), markers, (lo, hi))?;
        }
        colour_bar(&side, &tasks[q], (lo, hi))?;
        root.present().map_err(plot_err)?;
    }
    Ok(pic)
}

/// The colour scale's ends: the archive's and the markers' objectives.
fn objective_range(archive: &GridArchive<String>, q: usize, markers: &[Marker]) -> (f64, f64) {
    let values = archive
        .elites()
        .map(|e| e.objective)
        .chain(markers.iter().map(|m| m.fitness[q]))
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if !(lo.is_finite() && hi.is_finite()) {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// The most squares a heatmap draws along a measure (finer grids show blocks of bins).
const MAX_SQUARES: usize = 100;

/// At most ~8 of the bin edges, as axis ticks.
fn edge_ticks(lo: f64, hi: f64, bins: usize) -> Vec<f64> {
    let step = bins.div_ceil(8).max(1);
    (0..=bins)
        .step_by(step)
        .take(9)
        .map(|i| lo + (hi - lo) * i as f64 / bins as f64)
        .collect()
}

fn grid_panel(
    panel: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    tasks: &[String],
    measures: &[usize],
    archive: &GridArchive<String>,
    (a, b): (usize, usize),
    markers: &[Marker],
    (lo, hi): (f64, f64),
) -> Result<()> {
    let bins = archive.bins();
    let ranges = archive.ranges();
    let strip = b == usize::MAX;
    let (xr, yr) = (ranges[a], if strip { (0.0, 1.0) } else { ranges[b] });
    let x_axis = Ticked::new(xr.0..xr.1, edge_ticks(xr.0, xr.1, bins));
    let y_axis = Ticked::new(
        yr.0..yr.1,
        if strip {
            vec![]
        } else {
            edge_ticks(yr.0, yr.1, bins)
        },
    );
    let mut chart = ChartBuilder::on(panel)
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(if strip { 10 } else { 56 })
        .build_cartesian_2d(x_axis, y_axis)
        .map_err(plot_err)?;
    let x_desc = format!(
        "{} score (measure; ticks are bin edges)",
        tasks[measures[a]]
    );
    let y_desc = if strip {
        String::new()
    } else {
        format!("{} score (measure)", tasks[measures[b]])
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| num(*v))
        .y_label_formatter(&|v| num(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(plot_err)?;
    // The best objective per shown square. A grid finer than the panel's pixels shows blocks
    // of `block` bins a side (the archive is sparse; 10^5 bins a measure is 10^10 cells).
    let block = bins.div_ceil(MAX_SQUARES).max(1);
    let cols = bins.div_ceil(block);
    let rows = if strip { 1 } else { cols };
    let mut best = vec![f64::NAN; cols * rows];
    for e in archive.elites() {
        let (i, j) = (e.cell[a] / block, if strip { 0 } else { e.cell[b] / block });
        let v = &mut best[j * cols + i];
        if v.is_nan() || e.objective > *v {
            *v = e.objective;
        }
    }
    // Where square `i` starts on a measure's axis (the strip's one row spans its y range).
    let x_edge = |i: usize| xr.0 + (xr.1 - xr.0) * (i * block).min(bins) as f64 / bins as f64;
    let y_edge = |j: usize| {
        if strip {
            yr.0 + (yr.1 - yr.0) * j as f64
        } else {
            yr.0 + (yr.1 - yr.0) * (j * block).min(bins) as f64 / bins as f64
        }
    };
    let cells = (0..rows).flat_map(|j| (0..cols).map(move |i| (i, j)));
    chart
        .draw_series(cells.map(|(i, j)| {
            let v = best[j * cols + i];
            let colour = if v.is_nan() {
                RGBColor(232, 232, 232)
            } else {
                viridis((v - lo) / (hi - lo))
            };
            Rectangle::new(
                [(x_edge(i), y_edge(j)), (x_edge(i + 1), y_edge(j + 1))],
                colour.filled(),
            )
        }))
        .map_err(plot_err)?;
    // Markers at their measures (clamped into the grid), labelled.
    let clamp = |v: f64, r: (f64, f64)| v.clamp(r.0, r.1);
    for m in markers {
        let x = clamp(m.fitness[measures[a]], xr);
        let y = if strip {
            match m.kind {
                MarkerKind::Expert => 0.25,
                MarkerKind::Member => 0.5,
                MarkerKind::Final => 0.75,
            }
        } else {
            clamp(m.fitness[measures[b]], yr)
        };
        let style = ShapeStyle::from(&BLACK).stroke_width(2);
        // Labels in the grid's right half go to the marker's left, so they stay in the panel.
        let right_half = x > (xr.0 + xr.1) / 2.0;
        let (dx, anchor) = if right_half {
            (-8, HPos::Right)
        } else {
            (8, HPos::Left)
        };
        let text = Text::new(
            m.label.clone(),
            (dx, -16),
            (FONT, 13)
                .into_font()
                .into_text_style(panel)
                .pos(Pos::new(anchor, VPos::Top)),
        );
        let at = EmptyElement::at((x, y));
        match m.kind {
            MarkerKind::Expert => chart.draw_series(std::iter::once(
                at + TriangleMarker::new((0, 0), 7, RGBColor(255, 255, 255).filled())
                    + TriangleMarker::new((0, 0), 7, style)
                    + text,
            )),
            MarkerKind::Member => {
                chart.draw_series(std::iter::once(at + Circle::new((0, 0), 6, style) + text))
            }
            MarkerKind::Final => chart.draw_series(std::iter::once(
                at + Cross::new((0, 0), 7, RGBColor(220, 0, 0).stroke_width(3)) + text,
            )),
        }
        .map_err(plot_err)?;
    }
    Ok(())
}

/// The objective's colour scale, labelled, and the markers' key.
fn colour_bar(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    task: &str,
    (lo, hi): (f64, f64),
) -> Result<()> {
    let (bar, key) = area.split_vertically(area.dim_in_pixel().1 * 2 / 3);
    let mut chart = ChartBuilder::on(&bar)
        .margin_top(14)
        .margin_bottom(14)
        .margin_right(70)
        .x_label_area_size(0)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(format!("{task} score (objective)"))
        .y_labels(6)
        .y_label_formatter(&|v| num(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    let steps = 64;
    chart
        .draw_series((0..steps).map(|s| {
            let (y0, y1) = (
                lo + (hi - lo) * s as f64 / steps as f64,
                lo + (hi - lo) * (s + 1) as f64 / steps as f64,
            );
            Rectangle::new(
                [(0.0, y0), (1.0, y1)],
                viridis(s as f64 / (steps - 1) as f64).filled(),
            )
        }))
        .map_err(plot_err)?;
    let style = ShapeStyle::from(&BLACK).stroke_width(2);
    let font = (FONT, 13).into_font();
    let y0 = 10;
    key.draw(&(TriangleMarker::new((14, y0), 7, style)))
        .map_err(plot_err)?;
    key.draw(&Text::new("expert", (28, y0 - 7), font.clone()))
        .map_err(plot_err)?;
    key.draw(&Circle::new((14, y0 + 24), 6, style))
        .map_err(plot_err)?;
    key.draw(&Text::new("softmax member", (28, y0 + 17), font.clone()))
        .map_err(plot_err)?;
    key.draw(&Cross::new(
        (14, y0 + 48),
        7,
        RGBColor(220, 0, 0).stroke_width(3),
    ))
    .map_err(plot_err)?;
    key.draw(&Text::new("final model", (28, y0 + 41), font))
        .map_err(plot_err)?;
    Ok(())
}

/// `table.png`: every model of the final table, one bar per task (held-out scores).
pub fn table_bars(tasks: &[String], rows: &[(String, Vec<f64>)], chosen: &str) -> Result<Picture> {
    let n = rows.len().max(1);
    let mut pic = Picture::new(1100, 90 + 34 * n as u32 + 40);
    {
        let root = pic.area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, body) = root.split_vertically(40);
        top.titled("Final table: held-out score per task", (FONT, 20))
            .map_err(plot_err)?;
        // The key sits above the plot, right-aligned, where no bar can run under it.
        let key_font = (FONT, 13).into_font();
        let key_w = 40 + 110 * tasks.len() as i32;
        let x0 = top.dim_in_pixel().0 as i32 - key_w;
        for (t, name) in tasks.iter().enumerate() {
            let x = x0 + 110 * t as i32;
            let colour = PALETTE[t % PALETTE.len()];
            top.draw(&Rectangle::new([(x, 26), (x + 14, 36)], colour.filled()))
                .map_err(plot_err)?;
            let label: String = name.chars().take(14).collect();
            top.draw(&Text::new(label, (x + 20, 24), key_font.clone()))
                .map_err(plot_err)?;
        }
        let hi = rows
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(1e-9, f64::max);
        let y_axis = Ticked::new(0.0..n as f64, (0..n).map(|i| i as f64 + 0.5).collect());
        let mut chart = ChartBuilder::on(&body)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(360)
            .build_cartesian_2d(0.0..hi * 1.05, y_axis)
            .map_err(plot_err)?;
        let label = |y: &f64| -> String {
            let i = (*y as usize).min(n - 1);
            let row = n - 1 - i;
            rows.get(row).map_or(String::new(), |(m, _)| {
                let mut s: String = m.chars().take(48).collect();
                if m.chars().count() > 48 {
                    s.push('…');
                }
                // The bundled font has no arrows or stars.
                if m == chosen {
                    s = format!("» {s}");
                }
                s
            })
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("score")
            .x_label_formatter(&|v| num(*v))
            .y_label_formatter(&label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_err)?;
        let k = tasks.len().max(1);
        let h = 0.8 / k as f64;
        for t in 0..tasks.len() {
            let colour = PALETTE[t % PALETTE.len()];
            // The first row at the top.
            let bars = rows.iter().enumerate().map(move |(r, (_, v))| {
                let y = (n - 1 - r) as f64 + 0.1 + h * (k - 1 - t) as f64;
                Rectangle::new([(0.0, y), (v[t].max(0.0), y + h * 0.9)], colour.filled())
            });
            chart.draw_series(bars).map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(pic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_runs_dark_purple_to_yellow() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(-3.0), viridis(0.0));
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(1200.0), "1200");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(31000.0), "3.1e4");
        assert_eq!(edge_ticks(0.0, 1.0, 4), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(edge_ticks(0.0, 1.0, 100).len(), 8);
    }
}
