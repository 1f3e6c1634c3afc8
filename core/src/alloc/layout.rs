//! What a strategy shows of its memory: the live blocks, the layout of each segment, and the
//! free space inside reserved memory.

use serde::{Deserialize, Serialize};

use crate::decision::{AllocId, Loc, SegmentId};

/// A live block as the strategy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveBlock {
    pub id: AllocId,
    pub at: Loc,
    pub bytes: u64,
    pub requested_bytes: u64,
    pub pinned: bool,
}

/// One reserved segment and its blocks in address order: what a recorded snapshot is compared
/// against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentLayout {
    pub segment: SegmentId,
    pub stream: u32,
    pub bytes: u64,
    /// (block bytes, live) in address order, covering the segment exactly.
    pub blocks: Vec<(u64, bool)>,
}

/// Free memory of one size pool, inside reserved memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeSpace {
    pub free_bytes: u64,
    pub largest_free_bytes: u64,
}

/// Free memory inside reserved memory, per size pool: free memory of one size pool never
/// serves a request of the other. Strategies with one free space fill `size_pools[0]` only;
/// the caching strategies put PyTorch's small pool in `size_pools[0]` and its large pool in
/// `size_pools[1]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeSummary {
    pub size_pools: [FreeSpace; 2],
    /// Free bytes inside segments that still hold a live block (cannot be released).
    pub inactive_split_bytes: u64,
}

impl FreeSummary {
    /// Free memory of a strategy with one free space (the arena strategies).
    #[inline]
    pub fn single(free_bytes: u64, largest_free_bytes: u64) -> Self {
        FreeSummary {
            size_pools: [
                FreeSpace {
                    free_bytes,
                    largest_free_bytes,
                },
                FreeSpace::default(),
            ],
            inactive_split_bytes: 0,
        }
    }

    #[inline]
    pub fn free_bytes(&self) -> u64 {
        self.size_pools.iter().map(|p| p.free_bytes).sum()
    }

    /// 1 − largest free / total free, pooled: free memory of different size pools cannot
    /// serve each other, so each pool's largest extent counts towards what is usable.
    #[inline]
    pub fn external_fragmentation(&self) -> f64 {
        let free = self.free_bytes();
        if free == 0 {
            return 0.0;
        }
        let largest: u64 = self.size_pools.iter().map(|p| p.largest_free_bytes).sum();
        1.0 - largest as f64 / free as f64
    }
}
