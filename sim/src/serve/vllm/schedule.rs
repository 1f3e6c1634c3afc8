//! vLLM's `Scheduler.schedule()`: the RUNNING requests first, then the WAITING ones (only if
//! nothing was preempted), under one token budget; the waiting queue's order and the choice of
//! preemption victims for FCFS and priority scheduling.

use super::super::step::StepRecord;
use gpumem_core::kv::hash::{
    extend_consecutive_block_hashes_pair, extend_consecutive_block_hashes_quad, ExtraKeys,
};

use super::requests::{Requests, Status};
use super::{SchedulingPolicy, VllmEngine};

impl VllmEngine<'_> {
    /// The RUNNING loop of `schedule()`, in admission order: each request gets its next chunk
    /// (at most the budget, never past `max_model_len`), preempting the lowest-priority running
    /// request (under FCFS the most recently admitted), maybe itself, until its blocks fit.
    /// Returns the budget left.
    pub(super) fn schedule_running(&mut self, rec: &mut StepRecord, mut budget: u64) -> u64 {
        let max_len = self.cfg.max_model_len;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let r = self.running[i];
            let q = self.requests.get(r);
            let n = (q.num_tokens - q.num_computed)
                .min(budget)
                .min(max_len.saturating_sub(q.num_computed + 1));
            if n == 0 {
                i += 1;
                continue;
            }
            let held = self.kv.blocks(r).len();
            let scheduled = loop {
                let slot = self.requests.get(r).slot_request(r);
                if self.kv.allocate_slots(slot, n, 0, &[], false, true) {
                    if self.tier.is_some() {
                        self.note_allocated(r, held);
                    }
                    break true;
                }
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
            rec.scheduled.push((r, n));
            budget -= n;
            i += 1;
        }
        budget
    }

    /// The WAITING loop of `schedule()`: admits requests from the head of the queue while
    /// the budget, `max_num_seqs` and the KV pool allow (head-of-line blocking).
    pub(super) fn schedule_waiting(&mut self, rec: &mut StepRecord, mut budget: u64) {
        while budget > 0 {
            let Some(&r) = self.waiting.front() else {
                break;
            };
            if self.running.len() as u64 >= self.cfg.max_num_seqs {
                break;
            }
            // vLLM hashes a request's blocks when it arrives; hashing it when it is first
            // considered gives the same hashes without holding them while it queues.
            if self.cfg.enable_prefix_caching {
                self.hash_head(r);
            }
            let Some((hit_tokens, n)) = self.try_admit(r, budget) else {
                break;
            };
            self.waiting.pop_front();
            let q = self.requests.get_mut(r);
            debug_assert_eq!(q.num_computed, 0);
            let preempted_before = q.num_preemptions > 0;
            let num_tokens = q.num_tokens;
            q.status = Status::Running;
            q.num_computed = hit_tokens;
            self.kv
                .record_prefix_cache_stats(num_tokens, hit_tokens, preempted_before);
            self.running.push(r);
            rec.admitted_tokens += num_tokens;
            rec.admitted.push((r, hit_tokens));
            rec.scheduled.push((r, n));
            budget -= n;
        }
    }

    /// Hashes the full blocks of `head`, the head of the waiting queue, that are not hashed
    /// yet. The requests after it are considered next: while `head` is hashed, they are
    /// hashed beside it, a few at most (three at a time while three have runs of
    /// consecutive prompt tokens to hash, else one: the chains' multiplications overlap; a
    /// request left part hashed is finished when its turn comes). The hashes are the same
    /// whenever they are made.
    fn hash_head(&mut self, head: usize) {
        /// How far down the queue the other chains go.
        const HASH_AHEAD: usize = 8;
        let bs = self.cfg.block_size;
        let bs64 = bs as u64;
        if self.requests.get(head).is_hashed(bs) {
            return;
        }
        // (slot, first token, blocks) of each request's current run, `head` first; a run is
        // looked up (a few divisions) only when the last one is used up.
        let run_of = |requests: &Requests, r: usize| {
            let q = requests.get(r);
            q.next_run(bs64).map(|(t, n)| (r, t, n))
        };
        let max_len = self.cfg.max_model_len;
        self.requests.get_mut(head).reserve_hashes(bs, max_len);
        let mut group = [(0usize, 0u32, 0u64); 4];
        let Some(first) = run_of(&self.requests, head) else {
            self.requests
                .get_mut(head)
                .update_hashes(bs, &mut self.tok_buf);
            return;
        };
        group[0] = first;
        let mut len = 1;
        let mut k = 1;
        loop {
            while len < 4 && k <= HASH_AHEAD {
                let Some(&next) = self.waiting.get(k) else {
                    break;
                };
                k += 1;
                if let Some(run) = run_of(&self.requests, next) {
                    self.requests.get_mut(next).reserve_hashes(bs, max_len);
                    group[len] = run;
                    len += 1;
                }
            }
            let width = match len {
                4 => 4,
                2 | 3 => 2,
                _ => break,
            };
            let n = group[..width].iter().map(|g| g.2).min().unwrap_or(0);
            if width == 4 {
                let slots = [group[0].0, group[1].0, group[2].0, group[3].0];
                let [a, b, c, d] = self.requests.get_quad_mut(slots);
                extend_consecutive_block_hashes_quad(
                    [
                        (&mut a.hashes, group[0].1),
                        (&mut b.hashes, group[1].1),
                        (&mut c.hashes, group[2].1),
                        (&mut d.hashes, group[3].1),
                    ],
                    bs as usize,
                    n as usize,
                    &ExtraKeys::NONE,
                );
            } else {
                let (a, b) = self.requests.get_pair_mut(group[0].0, group[1].0);
                extend_consecutive_block_hashes_pair(
                    (&mut a.hashes, group[0].1),
                    (&mut b.hashes, group[1].1),
                    bs as usize,
                    n as usize,
                    &ExtraKeys::NONE,
                );
            }
            // Runs advance; a used-up one gives way to the request's next run, or the
            // request leaves the group (`head` leaving ends it).
            let mut kept = 0;
            for i in 0..len {
                let (r, t, left) = group[i];
                let run = if i >= width {
                    Some((r, t, left))
                } else if left > n {
                    Some((r, t.wrapping_add((n * bs64) as u32), left - n))
                } else {
                    run_of(&self.requests, r)
                };
                match run {
                    Some(run) => {
                        group[kept] = run;
                        kept += 1;
                    }
                    None if i == 0 => {
                        kept = 0;
                        break;
                    }
                    None => {}
                }
            }
            if kept == 0 {
                break;
            }
            len = kept;
        }
        self.requests
            .get_mut(head)
            .update_hashes(bs, &mut self.tok_buf);
    }

    /// Allocates the waiting request `r`'s first chunk (at most `budget` tokens after its
    /// prefix hits) if the whole request fits. Its hits are read back (on an executor) only
    /// once the admission is known to succeed; a hit refused there is not counted, and the
    /// request is admitted with the hits before it if it still fits. Returns (hit tokens,
    /// tokens scheduled), or None when it does not fit.
    fn try_admit(&mut self, r: usize, budget: u64) -> Option<(u64, u64)> {
        let q = self.requests.get(r);
        let has_running = !self.running.is_empty();
        // A head refused last step, with nothing since that could let it in: refused again
        // (most steps under pressure; the lookup walked as many blocks as the run allocates).
        if self
            .kv
            .admission_still_refused(q.seq, q.slot_request(r), has_running)
        {
            debug_assert!(
                self.admission_refused_now(r, budget),
                "a refusal remembered for a request the gate now admits"
            );
            return None;
        }
        let mut hits = std::mem::take(&mut self.hit_buf);
        let mut hit_tokens = self
            .kv
            .get_computed_blocks(&q.hashes, q.num_tokens, &mut hits);
        let mut first_pass = true;
        let admitted = loop {
            let n = (q.num_tokens - hit_tokens).min(budget);
            let slot = q.slot_request(r);
            if !self
                .kv
                .can_allocate_slots(slot, n, hit_tokens, &hits, true, has_running)
            {
                // The hits as the lookup gave them (none read back and cut yet).
                if first_pass {
                    self.kv.note_refused_admission(q.seq, slot, &hits);
                }
                break None;
            }
            first_pass = false;
            let verified = self.kv.read_back_hits(&q.hashes, &mut hits);
            if verified == hit_tokens {
                let done = self
                    .kv
                    .allocate_slots(slot, n, hit_tokens, &hits, true, has_running);
                assert!(
                    done,
                    "allocate_slots refused what can_allocate_slots allowed"
                );
                break Some((hit_tokens, n));
            }
            hit_tokens = verified;
        };
        self.hit_buf = hits;
        admitted
    }

    /// Whether the lookup and the checks of [`try_admit`](Self::try_admit) refuse `r` now
    /// (for debug checks of a remembered refusal).
    fn admission_refused_now(&self, r: usize, budget: u64) -> bool {
        let q = self.requests.get(r);
        let mut hits = Vec::new();
        let hit_tokens = self
            .kv
            .get_computed_blocks(&q.hashes, q.num_tokens, &mut hits);
        let n = (q.num_tokens - hit_tokens).min(budget);
        !self.kv.can_allocate_slots(
            q.slot_request(r),
            n,
            hit_tokens,
            &hits,
            true,
            !self.running.is_empty(),
        )
    }

    /// Adds `slot` to the waiting queue: at the back (FCFS) or in priority order.
    pub(super) fn enqueue_waiting(&mut self, slot: usize) {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_back(slot),
            SchedulingPolicy::Priority => self.enqueue_by_priority(slot),
        }
    }

    /// The priority queue (a heap in vLLM): requests are popped in key order.
    fn enqueue_by_priority(&mut self, slot: usize) {
        let requests = &self.requests;
        let key = requests.get(slot).priority_key();
        let at = self
            .waiting
            .partition_point(|&x| requests.get(x).priority_key() < key);
        self.waiting.insert(at, slot);
    }

    /// Takes the request to preempt out of `running`: the last admitted (FCFS) or the one with
    /// the highest priority key. Returns it and its index.
    fn take_victim(&mut self) -> (usize, usize) {
        let index = match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.running.len() - 1,
            // vLLM's `max(running, key=(priority, arrival_time))`: no id in the key, and the
            // first of equal keys in running order wins.
            SchedulingPolicy::Priority => {
                let key = |slot: usize| {
                    let (priority, arrival, _) = self.requests.get(slot).priority_key();
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

    /// Preemption by recompute: the request frees its blocks and waits again, at the front
    /// (FCFS) or in priority order.
    fn preempt(&mut self, slot: usize) {
        if self.tier.is_some() {
            self.unmark_inflight(slot);
        }
        self.kv.free(slot);
        let q = self.requests.get_mut(slot);
        debug_assert_eq!(q.status, Status::Running);
        q.status = Status::Preempted;
        q.num_computed = 0;
        q.num_preemptions += 1;
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_front(slot),
            SchedulingPolicy::Priority => self.enqueue_by_priority(slot),
        }
    }
}
