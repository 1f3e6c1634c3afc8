//! The engine's live requests: those waiting, running or finished by the last step. Each lives
//! in a slot (a dense index the KV manager's block tables use too); a slot is reused once its
//! request has finished and its last step has been read, so the engine's memory follows the
//! requests in flight, never the length of the trace.

use gpumem_core::kv::hash::{extend_consecutive_block_hashes, hash_request_block, ExtraKeys};
use gpumem_core::kv::offload::OffloadReqId;
use gpumem_core::kv::{full_blocks, BlockHash, SlotRequest};

use super::super::workload::WorkloadRequest;

/// Most tokens made at once for hashing (bounds the scratch buffer, 32 KiB).
const HASH_BATCH_TOKENS: u64 = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Waiting,
    Running,
    Preempted,
    /// Admitted with blocks whose KV a CPU-tier load fills (vLLM's `WAITING_FOR_REMOTE_KVS`).
    WaitingForRemoteKvs,
    Finished,
}

/// One request in flight (vLLM's `Request`).
#[derive(Clone, Debug)]
pub(super) struct Req {
    /// Position in arrival order among the requests added (0-based): names the request in the
    /// digest and numbers its generated tokens.
    pub seq: u64,
    pub input: WorkloadRequest,
    pub num_prompt: u64,
    /// Prompt and output tokens so far.
    pub num_tokens: u64,
    pub num_computed: u64,
    pub num_output: u64,
    /// Hashes of the full blocks (filled when the request is first considered for admission).
    pub hashes: Vec<BlockHash>,
    pub status: Status,
    pub num_preemptions: u32,
    pub first_token_ns: Option<u64>,
    /// With a CPU tier: the request as the connector knows it.
    pub offload: Option<OffloadReqId>,
    /// Its load completed (`finished_recving`): with the tokens it really delivered when a
    /// copy was refused.
    pub load_done: Option<Option<u64>>,
    /// In vLLM's `_inflight_prefills` (its prefill, or its load, is not done).
    pub inflight: bool,
}

impl Req {
    pub fn new(seq: u64, input: WorkloadRequest) -> Req {
        let num_prompt = input.prompt.len();
        Req {
            seq,
            input,
            num_prompt,
            num_tokens: num_prompt,
            num_computed: 0,
            num_output: 0,
            hashes: Vec::new(),
            status: Status::Waiting,
            num_preemptions: 0,
            first_token_ns: None,
            offload: None,
            load_done: None,
            inflight: false,
        }
    }

    /// Holds KV blocks while it waits (vLLM's `_holds_kv_blocks`).
    pub fn holds_kv(&self) -> bool {
        self.num_computed > 0 || self.status == Status::WaitingForRemoteKvs
    }

    /// What the KV manager needs of the request in slot `slot`.
    pub fn slot_request(&self, slot: usize) -> SlotRequest<'_> {
        SlotRequest {
            req: slot,
            num_tokens: self.num_tokens,
            num_computed_tokens: self.num_computed,
            block_hashes: &self.hashes,
            waiting: matches!(self.status, Status::Waiting | Status::Preempted),
        }
    }

    /// Tokens `start..end` into `out` (prompt, then generated tokens by the contract's rule).
    fn fill_tokens(&self, start: u64, end: u64, out: &mut Vec<u32>) {
        out.clear();
        let np = self.num_prompt;
        if start < np {
            self.input.prompt.fill(start, end.min(np), out);
        }
        for j in start.max(np)..end {
            out.push(WorkloadRequest::generated_token(self.seq as usize, j - np));
        }
    }

    /// Hashes the full blocks not hashed yet (vLLM's request block hasher). A block of
    /// consecutive prompt tokens (the Mooncake form) is hashed from its first token; others
    /// from their tokens, made in batches of up to [`HASH_BATCH_TOKENS`] in `tokens`.
    pub fn update_hashes(&mut self, block_size: u32, tokens: &mut Vec<u32>) {
        let bs = block_size as u64;
        let num_full = full_blocks(self.num_tokens, bs);
        let per_batch = (HASH_BATCH_TOKENS / bs).max(1);
        self.hashes
            .reserve((num_full as usize).saturating_sub(self.hashes.len()));
        while (self.hashes.len() as u64) < num_full {
            let first = self.hashes.len() as u64;
            // A run of consecutive prompt tokens: every full block in it, one division for
            // the run.
            if let Some((t, run)) = self.input.prompt.consecutive_run(first * bs) {
                let n = full_blocks(run, bs).min(num_full - first);
                if n > 0 {
                    extend_consecutive_block_hashes(
                        &mut self.hashes,
                        t,
                        bs as usize,
                        n as usize,
                        &ExtraKeys::NONE,
                    );
                    continue;
                }
            }
            let last = num_full.min(first + per_batch);
            self.fill_tokens(first * bs, last * bs, tokens);
            for block in tokens.chunks_exact(bs as usize) {
                let parent = self.hashes.last().copied();
                let h = hash_request_block(parent, self.hashes.len(), block, &ExtraKeys::NONE);
                self.hashes.push(h);
            }
        }
    }

    /// Whether every full block is hashed.
    pub fn is_hashed(&self, block_size: u32) -> bool {
        self.hashes.len() as u64 == full_blocks(self.num_tokens, block_size as u64)
    }

    /// The next blocks to hash when they are consecutive prompt tokens: the first token and
    /// how many full blocks the run holds; None when done or the next block is not such.
    pub fn next_run(&self, bs: u64) -> Option<(u32, u64)> {
        let num_full = full_blocks(self.num_tokens, bs);
        let first = self.hashes.len() as u64;
        if first >= num_full {
            return None;
        }
        let (t, run) = self.input.prompt.consecutive_run(first * bs)?;
        let n = full_blocks(run, bs).min(num_full - first);
        (n > 0).then_some((t, n))
    }

    /// Room for the hashes of every full block the request will have, its output's
    /// included (it runs to `max_tokens` or `max_model_len`), at once: runs are short (a
    /// Mooncake hash id is 32 blocks), and growing run by run, then block by block as it
    /// decodes, reallocated and copied a long prompt's hashes.
    pub fn reserve_hashes(&mut self, block_size: u32, max_model_len: u64) {
        let tokens = self
            .num_prompt
            .saturating_add(self.input.max_tokens)
            .min(max_model_len)
            .max(self.num_tokens);
        let num_full = (tokens / block_size as u64) as usize;
        self.hashes
            .reserve(num_full.saturating_sub(self.hashes.len()));
    }

    /// vLLM's `Request.__lt__` key: priority, then arrival time, then request id.
    pub fn priority_key(&self) -> (i64, u64, &str) {
        (
            self.input.priority,
            self.input.arrival_us,
            self.input.id.as_str(),
        )
    }
}

/// The slots of the live requests; the slot freed last is reused first (a stack:
/// deterministic, and it keeps the slots dense).
#[derive(Debug, Default)]
pub(super) struct Requests {
    slots: Vec<Option<Req>>,
    free: Vec<usize>,
}

impl Requests {
    /// Puts `req` in a free slot and returns the slot.
    pub fn insert(&mut self, req: Req) -> usize {
        match self.free.pop() {
            Some(slot) => {
                debug_assert!(self.slots[slot].is_none());
                self.slots[slot] = Some(req);
                slot
            }
            None => {
                self.slots.push(Some(req));
                self.slots.len() - 1
            }
        }
    }

    /// Drops the request in `slot`; the slot is reused.
    pub fn remove(&mut self, slot: usize) {
        debug_assert!(self.slots[slot].is_some());
        self.slots[slot] = None;
        self.free.push(slot);
    }

    #[inline]
    pub fn get(&self, slot: usize) -> &Req {
        self.slots[slot].as_ref().expect("a live request's slot")
    }

    #[inline]
    pub fn get_mut(&mut self, slot: usize) -> &mut Req {
        self.slots[slot].as_mut().expect("a live request's slot")
    }

    /// The requests in two different slots.
    pub fn get_pair_mut(&mut self, a: usize, b: usize) -> (&mut Req, &mut Req) {
        assert_ne!(a, b, "two different slots");
        let (lo, hi) = (a.min(b), a.max(b));
        let (left, right) = self.slots.split_at_mut(hi);
        let (x, y) = (
            left[lo].as_mut().expect("a live request's slot"),
            right[0].as_mut().expect("a live request's slot"),
        );
        if a < b {
            (x, y)
        } else {
            (y, x)
        }
    }

    /// The requests in four different slots.
    pub fn get_quad_mut(&mut self, slots: [usize; 4]) -> [&mut Req; 4] {
        self.slots
            .get_disjoint_mut(slots)
            .expect("four different slots")
            .map(|r| r.as_mut().expect("a live request's slot"))
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}
