//! Engine personality `vllm-0.33`: vLLM 0.33.0's v1 `Scheduler` in synchronous mode over the
//! KV manager of `gpumem_core::kv`, for one full-attention text model.
//!
//! Reproduced: FCFS waiting queue with head-of-line blocking; the RUNNING loop first (in
//! admission order), then the WAITING loop only if nothing was preempted this step; chunked
//! prefill under the token budget; `max_num_seqs`; preemption by recompute with the FCFS
//! victim `running[-1]` (possibly the request itself); the full-sequence admission gate
//! (`scheduler_reserve_full_isl`); prefix lookups only at admission; blocks cached at
//! scheduling time; one sampled token per request whose prefill is complete; stop at
//! `max_tokens` or `max_model_len`; finished requests freed in output order.
//!
//! One engine step follows vLLM's phases, one function each: `schedule()` (the RUNNING
//! requests in `schedule.rs`, then the WAITING ones), `_update_after_schedule`
//! and `update_from_output` (in `output.rs`). The engine owns neither the clock
//! nor the workload: a driver ([`super::driver`]) adds each request when the clock reaches its
//! arrival ([`VllmEngine::add_request`]) and runs each step at a time it chooses
//! ([`VllmEngine::step`]). A finished request is dropped after the step that finished it has
//! been read, so memory follows the requests in flight.
//!
//! Every step's decisions (scheduled, preempted, admitted, finished, the newest block of each
//! scheduled request, free blocks, stored and removed hashes) feed a [`Digest`]. Placed on an
//! executor ([`VllmEngine::place`]), the KV manager carries the pool out in memory.

mod config;
mod offload;
mod output;
mod prefetch;
mod requests;
mod schedule;
mod tier;

use std::collections::VecDeque;

use gpumem_core::decision::SegmentId;
use gpumem_core::digest::Digest;
use gpumem_core::executor::Executor;
use gpumem_core::kv::eviction::Eviction;
use gpumem_core::kv::{BlockId, KvCacheManager, KvConfig, KvEvent, KvPlacement};
use gpumem_core::place::{Owner, Place};
use serde::{Deserialize, Serialize};

use super::cost::CostModel;
use super::step::{Now, StepRecord};
use super::workload::WorkloadRequest;
use super::ServeError;
pub use config::{EngineConfig, SchedulingPolicy};
pub use offload::{OffloadEngineConfig, TransferTiming};
pub use prefetch::PrefetchTotals;
use requests::{Req, Requests};
use tier::Tier;

/// Latest arrival the nanosecond clock takes (about 292 years).
pub const MAX_CLOCK_US: u64 = u64::MAX / 2000;

/// The segment that holds the KV pool on an executor.
pub const KV_SEGMENT: SegmentId = SegmentId::new(Place::GPU0, Owner::KvPool, 0);

/// What became of one finished request: the integers its metrics need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestOutcome {
    pub arrival_ns: u64,
    /// End of the step that sampled its first token.
    pub first_token_ns: u64,
    /// End of the step that finished it.
    pub finish_ns: u64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub preemptions: u32,
}

pub struct VllmEngine<'x> {
    cfg: EngineConfig,
    kv: KvCacheManager<'x, Eviction>,
    requests: Requests,
    /// Slots of waiting and preempted requests, in the order `schedule()` considers them.
    waiting: VecDeque<usize>,
    /// Slots of running requests, in admission order.
    running: Vec<usize>,
    /// The last step's record (its finished requests are dropped when the next step starts).
    /// Boxed: a step takes it out and puts it back by moving a pointer, not by copying it.
    record: Option<Box<StepRecord>>,
    requests_added: u64,
    hit_buf: Vec<BlockId>,
    tok_buf: Vec<u32>,
    digest: Digest,
    /// The CPU tier, when the config has one.
    tier: Option<Box<Tier>>,
}

impl<'x> VllmEngine<'x> {
    /// An engine with no request, after vLLM's start-up checks of `cfg`.
    pub fn new(cfg: EngineConfig) -> Result<Self, ServeError> {
        cfg.check()?;
        let kv_config = KvConfig {
            num_blocks: cfg.num_gpu_blocks,
            block_size: cfg.block_size,
            max_model_len: cfg.max_model_len,
            enable_prefix_caching: cfg.enable_prefix_caching,
            watermark_blocks: cfg.watermark_blocks,
        };
        let kv = KvCacheManager::with_policy(kv_config, cfg.eviction.build(cfg.num_gpu_blocks));
        let tier = cfg.offload.map(|o| {
            Box::new(Tier::new(
                o,
                cfg.block_size,
                cfg.num_gpu_blocks,
                cfg.enable_prefix_caching,
            ))
        });
        Ok(VllmEngine {
            cfg,
            kv,
            requests: Requests::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            record: Some(Box::default()),
            requests_added: 0,
            hit_buf: Vec::new(),
            tok_buf: Vec::new(),
            digest: Digest::new(),
            tier,
        })
    }

    /// Carries the KV pool out on `exec` (`block_bytes` per block, in [`KV_SEGMENT`]): it is
    /// reserved now, every computed block is written and every prefix hit is read back before
    /// it counts. Call it before the first request.
    pub fn place(
        &mut self,
        exec: &'x mut dyn Executor,
        block_bytes: u64,
    ) -> Result<(), ServeError> {
        let placement = KvPlacement {
            segment: KV_SEGMENT,
            block_bytes,
        };
        self.kv
            .place(placement, exec)
            .map_err(|e| ServeError::Input(e.to_string()))?;
        if let Some(tier) = self.tier.as_mut() {
            let (_, exec) = self.kv.placed_executor().expect("the pool was just placed");
            tier.connector
                .place(block_bytes, exec)
                .map_err(|e| ServeError::Input(format!("the CPU tier: {e}")))?;
        }
        Ok(())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// vLLM's `add_request`: the request joins the waiting queue. Refused (nothing changes)
    /// when vLLM's input processor would refuse it or its arrival is beyond the clock.
    pub fn add_request(&mut self, input: WorkloadRequest) -> Result<(), ServeError> {
        let len = input.prompt.len();
        if len == 0 || len >= self.cfg.max_model_len {
            return Err(ServeError::Input(format!(
                "request {:?} (line {}): prompt length {len} must be between 1 and max_model_len {} - 1",
                input.id, input.line, self.cfg.max_model_len
            )));
        }
        if input.arrival_us > MAX_CLOCK_US {
            return Err(ServeError::Input(format!(
                "request {:?} (line {}): arrival_us {} is beyond the simulated clock ({MAX_CLOCK_US} us)",
                input.id, input.line, input.arrival_us
            )));
        }
        let slot = self.requests.insert(Req::new(self.requests_added, input));
        self.requests_added += 1;
        if let Some(tier) = self.tier.as_mut() {
            self.requests.get_mut(slot).offload = Some(tier.connector.on_new_request(slot));
        }
        self.enqueue_waiting(slot);
        Ok(())
    }

    /// vLLM's `has_unfinished_requests`: anything waiting (a load in flight included) or
    /// running.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.waiting.is_empty()
            || !self.running.is_empty()
            || self.tier.as_ref().is_some_and(|t| !t.kv_holding.is_empty())
    }

    /// Transfers between the GPU and the CPU tier issued and not yet completed (vLLM's
    /// `has_pending_push_work`): the engine keeps stepping while there are any.
    pub fn has_pending_transfers(&self) -> bool {
        self.tier
            .as_ref()
            .is_some_and(|t| t.connector.has_pending_jobs())
    }

    /// With a link clock: when the next transfer in flight ends.
    pub fn next_transfer_done_ns(&self) -> Option<u64> {
        self.tier.as_ref().and_then(|t| t.next_done_ns())
    }

    /// One engine step starting at `now`: `schedule()`, the model's output (one token for
    /// each request whose prefill is complete) and `update_from_output()`. Returns what it
    /// did; the requests it names stay readable ([`request_id`](Self::request_id)) until the
    /// next step.
    pub fn step(&mut self, now: Now) -> &StepRecord {
        self.drop_finished();
        let mut rec = self
            .record
            .take()
            .expect("a step's record is back after it");
        rec.clear();
        rec.step = now.step;
        rec.start_ns = now.ns;
        let budget = self.schedule_running(&mut rec, self.cfg.max_num_batched_tokens);
        if rec.preempted.is_empty() {
            if self.tier.is_some() {
                self.schedule_waiting_tier(&mut rec, budget);
            } else {
                self.schedule_waiting(&mut rec, budget);
            }
        }
        self.prefetch_after_schedule();
        let jobs = self.tier.is_some().then(|| self.build_connector_meta(&rec));
        let work = self.update_after_schedule(&rec);
        let forward_ns = match jobs {
            Some(jobs) => self.run_worker(jobs, now.ns),
            None => now.ns,
        };
        self.prefetch_at(forward_ns);
        rec.end_ns = match self.cfg.cost {
            // The conformance clock: every step takes step_us, whatever it waited for.
            CostModel::Fixed { .. } => now.ns.saturating_add(self.cfg.cost.step_ns(&work)),
            CostModel::Roofline(_) => forward_ns.saturating_add(self.cfg.cost.step_ns(&work)),
        };
        self.update_from_output(&mut rec);
        self.record.insert(rec)
    }

    /// What the last step did.
    pub fn last_step(&self) -> &StepRecord {
        self.record
            .as_deref()
            .expect("a step's record is back after it")
    }

    /// Forgets the requests the last step finished (their slots are reused).
    fn drop_finished(&mut self) {
        let rec = self
            .record
            .as_mut()
            .expect("a step's record is back after it");
        for &slot in &rec.finished {
            self.requests.remove(slot);
        }
        rec.finished.clear();
    }

    /// The id of the request in `slot`, for any request the last step names.
    pub fn request_id(&self, slot: usize) -> &str {
        &self.requests.get(slot).input.id
    }

    /// Requests added so far.
    pub fn requests_added(&self) -> u64 {
        self.requests_added
    }

    /// Requests in flight (waiting, running, or finished by the last step).
    pub fn requests_in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Why nothing could be scheduled while requests remain (vLLM would wait forever).
    pub fn stall_reason(&self) -> String {
        let holding = self.tier.as_ref().and_then(|t| t.kv_holding.front());
        match holding.or(self.waiting.front()) {
            Some(&slot) => {
                let q = self.requests.get(slot);
                format!(
                    "request {} ({} tokens) cannot be admitted with {} free blocks and nothing running",
                    q.input.id,
                    q.num_tokens,
                    self.kv.num_free_blocks()
                )
            }
            None => "no progress".into(),
        }
    }

    /// Prefix hits the executor refused because the block did not hold what it should.
    pub fn hits_refused(&self) -> u64 {
        self.kv.hits_refused()
    }

    pub fn kv(&self) -> &KvCacheManager<'x, Eviction> {
        &self.kv
    }

    /// From now on, keeps the KV-cache events vLLM would publish (blocks stored, hashes
    /// removed), for [`take_kv_events`](Self::take_kv_events): what a KV-aware router's index is
    /// fed. They do not enter the digest.
    pub fn publish_kv_events(&mut self) {
        self.kv.pool_mut().record_events(true);
    }

    /// The KV-cache events since the last call (none unless
    /// [`publish_kv_events`](Self::publish_kv_events) was called).
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.kv.pool_mut().take_events()
    }

    /// The CPU tier's connector, when there is a tier.
    pub fn offload(&self) -> Option<&gpumem_core::kv::offload::OffloadConnector> {
        self.tier.as_ref().map(|t| &t.connector)
    }

    /// Admissions whose load hit the CPU tier, and the tokens it held for them.
    pub fn cpu_hits(&self) -> (u64, u64) {
        self.tier
            .as_ref()
            .map_or((0, 0), |t| (t.cpu_hit_admissions, t.cpu_hit_tokens))
    }

    /// The KV manager's and the CPU tier's full invariant walks.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        self.prefetch_check()?;
        match &self.tier {
            Some(t) => t.connector.check_invariants(),
            None => Ok(()),
        }
    }

    /// Hex digest of the engine's decisions so far.
    pub fn digest_hex(&self) -> String {
        self.digest.hex()
    }
}
