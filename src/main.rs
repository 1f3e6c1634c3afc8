//! `gpumem`: answers what a memory-management policy does with a trace, simulated and on real
//! memory. See `gpumem --help`.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod alloc_cmd;
mod colocate_cmd;
mod kv_cmd;
mod kv_events_cmd;
mod models_cmd;
mod output;
mod plan_cmd;
mod progress;
mod run_cmd;
mod selftest_cmd;
mod sleep_exec;
mod sweep_cmd;
mod units;

#[derive(Parser)]
#[command(
    name = "gpumem",
    version,
    about = "Replay LLM-serving memory traces through memory-management policies, in a deterministic simulator and on real memory",
    long_about = "gpumem replays recorded traces through memory-management policies and answers: \
how much memory is reserved at the peak, how fragmented it gets, how many requests fail, and \
whether another policy pays off; and for serving, what prefix-cache hit rate, how many \
preemptions, what latency and throughput a request trace gets on a GPU and model. The same decisions can be carried out on real memory \
(--execute host|cuda) and checked byte for byte.\n\n\
Same inputs, config and seed give a byte-identical report and digest."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay an allocation trace through allocation strategies (PyTorch caching allocator,
    /// TLSF, best fit, buddy, ...) and compare peak memory and fragmentation.
    Alloc(alloc_cmd::AllocArgs),
    /// Replay a request trace through a serving engine's paged KV cache with prefix caching
    /// (vLLM 0.33's scheduler and block pool) and report hit rate, preemptions, latency and
    /// KV usage.
    Kv(Box<kv_cmd::KvArgs>),
    /// Import a recorded vLLM KV-event stream (msgpack or JSON Lines) and report the cache
    /// index a KV-aware router would hold: blocks stored, removed and live, longest prefix
    /// chain, per medium.
    KvEvents(kv_events_cmd::KvEventsArgs),
    /// Serve several models from fewer GPUs (static, LRU swapping, an automatic offloader,
    /// vLLM's sleep mode) and report per-model latency, weight loads and peak memory.
    Models(Box<models_cmd::ModelsArgs>),
    /// Alternate a training step (a PyTorch snapshot) and rollout serving on one GPU, the
    /// serving engine sleeping while training runs (vLLM's sleep mode): peaks, time in sleep
    /// and wake, serving latency.
    Colocate(Box<colocate_cmd::ColocateArgs>),
    /// Run a run spec (RON), as `gpumem alloc|kv ... --print-spec` writes it: prints exactly
    /// what those flags print.
    Run(run_cmd::RunArgs),
    /// Run every executor path (allocation replay, KV pool, transfers between memory tiers)
    /// on small inputs, simulated and on a device (`--execute host|cuda`), and print one table
    /// of digests, bytes verified and mismatches. Exit 0 only if they all agree.
    Selftest(selftest_cmd::SelftestArgs),
    /// Run `gpumem kv` or `gpumem alloc` over the product of parameter axes in parallel, one
    /// JSON line per point, byte-identical at any thread count; `--shard i/n` splits it over
    /// a batch scheduler's tasks and `sweep merge` joins their files.
    Sweep(sweep_cmd::SweepArgs),
    /// For each GPU kind, the smallest number of replicas behind a router whose run of the
    /// trace meets every latency SLO (exponential then binary search), and the cheapest
    /// where the GPU profiles carry a price.
    Plan(plan_cmd::PlanArgs),
}

/// Prints `spec` as RON with its paths made absolute, so the text runs from any folder.
fn print_spec(mut spec: gpumem_sim::spec::RunSpec) -> Result<ExitCode, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("the current folder: {e}"))?;
    spec.for_each_path(|p| *p = absolute(&cwd, p));
    output::print(&spec.to_ron()?)?;
    Ok(ExitCode::SUCCESS)
}

/// `path` from `cwd`, its folder resolved (`..` and links) where it exists; the file name is
/// kept as given, so a link to a trace stays the link.
pub(crate) fn absolute(cwd: &std::path::Path, path: &std::path::Path) -> std::path::PathBuf {
    let joined = cwd.join(path);
    match (joined.parent(), joined.file_name()) {
        (Some(folder), Some(name)) => std::fs::canonicalize(folder)
            .map(|f| f.join(name))
            .unwrap_or(joined),
        _ => joined,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Alloc(args) => alloc_cmd::run(args),
        Command::Kv(args) => kv_cmd::run(*args),
        Command::KvEvents(args) => kv_events_cmd::run(args),
        Command::Models(args) => models_cmd::run(*args),
        Command::Colocate(args) => colocate_cmd::run(*args),
        Command::Run(args) => run_cmd::run(args),
        Command::Selftest(args) => selftest_cmd::run(args),
        Command::Sweep(args) => sweep_cmd::run(args),
        Command::Plan(args) => plan_cmd::run(args),
    };
    match outcome {
        Ok(code) => code,
        // The reader has all it wanted (`| head`): nothing went wrong.
        Err(message) if message == output::STDOUT_CLOSED => ExitCode::SUCCESS,
        Err(message) => {
            // A closed stderr leaves nowhere to say it; the exit code still does.
            let _ = writeln!(std::io::stderr(), "gpumem: error: {message}");
            ExitCode::from(2)
        }
    }
}
