//! `gpumem alloc`: allocator-trace replay through allocation strategies.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use gpumem_core::alloc::{AllocConfig, Strategy};
use gpumem_gpu::{CudaDevice, Device, DeviceExecutor, ExecReport, HostDevice, Inject};
use gpumem_sim::alloc_replay::{simulate_all, AllocReport};
use gpumem_sim::report::render_table;
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

Trace formats: PyTorch memory snapshots (torch.cuda.memory._dump_snapshot pickles; alloc and
free_completed events are replayed, a segment_free with no allocation behind it is an
empty_cache) and gpumem's JSON Lines, one operation a line:
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

    /// Device memory the strategies may reserve.
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

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,

    /// Write reserved and allocated bytes over time as SVG, one colour per strategy.
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

    /// With --execute: seeded fault injection, to prove the checks can fail: `corrupt-block`
    /// flips a byte of a placed block, `refuse-alloc` makes the device refuse a reservation;
    /// `:N` picks the N-th candidate, else --seed picks one. Repeatable.
    #[arg(long, value_name = "FAULT")]
    inject: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecuteArg {
    Host,
    Cuda,
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
    let strategies = parse_strategies(&args.strategy)?;
    let alloc = AllocConfig {
        capacity_bytes: args.capacity,
        alignment_bytes: args.alignment,
        page_bytes: args.page,
    };
    alloc.validate()?;
    let trace = load_trace(&args)?;
    if let Some(path) = &args.export_trace {
        export(&trace, path)?;
    }
    let mut config = ReplayConfig::new(alloc);
    config.defrag = match args.defrag {
        DefragArg::Off => DefragMode::Off,
        DefragArg::OnFailure => DefragMode::OnFailure,
    };
    if args.check {
        config.check_every_ops = 1;
    }
    config.checkpoint_every_ops = args.checkpoint_every;
    let progress = Progress::new(
        Strategy::ALL.len(),
        trace.ops.len() as u64 * strategies.len() as u64,
    );
    let faults = parse_faults(&args.inject, args.execute.is_some())?;
    let report = simulate_all(&trace, &strategies, &config, &|s, n| {
        progress.update(s as usize, n)
    })
    .map_err(|e| format!("{}:{e}", trace.name))?;
    progress.finish();
    if let Some(path) = &args.plot {
        let title = format!(
            "{} — capacity {}",
            trace.name,
            gpumem_sim::report::human_bytes(alloc.capacity_bytes)
        );
        let svg = gpumem_sim::plot::reserved_allocated_svg(&title, &report.results);
        std::fs::write(path, svg)
            .map_err(|e| format!("{}: cannot write the plot: {e}", path.display()))?;
    }
    let executed = match args.execute {
        Some(device) => Some(execute_all(
            &trace,
            &strategies,
            &config,
            device,
            &faults,
            args.seed,
        )?),
        None => None,
    };
    if args.json {
        let mut value = serde_json::to_value(&report).expect("report serializes");
        if let Some(runs) = &executed {
            attach_execution(&mut value, runs);
        }
        println!(
            "{}",
            serde_json::to_string(&value).expect("report serializes")
        );
    } else {
        print!("{}", render_text(&trace, &report, &config));
        if let Some(runs) = &executed {
            print!("{}", render_execution(&report, runs));
        }
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

/// `--inject` values, which only make sense with `--execute`.
pub fn parse_faults(inject: &[String], execute: bool) -> Result<Vec<Inject>, String> {
    if !inject.is_empty() && !execute {
        return Err(
            "--inject needs --execute host|cuda: faults are injected into real memory".into(),
        );
    }
    inject
        .iter()
        .map(|f| Inject::parse(f).map_err(|e| format!("--inject {f}: {e}")))
        .collect()
}

/// Replays every strategy again, one after the other (real memory is not shared), on the device.
fn execute_all(
    trace: &AllocTrace,
    strategies: &[Strategy],
    config: &ReplayConfig,
    device: ExecuteArg,
    faults: &[Inject],
    seed: u64,
) -> Result<Vec<ExecReport>, String> {
    let mut runs = Vec::new();
    for &strategy in strategies {
        let report = match device {
            ExecuteArg::Host => {
                execute_one(trace, strategy, config, HostDevice::new(), faults, seed)?
            }
            ExecuteArg::Cuda => {
                let cuda = CudaDevice::open(0).map_err(|e| format!("--execute cuda: {e}"))?;
                execute_one(trace, strategy, config, cuda, faults, seed)?
            }
        };
        runs.push(report);
    }
    Ok(runs)
}

fn execute_one<D: Device>(
    trace: &AllocTrace,
    strategy: Strategy,
    config: &ReplayConfig,
    device: D,
    faults: &[Inject],
    seed: u64,
) -> Result<ExecReport, String> {
    let mut exec = DeviceExecutor::new(device, config.alloc.capacity_bytes, faults, seed);
    gpumem_sim::replay(trace, strategy, config, &mut exec, &mut |_| {})
        .map_err(|e| format!("{}:{e}", trace.name))?;
    Ok(exec.finish())
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
                "{}: {} bytes did not hold their pattern; first: {:?}\n",
                sim.strategy,
                r.mismatches,
                r.first_mismatches.first()
            ));
        }
        for e in &r.device_errors {
            out.push_str(&format!("{}: device: {e}\n", sim.strategy));
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

fn load_trace(args: &AllocArgs) -> Result<AllocTrace, String> {
    if let Some(path) = &args.trace {
        return gpumem_traces::load_alloc_trace(path).map_err(|e| e.to_string());
    }
    Ok(match args.generate {
        Generator::LlmServing => {
            let mut p = LlmServingParams {
                seed: args.seed,
                ..LlmServingParams::default()
            };
            if let Some(steps) = args.ops {
                p.steps = u32::try_from(steps)
                    .map_err(|_| format!("--ops {steps} is too many engine steps"))?;
            }
            llm_serving(&p)
        }
        Generator::Occupancy => occupancy(&OccupancyParams {
            seed: args.seed,
            ops: args.ops.unwrap_or(1_000_000),
            capacity_bytes: args.capacity,
            target_occupancy_pct: args.occupancy,
            min_bytes: 512,
            max_bytes: (args.capacity / 64).max(512),
        }),
    })
}

fn export(trace: &AllocTrace, path: &std::path::Path) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    gpumem_traces::jsonl::write(trace, &mut w)
        .and_then(|_| std::io::Write::flush(&mut w))
        .map_err(|e| format!("{}: {e}", path.display()))
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
    let unknown = report.results.first().map_or(0, |r| r.unknown_frees);
    if unknown > 0 {
        out.push_str(&format!(
            "\n{unknown} frees name allocations made before the recording started; they are counted, not replayed.\n"
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
    out
}
