//! Paged KV cache with prefix caching, with vLLM 0.33.0's block-pool semantics.
//!
//! - [`hash`]: chained block hashes over token ids (plus extra keys: LoRA, cache salt).
//! - [`free_queue`]: the intrusive doubly linked free list over a slab of block indices.
//! - [`eviction`]: which free block is handed out next, behind one trait; [`eviction::VllmLru`]
//!   is vLLM's free queue (uncached blocks reused first, cached blocks in LRU order).
//! - [`pool`]: the block pool: reference counts, the prefix-cache map (duplicates allowed),
//!   touch, lazy eviction, `reset_prefix_cache`, stored/removed counters and events.
//! - [`manager`]: the per-request KV manager: block tables, prefix lookup, `allocate_slots`
//!   with vLLM's admission gate, free, usage and prefix-cache statistics.
//!
//! Block 0 is the null block: never free, never referenced by a request. Blocks are named by
//! dense indices (`BlockId`), requests by dense indices the caller assigns (`usize`).

pub mod eviction;
pub mod free_queue;
pub mod hash;
pub mod manager;
pub mod pool;

use serde::{Deserialize, Serialize};

pub use eviction::{EvictionPolicy, VllmLru};
pub use hash::BlockHash;
pub use manager::{KvCacheManager, KvConfig, PrefixCacheStats, SlotRequest};
pub use pool::{BlockPool, KvEvent, StepCounters};

/// Index of a KV block in the pool. Block 0 is the null block.
pub type BlockId = u32;

/// vLLM's placeholder block: always block 0, never free, its reference count not maintained.
pub const NULL_BLOCK: BlockId = 0;

/// Tokens (rounded up) to blocks.
#[inline]
pub fn cdiv(tokens: u64, block_size: u64) -> u64 {
    tokens.div_ceil(block_size)
}

/// Reference counts and hashes of every block, as a plain value (for reports and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSummary {
    pub num_blocks: u32,
    pub free_blocks: u32,
    /// Blocks with a hash (free or in use).
    pub cached_blocks: u32,
    /// Distinct hashes in the prefix-cache map.
    pub cached_hashes: u32,
}
