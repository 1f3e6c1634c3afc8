//! `gpumem colocate`: a training step and rollout serving taking turns on one GPU.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use gpumem_sim::colocate::{colocate_books, colocate_on, render_colocate_text, ColocateSetup};
use gpumem_sim::executor::{AllocCostModel, SimExecutor};
use gpumem_sim::serve::profile::{GpuProfile, ModelProfile};
use gpumem_sim::spec::Fraction;
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
}

pub fn run(args: ColocateArgs) -> Result<ExitCode, String> {
    if args.sleep_level > 2 {
        return Err(format!("--sleep-level {}: 0, 1 or 2", args.sleep_level));
    }
    if !matches!(args.block_size, 1..=1024) {
        return Err(format!(
            "--block-size {}: must be 1 to 1024",
            args.block_size
        ));
    }
    let setup = ColocateSetup {
        gpu: GpuProfile::resolve(&args.gpu)?,
        model: ModelProfile::resolve(&args.model)?,
        utilization_ppm: args.gpu_memory_utilization.ppm,
        block_size: args.block_size,
        sleep_level: args.sleep_level,
        rounds: args.rounds,
    };
    args.exec.validate()?;
    let training = gpumem_traces::load_alloc_trace(&args.train).map_err(|e| e.to_string())?;
    let stream =
        RequestStream::open(&args.serve, None, Some(args.limit)).map_err(|e| e.to_string())?;
    let workload = Workload::collect(stream).map_err(|e| e.to_string())?;
    let books = colocate_books(&setup);
    let links = setup.gpu.links()?;
    let mut sim = SimExecutor::with_books(books.clone(), AllocCostModel::default(), links);
    let (report, _) = colocate_on(&setup, &training, workload.requests.clone(), &mut sim)
        .map_err(|e| e.to_string())?;
    let Some(device) = args.exec.execute else {
        if args.json {
            crate::output::println(&serde_json::to_string(&report).expect("report serializes"))?;
        } else {
            crate::output::print(&render_colocate_text(&report))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let executed = sleep_exec::execute(
        &args.exec,
        device,
        args.seed,
        books,
        sleep_exec::peak_bytes(sim.books()),
        "--execute of the serving engine",
        &mut |exec| {
            colocate_on(&setup, &training, workload.requests.clone(), exec)
                .map_err(|e| e.to_string())
        },
    )?;
    sleep_exec::print_executed(
        args.json,
        &report.digest,
        &executed.report.digest,
        args.exec.weight_bytes_scale,
        &executed,
        render_colocate_text,
    )
}
