//! The engine's paths through vLLM's KV connector, taken only with a CPU tier: the WAITING
//! loop with lookups past the GPU hit and asynchronous loads, `build_connector_meta` after
//! `schedule()`, and the worker phase.
//!
//! The WAITING loop with a connector (vLLM's `schedule()`): requests that hold KV blocks while
//! they wait (loading, or loaded and not yet running) are in their own queue, drained first.
//! A request whose load is still in flight, or whose lookup the connector defers, is skipped:
//! it leaves the queue for this step and the loop goes on with the next one; at the end the
//! skipped requests return to the front of their queues in the order they were skipped. A
//! lookup that hits the CPU tier admits the request asynchronously: its blocks are allocated
//! (only if they fit beside what the other in-flight prefills still need), it is not
//! scheduled, and it waits in `WAITING_FOR_REMOTE_KVS` until its load is reported; then its
//! loaded blocks are cached and it runs from `min(hit, num_tokens - 1)`.

use std::collections::VecDeque;

use gpumem_core::kv::offload::{
    FinishedRequest, JobId, OffloadConfig, OffloadConnector, OffloadReqId, ScheduledRequest,
    StepJobs,
};
use gpumem_core::kv::{Admission, BlockId};

use super::super::step::StepRecord;
use super::offload::{OffloadEngineConfig, Worker};
use super::requests::Status;
use super::{SchedulingPolicy, VllmEngine};

/// The engine's CPU tier: the connector (scheduler side), the worker, and the state vLLM's
/// scheduler keeps only with a connector.
pub(super) struct Tier {
    pub connector: OffloadConnector,
    worker: Worker,
    /// Waiting requests that hold KV blocks (`kv_holding_waiting`), drained before `waiting`.
    pub kv_holding: VecDeque<usize>,
    /// Requests whose prefill (or load) is in flight (`_inflight_prefills`).
    pub inflight: Vec<usize>,
    /// Engine steps run (the copy engine's step clock).
    engine_steps: u64,
    done: Vec<JobId>,
    /// Admissions whose load hit the tier, and the tokens it held for them.
    pub cpu_hit_admissions: u64,
    pub cpu_hit_tokens: u64,
}

impl Tier {
    pub fn new(
        o: OffloadEngineConfig,
        gpu_block_size: u32,
        num_gpu_blocks: u32,
        prefix_caching: bool,
    ) -> Tier {
        let cfg = OffloadConfig {
            num_chunks: o.cpu_blocks,
            blocks_per_chunk: o.block_size / gpu_block_size,
            block_size: gpu_block_size,
            policy: o.policy,
            prompt_only: o.prompt_only,
            prefix_caching,
        };
        Tier {
            connector: OffloadConnector::new(cfg, num_gpu_blocks),
            worker: Worker::new(o.timing),
            kv_holding: VecDeque::new(),
            inflight: Vec::new(),
            engine_steps: 0,
            done: Vec::new(),
            cpu_hit_admissions: 0,
            cpu_hit_tokens: 0,
        }
    }

    /// When the next transfer ends, on a link clock.
    pub fn next_done_ns(&self) -> Option<u64> {
        self.worker.next_done_ns()
    }

    fn discard_inflight(&mut self, slot: usize) {
        if let Some(i) = self.inflight.iter().position(|&s| s == slot) {
            self.inflight.swap_remove(i);
        }
    }
}

/// How one waiting request fared in the loop.
enum Outcome {
    /// Scheduled with this many tokens.
    Scheduled(u64),
    /// Admitted; its load is in flight.
    Loading,
    /// Skipped this step (load in flight, or the connector deferred it).
    Skip,
    /// Its blocks do not fit: the loop stops.
    NoRoom,
}

impl VllmEngine<'_> {
    fn tier(&mut self) -> &mut Tier {
        self.tier.as_mut().expect("a CPU tier")
    }

    /// The WAITING loop with a connector; see the module documentation.
    pub(super) fn schedule_waiting_tier(&mut self, rec: &mut StepRecord, mut budget: u64) {
        let mut skipped_holding: Vec<usize> = Vec::new();
        let mut skipped_waiting: Vec<usize> = Vec::new();
        while budget > 0 {
            let from_holding = !self.tier().kv_holding.is_empty();
            let front = if from_holding {
                self.tier().kv_holding.front().copied()
            } else {
                self.waiting.front().copied()
            };
            let Some(r) = front else { break };
            if self.running.len() as u64 >= self.cfg.max_num_seqs {
                break;
            }
            let outcome = self.consider(r, budget, rec);
            let pop = |e: &mut Self| {
                if from_holding {
                    e.tier().kv_holding.pop_front();
                } else {
                    e.waiting.pop_front();
                }
            };
            match outcome {
                Outcome::NoRoom => break,
                Outcome::Skip | Outcome::Loading => {
                    pop(self);
                    if self.requests.get(r).holds_kv() {
                        skipped_holding.push(r);
                    } else {
                        skipped_waiting.push(r);
                    }
                }
                Outcome::Scheduled(n) => {
                    pop(self);
                    self.running.push(r);
                    rec.scheduled.push((r, n));
                    budget -= n;
                }
            }
        }
        self.requeue(skipped_holding, true);
        self.requeue(skipped_waiting, false);
    }

    /// Skipped requests back at the front of their queue, in the order they were skipped (a
    /// priority queue takes them by key).
    fn requeue(&mut self, slots: Vec<usize>, holding: bool) {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => {
                let q = if holding {
                    &mut self.tier.as_mut().expect("a CPU tier").kv_holding
                } else {
                    &mut self.waiting
                };
                for &s in slots.iter().rev() {
                    q.push_front(s);
                }
            }
            SchedulingPolicy::Priority => {
                for s in slots {
                    let key = self.requests.get(s).priority_key();
                    let requests = &self.requests;
                    let q = if holding {
                        &mut self.tier.as_mut().expect("a CPU tier").kv_holding
                    } else {
                        &mut self.waiting
                    };
                    let at = q.partition_point(|&x| requests.get(x).priority_key() < key);
                    q.insert(at, s);
                }
            }
        }
    }

    /// One waiting request at the head of its queue.
    fn consider(&mut self, r: usize, budget: u64, rec: &mut StepRecord) -> Outcome {
        let q = self.requests.get_mut(r);
        if q.status == Status::WaitingForRemoteKvs {
            let Some(valid) = q.load_done.take() else {
                return Outcome::Skip;
            };
            self.promote(r, valid);
        }
        if self.requests.get(r).num_computed == 0 {
            self.admit_fresh(r, budget, rec)
        } else {
            self.admit_loaded(r, budget)
        }
    }

    /// vLLM's `_update_waiting_for_remote_kv` and promotion: the loaded blocks are cached, and
    /// a load that reached the last token recomputes it. A load whose copy was refused keeps
    /// what it delivered (vLLM's `recompute` policy for invalid blocks); nothing at all, and
    /// the request gives its blocks back and is looked up afresh.
    fn promote(&mut self, r: usize, valid: Option<u64>) {
        let q = self.requests.get_mut(r);
        if let Some(valid) = valid {
            q.num_computed = q.num_computed.min(valid);
        }
        let slot = q.slot_request(r);
        if q.num_computed > 0 {
            self.kv.cache_computed(slot, q.num_computed);
        } else {
            self.kv.free(r);
        }
        let q = self.requests.get_mut(r);
        if q.num_computed == q.num_tokens {
            q.num_computed = q.num_tokens - 1;
        }
        q.status = if q.num_preemptions > 0 {
            Status::Preempted
        } else {
            Status::Waiting
        };
    }

    /// Blocks the in-flight prefills still need (`_inflight_prefill_reserved_blocks`).
    fn inflight_reserved(&self) -> u64 {
        let tier = self.tier.as_ref().expect("a CPU tier");
        tier.inflight
            .iter()
            .map(|&s| self.kv.remaining_blocks(s, self.requests.get(s).num_tokens))
            .sum()
    }

    /// A request with nothing computed: the GPU lookup, the connector's lookup past it, and
    /// the admission (scheduled, or loading).
    fn admit_fresh(&mut self, r: usize, budget: u64, rec: &mut StepRecord) -> Outcome {
        let q = self.requests.get_mut(r);
        // A connector hashes every request (vLLM's EngineCore does), prefix caching or not.
        q.update_hashes(self.cfg.block_size, &mut self.tok_buf);
        let q = self.requests.get(r);
        let id = q.offload.expect("a request known to the connector");
        let has_running = !self.running.is_empty();
        let mut hits = std::mem::take(&mut self.hit_buf);
        let mut local = self
            .kv
            .get_computed_blocks(&q.hashes, q.num_tokens, &mut hits);
        let admitted = loop {
            let lookup = self
                .tier
                .as_mut()
                .expect("a CPU tier")
                .connector
                .get_num_new_matched_tokens(id, &q.hashes, q.num_tokens, local);
            let Some(external) = lookup else {
                break None;
            };
            let loading = external > 0;
            let num_new = if loading {
                0
            } else {
                (q.num_tokens - local).min(budget)
            };
            let reserved = if loading { self.inflight_reserved() } else { 0 };
            let base: Admission<'static> = Admission {
                num_new_tokens: num_new,
                hit_tokens: local,
                hits: &[],
                external_tokens: external,
                reserved_blocks: reserved,
                delay_cache: loading,
                full_sequence_must_fit: true,
                has_scheduled_reqs: has_running,
            };
            let slot = q.slot_request(r);
            if !self.kv.can_admit(
                slot,
                &Admission {
                    hits: &hits,
                    ..base
                },
            ) {
                break Some(None);
            }
            let verified = self.kv.read_back_hits(&q.hashes, &mut hits);
            if verified != local {
                local = verified;
                continue;
            }
            let done = self.kv.admit(
                slot,
                &Admission {
                    hits: &hits,
                    ..base
                },
            );
            assert!(done, "admit refused what can_admit allowed");
            break Some(Some((external, num_new)));
        };
        self.hit_buf = hits;
        let Some(admitted) = admitted else {
            return Outcome::Skip;
        };
        let Some((external, num_new)) = admitted else {
            return Outcome::NoRoom;
        };
        let q = self.requests.get(r);
        let (tables, exec) = self.kv.tables_and_executor();
        let tier = self.tier.as_mut().expect("a CPU tier");
        tier.connector
            .update_state_after_alloc(id, &q.hashes, &tables[r], external, exec);
        if external > 0 {
            tier.cpu_hit_admissions += 1;
            tier.cpu_hit_tokens += external;
        }
        let q = self.requests.get_mut(r);
        let preempted_before = q.num_preemptions > 0;
        let num_tokens = q.num_tokens;
        self.kv
            .record_prefix_cache_stats(num_tokens, local, preempted_before);
        rec.admitted.push((r, local));
        rec.admitted_cpu.push(external);
        rec.admitted_tokens += num_tokens;
        let q = self.requests.get_mut(r);
        if external > 0 {
            q.status = Status::WaitingForRemoteKvs;
            q.num_computed = local + external;
            self.mark_inflight(r);
            return Outcome::Loading;
        }
        q.status = Status::Running;
        q.num_computed = local;
        if local + num_new < num_tokens {
            self.mark_inflight(r);
        }
        Outcome::Scheduled(num_new)
    }

    /// A loaded request, promoted: it is scheduled from what was loaded, if its blocks fit.
    fn admit_loaded(&mut self, r: usize, budget: u64) -> Outcome {
        let q = self.requests.get(r);
        let num_new = (q.num_tokens - q.num_computed).min(budget);
        debug_assert!(num_new > 0);
        let a = Admission {
            num_new_tokens: num_new,
            hit_tokens: 0,
            hits: &[],
            external_tokens: 0,
            reserved_blocks: 0,
            delay_cache: false,
            full_sequence_must_fit: true,
            has_scheduled_reqs: !self.running.is_empty(),
        };
        if !self.kv.admit(q.slot_request(r), &a) {
            return Outcome::NoRoom;
        }
        let id = q.offload.expect("a request known to the connector");
        let (tables, exec) = self.kv.tables_and_executor();
        let tier = self.tier.as_mut().expect("a CPU tier");
        tier.connector
            .update_state_after_alloc(id, &q.hashes, &tables[r], 0, exec);
        let q = self.requests.get_mut(r);
        q.status = Status::Running;
        if q.num_computed + num_new < q.num_tokens {
            self.mark_inflight(r);
        }
        Outcome::Scheduled(num_new)
    }

    fn mark_inflight(&mut self, r: usize) {
        let q = self.requests.get_mut(r);
        if !q.inflight {
            q.inflight = true;
            self.tier().inflight.push(r);
        }
    }

    /// Takes `r` out of the in-flight prefills (its prefill completed, or it left).
    pub(super) fn unmark_inflight(&mut self, r: usize) {
        let q = self.requests.get_mut(r);
        if q.inflight {
            q.inflight = false;
            self.tier().discard_inflight(r);
        }
    }

    /// The blocks a running request was just given (flushes watch them).
    pub(super) fn note_allocated(&mut self, r: usize, before: usize) {
        let blocks: &[BlockId] = &self.kv.blocks(r)[before..];
        if let Some(tier) = self.tier.as_mut() {
            tier.connector.note_allocated(blocks);
        }
    }

    /// vLLM's `build_connector_meta` after `schedule()`.
    pub(super) fn build_connector_meta(&mut self, rec: &StepRecord) -> StepJobs {
        let requests = &self.requests;
        let (tables, exec) = self.kv.tables_and_executor();
        let scheduled: Vec<ScheduledRequest<'_>> = rec
            .scheduled
            .iter()
            .map(|&(r, n)| {
                let q = requests.get(r);
                ScheduledRequest {
                    id: q.offload.expect("a request known to the connector"),
                    num_computed: q.num_computed,
                    num_scheduled: n,
                    num_tokens: q.num_tokens,
                    num_prompt: q.num_prompt,
                    hashes: &q.hashes,
                    blocks: &tables[r],
                }
            })
            .collect();
        let preempted: Vec<OffloadReqId> = rec
            .preempted
            .iter()
            .map(|&r| {
                requests
                    .get(r)
                    .offload
                    .expect("a request known to the connector")
            })
            .collect();
        let tier = self.tier.as_mut().expect("a CPU tier");
        tier.connector
            .build_connector_meta(&scheduled, &preempted, exec)
    }

    /// The worker phase at `now_ns`; returns when the step's forward pass starts.
    pub(super) fn run_worker(&mut self, jobs: StepJobs, now_ns: u64) -> u64 {
        let tier = self.tier();
        let mut done = std::mem::take(&mut tier.done);
        done.clear();
        let start = tier
            .worker
            .run_step(jobs, tier.engine_steps, now_ns, &mut done);
        tier.engine_steps += 1;
        tier.done = done;
        start
    }

    /// vLLM's `request_finished`, before the request's blocks are freed.
    pub(super) fn connector_request_finished(&mut self, r: usize) {
        self.unmark_inflight(r);
        let q = self.requests.get_mut(r);
        let id = q.offload.expect("a request known to the connector");
        let fin = FinishedRequest {
            hashes: std::mem::take(&mut q.hashes),
            blocks: self.kv.blocks(r).to_vec(),
            num_tokens: q.num_tokens,
            num_prompt: q.num_prompt,
        };
        let exec = self.kv.placed_executor();
        self.tier
            .as_mut()
            .expect("a CPU tier")
            .connector
            .request_finished(id, fin, exec);
    }

    /// `update_connector_output` with the jobs the worker reported, and `finished_recving`.
    pub(super) fn connector_output(&mut self, rec: &mut StepRecord) {
        let tier = self.tier.as_mut().expect("a CPU tier");
        let done = std::mem::take(&mut tier.done);
        let loads = tier.connector.update_connector_output(&done);
        rec.transfers_done = done.len() as u64;
        tier.done = done;
        for l in loads {
            let q = self.requests.get_mut(l.slot);
            debug_assert_eq!(q.status, Status::WaitingForRemoteKvs);
            q.load_done = Some(l.valid_tokens);
        }
    }
}
