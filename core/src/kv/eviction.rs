//! Which free block the pool hands out next. A free block may still hold a cached prefix (it
//! has a hash): handing it out evicts that prefix, lazily. The policy only orders free blocks;
//! the pool keeps reference counts and the prefix-cache map.
//!
//! [`VllmLru`] is vLLM 0.33.0's free queue exactly. Other policies (frequency-aware admission,
//! leaf-first LRU over the prefix tree) plug in behind the same trait; none is implemented yet.

use serde::{Deserialize, Serialize};

use super::free_queue::FreeQueue;
use super::BlockId;

pub trait EvictionPolicy {
    fn name(&self) -> &'static str;

    /// Blocks whose last holder let go, in vLLM's order: `reuse_first` are blocks without a
    /// hash (or every block when prefix caching is off), `reuse_last` are cached blocks; each
    /// list is in the order the pool got them (a request's blocks tail first).
    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]);

    /// A free block was hit by a prefix lookup and is in use again (vLLM's `touch`).
    fn take(&mut self, block: BlockId);

    /// The free block to hand out next.
    fn pop(&mut self) -> Option<BlockId>;

    fn len(&self) -> u32;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, block: BlockId) -> bool;

    /// Free blocks in the order they would be handed out.
    fn order(&self) -> Vec<BlockId>;

    /// Full walk of the policy's own structure.
    fn check(&self) -> Result<(), String>;
}

/// vLLM 0.33.0's `FreeKVCacheBlockQueue` discipline: new blocks come from the head; freed
/// blocks without a hash go to the head (LIFO reuse, `prepend_n`), cached ones to the tail
/// (`append_n`), so cached blocks are evicted least recently released first and, within one
/// request, tail of the chain first. A touch unlinks a block without reordering anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VllmLru {
    queue: FreeQueue,
}

impl VllmLru {
    /// All blocks but the null block, in id order.
    pub fn new(num_blocks: u32) -> Self {
        VllmLru {
            queue: FreeQueue::new(num_blocks, 1..num_blocks),
        }
    }
}

impl EvictionPolicy for VllmLru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]) {
        self.queue.prepend(reuse_first);
        for &b in reuse_last {
            self.queue.push_back(b);
        }
    }

    #[inline]
    fn take(&mut self, block: BlockId) {
        self.queue.remove(block);
    }

    #[inline]
    fn pop(&mut self) -> Option<BlockId> {
        self.queue.pop_front()
    }

    #[inline]
    fn len(&self) -> u32 {
        self.queue.len()
    }

    #[inline]
    fn contains(&self, block: BlockId) -> bool {
        self.queue.contains(block)
    }

    fn order(&self) -> Vec<BlockId> {
        self.queue.iter().collect()
    }

    fn check(&self) -> Result<(), String> {
        self.queue.check()
    }
}
