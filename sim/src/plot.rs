//! SVG line plots, written by hand: no dependency, byte-identical output for identical input.

use std::fmt::Write;

use crate::alloc_replay::StrategyResult;
use crate::report::human_bytes;
use crate::serve::TimelinePoint;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
const MARGIN_LEFT: f64 = 90.0;
const MARGIN_RIGHT: f64 = 190.0;
const MARGIN_Y: f64 = 40.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Reserved (solid) and allocated (dashed) bytes over trace time, one colour per strategy.
pub fn reserved_allocated_svg(title: &str, results: &[StrategyResult]) -> String {
    let t_min = results
        .iter()
        .flat_map(|r| r.timeline.first())
        .map(|s| s.t_ns)
        .min()
        .unwrap_or(0);
    let t_max = results
        .iter()
        .flat_map(|r| r.timeline.last())
        .map(|s| s.t_ns)
        .max()
        .unwrap_or(1)
        .max(t_min + 1);
    let y_max = results
        .iter()
        .flat_map(|r| &r.timeline)
        .map(|s| s.bytes_reserved.max(s.bytes_allocated))
        .max()
        .unwrap_or(1)
        .max(1);
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - 2.0 * MARGIN_Y;
    let x = |t: u64| MARGIN_LEFT + (t - t_min) as f64 / (t_max - t_min) as f64 * plot_w;
    let y = |b: u64| MARGIN_Y + plot_h - b as f64 / y_max as f64 * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_LEFT}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    for i in 0..=4u64 {
        let b = y_max / 4 * i;
        let yy = y(b);
        let _ = writeln!(
            svg,
            r##"<line x1="{MARGIN_LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            MARGIN_LEFT + plot_w,
            MARGIN_LEFT - 6.0,
            yy + 4.0,
            human_bytes(b)
        );
    }
    let seconds = (t_max - t_min) as f64 / 1e9;
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">trace time, {seconds:.3} s in all</text>"#,
        MARGIN_LEFT + plot_w / 2.0,
        HEIGHT - 8.0
    );
    for (i, r) in results.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        for (dash, pick) in [("", true), (r#" stroke-dasharray="5,4""#, false)] {
            let mut points = String::new();
            for s in &r.timeline {
                let b = if pick {
                    s.bytes_reserved
                } else {
                    s.bytes_allocated
                };
                let _ = write!(points, "{:.1},{:.1} ", x(s.t_ns), y(b));
            }
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                points.trim_end()
            );
        }
        let ly = MARGIN_Y + 18.0 * i as f64;
        let lx = WIDTH - MARGIN_RIGHT + 12.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(r.strategy)
        );
    }
    let ly = MARGIN_Y + 18.0 * results.len() as f64 + 10.0;
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{ly:.1}" fill="#555">solid: reserved</text><text x="{:.1}" y="{:.1}" fill="#555">dashed: allocated</text>"##,
        WIDTH - MARGIN_RIGHT + 12.0,
        WIDTH - MARGIN_RIGHT + 12.0,
        ly + 16.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line of a panel: name, colour, value at a point.
type Series = (&'static str, &'static str, fn(&TimelinePoint) -> f64);

/// One panel of [`kv_timeline_svg`].
struct Panel {
    name: &'static str,
    y_max: f64,
    percent: bool,
    series: Vec<Series>,
}

/// Three stacked panels over simulated time: KV blocks in use (of `usable_blocks`), running
/// and waiting requests, and the prefix-cache hit rate so far (re-admissions included).
pub fn kv_timeline_svg(title: &str, samples: &[TimelinePoint], usable_blocks: u64) -> String {
    const PANEL_H: f64 = 170.0;
    const GAP: f64 = 50.0;
    let points = crate::serve::report::downsample(samples, 1200);
    let t_max = points.last().map_or(1, |p| p.t_us).max(1);
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let height = MARGIN_Y + 3.0 * (PANEL_H + GAP) + 10.0;
    let x = |t: u64| MARGIN_LEFT + t as f64 / t_max as f64 * plot_w;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_LEFT}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    let running_max = points
        .iter()
        .map(|p| p.running.max(p.waiting))
        .max()
        .unwrap_or(1)
        .max(1);
    let panels: [Panel; 3] = [
        Panel {
            name: "KV blocks in use",
            y_max: usable_blocks.max(1) as f64,
            percent: false,
            series: vec![("used", COLOURS[0], |p| p.kv_blocks_used as f64)],
        },
        Panel {
            name: "requests",
            y_max: running_max as f64,
            percent: false,
            series: vec![
                ("running", COLOURS[2], |p| p.running as f64),
                ("waiting", COLOURS[1], |p| p.waiting as f64),
            ],
        },
        Panel {
            name: "prefix hit rate so far",
            y_max: 1.0,
            percent: true,
            series: vec![("hit rate", COLOURS[4], |p| {
                if p.prefix_query_tokens == 0 {
                    0.0
                } else {
                    p.prefix_hit_tokens as f64 / p.prefix_query_tokens as f64
                }
            })],
        },
    ];
    for (i, panel) in panels.iter().enumerate() {
        let (name, y_max) = (panel.name, panel.y_max);
        let top = MARGIN_Y + i as f64 * (PANEL_H + GAP) + 10.0;
        let y = |v: f64| top + PANEL_H - v / y_max * PANEL_H;
        let _ = writeln!(
            svg,
            r#"<text x="{MARGIN_LEFT}" y="{:.1}" font-size="13">{name}</text>"#,
            top - 6.0
        );
        for k in 0..=4 {
            let v = y_max * k as f64 / 4.0;
            let yy = y(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{MARGIN_LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                MARGIN_LEFT + plot_w,
                MARGIN_LEFT - 6.0,
                yy + 4.0,
                if panel.percent {
                    format!("{:.0}%", v * 100.0)
                } else {
                    format!("{v:.0}")
                }
            );
        }
        for (j, (sname, colour, value)) in panel.series.iter().enumerate() {
            let mut pts = String::new();
            for p in &points {
                let _ = write!(pts, "{:.1},{:.1} ", x(p.t_us), y(value(p)));
            }
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                pts.trim_end()
            );
            let ly = top + 18.0 * j as f64 + 8.0;
            let lx = WIDTH - MARGIN_RIGHT + 12.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{sname}</text>"#,
                lx + 20.0,
                lx + 26.0,
                ly + 4.0
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">simulated time, {:.3} s in all</text>"#,
        MARGIN_LEFT + plot_w / 2.0,
        height - 8.0,
        t_max as f64 / 1e6
    );
    svg.push_str("</svg>\n");
    svg
}
