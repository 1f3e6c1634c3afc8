//! `gpumem selftest`: every executor path on small inputs, once simulated and once on a device,
//! in one table — the one command that proves a device (a GPU in particular) carries out the
//! policies' decisions byte for byte.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use gpumem_core::alloc::{AllocConfig, Strategy};
use gpumem_core::books::Books;
use gpumem_core::place::{DeviceId, Tier};
use gpumem_core::tiers::TierConfig;
use gpumem_gpu::{CudaDevice, Device, DeviceExecutor, ExecReport, HostDevice, Inject};
use gpumem_sim::serve::{
    simulate_on, Arrivals, CostModel, EngineConfig, EvictionKind, GpuProfile, RunInfo,
    SchedulingPolicy, TooLongPrompt,
};
use gpumem_sim::tiers::{self, TierWorkload};
use gpumem_sim::{replay, AllocCostModel, ReplayConfig, SimExecutor};
use gpumem_traces::generate::{occupancy, OccupancyParams};
use gpumem_traces::serving::generate::{serving, ServingParams};
use serde::Serialize;

use crate::alloc_cmd::ExecuteArg;

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem selftest --execute host                   every path on host memory (seconds)
  gpumem selftest --execute cuda                   the same on GPU 0: device memory, pinned and
                                                   pageable host memory, copies between them
  gpumem selftest --execute host --inject corrupt-transfer
                                                   prove the checks can fail: exits 1
  gpumem selftest --execute cuda --json > selftest.json

Paths, each run twice with the same seed, simulated and on the device:
  alloc STRATEGY   a generated allocation trace (2,000 ops, 16 MiB) through every strategy;
                   every live block holds a pattern, checked when freed or moved, every 500
                   ops and at the end
  kv vllm-0.33     48 generated requests through vLLM 0.33's scheduler and a 512-block pool:
                   every computed block written, every prefix hit read back before it counts
  tiers HOST-TIER  the tier cache (16 GPU slots, 32 host slots of 64 KiB) on a skewed stream
                   of 3,000 accesses: items offloaded GPU -> host and restored host -> GPU by
                   transfers, each checked at its source and at its copy

Columns: the simulated and executed digests of the decision stream with its outcomes (equal
when the device did exactly what the simulation assumed); bytes checked against their
pattern; bytes that did not hold it; transfers carried out; decisions the device refused
(reservations, and transfers whose bytes were wrong); the device's measured time beside the
simulation's modelled time (h100 links). Exit 0 only if every digest is equal and no byte
mismatched; 1 otherwise; 2 on bad flags or a device that cannot be opened.")]
pub struct SelftestArgs {
    /// Where to carry the decisions out: `host` (anywhere) or `cuda` (GPU 0; needs an NVIDIA
    /// driver).
    #[arg(long, value_enum, value_name = "DEVICE")]
    execute: ExecuteArg,

    /// Seeded fault injection into every path: `corrupt-block`, `corrupt-transfer` or
    /// `refuse-alloc`, optionally `:N` for the N-th candidate (else --seed picks one).
    /// Repeatable. The self-test must then fail.
    #[arg(long, value_name = "FAULT")]
    inject: Vec<String>,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,

    /// Seed of the generated workloads and of fault injection.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const ALLOC_CAPACITY: u64 = 16 << 20;
const ALLOC_OPS: u64 = 2000;
const KV_REQUESTS: u64 = 48;
const KV_BLOCKS: u32 = 512;
const KV_BLOCK_BYTES: u64 = 4 << 10;
const CHECKPOINT_EVERY: u64 = 500;

/// One path: what the simulation and the device made of the same inputs.
#[derive(Serialize)]
struct PathResult {
    path: String,
    digest_simulated: String,
    digest_executed: Option<String>,
    /// Both digests, and any the path's own driver keeps (the KV engine's), agree.
    digests_equal: bool,
    bytes_verified: u64,
    mismatches: u64,
    transfers: u64,
    bytes_transferred: u64,
    /// Reservations the device refused (injected or real) and transfers refused for wrong
    /// bytes.
    refused: u64,
    measured_ns: u64,
    modelled_ns: u64,
    /// Why the path could not run on the device.
    error: Option<String>,
    /// What the path's policy did (per path).
    detail: serde_json::Value,
    /// The device's full report.
    execution: Option<ExecReport>,
}

impl PathResult {
    fn new(
        path: String,
        digest_simulated: String,
        modelled_ns: u64,
        executed: Result<ExecReport, String>,
        detail: serde_json::Value,
    ) -> PathResult {
        let ok = executed.as_ref().ok();
        let measured_ns = ok.map_or(0, |r| {
            r.timings.iter().map(|t| t.measured_ns_total).sum::<u64>() + r.checkpoint_ns_total
        });
        PathResult {
            digests_equal: ok.is_some_and(|r| r.digest == digest_simulated),
            digest_executed: ok.map(|r| r.digest.clone()),
            bytes_verified: ok.map_or(0, |r| r.bytes_verified),
            mismatches: ok.map_or(0, |r| r.mismatches),
            transfers: ok.map_or(0, |r| r.transfers),
            bytes_transferred: ok.map_or(0, |r| r.bytes_transferred),
            refused: ok.map_or(0, |r| {
                r.device_refusals + r.injected_refusals + r.transfers_refused
            }),
            error: executed.as_ref().err().cloned(),
            execution: ok.cloned(),
            path,
            digest_simulated,
            measured_ns,
            modelled_ns,
            detail,
        }
    }

    fn passed(&self) -> bool {
        self.error.is_none() && self.digests_equal && self.mismatches == 0
    }
}

#[derive(Serialize)]
struct SelftestReport {
    device: String,
    seed: u64,
    /// The injections as resolved, e.g. `corrupt-transfer:17`.
    injections: Vec<String>,
    passed: bool,
    paths: Vec<PathResult>,
}

pub fn run(args: SelftestArgs) -> Result<ExitCode, String> {
    let faults = crate::alloc_cmd::parse_faults(&args.inject)?;
    // Fail before anything runs when the device cannot be had at all. Held to the end: on
    // CUDA it keeps the primary context alive, so each path's device opens it cheaply.
    let held = open(args.execute)?;
    let device_name = held.name();
    let started = Instant::now();
    let ctx = Context {
        device: args.execute,
        faults: &faults,
        seed: args.seed,
    };
    let mut paths = alloc_paths(&ctx)?;
    paths.push(kv_path(&ctx)?);
    for tier in [Tier::PinnedHost, Tier::PageableHost] {
        paths.push(tier_path(&ctx, tier)?);
    }
    drop(held);
    let report = SelftestReport {
        device: device_name,
        seed: args.seed,
        injections: paths
            .iter()
            .find_map(|p| p.execution.as_ref())
            .map_or_else(Vec::new, |r| r.injections.clone()),
        passed: paths.iter().all(PathResult::passed),
        paths,
    };
    if args.json {
        crate::output::println(&serde_json::to_string(&report).expect("report serializes"))?;
    } else {
        crate::output::print(&render(&report, started.elapsed().as_millis()))?;
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

struct Context<'a> {
    device: ExecuteArg,
    faults: &'a [Inject],
    seed: u64,
}

/// A fresh device: every path starts from empty memory.
fn open(device: ExecuteArg) -> Result<Box<dyn Device>, String> {
    match device {
        ExecuteArg::Host => Ok(Box::new(HostDevice::new())),
        ExecuteArg::Cuda => CudaDevice::open(0)
            .map(|d| Box::new(d) as Box<dyn Device>)
            .map_err(|e| format!("--execute cuda: {e}")),
    }
}

/// (a) Allocation replay of every strategy.
fn alloc_paths(ctx: &Context) -> Result<Vec<PathResult>, String> {
    let trace = occupancy(&OccupancyParams {
        seed: ctx.seed,
        ops: ALLOC_OPS,
        capacity_bytes: ALLOC_CAPACITY,
        target_occupancy_pct: 80,
        min_bytes: 512,
        max_bytes: 256 << 10,
    });
    let mut config = ReplayConfig::new(AllocConfig {
        capacity_bytes: ALLOC_CAPACITY,
        alignment_bytes: 512,
        page_bytes: 2 << 20,
    });
    config.checkpoint_every_ops = CHECKPOINT_EVERY;
    let mut out = Vec::new();
    for strategy in Strategy::ALL {
        let mut sim = SimExecutor::new(ALLOC_CAPACITY, AllocCostModel::default());
        let simulated = replay(&trace, strategy, &config, &mut sim, &mut |_| {})
            .map_err(|e| format!("{}:{e}", trace.name))?;
        let mut exec = DeviceExecutor::new(open(ctx.device)?, ALLOC_CAPACITY, ctx.faults, ctx.seed);
        let executed = replay(&trace, strategy, &config, &mut exec, &mut |_| {})
            .map(|_| exec.finish())
            .map_err(|e| format!("{}:{e}", trace.name));
        let detail = serde_json::json!({
            "ops": simulated.ops,
            "bytes_reserved_peak": simulated.bytes_reserved_peak,
            "ooms": simulated.ooms,
            "fragmentation_failures": simulated.fragmentation_failures,
        });
        out.push(PathResult::new(
            format!("alloc {}", strategy.name()),
            simulated.digest,
            sim.modelled_ns_total(),
            executed,
            detail,
        ));
    }
    Ok(out)
}

/// (b) The KV pool under vLLM 0.33's scheduler.
fn kv_path(ctx: &Context) -> Result<PathResult, String> {
    let workload = serving(&ServingParams {
        seed: ctx.seed,
        requests: KV_REQUESTS,
        ..ServingParams::default()
    });
    let block_size = 16;
    let max_model_len = (KV_BLOCKS as u64 - 1) * block_size;
    let engine = EngineConfig {
        num_gpu_blocks: KV_BLOCKS,
        block_size: block_size as u32,
        max_num_seqs: 16,
        max_num_batched_tokens: 2048,
        max_model_len,
        enable_prefix_caching: true,
        cost: CostModel::Fixed { step_us: 1000 },
        eviction: EvictionKind::Lru,
        watermark_blocks: 0,
        policy: SchedulingPolicy::Fcfs,
        offload: None,
    };
    let capacity = KV_BLOCKS as u64 * KV_BLOCK_BYTES;
    let run = |exec: &mut dyn gpumem_core::executor::Executor| {
        let mut arrivals =
            Arrivals::from_workload(workload.clone(), max_model_len, TooLongPrompt::Reject);
        simulate_on(
            &mut arrivals,
            engine,
            RunInfo::default(),
            None,
            &mut |_| {},
            Some((exec, KV_BLOCK_BYTES)),
        )
        .map_err(|e| format!("kv: {e}"))
    };
    let mut sim = SimExecutor::new(capacity, AllocCostModel::default());
    let simulated = run(&mut sim)?;
    let mut exec = DeviceExecutor::new(open(ctx.device)?, capacity, ctx.faults, ctx.seed);
    let executed = run(&mut exec).map(|r| (r, exec.finish()));
    let engine_digests_equal = executed
        .as_ref()
        .is_ok_and(|(r, _)| r.digest == simulated.digest);
    let detail = serde_json::json!({
        "requests": simulated.requests,
        "prefix_hit_tokens": simulated.prefix_hit_tokens,
        "preemptions": simulated.preemptions,
        "blocks_evicted": simulated.blocks_evicted,
        "prefix_hits_refused": executed.as_ref().map_or(0, |(r, _)| r.prefix_hits_refused),
    });
    let mut path = PathResult::new(
        "kv vllm-0.33".into(),
        sim.digest_hex(),
        sim.modelled_ns_total(),
        executed.map(|(_, e)| e),
        detail,
    );
    path.digests_equal &= engine_digests_equal;
    Ok(path)
}

/// (c) The tier cache, GPU → host → GPU through transfers.
fn tier_path(ctx: &Context, host_tier: Tier) -> Result<PathResult, String> {
    let config = TierConfig {
        item_bytes: 64 << 10,
        gpu_slots: 16,
        host_slots: 32,
        host_tier,
        device: DeviceId(0),
    };
    let workload = TierWorkload {
        seed: ctx.seed,
        items: 96,
        accesses: 3000,
    };
    let gpu = GpuProfile::resolve("h100")?;
    let mut sim = tiers::sim_executor(&config, &gpu)?;
    let simulated =
        tiers::drive(config, &workload, CHECKPOINT_EVERY, &mut sim).map_err(|e| e.to_string())?;
    let books = Books::with_places(&config.capacities());
    let mut exec = DeviceExecutor::with_books(open(ctx.device)?, books, ctx.faults, ctx.seed);
    let executed = tiers::drive(config, &workload, CHECKPOINT_EVERY, &mut exec)
        .map(|run| (run, exec.finish()))
        .map_err(|e| e.to_string());
    let detail = serde_json::json!({
        "simulated": simulated.stats,
        "executed": executed.as_ref().ok().map(|(run, _)| run.stats),
        "links": tiers::link_uses(&config, &simulated.stats, &gpu.links()?),
    });
    Ok(PathResult::new(
        format!("tiers {}", host_tier.name()),
        simulated.digest,
        sim.modelled_ns_total(),
        executed.map(|(_, e)| e),
        detail,
    ))
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

fn render(r: &SelftestReport, wall_ms: u128) -> String {
    use gpumem_sim::report::human_bytes;
    let mut out = format!("gpumem selftest on {} (seed {})", r.device, r.seed);
    if !r.injections.is_empty() {
        out.push_str(&format!(", injecting {}", r.injections.join(", ")));
    }
    out.push_str("\n\n");
    out.push_str(&format!(
        "{:<24} {:<16} {:<16} {:<5} {:>10} {:>8} {:>9} {:>7} {:>10} {:>10}\n",
        "path",
        "simulated",
        "executed",
        "equal",
        "verified",
        "wrong",
        "transfers",
        "refused",
        "measured",
        "modelled"
    ));
    let short = |d: &str| d.chars().take(16).collect::<String>();
    for p in &r.paths {
        out.push_str(&format!(
            "{:<24} {:<16} {:<16} {:<5} {:>10} {:>8} {:>9} {:>7} {:>10} {:>10}\n",
            p.path,
            short(&p.digest_simulated),
            p.digest_executed.as_deref().map_or("-".into(), short),
            if p.digests_equal { "yes" } else { "NO" },
            human_bytes(p.bytes_verified),
            p.mismatches,
            p.transfers,
            p.refused,
            ms(p.measured_ns),
            ms(p.modelled_ns),
        ));
    }
    out.push('\n');
    for p in r.paths.iter().filter(|p| !p.passed()) {
        match (&p.error, &p.execution) {
            (Some(e), _) => {
                out.push_str(&format!("{}: could not run on the device: {e}\n", p.path))
            }
            (None, None) => {}
            (None, Some(e)) => {
                if let Some(m) = e.first_mismatches.first() {
                    out.push_str(&format!(
                        "{}: {} wrong bytes; first: {} check of {:#x} at {}+{} ({} bytes wrong)\n",
                        p.path,
                        e.mismatches,
                        m.check,
                        m.id,
                        m.segment,
                        m.offset,
                        m.mismatched_bytes
                    ));
                }
                if e.injected_refusals > 0 {
                    out.push_str(&format!(
                        "{}: {} reservations refused by injection\n",
                        p.path, e.injected_refusals
                    ));
                }
                for err in &e.device_errors {
                    out.push_str(&format!("{}: device: {err}\n", p.path));
                }
                if !p.digests_equal {
                    out.push_str(&format!(
                        "{}: the device's decisions differ from the simulation's\n",
                        p.path
                    ));
                }
            }
        }
    }
    let passed = r.paths.iter().filter(|p| p.passed()).count();
    out.push_str(&format!(
        "{passed} of {} paths passed in {wall_ms} ms: {}\n",
        r.paths.len(),
        if r.passed {
            "every digest equal to the simulation's, no byte wrong"
        } else {
            "FAILED"
        }
    ));
    out
}
