//! SVG line plots, written by hand: no dependency, byte-identical output for identical input.

use std::fmt::Write;

use crate::alloc_replay::StrategyResult;
use crate::report::human_bytes;

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
