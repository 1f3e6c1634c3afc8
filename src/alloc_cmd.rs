//! `gpumem alloc`: allocator-trace replay through allocation strategies.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use gpumem_core::alloc::{AllocConfig, Strategy};
use gpumem_sim::report::{render_table, simulate_all, AllocReport};
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
    let progress = Progress::new(
        Strategy::ALL.len(),
        trace.ops.len() as u64 * strategies.len() as u64,
    );
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
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
    } else {
        print!("{}", render_text(&trace, &report, &config));
    }
    Ok(ExitCode::SUCCESS)
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
