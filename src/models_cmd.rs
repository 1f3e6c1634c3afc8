//! `gpumem models`: several models served from fewer GPUs, under one residency policy.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use clap::Args;

use gpumem_core::balance::Placement;
use gpumem_core::offloader::OffloaderConfig;
use gpumem_core::sleep::SleepLevel;
use gpumem_sim::executor::{AllocCostModel, SimExecutor};
use gpumem_sim::models::{
    models_books, render_models_text, simulate_models_on, simulate_models_trace_on, ModelChoice,
    ModelMap, ModelsReport, ModelsSetup, ModelsWorkload, Policy, TraceArrivals, MAX_MODELS,
};
use gpumem_sim::serve::profile::{GpuProfile, ModelProfile};
use gpumem_sim::sleep_watch::SleepObservations;
use gpumem_sim::spec::{ByName, Fraction, ModelsSpec, ModelsTraceSpec, RunSpec};
use gpumem_sim::Executor;
use gpumem_traces::serving::import::parse_decimal;
use gpumem_traces::serving::{WorkloadFormat, MAX_MODEL_NAME_BYTES};

use crate::progress::Progress;
use crate::sleep_exec::{self, SleepExecuteArgs};

/// The models of a run without `--models`: five on one H100 (three profiles, two fine-tunes),
/// more than fit at once.
const DEFAULT_MODELS: &str = "llama-3.1-8b,qwen2.5-7b,mistral-7b,llama-3.1-8b@ft1,qwen2.5-7b@ft2";

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem models                                   five models on one H100, least recently used swapped out
  gpumem models --policy static --models llama-3.1-8b,qwen2.5-7b,mistral-7b
                                                  three models that fit: no weight load
  gpumem models --policy sleep --sleep-level 2    vLLM's sleep mode; weights reload from disk
  gpumem models --gpus 2 --placement balanced     models spread over two GPUs
  gpumem models --policy offloader --predict-horizon-ms 2000 --json
  gpumem models --trace requests.jsonl --models llama-3.1-8b,llama-3.1-8b@ft1,qwen2.5-7b
                                                  each request served by the model it names
  gpumem models --trace BurstGPT_1.csv --limit 5000 --models llama-3.1-8b,qwen2.5-7b \\
      --model-map ChatGPT=llama-3.1-8b,GPT-4=qwen2.5-7b
  gpumem models --policy sleep --requests 100 --execute host --weight-bytes-scale 1/512
                                                  the same run on host memory: every sleep
                                                  unmaps, every wake maps the same addresses
                                                  and restores the checked weights
  gpumem models --policy sleep --execute host --weight-bytes-scale 1/512 --inject corrupt-backup:1
                                                  a corrupted backup must be caught (exit 1)

Policies:
  static     every model resident all the time; refused when they do not fit
  lru        a request for a model that is not resident waits while idle models are
             offloaded (least recently used first) and its weights are loaded from their
             pinned host copy over the GPU's link
  offloader  lru, plus offloads of idle models whenever GPU usage passes --offload-threshold,
             down to --restore-threshold (hysteresis), and with --predict-horizon-ms,
             prefetches models whose next request is expected within the horizon
  sleep      vLLM's sleep mode per engine: an offload is sleep(level) (level 1 copies the
             weights GPU -> host, level 2 discards them), a load is wake_up at the same
             addresses (level 2 reloads the weights from disk)
Offloading a model discards its KV cache (vLLM resets the prefix cache on sleep). Models on
one GPU take turns: their steps never overlap, and their loads share the host link.

A model is NAME or NAME@TAG (a fine-tune: the same sizes, its own weights); names are the
built-in profiles of `gpumem kv --model` or a profile file.

Without --trace the workload is the built-in seeded one of `gpumem kv`, each request given to
a model by Zipf popularity (the first model most popular) in bursts (--burst percent of
requests stay with the previous model). With --trace, each request names its model (formats
detected from the first line when --format is not given):
  conformance   {\"id\", \"arrival_us\", \"prompt\": [tokens] | \"hash_ids\" + \"input_length\",
                \"max_tokens\", \"model\": \"qwen2.5-7b@ft2\"}
  mooncake      {\"timestamp\" (ms), \"input_length\", \"output_length\", \"hash_ids\" (512-token
                blocks), \"model\": \"llama-3.1-8b\"}
  burstgpt      CSV Timestamp,Model,Request tokens,Response tokens,... (failed requests skipped);
                its Model column (ChatGPT, GPT-4) mapped by --model-map ChatGPT=M1,GPT-4=M2
A request's model must equal one of --models exactly, NAME or NAME@TAG (with --model-map: be
one of the map's keys), and be at most 256 bytes (MAX_MODEL_NAME_BYTES); a request naming
another, or none, stops the run with its file and line. A prompt must be shorter than its
model's max_model_len (its profile's, or what its KV pool holds if less). The trace is read
one request at a time, so it may be large or a pipe
(-: standard input); `gpumem kv` reads the same files and ignores the model field.

With --execute host|cuda the run is made twice, simulated and on real memory, with the same
decisions: weights and KV pools are written with a pattern of their content, each sleep's
backup and each wake's restore is checked at both ends, and the JSON adds
`addresses_preserved` (every wake found every range at the address it was allocated at),
`rss_drop_bytes` (resident memory the sleeps gave back, measured), `bytes_verified`,
`mismatches`, `digest_simulated` and the executor's whole report under `execution`. Exit 1 on
a wrong byte, a digest other than the simulation's or a range that moved. With --trace it
reads the trace twice: give a file.")]
pub struct ModelsArgs {
    /// Comma-separated models, NAME or NAME@TAG.
    #[arg(long, value_name = "LIST", default_value = DEFAULT_MODELS)]
    models: String,

    /// static | lru | offloader | sleep.
    #[arg(long, default_value = "lru", value_parser = Policy::parse)]
    policy: Policy,

    /// GPU profile (built-in name or a profile file).
    #[arg(long, value_name = "GPU", default_value = "h100")]
    gpu: String,

    /// Number of GPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    gpus: usize,

    /// How models are homed on the GPUs: balanced (most free memory) or packed (first that
    /// fits).
    #[arg(long, default_value = "balanced", value_parser = Placement::parse)]
    placement: Placement,

    /// Share of each GPU's memory the models may use (vLLM's gpu_memory_utilization).
    #[arg(long, value_name = "FRACTION", default_value = "0.9", value_parser = Fraction::parse)]
    gpu_memory_utilization: Fraction,

    /// Each model's KV pool, GiB [default: static splits what the weights leave; others 4].
    #[arg(long, value_name = "GIB")]
    kv_cache_gib: Option<u64>,

    /// Tokens per KV block.
    #[arg(long, value_name = "TOKENS", default_value_t = 16)]
    block_size: u32,

    /// offloader: offload idle models above this share of the GPU.
    #[arg(long, value_name = "FRACTION", default_value = "0.8", value_parser = Fraction::parse)]
    offload_threshold: Fraction,

    /// offloader: stop offloading, and allow prefetches, below this share.
    #[arg(long, value_name = "FRACTION", default_value = "0.6", value_parser = Fraction::parse)]
    restore_threshold: Fraction,

    /// offloader: keep and prefetch models whose next request is expected within this many
    /// milliseconds (0: not predictive).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    predict_horizon_ms: u64,

    /// sleep: vLLM's sleep level, 1 (weights to host) or 2 (weights discarded).
    #[arg(long, value_name = "LEVEL", default_value_t = 1)]
    sleep_level: u64,

    /// Request trace whose requests name their model (see the formats below; -: standard
    /// input). Without it the built-in seeded workload runs.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Trace format: conformance, mooncake, burstgpt [default: detected].
    #[arg(long, value_name = "FORMAT", requires = "trace", value_parser = parse_format)]
    format: Option<WorkloadFormat>,

    /// Use only the first N requests of the trace.
    #[arg(long, value_name = "N", requires = "trace")]
    limit: Option<u64>,

    /// The trace's model names mapped to --models, TRACE_NAME=MODEL,… (BurstGPT:
    /// ChatGPT=llama-3.1-8b,GPT-4=qwen2.5-7b); every name in the trace must be a key.
    #[arg(long, value_name = "MAP", requires = "trace")]
    model_map: Option<String>,

    /// Requests of the built-in workload.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 400,
        conflicts_with = "trace"
    )]
    requests: u64,

    /// Arrivals per second (Poisson) of the built-in workload, up to three decimals.
    #[arg(
        long,
        value_name = "PER_S",
        default_value = "4",
        conflicts_with = "trace"
    )]
    rate: String,

    /// Percent of requests that stay with the previous request's model (built-in workload).
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 70,
        conflicts_with = "trace"
    )]
    burst: u32,

    /// Seed of the built-in workload.
    #[arg(long, default_value_t = 0, conflicts_with = "trace")]
    seed: u64,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    exec: SleepExecuteArgs,

    /// Print the run spec these flags make, every default resolved, as RON, and exit; `gpumem
    /// run FILE.ron` runs it.
    #[arg(long)]
    print_spec: bool,
}

pub fn run(args: ModelsArgs) -> Result<ExitCode, String> {
    let spec = spec_from_args(&args)?;
    let checked = check(&spec)?;
    if args.print_spec {
        return crate::print_spec(RunSpec::Models(Box::new(spec)));
    }
    run_spec(&spec, &checked, args.json)
}

/// The spec the flags make: every flag's value, the GPU by name (or inlined from a file).
fn spec_from_args(args: &ModelsArgs) -> Result<ModelsSpec, String> {
    let trace = match &args.trace {
        Some(path) => ModelsTraceSpec::File {
            path: path.clone(),
            format: args.format.map(ByName),
            limit: args.limit,
            model_map: args.model_map.clone(),
        },
        None => ModelsTraceSpec::Generated {
            requests: args.requests,
            rate: args.rate.clone(),
            burst_pct: args.burst,
        },
    };
    Ok(ModelsSpec {
        trace,
        seed: args.seed,
        models: args
            .models
            .split(',')
            .map(|m| m.trim().to_string())
            .collect(),
        policy: args.policy,
        gpu: crate::kv_cmd::profile_spec(&args.gpu, GpuProfile::resolve, |g| &g.name)?,
        gpus: args.gpus as u64,
        placement: args.placement,
        gpu_memory_utilization: args.gpu_memory_utilization,
        kv_cache_gib: args.kv_cache_gib,
        block_size: args.block_size,
        offload_threshold: args.offload_threshold,
        restore_threshold: args.restore_threshold,
        predict_horizon_ms: args.predict_horizon_ms,
        sleep_level: args.sleep_level,
        execute: args.exec.to_spec()?,
    })
}

/// A spec, checked: what the simulation runs, and its execution flags.
pub struct Checked {
    setup: ModelsSetup,
    workload: ModelsWorkload,
    exec: SleepExecuteArgs,
}

/// Everything about a spec that can be wrong before a trace is read.
pub fn check(spec: &ModelsSpec) -> Result<Checked, String> {
    let (setup, workload) = resolve(spec)?;
    let exec = SleepExecuteArgs::from_spec(spec.execute.as_ref())?;
    if exec.execute == Some(crate::alloc_cmd::ExecuteArg::Cuda) && setup.gpus > 1 {
        return Err(format!(
            "--execute cuda drives one GPU, not --gpus {}: run --gpus 1, or --execute host (host memory stands in for every GPU)",
            setup.gpus
        ));
    }
    if let (ModelsTraceSpec::File { path, .. }, Some(_)) = (&spec.trace, exec.execute) {
        if path.as_os_str() == "-" || !path.is_file() {
            return Err(format!(
                "{}: --execute reads the trace twice (simulated, then on the device): give a file, not a pipe or standard input",
                path.display()
            ));
        }
    }
    Ok(Checked {
        setup,
        workload,
        exec,
    })
}

/// Runs a checked spec and prints its report: text, or JSON with `json`.
pub fn run_spec(spec: &ModelsSpec, checked: &Checked, json: bool) -> Result<ExitCode, String> {
    let (setup, workload) = (&checked.setup, &checked.workload);
    let books = models_books(setup).map_err(|e| e.to_string())?;
    let links = setup.gpu.links()?;
    let mut sim = SimExecutor::with_books(books.clone(), AllocCostModel::default(), links);
    let (report, _) = run_on(spec, setup, workload, &mut sim, 0)?;
    let Some(device) = checked.exec.execute else {
        if json {
            crate::output::println(&serde_json::to_string(&report).expect("report serializes"))?;
        } else {
            crate::output::print(&render_models_text(&report))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let peak = sleep_exec::peak_bytes(sim.books());
    let what = format!("--execute of {} models", setup.models.len());
    let executed = sleep_exec::execute(
        &checked.exec,
        device,
        spec.seed,
        books,
        peak,
        &what,
        &mut |exec| run_on(spec, setup, workload, exec, 1),
    )?;
    sleep_exec::print_executed(
        json,
        &report.digest,
        &executed.report.digest,
        checked.exec.weight_bytes_scale,
        &executed,
        render_models_text,
    )
}

/// One run on `exec`, of the built-in workload or of the trace (`pass`: 0 simulated, 1 on the
/// device, whose trace warnings are the simulated run's and are not repeated).
fn run_on(
    spec: &ModelsSpec,
    setup: &ModelsSetup,
    workload: &ModelsWorkload,
    exec: &mut dyn Executor,
    pass: usize,
) -> Result<(ModelsReport, SleepObservations), String> {
    match &spec.trace {
        ModelsTraceSpec::Generated { .. } => {
            let progress = Progress::with_unit(1, workload.requests, "requests");
            let run = simulate_models_on(setup, workload, exec, &mut |n| progress.update(0, n));
            progress.finish();
            run.map_err(|e| e.to_string())
        }
        ModelsTraceSpec::File {
            path,
            format,
            limit,
            model_map,
        } => run_trace(
            setup,
            (path, format.map(|f| f.0), *limit, model_map.as_deref()),
            exec,
            pass == 0,
        ),
    }
}

// `--help` spells the limit out.
const _: () = assert!(MAX_MODEL_NAME_BYTES == 256, "update the limit in --help");

/// A trace: its path, format (None: detected), limit and model map.
type TraceArgs<'a> = (
    &'a Path,
    Option<WorkloadFormat>,
    Option<u64>,
    Option<&'a str>,
);

/// The run over the trace: read lazily, progress over its bytes (a pipe: none).
fn run_trace(
    setup: &ModelsSetup,
    (path, format, limit, model_map): TraceArgs<'_>,
    exec: &mut dyn Executor,
    warn: bool,
) -> Result<(ModelsReport, SleepObservations), String> {
    let map = match model_map {
        Some(text) => Some(ModelMap::parse(text)?),
        None => None,
    };
    if limit == Some(0) {
        return Err("--limit 0: give at least one request".into());
    }
    let bytes_read = Rc::new(Cell::new(0));
    let stream = crate::kv_cmd::open_counted(path, format, limit, &bytes_read)?;
    let mut arrivals =
        TraceArrivals::new(stream, &setup.models, map.as_ref()).map_err(|e| e.to_string())?;
    let total_bytes = std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map_or(0, |m| m.len());
    let progress = Progress::with_unit(1, total_bytes, "bytes");
    let report = simulate_models_trace_on(setup, &mut arrivals, exec, &mut |_| {
        progress.update(0, bytes_read.get().min(total_bytes))
    });
    progress.finish();
    let report = report.map_err(|e| e.to_string())?;
    if warn {
        for w in arrivals.warnings() {
            eprintln!("gpumem: warning: {}: {w}", arrivals.source());
        }
    }
    Ok(report)
}

fn parse_format(s: &str) -> Result<WorkloadFormat, String> {
    match WorkloadFormat::parse(s) {
        Some(
            f @ (WorkloadFormat::Conformance | WorkloadFormat::Mooncake | WorkloadFormat::BurstGpt),
        ) => Ok(f),
        Some(f) => Err(format!(
            "a {} trace names no model; expected conformance, mooncake or burstgpt",
            f.name()
        )),
        None => Err(format!(
            "unknown format '{s}'; expected conformance, mooncake or burstgpt"
        )),
    }
}

fn resolve(args: &ModelsSpec) -> Result<(ModelsSetup, ModelsWorkload), String> {
    if let ModelsTraceSpec::File {
        format: Some(f), ..
    } = &args.trace
    {
        parse_format(f.0.name()).map_err(|e| format!("trace.format: {e}"))?;
    }
    let models = parse_models(&args.models.join(","))?;
    if args.gpus == 0 || args.gpus > 64 {
        return Err(format!("--gpus {}: must be 1 to 64", args.gpus));
    }
    let offloader = OffloaderConfig {
        offload_ppm: args.offload_threshold.ppm as u32,
        restore_ppm: args.restore_threshold.ppm as u32,
        horizon_us: args.predict_horizon_ms.saturating_mul(1000),
    };
    offloader
        .validate()
        .map_err(|e| format!("--offload-threshold / --restore-threshold: {e}"))?;
    let kv_bytes_per_model = match args.kv_cache_gib {
        None => None,
        Some(g) if (1..=1 << 20).contains(&g) => Some(g << 30),
        Some(g) => return Err(format!("--kv-cache-gib {g}: must be 1 to 1048576")),
    };
    if !matches!(args.block_size, 1..=1024) {
        return Err(format!(
            "--block-size {}: must be 1 to 1024",
            args.block_size
        ));
    }
    let setup = ModelsSetup {
        models,
        gpu: args.gpu.load()?,
        gpus: args.gpus as usize,
        placement: args.placement,
        policy: args.policy,
        utilization_ppm: args.gpu_memory_utilization.ppm,
        kv_bytes_per_model,
        block_size: args.block_size,
        offloader,
        sleep_level: SleepLevel::from_number(args.sleep_level)
            .map_err(|e| format!("--sleep-level: {e}"))?,
    };
    let workload = match &args.trace {
        ModelsTraceSpec::Generated {
            requests,
            rate,
            burst_pct,
        } => {
            let rate = parse_decimal(rate.trim(), 3)
                .filter(|&r| r > 0)
                .ok_or_else(|| {
                    format!(
                        "--rate {rate:?}: a positive number of requests per second, three decimals at most"
                    )
                })?;
            ModelsWorkload {
                seed: args.seed,
                requests: *requests,
                rate_milli_per_s: rate,
                burst_pct: *burst_pct,
            }
        }
        // Not run: the trace's requests are.
        ModelsTraceSpec::File { .. } => ModelsWorkload {
            seed: args.seed,
            requests: 0,
            rate_milli_per_s: 1000,
            burst_pct: 0,
        },
    };
    if matches!(args.trace, ModelsTraceSpec::Generated { .. }) {
        workload.validate()?;
    }
    Ok((setup, workload))
}

/// `NAME[@TAG],…`: each resolved to its profile; a name given twice must differ by its tag.
fn parse_models(list: &str) -> Result<Vec<ModelChoice>, String> {
    let mut models: Vec<ModelChoice> = Vec::new();
    for item in list.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!("--models {list:?}: an empty model name"));
        }
        let base = item.split_once('@').map_or(item, |(b, _)| b);
        if item.ends_with('@') {
            return Err(format!("--models: {item:?} has an empty tag after '@'"));
        }
        if models.iter().any(|m| m.name == item) {
            return Err(format!(
                "--models: {item:?} is given twice; tell copies apart with NAME@TAG"
            ));
        }
        let profile = ModelProfile::resolve(base).map_err(|e| format!("--models: {e}"))?;
        models.push(ModelChoice {
            name: item.to_string(),
            profile,
        });
    }
    if models.len() > MAX_MODELS {
        return Err(format!(
            "--models: {} models, more than gpumem's limit of {MAX_MODELS}",
            models.len()
        ));
    }
    Ok(models)
}
