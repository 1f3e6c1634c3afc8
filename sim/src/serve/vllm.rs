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
//! Time is integer nanoseconds. With the `fixed:STEP_US` cost model it is the conformance
//! clock of `../shared/conformance/README.md` (step k starts at `k × STEP_US`; an idle engine
//! jumps to the first step at or after the next arrival); with `roofline` each step lasts what
//! its batch costs and an idle engine jumps to the next arrival itself.
//!
//! Every step's decisions (scheduled, preempted, admitted, finished, the newest block of each
//! scheduled request, free blocks, stored and removed hashes) feed a [`Digest`].

use std::collections::VecDeque;

use gpumem_core::decision::{Decision, Loc, SegmentId};
use gpumem_core::digest::Digest;
use gpumem_core::executor::Executor;
use gpumem_core::kv::hash::{hash_request_block, ExtraKeys};
use gpumem_core::kv::{
    BlockHash, BlockId, KvCacheManager, KvConfig, PrefixCacheStats, SlotRequest,
};
use gpumem_core::place::{Owner, Place};
use serde::{Deserialize, Serialize};

use super::cost::{CostModel, StepWork};
use super::workload::{ConformanceConfig, Workload, WorkloadRequest};
use super::{EvictionKind, ServeError, StepRecord};
use gpumem_core::kv::eviction::Eviction;

/// Latest arrival the nanosecond clock takes (about 292 years).
pub const MAX_CLOCK_US: u64 = u64::MAX / 2000;

/// The scheduler and cache knobs of the personality.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// vLLM's `num_gpu_blocks`, the null block included.
    pub num_gpu_blocks: u32,
    pub block_size: u32,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    pub max_model_len: u64,
    pub enable_prefix_caching: bool,
    /// Time per engine step.
    pub cost: CostModel,
    /// Which free block is handed out next.
    pub eviction: EvictionKind,
    /// vLLM's `watermark` as blocks (`int(watermark * num_gpu_blocks)`); 0 in the contract.
    pub watermark_blocks: u32,
    pub policy: SchedulingPolicy,
}

/// vLLM's scheduling policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come, first served; the most recently admitted running request is preempted.
    Fcfs,
    /// Lowest (priority, arrival, id) first; the highest one running is preempted.
    Priority,
}

impl SchedulingPolicy {
    pub fn parse(name: &str) -> Result<SchedulingPolicy, String> {
        match name {
            "fcfs" => Ok(SchedulingPolicy::Fcfs),
            "priority" => Ok(SchedulingPolicy::Priority),
            other => Err(format!(
                "unknown scheduling policy '{other}'; known: fcfs, priority"
            )),
        }
    }
}

impl EngineConfig {
    /// The contract's config, checked as vLLM checks it at start-up.
    /// Fails on configs vLLM refuses at start-up and on values beyond gpumem's limits.
    pub fn from_conformance(c: &ConformanceConfig) -> Result<EngineConfig, ServeError> {
        let errors = c.startup_errors();
        if !errors.is_empty() {
            return Err(ServeError::Input(errors.join("; ")));
        }
        Ok(EngineConfig {
            num_gpu_blocks: c.num_gpu_blocks as u32,
            block_size: c.block_size as u32,
            max_num_seqs: c.max_num_seqs,
            max_num_batched_tokens: c.max_num_batched_tokens,
            max_model_len: c.max_model_len,
            enable_prefix_caching: c.enable_prefix_caching,
            cost: CostModel::Fixed { step_us: c.step_us },
            eviction: EvictionKind::Lru,
            watermark_blocks: 0,
            policy: if c.priority_policy {
                SchedulingPolicy::Priority
            } else {
                SchedulingPolicy::Fcfs
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    NotArrived,
    Waiting,
    Running,
    Preempted,
    Finished,
}

#[derive(Clone, Debug)]
struct Req {
    num_prompt: u64,
    num_tokens: u64,
    num_computed: u64,
    num_output: u64,
    max_tokens: u64,
    hashes: Vec<BlockHash>,
    status: Status,
    num_preemptions: u32,
    first_token_ns: Option<u64>,
    finish_ns: Option<u64>,
}

/// What became of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestOutcome {
    pub arrival_ns: u64,
    /// End of the step that sampled its first token.
    pub first_token_ns: Option<u64>,
    /// End of the step that finished it.
    pub finish_ns: Option<u64>,
    pub output_tokens: u64,
    pub preemptions: u32,
}

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
    pub outcomes: Vec<RequestOutcome>,
    /// Hex digest of the engine's decisions.
    pub digest: String,
}

fn slot_of(reqs: &[Req], r: usize) -> SlotRequest<'_> {
    let q = &reqs[r];
    SlotRequest {
        req: r,
        num_tokens: q.num_tokens,
        num_computed_tokens: q.num_computed,
        block_hashes: &q.hashes,
        waiting: matches!(q.status, Status::Waiting | Status::Preempted),
    }
}

pub struct VllmEngine<'w> {
    cfg: EngineConfig,
    workload: &'w Workload,
    kv: KvCacheManager<Eviction>,
    reqs: Vec<Req>,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    hit_buf: Vec<BlockId>,
    tok_buf: Vec<u32>,
    check_every: u64,
    digest: Digest,
    exec: Option<KvExec<'w>>,
}

/// The KV pool carried out on an executor: block `b` lives at `b × block_bytes` of one
/// segment; every computed block is written and every prefix hit read back before it counts.
struct KvExec<'w> {
    mem: &'w mut dyn Executor,
    block_bytes: u64,
    hits_refused: u64,
}

/// The segment that holds the KV pool on an executor.
pub const KV_SEGMENT: SegmentId = SegmentId::new(Place::GPU0, Owner::KvPool, 0);

impl KvExec<'_> {
    fn at(&self, block: BlockId) -> Loc {
        Loc {
            segment: KV_SEGMENT,
            offset: block as u64 * self.block_bytes,
        }
    }
}

/// What a block holds while it fills: a value of (request, block index, tokens computed),
/// never equal to a prefix hash by more than chance.
fn partial_content(req: usize, block: usize, computed: u64) -> u64 {
    let mut x = (req as u64) << 40 ^ (block as u64) << 20 ^ computed ^ 0x5bd1_e995_0000_0000;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

impl<'w> VllmEngine<'w> {
    /// Checks the workload against the config (vLLM's input checks) and builds the engine.
    pub fn new(workload: &'w Workload, cfg: EngineConfig) -> Result<Self, ServeError> {
        use super::workload::{MAX_BLOCK_SIZE, MAX_GPU_BLOCKS, MAX_MODEL_LEN, MAX_STEP_US};
        let step_us = match cfg.cost {
            CostModel::Fixed { step_us } => step_us,
            CostModel::Roofline(_) => 1,
        };
        if cfg.num_gpu_blocks < 2 || cfg.block_size == 0 || step_us == 0 {
            return Err(ServeError::Input(
                "num_gpu_blocks >= 2, block_size >= 1 and step_us >= 1 are required".into(),
            ));
        }
        if cfg.num_gpu_blocks as u64 > MAX_GPU_BLOCKS
            || cfg.block_size as u64 > MAX_BLOCK_SIZE
            || cfg.max_model_len > MAX_MODEL_LEN
            || step_us > MAX_STEP_US
        {
            return Err(ServeError::Input(format!(
                "config beyond gpumem's limits (num_gpu_blocks <= {MAX_GPU_BLOCKS}, block_size <= {MAX_BLOCK_SIZE}, max_model_len <= {MAX_MODEL_LEN}, step_us <= {MAX_STEP_US})"
            )));
        }
        if cfg.max_model_len > (cfg.num_gpu_blocks as u64 - 1) * cfg.block_size as u64 {
            return Err(ServeError::Input(format!(
                "max_model_len {} exceeds the KV pool ({} usable blocks x {} tokens)",
                cfg.max_model_len,
                cfg.num_gpu_blocks - 1,
                cfg.block_size
            )));
        }
        if cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens < cfg.max_num_seqs {
            return Err(ServeError::Input(
                "max_num_seqs must be >= 1 and max_num_batched_tokens >= max_num_seqs".into(),
            ));
        }
        workload.validate(cfg.max_model_len)?;
        if let Some(r) = workload
            .requests
            .iter()
            .find(|r| r.arrival_us > MAX_CLOCK_US)
        {
            return Err(ServeError::Input(format!(
                "{}:{}: arrival_us {} is beyond the simulated clock ({MAX_CLOCK_US} us)",
                workload.source, r.line, r.arrival_us
            )));
        }
        let kv_config = KvConfig {
            num_blocks: cfg.num_gpu_blocks,
            block_size: cfg.block_size,
            max_model_len: cfg.max_model_len,
            enable_prefix_caching: cfg.enable_prefix_caching,
            watermark_blocks: cfg.watermark_blocks,
        };
        let kv = KvCacheManager::with_policy(kv_config, cfg.eviction.build(cfg.num_gpu_blocks));
        let reqs = workload
            .requests
            .iter()
            .map(|w| Req {
                num_prompt: w.prompt.len(),
                num_tokens: w.prompt.len(),
                num_computed: 0,
                num_output: 0,
                max_tokens: w.max_tokens,
                hashes: Vec::new(),
                status: Status::NotArrived,
                num_preemptions: 0,
                first_token_ns: None,
                finish_ns: None,
            })
            .collect();
        Ok(VllmEngine {
            cfg,
            workload,
            kv,
            reqs,
            waiting: VecDeque::new(),
            running: Vec::new(),
            hit_buf: Vec::new(),
            tok_buf: Vec::new(),
            check_every: 0,
            digest: Digest::new(),
            exec: None,
        })
    }

    /// Run the KV manager's full invariant walk after every `every`-th step (0: never; it is
    /// O(blocks), for tests).
    pub fn with_invariant_checks(mut self, every: u64) -> Self {
        self.check_every = every;
        self
    }

    /// Carries the KV pool out on `mem` (`block_bytes` per block): reserved when the run
    /// starts, every computed block written, every prefix hit read back before it counts.
    pub fn with_executor(mut self, mem: &'w mut dyn Executor, block_bytes: u64) -> Self {
        self.exec = Some(KvExec {
            mem,
            block_bytes,
            hits_refused: 0,
        });
        self
    }

    /// Writes the blocks that the `n` tokens scheduled after `computed` fall in, as soon as
    /// they are scheduled: a request admitted later in the same step may hit them (the same
    /// forward pass computes them).
    fn write_scheduled(&mut self, r: usize, computed: u64, n: u64) {
        if let Some(x) = self.exec.as_mut() {
            let bs = self.cfg.block_size as u64;
            write_blocks(
                x,
                self.kv.blocks(r),
                &self.reqs[r].hashes,
                r,
                computed,
                n,
                bs,
            );
        }
    }

    /// Prefix hits the executor refused because the block did not hold what it should.
    pub fn hits_refused(&self) -> u64 {
        self.exec.as_ref().map_or(0, |x| x.hits_refused)
    }

    pub fn kv(&self) -> &KvCacheManager<Eviction> {
        &self.kv
    }

    /// Tokens `start..end` of request `r` into `tok_buf` (prompt, then generated tokens by the contract's rule).
    fn fill_tokens(&mut self, r: usize, start: u64, end: u64) {
        self.tok_buf.clear();
        let w: &WorkloadRequest = &self.workload.requests[r];
        let np = self.reqs[r].num_prompt;
        if start < np {
            w.prompt.fill(start, end.min(np), &mut self.tok_buf);
        }
        for j in start.max(np)..end {
            self.tok_buf
                .push(WorkloadRequest::generated_token(r, j - np));
        }
    }

    /// Hashes the request's full blocks not hashed yet (vLLM's request block hasher).
    fn update_hashes(&mut self, r: usize) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.cfg.block_size as u64;
        loop {
            let i = self.reqs[r].hashes.len();
            let start = i as u64 * bs;
            if start + bs > self.reqs[r].num_tokens {
                break;
            }
            self.fill_tokens(r, start, start + bs);
            let parent = self.reqs[r].hashes.last().copied();
            let h = hash_request_block(parent, i, &self.tok_buf, &ExtraKeys::NONE);
            self.reqs[r].hashes.push(h);
        }
    }

    fn add_request(&mut self, r: usize) {
        self.reqs[r].status = Status::Waiting;
        self.update_hashes(r);
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_back(r),
            SchedulingPolicy::Priority => self.enqueue_by_priority(r),
        }
    }

    /// vLLM's `Request.__lt__`: priority, then arrival time, then request id.
    fn priority_key(&self, r: usize) -> (i64, u64, &str) {
        let w = &self.workload.requests[r];
        (w.priority, w.arrival_us, w.id.as_str())
    }

    /// The priority queue (a heap in vLLM): requests are popped in key order.
    fn enqueue_by_priority(&mut self, r: usize) {
        let key = self.priority_key(r);
        let at = self
            .waiting
            .partition_point(|&x| self.priority_key(x) < key);
        self.waiting.insert(at, r);
    }

    /// Takes the request to preempt out of `running`: the last admitted (FCFS) or the one with
    /// the highest priority key. Returns it and its index.
    fn take_victim(&mut self) -> (usize, usize) {
        let index = match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.running.len() - 1,
            // vLLM's `max(running, key=(priority, arrival_time))`: no id in the key, and the
            // first of equal keys in running order wins.
            SchedulingPolicy::Priority => {
                let key = |r: usize| {
                    let (priority, arrival, _) = self.priority_key(r);
                    (priority, arrival)
                };
                let mut best = 0;
                for k in 1..self.running.len() {
                    if key(self.running[k]) > key(self.running[best]) {
                        best = k;
                    }
                }
                best
            }
        };
        (self.running.remove(index), index)
    }

    fn preempt(&mut self, r: usize) {
        self.kv.free(r);
        let q = &mut self.reqs[r];
        debug_assert_eq!(q.status, Status::Running);
        q.status = Status::Preempted;
        q.num_computed = 0;
        q.num_preemptions += 1;
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_front(r),
            SchedulingPolicy::Priority => self.enqueue_by_priority(r),
        }
    }

    /// Engine step `step`, starting at `start_ns`: `schedule()`, the fake model output and
    /// `update_from_output()`. Fills `rec`.
    fn step(&mut self, step: u64, start_ns: u64, rec: &mut StepRecord) {
        rec.clear();
        rec.step = step;
        rec.start_ns = start_ns;
        let mut budget = self.cfg.max_num_batched_tokens;
        let max_len = self.cfg.max_model_len;

        // RUNNING requests, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let r = self.running[i];
            let q = &self.reqs[r];
            let n = (q.num_tokens - q.num_computed)
                .min(budget)
                .min(max_len.saturating_sub(q.num_computed + 1));
            if n == 0 {
                i += 1;
                continue;
            }
            let scheduled = loop {
                if self
                    .kv
                    .allocate_slots(slot_of(&self.reqs, r), n, 0, &[], false, true)
                {
                    break true;
                }
                // Preempt the lowest-priority running request (under FCFS the most recently
                // admitted), maybe `r` itself.
                let (victim, index) = self.take_victim();
                if index < i {
                    i -= 1;
                }
                // Under priority a victim may have been scheduled earlier in this step: its
                // tokens go back to the budget.
                if let Some(pos) = rec.scheduled.iter().position(|&(x, _)| x == victim) {
                    budget += rec.scheduled.remove(pos).1;
                }
                self.preempt(victim);
                rec.preempted.push(victim);
                if victim == r {
                    break false;
                }
            };
            if !scheduled {
                // Under priority the requests after `r` rank higher and may still fit (`r`
                // freed its blocks); `i` already points at the next one.
                if self.cfg.policy == SchedulingPolicy::Priority {
                    continue;
                }
                break;
            }
            self.write_scheduled(r, self.reqs[r].num_computed, n);
            rec.scheduled.push((r, n));
            budget -= n;
            i += 1;
        }

        // WAITING requests, only if nothing was preempted; head-of-line blocking.
        if rec.preempted.is_empty() {
            while budget > 0 {
                let Some(&r) = self.waiting.front() else {
                    break;
                };
                if self.running.len() as u64 >= self.cfg.max_num_seqs {
                    break;
                }
                let q = &self.reqs[r];
                debug_assert_eq!(q.num_computed, 0);
                let mut hits = std::mem::take(&mut self.hit_buf);
                let mut hit_tokens =
                    self.kv
                        .get_computed_blocks(&q.hashes, q.num_tokens, &mut hits);
                if let Some(x) = self.exec.as_mut() {
                    let served = verified_hits(x, &hits, &q.hashes);
                    if served < hits.len() {
                        // The block's bytes are wrong: not a hit, and never again.
                        self.kv.pool_mut().evict_blocks(&[hits[served]]);
                        hits.truncate(served);
                        hit_tokens = served as u64 * self.cfg.block_size as u64;
                    }
                }
                let n = (q.num_tokens - hit_tokens).min(budget);
                let has_running = !self.running.is_empty();
                let slot = slot_of(&self.reqs, r);
                let ok = self
                    .kv
                    .allocate_slots(slot, n, hit_tokens, &hits, true, has_running);
                self.hit_buf = hits;
                if !ok {
                    break;
                }
                self.write_scheduled(r, hit_tokens, n);
                let q = &mut self.reqs[r];
                let preempted_before = q.num_preemptions > 0;
                let num_tokens = q.num_tokens;
                q.status = Status::Running;
                q.num_computed = hit_tokens;
                self.kv
                    .record_prefix_cache_stats(num_tokens, hit_tokens, preempted_before);
                self.waiting.pop_front();
                self.running.push(r);
                rec.admitted_tokens += num_tokens;
                rec.admitted.push((r, hit_tokens));
                rec.scheduled.push((r, n));
                budget -= n;
            }
        }

        // _update_after_schedule: optimistic computed counts. The step's cost follows.
        let mut work = StepWork::default();
        let d = &mut self.digest;
        d.word(step);
        d.word(rec.scheduled.len() as u64);
        for &(r, n) in &rec.scheduled {
            work.add(self.reqs[r].num_computed, n);
            self.reqs[r].num_computed += n;
            let table = self.kv.blocks(r);
            d.word(r as u64);
            d.word(n);
            d.word(table.len() as u64);
            d.word(table.last().map_or(0, |&b| b as u64));
        }
        rec.end_ns = start_ns.saturating_add(self.cfg.cost.step_ns(&work));

        // update_from_output: one token for each request whose prefill is complete.
        let end_ns = rec.end_ns;
        for k in 0..rec.scheduled.len() {
            let r = rec.scheduled[k].0;
            let q = &mut self.reqs[r];
            if q.num_computed < q.num_tokens {
                continue;
            }
            q.num_tokens += 1;
            q.num_output += 1;
            if q.first_token_ns.is_none() {
                q.first_token_ns = Some(end_ns);
            }
            let stop = q.num_tokens >= max_len || q.num_output >= q.max_tokens;
            if self.cfg.enable_prefix_caching
                && q.num_tokens.is_multiple_of(self.cfg.block_size as u64)
            {
                self.update_hashes(r);
            }
            if stop {
                let q = &mut self.reqs[r];
                q.status = Status::Finished;
                q.finish_ns = Some(end_ns);
                q.hashes = Vec::new();
                self.kv.free(r);
                rec.finished.push(r);
            }
        }
        if !rec.finished.is_empty() {
            let reqs = &self.reqs;
            self.running.retain(|&r| reqs[r].status != Status::Finished);
        }
        rec.free_blocks = self.kv.num_free_blocks();
        let c = self.kv.pool_mut().take_counters();
        rec.stored = c.stored;
        rec.removed = c.removed;
        rec.running = self.running.len() as u64;
        rec.waiting = self.waiting.len() as u64;
        let d = &mut self.digest;
        d.word(rec.preempted.len() as u64);
        rec.preempted.iter().for_each(|&r| d.word(r as u64));
        d.word(rec.admitted.len() as u64);
        for &(r, h) in &rec.admitted {
            d.word(r as u64);
            d.word(h);
        }
        d.word(rec.finished.len() as u64);
        rec.finished.iter().for_each(|&r| d.word(r as u64));
        d.word(rec.free_blocks as u64);
        d.word(c.stored);
        d.word(c.removed);
    }

    /// Runs the workload to the end, calling `on_step` for every step that scheduled or
    /// preempted something (one step-log line each).
    pub fn run(
        &mut self,
        mut on_step: impl FnMut(&StepRecord) -> Result<(), ServeError>,
    ) -> Result<RunSummary, ServeError> {
        let n = self.workload.requests.len();
        let mut sum = RunSummary {
            requests: n as u64,
            kv_blocks: self.cfg.num_gpu_blocks,
            ..RunSummary::default()
        };
        if let Some(x) = self.exec.as_mut() {
            let bytes = (self.cfg.num_gpu_blocks as u64)
                .checked_mul(x.block_bytes)
                .ok_or_else(|| ServeError::Input("KV pool size overflows 64 bits".into()))?;
            x.mem
                .apply(Decision::Reserve {
                    segment: KV_SEGMENT,
                    bytes,
                })
                .map_err(|why| {
                    ServeError::Input(format!(
                        "the executor refused the KV pool of {bytes} bytes ({why:?})"
                    ))
                })?;
        }
        let usable = self.cfg.num_gpu_blocks - 1;
        let mut rec = StepRecord::default();
        let mut next = 0usize;
        let mut k = 0u64;
        let mut now_ns = 0u64;
        let mut finished_last = false;
        loop {
            while next < n && self.workload.requests[next].arrival_us * 1000 <= now_ns {
                self.add_request(next);
                next += 1;
            }
            if self.waiting.is_empty() && self.running.is_empty() && !finished_last {
                if next >= n {
                    break;
                }
                // Idle: jump to the next arrival (on the fixed clock, to the step at or after it).
                let arrival_us = self.workload.requests[next].arrival_us;
                now_ns = match self.cfg.cost {
                    CostModel::Fixed { step_us } => {
                        k = arrival_us.div_ceil(step_us);
                        k * step_us * 1000
                    }
                    CostModel::Roofline(_) => arrival_us * 1000,
                };
                continue;
            }
            self.step(k, now_ns, &mut rec);
            if rec.end_ns == u64::MAX {
                return Err(ServeError::Input(format!(
                    "step {k}: the simulated clock overflows 2^64 ns"
                )));
            }
            if self.check_every > 0 && k.is_multiple_of(self.check_every) {
                self.kv
                    .check_invariants()
                    .map_err(|e| ServeError::Internal(format!("step {k}: {e}")))?;
            }
            finished_last = !rec.finished.is_empty();
            sum.kv_blocks_used_peak = sum.kv_blocks_used_peak.max(usable - rec.free_blocks);
            if !rec.scheduled.is_empty() || !rec.preempted.is_empty() {
                sum.steps += 1;
                sum.last_step = Some(k);
                sum.preemptions += rec.preempted.len() as u64;
                sum.admissions += rec.admitted.len() as u64;
                sum.admitted_hit_tokens += rec.admitted.iter().map(|a| a.1).sum::<u64>();
                sum.scheduled_tokens += rec.scheduled.iter().map(|s| s.1).sum::<u64>();
                sum.requests_finished += rec.finished.len() as u64;
                sum.sim_time_us = rec.end_ns / 1000;
                on_step(&rec)?;
            } else if !self.waiting.is_empty() || !self.running.is_empty() {
                let head = self.waiting.front().copied();
                return Err(ServeError::Stall(match head {
                    Some(r) => format!(
                        "step {k}: request {} ({} tokens) cannot be admitted with {} free blocks and nothing running",
                        self.workload.requests[r].id,
                        self.reqs[r].num_tokens,
                        self.kv.num_free_blocks()
                    ),
                    None => format!("step {k}: no progress"),
                }));
            }
            k += 1;
            now_ns = rec.end_ns;
        }
        let totals = self.kv.pool().totals();
        sum.blocks_evicted = totals.removed;
        sum.blocks_stored = totals.stored;
        sum.prefix_cache = *self.kv.stats();
        sum.outcomes = self
            .reqs
            .iter()
            .zip(&self.workload.requests)
            .map(|(q, w)| RequestOutcome {
                arrival_ns: w.arrival_us * 1000,
                first_token_ns: q.first_token_ns,
                finish_ns: q.finish_ns,
                output_tokens: q.num_output,
                preemptions: q.num_preemptions,
            })
            .collect();
        sum.prompt_tokens = self.reqs.iter().map(|q| q.num_prompt).sum();
        sum.output_tokens = self.reqs.iter().map(|q| q.num_output).sum();
        sum.digest = self.digest.hex();
        Ok(sum)
    }
}

/// Reads back the hit blocks in order; returns how many hold what they should.
fn verified_hits(x: &mut KvExec<'_>, hits: &[BlockId], hashes: &[BlockHash]) -> usize {
    for (i, (&block, hash)) in hits.iter().zip(hashes).enumerate() {
        let read = Decision::ReadKv {
            at: x.at(block),
            bytes: x.block_bytes,
            content: hash.0,
        };
        if x.mem.apply(read).is_err() {
            x.hits_refused += 1;
            return i;
        }
    }
    hits.len()
}

/// Writes the blocks of `table` that tokens `computed..computed + n` fall in: a full block
/// holds its prefix hash, a filling one a value of the request and its progress.
fn write_blocks(
    x: &mut KvExec<'_>,
    table: &[BlockId],
    hashes: &[BlockHash],
    req: usize,
    computed: u64,
    n: u64,
    block_size: u64,
) {
    let end = computed + n;
    let (first, last) = (
        (computed / block_size) as usize,
        ((end - 1) / block_size) as usize,
    );
    for (b, &block) in table.iter().enumerate().take(last + 1).skip(first) {
        let full = end >= (b as u64 + 1) * block_size;
        let content = match hashes.get(b) {
            Some(h) if full => h.0,
            _ => partial_content(req, b, end),
        };
        let write = Decision::WriteKv {
            at: x.at(block),
            bytes: x.block_bytes,
            content,
        };
        x.mem.apply(write).expect("a KV write is never refused");
    }
}
