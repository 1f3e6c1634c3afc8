//! Paged KV cache with prefix caching, with vLLM 0.33.0's block-pool semantics.
//!
//! - [`block`]: block ids, the null block, tokens to blocks.
//! - [`hash`]: chained block hashes over token ids (plus extra keys: LoRA, cache salt).
//! - [`free_queue`]: vLLM's free block queue, as a ring of block ids with holes.
//! - [`eviction`]: which free block is handed out next, behind one trait; [`eviction::VllmLru`]
//!   is vLLM's free queue (uncached blocks reused first, cached blocks in LRU order).
//! - [`pool`]: the block pool: reference counts, the prefix-cache map (duplicates allowed),
//!   touch, lazy eviction, `reset_prefix_cache`, stored/removed counters and events.
//! - [`prefix_map`]: the pool's map from a hash to the blocks holding it.
//! - [`index`]: the cache index a KV-aware router rebuilds from an engine's KV-cache events.
//! - [`manager`]: the per-request KV manager: block tables, prefix lookup, `allocate_slots`
//!   with vLLM's admission gate (and `can_allocate_slots`, its checks alone), free, usage and
//!   prefix-cache statistics; placed on an executor, it also reserves the pool, writes every
//!   computed block and reads prefix hits back before they count.
//! - [`offload`]: the CPU tier below the pool, exact to vLLM's `OffloadingConnector`: its
//!   manager, LRU and ARC policies, and the scheduler side's lookups, loads and stores.
//!
//! Block 0 is the null block: never free, never referenced by a request. Blocks are named by
//! dense indices (`BlockId`), requests by dense indices the caller assigns (`usize`).

pub mod block;
pub mod eviction;
pub mod free_queue;
pub mod hash;
pub mod index;
pub mod manager;
pub mod offload;
pub mod pool;
pub mod prefix_map;

pub use block::{cdiv, ends_block, full_blocks, BlockId, NULL_BLOCK};
pub use eviction::{EvictionPolicy, VllmLru};
pub use hash::BlockHash;
pub use manager::{
    Admission, KvCacheManager, KvConfig, KvPlacement, PlaceError, PrefixCacheStats, SlotRequest,
};
pub use pool::{BlockPool, BlockPoolSummary, KvEvent, StepCounters};
