//! `gpumem kv`: a request trace through a serving engine's paged KV cache with prefix caching.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use clap::Args;
use gpumem_core::books::Books;
use gpumem_core::buffers::SizesChoice;
use gpumem_core::kv::offload::OffloadPolicyKind;
use gpumem_core::place::DeviceSet;
use gpumem_core::place::{Place, Tier};
use gpumem_gpu::{CudaDevice, DeviceExecutor, ExecReport, HostDevice, Inject};
use gpumem_sim::cluster::{
    render_cluster_text, simulate_cluster, ClusterReport, ClusterSetup, RouterPolicy,
};
use gpumem_sim::monitor::Thresholds;
use gpumem_sim::serve::{
    kv_sizing, simulate, simulate_on, Arrivals, EngineConfig, EvictionKind, GpuProfile, KvReport,
    ModelProfile, OffloadEngineConfig, OffloadInfo, RunInfo, SchedulingPolicy, ServeError,
    TooLongPrompt, TransferTiming,
};
use gpumem_sim::spec::{
    CostSpec, Engine, ExecuteDevice, Fraction, KvExecuteSpec, KvOffloadSpec, KvResolved, KvSpec,
    KvTraceSpec, Named, ProfileSpec, RunSpec,
};
use gpumem_sim::{AllocCostModel, SimExecutor};
use gpumem_traces::serving::generate::{serving_source, ServingParams, ServingRequests};
use gpumem_traces::serving::{RequestStream, WorkloadFormat};

use crate::progress::Progress;

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
  CPU tier          with --cpu-offload-blocks or --kv-offloading-size (vLLM's OffloadingConnector):
                    prompt tokens loaded back from the tier at admission (cpu_hit_tokens), CPU
                    blocks stored, loaded and evicted, and the bytes copied each way
  prefetch          with --offload-prefetch N (gpumem's, beyond vLLM): GPU blocks loaded
                    ahead for waiting requests, those an admission then used, and those
                    handed out or evicted first (prefetch_loads, _hits, _wasted)
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
    /// [default: sized from the GPU and model]. vLLM's spelling --num-gpu-blocks-override works too.
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "gpu_memory_utilization",
        alias = "num-gpu-blocks-override"
    )]
    kv_blocks: Option<u64>,

    /// Fraction of GPU memory vLLM may use (weights, activations and KV cache).
    #[arg(long, value_name = "FRACTION", default_value = "0.9", value_parser = Fraction::parse)]
    gpu_memory_utilization: Fraction,

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
    #[arg(long, value_name = "MODEL", default_value = "roofline", value_parser = CostSpec::parse)]
    cost: CostSpec,

    /// Which free cached block is reused first: lru (vLLM's free queue), arc (adaptive
    /// replacement: recency and frequency), leaf-lru (leaves of the prefix tree first, LRU among them).
    #[arg(long, value_name = "POLICY", default_value = "lru", value_parser = parse_eviction)]
    eviction: EvictionKind,

    /// Turn vLLM's prefix caching off (vLLM's spelling --no-enable-prefix-caching works too).
    #[arg(
        long,
        alias = "no-enable-prefix-caching",
        overrides_with = "enable_prefix_caching"
    )]
    no_prefix_caching: bool,

    /// Prefix caching on, as by default (vLLM's flag; the last of the two wins).
    #[arg(long, overrides_with = "no_prefix_caching")]
    enable_prefix_caching: bool,

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

    /// Memory-pressure levels of the KV pool: warning at or above WARNING, critical at or above
    /// CRITICAL, fractions of its usable blocks (0 < WARNING < CRITICAL <= 1).
    #[arg(long, value_name = "WARNING,CRITICAL", default_value = "0.75,0.9", value_parser = Thresholds::parse)]
    pressure_thresholds: Thresholds,

    /// CUDA-graph capture sizes each step's batch is padded to: `vllm` (vLLM 0.33's defaults),
    /// `auto` (planned from the run's batch sizes: as many sizes as vLLM's, vLLM's largest,
    /// the fewest padded tokens), or a list such as 1,2,4,8,16. Reported; padding changes no
    /// scheduling decision and no step time.
    #[arg(long, value_name = "vllm|auto|LIST", default_value = "vllm", value_parser = SizesChoice::parse)]
    cudagraph_sizes: SizesChoice,

    /// Run N engines behind a router, each with its own KV pool on its own GPU (devices 0 to
    /// N-1); the report adds each replica's figures and the router's. Without it, one engine.
    #[arg(long, value_name = "N")]
    replicas: Option<u64>,

    /// With --replicas: round-robin, least-loaded (fewest outstanding tokens), or kv-aware[:W]
    /// (lowest W x prompt tokens not in the replica's prefix cache + outstanding tokens; W
    /// defaults to 1) [default: round-robin].
    #[arg(long, value_name = "POLICY", value_parser = RouterPolicy::parse)]
    router: Option<RouterPolicy>,

    /// With --replicas: the engines' KV events reach the router this many µs after the step
    /// that published them [default: 0].
    #[arg(long, value_name = "US")]
    router_lag_us: Option<u64>,
    /// A CPU tier under the KV pool, vLLM's OffloadingConnector (`--kv-offloading-backend
    /// native`) with N CPU blocks of --offload-block-size tokens (the conformance config's
    /// offload_cpu_blocks): finished prompts' blocks are copied there, and a later prompt
    /// with the same prefix loads them back instead of recomputing.
    #[arg(long, value_name = "N", conflicts_with = "kv_offloading_size")]
    cpu_offload_blocks: Option<u64>,

    /// The CPU tier sized as vLLM sizes it: GIB GiB of host memory (vLLM's flag; a size such
    /// as 512MiB also works) in CPU blocks of the model's KV, each rounded up to 4 KiB.
    #[arg(long, value_name = "GIB", value_parser = parse_gib)]
    kv_offloading_size: Option<u64>,

    /// Tokens per CPU block: a multiple of --block-size [default: --block-size].
    #[arg(long, value_name = "TOKENS")]
    offload_block_size: Option<u64>,

    /// Which CPU block the full tier drops: lru (vLLM's default) or arc.
    #[arg(long, value_name = "lru|arc", value_parser = OffloadPolicyKind::parse)]
    offload_policy: Option<OffloadPolicyKind>,

    /// With --cost fixed:STEP_US: a copy between the GPU and the CPU tier completes K engine
    /// steps after it starts (the conformance oracle's copy engine) [default: 0]. With the
    /// roofline cost a copy takes the GPU's host link's time for its bytes.
    #[arg(long, value_name = "K")]
    offload_latency_steps: Option<u64>,

    /// Offload generated tokens too, not only the prompt's (vLLM's offload_prompt_only: false).
    #[arg(long)]
    offload_all_tokens: bool,

    /// gpumem's predictive prefetch (beyond vLLM): load the CPU-resident prompt prefixes of
    /// the next N waiting requests while they queue, into free GPU blocks vLLM would hand out
    /// before any cached one (never evicting, never taking a block from an admission), so the
    /// admission finds them on the GPU. Roofline cost only; 0: vLLM's tier exactly [default: 0].
    #[arg(long, value_name = "N")]
    offload_prefetch: Option<u64>,

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
    /// a prefix hit on wrong bytes is caught and not counted; `corrupt-offload[:N]` one of the
    /// N-th copy stored in the CPU tier, to prove a load of wrong bytes is refused.
    #[arg(long, value_name = "FAULT")]
    inject: Vec<String>,

    /// Print the run spec these flags make, every default resolved, as RON, and exit; `gpumem
    /// run FILE.ron` runs it.
    #[arg(long)]
    print_spec: bool,
}

fn parse_format(s: &str) -> Result<WorkloadFormat, String> {
    WorkloadFormat::from_name(s)
}

/// vLLM's `--kv-offloading-size`: a number of GiB, or a size with its unit.
fn parse_gib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '_')
    {
        crate::units::parse_bytes(&format!("{t}GiB"))
    } else {
        crate::units::parse_bytes(t)
    }
}

/// The CPU tier the flags ask for, or why they cannot.
fn offload_spec(args: &KvArgs) -> Result<Option<KvOffloadSpec>, String> {
    let tier_flags = [
        ("--offload-block-size", args.offload_block_size.is_some()),
        ("--offload-policy", args.offload_policy.is_some()),
        (
            "--offload-latency-steps",
            args.offload_latency_steps.is_some(),
        ),
        ("--offload-all-tokens", args.offload_all_tokens),
        ("--offload-prefetch", args.offload_prefetch.is_some()),
    ];
    let bytes = args.kv_offloading_size;
    let cpu_blocks = match (args.cpu_offload_blocks, bytes) {
        (Some(n), _) => n,
        (None, Some(bytes)) => {
            let model = ModelProfile::resolve(&args.model)?;
            let per_block = model.kv_bytes_per_token().saturating_mul(args.block_size);
            let tokens = args.offload_block_size.unwrap_or(args.block_size);
            let blocks_per_chunk = tokens / args.block_size.max(1);
            bytes / gpumem_sim::spec::offload_chunk_bytes(per_block, blocks_per_chunk.max(1))
        }
        (None, None) => {
            let given: Vec<&str> = tier_flags.iter().filter(|f| f.1).map(|f| f.0).collect();
            if !given.is_empty() {
                return Err(format!(
                    "{} needs a CPU tier: give --cpu-offload-blocks N or --kv-offloading-size GIB",
                    given.join(", ")
                ));
            }
            return Ok(None);
        }
    };
    Ok(Some(KvOffloadSpec {
        cpu_offload_blocks: cpu_blocks,
        kv_offloading_bytes: bytes,
        offload_block_size: args.offload_block_size.unwrap_or(args.block_size),
        offload_policy: args.offload_policy.unwrap_or_default(),
        offload_latency_steps: args.offload_latency_steps.unwrap_or(0),
        offload_all_tokens: args.offload_all_tokens,
        offload_prefetch: args.offload_prefetch.unwrap_or(0),
    }))
}

fn parse_eviction(s: &str) -> Result<EvictionKind, String> {
    gpumem_core::kv::eviction::parse_eviction(s)
}

pub fn run(args: KvArgs) -> Result<ExitCode, String> {
    let (spec, opened) = spec_from_args(&args)?;
    let checked = check(&spec)?;
    if args.print_spec {
        return crate::print_spec(RunSpec::Kv(Box::new(spec)));
    }
    run_opened(&spec, &checked, args.json, opened)
}

/// The spec the flags make, every default resolved: profiles by name (or inlined from a
/// file), the pool sized, the scheduler limits of the GPU, the trace's format detected (with
/// the trace, opened to tell it, for the run to go on reading).
fn spec_from_args(args: &KvArgs) -> Result<(KvSpec, Option<OpenedTrace>), String> {
    let gpu_spec = profile_spec(&args.gpu, GpuProfile::resolve, |g| &g.name)?;
    let model_spec = profile_spec(&args.model, ModelProfile::resolve, |m| &m.name)?;
    let (gpu, model) = (gpu_spec.load()?, model_spec.load()?);
    gpumem_sim::spec::check_block_size(args.block_size)?;
    let sizing = match args.kv_blocks {
        Some(_) => None,
        None => Some(kv_sizing(
            &gpu,
            &model,
            args.gpu_memory_utilization.ppm,
            args.block_size,
        )?),
    };
    let kv_blocks = match (args.kv_blocks, sizing) {
        (Some(n), _) => n,
        (None, sizing) => sizing.map_or(0, |s| s.num_blocks),
    };
    let pool_tokens = kv_blocks.saturating_sub(1).saturating_mul(args.block_size);
    let execute =
        match args.execute {
            Some(device) => Some(KvExecuteSpec {
                device: device.into(),
                bytes_per_block: args
                    .bytes_per_block
                    .or(sizing.map(|s| s.bytes_per_block))
                    .ok_or("--execute with --kv-blocks needs --bytes-per-block")?,
                inject: args.inject.clone(),
            }),
            None if !args.inject.is_empty() => {
                return Err(crate::alloc_cmd::INJECT_NEEDS_EXECUTE.into())
            }
            None if args.bytes_per_block.is_some() => return Err(
                "--bytes-per-block needs --execute host|cuda: it sizes the blocks in real memory"
                    .into(),
            ),
            None => None,
        };
    if args.replicas.is_none() && (args.router.is_some() || args.router_lag_us.is_some()) {
        return Err("--router and --router-lag-us need --replicas N".into());
    }
    let (trace, opened) = trace_spec(args)?;
    let spec = KvSpec {
        trace,
        seed: args.seed,
        max_num_seqs: args.max_num_seqs.unwrap_or(gpu.default_max_num_seqs),
        max_num_batched_tokens: args
            .max_num_batched_tokens
            .unwrap_or(gpu.default_max_num_batched_tokens),
        max_model_len: args
            .max_model_len
            .unwrap_or(model.max_model_len.min(pool_tokens)),
        gpu: gpu_spec,
        model: model_spec,
        kv_blocks,
        gpu_memory_utilization: sizing.map(|_| args.gpu_memory_utilization),
        block_size: args.block_size,
        engine: Engine::from_name(&args.engine)?,
        cost: args.cost,
        eviction: args.eviction,
        prefix_caching: !args.no_prefix_caching,
        scheduling_policy: args.scheduling_policy,
        pressure_thresholds: args.pressure_thresholds,
        cudagraph_sizes: args.cudagraph_sizes.clone(),
        replicas: args.replicas,
        router: args
            .replicas
            .map(|_| args.router.unwrap_or(RouterPolicy::RoundRobin)),
        router_lag_us: args.replicas.map(|_| args.router_lag_us.unwrap_or(0)),
        execute,
        cpu_offload: offload_spec(args)?,
        step_log: args.step_log.clone(),
        plot: args.plot.clone(),
    };
    Ok((spec, opened))
}

/// The spec the flags make for one of many runs (a sweep's point, a plan's fleet): each run
/// reads the trace from its start, so it must be a file.
pub(crate) fn spec_for_many_runs(args: &KvArgs) -> Result<KvSpec, String> {
    if let Some(path) = &args.trace {
        if path.as_os_str() == "-" || !path.is_file() {
            return Err(format!(
                "{}: every run reads the trace from its start: give a file, not a pipe or standard input",
                path.display()
            ));
        }
    }
    // Each run opens the trace afresh; the stream that told the format is not needed.
    spec_from_args(args).map(|(spec, _)| spec)
}

/// A built-in profile by its canonical name; one from a FILE.ron inlined, so the spec does not
/// depend on the file staying as it is.
pub(crate) fn profile_spec<T>(
    arg: &str,
    resolve: fn(&str) -> Result<T, String>,
    name: fn(&T) -> &String,
) -> Result<ProfileSpec<T>, String> {
    let profile = resolve(arg)?;
    Ok(if arg.ends_with(".ron") {
        ProfileSpec::Inline(profile)
    } else {
        ProfileSpec::Builtin(name(&profile).clone())
    })
}

/// The trace's spec, and the trace itself when its format was told from its content: the
/// stream that read its first line goes on from there, so a pipe, standard input or a FIFO is
/// read once.
fn trace_spec(args: &KvArgs) -> Result<(KvTraceSpec, Option<OpenedTrace>), String> {
    let Some(path) = &args.trace else {
        let requests = args.limit.unwrap_or(ServingParams::default().requests);
        return Ok((KvTraceSpec::Generated { requests }, None));
    };
    if args.execute.is_some() {
        // Before anything is read from a pipe.
        execute_needs_a_file(path)?;
    }
    let (format, opened) = match args.format {
        Some(format) => (format, None),
        None => {
            let bytes_read = Rc::default();
            let stream = open_counted(path, None, args.limit, &bytes_read)?;
            (stream.format(), Some(OpenedTrace { stream, bytes_read }))
        }
    };
    let spec = KvTraceSpec::File {
        path: path.clone(),
        format,
        limit: args.limit,
    };
    Ok((spec, opened))
}

/// `--execute` runs the trace three times (to report, simulated on the executor, on the
/// device), reading it from its start each time: it must be a file that can be opened again.
fn execute_needs_a_file(path: &Path) -> Result<(), String> {
    if path.as_os_str() == "-" || !path.is_file() {
        return Err(format!(
            "{}: --execute reads the trace once per run, three times: give a file, not a pipe or standard input",
            path.display()
        ));
    }
    Ok(())
}

/// A trace opened (and its first line read) to tell its format.
struct OpenedTrace {
    stream: RequestStream<'static>,
    /// Bytes taken from it so far (for progress).
    bytes_read: Rc<Cell<u64>>,
}

/// The trace at `path` from its start (`format` None: told from its first line), counting
/// the bytes read into `bytes_read`.
pub(crate) fn open_counted(
    path: &Path,
    format: Option<WorkloadFormat>,
    limit: Option<u64>,
    bytes_read: &Rc<Cell<u64>>,
) -> Result<RequestStream<'static>, String> {
    let reader = CountingReader {
        inner: gpumem_traces::read::open(path).map_err(|e| e.to_string())?,
        count: bytes_read.clone(),
    };
    RequestStream::from_reader(reader, &path.display().to_string(), format, limit)
        .map_err(|e| e.to_string())
}

/// A spec, checked: its profiles, how its pool was sized, its faults.
pub struct Checked {
    resolved: KvResolved,
    faults: Vec<Inject>,
}

/// Everything about a spec that can be wrong before a trace is read.
pub fn check(spec: &KvSpec) -> Result<Checked, String> {
    let resolved = spec.resolve()?;
    if let (Some(_), KvTraceSpec::File { path, .. }) = (&spec.execute, &spec.trace) {
        execute_needs_a_file(path)?;
    }
    let faults = match &spec.execute {
        Some(e) => crate::alloc_cmd::parse_faults(&e.inject)?,
        None => Vec::new(),
    };
    let offload_fault = faults
        .iter()
        .any(|f| matches!(f, Inject::CorruptOffload { .. }));
    if offload_fault && spec.cpu_offload.is_none() {
        return Err(
            "--inject corrupt-offload needs a CPU tier (--cpu-offload-blocks or --kv-offloading-size): it corrupts a copy stored there"
                .into(),
        );
    }
    Ok(Checked { resolved, faults })
}

/// Runs a checked spec and prints its report: text, or JSON with `json`.
pub fn run_spec(spec: &KvSpec, checked: &Checked, json: bool) -> Result<ExitCode, String> {
    run_opened(spec, checked, json, None)
}

/// [`run_spec`], its first run reading on from `opened` (the spec's trace, opened to tell
/// its format) instead of opening the trace again.
fn run_opened(
    spec: &KvSpec,
    checked: &Checked,
    json: bool,
    opened: Option<OpenedTrace>,
) -> Result<ExitCode, String> {
    // Created first: an unwritable folder is found before a long run.
    let plot_file = spec
        .plot
        .as_deref()
        .map(crate::output::AtomicFile::create)
        .transpose()?;
    let source = Source::new(spec, opened);
    let (engine, info) = engine_and_info(spec, checked, &source)?;
    if spec.replicas.is_some() {
        let report = match simulate_cluster_with_progress(&source, engine, &info, true)? {
            Ok(r) => r,
            Err(e) => return serve_failure(e),
        };
        let outcome = KvOutcome::Cluster(Box::new(report));
        return print_outcome(&outcome, json, plot_file);
    }
    let report = match simulate_with_step_log(&source, engine, &info, spec)? {
        Ok(r) => r,
        Err(e) => return serve_failure(e),
    };
    if let Some(execute) = &spec.execute {
        let (simulated, sim, executed) =
            execute_on_device(&source, engine, &info, execute, &checked.faults, spec.seed)?;
        let code = report_execution(json, &report, &simulated, &sim, executed)?;
        if let Some(file) = plot_file {
            write_plot(file, &report, 1)?;
        }
        return Ok(code);
    }
    print_outcome(&KvOutcome::Single(Box::new(report)), json, plot_file)
}

/// What a simulated `gpumem kv` run reports: one engine's report, or a cluster's.
pub enum KvOutcome {
    Single(Box<KvReport>),
    Cluster(Box<ClusterReport>),
}

impl KvOutcome {
    /// The whole run's figures (a cluster's fleet).
    pub fn fleet(&self) -> &KvReport {
        match self {
            KvOutcome::Single(r) => r,
            KvOutcome::Cluster(c) => &c.fleet,
        }
    }

    /// The JSON report, as `--json` prints it.
    pub fn to_json(&self) -> String {
        match self {
            KvOutcome::Single(r) => serde_json::to_string(r),
            KvOutcome::Cluster(c) => serde_json::to_string(c),
        }
        .expect("report serializes")
    }

    fn text(&self) -> String {
        match self {
            KvOutcome::Single(r) => gpumem_sim::serve::report::render_text(r),
            KvOutcome::Cluster(c) => render_cluster_text(c),
        }
    }

    fn engines(&self) -> u64 {
        match self {
            KvOutcome::Single(_) => 1,
            KvOutcome::Cluster(c) => c.replicas.len() as u64,
        }
    }
}

/// Prints a simulated run's report, then writes its plot.
fn print_outcome(
    outcome: &KvOutcome,
    json: bool,
    plot_file: Option<crate::output::AtomicFile>,
) -> Result<ExitCode, String> {
    if json {
        crate::output::println(&outcome.to_json())?;
    } else {
        crate::output::print(&outcome.text())?;
    }
    // After the report: a plot that cannot be written must not cost the run its answer.
    if let Some(file) = plot_file {
        write_plot(file, outcome.fleet(), outcome.engines())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a checked spec without a word on the terminal (no progress bar, no output file): a
/// point of a sweep or a plan. The inner error is the run's (a stall, a bad request); the
/// outer one, the trace's.
pub fn simulate_quietly(
    spec: &KvSpec,
    checked: &Checked,
) -> Result<Result<KvOutcome, ServeError>, String> {
    if spec.execute.is_some() || spec.step_log.is_some() || spec.plot.is_some() {
        return Err(
            "--execute, --step-log and --plot belong to single runs, not to sweeps or plans".into(),
        );
    }
    let source = Source::new(spec, None);
    let (engine, info) = engine_and_info(spec, checked, &source)?;
    if spec.replicas.is_some() {
        return Ok(
            simulate_cluster_with_progress(&source, engine, &info, false)?
                .map(|c| KvOutcome::Cluster(Box::new(c))),
        );
    }
    let mut stream = source.open()?;
    let mut arrivals = source.arrivals(stream.as_mut());
    Ok(simulate(&mut arrivals, engine, info, None, &mut |_| {})
        .map(|r| KvOutcome::Single(Box::new(r))))
}

/// The engine's config and what the report echoes of the spec.
fn engine_and_info(
    spec: &KvSpec,
    checked: &Checked,
    source: &Source<'_>,
) -> Result<(EngineConfig, RunInfo), String> {
    let KvResolved { gpu, model, sizing } = &checked.resolved;
    let kv_bytes_per_block = model.kv_bytes_per_token().saturating_mul(spec.block_size);
    let offload = match &spec.cpu_offload {
        Some(o) => Some(OffloadEngineConfig {
            cpu_blocks: o.cpu_offload_blocks as u32,
            block_size: o.offload_block_size as u32,
            policy: o.offload_policy,
            prompt_only: !o.offload_all_tokens,
            timing: match spec.cost {
                CostSpec::Fixed { .. } => TransferTiming::Steps {
                    latency: o.offload_latency_steps,
                },
                CostSpec::Roofline => TransferTiming::Link {
                    link: gpu.links()?.host_pinned,
                    block_bytes: kv_bytes_per_block,
                },
            },
            prefetch: u32::try_from(o.offload_prefetch).unwrap_or(u32::MAX),
        }),
        None => None,
    };
    let engine = EngineConfig {
        num_gpu_blocks: spec.kv_blocks as u32,
        block_size: spec.block_size as u32,
        max_num_seqs: spec.max_num_seqs,
        max_num_batched_tokens: spec.max_num_batched_tokens,
        max_model_len: spec.max_model_len,
        enable_prefix_caching: spec.prefix_caching,
        cost: spec.cost.model(gpu, model),
        eviction: spec.eviction,
        watermark_blocks: 0,
        policy: spec.scheduling_policy,
        offload,
    };
    let profile_name = |name: &str| {
        if spec.uses_profiles() {
            name.to_string()
        } else {
            "-".into()
        }
    };
    let (trace, format) = source.names();
    let info = RunInfo {
        trace,
        format,
        engine: spec.engine.name().into(),
        cost: spec.cost.name(),
        gpu: profile_name(&gpu.name),
        model: profile_name(&model.name),
        eviction: spec.eviction.name().into(),
        prefix_caching: spec.prefix_caching,
        block_size: spec.block_size,
        max_num_seqs: spec.max_num_seqs,
        max_num_batched_tokens: spec.max_num_batched_tokens,
        max_model_len: spec.max_model_len,
        scheduling_policy: gpumem_sim::spec::Named::name(spec.scheduling_policy).into(),
        kv_sizing: *sizing,
        seed: matches!(spec.trace, KvTraceSpec::Generated { .. }).then_some(spec.seed),
        pressure_thresholds: spec.pressure_thresholds,
        cudagraph_sizes: spec.cudagraph_sizes.clone(),
        cudagraph_bytes_per_graph: model.cudagraph_bytes_per_graph,
        cpu_offload: spec.cpu_offload.as_ref().map(|o| OffloadInfo {
            cpu_blocks: o.cpu_offload_blocks,
            offload_block_size: o.offload_block_size,
            offload_policy: o.offload_policy,
            offload_latency_steps: matches!(spec.cost, CostSpec::Fixed { .. })
                .then_some(o.offload_latency_steps),
            offload_all_tokens: o.offload_all_tokens,
            kv_bytes_per_block,
            cpu_bytes: o
                .cpu_offload_blocks
                .saturating_mul(gpumem_sim::spec::offload_chunk_bytes(
                    kv_bytes_per_block,
                    o.offload_block_size / spec.block_size,
                )),
        }),
    };
    Ok((engine, info))
}

/// The cluster's run (the spec has `replicas`), with a progress bar over the trace's bytes
/// when `show_progress`.
fn simulate_cluster_with_progress(
    source: &Source<'_>,
    engine: EngineConfig,
    info: &RunInfo,
    show_progress: bool,
) -> Result<Result<ClusterReport, ServeError>, String> {
    let spec = source.spec;
    let setup = ClusterSetup {
        engine,
        devices: DeviceSet::first(spec.replicas.unwrap_or(1) as usize)?,
        router: spec.router.unwrap_or(RouterPolicy::RoundRobin),
        router_lag_us: spec.router_lag_us.unwrap_or(0),
    };
    let mut stream = source.open()?;
    let total_bytes = if show_progress {
        source.total_bytes()
    } else {
        0
    };
    let progress = Progress::with_unit(1, total_bytes, "bytes");
    let mut arrivals = source.arrivals(stream.as_mut());
    let result = simulate_cluster(&mut arrivals, &setup, info.clone(), &mut |_| {
        if show_progress {
            progress.update(0, source.bytes_read.get().min(total_bytes))
        }
    });
    drop(arrivals);
    progress.finish();
    if let Some(s) = &stream {
        for w in s.warnings() {
            eprintln!("gpumem: warning: {}: {w}", s.source());
        }
    }
    Ok(result)
}

/// Where a spec's requests come from: a trace, read lazily (and again for each run of
/// `--execute`), or the built-in generator.
struct Source<'s> {
    spec: &'s KvSpec,
    /// Bytes of the trace read so far (for progress), whatever run reads it.
    bytes_read: Rc<Cell<u64>>,
    /// The trace as format detection left it, for the first run.
    opened: RefCell<Option<RequestStream<'static>>>,
}

/// Counts the bytes taken from a reader into a shared cell.
struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: std::io::BufRead> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl<R: std::io::BufRead> std::io::BufRead for CountingReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.count.set(self.count.get() + n as u64);
        self.inner.consume(n);
    }
}

impl<'s> Source<'s> {
    fn new(spec: &'s KvSpec, opened: Option<OpenedTrace>) -> Self {
        let (stream, bytes_read) = match opened {
            Some(o) => (Some(o.stream), o.bytes_read),
            None => (None, Rc::default()),
        };
        Source {
            spec,
            bytes_read,
            opened: RefCell::new(stream),
        }
    }

    /// The trace's name and its format's name, for the report.
    fn names(&self) -> (String, String) {
        match &self.spec.trace {
            KvTraceSpec::File { path, format, .. } => (file_name(path), format.name().into()),
            KvTraceSpec::Generated { .. } => {
                (serving_source(&self.generated()), "generated".into())
            }
        }
    }

    /// The built-in generator's parameters.
    fn generated(&self) -> ServingParams {
        ServingParams {
            seed: self.spec.seed,
            requests: match self.spec.trace {
                KvTraceSpec::Generated { requests } => requests,
                KvTraceSpec::File { .. } => 0,
            },
            ..ServingParams::default()
        }
    }

    /// Size of the trace, for progress (0: a pipe, or generated).
    fn total_bytes(&self) -> u64 {
        match &self.spec.trace {
            KvTraceSpec::File { path, .. } => std::fs::metadata(path)
                .ok()
                .filter(|m| m.is_file())
                .map_or(0, |m| m.len()),
            KvTraceSpec::Generated { .. } => 0,
        }
    }

    /// The trace from its start, read lazily (None: the generator's requests): the first
    /// time, the stream that told its format, if one did.
    fn open(&self) -> Result<Option<RequestStream<'static>>, String> {
        let KvTraceSpec::File {
            path,
            format,
            limit,
        } = &self.spec.trace
        else {
            return Ok(None);
        };
        if let Some(stream) = self.opened.borrow_mut().take() {
            return Ok(Some(stream));
        }
        open_counted(path, Some(*format), *limit, &self.bytes_read).map(Some)
    }

    /// Arrivals for one run over `stream` (None: the generator's). A prompt of
    /// `max_model_len` tokens or more is rejected and counted, as vLLM rejects it; the
    /// conformance contract refuses the whole workload instead, as vLLM's oracle does.
    fn arrivals<'a>(&self, stream: Option<&'a mut RequestStream<'static>>) -> Arrivals<'a> {
        let max_model_len = self.spec.max_model_len;
        match stream {
            Some(s) => {
                let too_long = if s.format() == WorkloadFormat::Conformance {
                    TooLongPrompt::Refuse
                } else {
                    TooLongPrompt::Reject
                };
                let source = s.source().to_string();
                Arrivals::new(s, &source, max_model_len, too_long)
            }
            None => {
                let params = self.generated();
                Arrivals::new(
                    ServingRequests::new(&params).map(Ok),
                    &serving_source(&params),
                    max_model_len,
                    TooLongPrompt::Reject,
                )
            }
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The simulation itself, writing the spec's step log; the outer error is the step log's file
/// or the trace.
fn simulate_with_step_log(
    source: &Source<'_>,
    engine: EngineConfig,
    info: &RunInfo,
    spec: &KvSpec,
) -> Result<Result<KvReport, ServeError>, String> {
    let mut log_file = match &spec.step_log {
        Some(p) => Some(crate::output::AtomicFile::create(p)?),
        None => None,
    };
    let mut stream = source.open()?;
    // Progress over the trace's bytes (a pipe has no size: no progress bar).
    let total_bytes = source.total_bytes();
    let progress = Progress::with_unit(1, total_bytes, "bytes");
    let mut arrivals = source.arrivals(stream.as_mut());
    let result = simulate(
        &mut arrivals,
        engine,
        info.clone(),
        log_file.as_mut().map(|f| f as &mut dyn Write),
        &mut |_| progress.update(0, source.bytes_read.get().min(total_bytes)),
    );
    drop(arrivals);
    progress.finish();
    // The step log replaces an existing file only when the run completed.
    if let (Some(file), Ok(_)) = (log_file, &result) {
        file.commit()?;
    }
    if let Some(s) = &stream {
        for w in s.warnings() {
            eprintln!("gpumem: warning: {}: {w}", s.source());
        }
    }
    Ok(result)
}

/// The run again, on the simulated executor and on the device, for the digests and bytes (the
/// trace is read again for each run: [`check`] made sure it is a file).
fn execute_on_device(
    source: &Source<'_>,
    engine: EngineConfig,
    info: &RunInfo,
    execute: &KvExecuteSpec,
    faults: &[Inject],
    seed: u64,
) -> Result<(KvReport, SimExecutor, (KvReport, ExecReport)), String> {
    let block_bytes = execute.bytes_per_block;
    let run = |mem: &mut dyn gpumem_core::executor::Executor| {
        let mut stream = source.open().map_err(ServeError::Input)?;
        let mut arrivals = source.arrivals(stream.as_mut());
        simulate_on(
            &mut arrivals,
            engine,
            info.clone(),
            None,
            &mut |_| {},
            Some((mem, block_bytes)),
        )
    };
    let capacity = (engine.num_gpu_blocks as u64).saturating_mul(block_bytes);
    // The CPU tier's pinned host memory, and room to stage a pool's worth of finished
    // requests' blocks until their stores run.
    let pinned = engine.offload.map(|o| {
        (o.cpu_blocks as u64)
            .saturating_mul((o.block_size / engine.block_size.max(1)) as u64)
            .saturating_mul(block_bytes)
            .saturating_add(capacity)
    });
    let books = || match pinned {
        Some(pinned) => Books::with_places(&[
            (Place::GPU0, capacity),
            (Place::new(0, Tier::PinnedHost), pinned),
        ]),
        None => Books::new(capacity),
    };
    let mut sim = SimExecutor::with_books(
        books(),
        AllocCostModel::default(),
        GpuProfile::default_links(),
    );
    let simulated = run(&mut sim).map_err(|e| e.to_string())?;
    let executed = match execute.device {
        ExecuteDevice::Host => {
            let mut exec = DeviceExecutor::with_books(HostDevice::new(), books(), faults, seed);
            let r = run(&mut exec).map_err(|e| e.to_string())?;
            (r, exec.finish())
        }
        ExecuteDevice::Cuda => {
            let cuda = CudaDevice::open(0).map_err(|e| format!("--execute cuda: {e}"))?;
            let mut exec = DeviceExecutor::with_books(cuda, books(), faults, seed);
            let r = run(&mut exec).map_err(|e| e.to_string())?;
            (r, exec.finish())
        }
    };
    Ok((simulated, sim, executed))
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
    json: bool,
    report: &KvReport,
    simulated: &KvReport,
    sim: &SimExecutor,
    (executed, exec): (KvReport, ExecReport),
) -> Result<ExitCode, String> {
    let digests_equal = exec.digest == sim.digest_hex() && executed.digest == simulated.digest;
    if json {
        let mut value = serde_json::to_value(&executed).expect("report serializes");
        value["digest_simulated"] = report.digest.clone().into();
        value["bytes_verified"] = exec.bytes_verified.into();
        value["mismatches"] = exec.mismatches.into();
        value["execution"] = serde_json::to_value(&exec).expect("report serializes");
        crate::output::println(&serde_json::to_string(&value).expect("report serializes"))?;
    } else {
        let mut text = gpumem_sim::serve::report::render_text(&executed);
        let (writes, reads) = ["write_kv", "read_kv"]
            .map(|k| {
                exec.timings
                    .iter()
                    .find(|t| t.kind == k)
                    .map_or((0, 0), |t| (t.count, t.measured_ns_total))
            })
            .into();
        text.push_str(&format!(
            "\nexecuted on {}: digests {}, {} verified, {} mismatched bytes, {} prefix hits refused\n",
            exec.device,
            if digests_equal { "equal to the simulation's" } else { "DIFFER from the simulation's" },
            gpumem_sim::report::human_bytes(exec.bytes_verified),
            exec.mismatches,
            executed.prefix_hits_refused
        ));
        text.push_str(&format!(
            "  {} KV block writes, {:.0} ns each; {} prefix-hit reads, {:.0} ns each (measured, patterns included)\n",
            writes.0,
            writes.1 as f64 / writes.0.max(1) as f64,
            reads.0,
            reads.1 as f64 / reads.0.max(1) as f64
        ));
        if let Some(o) = &executed.cpu_offload {
            let copies = exec
                .timings
                .iter()
                .find(|t| t.kind == "transfer")
                .map_or((0, 0), |t| (t.count, t.measured_ns_total));
            text.push_str(&format!(
                "  {} block copies between the GPU and the CPU tier, {:.0} ns each, checked at both ends; {} loads and {} stores refused\n",
                copies.0,
                copies.1 as f64 / copies.0.max(1) as f64,
                o.loads_refused,
                o.stores_refused
            ));
        }
        if exec.injections_moved_on > 0 {
            text.push_str(&format!(
                "  the injected corruption moved on {} times: the blocks it hit were written again before anything read them\n",
                exec.injections_moved_on
            ));
        }
        if let Some(note) = unseen_injection(&exec) {
            text.push_str(&format!("  {note}\n"));
        }
        crate::output::print(&text)?;
    }
    let failed = exec.mismatches > 0 || !digests_equal;
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A sentence when an injected corruption was never seen (no check found a wrong byte), which
/// only a run that ends with its corrupted block rewritten can give.
pub fn unseen_injection(exec: &ExecReport) -> Option<String> {
    let injected = exec.injected_corruptions
        + exec.injected_offload_corruptions
        + exec.injected_backup_corruptions
        + exec.injections_moved_on;
    (injected > 0 && exec.mismatches == 0).then(|| {
        format!(
            "the injected {} found no block that stayed as written: no check could see it",
            exec.injections.join(", ")
        )
    })
}

/// The run's timeline as SVG; a cluster's (`engines` replicas) is the fleet's, over all their
/// blocks.
fn write_plot(file: crate::output::AtomicFile, r: &KvReport, engines: u64) -> Result<(), String> {
    let c = &r.config;
    let fleet = if engines > 1 {
        format!("{engines} x ")
    } else {
        String::new()
    };
    let title = format!(
        "{} — {fleet}{} on {} / {}, {} blocks of {}",
        c.trace, c.engine, c.gpu, c.model, r.kv_blocks, c.block_size
    );
    let usable = (r.kv_blocks - 1).saturating_mul(engines);
    let svg = gpumem_sim::plot::kv_timeline_svg(
        &title,
        &r.series,
        usable,
        &r.pressure_periods,
        c.pressure_thresholds,
    );
    file.write_all_and_commit(svg.as_bytes())
}
