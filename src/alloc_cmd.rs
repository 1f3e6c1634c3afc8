//! `gpumem alloc`: allocator-trace replay through allocation strategies.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use gpumem_core::alloc::caching::CachingSettings;
use gpumem_core::alloc::{AllocConfig, Strategy};
use gpumem_gpu::{
    check_room, CudaDevice, Device, DeviceExecutor, ExecReport, HostDevice, Inject, Scaled,
};
use gpumem_sim::alloc_replay::{simulate_all, AllocReport};
use gpumem_sim::monitor::Thresholds;
use gpumem_sim::recorded::SegmentsComparison;
use gpumem_sim::report::render_table;
use gpumem_sim::spec::{AllocExecuteSpec, AllocSpec, AllocTraceSpec, ExecuteDevice, RunSpec};
use gpumem_sim::{DefragMode, ReplayConfig};
use gpumem_traces::generate::{llm_serving, occupancy, LlmServingParams, OccupancyParams};
use gpumem_traces::AllocTrace;

use crate::progress::Progress;
use crate::units::parse_bytes;

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem alloc                                   built-in LLM-serving workload, every strategy
  gpumem alloc --trace snapshot.pickle --strategy caching,tlsf --plot mem.svg
  gpumem alloc --generate occupancy --ops 2000000 --capacity 1GiB --json
  gpumem alloc --trace t.jsonl --execute host    carry the decisions out on host memory and check them
  gpumem alloc --trace snapshot.pickle --strategy caching --compare-segments
                                                 replay the recording event by event and compare its segments

Trace formats: PyTorch memory snapshots (torch.cuda.memory._dump_snapshot pickles; alloc and
free_completed events are replayed, a segment_free with no allocation behind it is an
empty_cache; the caching strategies take the snapshot's allocator_settings, then
--pytorch-alloc-conf, and start from the state before the recording's first event, rebuilt
from its final segments as --compare-segments rebuilds it: the report's `start` says so, or
why they started empty; the other strategies start empty) and gpumem's JSON Lines, one
operation a line:
  {\"t_ns\": 1200, \"op\": \"alloc\", \"id\": 7, \"bytes\": 4096, \"stream\": 0}
  {\"t_ns\": 1900, \"op\": \"free\", \"id\": 7}

Fragmentation is 1 - largest free extent / free bytes inside reserved memory (pools apart).
A refused request is a fragmentation failure when capacity - allocated >= the rounded request,
else an OOM.")]
pub struct AllocArgs {
    /// Allocation trace: a PyTorch memory snapshot (.pickle) or gpumem JSON Lines. Without it a
    /// built-in seeded workload runs (see --generate), so no data is needed.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Built-in workload used when no --trace is given.
    #[arg(long, value_enum, default_value_t = Generator::LlmServing)]
    generate: Generator,

    /// Seed of the built-in workload and of fault injection.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Operations of the occupancy workload, engine steps of the llm-serving one.
    #[arg(long, value_name = "N")]
    ops: Option<u64>,

    /// Live bytes the occupancy workload holds, in percent of the capacity.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u32).range(1..=99))]
    occupancy: u32,

    /// Strategies to compare, comma separated, or `all`: first-fit, best-fit, buddy, tlsf,
    /// pool, caching, caching-expandable.
    #[arg(long, default_value = "all")]
    strategy: String,

    /// Device memory the strategies may reserve. Binary units: 80GiB = 80G; decimal ones:
    /// 80GB = 80,000,000,000 bytes (74.5 GiB).
    #[arg(long, default_value = "80GiB", value_parser = parse_bytes)]
    capacity: u64,

    /// Block alignment and minimum block (PyTorch's is 512 B).
    #[arg(long, default_value = "512", value_parser = parse_bytes)]
    alignment: u64,

    /// Mapping granularity of the arena strategies.
    #[arg(long, default_value = "2MiB", value_parser = parse_bytes)]
    page: u64,

    /// Defragmentation: `on-failure` compacts live, unpinned blocks when a request fails, then
    /// retries it once (not for buddy and pool).
    #[arg(long, value_enum, default_value_t = DefragArg::Off)]
    defrag: DefragArg,

    /// Memory-pressure levels: warning at or above WARNING, critical at or above CRITICAL,
    /// fractions of the capacity reserved (0 < WARNING < CRITICAL <= 1).
    #[arg(long, value_name = "WARNING,CRITICAL", default_value = "0.75,0.9", value_parser = Thresholds::parse)]
    pressure_thresholds: Thresholds,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,

    /// Write reserved and allocated bytes over time as SVG, one colour per strategy, warning
    /// and critical pressure shaded.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// Write the trace (loaded or generated) as gpumem JSON Lines.
    #[arg(long, value_name = "FILE.jsonl")]
    export_trace: Option<PathBuf>,

    /// Walk every strategy's full invariants after every operation (slow; for debugging).
    #[arg(long)]
    check: bool,

    /// Also carry the decisions out on real memory and check them: `host` (anywhere) or `cuda`
    /// (needs an NVIDIA driver). Every live block holds a pattern unique to it, verified when it
    /// is freed or moved, at checkpoints and at the end; digests must equal the simulation's.
    #[arg(long, value_enum, value_name = "DEVICE")]
    execute: Option<ExecuteArg>,

    /// With --execute: re-verify every live block every N operations (0: only at the end).
    #[arg(long, value_name = "N", default_value_t = 0)]
    checkpoint_every: u64,

    /// With --execute host: carry every block out at 1/N of its size and offset (N a power of
    /// two up to 512, at most --alignment): the same placement, disjointness and byte checks in
    /// 1/N of the memory and time. For tests and small machines.
    #[arg(long, value_name = "N", default_value_t = 1)]
    execute_scale: u64,

    /// With --execute: seeded fault injection, to prove the checks can fail: `corrupt-block`
    /// flips a byte of a placed block, `refuse-alloc` makes the device refuse a reservation;
    /// `:N` picks the N-th candidate, else --seed picks one. Repeatable.
    #[arg(long, value_name = "FAULT")]
    inject: Vec<String>,

    /// Settings of the caching strategies in PyTorch's own syntax, applied on top of the
    /// snapshot's `allocator_settings`: e.g. "expandable_segments:True,max_split_size_mb:128,
    /// roundup_power2_divisions:4,garbage_collection_threshold:0.6" (keys:
    /// max_split_size_mb, max_non_split_rounding_mb, roundup_power2_divisions (N or
    /// [MB:N,...,>:N]), garbage_collection_threshold, per_process_memory_fraction,
    /// expandable_segments, backend:native). Unknown keys and bad values are errors.
    #[arg(long, value_name = "CONF")]
    pytorch_alloc_conf: Option<String>,

    /// With a PyTorch snapshot and --strategy caching: replay the recording event by event from
    /// the state before its first event (every device on its own) and compare the segment
    /// events (segment_alloc/free/map/unmap, in order, with sizes, addresses and streams) and
    /// the final segments with the recorded ones; prints the counts and the first divergence
    /// (JSON: `segments` under the caching result).
    #[arg(long)]
    compare_segments: bool,

    /// Print the run spec these flags make, every default resolved, as RON, and exit; `gpumem
    /// run FILE.ron` runs it.
    #[arg(long)]
    print_spec: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecuteArg {
    Host,
    Cuda,
}

impl From<ExecuteArg> for ExecuteDevice {
    fn from(arg: ExecuteArg) -> Self {
        match arg {
            ExecuteArg::Host => ExecuteDevice::Host,
            ExecuteArg::Cuda => ExecuteDevice::Cuda,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Generator {
    /// Weights, per-step activations and growing KV of an LLM server.
    LlmServing,
    /// Random sizes and lifetimes held near --occupancy of the capacity.
    Occupancy,
}

#[derive(Clone, Copy, ValueEnum)]
enum DefragArg {
    Off,
    OnFailure,
}

pub fn run(args: AllocArgs) -> Result<ExitCode, String> {
    let spec = spec_from_args(&args)?;
    let checked = check(&spec)?;
    if args.print_spec {
        return crate::print_spec(RunSpec::Alloc(Box::new(spec)));
    }
    run_spec(&spec, &checked, args.json)
}

/// The spec the flags make, every default resolved.
pub(crate) fn spec_from_args(args: &AllocArgs) -> Result<AllocSpec, String> {
    let trace = match (&args.trace, args.generate) {
        (Some(path), _) => AllocTraceSpec::File { path: path.clone() },
        (None, Generator::LlmServing) => AllocTraceSpec::LlmServing {
            steps: match args.ops {
                Some(steps) => u32::try_from(steps)
                    .map_err(|_| format!("--ops {steps} is too many engine steps"))?,
                None => LlmServingParams::default().steps,
            },
        },
        (None, Generator::Occupancy) => AllocTraceSpec::Occupancy {
            ops: args.ops.unwrap_or(1_000_000),
            occupancy_pct: args.occupancy,
        },
    };
    let execute =
        match args.execute {
            Some(device) => Some(AllocExecuteSpec {
                device: device.into(),
                checkpoint_every: args.checkpoint_every,
                scale: args.execute_scale,
                inject: args.inject.clone(),
            }),
            None if !args.inject.is_empty() => return Err(INJECT_NEEDS_EXECUTE.into()),
            None if args.execute_scale != 1 => {
                return Err("--execute-scale needs --execute host: it scales real memory".into())
            }
            None if args.checkpoint_every != 0 => return Err(
                "--checkpoint-every needs --execute host|cuda: checkpoints re-verify real memory"
                    .into(),
            ),
            None => None,
        };
    Ok(AllocSpec {
        trace,
        seed: args.seed,
        strategy: parse_strategies(&args.strategy)?,
        capacity_bytes: args.capacity,
        alignment_bytes: args.alignment,
        page_bytes: args.page,
        defrag: match args.defrag {
            DefragArg::Off => DefragMode::Off,
            DefragArg::OnFailure => DefragMode::OnFailure,
        },
        check: args.check,
        pressure_thresholds: args.pressure_thresholds,
        execute,
        plot: args.plot.clone(),
        export_trace: args.export_trace.clone(),
        pytorch_alloc_conf: args.pytorch_alloc_conf.clone(),
        compare_segments: args.compare_segments,
    })
}

/// A spec, checked: the replay's configuration and the faults to inject.
pub struct Checked {
    config: ReplayConfig,
    faults: Vec<Inject>,
}

/// Everything about a spec that can be wrong before a trace is read.
pub fn check(spec: &AllocSpec) -> Result<Checked, String> {
    spec.validate()?;
    let alloc = AllocConfig {
        capacity_bytes: spec.capacity_bytes,
        alignment_bytes: spec.alignment_bytes,
        page_bytes: spec.page_bytes,
    };
    alloc.validate()?;
    let mut config = ReplayConfig::new(alloc);
    if let Some(conf) = &spec.pytorch_alloc_conf {
        // Checked against the defaults now; a snapshot's own settings come under it later.
        config.caching = gpumem_traces::torch::alloc_conf::parse(conf, CachingSettings::default())
            .map_err(|e| format!("--pytorch-alloc-conf: {e}"))?;
    }
    if spec.compare_segments {
        compared_strategy(&spec.strategy)?;
        if !matches!(spec.trace, AllocTraceSpec::File { .. }) {
            return Err(
                "--compare-segments needs --trace SNAPSHOT: a recording to compare with".into(),
            );
        }
    }
    config.defrag = spec.defrag;
    config.pressure = spec.pressure_thresholds;
    if spec.check {
        config.check_every_ops = 1;
    }
    let faults = match &spec.execute {
        Some(execute) => {
            config.checkpoint_every_ops = execute.checkpoint_every;
            parse_faults(&execute.inject)?
        }
        None => Vec::new(),
    };
    Ok(Checked { config, faults })
}

/// Runs a checked spec and prints its report: the table, or JSON with `json`.
pub fn run_spec(spec: &AllocSpec, checked: &Checked, json: bool) -> Result<ExitCode, String> {
    let config = &checked.config;
    let strategies = &spec.strategy;
    // Created first: an unwritable folder is found before a long run.
    let plot_file = spec
        .plot
        .as_deref()
        .map(crate::output::AtomicFile::create)
        .transpose()?;
    let trace = load_trace(&spec.trace, spec.seed, spec.capacity_bytes)?;
    if let Some(path) = &spec.export_trace {
        export(&trace, path)?;
    }
    let config = &with_recorded_settings(config, &trace, spec)?;
    let progress = Progress::new(
        Strategy::ALL.len(),
        trace.ops.len() as u64 * strategies.len() as u64,
    );
    let report = simulate_all(&trace, strategies, config, &|s, n| {
        progress.update(s as usize, n)
    })
    .map_err(|e| trace.error_at(e.line, e.reason).to_string())?;
    progress.finish();
    let mut report = report;
    if spec.compare_segments {
        compare_segments(spec, config, &mut report)?;
    }
    let executed = match &spec.execute {
        Some(execute) => Some(execute_all(
            &trace,
            strategies,
            &report,
            config,
            execute,
            &checked.faults,
            spec.seed,
        )?),
        None => None,
    };
    if json {
        let mut value = serde_json::to_value(&report).expect("report serializes");
        if let Some(runs) = &executed {
            attach_execution(&mut value, runs);
        }
        crate::output::println(&serde_json::to_string(&value).expect("report serializes"))?;
    } else {
        let mut text = render_text(&trace, &report, config);
        if let Some(runs) = &executed {
            text.push_str(&render_execution(&report, runs));
        }
        crate::output::print(&text)?;
    }
    // After the report: a plot that cannot be written must not cost the run its answer.
    if let Some(file) = plot_file {
        let title = format!(
            "{} — capacity {}",
            trace.name,
            gpumem_sim::report::human_bytes(config.alloc.capacity_bytes)
        );
        let svg = gpumem_sim::plot::reserved_allocated_svg(
            &title,
            &report.results,
            config.alloc.capacity_bytes,
            config.pressure,
        );
        file.write_all_and_commit(svg.as_bytes())?;
    }
    let failed = executed.as_ref().is_some_and(|runs| {
        runs.iter()
            .zip(&report.results)
            .any(|(run, sim)| run.mismatches > 0 || run.digest != sim.digest)
    });
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs a checked spec without a word on the terminal and answers its JSON report: a point
/// of a sweep.
pub fn json_quietly(spec: &AllocSpec, checked: &Checked) -> Result<String, String> {
    if spec.execute.is_some() || spec.plot.is_some() || spec.export_trace.is_some() {
        return Err(
            "--execute, --plot and --export-trace belong to single runs, not to sweeps".into(),
        );
    }
    let trace = load_trace(&spec.trace, spec.seed, spec.capacity_bytes)?;
    let config = &with_recorded_settings(&checked.config, &trace, spec)?;
    let mut report = simulate_all(&trace, &spec.strategy, config, &|_, _| {})
        .map_err(|e| trace.error_at(e.line, e.reason).to_string())?;
    if spec.compare_segments {
        compare_segments(spec, config, &mut report)?;
    }
    Ok(serde_json::to_string(&report).expect("report serializes"))
}

/// The caching strategies' settings: the snapshot's, then `--pytorch-alloc-conf` on top.
fn with_recorded_settings(
    config: &ReplayConfig,
    trace: &AllocTrace,
    spec: &AllocSpec,
) -> Result<ReplayConfig, String> {
    let base = trace.caching_settings.unwrap_or_default();
    let caching = match &spec.pytorch_alloc_conf {
        Some(conf) => gpumem_traces::torch::alloc_conf::parse(conf, base)
            .map_err(|e| format!("--pytorch-alloc-conf: {e}"))?,
        None => base,
    };
    Ok(ReplayConfig { caching, ..*config })
}

/// The strategy `--compare-segments` compares: `caching`, else `caching-expandable`.
fn compared_strategy(strategies: &[Strategy]) -> Result<usize, String> {
    strategies
        .iter()
        .position(|&s| s == Strategy::Caching)
        .or_else(|| {
            strategies
                .iter()
                .position(|&s| s == Strategy::CachingExpandable)
        })
        .ok_or_else(|| {
            "--compare-segments compares PyTorch's allocator: name --strategy caching".into()
        })
}

/// Replays the snapshot event by event through `caching` and puts the comparison under the
/// compared strategy's result.
fn compare_segments(
    spec: &AllocSpec,
    config: &ReplayConfig,
    report: &mut AllocReport,
) -> Result<(), String> {
    let AllocTraceSpec::File { path } = &spec.trace else {
        return Err("--compare-segments needs --trace SNAPSHOT".into());
    };
    let recording = gpumem_traces::torch::recording::read(path).map_err(|e| e.to_string())?;
    let at = compared_strategy(&spec.strategy)?;
    let mut settings = config.caching;
    if spec.strategy[at] == Strategy::CachingExpandable {
        settings.expandable_segments = true;
    }
    let comparison = gpumem_sim::recorded::compare(&recording, &config.alloc, &settings);
    report.results[at].segments = Some(comparison);
    Ok(())
}

/// Why `--inject` alone is refused.
pub const INJECT_NEEDS_EXECUTE: &str =
    "--inject needs --execute host|cuda: faults are injected into real memory";

/// `--inject` values (or a spec's `inject`).
pub fn parse_faults(inject: &[String]) -> Result<Vec<Inject>, String> {
    inject
        .iter()
        .map(|f| Inject::parse(f).map_err(|e| format!("--inject {f}: {e}")))
        .collect()
}

/// Refuses, before any execution, a run the device cannot carry out: a simulated peak above
/// what the device has available, or a page size its mappings cannot have.
fn check_device_room(
    simulated: &AllocReport,
    config: &ReplayConfig,
    execute: &AllocExecuteSpec,
) -> Result<(), String> {
    let peak = simulated
        .results
        .iter()
        .max_by_key(|r| r.bytes_reserved_peak);
    let what = peak.map_or(String::new(), |r| format!("--execute of {}", r.strategy));
    let peak_bytes = peak.map_or(0, |r| r.bytes_reserved_peak);
    let page_bytes = config.alloc.page_bytes;
    match execute.device {
        ExecuteDevice::Host => {
            let mut host = Scaled::new(HostDevice::new(), execute.scale)?;
            check_page(&host, page_bytes)?;
            check_room(&mut host, peak_bytes, &what)
        }
        ExecuteDevice::Cuda => {
            let mut cuda = CudaDevice::open(0).map_err(|e| format!("--execute cuda: {e}"))?;
            check_page(&cuda, page_bytes)?;
            check_room(&mut cuda, peak_bytes, &what)
        }
    }
}

/// The arena strategies map `--page` at a time: a device maps whole pages of its granularity.
fn check_page<D: Device>(device: &D, page_bytes: u64) -> Result<(), String> {
    let granularity = device.granularity_bytes();
    if page_bytes.is_multiple_of(granularity) {
        return Ok(());
    }
    Err(format!(
        "--page {page_bytes} is not a multiple of {}'s allocation granularity ({granularity} bytes): every map would be refused",
        device.name()
    ))
}

/// Replays every strategy again, one after the other (real memory is not shared), on the device.
fn execute_all(
    trace: &AllocTrace,
    strategies: &[Strategy],
    simulated: &AllocReport,
    config: &ReplayConfig,
    execute: &AllocExecuteSpec,
    faults: &[Inject],
    seed: u64,
) -> Result<Vec<ExecReport>, String> {
    check_device_room(simulated, config, execute)?;
    let ops = trace.ops.len() as u64;
    let progress = Progress::new(strategies.len(), ops * strategies.len() as u64);
    let mut runs = Vec::new();
    for (i, &strategy) in strategies.iter().enumerate() {
        let run = Run {
            trace,
            strategy,
            config,
            faults,
            seed,
            progress: &|done| progress.update(i, done),
        };
        let report = match execute.device {
            ExecuteDevice::Host if execute.scale > 1 => {
                run.on(Scaled::new(HostDevice::new(), execute.scale)?)?
            }
            ExecuteDevice::Host => run.on(HostDevice::new())?,
            ExecuteDevice::Cuda => {
                run.on(CudaDevice::open(0).map_err(|e| format!("--execute cuda: {e}"))?)?
            }
        };
        runs.push(report);
    }
    progress.finish();
    Ok(runs)
}

/// One strategy's replay on a device.
struct Run<'a> {
    trace: &'a AllocTrace,
    strategy: Strategy,
    config: &'a ReplayConfig,
    faults: &'a [Inject],
    seed: u64,
    progress: &'a dyn Fn(u64),
}

impl Run<'_> {
    fn on<D: Device>(&self, device: D) -> Result<ExecReport, String> {
        let capacity = self.config.alloc.capacity_bytes;
        let mut exec = DeviceExecutor::new(device, capacity, self.faults, self.seed);
        // Each operation may fill gigabytes: report every one of them.
        let config = ReplayConfig {
            progress_every_ops: 1,
            ..*self.config
        };
        gpumem_sim::replay(self.trace, self.strategy, &config, &mut exec, &mut |done| {
            (self.progress)(done)
        })
        .map_err(|e| self.trace.error_at(e.line, e.reason).to_string())?;
        Ok(exec.finish())
    }
}

fn attach_execution(value: &mut serde_json::Value, runs: &[ExecReport]) {
    let results = value["results"].as_array_mut().expect("results array");
    for (result, r) in results.iter_mut().zip(runs) {
        result["bytes_verified"] = r.bytes_verified.into();
        result["mismatches"] = r.mismatches.into();
        result["digest_executed"] = r.digest.clone().into();
        result["execution"] = serde_json::to_value(r).expect("execution report serializes");
    }
}

fn sum_kind(runs: &[ExecReport], kind: &str) -> (u64, u64) {
    runs.iter()
        .flat_map(|r| &r.timings)
        .filter(|t| t.kind == kind)
        .fold((0, 0), |(c, ns), t| (c + t.count, ns + t.measured_ns_total))
}

fn render_execution(report: &AllocReport, runs: &[ExecReport]) -> String {
    use gpumem_sim::report::human_bytes;
    let device = runs.first().map_or("", |r| r.device.as_str());
    let mut out = format!("\nexecuted on {device}\n");
    out.push_str(
        "strategy            digest       verified  mismatches  refused  measured / modelled\n",
    );
    for (sim, r) in report.results.iter().zip(runs) {
        let digest = if r.digest == sim.digest {
            "= simulated"
        } else {
            "DIFFERS"
        };
        let measured: u64 = r.timings.iter().map(|t| t.measured_ns_total).sum();
        out.push_str(&format!(
            "{:<18}  {:<11}  {:>9}  {:>10}  {:>7}  {:.1} ms / {:.1} ms\n",
            sim.strategy,
            digest,
            human_bytes(r.bytes_verified),
            r.mismatches,
            r.device_refusals + r.injected_refusals,
            measured as f64 / 1e6,
            sim.modelled_ns as f64 / 1e6,
        ));
    }
    out.push_str("\nper decision, all strategies     count    measured     modelled   (measured includes writing and checking the patterns)\n");
    for kind in gpumem_core::decision::Decision::KIND_NAMES {
        let (count, measured) = sum_kind(runs, kind);
        if count == 0 {
            continue;
        }
        let modelled: u64 = report
            .results
            .iter()
            .flat_map(|r| &r.modelled)
            .filter(|k| k.kind == kind)
            .map(|k| k.modelled_ns)
            .sum();
        out.push_str(&format!(
            "  {kind:<28} {count:>8}  {:>8.0} ns  {:>8.0} ns\n",
            measured as f64 / count as f64,
            modelled as f64 / count as f64
        ));
    }
    for (sim, r) in report.results.iter().zip(runs) {
        if r.mismatches > 0 {
            out.push_str(&format!(
                "{}: {} bytes did not hold their pattern in {} checks; {}\n",
                sim.strategy,
                r.mismatches,
                r.mismatched_verifications,
                r.first_mismatches
                    .first()
                    .map_or(String::new(), |m| format!("first: {m}"))
            ));
        }
        if let Some(first) = r.device_errors.first() {
            let refusals = r.device_refusals;
            let more = match refusals {
                0 | 1 => String::new(),
                n => format!(" ({} more like it)", n - 1),
            };
            out.push_str(&format!(
                "{}: the device refused {refusals} reservations; first: {first}{more}\n",
                sim.strategy
            ));
        }
        if !r.injections.is_empty() {
            out.push_str(&format!(
                "{}: injected {}\n",
                sim.strategy,
                r.injections.join(", ")
            ));
        }
    }
    out
}

fn parse_strategies(text: &str) -> Result<Vec<Strategy>, String> {
    if text == "all" {
        return Ok(Strategy::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        let s = Strategy::parse(name).ok_or_else(|| {
            let known: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
            format!(
                "unknown strategy '{name}'; known: {}, or all",
                known.join(", ")
            )
        })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The operations a spec names: a trace file or a built-in generator.
fn load_trace(
    trace: &AllocTraceSpec,
    seed: u64,
    capacity_bytes: u64,
) -> Result<AllocTrace, String> {
    Ok(match trace {
        AllocTraceSpec::File { path } => {
            gpumem_traces::load_alloc_trace(path).map_err(|e| e.to_string())?
        }
        &AllocTraceSpec::LlmServing { steps } => llm_serving(&LlmServingParams {
            seed,
            steps,
            ..LlmServingParams::default()
        }),
        &AllocTraceSpec::Occupancy { ops, occupancy_pct } => occupancy(&OccupancyParams {
            seed,
            ops,
            capacity_bytes,
            target_occupancy_pct: occupancy_pct,
            min_bytes: 512,
            max_bytes: (capacity_bytes / 64).max(512),
        }),
    })
}

fn export(trace: &AllocTrace, path: &std::path::Path) -> Result<(), String> {
    let mut file = crate::output::AtomicFile::create(path)?;
    gpumem_traces::jsonl::write(trace, &mut file)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    file.commit()
}

fn render_text(trace: &AllocTrace, report: &AllocReport, config: &ReplayConfig) -> String {
    use gpumem_sim::report::human_bytes;
    let mut out = format!(
        "trace     {} ({} ops, {:?})\ncapacity  {}, alignment {}, defrag {}\n",
        trace.name,
        trace.ops.len(),
        trace.source,
        human_bytes(config.alloc.capacity_bytes),
        human_bytes(config.alloc.alignment_bytes),
        match config.defrag {
            DefragMode::Off => "off",
            DefragMode::OnFailure => "on failure",
        }
    );
    if trace.recorded_ooms > 0 {
        out.push_str(&format!(
            "recorded  {} OOMs in the trace itself\n",
            trace.recorded_ooms
        ));
    }
    out.push('\n');
    out.push_str(&render_table(report));
    out.push_str(&render_starts(report));
    // Counted by the strategies that started empty (the same count for each).
    let unknown = report
        .results
        .iter()
        .find(|r| r.start.as_ref().is_none_or(|s| s.start != "recorded"))
        .map_or(0, |r| r.unknown_frees);
    if unknown > 0 {
        out.push_str(&format!(
            "\n{unknown} frees name allocations made before the recording started; the strategies that started empty count them, not replay them.\n"
        ));
    }
    for r in &report.results {
        if let Some(m) = &r.segments_match {
            out.push_str(&format!(
                "{}: {} of {} recorded segments reproduced exactly (size and block layout; {} simulated){}\n",
                r.strategy,
                m.identical,
                m.recorded,
                m.simulated,
                if m.matches { " — a full match" } else { "" }
            ));
        }
    }
    for r in &report.results {
        if let Some(c) = &r.segments {
            out.push_str(&render_segments(r.strategy, c));
        }
    }
    out.push_str(&render_pressure(report, config));
    out
}

/// Where each strategy's replay of a torch snapshot started: the recorded state before its
/// first event, or empty (and why); the strategies that are not PyTorch's on one line.
fn render_starts(report: &AllocReport) -> String {
    use gpumem_sim::recorded::OTHER_STRATEGY_STARTS_EMPTY;
    use gpumem_sim::report::human_bytes;
    let mut out = String::new();
    let mut others = Vec::new();
    for r in &report.results {
        let Some(s) = &r.start else { continue };
        match s.start_reason.as_deref() {
            None => out.push_str(&format!(
                "\n{}: started from the recorded state before the first event ({} segments, {} live blocks, {} reserved)",
                r.strategy,
                s.start_segments,
                s.start_live_blocks,
                human_bytes(s.start_reserved_bytes)
            )),
            Some(OTHER_STRATEGY_STARTS_EMPTY) => others.push(r.strategy),
            Some(reason) => out.push_str(&format!("\n{}: started empty: {reason}", r.strategy)),
        }
        for note in &s.start_notes {
            out.push_str(&format!("\n  note: {note}"));
        }
    }
    if !others.is_empty() {
        out.push_str(&format!(
            "\n{}: started empty ({OTHER_STRATEGY_STARTS_EMPTY})",
            others.join(", ")
        ));
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// `--compare-segments`: counts per device, and the first divergence.
fn render_segments(strategy: &str, c: &SegmentsComparison) -> String {
    let pct = |m: u64, r: u64| {
        if r == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", m as f64 * 100.0 / r as f64)
        }
    };
    let mut out = format!(
        "\nsegments of the recording replayed through {strategy}:\n  segment events  {} of {} matched in order ({})\n  final segments  {} of {} reproduced ({})\n",
        c.events_matched,
        c.events_recorded,
        pct(c.events_matched, c.events_recorded),
        c.final_matched,
        c.final_recorded,
        pct(c.final_matched, c.final_recorded),
    );
    for d in &c.devices {
        out.push_str(&format!(
            "  device {}: from the {} state ({} segments, {} live blocks); events {}/{}, final {}/{}; {} of {} allocations at their recorded address; {} releases, {} of {} recorded OOMs reproduced, {} unknown frees\n",
            d.device,
            d.start,
            d.restored_segments,
            d.restored_blocks,
            d.events_matched,
            d.events_recorded,
            d.final_matched,
            d.final_recorded,
            d.allocs_at_recorded_address,
            d.allocs,
            d.releases_replayed,
            d.ooms_simulated.min(d.ooms_recorded),
            d.ooms_recorded,
            d.unknown_frees,
        ));
        if let Some(m) = d.final_matched_from_empty {
            out.push_str(&format!(
                "    built from nothing instead (live blocks in address order): final {m}/{}\n",
                d.final_recorded
            ));
        }
        for note in &d.restore_notes {
            out.push_str(&format!("    note: {note}\n"));
        }
    }
    if let Some(div) = &c.first_divergence {
        out.push_str(&format!(
            "  first divergence at segment event {}: recorded {}, simulated {}; caused by {}\n",
            div.event,
            div.recorded.as_deref().unwrap_or("nothing more"),
            div.simulated.as_deref().unwrap_or("nothing more"),
            div.cause
        ));
    }
    out
}

/// Each strategy's memory pressure: reserved bytes against the capacity.
fn render_pressure(report: &AllocReport, config: &ReplayConfig) -> String {
    let mut out = format!(
        "
pressure (reserved bytes of the capacity; warning, critical at {}):
",
        config.pressure
    );
    let width = report.results.iter().map(|r| r.strategy.len()).max();
    for r in &report.results {
        out.push_str(&format!(
            "  {:<w$}  {}\n",
            r.strategy,
            r.pressure.summary(),
            w = width.unwrap_or(0)
        ));
    }
    out
}
