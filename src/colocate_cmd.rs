//! `gpumem colocate`: a training step and rollout serving taking turns on one GPU.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use gpumem_sim::colocate::{colocate_books, colocate_on, render_colocate_text, ColocateSetup};
use gpumem_sim::executor::{AllocCostModel, SimExecutor};
use gpumem_sim::serve::profile::{GpuProfile, ModelProfile};
use gpumem_sim::spec::{ColocateSpec, Fraction, RunSpec};
use gpumem_sim::Executor;
use gpumem_traces::serving::{RequestStream, Workload};

use crate::sleep_exec::{self, SleepExecuteArgs};

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem colocate --train ../shared/traces/torch-snapshots/yiyi_1.3b_snapshot.pickle \\
      --serve ../shared/traces/mooncake/conversation_trace.jsonl --limit 400
  gpumem colocate ... --sleep-level 0          vLLM's pause: nothing freed, training gets the rest
  gpumem colocate ... --sleep-level 2 --json   weights discarded and reloaded from disk
  gpumem colocate ... --execute host --weight-bytes-scale 1/512
                                               the engine's memory on host memory: sleeps
                                               unmap it, wakes map the same addresses

Each round is a rollout (the first --limit requests of --serve, split evenly over --rounds,
all arriving at the rollout's start, served by vLLM 0.33's engine) and then a training step
(the --train snapshot's allocations replayed by PyTorch's caching allocator). Between them the
engine sleeps (vLLM's sleep mode: level 1 backs its weights up to pinned host memory and
discards the KV cache, level 2 discards both) and wakes for the next rollout at the same
addresses. The training step may use the GPU less what the sleeping engine still holds; an
allocation that does not fit is counted as an OOM.

With --execute host|cuda the serving engine's memory (its weights and KV cache: allocation,
every sleep and wake) is carried out a second time on real memory, with the simulation's
decisions; the training step stays simulated. The JSON adds `addresses_preserved`,
`rss_drop_bytes`, `bytes_verified`, `mismatches`, `digest_simulated` and `execution`, as
`gpumem models --execute` does; exit 1 on a wrong byte, another digest or a moved range.")]
pub struct ColocateArgs {
    /// The training step: a PyTorch memory snapshot (.pickle) or allocation trace.
    #[arg(long, value_name = "SNAPSHOT")]
    train: PathBuf,

    /// The rollout requests: a serving trace (the formats of `gpumem kv`).
    #[arg(long, value_name = "TRACE")]
    serve: PathBuf,

    /// Use only the first N requests of the serving trace.
    #[arg(long, value_name = "N", default_value_t = 400)]
    limit: u64,

    /// Rollout-then-train rounds.
    #[arg(long, value_name = "N", default_value_t = 4)]
    rounds: u64,

    /// 0: vLLM's pause (nothing freed); 1: weights to host, KV discarded; 2: both discarded.
    #[arg(long, value_name = "LEVEL", default_value_t = 1)]
    sleep_level: u64,

    /// GPU profile.
    #[arg(long, default_value = "h100")]
    gpu: String,

    /// The served model's profile.
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,

    /// The engine's share of the GPU while awake (vLLM's gpu_memory_utilization).
    #[arg(long, value_name = "FRACTION", default_value = "0.5", value_parser = Fraction::parse)]
    gpu_memory_utilization: Fraction,

    /// Tokens per KV block.
    #[arg(long, value_name = "TOKENS", default_value_t = 16)]
    block_size: u32,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,

    /// With --execute: seed of the fault injection.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    #[command(flatten)]
    exec: SleepExecuteArgs,

    /// Print the run spec these flags make, every default resolved, as RON, and exit; `gpumem
    /// run FILE.ron` runs it.
    #[arg(long)]
    print_spec: bool,
}

pub fn run(args: ColocateArgs) -> Result<ExitCode, String> {
    let spec = spec_from_args(&args)?;
    let checked = check(&spec)?;
    if args.print_spec {
        return crate::print_spec(RunSpec::Colocate(Box::new(spec)));
    }
    run_spec(&spec, &checked, args.json)
}

/// The spec the flags make: every flag's value, profiles by name (or inlined from a file).
fn spec_from_args(args: &ColocateArgs) -> Result<ColocateSpec, String> {
    Ok(ColocateSpec {
        train: args.train.clone(),
        serve: args.serve.clone(),
        limit: args.limit,
        rounds: args.rounds,
        sleep_level: args.sleep_level,
        gpu: crate::kv_cmd::profile_spec(&args.gpu, GpuProfile::resolve, |g| &g.name)?,
        model: crate::kv_cmd::profile_spec(&args.model, ModelProfile::resolve, |m| &m.name)?,
        gpu_memory_utilization: args.gpu_memory_utilization,
        block_size: args.block_size,
        seed: args.seed,
        execute: args.exec.to_spec()?,
    })
}

/// A spec, checked: the run's setup and its execution flags.
pub struct Checked {
    setup: ColocateSetup,
    exec: SleepExecuteArgs,
}

/// Everything about a spec that can be wrong before its traces are read.
pub fn check(spec: &ColocateSpec) -> Result<Checked, String> {
    if spec.sleep_level > 2 {
        return Err(format!("--sleep-level {}: 0, 1 or 2", spec.sleep_level));
    }
    if !matches!(spec.block_size, 1..=1024) {
        return Err(format!(
            "--block-size {}: must be 1 to 1024",
            spec.block_size
        ));
    }
    let setup = ColocateSetup {
        gpu: spec.gpu.load()?,
        model: spec.model.load()?,
        utilization_ppm: spec.gpu_memory_utilization.ppm,
        block_size: spec.block_size,
        sleep_level: spec.sleep_level,
        rounds: spec.rounds,
    };
    let exec = SleepExecuteArgs::from_spec(spec.execute.as_ref())?;
    Ok(Checked { setup, exec })
}

/// Runs a checked spec and prints its report: text, or JSON with `json`.
pub fn run_spec(spec: &ColocateSpec, checked: &Checked, json: bool) -> Result<ExitCode, String> {
    let setup = &checked.setup;
    let training = gpumem_traces::load_alloc_trace(&spec.train).map_err(|e| e.to_string())?;
    let stream =
        RequestStream::open(&spec.serve, None, Some(spec.limit)).map_err(|e| e.to_string())?;
    let workload = Workload::collect(stream).map_err(|e| e.to_string())?;
    let books = colocate_books(setup);
    let links = setup.gpu.links()?;
    let mut sim = SimExecutor::with_books(books.clone(), AllocCostModel::default(), links);
    let (report, _) = colocate_on(setup, &training, workload.requests.clone(), &mut sim)
        .map_err(|e| e.to_string())?;
    let Some(device) = checked.exec.execute else {
        if json {
            crate::output::println(&serde_json::to_string(&report).expect("report serializes"))?;
        } else {
            crate::output::print(&render_colocate_text(&report))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let executed = sleep_exec::execute(
        &checked.exec,
        device,
        spec.seed,
        books,
        sleep_exec::peak_bytes(sim.books()),
        "--execute of the serving engine",
        &mut |exec| {
            colocate_on(setup, &training, workload.requests.clone(), exec)
                .map_err(|e| e.to_string())
        },
    )?;
    sleep_exec::print_executed(
        json,
        &report.digest,
        &executed.report.digest,
        checked.exec.weight_bytes_scale,
        &executed,
        render_colocate_text,
    )
}
