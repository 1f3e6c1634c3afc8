//! The `vllm-0.33` engine as it was before streaming (commit e101ee0, executor parts left
//! out): it holds the whole workload, owns the clock and keeps every request's state to the
//! end. Kept only here, as the reference the streaming engine must match step for step.

use std::collections::VecDeque;

use gpumem_core::digest::Digest;
use gpumem_core::kv::eviction::Eviction;
use gpumem_core::kv::hash::{hash_request_block, ExtraKeys};
use gpumem_core::kv::{BlockHash, BlockId, KvCacheManager, KvConfig, SlotRequest};
use gpumem_sim::serve::{CostModel, EngineConfig, SchedulingPolicy, StepWork};
use gpumem_sim::serve::{Workload, WorkloadRequest};

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
}

/// One step, by request index into the workload.
#[derive(Clone, Debug, Default)]
pub struct StepRecord {
    pub step: u64,
    pub scheduled: Vec<(usize, u64)>,
    pub preempted: Vec<usize>,
    pub admitted: Vec<(usize, u64)>,
    pub finished: Vec<usize>,
    pub free_blocks: u32,
    pub stored: u64,
    pub removed: u64,
    pub end_ns: u64,
}

/// Totals the comparison needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub requests_finished: u64,
    pub steps: u64,
    pub output_tokens: u64,
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

pub struct OldEngine<'w> {
    cfg: EngineConfig,
    workload: &'w Workload,
    kv: KvCacheManager<'static, Eviction>,
    reqs: Vec<Req>,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    hit_buf: Vec<BlockId>,
    tok_buf: Vec<u32>,
    digest: Digest,
}

impl<'w> OldEngine<'w> {
    pub fn new(workload: &'w Workload, cfg: EngineConfig) -> Self {
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
            })
            .collect();
        OldEngine {
            cfg,
            workload,
            kv,
            reqs,
            waiting: VecDeque::new(),
            running: Vec::new(),
            hit_buf: Vec::new(),
            tok_buf: Vec::new(),
            digest: Digest::new(),
        }
    }

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

    fn priority_key(&self, r: usize) -> (i64, u64, &str) {
        let w = &self.workload.requests[r];
        (w.priority, w.arrival_us, w.id.as_str())
    }

    fn enqueue_by_priority(&mut self, r: usize) {
        let key = self.priority_key(r);
        let at = self
            .waiting
            .partition_point(|&x| self.priority_key(x) < key);
        self.waiting.insert(at, r);
    }

    fn take_victim(&mut self) -> (usize, usize) {
        let index = match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.running.len() - 1,
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
        q.status = Status::Preempted;
        q.num_computed = 0;
        q.num_preemptions += 1;
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_front(r),
            SchedulingPolicy::Priority => self.enqueue_by_priority(r),
        }
    }

    fn step(&mut self, step: u64, start_ns: u64, rec: &mut StepRecord) {
        *rec = StepRecord {
            step,
            ..StepRecord::default()
        };
        let mut budget = self.cfg.max_num_batched_tokens;
        let max_len = self.cfg.max_model_len;
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
                let (victim, index) = self.take_victim();
                if index < i {
                    i -= 1;
                }
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
                if self.cfg.policy == SchedulingPolicy::Priority {
                    continue;
                }
                break;
            }
            rec.scheduled.push((r, n));
            budget -= n;
            i += 1;
        }
        if rec.preempted.is_empty() {
            while budget > 0 {
                let Some(&r) = self.waiting.front() else {
                    break;
                };
                if self.running.len() as u64 >= self.cfg.max_num_seqs {
                    break;
                }
                let q = &self.reqs[r];
                let mut hits = std::mem::take(&mut self.hit_buf);
                let hit_tokens = self
                    .kv
                    .get_computed_blocks(&q.hashes, q.num_tokens, &mut hits);
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
                let q = &mut self.reqs[r];
                let preempted_before = q.num_preemptions > 0;
                let num_tokens = q.num_tokens;
                q.status = Status::Running;
                q.num_computed = hit_tokens;
                self.kv
                    .record_prefix_cache_stats(num_tokens, hit_tokens, preempted_before);
                self.waiting.pop_front();
                self.running.push(r);
                rec.admitted.push((r, hit_tokens));
                rec.scheduled.push((r, n));
                budget -= n;
            }
        }
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
        for k in 0..rec.scheduled.len() {
            let r = rec.scheduled[k].0;
            let q = &mut self.reqs[r];
            if q.num_computed < q.num_tokens {
                continue;
            }
            q.num_tokens += 1;
            q.num_output += 1;
            let stop = q.num_tokens >= max_len || q.num_output >= q.max_tokens;
            if self.cfg.enable_prefix_caching
                && q.num_tokens.is_multiple_of(self.cfg.block_size as u64)
            {
                self.update_hashes(r);
            }
            if stop {
                let q = &mut self.reqs[r];
                q.status = Status::Finished;
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

    /// Runs to the end; Err on a stall. `on_step` sees every logged step.
    pub fn run(&mut self, mut on_step: impl FnMut(&StepRecord)) -> Result<RunSummary, String> {
        let n = self.workload.requests.len();
        let mut sum = RunSummary::default();
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
            finished_last = !rec.finished.is_empty();
            if !rec.scheduled.is_empty() || !rec.preempted.is_empty() {
                sum.steps += 1;
                sum.requests_finished += rec.finished.len() as u64;
                on_step(&rec);
            } else if !self.waiting.is_empty() || !self.running.is_empty() {
                return Err(format!("step {k}: stalled"));
            }
            k += 1;
            now_ns = rec.end_ns;
        }
        sum.output_tokens = self.reqs.iter().map(|q| q.num_output).sum();
        sum.digest = self.digest.hex();
        Ok(sum)
    }
}
