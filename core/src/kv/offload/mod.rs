//! The KV cache's CPU tier, exact to vLLM 0.33.0's `OffloadingConnector` (native backend,
//! `CPUOffloadingSpec`, one worker, one full-attention KV group).
//!
//! A CPU block ("chunk") holds `blocks_per_chunk` consecutive GPU blocks of a request; its key
//! is the prefix hash of its last block (vLLM's `OffloadKey` for group 0). The parts, each a
//! pure state machine:
//!
//! - [`manager`]: `CPUOffloadingManager` — the tier's chunk slots (fresh slots first, then a
//!   LIFO free list), the key → slot index ([`key_index`]), reference counts (`-1` while a store is in flight,
//!   then the number of loads reading it), `lookup` (miss / hit / pending), `prepare_store`
//!   (evicts exactly the shortage), `complete_store`, `prepare_load`, `complete_load`, the
//!   per-request record of which chunks a request stored or reused ([`access`]), and the
//!   CPU-tier events (chunks stored, chunks evicted);
//! - [`policy`]: the two eviction policies vLLM ships, behind one enum: [`lru`] (ranks by
//!   request and position, committed tail to head when a request finishes) and [`arc`]
//!   (adaptive replacement with ghost lists);
//! - [`connector`]: `OffloadingConnectorScheduler` — the lookups past the GPU hit at
//!   admission, the load job of an admission, the store jobs of a step
//!   (`build_connector_meta`), the flushes (stores whose GPU blocks are handed out again, or
//!   whose request was preempted), job completion; placed on an executor, every store and load
//!   is a `Transfer` between the GPU pool and the tier's pinned host segment.
//!
//! Time is not here: when a job completes is the copy engine's business (`gpumem-sim`).

pub mod access;
pub mod arc;
pub mod connector;
pub mod idx_set;
pub mod key_index;
pub mod lru;
pub mod manager;
pub mod policy;
pub mod queue;

use serde::{Deserialize, Serialize};

pub use access::RequestAccess;
pub use connector::{
    FinishedRequest, JobId, OffloadConnector, OffloadPlacement, OffloadReqId, OffloadStepCounts,
    ScheduledRequest, StepJobs,
};
pub use manager::{CpuOffloadManager, LookupResult};
pub use policy::OffloadPolicyKind;

/// The CPU tier's shape, as vLLM's `OffloadingConnector` is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadConfig {
    /// Chunk slots in the tier (`CPUOffloadingInfo.cpu_num_chunks`).
    pub num_chunks: u32,
    /// GPU blocks per chunk (the extra-config `block_size` over the GPU block size).
    pub blocks_per_chunk: u32,
    /// Tokens per GPU block.
    pub block_size: u32,
    pub policy: OffloadPolicyKind,
    /// Only prompt tokens are offloaded (vLLM's default `offload_prompt_only`).
    pub prompt_only: bool,
    /// The GPU prefix cache is on: loads in flight then defer other requests that would load
    /// the same chunks (vLLM keeps `_chunks_being_loaded` only with prefix caching).
    pub prefix_caching: bool,
}

impl OffloadConfig {
    /// Tokens per chunk.
    pub fn tokens_per_chunk(&self) -> u64 {
        self.blocks_per_chunk as u64 * self.block_size as u64
    }
}
