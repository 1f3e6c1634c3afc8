//! What one request did to the CPU tier, as vLLM's `CPUOffloadingManager` records it per
//! request (`_RequestCacheAccess`, and the LRU policy's `_RequestRank`): which of its chunks it
//! has observed (offered for storing while absent or ready, or loaded), which it inserted,
//! which it reused (a ready chunk it offered or loaded, not one it inserted itself), which
//! store misses the ARC policy has already learnt from, and its LRU rank.
//!
//! Chunks are named by their index in the request (a key has one position in a request: keys
//! are prefix hashes), so every record is a flag per index. The record lives as long as the
//! request, preemptions included.

/// Flags of one chunk index.
const SEEN: u8 = 1;
const INSERTED: u8 = 2;
const REUSED: u8 = 4;
const STORE_MISS: u8 = 8;

/// See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestAccess {
    flags: Vec<u8>,
    /// The LRU policy's rank for this request, taken when the policy first sees it.
    pub(crate) lru_rank: Option<u64>,
    /// `on_request_finished` ran: no more observations.
    pub(crate) finished: bool,
}

impl RequestAccess {
    pub fn new() -> Self {
        RequestAccess::default()
    }

    fn flag(&self, idx: u32) -> u8 {
        self.flags.get(idx as usize).copied().unwrap_or(0)
    }

    fn set(&mut self, idx: u32, f: u8) {
        let i = idx as usize;
        if i >= self.flags.len() {
            self.flags.resize(i + 1, 0);
        }
        self.flags[i] |= f;
    }

    pub fn seen(&self, idx: u32) -> bool {
        self.flag(idx) & SEEN != 0
    }

    /// Marks `idx` observed; true when it is the first observation.
    pub(crate) fn observe(&mut self, idx: u32) -> bool {
        assert!(
            !self.finished,
            "a chunk observed after the request's finish was signalled"
        );
        let first = !self.seen(idx);
        self.set(idx, SEEN);
        first
    }

    pub fn inserted(&self, idx: u32) -> bool {
        self.flag(idx) & INSERTED != 0
    }

    pub(crate) fn mark_inserted(&mut self, idx: u32) {
        self.set(idx, INSERTED);
    }

    pub fn reused(&self, idx: u32) -> bool {
        self.flag(idx) & REUSED != 0
    }

    /// A reuse, unless this request inserted the chunk itself (re-reading what it stored is no
    /// second access, as vLLM counts it).
    pub(crate) fn mark_reused(&mut self, idx: u32) {
        if !self.inserted(idx) {
            self.set(idx, REUSED);
        }
    }

    pub(crate) fn store_missed(&self, idx: u32) -> bool {
        self.flag(idx) & STORE_MISS != 0
    }

    pub(crate) fn mark_store_miss(&mut self, idx: u32) {
        self.set(idx, STORE_MISS);
    }

    /// Indices observed, in decreasing order (tail to head, as vLLM walks them when the
    /// request finishes).
    pub fn observed_desc(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.flags.len() as u32)
            .rev()
            .filter(|&i| self.flags[i as usize] & SEEN != 0)
    }

    /// Memory kept per request, in bytes (one per chunk index up to the last observed).
    pub fn footprint(&self) -> usize {
        self.flags.capacity()
    }
}
