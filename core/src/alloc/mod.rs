//! Allocation strategies over a device address space, behind one trait.
//!
//! A strategy answers `alloc` and `free` with decisions applied through a [`Executor`](crate::executor::Executor); it never
//! touches memory itself. The arena strategies (`first-fit`, `best-fit`, `buddy`, `tlsf`,
//! `pool`) manage one virtual range of `capacity` bytes whose pages they map as their top grows
//! ([`arena::Arena`]); the caching strategies model PyTorch's CUDA caching allocator.

pub mod arena;
pub mod buddy;
pub mod caching;
pub mod extents;
pub mod fit;
pub mod live;
pub mod pool;
pub mod tlsf;

use serde::{Deserialize, Serialize};

use crate::decision::{AllocId, Loc, SegmentId};
use crate::defrag::Compaction;
use crate::executor::Executor;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// What every strategy is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocConfig {
    /// Bytes of device memory the strategy may reserve in all.
    pub capacity_bytes: u64,
    /// Every block starts at a multiple of this and its size is rounded up to it (power of two).
    pub alignment_bytes: u64,
    /// Granularity at which the arena strategies map memory (power of two, ≥ alignment).
    pub page_bytes: u64,
}

impl Default for AllocConfig {
    fn default() -> Self {
        AllocConfig {
            capacity_bytes: 80 * GIB,
            alignment_bytes: 512,
            page_bytes: 2 * MIB,
        }
    }
}

impl AllocConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.alignment_bytes.is_power_of_two() {
            return Err(format!(
                "alignment {} is not a power of two",
                self.alignment_bytes
            ));
        }
        if !self.page_bytes.is_power_of_two() || self.page_bytes < self.alignment_bytes {
            return Err(format!(
                "page size {} must be a power of two no smaller than the alignment {}",
                self.page_bytes, self.alignment_bytes
            ));
        }
        if self.capacity_bytes < self.page_bytes {
            return Err(format!(
                "capacity {} is smaller than one page ({} bytes)",
                self.capacity_bytes, self.page_bytes
            ));
        }
        if self.capacity_bytes > 1 << 60 {
            return Err(format!(
                "capacity {} exceeds 2^60 bytes",
                self.capacity_bytes
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRequest {
    pub id: AllocId,
    /// Bytes asked for, before any rounding.
    pub bytes: u64,
    /// Stream the memory is used on; caching strategies never share free blocks across streams.
    pub stream: u32,
    /// A pinned allocation is never moved by defragmentation.
    pub pinned: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocError {
    /// No place could be found or obtained for `rounded_bytes`.
    OutOfMemory { rounded_bytes: u64 },
}

/// Free memory of one pool, inside reserved memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolFree {
    pub free_bytes: u64,
    pub largest_free_bytes: u64,
}

/// Free memory inside reserved memory. Strategies with one pool fill `pools[0]` only; the
/// caching strategies put the small pool in `pools[0]` and the large pool in `pools[1]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeSummary {
    pub pools: [PoolFree; 2],
    /// Free bytes inside segments that still hold a live block (cannot be released).
    pub inactive_split_bytes: u64,
}

impl FreeSummary {
    /// Free memory of a strategy with one pool (the arena strategies).
    pub fn single(free_bytes: u64, largest_free_bytes: u64) -> Self {
        FreeSummary {
            pools: [
                PoolFree {
                    free_bytes,
                    largest_free_bytes,
                },
                PoolFree::default(),
            ],
            inactive_split_bytes: 0,
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.pools.iter().map(|p| p.free_bytes).sum()
    }

    /// 1 − largest free / total free, pooled: free memory of different pools cannot serve each
    /// other, so each pool's largest extent counts towards what is usable.
    pub fn external_fragmentation(&self) -> f64 {
        let free = self.free_bytes();
        if free == 0 {
            return 0.0;
        }
        let largest: u64 = self.pools.iter().map(|p| p.largest_free_bytes).sum();
        1.0 - largest as f64 / free as f64
    }
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Strategy {
    FirstFit,
    BestFit,
    Buddy,
    Tlsf,
    Pool,
    Caching,
    CachingExpandable,
}

impl Strategy {
    pub const ALL: [Strategy; 7] = [
        Strategy::FirstFit,
        Strategy::BestFit,
        Strategy::Buddy,
        Strategy::Tlsf,
        Strategy::Pool,
        Strategy::Caching,
        Strategy::CachingExpandable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::FirstFit => "first-fit",
            Strategy::BestFit => "best-fit",
            Strategy::Buddy => "buddy",
            Strategy::Tlsf => "tlsf",
            Strategy::Pool => "pool",
            Strategy::Caching => "caching",
            Strategy::CachingExpandable => "caching-expandable",
        }
    }

    pub fn parse(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Caching strategies keep freed segments; all others return to their initial state when
    /// everything is freed.
    pub fn is_caching(self) -> bool {
        matches!(self, Strategy::Caching | Strategy::CachingExpandable)
    }
}

/// The whole state of a strategy, as a plain value: restoring it resumes the run exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AllocatorState {
    Fit(fit::FitAllocator),
    Buddy(buddy::Buddy),
    Tlsf(tlsf::Tlsf),
    Pool(pool::Pool),
    Caching(caching::Caching),
}

impl AllocatorState {
    pub fn restore(self) -> Box<dyn Allocator> {
        match self {
            AllocatorState::Fit(a) => Box::new(a),
            AllocatorState::Buddy(a) => Box::new(a),
            AllocatorState::Tlsf(a) => Box::new(a),
            AllocatorState::Pool(a) => Box::new(a),
            AllocatorState::Caching(a) => Box::new(a),
        }
    }
}

pub trait Allocator {
    fn strategy(&self) -> Strategy;

    /// Places `req`, reserving or mapping memory through `mem` as needed. On error nothing
    /// changed but what `mem` was told (a reservation that was refused, or cache released).
    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError>;

    /// Frees a live allocation. Panics if `id` is not live: the driver filters unknown frees.
    fn free(&mut self, id: AllocId, mem: &mut dyn Executor);

    /// Returns cached free memory to the device (PyTorch's `empty_cache`); the arena strategies
    /// unmap the free pages above their top.
    fn empty_cache(&mut self, mem: &mut dyn Executor);

    fn free_summary(&self) -> FreeSummary;

    /// Live blocks in address order (segment, offset).
    fn live_blocks(&self) -> Vec<LiveBlock>;

    /// Reserved (physical, mapped) bytes: equal to what the books say.
    fn reserved_bytes(&self) -> u64;

    /// Segments with their block layout, in segment id order.
    fn layout(&self) -> Vec<SegmentLayout>;

    /// Full walk of every internal invariant; for tests and `--check`.
    fn check_invariants(&self) -> Result<(), String>;

    fn snapshot(&self) -> AllocatorState;

    /// Moves live, unpinned blocks to compact free space, emitting `Move` decisions. `None` when
    /// this strategy cannot be defragmented.
    fn compact(&mut self, mem: &mut dyn Executor) -> Option<Compaction>;
}

pub fn build(strategy: Strategy, config: &AllocConfig) -> Box<dyn Allocator> {
    match strategy {
        Strategy::FirstFit => Box::new(fit::FitAllocator::new(fit::FitPolicy::First, config)),
        Strategy::BestFit => Box::new(fit::FitAllocator::new(fit::FitPolicy::Best, config)),
        Strategy::Buddy => Box::new(buddy::Buddy::new(config)),
        Strategy::Tlsf => Box::new(tlsf::Tlsf::new(config)),
        Strategy::Pool => Box::new(pool::Pool::new(config)),
        Strategy::Caching => Box::new(caching::Caching::new(config, false)),
        Strategy::CachingExpandable => Box::new(caching::Caching::new(config, true)),
    }
}

/// `value` rounded up to a multiple of the power of two `align`, or `None` on overflow.
#[inline]
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}
