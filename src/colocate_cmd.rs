//! `gpumem colocate`: a training step and rollout serving taking turns on one GPU.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use gpumem_sim::colocate::{render_colocate_text, simulate_colocation, ColocateSetup};
use gpumem_sim::serve::profile::{GpuProfile, ModelProfile};
use gpumem_sim::spec::Fraction;
use gpumem_traces::serving::{RequestStream, Workload};

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem colocate --train ../shared/traces/torch-snapshots/yiyi_1.3b_snapshot.pickle \\
      --serve ../shared/traces/mooncake/conversation_trace.jsonl --limit 400
  gpumem colocate ... --sleep-level 0          vLLM's pause: nothing freed, training gets the rest
  gpumem colocate ... --sleep-level 2 --json   weights discarded and reloaded from disk

Each round is a rollout (the first --limit requests of --serve, split evenly over --rounds,
all arriving at the rollout's start, served by vLLM 0.33's engine) and then a training step
(the --train snapshot's allocations replayed by PyTorch's caching allocator). Between them the
engine sleeps (vLLM's sleep mode: level 1 backs its weights up to pinned host memory and
discards the KV cache, level 2 discards both) and wakes for the next rollout at the same
addresses. The training step may use the GPU less what the sleeping engine still holds; an
allocation that does not fit is counted as an OOM.")]
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
    let training = gpumem_traces::load_alloc_trace(&args.train).map_err(|e| e.to_string())?;
    let stream =
        RequestStream::open(&args.serve, None, Some(args.limit)).map_err(|e| e.to_string())?;
    let workload = Workload::collect(stream).map_err(|e| e.to_string())?;
    let report =
        simulate_colocation(&setup, &training, workload.requests).map_err(|e| e.to_string())?;
    if args.json {
        crate::output::println(&serde_json::to_string(&report).expect("report serializes"))?;
    } else {
        crate::output::print(&render_colocate_text(&report))?;
    }
    Ok(ExitCode::SUCCESS)
}
