//! SVG line plots drawn with `plotters` (SVG backend only: no font or system library is
//! needed, text is left to the viewer). Output is byte-identical for identical input.
//!
//! Axes start at 0 and carry round ticks in one unit chosen from the data (0, 1, 2, 3, 4 GiB;
//! 0, 200, 400 ms), so a reader never has to decode 4.12 GiB or 7004. Long series are reduced
//! to the points a pixel column can show (first, last, lowest and highest of each column), so
//! a plot's size is bounded whatever the number of samples and peaks are never lost.
//!
//! Memory pressure is shaded behind the lines: amber while at warning level, red while
//! critical (the monitor's periods, each window at its worst level), with the two thresholds
//! as dashed lines where they fall inside the axis.

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::alloc_replay::{Sample, StrategyResult};
use crate::monitor::{merge_periods, Level, Period, Thresholds};
use crate::serve::TimelinePoint;

const WIDTH_PX: u32 = 960;
const ALLOC_HEIGHT_PX: u32 = 540;
const KV_PANEL_HEIGHT_PX: u32 = 230;
/// Room right of each plotting area for the legend, so it never hides a line.
const LEGEND_WIDTH_PX: u32 = 200;
/// Columns a series is reduced to: about one per two pixels of the plotting area.
const COLUMNS: usize = 360;
/// Markers per series: enough to tell lines apart where they overlap, few enough not to clutter.
const MARKERS_PER_SERIES: usize = 12;
/// Longest title drawn, in characters.
const TITLE_MAX_CHARS: usize = 160;
const FONT: &str = "sans-serif";
/// Tableau 10: distinguishable, also in print.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];
const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);
/// Lines are slightly transparent so that one drawn over another still shows it.
const LINE_OPACITY: f64 = 0.85;
/// Pressure shading: amber for warning, red for critical, light enough to read lines over.
const WARNING_COLOUR: RGBColor = RGBColor(0xf2, 0xa9, 0x00);
const CRITICAL_COLOUR: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const SHADE_OPACITY: f64 = 0.16;

const BYTE_UNITS: [(&str, f64); 7] = [
    ("B", 1.0),
    ("KiB", 1024.0),
    ("MiB", 1048576.0),
    ("GiB", 1073741824.0),
    ("TiB", 1099511627776.0),
    ("PiB", 1125899906842624.0),
    ("EiB", 1152921504606846976.0),
];
const TIME_UNITS_NS: [(&str, f64); 4] = [("ns", 1.0), ("µs", 1e3), ("ms", 1e6), ("s", 1e9)];

/// A linear axis from 0 to `top` with ticks every `step`, all in `unit` (`unit_size` base units
/// each: bytes, nanoseconds, or 1 for plain counts).
#[derive(Clone, Debug, PartialEq)]
struct Axis {
    unit: &'static str,
    unit_size: f64,
    step: f64,
    top: f64,
    /// A categorical axis' names, one per whole position from 0 (empty for a numeric axis).
    names: Vec<String>,
}

impl Axis {
    /// Bytes up to `max_bytes`, in the largest binary unit that `max_bytes` reaches.
    fn bytes(max_bytes: f64) -> Axis {
        Axis::in_units(max_bytes, &BYTE_UNITS, true)
    }

    /// Nanoseconds up to `max_ns`, in ns, µs, ms or s.
    fn time_ns(max_ns: f64) -> Axis {
        Axis::in_units(max_ns, &TIME_UNITS_NS, false)
    }

    /// A count up to `max`, with whole-number ticks.
    fn count(max: f64) -> Axis {
        Axis::in_units(max, &[("", 1.0)], true)
    }

    /// A fraction up to 1, shown as 0–100 %.
    fn percent() -> Axis {
        Axis {
            unit: "%",
            unit_size: 0.01,
            step: 20.0,
            top: 100.0,
            names: Vec::new(),
        }
    }

    /// Named values at positions 0, 1, … in the order given.
    fn categories(names: Vec<String>) -> Axis {
        Axis {
            unit: "",
            unit_size: 1.0,
            step: 1.0,
            top: names.len().saturating_sub(1).max(1) as f64,
            names,
        }
    }

    /// Picks the largest unit not above `max` (the first when `max` is below all), then a
    /// round step in it; `whole` keeps steps of the first unit whole (no 0.5 B, 0.5 request).
    fn in_units(max: f64, units: &[(&'static str, f64)], whole: bool) -> Axis {
        let max = if max.is_finite() { max.max(0.0) } else { 0.0 };
        let unit_index = units
            .iter()
            .rposition(|&(_, size)| max >= size)
            .unwrap_or(0);
        let (unit, unit_size) = units[unit_index];
        let span = max / unit_size;
        let mut step = round_step(span);
        if whole && unit_index == 0 {
            step = step.max(1.0);
        }
        let intervals = (span / step - 1e-9).ceil().max(1.0);
        Axis {
            unit,
            unit_size,
            step,
            top: intervals * step,
            names: Vec::new(),
        }
    }

    /// Where a base-unit value lies on the axis.
    fn position(&self, value: f64) -> f64 {
        value / self.unit_size
    }

    fn ticks(&self) -> Vec<f64> {
        let intervals = (self.top / self.step).round() as u64;
        // Multiply rather than accumulate, so that no 0.30000000000000004 creeps in.
        (0..=intervals).map(|k| k as f64 * self.step).collect()
    }

    /// A tick's text: its value with as many decimals as the step needs, then the unit.
    fn label(&self, value: f64) -> String {
        if !self.names.is_empty() {
            let name = self.names.get(value.round() as usize);
            return name.map_or(String::new(), |n| clean_title(n));
        }
        if value == 0.0 {
            return "0".to_string();
        }
        let decimals = if self.step >= 1.0 {
            0
        } else {
            (-self.step.log10()).ceil() as usize
        };
        let number = format!("{value:.decimals$}");
        match self.unit {
            "" => number,
            "%" => format!("{number}%"),
            unit => format!("{number} {unit}"),
        }
    }
}

/// Plotters' view of an [`Axis`]: linear from 0 to the top, key points at the round ticks,
/// labels in the axis' unit.
impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (low_px, high_px): (i32, i32)) -> i32 {
        let fraction = value / self.top;
        low_px + (fraction * f64::from(high_px - low_px)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Grid lines only at labelled ticks: no unlabelled light lines in between.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.top
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, value: &f64) -> String {
        self.label(*value)
    }
}

/// The smallest of 1, 2, 5 × 10ⁿ that divides `span` into at most six intervals.
fn round_step(span: f64) -> f64 {
    if span <= 0.0 {
        return 1.0;
    }
    let raw = span / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// Reduces a series ordered by x to the first, lowest, highest and last point of each of
/// [`COLUMNS`] columns across `0..x_top`, in their order: the drawn line is the same at that
/// resolution, and its size no longer grows with the number of samples.
fn reduce_to_columns(points: impl Iterator<Item = (f64, f64)>, x_top: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut column: Vec<(usize, (f64, f64))> = Vec::new();
    let mut current = None;
    for (i, p) in points.enumerate() {
        let c = ((p.0 / x_top * COLUMNS as f64) as usize).min(COLUMNS);
        if current != Some(c) {
            flush_column(&mut column, &mut out);
            current = Some(c);
        }
        column.push((i, p));
        if column.len() > 4 {
            // Only first, last, lowest and highest matter: keep the buffer at four.
            let keep = column_extremes(&column);
            column.retain(|(i, _)| keep.contains(i));
        }
    }
    flush_column(&mut column, &mut out);
    out
}

fn column_extremes(column: &[(usize, (f64, f64))]) -> [usize; 4] {
    let first = column[0].0;
    let last = column[column.len() - 1].0;
    let low = column
        .iter()
        .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .map_or(first, |p| p.0);
    let high = column
        .iter()
        .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .map_or(first, |p| p.0);
    [first, low, high, last]
}

fn flush_column(column: &mut Vec<(usize, (f64, f64))>, out: &mut Vec<(f64, f64)>) {
    if column.is_empty() {
        return;
    }
    let keep = column_extremes(column);
    out.extend(
        column
            .iter()
            .filter(|(i, _)| keep.contains(i))
            .map(|&(_, p)| p),
    );
    column.clear();
}

/// The title as drawn: control characters (which XML cannot hold and terminals obey) replaced,
/// long titles cut. Markup characters are escaped by the SVG backend.
fn clean_title(title: &str) -> String {
    let mut clean: String = title
        .chars()
        .take(TITLE_MAX_CHARS)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if title.chars().nth(TITLE_MAX_CHARS).is_some() {
        clean.push('…');
    }
    clean
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<Axis, Axis>>;
type Area<'b> = DrawingArea<SVGBackend<'b>, plotters::coord::Shift>;
type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// How one line is drawn.
#[derive(Clone, Copy)]
struct LineStyle {
    colour: RGBColor,
    width_px: u32,
    dashed: bool,
    /// Which marker shape (see [`draw_markers`]) the line carries, if any.
    marker: Option<usize>,
}

impl LineStyle {
    fn solid(colour: RGBColor, marker: Option<usize>) -> LineStyle {
        LineStyle {
            colour,
            width_px: 2,
            dashed: false,
            marker,
        }
    }

    fn shape(&self) -> ShapeStyle {
        self.colour.mix(LINE_OPACITY).stroke_width(self.width_px)
    }
}

/// The named lines of one chart, for its legend.
type Legend = Vec<(String, LineStyle)>;

/// Draws `points` (axis units, ordered by x) as one line in `style`, named in `legend` if
/// `label` is given.
/// Markers sit at points staggered by `series_index` of `series_count`, so that lines which
/// coincide still show each one's markers; a lone point is always marked, or it would not show.
fn draw_line(
    chart: &mut Chart,
    legend: &mut Legend,
    points: &[(f64, f64)],
    style: LineStyle,
    label: Option<String>,
    (series_index, series_count): (usize, usize),
) -> Result<(), DrawError> {
    let shape = style.shape();
    if style.dashed {
        chart.draw_series(DashedLineSeries::new(points.iter().copied(), 7, 5, shape))?;
    } else {
        chart.draw_series(LineSeries::new(points.iter().copied(), shape))?;
    }
    let lone_point = points.len() == 1;
    if let Some(shape_index) = style.marker.or(lone_point.then_some(0)) {
        let marked = marker_points(points, series_index, series_count);
        draw_markers(chart, &marked, shape_index, shape)?;
    }
    legend.extend(label.map(|label| (label, style)));
    Ok(())
}

/// Markers at `points`: a circle, triangle, square or cross by `shape_index`. One plotters
/// series per shape, as a series holds one type of element.
fn draw_markers(
    chart: &mut Chart,
    points: &[(f64, f64)],
    shape_index: usize,
    style: ShapeStyle,
) -> Result<(), DrawError> {
    let at = points.iter().map(|&p| EmptyElement::at(p));
    match shape_index % 4 {
        0 => chart.draw_series(at.map(|a| a + Circle::new((0, 0), 3, style.filled())))?,
        1 => chart.draw_series(at.map(|a| a + TriangleMarker::new((0, 0), 4, style.filled())))?,
        2 => {
            chart.draw_series(at.map(|a| a + Rectangle::new([(-3, -3), (3, 3)], style.filled())))?
        }
        _ => chart.draw_series(at.map(|a| a + Cross::new((0, 0), 3, style.stroke_width(2))))?,
    };
    Ok(())
}

/// [`MARKERS_PER_SERIES`] points of a line, evenly spread by index and shifted by the series'
/// place among `series_count` (all points when there are fewer).
fn marker_points(
    points: &[(f64, f64)],
    series_index: usize,
    series_count: usize,
) -> Vec<(f64, f64)> {
    if points.len() <= MARKERS_PER_SERIES {
        return points.to_vec();
    }
    let stride = points.len() / MARKERS_PER_SERIES;
    let shift = stride * series_index / series_count.max(1) + stride / 2;
    points.iter().skip(shift).step_by(stride).copied().collect()
}

/// Splits `area` into the chart's part and, on its right, the legend's.
fn split_for_legend<'b>(area: &Area<'b>) -> (Area<'b>, Area<'b>) {
    let width_px = area.dim_in_pixel().0;
    area.split_horizontally(width_px.saturating_sub(LEGEND_WIDTH_PX))
}

/// A chart on `area` with the round ticks of `x` and `y`, a grid at them, and `x_name` below.
fn chart_on<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    caption_size: u32,
    (x, y): (&Axis, &Axis),
    x_name: &str,
) -> Result<Chart<'a, 'b>, DrawError> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, caption_size))
        .margin(10)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(x.clone(), y.clone())?;
    chart
        .configure_mesh()
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .x_desc(x_name)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .draw()?;
    Ok(chart)
}

/// The legend: one row per line, a short stroke (dashed or not, with the line's marker) then
/// the name, from `top_px` down `area`, so that it never hides a line.
fn draw_legend(area: &Area, legend: &Legend, top_px: i32) -> Result<(), DrawError> {
    const ROW_PX: i32 = 20;
    let label_font =
        TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (row, (label, style)) in (0..).zip(legend) {
        let y = top_px + ROW_PX * row;
        // One element type for every style: absent gaps and markers are fully transparent,
        // which the backend skips.
        let shape = style.shape();
        let gap = if style.dashed {
            TRANSPARENT.into()
        } else {
            shape
        };
        let mark = |kind: usize| match style.marker {
            Some(m) if m % 4 == kind => shape,
            _ => TRANSPARENT.into(),
        };
        let stroke = |from: i32, to: i32, style| PathElement::new(vec![(from, 0), (to, 0)], style);
        let sample = EmptyElement::at((8, y))
            + stroke(0, 7, shape)
            + stroke(7, 12, gap)
            + stroke(12, 18, shape)
            + stroke(18, 23, gap)
            + stroke(23, 30, shape)
            + Circle::new((15, 0), 3, mark(0).filled())
            + TriangleMarker::new((15, 0), 4, mark(1).filled())
            + Rectangle::new([(12, -3), (18, 3)], mark(2).filled())
            + Cross::new((15, 0), 3, mark(3).stroke_width(2));
        area.draw(&sample)?;
        area.draw(&Text::new(label.as_str(), (46, y), label_font.clone()))?;
    }
    Ok(())
}

/// Renders with `draw` into an SVG of `height_px`; a drawing error (none is expected: the
/// backend writes to memory and needs no font) still yields a valid SVG that says so.
fn render_svg(height_px: u32, draw: impl FnOnce(&Area) -> Result<(), DrawError>) -> String {
    let mut svg = String::new();
    let outcome = {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, height_px)).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present())
    };
    if let Err(e) = outcome {
        svg.clear();
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, 60)).into_drawing_area();
        let message = clean_title(&format!("plot failed: {e}"));
        let _ = root.draw(&Text::new(message, (10, 30), (FONT, 16)));
        let _ = root.present();
    }
    svg
}

/// Half way from `c` to white: a legend swatch about the shade's colour.
fn towards_white(c: RGBColor) -> RGBColor {
    let mix = |v: u8| ((v as u16 + 255) / 2) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// Memory pressure to shade on a plot: the warning and critical periods (ns on the plot's own
/// clock) and the thresholds, fractions of `capacity` in the plot's y unit.
#[derive(Clone, Copy, Debug)]
pub struct Pressure<'a> {
    pub periods: &'a [Period],
    pub thresholds: Thresholds,
    /// What the thresholds are fractions of (bytes, blocks), in the y axis' base unit.
    pub capacity: u64,
}

impl Pressure<'_> {
    fn colour(level: Level) -> RGBColor {
        match level {
            Level::Critical => CRITICAL_COLOUR,
            _ => WARNING_COLOUR,
        }
    }

    /// Shades the periods, `t0_ns` being the x axis' 0, over the chart's whole height.
    fn shade(&self, chart: &mut Chart, x: &Axis, y: &Axis, t0_ns: u64) -> Result<(), DrawError> {
        let at = |t_ns: u64| {
            x.position(t_ns.saturating_sub(t0_ns) as f64)
                .clamp(0.0, x.top)
        };
        let boxes = self.periods.iter().filter_map(|p| {
            let (from, to) = (at(p.start_ns), at(p.end_ns));
            let fill = Self::colour(p.level).mix(SHADE_OPACITY).filled();
            (to > from).then(|| Rectangle::new([(from, 0.0), (to, y.top)], fill))
        });
        chart.draw_series(boxes)?;
        Ok(())
    }

    /// The two thresholds as dashed lines (those inside the y axis), and the shading's legend.
    fn thresholds(
        &self,
        chart: &mut Chart,
        legend: &mut Legend,
        x: &Axis,
        y: &Axis,
    ) -> Result<(), DrawError> {
        let levels = [
            (Level::Warning, self.thresholds.warning_ppm()),
            (Level::Critical, self.thresholds.critical_ppm()),
        ];
        for (level, ppm) in levels {
            let value = self.capacity as f64 * ppm as f64 / 1e6;
            let colour = Self::colour(level);
            let line = LineStyle {
                colour,
                width_px: 1,
                dashed: true,
                marker: None,
            };
            let label = format!("{} ≥ {}%", level.name(), ppm as f64 / 1e4);
            if y.position(value) <= y.top {
                let points = [(0.0, y.position(value)), (x.top, y.position(value))];
                draw_line(chart, legend, &points, line, None, (0, 1))?;
            }
            // A thick stroke in the legend stands for the shading.
            let swatch = LineStyle {
                colour: towards_white(colour),
                width_px: 8,
                dashed: false,
                marker: None,
            };
            legend.push((label, swatch));
        }
        Ok(())
    }
}

/// Reserved (solid, with markers) and allocated (thin, dashed) bytes over trace time, one colour
/// per strategy, time counted from the first sample; pressure (reserved bytes of
/// `capacity_bytes`) shaded where any strategy was at warning or critical level.
pub fn reserved_allocated_svg(
    title: &str,
    results: &[StrategyResult],
    capacity_bytes: u64,
    thresholds: Thresholds,
) -> String {
    let samples = || results.iter().flat_map(|r| &r.timeline);
    let t_first_ns = samples().map(|s| s.t_ns).min().unwrap_or(0);
    let t_last_ns = samples().map(|s| s.t_ns).max().unwrap_or(0);
    let bytes_max = samples()
        .map(|s| s.bytes_reserved.max(s.bytes_allocated))
        .max()
        .unwrap_or(0);
    let x = Axis::time_ns((t_last_ns - t_first_ns) as f64);
    let y = Axis::bytes(bytes_max as f64);
    let periods: Vec<Vec<Period>> = results.iter().map(|r| r.pressure_periods.clone()).collect();
    let periods = merge_periods(&periods);
    let pressure = Pressure {
        periods: &periods,
        thresholds,
        capacity: capacity_bytes,
    };
    let line = |r: &StrategyResult, bytes: fn(&Sample) -> u64| {
        let points = r.timeline.iter().map(|s| {
            let t_ns = (s.t_ns - t_first_ns) as f64;
            (x.position(t_ns), y.position(bytes(s) as f64))
        });
        reduce_to_columns(points, x.top)
    };
    render_svg(ALLOC_HEIGHT_PX, |root| {
        let (plot_area, legend_area) = split_for_legend(root);
        let time_name = "trace time since the first operation";
        let mut chart = chart_on(&plot_area, &clean_title(title), 20, (&x, &y), time_name)?;
        let mut legend = Legend::new();
        pressure.shade(&mut chart, &x, &y, t_first_ns)?;
        for (i, r) in results.iter().enumerate() {
            let reserved = LineStyle::solid(COLOURS[i % COLOURS.len()], Some(i));
            let allocated = LineStyle {
                width_px: 1,
                dashed: true,
                marker: None,
                ..reserved
            };
            let series = (i, results.len());
            let name = Some(r.strategy.to_string());
            let points = line(r, |s| s.bytes_reserved);
            draw_line(&mut chart, &mut legend, &points, reserved, name, series)?;
            let points = line(r, |s| s.bytes_allocated);
            draw_line(&mut chart, &mut legend, &points, allocated, None, series)?;
        }
        // Which line is which, once for all strategies.
        legend.push(("reserved".into(), LineStyle::solid(GREY, None)));
        let allocated = LineStyle {
            width_px: 1,
            dashed: true,
            ..LineStyle::solid(GREY, None)
        };
        legend.push(("allocated".into(), allocated));
        pressure.thresholds(&mut chart, &mut legend, &x, &y)?;
        draw_legend(&legend_area, &legend, 50)
    })
}

/// A sweep's metric against one axis, a line per value of another: `values` in point order.
/// The x axis is numeric when every x value is a non-negative number, else one position per
/// distinct value in order of first appearance; series likewise keep that order.
pub fn sweep_svg(
    title: &str,
    x_name: &str,
    metric: &str,
    values: &[crate::sweep::PlotValue],
) -> String {
    let numeric = values
        .iter()
        .all(|v| v.x.parse::<f64>().is_ok_and(|x| x.is_finite() && x >= 0.0));
    let mut names: Vec<&str> = Vec::new();
    let mut series: Vec<Option<&str>> = Vec::new();
    for v in values {
        if !names.contains(&v.x.as_str()) {
            names.push(&v.x);
        }
        if !series.contains(&v.series.as_deref()) {
            series.push(v.series.as_deref());
        }
    }
    let x_of = |v: &crate::sweep::PlotValue| -> f64 {
        if numeric {
            v.x.parse().unwrap_or(0.0)
        } else {
            names.iter().position(|&n| n == v.x).unwrap_or(0) as f64
        }
    };
    let x = if numeric {
        let max = values.iter().map(x_of).fold(0.0, f64::max);
        Axis::in_units(max, &[("", 1.0)], false)
    } else {
        Axis::categories(names.iter().map(|n| n.to_string()).collect())
    };
    // Units from the metric's name, as the reports name their fields: `…_us`, `…bytes…`.
    let in_us = metric.split('.').any(|key| key.ends_with("_us"));
    let scale = if in_us { 1e3 } else { 1.0 };
    let y_max = values.iter().map(|v| v.y * scale).fold(0.0, f64::max);
    let y = if in_us {
        Axis::time_ns(y_max)
    } else if metric.contains("bytes") {
        Axis::bytes(y_max)
    } else {
        Axis::in_units(y_max, &[("", 1.0)], false)
    };
    render_svg(ALLOC_HEIGHT_PX, |root| {
        let (plot_area, legend_area) = split_for_legend(root);
        let mut chart = chart_on(&plot_area, &clean_title(title), 20, (&x, &y), x_name)?;
        let mut legend = Legend::new();
        for (i, s) in series.iter().enumerate() {
            let mut points: Vec<(f64, f64)> = values
                .iter()
                .filter(|v| v.series.as_deref() == *s)
                .map(|v| (x.position(x_of(v)), y.position((v.y * scale).max(0.0))))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let style = LineStyle::solid(COLOURS[i % COLOURS.len()], Some(i));
            let name = s.map_or_else(|| clean_title(metric), clean_title);
            draw_line(
                &mut chart,
                &mut legend,
                &points,
                style,
                Some(name),
                (i, series.len()),
            )?;
        }
        draw_legend(&legend_area, &legend, 50)
    })
}

/// The prefix-cache hit rate of all admissions up to `p` (0 before any lookup).
fn hit_rate(p: &TimelinePoint) -> f64 {
    if p.prefix_query_tokens == 0 {
        0.0
    } else {
        p.prefix_hit_tokens as f64 / p.prefix_query_tokens as f64
    }
}

/// Three stacked panels over simulated time: KV blocks in use (against the `usable_blocks`
/// line and the pressure thresholds), running and waiting requests, and the prefix-cache hit
/// rate so far (re-admissions included), each with the KV pool's warning and critical periods
/// shaded. Takes any number of samples, per step or already downsampled.
pub fn kv_timeline_svg(
    title: &str,
    samples: &[TimelinePoint],
    usable_blocks: u64,
    periods: &[Period],
    thresholds: Thresholds,
) -> String {
    let pressure = Pressure {
        periods,
        thresholds,
        capacity: usable_blocks,
    };
    let t_last_ns = samples.iter().map(|p| p.t_us).max().unwrap_or(0) as f64 * 1e3;
    let x = Axis::time_ns(t_last_ns);
    let x_of = |p: &TimelinePoint| x.position(p.t_us as f64 * 1e3);
    let blocks_max = samples.iter().map(|p| p.kv_blocks_used).max().unwrap_or(0);
    let requests_max = samples
        .iter()
        .map(|p| p.running.max(p.waiting))
        .max()
        .unwrap_or(0);
    let blocks = Axis::count(blocks_max.max(usable_blocks) as f64);
    let requests = Axis::count(requests_max as f64);
    let rate = Axis::percent();
    let line = |axis: &Axis, value: fn(&TimelinePoint) -> f64| {
        let points = samples.iter().map(|p| (x_of(p), axis.position(value(p))));
        reduce_to_columns(points, x.top)
    };
    let height_px = 40 + 3 * KV_PANEL_HEIGHT_PX;
    render_svg(height_px, |root| {
        let root = root.titled(&clean_title(title), (FONT, 20))?;
        let panels = root.split_evenly((3, 1));
        let time_name = "simulated time";
        let panel = |index: usize, caption: &str, y: &Axis| {
            let (plot_area, legend_area) = split_for_legend(&panels[index]);
            (plot_area, legend_area, caption.to_string(), y.clone())
        };

        let (plot_area, legend_area, caption, y) = panel(0, "KV blocks in use", &blocks);
        let mut chart = chart_on(&plot_area, &caption, 17, (&x, &y), time_name)?;
        let mut legend = Legend::new();
        pressure.shade(&mut chart, &x, &y, 0)?;
        let used = line(&y, |p| p.kv_blocks_used as f64);
        draw_line(
            &mut chart,
            &mut legend,
            &used,
            LineStyle::solid(COLOURS[0], None),
            Some("used".into()),
            (0, 1),
        )?;
        let usable = [
            (0.0, y.position(usable_blocks as f64)),
            (x.top, y.position(usable_blocks as f64)),
        ];
        let usable_style = LineStyle {
            colour: GREY,
            width_px: 1,
            dashed: true,
            marker: None,
        };
        draw_line(
            &mut chart,
            &mut legend,
            &usable,
            usable_style,
            Some(format!("usable: {usable_blocks}")),
            (0, 1),
        )?;
        pressure.thresholds(&mut chart, &mut legend, &x, &y)?;
        draw_legend(&legend_area, &legend, 40)?;

        let (plot_area, legend_area, caption, y) = panel(1, "requests", &requests);
        let mut chart = chart_on(&plot_area, &caption, 17, (&x, &y), time_name)?;
        let mut legend = Legend::new();
        pressure.shade(&mut chart, &x, &y, 0)?;
        let running = line(&y, |p| p.running as f64);
        draw_line(
            &mut chart,
            &mut legend,
            &running,
            LineStyle::solid(COLOURS[2], Some(0)),
            Some("running".into()),
            (0, 2),
        )?;
        let waiting = line(&y, |p| p.waiting as f64);
        draw_line(
            &mut chart,
            &mut legend,
            &waiting,
            LineStyle::solid(COLOURS[1], Some(1)),
            Some("waiting".into()),
            (1, 2),
        )?;
        draw_legend(&legend_area, &legend, 40)?;

        let (plot_area, legend_area, caption, y) = panel(2, "prefix-cache hit rate so far", &rate);
        let mut chart = chart_on(&plot_area, &caption, 17, (&x, &y), time_name)?;
        let mut legend = Legend::new();
        pressure.shade(&mut chart, &x, &y, 0)?;
        let hits = line(&y, hit_rate);
        draw_line(
            &mut chart,
            &mut legend,
            &hits,
            LineStyle::solid(COLOURS[4], None),
            Some("hit rate".into()),
            (0, 1),
        )?;
        draw_legend(&legend_area, &legend, 40)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_replay::empty_result;
    use gpumem_core::alloc::Strategy;

    const GIB: f64 = 1073741824.0;

    fn result(strategy: &'static str, timeline: Vec<Sample>) -> StrategyResult {
        let mut r = empty_result(Strategy::ALL[0]);
        r.strategy = strategy;
        r.timeline = timeline;
        r
    }

    /// A sawtooth of `n` samples, 1 ms apart, rising to `peak_bytes` reserved.
    fn sawtooth(n: u64, peak_bytes: u64) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                t_ns: 5_000_000 + i * 1_000_000,
                bytes_reserved: peak_bytes * (i % 10 + 1) / 10,
                bytes_allocated: peak_bytes * (i % 10) / 20,
            })
            .collect()
    }

    fn kv_point(t_us: u64, used: u64, waiting: u64) -> TimelinePoint {
        TimelinePoint {
            t_us,
            kv_blocks_used: used,
            running: used / 10,
            waiting,
            prefix_hit_tokens: t_us / 3,
            prefix_query_tokens: t_us,
        }
    }

    /// The text of every `<text>` element, in order.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn byte_ticks_are_whole_gib_for_a_4_12_gib_peak() {
        let axis = Axis::bytes(4.12 * GIB);
        assert_eq!(axis.unit, "GiB");
        assert_eq!(axis.ticks(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let labels: Vec<String> = axis.ticks().iter().map(|&v| axis.label(v)).collect();
        assert_eq!(labels, ["0", "1 GiB", "2 GiB", "3 GiB", "4 GiB", "5 GiB"]);
    }

    #[test]
    fn byte_ticks_below_a_unit_use_the_smaller_unit_and_round_steps() {
        let axis = Axis::bytes(0.9 * GIB);
        assert_eq!((axis.unit, axis.step, axis.top), ("MiB", 200.0, 1000.0));
        let axis = Axis::bytes(2.3 * GIB);
        assert_eq!((axis.unit, axis.step, axis.top), ("GiB", 0.5, 2.5));
        assert_eq!(axis.label(1.5), "1.5 GiB");
        let axis = Axis::bytes(3.0);
        assert_eq!((axis.unit, axis.step, axis.top), ("B", 1.0, 3.0));
    }

    #[test]
    fn every_tick_is_a_multiple_of_a_1_2_5_step() {
        for max in [
            1.0,
            7.0,
            7004.0,
            0.3 * GIB,
            17.5 * GIB,
            3e15,
            u64::MAX as f64,
        ] {
            let axis = Axis::bytes(max);
            let mantissa = axis.step / 10f64.powf(axis.step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (m - mantissa).abs() < 1e-9),
                "{max}: step {}",
                axis.step
            );
            assert!(axis.top * axis.unit_size >= max, "{max}: top {axis:?}");
            assert!(axis.ticks().len() <= 8, "{max}: {axis:?}");
        }
    }

    #[test]
    fn time_ticks_pick_seconds_milliseconds_or_microseconds() {
        assert_eq!(Axis::time_ns(51e9).unit, "s");
        assert_eq!(
            Axis::time_ns(51e9).ticks(),
            [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
        );
        assert_eq!(Axis::time_ns(0.25e9).unit, "ms");
        assert_eq!(Axis::time_ns(0.25e9).step, 50.0);
        assert_eq!(Axis::time_ns(800e3).unit, "µs");
        assert_eq!(Axis::time_ns(0.0).top, 1.0);
    }

    #[test]
    fn block_counts_get_round_ticks_not_the_pool_size() {
        let axis = Axis::count(7004.0);
        assert_eq!(axis.ticks(), [0.0, 2000.0, 4000.0, 6000.0, 8000.0]);
        assert_eq!(axis.label(4000.0), "4000");
        assert_eq!(Axis::count(2.0).step, 1.0, "no half requests");
    }

    #[test]
    fn reduction_bounds_the_points_and_keeps_the_extremes() {
        let points: Vec<(f64, f64)> = (0..100_000u32)
            .map(|i| (f64::from(i) / 1000.0, f64::from(i % 97)))
            .collect();
        let reduced = reduce_to_columns(points.iter().copied(), 100.0);
        assert!(reduced.len() <= 4 * (COLUMNS + 1), "{}", reduced.len());
        let high = reduced.iter().map(|p| p.1).fold(0.0, f64::max);
        let low = reduced.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        assert_eq!((low, high), (0.0, 96.0));
        assert_eq!(reduced.first(), points.first());
        assert_eq!(reduced.last(), points.last());
        assert!(reduced.windows(2).all(|w| w[0].0 <= w[1].0), "order kept");
    }

    #[test]
    fn alloc_plot_has_round_labelled_ticks_on_both_axes_and_a_legend() {
        let results = [
            result("tlsf", sawtooth(500, (4.12 * GIB) as u64)),
            result("buddy", sawtooth(500, (4.12 * GIB) as u64)),
        ];
        let svg =
            reserved_allocated_svg("trace & <more>", &results, 80 << 30, Thresholds::default());
        let texts = texts(&svg);
        for tick in ["0", "1 GiB", "4 GiB", "5 GiB", "100 ms", "500 ms"] {
            assert!(texts.iter().any(|t| t == tick), "no tick {tick}: {texts:?}");
        }
        for legend in ["tlsf", "buddy", "reserved", "allocated"] {
            assert!(
                texts.iter().any(|t| t == legend),
                "no legend {legend}: {texts:?}"
            );
        }
        assert!(
            texts.iter().any(|t| t == "trace &amp; &lt;more&gt;"),
            "{texts:?}"
        );
        assert!(!svg.contains("<more>"));
    }

    #[test]
    fn rendering_twice_is_byte_identical() {
        let results = [
            result("tlsf", sawtooth(3000, 1 << 30)),
            result("pool", sawtooth(7, 1 << 20)),
        ];
        assert_eq!(
            reserved_allocated_svg("t", &results, 80 << 30, Thresholds::default()),
            reserved_allocated_svg("t", &results, 80 << 30, Thresholds::default())
        );
        let samples: Vec<TimelinePoint> = (0..5000)
            .map(|i| kv_point(i * 700, i % 900, i % 13))
            .collect();
        assert_eq!(
            kv_timeline_svg("k", &samples, 1000, &[], Thresholds::default()),
            kv_timeline_svg("k", &samples, 1000, &[], Thresholds::default())
        );
    }

    #[test]
    fn empty_and_single_point_inputs_give_complete_svgs() {
        let lone = [result("tlsf", sawtooth(1, 1 << 20))];
        for svg in [
            reserved_allocated_svg("empty", &[], 80 << 30, Thresholds::default()),
            reserved_allocated_svg(
                "no samples",
                &[result("tlsf", Vec::new())],
                80 << 30,
                Thresholds::default(),
            ),
            reserved_allocated_svg("one sample", &lone, 80 << 30, Thresholds::default()),
            kv_timeline_svg("empty", &[], 0, &[], Thresholds::default()),
            kv_timeline_svg(
                "one step",
                &[kv_point(5, 3, 1)],
                10,
                &[],
                Thresholds::default(),
            ),
        ] {
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{svg}"
            );
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        // A lone sample would be an invisible line: it is marked.
        let svg = reserved_allocated_svg("one sample", &lone, 80 << 30, Thresholds::default());
        assert!(svg.contains("<circle"), "{svg}");
    }

    #[test]
    fn kv_plot_names_its_panels_and_series_with_round_ticks() {
        let samples: Vec<TimelinePoint> = (0..2000)
            .map(|i| kv_point(i * 1000, i % 7004, i % 37))
            .collect();
        let svg = kv_timeline_svg("kv", &samples, 7004, &[], Thresholds::default());
        let texts = texts(&svg);
        for text in [
            "used",
            "usable: 7004",
            "running",
            "waiting",
            "hit rate",
            "8000",
            "40%",
            "1.5 s",
        ] {
            assert!(texts.iter().any(|t| t == text), "no {text}: {texts:?}");
        }
        assert!(
            !texts.iter().any(|t| t == "7004"),
            "the pool size is a line, not a tick"
        );
    }

    #[test]
    fn pressure_is_shaded_behind_the_lines_with_its_thresholds() {
        let samples: Vec<TimelinePoint> = (0..100).map(|i| kv_point(i * 1000, i * 10, 0)).collect();
        let period = |start_ns, end_ns, level| Period {
            start_ns,
            end_ns,
            level,
        };
        let periods = [
            period(75_000_000, 90_000_000, Level::Warning),
            period(90_000_000, 99_000_000, Level::Critical),
        ];
        let svg = kv_timeline_svg("kv", &samples, 1000, &periods, Thresholds::default());
        let texts = texts(&svg);
        for text in ["warning ≥ 75%", "critical ≥ 90%"] {
            assert!(texts.iter().any(|t| t == text), "no {text}: {texts:?}");
        }
        // Three panels, each with both periods shaded.
        let shades = |colour: RGBColor| {
            let fill = format!(
                "opacity=\"0.16\" fill=\"#{:02X}{:02X}{:02X}\"",
                colour.0, colour.1, colour.2
            );
            svg.matches(&fill).count()
        };
        assert_eq!(
            (shades(WARNING_COLOUR), shades(CRITICAL_COLOUR)),
            (3, 3),
            "{svg}"
        );
        let calm = kv_timeline_svg("kv", &samples, 1000, &[], Thresholds::default());
        assert!(!calm.contains("opacity=\"0.16\""));
    }

    #[test]
    fn control_characters_in_titles_are_replaced_and_long_titles_cut() {
        assert_eq!(clean_title("a\u{1b}]0;x\u{7}b"), "a\u{fffd}]0;x\u{fffd}b");
        let long = "x".repeat(10_000);
        assert_eq!(clean_title(&long).chars().count(), TITLE_MAX_CHARS + 1);
        let svg =
            reserved_allocated_svg("a\u{1b}[31mred\u{0}", &[], 80 << 30, Thresholds::default());
        assert!(!svg.chars().any(|c| c.is_control() && c != '\n'), "{svg}");
    }

    #[test]
    #[ignore = "writes pictures to the temporary folder for a person to look at"]
    fn render_examples_to_the_temporary_folder() {
        let dir = std::env::temp_dir();
        let results = [
            result("tlsf", sawtooth(2000, (4.12 * GIB) as u64)),
            result("buddy", sawtooth(2000, (4.12 * GIB) as u64)),
            result("caching", sawtooth(2000, (3.0 * GIB) as u64)),
        ];
        std::fs::write(
            dir.join("gpumem-alloc-example.svg"),
            reserved_allocated_svg(
                "demo — capacity 80 GiB",
                &results,
                80 << 30,
                Thresholds::default(),
            ),
        )
        .unwrap();
        let samples: Vec<TimelinePoint> = (0..20000)
            .map(|i| kv_point(i * 1500, (i * 7) % 7004, (i / 100) % 37))
            .collect();
        std::fs::write(
            dir.join("gpumem-kv-example.svg"),
            kv_timeline_svg("kv demo", &samples, 7004, &[], Thresholds::default()),
        )
        .unwrap();
    }
}
