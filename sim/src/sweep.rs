//! Parameter sweeps: the cartesian product of axes over a base run, one JSON line per point,
//! shards for batch schedulers and their merge.
//!
//! - A point is a choice of one value per axis; points are numbered in row-major order (the
//!   last axis varies fastest), and that number fixes where the point's line goes.
//! - `--shard i/n` keeps the points whose number is ≡ i (mod n): shards are independent
//!   processes that share nothing but the command line.
//! - Every line carries the sweep's digest (the subcommand, the base flags and the axes) and
//!   the number of points, so [`merge`] can refuse a shard of another sweep, a point seen
//!   twice or a point missing, and otherwise writes exactly the unsharded run's bytes.
//! - Points run in parallel ([`run_points`]: rayon over a bounded chunk at a time), each run
//!   single-threaded inside; lines are written in point order, so the bytes do not depend on
//!   the thread count.

use std::io::{BufRead, Write};
use std::path::Path;

use gpumem_core::digest::Digest;
use gpumem_traces::read::LineReader;
use rayon::prelude::*;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// Most points in one sweep: each is a whole run.
pub const MAX_POINTS: usize = 1 << 20;
/// Points run at once; bounds the lines held before they are written.
const CHUNK_POINTS: usize = 64;

/// One axis: a flag of the base run and the values it takes (`--axis FLAG=V1,V2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Axis {
    /// The flag's long name without its dashes, as in `--axis eviction=lru,arc`.
    pub flag: String,
    pub values: Vec<String>,
}

impl Axis {
    /// `FLAG=V1,V2,…`; a value may not be empty, nor repeat.
    pub fn parse(text: &str) -> Result<Axis, String> {
        let bad = |why: &str| format!("--axis {text}: {why} (expected FLAG=V1,V2,…)");
        let (flag, values) = text.split_once('=').ok_or_else(|| bad("no '='"))?;
        let flag = flag.trim().trim_start_matches("--");
        if flag.is_empty() {
            return Err(bad("no flag"));
        }
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
        if values.iter().any(String::is_empty) {
            return Err(bad("an empty value"));
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                return Err(bad(&format!("value {v} twice")));
            }
        }
        Ok(Axis {
            flag: flag.to_string(),
            values,
        })
    }
}

/// A sweep as a file (`--print-spec` writes it, `gpumem sweep FILE.ron` runs it): the
/// subcommand, its base flags as given on the command line, and the axes. Paths among the
/// flags (`--trace`, profile files) are absolute as printed; relative ones resolve against the
/// spec file's folder.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// `kv` or `alloc`.
    pub subcommand: String,
    pub flags: Vec<String>,
    pub axes: Vec<AxisSpec>,
}

/// One axis of a [`SweepSpec`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxisSpec {
    pub flag: String,
    pub values: Vec<String>,
}

impl SweepSpec {
    pub fn new(subcommand: &str, flags: &[String], axes: &[Axis]) -> SweepSpec {
        SweepSpec {
            subcommand: subcommand.into(),
            flags: flags.to_vec(),
            axes: axes
                .iter()
                .map(|a| AxisSpec {
                    flag: a.flag.clone(),
                    values: a.values.clone(),
                })
                .collect(),
        }
    }

    /// The axes, checked as `--axis` checks them.
    pub fn axes(&self) -> Result<Vec<Axis>, String> {
        self.axes
            .iter()
            .map(|a| Axis::parse(&format!("{}={}", a.flag, a.values.join(","))))
            .collect()
    }

    /// Reads a sweep spec file (at most [`crate::spec::MAX_SPEC_BYTES`]); errors name the
    /// file, line and field. Paths stay as written (the caller knows which flags are paths).
    pub fn read_file(path: &Path) -> Result<SweepSpec, String> {
        let text = crate::spec::read_bounded(path)?;
        let spec: SweepSpec =
            crate::spec::from_ron_as(&text).map_err(|e| format!("{}:{e}", path.display()))?;
        if !matches!(spec.subcommand.as_str(), "kv" | "alloc") {
            return Err(format!(
                "{}: subcommand \"{}\": a sweep runs kv or alloc",
                path.display(),
                spec.subcommand
            ));
        }
        Ok(spec)
    }

    /// The spec as RON, after a comment saying how to run it.
    pub fn to_ron(&self) -> Result<String, String> {
        let pretty = ron::ser::PrettyConfig::new()
            .indentor("    ".into())
            .new_line("\n".into());
        let body = ron::ser::to_string_pretty(self, pretty)
            .map_err(|e| format!("cannot write the sweep spec: {e}"))?;
        Ok(format!(
            "// gpumem sweep spec: `gpumem sweep FILE.ron [--out F.jsonl] [--shard I/N]`; relative paths resolve against this file's folder.\n{body}\n"
        ))
    }
}

/// Which points a process runs: those whose number is ≡ `index` (mod `count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// `i/n` with `0 <= i < n`, as batch schedulers number their tasks from 0.
    pub fn parse(text: &str) -> Result<Shard, String> {
        let bad = || format!("--shard {text}: expected I/N with 0 <= I < N (e.g. 0/4)");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    pub fn holds(self, point: usize) -> bool {
        point as u64 % self.count == self.index
    }
}

/// A point: one value of every axis, in the axes' order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point<'a> {
    pub number: usize,
    pub values: Vec<(&'a str, &'a str)>,
}

impl Serialize for Point<'_> {
    /// As a JSON object in the axes' order: `{"eviction": "lru", "replicas": "2"}`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.values.len()))?;
        for (flag, value) in &self.values {
            map.serialize_entry(flag, value)?;
        }
        map.end()
    }
}

/// The axes' cartesian product in row-major order; refused when an axis repeats or the
/// product passes [`MAX_POINTS`].
pub fn points(axes: &[Axis]) -> Result<Vec<Point<'_>>, String> {
    for (i, a) in axes.iter().enumerate() {
        if axes[..i].iter().any(|b| b.flag == a.flag) {
            return Err(format!("--axis {}: given twice", a.flag));
        }
    }
    let total = axes.iter().try_fold(1usize, |n, a| {
        n.checked_mul(a.values.len())
            .filter(|&n| n <= MAX_POINTS)
            .ok_or_else(|| format!("the axes make more than {MAX_POINTS} points (MAX_POINTS)"))
    })?;
    Ok((0..total)
        .map(|number| {
            let mut rest = number;
            let mut values = vec![("", ""); axes.len()];
            for (slot, axis) in values.iter_mut().zip(axes).rev() {
                let n = axis.values.len();
                *slot = (axis.flag.as_str(), axis.values[rest % n].as_str());
                rest /= n;
            }
            Point { number, values }
        })
        .collect())
}

/// The sweep's name in every line: its subcommand, base flags and axes.
pub fn sweep_digest(subcommand: &str, base: &[String], axes: &[Axis]) -> String {
    let mut d = Digest::new();
    let mut text = |t: &str| {
        d.word(t.len() as u64);
        for chunk in t.as_bytes().chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            d.word(u64::from_le_bytes(word));
        }
    };
    text(subcommand);
    for b in base {
        text(b);
    }
    for a in axes {
        text(&a.flag);
        a.values.iter().for_each(|v| text(v));
    }
    d.hex()
}

/// A point's line, without its line ending: the sweep, the point's number and axis values,
/// then `spec` and `outcome` (JSON texts, as they are: `"report": {…}` or `"error": "…"`).
pub fn point_line(
    sweep: &str,
    points: usize,
    point: &Point<'_>,
    spec_json: &str,
    outcome: &Result<String, String>,
) -> String {
    let axes = serde_json::to_string(point).expect("axis values serialize");
    let outcome = match outcome {
        Ok(report) => format!("\"report\":{report}"),
        Err(e) => format!(
            "\"error\":{}",
            serde_json::to_string(e).expect("a string serializes")
        ),
    };
    format!(
        "{{\"sweep\":\"{sweep}\",\"points\":{points},\"point\":{},\"axes\":{axes},\"spec\":{spec_json},{outcome}}}",
        point.number
    )
}

/// Runs `run` on every point of `shard` in parallel and writes the lines in point order: a
/// chunk of points at a time, so what is held is a chunk's lines, never the sweep's.
pub fn run_points<'a, F>(
    points: &[Point<'a>],
    shard: Shard,
    out: &mut dyn Write,
    run: F,
) -> Result<(), String>
where
    F: Fn(&Point<'a>) -> Result<String, String> + Sync,
{
    let mine: Vec<&Point<'a>> = points.iter().filter(|p| shard.holds(p.number)).collect();
    for chunk in mine.chunks(CHUNK_POINTS) {
        let lines: Vec<Result<String, String>> = chunk.par_iter().map(|p| run(p)).collect();
        for line in lines {
            out.write_all(line?.as_bytes())
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| format!("writing the sweep: {e}"))?;
        }
    }
    Ok(())
}

/// What a line of a sweep's output says about itself.
#[derive(serde::Deserialize)]
struct Header {
    sweep: String,
    points: usize,
    point: usize,
}

/// Calls `f` with each non-blank line of a sweep's output (`at`: "file:line", the line read as
/// `T`, its text); a line that is not `T` is an error naming it. Lines are capped by
/// [`LineReader`].
fn for_each_sweep_line<T: serde::de::DeserializeOwned>(
    input: impl BufRead,
    path: &Path,
    mut f: impl FnMut(String, T, &str) -> Result<(), String>,
) -> Result<(), String> {
    let mut reader = LineReader::new(input, path);
    while let Some(line) = reader.next_line() {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_blank() {
            continue;
        }
        let at = format!("{}:{}", path.display(), line.number);
        let parsed: T =
            serde_json::from_str(line.text).map_err(|e| format!("{at}: not a sweep line: {e}"))?;
        f(at, parsed, line.text)?;
    }
    Ok(())
}

/// Joins the lines of shard files (`inputs`: a name and its reader) into the unsharded run's
/// bytes, refusing lines of another sweep, a point twice, or any point missing.
pub fn merge(inputs: Vec<(&Path, Box<dyn BufRead + '_>)>) -> Result<Vec<u8>, String> {
    let mut sweep: Option<(String, usize)> = None;
    let mut lines: Vec<Option<(String, String)>> = Vec::new();
    for (path, input) in inputs {
        for_each_sweep_line(input, path, |at, h: Header, text| {
            match &sweep {
                None => {
                    if h.points > MAX_POINTS {
                        return Err(format!("{at}: {} points (at most {MAX_POINTS})", h.points));
                    }
                    lines = vec![None; h.points];
                    sweep = Some((h.sweep.clone(), h.points));
                }
                Some((digest, points)) if *digest != h.sweep || *points != h.points => {
                    return Err(format!(
                        "{at}: a line of another sweep ({} with {} points, not {digest} with {points})",
                        h.sweep, h.points
                    ))
                }
                Some(_) => {}
            }
            let slot = lines
                .get_mut(h.point)
                .ok_or_else(|| format!("{at}: point {} of {}", h.point, h.points))?;
            if let Some((first, _)) = slot {
                return Err(format!(
                    "{at}: point {} twice (also at {first}): a shard given twice?",
                    h.point
                ));
            }
            *slot = Some((at, text.to_string()));
            Ok(())
        })?;
    }
    let Some((_, points)) = sweep else {
        return Err("no sweep lines in the inputs".into());
    };
    let missing: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_none())
        .map(|(i, _)| i.to_string())
        .collect();
    if !missing.is_empty() {
        let shown = missing
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let more = if missing.len() > 20 { ", …" } else { "" };
        return Err(format!(
            "{} of {points} points missing ({shown}{more}): a shard is missing or incomplete",
            missing.len()
        ));
    }
    let mut out = Vec::new();
    for (_, text) in lines.into_iter().flatten() {
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(text: &str) -> Axis {
        Axis::parse(text).unwrap()
    }

    #[test]
    fn points_are_the_product_in_row_major_order() {
        let axes = [axis("a=1,2"), axis("--b=x,y,z")];
        let p = points(&axes).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p[0].values, vec![("a", "1"), ("b", "x")]);
        assert_eq!(p[1].values, vec![("a", "1"), ("b", "y")]);
        assert_eq!(p[5].values, vec![("a", "2"), ("b", "z")]);
        assert_eq!(points(&[]).unwrap().len(), 1, "no axis: the base run alone");
        assert!(points(&[axis("a=1"), axis("a=2")]).is_err());
    }

    #[test]
    fn bad_axes_and_shards_are_refused() {
        for bad in ["a", "=1", "a=", "a=1,,2", "a=1,1"] {
            assert!(Axis::parse(bad).is_err(), "{bad}");
        }
        for bad in ["1", "2/2", "0/0", "a/2", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Shard::parse("3/4").unwrap(), Shard { index: 3, count: 4 });
    }

    fn sweep_bytes(shard: Shard) -> Vec<u8> {
        let axes = [axis("a=1,2,3"), axis("b=x,y")];
        let p = points(&axes).unwrap();
        let digest = sweep_digest("kv", &["--limit".into(), "5".into()], &axes);
        let mut out = Vec::new();
        run_points(&p, shard, &mut out, |pt| {
            let report = Ok(format!("{{\"n\":{}}}", pt.number * 7));
            Ok(point_line(&digest, p.len(), pt, "{}", &report))
        })
        .unwrap();
        out
    }

    fn merged(shards: &[Vec<u8>]) -> Result<Vec<u8>, String> {
        let path = Path::new("shard.jsonl");
        merge(
            shards
                .iter()
                .map(|s| (path, Box::new(s.as_slice()) as Box<dyn BufRead>))
                .collect(),
        )
    }

    #[test]
    fn merged_shards_are_the_unsharded_bytes_and_gaps_are_refused() {
        let whole = sweep_bytes(Shard::ALL);
        assert_eq!(whole.iter().filter(|&&b| b == b'\n').count(), 6);
        for n in 1..=8 {
            let shards: Vec<_> = (0..n)
                .rev()
                .map(|i| sweep_bytes(Shard { index: i, count: n }))
                .collect();
            assert_eq!(merged(&shards).unwrap(), whole, "{n} shards");
        }
        let shards: Vec<_> = (0..3)
            .map(|i| sweep_bytes(Shard { index: i, count: 3 }))
            .collect();
        let err = merged(&shards[..2]).unwrap_err();
        assert!(err.contains("2 of 6 points missing (2, 5"), "{err}");
        let twice = [
            shards[0].clone(),
            shards[1].clone(),
            shards[1].clone(),
            shards[2].clone(),
        ];
        assert!(merged(&twice).unwrap_err().contains("twice"));
        let mut other = shards[2].clone();
        let at = other.windows(6).position(|w| w == b"sweep\"").unwrap() + 8;
        other[at] = if other[at] == b'0' { b'1' } else { b'0' };
        let err = merged(&[shards[0].clone(), shards[1].clone(), other]).unwrap_err();
        assert!(err.contains("another sweep"), "{err}");
        assert!(merged(&[b"{}\n".to_vec()])
            .unwrap_err()
            .contains("shard.jsonl:1"));
        assert!(merged(&[]).unwrap_err().contains("no sweep lines"));
    }
}

/// One point of a sweep as a plot takes it: its value on the x axis, on the series axis (when
/// one is asked) and the metric.
#[derive(Clone, Debug, PartialEq)]
pub struct PlotValue {
    pub x: String,
    pub series: Option<String>,
    pub y: f64,
}

/// The metric at `path` in a point's report: keys and array indices joined by dots
/// (`ttft_us.p99`, `results.0.bytes_reserved_peak`).
fn metric_at<'v>(report: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    path.split('.').try_fold(report, |v, key| match v {
        serde_json::Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => v.get(key),
    })
}

/// Reads a sweep's lines (as `gpumem sweep` or `sweep merge` wrote them) and takes from each
/// point its value of axis `x`, of axis `series` if given, and the number at `metric` in its
/// report. A point whose run failed is left out; a metric that is missing or not a number is
/// an error naming the line and what the report holds there.
pub fn plot_values(
    input: impl BufRead,
    path: &Path,
    metric: &str,
    x: &str,
    series: Option<&str>,
) -> Result<Vec<PlotValue>, String> {
    #[derive(serde::Deserialize)]
    struct Line {
        axes: std::collections::BTreeMap<String, String>,
        report: Option<serde_json::Value>,
    }
    let mut values = Vec::new();
    for_each_sweep_line(input, path, |at, point: Line, _| {
        if values.len() >= MAX_POINTS {
            return Err(format!("{at}: more than {MAX_POINTS} points (MAX_POINTS)"));
        }
        let axis = |name: &str| {
            point.axes.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = point.axes.keys().map(String::as_str).collect();
                format!(
                    "{at}: no axis '{}' (the sweep's axes: {})",
                    gpumem_traces::echo(name),
                    known.join(", ")
                )
            })
        };
        let x_value = axis(x)?;
        let series_value = series.map(axis).transpose()?;
        let Some(report) = point.report else {
            return Ok(());
        };
        let y = match metric_at(&report, metric) {
            Some(v) => v.as_f64().filter(|y| y.is_finite()).ok_or_else(|| {
                format!(
                    "{at}: metric '{}' is not a number here",
                    gpumem_traces::echo(metric)
                )
            })?,
            None => {
                let keys: Vec<&str> = report
                    .as_object()
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(format!(
                    "{at}: the report has no '{}' (its keys: {})",
                    gpumem_traces::echo(metric),
                    keys.join(", ")
                ));
            }
        };
        values.push(PlotValue {
            x: x_value,
            series: series_value,
            y,
        });
        Ok(())
    })?;
    if values.is_empty() {
        return Err(format!(
            "{}: no point with a report to plot",
            path.display()
        ));
    }
    Ok(values)
}
