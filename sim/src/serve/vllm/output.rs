//! After `schedule()`: vLLM's `_update_after_schedule` (computed counts advance optimistically,
//! the step's work is measured for the cost model) and `update_from_output` (one token for
//! each request whose prefill is complete; stops at `max_tokens` or `max_model_len`, finished
//! requests free their blocks in output order). Both feed the engine's digest.

use gpumem_core::kv::ends_block;

use super::super::cost::StepWork;
use super::super::step::StepRecord;
use super::requests::Status;
use super::{RequestOutcome, VllmEngine};

impl VllmEngine<'_> {
    /// vLLM's `_update_after_schedule`: every scheduled request's computed tokens advance by
    /// what was scheduled. Returns the step's work.
    pub(super) fn update_after_schedule(&mut self, rec: &StepRecord) -> StepWork {
        let mut work = StepWork::default();
        let d = &mut self.digest;
        d.word(rec.step);
        d.word(rec.scheduled.len() as u64);
        for &(r, n) in &rec.scheduled {
            let q = self.requests.get_mut(r);
            work.add(q.num_computed, n);
            q.num_computed += n;
            let table = self.kv.blocks(r);
            d.word(q.seq);
            d.word(n);
            d.word(table.len() as u64);
            d.word(table.last().map_or(0, |&b| b as u64));
        }
        if self.tier.is_some() {
            // Out of the in-flight prefills once their prefill is complete.
            for &(r, _) in &rec.scheduled {
                let q = self.requests.get(r);
                if q.inflight && q.num_computed >= q.num_tokens {
                    self.unmark_inflight(r);
                }
            }
        }
        work
    }

    /// vLLM's `update_from_output`: one token for each scheduled request whose prefill is
    /// complete, at the end of the step; requests that stop finish and free their blocks.
    pub(super) fn update_from_output(&mut self, rec: &mut StepRecord) {
        let max_len = self.cfg.max_model_len;
        let bs = self.cfg.block_size as u64;
        let end_ns = rec.end_ns;
        for k in 0..rec.scheduled.len() {
            let r = rec.scheduled[k].0;
            let q = self.requests.get_mut(r);
            if q.num_computed < q.num_tokens {
                continue;
            }
            q.num_tokens += 1;
            q.num_output += 1;
            q.first_token_ns.get_or_insert(end_ns);
            let stop = q.num_tokens >= max_len || q.num_output >= q.input.max_tokens;
            let hashing = self.cfg.enable_prefix_caching || self.tier.is_some();
            if hashing && ends_block(q.num_tokens, bs) {
                q.update_hashes(self.cfg.block_size, &mut self.tok_buf);
            }
            if stop {
                q.status = Status::Finished;
                if self.tier.is_some() {
                    self.connector_request_finished(r);
                }
                let q = self.requests.get_mut(r);
                q.hashes = Vec::new();
                rec.outcomes.push(RequestOutcome {
                    arrival_ns: q.input.arrival_us * 1000,
                    first_token_ns: q.first_token_ns.unwrap_or(end_ns),
                    finish_ns: end_ns,
                    prompt_tokens: q.num_prompt,
                    output_tokens: q.num_output,
                    preemptions: q.num_preemptions,
                });
                self.kv.free(r);
                rec.finished.push(r);
            }
        }
        if !rec.finished.is_empty() {
            let requests = &self.requests;
            self.running
                .retain(|&r| requests.get(r).status != Status::Finished);
        }
        if self.tier.is_some() {
            self.connector_output(rec);
        }
        rec.free_blocks = self.kv.num_free_blocks();
        let c = self.kv.pool_mut().take_counters();
        rec.stored = c.stored;
        rec.removed = c.removed;
        rec.running = self.running.len() as u64;
        rec.waiting = self.waiting.len() as u64;
        if let Some(tier) = self.tier.as_mut() {
            rec.waiting += tier.kv_holding.len() as u64;
            rec.offload = Some(tier.connector.take_step_counts());
        }
        self.digest_outcome(rec);
    }

    /// The step's outcome, after its output, into the digest.
    fn digest_outcome(&mut self, rec: &StepRecord) {
        let seq = |r: usize| self.requests.get(r).seq;
        let d = &mut self.digest;
        d.word(rec.preempted.len() as u64);
        rec.preempted.iter().for_each(|&r| d.word(seq(r)));
        d.word(rec.admitted.len() as u64);
        for &(r, h) in &rec.admitted {
            d.word(seq(r));
            d.word(h);
        }
        d.word(rec.finished.len() as u64);
        rec.finished.iter().for_each(|&r| d.word(seq(r)));
        d.word(rec.free_blocks as u64);
        d.word(rec.stored);
        d.word(rec.removed);
        // Only with a CPU tier, so that runs without one keep their digests.
        if let Some(o) = rec.offload {
            rec.admitted_cpu.iter().for_each(|&h| d.word(h));
            d.word(o.offload_stored);
            d.word(o.offload_loaded);
            d.word(o.cpu_stored);
            d.word(o.cpu_evicted);
        }
    }
}
