//! Training colocated with rollout serving on one GPU, as RL frameworks run them: rounds of a
//! rollout (the `vllm-0.33` engine serves a batch of requests), then the engine sleeps and a
//! training step runs (a PyTorch snapshot's allocation trace replayed by the `caching`
//! strategy), then the engine wakes for the next rollout.
//!
//! The engine's memory is a [`CuMemPool`] (weights and KV cache). While it sleeps, the training
//! step may use the GPU's memory less what the sleeping engine still holds there (nothing at
//! levels 1 and 2: everything is unmapped); with `--sleep-level 0` (vLLM's pause, which frees
//! nothing) the engine keeps its whole footprint and the training step gets the rest. A training
//! allocation that does not fit is an OOM of the replay, counted.
//!
//! Time: a rollout lasts until its last request finishes (all its requests arrive at its start);
//! a sleep or wake lasts the modelled time of its decisions (copies over the link model; level 2
//! reloads the weights from disk); a training step lasts its snapshot's recorded span.

use serde::Serialize;

use gpumem_core::alloc::{AllocConfig, Strategy};
use gpumem_core::books::Books;
use gpumem_core::decision::Refusal;
use gpumem_core::executor::Executor;
use gpumem_core::place::{DeviceId, Place, Tier};
use gpumem_core::sleep::{CuMemPool, Handle, SleepError, SleepLevel, Tag};
use gpumem_traces::alloc_trace::AllocTrace;
use gpumem_traces::serving::WorkloadRequest;

use crate::alloc_replay::{replay, DefragMode, ReplayConfig};
use crate::executor::{AllocCostModel, SimExecutor, Timed};
use crate::monitor::Thresholds;
use crate::recorded::StartReport;
use crate::serve::cost::{CostModel, Roofline};
use crate::serve::metrics::Latencies;
use crate::serve::profile::{kv_sizing, GpuProfile, ModelProfile};
use crate::serve::vllm::{EngineConfig, SchedulingPolicy};
use crate::serve::{EvictionKind, Now, Percentiles, ServeError, VllmEngine};
use crate::sleep_watch::{SleepObservations, SleepWatch};

/// Most rounds of one run.
pub const MAX_ROUNDS: u64 = 10_000;

/// A colocation run.
#[derive(Clone, Debug)]
pub struct ColocateSetup {
    pub gpu: GpuProfile,
    pub model: ModelProfile,
    /// The serving engine's share of the GPU (vLLM's gpu_memory_utilization), ppm.
    pub utilization_ppm: u64,
    pub block_size: u32,
    /// 0: vLLM's pause (nothing freed); 1 or 2: sleep levels.
    pub sleep_level: u64,
    pub rounds: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseReport {
    pub round: u64,
    /// `rollout` or `train`.
    pub phase: &'static str,
    pub start_us: u64,
    pub end_us: u64,
    /// GPU bytes in use at the phase's peak (the engine's and the training step's together).
    pub peak_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColocateReport {
    pub gpu: String,
    pub model: String,
    pub sleep_level: u64,
    pub rounds: u64,
    /// The whole GPU.
    pub gpu_bytes: u64,
    pub peak_gpu_bytes: u64,
    /// The engine's weights and KV cache while awake.
    pub serving_bytes: u64,
    /// What the engine keeps on the GPU while the training step runs.
    pub serving_bytes_asleep: u64,
    /// The training step's own peak of reserved bytes (the largest round).
    pub training_reserved_peak_bytes: u64,
    /// Training allocations refused for want of memory, over every round.
    pub training_ooms: u64,
    /// Where each training step's replay started (a torch snapshot: the recorded state before
    /// its first event, or empty and why; as `gpumem alloc` replays it). Absent for other
    /// traces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_start: Option<StartReport>,
    pub sleep_wake_us: u64,
    pub bytes_h2d: u64,
    pub bytes_d2h: u64,
    pub requests: u64,
    pub requests_finished: u64,
    pub ttft_us: Percentiles,
    pub tpot_us: Percentiles,
    pub sim_time_us: u64,
    pub phases: Vec<PhaseReport>,
    /// Digest of the engine's memory decisions (allocate, sleep, wake), in order.
    pub digest: String,
}

/// Runs `rounds` rollouts of `requests` (split evenly, in order) with a training step of
/// `training` after each, on the simulator.
pub fn simulate_colocation(
    setup: &ColocateSetup,
    training: &AllocTrace,
    requests: Vec<WorkloadRequest>,
) -> Result<ColocateReport, ServeError> {
    let links = setup.gpu.links().map_err(ServeError::Input)?;
    let exec = SimExecutor::with_books(colocate_books(setup), AllocCostModel::default(), links);
    colocate_on(setup, training, requests, exec).map(|(report, _)| report)
}

/// The places the serving engine's memory is booked in: the whole GPU and pinned host memory
/// for its backups. A device executor for [`colocate_on`] is made with these books.
pub fn colocate_books(setup: &ColocateSetup) -> Books {
    Books::with_places(&[
        (Place::GPU0, setup.gpu.memory_bytes),
        (Place::new(0, Tier::PinnedHost), HOST_BYTES),
    ])
}

/// Pinned host memory the engine's backups may take.
const HOST_BYTES: u64 = 4 << 40;

/// The run of [`simulate_colocation`] with the serving engine's memory (allocations, sleeps
/// and wakes) carried out on any executor (books from [`colocate_books`]); the clock follows
/// the simulator's modelled time, so the report and digest are the simulation's when the
/// executor refuses nothing the simulator accepts. The training step stays simulated. Also
/// returns what the executor observed of the sleeps and wakes.
pub fn colocate_on<E: Executor>(
    setup: &ColocateSetup,
    training: &AllocTrace,
    requests: Vec<WorkloadRequest>,
    exec: E,
) -> Result<(ColocateReport, SleepObservations), ServeError> {
    let input = ServeError::Input;
    if setup.rounds == 0 || setup.rounds > MAX_ROUNDS {
        return Err(input(format!(
            "--rounds {}: 1 to {MAX_ROUNDS}",
            setup.rounds
        )));
    }
    if requests.is_empty() {
        return Err(input("the serving trace holds no request".into()));
    }
    let level = match setup.sleep_level {
        0 => None,
        n => Some(SleepLevel::from_number(n).map_err(ServeError::Input)?),
    };
    let sizing = kv_sizing(
        &setup.gpu,
        &setup.model,
        setup.utilization_ppm,
        setup.block_size as u64,
    )
    .map_err(ServeError::Input)?;
    let kv_bytes = sizing.num_blocks * sizing.bytes_per_block;
    let gpu_bytes = setup.gpu.memory_bytes;
    let links = setup.gpu.links().map_err(ServeError::Input)?;
    let mut exec = Timed::new(exec, AllocCostModel::default(), links);
    let mut watch = SleepWatch::new();
    let mut pool = CuMemPool::numbered_from(DeviceId(0), 1 << 20);
    let refused = |what: &str, r| ServeError::Input(format!("{what} refused ({r:?})"));
    let weights: Handle = pool
        .allocate(Tag::Weights, sizing.weight_bytes, 1, &mut exec)
        .map_err(|r| refused("the serving weights", r))?;
    pool.allocate(Tag::KvCache, kv_bytes, 0, &mut exec)
        .map_err(|r| refused("the serving KV cache", r))?;
    let serving_bytes = pool.mapped_bytes();
    watch.allocated(&pool, &exec);
    let cfg = EngineConfig {
        num_gpu_blocks: sizing.num_blocks as u32,
        block_size: setup.block_size,
        max_num_seqs: setup.gpu.default_max_num_seqs,
        max_num_batched_tokens: setup.gpu.default_max_num_batched_tokens,
        max_model_len: setup.model.max_model_len,
        enable_prefix_caching: true,
        cost: CostModel::Roofline(Roofline::new(&setup.gpu, &setup.model)),
        eviction: EvictionKind::Lru,
        watermark_blocks: 0,
        policy: SchedulingPolicy::Fcfs,
        offload: None,
    };
    let mut engine = VllmEngine::new(cfg)?;
    let train_span_ns = match (training.ops.first(), training.ops.last()) {
        (Some(a), Some(b)) => b.t_ns.saturating_sub(a.t_ns),
        _ => return Err(input("the training snapshot holds no operation".into())),
    };

    let total = requests.len() as u64;
    let per_round = total.div_ceil(setup.rounds);
    let mut requests = requests.into_iter();
    let mut t_ns = 0u64;
    let mut step = 0u64;
    let mut lat = Latencies::default();
    let (mut finished, mut sleep_wake_ns, mut bytes_h2d, mut bytes_d2h) = (0u64, 0u64, 0u64, 0u64);
    let (mut training_peak, mut training_ooms, mut peak_gpu_bytes) = (0u64, 0u64, serving_bytes);
    let mut asleep_bytes = serving_bytes;
    let mut phases = Vec::new();
    let mut training_start = None;
    for round in 0..setup.rounds {
        // Rollout.
        let start = t_ns;
        for mut req in requests.by_ref().take(per_round as usize) {
            req.arrival_us = t_ns / 1000;
            engine.add_request(req)?;
        }
        while engine.has_unfinished_requests() {
            engine.step(Now { step, ns: t_ns });
            step += 1;
            let rec = engine.last_step();
            if !rec.is_logged() {
                return Err(ServeError::Stall(format!(
                    "round {round}: {}",
                    engine.stall_reason()
                )));
            }
            for o in &rec.outcomes {
                lat.record(o);
                finished += 1;
            }
            t_ns = rec.end_ns;
        }
        phases.push(PhaseReport {
            round,
            phase: "rollout",
            start_us: start / 1000,
            end_us: t_ns / 1000,
            peak_bytes: serving_bytes,
        });
        // Sleep, train, wake.
        if let Some(level) = level {
            let before = exec.modelled_ns_total();
            watch.before_sleep(&mut exec);
            let s = pool
                .sleep(level, &mut exec)
                .map_err(|e| ServeError::Internal(format!("sleep: {e}")))?;
            watch.after_sleep(&mut exec);
            bytes_d2h += s.bytes_copied;
            let took = exec.modelled_ns_total() - before;
            sleep_wake_ns += took;
            t_ns += took;
            // vLLM resets the prefix cache on sleep: the KV cache is gone.
            engine = VllmEngine::new(cfg)?;
        }
        asleep_bytes = pool.mapped_bytes();
        let train_start = t_ns;
        let capacity = gpu_bytes - asleep_bytes;
        let config = ReplayConfig {
            alloc: AllocConfig {
                capacity_bytes: capacity,
                ..AllocConfig::default()
            },
            defrag: DefragMode::Off,
            progress_every_ops: u64::MAX,
            check_every_ops: 0,
            checkpoint_every_ops: 0,
            pressure: Thresholds::default(),
            // The snapshot's own settings, as `gpumem alloc` replays it.
            caching: training.caching_settings.unwrap_or_default(),
        };
        let mut train_exec = SimExecutor::new(capacity, AllocCostModel::default());
        let result = replay(
            training,
            Strategy::Caching,
            &config,
            &mut train_exec,
            &mut |_| {},
        )
        .map_err(|e| ServeError::Input(training.error_at(e.line, e.reason).to_string()))?;
        training_peak = training_peak.max(result.bytes_reserved_peak);
        if training_start.is_none() {
            training_start = result.start.clone();
        }
        training_ooms += result.ooms + result.fragmentation_failures;
        t_ns += train_span_ns;
        let peak = asleep_bytes + result.bytes_reserved_peak;
        peak_gpu_bytes = peak_gpu_bytes.max(peak);
        phases.push(PhaseReport {
            round,
            phase: "train",
            start_us: train_start / 1000,
            end_us: t_ns / 1000,
            peak_bytes: peak,
        });
        if level.is_some() && round + 1 < setup.rounds {
            let before = exec.modelled_ns_total();
            let mut reload = level == Some(SleepLevel::Two);
            let s = match pool.wake_up(None, &mut exec) {
                Ok(s) => s,
                Err(SleepError::Refused {
                    refusal: Refusal::Mismatch,
                    ..
                }) => {
                    // A backup with other bytes than the weights is never used: the rest
                    // wakes, and the weights are reloaded from storage.
                    watch.restore_refused();
                    reload = true;
                    pool.wake_up(None, &mut exec)
                        .map_err(|e| ServeError::Internal(format!("wake: {e}")))?
                }
                Err(e) => return Err(ServeError::Internal(format!("wake: {e}"))),
            };
            watch.after_wake(&pool, &exec);
            bytes_h2d += s.bytes_copied;
            let mut took = exec.modelled_ns_total() - before;
            if reload {
                // Reloaded from storage: disk time, not the write's.
                pool.write(weights, 1, &mut exec);
                took += links.disk.transfer_ns(sizing.weight_bytes);
                // Written in place, with no copy check: a device executor re-checks every
                // content it holds (a restored backup was checked at both ends of its copy).
                exec.checkpoint();
            }
            sleep_wake_ns += took;
            t_ns += took;
        }
    }
    let [ttft_us, tpot_us, _] = lat.percentiles();
    let report = ColocateReport {
        gpu: setup.gpu.name.clone(),
        model: setup.model.name.clone(),
        sleep_level: setup.sleep_level,
        rounds: setup.rounds,
        gpu_bytes,
        peak_gpu_bytes,
        serving_bytes,
        serving_bytes_asleep: asleep_bytes,
        training_reserved_peak_bytes: training_peak,
        training_ooms,
        training_start,
        sleep_wake_us: sleep_wake_ns / 1000,
        bytes_h2d,
        bytes_d2h,
        requests: total,
        requests_finished: finished,
        ttft_us,
        tpot_us,
        sim_time_us: t_ns / 1000,
        phases,
        digest: exec.digest_hex(),
    };
    Ok((report, watch.observations()))
}

/// The report as text.
pub fn render_colocate_text(r: &ColocateReport) -> String {
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let us = crate::serve::report::human_us;
    let mut out = format!(
        "colocate: {} on {}, {} rounds, sleep level {}\n",
        r.model, r.gpu, r.rounds, r.sleep_level
    );
    out += &format!(
        "memory: peak {} of {}; serving {} awake, {} asleep; training peak {}, {} OOMs\n",
        gib(r.peak_gpu_bytes),
        gib(r.gpu_bytes),
        gib(r.serving_bytes),
        gib(r.serving_bytes_asleep),
        gib(r.training_reserved_peak_bytes),
        r.training_ooms
    );
    if let Some(start) = &r.training_start {
        out += &match &start.start_reason {
            None => format!(
                "training start: the recorded state before the first event ({} segments, {} reserved)\n",
                start.start_segments,
                gib(start.start_reserved_bytes)
            ),
            Some(reason) => format!("training start: empty ({reason})\n"),
        };
    }
    out += &format!(
        "sleep and wake: {} ({} GPU -> host, {} host -> GPU)\n",
        us(r.sleep_wake_us),
        gib(r.bytes_d2h),
        gib(r.bytes_h2d)
    );
    out += &format!(
        "serving: {} of {} requests, TTFT p50 {} p99 {}, TPOT p50 {}; run {}\n",
        r.requests_finished,
        r.requests,
        us(r.ttft_us.p50),
        us(r.ttft_us.p99),
        us(r.tpot_us.p50),
        us(r.sim_time_us)
    );
    out += &format!("digest: {}\n", r.digest);
    out
}
