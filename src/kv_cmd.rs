//! `gpumem kv`: a request trace through a serving engine's paged KV cache with prefix caching.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use gpumem_sim::serve::workload::{MAX_BLOCK_SIZE, MAX_GPU_BLOCKS};
use gpumem_sim::serve::{
    kv_sizing, simulate, CostModel, EngineConfig, EvictionKind, GpuProfile, KvReport, ModelProfile,
    Roofline, RunInfo, ServeError,
};
use gpumem_traces::serving::generate::{serving, ServingParams};
use gpumem_traces::serving::import::parse_decimal;
use gpumem_traces::serving::{load, Workload, WorkloadFormat};

use crate::progress::Progress;
use gpumem_gpu::{CudaDevice, DeviceExecutor, ExecReport, HostDevice};
use gpumem_sim::serve::report::simulate_on;
use gpumem_sim::serve::SchedulingPolicy;
use gpumem_sim::{AllocCostModel, SimExecutor};

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem kv                                        built-in seeded workload on H100 / Llama-3.1-8B
  gpumem kv --trace conversation_trace.jsonl --gpu h200 --model qwen2.5-7b --plot kv.svg
  gpumem kv --trace AzureLLMInferenceTrace_conv.csv --kv-blocks 4000 --json
  gpumem kv --trace w.jsonl --format conformance --engine vllm-0.33 --cost fixed:1000 \\
      --kv-blocks 64 --block-size 4 --max-num-seqs 8 --max-num-batched-tokens 64 \\
      --max-model-len 60 --step-log steps.jsonl   the step log vLLM 0.33's own scheduler writes

Trace formats (detected from the first line when --format is not given):
  conformance   {\"id\", \"arrival_us\", \"prompt\": [tokens] | \"hash_ids\" + \"input_length\", \"max_tokens\"}
  mooncake      {\"timestamp\" (ms), \"input_length\", \"output_length\", \"hash_ids\" (512-token blocks)}
  qwen-bailian  {\"chat_id\", \"parent_chat_id\", \"timestamp\" (s), \"input_length\", \"output_length\",
                \"hash_ids\" (16-token blocks)}
  azure         CSV TIMESTAMP,ContextTokens,GeneratedTokens (Azure LLM inference 2023)
  burstgpt      CSV Timestamp,Model,Request tokens,Response tokens,... (failed requests skipped)
Hash ids become tokens by the conformance rule, so equal ids are a shared prefix; CSV traces
carry no prefix information and every prompt is unique.

The engine is vLLM 0.33's scheduler (FCFS, chunked prefill, preemption by recompute, the
full-sequence admission gate) over its block pool; the KV pool holds --kv-blocks blocks, or
(GPU memory x --gpu-memory-utilization - weights - activation reserve) / bytes per block, as
vLLM sizes it. A request whose prompt has max_model_len tokens or more is rejected and
counted, as vLLM rejects it (the conformance format refuses the whole workload instead).

What the report means:
  prefix hit rate   prompt tokens served from the prefix cache at admission / tokens looked
                    up, over requests never preempted (vLLM's metric); also given counting
                    re-admissions after preemption
  preemptions       running requests evicted to free blocks (they recompute later)
  blocks evicted    cached blocks whose prefix was dropped to be reused
  TTFT              arrival to the end of the step that produced the first token
  TPOT              time per output token after the first
  end to end        arrival to the last token
  throughput        prompt + generated tokens per second of simulated time
  KV usage peak     most blocks in use at the end of a step
  digest            names the engine's decision stream: equal inputs, equal digest
Percentiles are nearest-rank. Time is simulated: the cost model (fixed:STEP_US, or roofline
from the GPU's FLOP/s and bandwidth and the model's size) decides how long each step takes.
GPU and model profiles: built-in names, or a FILE.ron in the form of sim/profiles/*.ron.")]
pub struct KvArgs {
    /// Request trace (see the formats below). Without it a built-in seeded workload runs:
    /// Poisson arrivals, shared system prompts and multi-turn sessions.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Trace format: conformance, mooncake, qwen-bailian, azure, burstgpt [default: detected].
    #[arg(long, value_name = "FORMAT", value_parser = parse_format)]
    format: Option<WorkloadFormat>,

    /// GPU: h100, h200, a100-80gb, l40s, or a FILE.ron profile.
    #[arg(long, default_value = "h100")]
    gpu: String,

    /// Model: llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, mistral-7b, or a FILE.ron profile.
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,

    /// KV blocks in the pool, vLLM's num_gpu_blocks (block 0, the null block, included)
    /// [default: sized from the GPU and model].
    #[arg(long, value_name = "N", conflicts_with = "gpu_memory_utilization")]
    kv_blocks: Option<u64>,

    /// Fraction of GPU memory vLLM may use (weights, activations and KV cache).
    #[arg(long, value_name = "FRACTION", default_value = "0.9", value_parser = parse_fraction)]
    gpu_memory_utilization: u64,

    /// Tokens per KV block.
    #[arg(long, value_name = "TOKENS", default_value_t = 16)]
    block_size: u64,

    /// Most requests running at once [default: vLLM's for the GPU].
    #[arg(long, value_name = "N")]
    max_num_seqs: Option<u64>,

    /// Token budget of one engine step [default: vLLM's for the GPU].
    #[arg(long, value_name = "N")]
    max_num_batched_tokens: Option<u64>,

    /// Longest sequence (prompt + output) [default: the model's context, at most what the pool
    /// holds].
    #[arg(long, value_name = "TOKENS")]
    max_model_len: Option<u64>,

    /// Engine personality.
    #[arg(long, default_value = "vllm-0.33", value_parser = ["vllm-0.33"])]
    engine: String,

    /// Step cost model: fixed:STEP_US or roofline.
    #[arg(long, value_name = "MODEL", default_value = "roofline")]
    cost: String,

    /// Which free cached block is reused first: lru (vLLM's free queue), arc (adaptive
    /// replacement: recency and frequency), leaf-lru (leaves of the prefix tree first, LRU among them).
    #[arg(long, value_name = "POLICY", default_value = "lru", value_parser = parse_eviction)]
    eviction: EvictionKind,

    /// Turn vLLM's prefix caching off.
    #[arg(long)]
    no_prefix_caching: bool,

    /// Use only the first N requests of the trace (of the built-in workload: generate N;
    /// default 1000).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,

    /// Write the conformance step log (one JSON line per engine step) to FILE.
    #[arg(long, value_name = "FILE")]
    step_log: Option<PathBuf>,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,

    /// Write KV usage, running and waiting requests and the hit rate over time as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// vLLM's scheduling policy: fcfs, or priority (lower `priority` of a request first; the
    /// highest running one is preempted). Only the conformance format carries priorities.
    #[arg(long, value_name = "POLICY", default_value = "fcfs", value_parser = SchedulingPolicy::parse)]
    scheduling_policy: SchedulingPolicy,

    /// Seed of the built-in workload (and of fault injection).
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Also run the KV pool on real memory: `host` (anywhere) or `cuda` (needs an NVIDIA
    /// driver). Every block the policy computes is written with a pattern of its prefix hash,
    /// and every prefix hit is read back before it counts; the digests must equal the
    /// simulation's.
    #[arg(long, value_enum, value_name = "DEVICE")]
    execute: Option<crate::alloc_cmd::ExecuteArg>,

    /// With --execute: bytes per KV block (default: what the model's KV needs per block). A
    /// smaller value keeps a test run inside host memory.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_bytes)]
    bytes_per_block: Option<u64>,

    /// With --execute: `corrupt-block[:N]` flips a byte of the N-th KV block written, to prove
    /// a prefix hit on wrong bytes is caught and not counted.
    #[arg(long, value_name = "FAULT")]
    inject: Vec<String>,
}

fn parse_format(s: &str) -> Result<WorkloadFormat, String> {
    WorkloadFormat::parse(s).ok_or_else(|| {
        let names: Vec<&str> = WorkloadFormat::ALL.iter().map(|f| f.name()).collect();
        format!("unknown format '{s}'; known: {}", names.join(", "))
    })
}

fn parse_eviction(s: &str) -> Result<EvictionKind, String> {
    gpumem_core::kv::eviction::parse_eviction(s)
}

/// A fraction in (0, 1] as parts per million, without floats.
fn parse_fraction(s: &str) -> Result<u64, String> {
    match parse_decimal(s.trim(), 6) {
        Some(ppm) if ppm > 0 && ppm <= 1_000_000 => Ok(ppm),
        _ => Err(format!("'{s}' is not a fraction in (0, 1]")),
    }
}

fn load_workload(args: &KvArgs) -> Result<(Workload, String, String), String> {
    match &args.trace {
        Some(path) => {
            let (w, format) = load(path, args.format, args.limit).map_err(|e| e.to_string())?;
            Ok((w, file_name(path), format.name().to_string()))
        }
        None => {
            let p = ServingParams {
                seed: args.seed,
                requests: args.limit.unwrap_or(ServingParams::default().requests),
                ..ServingParams::default()
            };
            let w = serving(&p);
            let name = w.source.clone();
            Ok((w, name, "generated".into()))
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

pub fn run(args: KvArgs) -> Result<ExitCode, String> {
    let gpu = GpuProfile::resolve(&args.gpu)?;
    let model = ModelProfile::resolve(&args.model)?;
    let cost = CostModel::parse(&args.cost, Roofline::new(&gpu, &model))
        .map_err(|e| format!("--cost: {e}"))?;
    if args.block_size == 0 || args.block_size > MAX_BLOCK_SIZE {
        return Err(format!(
            "--block-size {} must be between 1 and {MAX_BLOCK_SIZE}",
            args.block_size
        ));
    }
    let sizing = match args.kv_blocks {
        Some(_) => None,
        None => Some(kv_sizing(
            &gpu,
            &model,
            args.gpu_memory_utilization,
            args.block_size,
        )?),
    };
    let kv_blocks = args.kv_blocks.or(sizing.map(|s| s.num_blocks)).unwrap_or(0);
    if kv_blocks < 2 {
        return Err(format!(
            "--kv-blocks {kv_blocks}: the pool is smaller than one block (vLLM's num_gpu_blocks counts the null block 0, so at least 2 are needed)"
        ));
    }
    if kv_blocks > MAX_GPU_BLOCKS {
        return Err(format!(
            "--kv-blocks {kv_blocks} exceeds gpumem's limit of {MAX_GPU_BLOCKS}"
        ));
    }
    let pool_tokens = (kv_blocks - 1) * args.block_size;
    let max_model_len = args
        .max_model_len
        .unwrap_or(model.max_model_len.min(pool_tokens));
    if max_model_len == 0 {
        return Err("--max-model-len must be at least 1".into());
    }

    let (mut workload, trace, format) = load_workload(&args)?;
    for w in &workload.warnings {
        eprintln!("gpumem: warning: {}: {w}", workload.source);
    }
    let rejected = if format == WorkloadFormat::Conformance.name() {
        // The conformance contract refuses the whole workload, as vLLM's oracle does.
        workload
            .validate(max_model_len)
            .map_err(|e| e.to_string())?;
        0
    } else {
        workload.take_too_long(max_model_len).len() as u64
    };

    let engine = EngineConfig {
        num_gpu_blocks: kv_blocks as u32,
        block_size: args.block_size as u32,
        max_num_seqs: args.max_num_seqs.unwrap_or(gpu.default_max_num_seqs),
        max_num_batched_tokens: args
            .max_num_batched_tokens
            .unwrap_or(gpu.default_max_num_batched_tokens),
        max_model_len,
        enable_prefix_caching: !args.no_prefix_caching,
        cost,
        eviction: args.eviction,
        watermark_blocks: 0,
        policy: args.scheduling_policy,
    };
    let uses_profiles = matches!(cost, CostModel::Roofline(_)) || sizing.is_some();
    let info = RunInfo {
        trace,
        format,
        engine: args.engine.clone(),
        cost: cost.name(),
        gpu: if uses_profiles {
            gpu.name.clone()
        } else {
            "-".into()
        },
        model: if uses_profiles {
            model.name.clone()
        } else {
            "-".into()
        },
        eviction: args.eviction.name().into(),
        prefix_caching: engine.enable_prefix_caching,
        block_size: args.block_size,
        max_num_seqs: engine.max_num_seqs,
        max_num_batched_tokens: engine.max_num_batched_tokens,
        max_model_len,
        kv_sizing: sizing,
        seed: args.trace.is_none().then_some(args.seed),
    };

    let mut log_file = match &args.step_log {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => None,
    };
    let total_tokens: u64 = workload
        .requests
        .iter()
        .map(|r| r.prompt.len().saturating_add(r.max_tokens))
        .fold(0, u64::saturating_add);
    let progress = Progress::with_unit(1, total_tokens, "tokens");
    let result = simulate(
        &workload,
        engine,
        rejected,
        info.clone(),
        log_file.as_mut().map(|f| f as &mut dyn Write),
        &mut |done| progress.update(0, done.min(total_tokens)),
    );
    progress.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => return serve_failure(e),
    };
    let faults = crate::alloc_cmd::parse_faults(&args.inject, args.execute.is_some())?;
    if let Some(device) = args.execute {
        let block_bytes = args
            .bytes_per_block
            .or(sizing.map(|s| s.bytes_per_block))
            .ok_or("--execute with --kv-blocks needs --bytes-per-block")?;
        let run = |mem: &mut dyn gpumem_core::executor::Executor| {
            simulate_on(
                &workload,
                engine,
                rejected,
                info.clone(),
                None,
                &mut |_| {},
                Some((mem, block_bytes)),
            )
        };
        let capacity = (engine.num_gpu_blocks as u64).saturating_mul(block_bytes);
        let mut sim = SimExecutor::new(capacity, AllocCostModel::default());
        let simulated = run(&mut sim).map_err(|e| e.to_string())?;
        let executed = match device {
            crate::alloc_cmd::ExecuteArg::Host => {
                let mut exec = DeviceExecutor::new(HostDevice::new(), capacity, &faults, args.seed);
                let r = run(&mut exec).map_err(|e| e.to_string())?;
                (r, exec.finish())
            }
            crate::alloc_cmd::ExecuteArg::Cuda => {
                let cuda = CudaDevice::open(0).map_err(|e| format!("--execute cuda: {e}"))?;
                let mut exec = DeviceExecutor::new(cuda, capacity, &faults, args.seed);
                let r = run(&mut exec).map_err(|e| e.to_string())?;
                (r, exec.finish())
            }
        };
        return report_execution(&args, &report, &simulated, &sim, executed);
    }
    if let Some(path) = &args.plot {
        write_plot(path, &report)?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
    } else {
        print!("{}", gpumem_sim::serve::report::render_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_failure(e: ServeError) -> Result<ExitCode, String> {
    match e {
        ServeError::Input(m) => Err(m),
        e => {
            eprintln!("gpumem: error: {e}");
            Ok(ExitCode::from(e.exit_code() as u8))
        }
    }
}

/// Prints the simulated report with what the device observed, and fails the run (exit 1) when
/// the device saw other bytes than the policy expected or the decision streams differ.
fn report_execution(
    args: &KvArgs,
    report: &KvReport,
    simulated: &KvReport,
    sim: &SimExecutor,
    (executed, exec): (KvReport, ExecReport),
) -> Result<ExitCode, String> {
    let digests_equal = exec.digest == sim.digest_hex() && executed.digest == simulated.digest;
    if args.json {
        let mut value = serde_json::to_value(&executed).expect("report serializes");
        value["digest_simulated"] = report.digest.clone().into();
        value["bytes_verified"] = exec.bytes_verified.into();
        value["mismatches"] = exec.mismatches.into();
        value["execution"] = serde_json::to_value(&exec).expect("report serializes");
        println!(
            "{}",
            serde_json::to_string(&value).expect("report serializes")
        );
    } else {
        print!("{}", gpumem_sim::serve::report::render_text(&executed));
        let (writes, reads) = ["write_kv", "read_kv"]
            .map(|k| {
                exec.timings
                    .iter()
                    .find(|t| t.kind == k)
                    .map_or((0, 0), |t| (t.count, t.measured_ns_total))
            })
            .into();
        println!(
            "\nexecuted on {}: digests {}, {} verified, {} mismatched bytes, {} prefix hits refused",
            exec.device,
            if digests_equal { "equal to the simulation's" } else { "DIFFER from the simulation's" },
            gpumem_sim::report::human_bytes(exec.bytes_verified),
            exec.mismatches,
            executed.prefix_hits_refused
        );
        println!(
            "  {} KV block writes, {:.0} ns each; {} prefix-hit reads, {:.0} ns each (measured, patterns included)",
            writes.0,
            writes.1 as f64 / writes.0.max(1) as f64,
            reads.0,
            reads.1 as f64 / reads.0.max(1) as f64
        );
    }
    let failed = exec.mismatches > 0 || !digests_equal;
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn write_plot(path: &Path, r: &KvReport) -> Result<(), String> {
    let c = &r.config;
    let title = format!(
        "{} — {} on {} / {}, {} blocks of {}",
        c.trace, c.engine, c.gpu, c.model, r.kv_blocks, c.block_size
    );
    let svg = gpumem_sim::plot::kv_timeline_svg(&title, &r.samples, r.kv_blocks - 1);
    std::fs::write(path, svg).map_err(|e| format!("{}: cannot write the plot: {e}", path.display()))
}
