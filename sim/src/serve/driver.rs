//! The serving driver: the simulated clock, and requests streamed into an engine as the clock
//! reaches their arrival.
//!
//! The clock is integer nanoseconds. With the `fixed:STEP_US` cost model it is the conformance
//! clock of `../shared/conformance/README.md`: step k starts at `k × STEP_US`; before it, every
//! request that has arrived by then is added, in trace order; an idle engine jumps to the
//! first step at or after the next arrival. With `roofline` each step lasts what its batch
//! costs and an idle engine jumps to the next arrival itself. After a step that finished a
//! request one more step runs even if it is empty (vLLM's extra step; it writes no log line).
//!
//! The driver holds one arrival ahead of the clock, never the workload: memory follows the
//! requests in flight. A later cluster driver runs many engines through the same interface
//! ([`VllmEngine::add_request`], [`VllmEngine::step`]).

use serde::{Deserialize, Serialize};

use gpumem_core::kv::PrefixCacheStats;

use super::cost::CostModel;
use super::step::{Now, StepRecord};
use super::vllm::VllmEngine;
use super::workload::WorkloadRequest;
use super::ServeError;

/// Totals of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub requests: u64,
    pub requests_finished: u64,
    /// Engine steps that scheduled or preempted something (lines of the step log).
    pub steps: u64,
    /// Last step index that was logged.
    pub last_step: Option<u64>,
    pub sim_time_us: u64,
    pub scheduled_tokens: u64,
    /// Prompt and generated tokens of the finished requests.
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub preemptions: u64,
    pub admissions: u64,
    /// Hit tokens over all admissions (re-admissions of preempted requests included).
    pub admitted_hit_tokens: u64,
    pub prefix_cache: PrefixCacheStats,
    /// Hashes evicted from blocks handed out again (vLLM's removed events).
    pub blocks_evicted: u64,
    pub blocks_stored: u64,
    pub kv_blocks: u32,
    pub kv_blocks_used_peak: u32,
    /// Hex digest of the engine's decisions.
    pub digest: String,
    /// The CPU tier's totals, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadSummary>,
}

/// What the CPU tier did over a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadSummary {
    pub cpu_blocks: u32,
    pub cpu_block_size: u32,
    /// Tokens admissions loaded from the tier, and how many admissions did.
    pub cpu_hit_tokens: u64,
    pub cpu_hit_admissions: u64,
    /// CPU blocks in the store jobs issued, and in the load jobs.
    pub offload_stored_blocks: u64,
    pub offload_loaded_blocks: u64,
    /// CPU blocks whose store completed; evicted from the tier.
    pub cpu_stored_blocks: u64,
    pub cpu_evicted_blocks: u64,
    /// GPU blocks the jobs copied to and from the tier.
    pub gpu_blocks_to_cpu: u64,
    pub gpu_blocks_from_cpu: u64,
    /// Offers the tier had no room for (vLLM's store allocation failures).
    pub store_failures: u64,
    /// Loads and stores whose copies the executor refused.
    pub loads_refused: u64,
    pub stores_refused: u64,
}

impl RunSummary {
    /// Counts one step (every step, logged or not).
    fn add_step(&mut self, rec: &StepRecord, usable_blocks: u32) {
        self.kv_blocks_used_peak = self
            .kv_blocks_used_peak
            .max(usable_blocks - rec.free_blocks);
        for o in &rec.outcomes {
            self.prompt_tokens += o.prompt_tokens;
            self.output_tokens += o.output_tokens;
        }
        if !rec.is_logged() {
            return;
        }
        self.steps += 1;
        self.last_step = Some(rec.step);
        self.preemptions += rec.preempted.len() as u64;
        self.admissions += rec.admitted.len() as u64;
        self.admitted_hit_tokens += rec.admitted_hit_tokens();
        self.scheduled_tokens += rec.scheduled_tokens();
        self.requests_finished += rec.finished.len() as u64;
        self.sim_time_us = rec.end_ns / 1000;
    }
}

/// Requests in arrival order, each checked or refused with its file and line.
pub type ArrivalStream<'a> = dyn Iterator<Item = Result<WorkloadRequest, ServeError>> + 'a;

/// How [`drive`] runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriveOptions {
    /// Run the KV manager's full invariant walk after every `n`-th step (0: never; it is
    /// O(blocks), for tests).
    pub check_invariants_every: u64,
}

/// Runs `engine` until `arrivals` are exhausted and every request has finished, calling
/// `on_step` after every step that scheduled or preempted something (one step-log line each).
pub fn drive<'x>(
    engine: &mut VllmEngine<'x>,
    arrivals: &mut ArrivalStream<'_>,
    options: DriveOptions,
    on_step: &mut dyn FnMut(&StepRecord, &VllmEngine<'x>) -> Result<(), ServeError>,
) -> Result<RunSummary, ServeError> {
    let cfg = *engine.config();
    let usable = cfg.num_gpu_blocks - 1;
    let mut sum = RunSummary {
        kv_blocks: cfg.num_gpu_blocks,
        ..RunSummary::default()
    };
    let mut next = arrivals.next().transpose()?;
    let mut step = 0u64;
    let mut now_ns = 0u64;
    let mut finished_last = false;
    loop {
        while let Some(req) = next.take_if(|r| r.arrival_us.saturating_mul(1000) <= now_ns) {
            engine.add_request(req)?;
            next = arrivals.next().transpose()?;
        }
        if !engine.has_unfinished_requests() && !finished_last && !engine.has_pending_transfers() {
            let Some(req) = &next else {
                break;
            };
            // Idle: jump to the next arrival (on the fixed clock, to the step at or after it).
            (step, now_ns) = match cfg.cost {
                CostModel::Fixed { step_us } => {
                    let k = req.arrival_us.div_ceil(step_us);
                    (k, k * step_us * 1000)
                }
                CostModel::Roofline(_) => (step, req.arrival_us * 1000),
            };
            continue;
        }
        let transfers_before = engine.has_pending_transfers();
        engine.step(Now { step, ns: now_ns });
        let rec = engine.last_step();
        if rec.end_ns == u64::MAX {
            return Err(ServeError::Input(format!(
                "step {step}: the simulated clock overflows 2^64 ns"
            )));
        }
        let every = options.check_invariants_every;
        if every > 0 && step.is_multiple_of(every) {
            engine
                .check_invariants()
                .map_err(|e| ServeError::Internal(format!("step {step}: {e}")))?;
        }
        finished_last = !rec.finished.is_empty();
        sum.add_step(rec, usable);
        if rec.is_logged() {
            on_step(rec, engine)?;
        } else if engine.has_unfinished_requests()
            && !transfers_before
            && !engine.has_pending_transfers()
        {
            return Err(ServeError::Stall(format!(
                "step {step}: {}",
                engine.stall_reason()
            )));
        }
        step += 1;
        now_ns = rec.end_ns;
        // A roofline step that ran nothing and saw no transfer complete takes no time: only a
        // transfer's end or an arrival changes anything, so the clock moves to the sooner.
        let idle = rec.scheduled.is_empty() && rec.transfers_done == 0;
        if idle && matches!(cfg.cost, CostModel::Roofline(_)) {
            if let Some(done) = engine.next_transfer_done_ns() {
                let arrival = next.as_ref().map_or(u64::MAX, |r| r.arrival_us * 1000);
                now_ns = now_ns.max(done.min(arrival));
            }
        }
    }
    let kv = engine.kv();
    let totals = kv.pool().totals();
    sum.requests = engine.requests_added();
    sum.blocks_evicted = totals.removed;
    sum.blocks_stored = totals.stored;
    sum.prefix_cache = *kv.stats();
    sum.digest = engine.digest_hex();
    sum.offload = offload_summary(engine);
    Ok(sum)
}

fn offload_summary(engine: &VllmEngine<'_>) -> Option<OffloadSummary> {
    let c = engine.offload()?;
    let (admissions, tokens) = engine.cpu_hits();
    let t = c.totals();
    let tier = c.tier_totals();
    let cfg = c.config();
    Some(OffloadSummary {
        cpu_blocks: cfg.num_chunks,
        cpu_block_size: cfg.blocks_per_chunk * cfg.block_size,
        cpu_hit_tokens: tokens,
        cpu_hit_admissions: admissions,
        offload_stored_blocks: t.offload_stored,
        offload_loaded_blocks: t.offload_loaded,
        cpu_stored_blocks: tier.stored,
        cpu_evicted_blocks: tier.evicted,
        gpu_blocks_to_cpu: t.blocks_to_cpu,
        gpu_blocks_from_cpu: t.blocks_from_cpu,
        store_failures: c.manager().store_failures(),
        loads_refused: t.loads_refused,
        stores_refused: t.stores_refused,
    })
}
