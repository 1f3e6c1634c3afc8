//! `gpumem sweep kv|alloc [its flags] --axis FLAG=V1,V2 … [--out F.jsonl] [--shard i/n]` and
//! `gpumem sweep merge FILES… [--out F]`, `gpumem sweep plot F.jsonl --metric M --x AXIS`: flags → one spec per point → runs in parallel →
//! one JSON line per point (`gpumem_sim::sweep`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use gpumem_sim::sweep::{
    merge, point_line, points, run_points, sweep_digest, Axis, Point, Shard, SweepSpec,
};

use crate::alloc_cmd::{self, AllocArgs};
use crate::kv_cmd::{self, KvArgs};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    command: Option<SweepCommand>,

    /// A sweep spec, as `gpumem sweep kv|alloc … --print-spec` writes it, to run.
    #[arg(value_name = "SWEEP.ron")]
    spec: Option<PathBuf>,

    /// With SWEEP.ron: write the lines there (atomically) instead of to stdout.
    #[arg(long, value_name = "FILE.jsonl")]
    out: Option<PathBuf>,

    /// With SWEEP.ron: run only the points whose number is ≡ I (mod N).
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    shard: Option<Shard>,

    /// With SWEEP.ron: check it and print it as gpumem reads it (paths made absolute).
    #[arg(long)]
    print_spec: bool,
}

const POINT_HELP: &str =
    "Any flag of the subcommand sets the base run (see its --help); the sweep's own:
  --axis FLAG=V1,V2,…   a flag of the subcommand and its values (repeatable: the product);
                        an on/off flag takes true,false
  --out FILE.jsonl      write the lines there (atomically) instead of to stdout
  --shard I/N           run only the points whose number is ≡ I (mod N), for batch schedulers
  --print-spec          check every point, then print the sweep as RON (paths made absolute)
                        instead of running it; `gpumem sweep FILE.ron` runs it

One JSON line per point, in point order (the last axis varies fastest): the sweep's digest,
the number of points, the point's number and axis values, its spec and its JSON report (or
\"error\" where the run failed). The bytes do not depend on the thread count
(RAYON_NUM_THREADS). `gpumem sweep merge` joins shard files into the unsharded run's bytes.

Example:
  gpumem sweep kv --trace conversation_trace.jsonl --limit 2000 \\
      --axis replicas=2,4,8 --axis router=round-robin,least-loaded,kv-aware --out fleet.jsonl";

#[derive(Subcommand)]
enum SweepCommand {
    /// Sweep `gpumem kv` runs over the product of axes.
    #[command(after_help = POINT_HELP)]
    Kv(PointArgs),
    /// Sweep `gpumem alloc` runs over the product of axes.
    #[command(after_help = POINT_HELP)]
    Alloc(PointArgs),
    /// Join shard files (`--shard i/n` outputs) into exactly the unsharded sweep's bytes;
    /// refuses a missing or duplicate shard and shards of different sweeps.
    Merge(MergeArgs),
    /// Draw one metric of a sweep's output against one axis, a line per value of another (SVG).
    #[command(after_help = PLOT_HELP)]
    Plot(PlotArgs),
}

const PLOT_HELP: &str = "The metric is a path into each point's JSON report: keys and array
indices joined by dots. A numeric axis (every value a number) is drawn to scale; any other
axis places its values evenly, in the sweep's order. Points whose run failed are left out.

Examples:
  gpumem sweep plot fleet.jsonl --metric ttft_us.p99 --x replicas --series router --out ttft.svg
  gpumem sweep plot caps.jsonl --metric results.0.bytes_reserved_peak --x capacity --out peak.svg";

#[derive(Args)]
struct PlotArgs {
    /// A sweep's lines (`gpumem sweep … --out`, or `sweep merge`'s output); `-` for stdin.
    #[arg(value_name = "FILE.jsonl")]
    file: PathBuf,
    /// What to draw: a number in each point's report, e.g. `ttft_us.p99`, `prefix_hit_rate`.
    #[arg(long, value_name = "PATH")]
    metric: String,
    /// The axis along x (an `--axis` of the sweep, e.g. `replicas`).
    #[arg(long, value_name = "AXIS")]
    x: String,
    /// The axis whose values get a line each (default: one line).
    #[arg(long, value_name = "AXIS")]
    series: Option<String>,
    /// Where to write the SVG (atomically).
    #[arg(long, value_name = "FILE.svg")]
    out: PathBuf,
}

#[derive(Args)]
struct PointArgs {
    /// The base run's flags, `--axis`, `--out` and `--shard` (see below).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "FLAGS"
    )]
    flags: Vec<String>,
}

#[derive(Args)]
struct MergeArgs {
    /// Shard files, in any order.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Write the merged sweep there (atomically) instead of to stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// `gpumem kv`'s flags alone, to parse a point's.
#[derive(Parser)]
#[command(name = "gpumem sweep kv", no_binary_name = true)]
pub(crate) struct KvPoint {
    #[command(flatten)]
    pub(crate) args: KvArgs,
}

/// `gpumem alloc`'s flags alone.
#[derive(Parser)]
#[command(name = "gpumem sweep alloc", no_binary_name = true)]
struct AllocPoint {
    #[command(flatten)]
    args: AllocArgs,
}

pub fn run(args: SweepArgs) -> Result<ExitCode, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("the current folder: {e}"))?;
    match (args.command, args.spec) {
        (Some(SweepCommand::Kv(p)), _) => sweep("kv", split_flags(p.flags)?, &cwd),
        (Some(SweepCommand::Alloc(p)), _) => sweep("alloc", split_flags(p.flags)?, &cwd),
        (Some(SweepCommand::Merge(m)), _) => merge_files(&m),
        (Some(SweepCommand::Plot(p)), _) => plot_file(&p),
        (None, Some(path)) => {
            let in_spec = |e: String| format!("{}: {e}", path.display());
            let spec = SweepSpec::read_file(&path)?;
            let own = split_flags(spec.flags.clone()).map_err(in_spec)?;
            if !own.axes.is_empty() || own.out.is_some() || own.shard != Shard::ALL || own.print_spec
            {
                return Err(in_spec(
                    "flags holds --axis, --out, --shard or --print-spec: axes go in `axes`, the others on the command line".into(),
                ));
            }
            let folder = cwd.join(path.parent().unwrap_or(Path::new("")));
            let flags = SweepFlags {
                axes: spec.axes().map_err(in_spec)?,
                out: args.out,
                shard: args.shard.unwrap_or(Shard::ALL),
                print_spec: args.print_spec,
                base: spec.flags,
            };
            sweep(&spec.subcommand, flags, &folder)
        }
        (None, None) => Err(
            "what to sweep: gpumem sweep kv|alloc [flags] --axis FLAG=V1,V2, gpumem sweep SWEEP.ron, or gpumem sweep merge FILES".into(),
        ),
    }
}

/// The prepared run of a point of `subcommand` from its flags.
fn prepare(subcommand: &str, argv: Vec<String>) -> Result<(String, Job), String> {
    if subcommand == "kv" {
        let a = KvPoint::try_parse_from(argv).map_err(|e| e.to_string())?;
        let spec = kv_cmd::spec_for_many_runs(&a.args)?;
        let checked = kv_cmd::check(&spec)?;
        let spec_json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        Ok((spec_json, Box::new(move || run_kv(&spec, &checked)) as Job))
    } else {
        let a = AllocPoint::try_parse_from(argv).map_err(|e| e.to_string())?;
        let spec = alloc_cmd::spec_from_args(&a.args)?;
        let checked = alloc_cmd::check(&spec)?;
        let spec_json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        Ok((
            spec_json,
            Box::new(move || alloc_cmd::json_quietly(&spec, &checked).map(Ok)) as Job,
        ))
    }
}

/// The flags whose values are files: made absolute (relative ones against `folder`), so a
/// printed sweep runs from anywhere and its lines name the same files whichever way it ran.
fn absolute_paths(flag: &str, value: &str, cwd: &Path, folder: &Path) -> String {
    let is_path = match flag {
        "trace" => value != "-",
        "gpu" | "model" => value.ends_with(".ron"),
        _ => false,
    };
    if !is_path {
        return value.to_string();
    }
    crate::absolute(cwd, &folder.join(value))
        .to_string_lossy()
        .into_owned()
}

/// `absolute_paths` over a command line's flags and the axes' values.
fn absolute_flags(flags: &mut SweepFlags, folder: &Path) -> Result<(), String> {
    let cwd = std::env::current_dir().map_err(|e| format!("the current folder: {e}"))?;
    let mut pending: Option<String> = None;
    for f in flags.base.iter_mut() {
        if let Some(flag) = pending.take() {
            *f = absolute_paths(&flag, f, &cwd, folder);
            continue;
        }
        let Some(name) = f.strip_prefix("--") else {
            continue;
        };
        match name.split_once('=') {
            Some((flag, value)) => {
                *f = format!("--{flag}={}", absolute_paths(flag, value, &cwd, folder));
            }
            None => pending = Some(name.to_string()),
        }
    }
    for axis in &mut flags.axes {
        for v in &mut axis.values {
            *v = absolute_paths(&axis.flag, v, &cwd, folder);
        }
    }
    Ok(())
}

/// A checked point, ready to run: its report (`Ok`), or why the run itself failed (`Err`
/// inside: a stall, a bad request, part of the answer); the outer error ends the sweep.
type Job = Box<dyn Fn() -> Result<Result<String, String>, String> + Send + Sync>;

fn run_kv(
    spec: &gpumem_sim::spec::KvSpec,
    checked: &kv_cmd::Checked,
) -> Result<Result<String, String>, String> {
    Ok(kv_cmd::simulate_quietly(spec, checked)?
        .map(|outcome| outcome.to_json())
        .map_err(|e| e.to_string()))
}

/// The sweep's own flags, taken out of the command line; the rest is the base run's.
struct SweepFlags {
    axes: Vec<Axis>,
    out: Option<PathBuf>,
    shard: Shard,
    print_spec: bool,
    base: Vec<String>,
}

fn split_flags(flags: Vec<String>) -> Result<SweepFlags, String> {
    let mut axes = Vec::new();
    let (mut out, mut shard) = (None, None);
    let mut print_spec = false;
    let mut base = Vec::new();
    let mut it = flags.into_iter();
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (flag.clone(), None),
        };
        if name == "--print-spec" && inline.is_none() {
            print_spec = true;
            continue;
        }
        if !matches!(name.as_str(), "--axis" | "--out" | "--shard") {
            base.push(flag);
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().ok_or_else(|| format!("{name} needs a value"))?,
        };
        match name.as_str() {
            "--axis" => axes.push(Axis::parse(&value)?),
            "--out" if out.is_none() => out = Some(PathBuf::from(value)),
            "--shard" if shard.is_none() => shard = Some(Shard::parse(&value)?),
            _ => return Err(format!("{name} given twice")),
        }
    }
    for refused in ["--json", "--help", "-h"] {
        if base.iter().any(|f| f == refused) {
            return Err(format!(
                "{refused}: not a flag of a sweep's runs (every point's report is JSON; see gpumem sweep kv|alloc --help)"
            ));
        }
    }
    Ok(SweepFlags {
        axes,
        out,
        shard: shard.unwrap_or(Shard::ALL),
        print_spec,
        base,
    })
}

/// The flags a point adds to the base run: `--FLAG=VALUE`, or for an on/off flag `--FLAG`
/// (true) or nothing (false).
fn point_flags(command: &clap::Command, point: &Point<'_>) -> Result<Vec<String>, String> {
    let mut flags = Vec::new();
    for &(flag, value) in &point.values {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .ok_or_else(|| {
                format!(
                    "--axis {flag}: not a flag of {} (see its --help)",
                    command.get_name()
                )
            })?;
        if arg.get_action().takes_values() {
            flags.push(format!("--{flag}={value}"));
        } else {
            match value {
                "true" => flags.push(format!("--{flag}")),
                "false" => {}
                _ => {
                    return Err(format!(
                        "--axis {flag}={value}: --{flag} is on or off: its values are true,false"
                    ))
                }
            }
        }
    }
    Ok(flags)
}

/// Checks every point's spec, then runs them (those of the shard) and writes their lines, or
/// with `--print-spec` prints the sweep. Relative paths among the flags resolve against
/// `folder`.
fn sweep(subcommand: &str, mut flags: SweepFlags, folder: &Path) -> Result<ExitCode, String> {
    absolute_flags(&mut flags, folder)?;
    let command = match subcommand {
        "kv" => KvPoint::command(),
        _ => AllocPoint::command(),
    };
    let SweepFlags {
        axes,
        out,
        shard,
        print_spec,
        base,
    } = flags;
    for axis in &axes {
        let set = |f: &String| {
            f == &format!("--{}", axis.flag) || f.starts_with(&format!("--{}=", axis.flag))
        };
        if base.iter().any(set) {
            return Err(format!(
                "--axis {}: the base run sets --{} too; give it once",
                axis.flag, axis.flag
            ));
        }
    }
    let all = points(&axes)?;
    let digest = sweep_digest(subcommand, &base, &axes);
    // Every point is checked before any runs: a bad value is found in a second, not after
    // hours, and every shard refuses the same sweep.
    let mut jobs = Vec::with_capacity(all.len());
    for point in &all {
        let mut argv = base.clone();
        argv.extend(point_flags(&command, point)?);
        let named = || {
            point
                .values
                .iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let job = prepare(subcommand, argv).map_err(|e| {
            let e = e.trim_end().trim_start_matches("error: ");
            if point.values.is_empty() {
                e.to_string()
            } else {
                format!("point {} ({}): {e}", point.number, named())
            }
        })?;
        jobs.push(if shard.holds(point.number) {
            Some(job)
        } else {
            None
        });
    }
    if print_spec {
        crate::output::print(&SweepSpec::new(subcommand, &base, &axes).to_ron()?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut file = out
        .as_deref()
        .map(crate::output::AtomicFile::create)
        .transpose()?;
    let stdout = std::io::stdout();
    let mut lock;
    let sink: &mut dyn Write = match &mut file {
        Some(f) => f,
        None => {
            lock = std::io::BufWriter::new(stdout.lock());
            &mut lock
        }
    };
    run_points(&all, shard, sink, |point| {
        let (spec_json, job) = jobs[point.number]
            .as_ref()
            .expect("the shard's points are prepared");
        let outcome = job().map_err(|e| format!("point {}: {e}", point.number))?;
        Ok(point_line(&digest, all.len(), point, spec_json, &outcome))
    })?;
    sink.flush()
        .map_err(|e| format!("writing the sweep: {e}"))?;
    if let Some(f) = file {
        f.commit()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn plot_file(p: &PlotArgs) -> Result<ExitCode, String> {
    if p.series.as_deref() == Some(p.x.as_str()) {
        return Err(format!("--series {0} is also --x {0}: name two axes", p.x));
    }
    let input = gpumem_traces::read::open(&p.file).map_err(|e| e.to_string())?;
    let values =
        gpumem_sim::sweep::plot_values(input, &p.file, &p.metric, &p.x, p.series.as_deref())?;
    let title = match &p.series {
        Some(series) => format!("{} by {}, one line per {series}", p.metric, p.x),
        None => format!("{} by {}", p.metric, p.x),
    };
    let svg = gpumem_sim::plot::sweep_svg(&title, &p.x, &p.metric, &values);
    crate::output::AtomicFile::create(&p.out)?.write_all_and_commit(svg.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn merge_files(m: &MergeArgs) -> Result<ExitCode, String> {
    let mut inputs: Vec<(&std::path::Path, Box<dyn BufRead>)> = Vec::new();
    for path in &m.files {
        let input = gpumem_traces::read::open(path).map_err(|e| e.to_string())?;
        inputs.push((path.as_path(), input));
    }
    let merged = merge(inputs)?;
    match &m.out {
        Some(path) => crate::output::AtomicFile::create(path)?.write_all_and_commit(&merged)?,
        None => crate::output::print(
            std::str::from_utf8(&merged).map_err(|e| format!("merged sweep: {e}"))?,
        )?,
    }
    Ok(ExitCode::SUCCESS)
}
