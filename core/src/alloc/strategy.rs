//! What an allocation strategy is: its name, what it is built from, what it is asked and
//! answers, and the [`Allocate`] trait every strategy implements.

use serde::{Deserialize, Serialize};

use super::defrag::Compaction;
use super::layout::{FreeSummary, LiveBlock, SegmentLayout};
use super::units::{GIB, MIB};
use crate::decision::{AllocId, Loc};
use crate::executor::Executor;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Strategy {
    FirstFit,
    BestFit,
    Buddy,
    Tlsf,
    /// Size classes over slabs, on a heap (`pool` on the command line and in serialized
    /// values, which stay as they were).
    #[serde(rename = "Pool")]
    SizeClass,
    Caching,
    CachingExpandable,
}

impl Strategy {
    pub const ALL: [Strategy; 7] = [
        Strategy::FirstFit,
        Strategy::BestFit,
        Strategy::Buddy,
        Strategy::Tlsf,
        Strategy::SizeClass,
        Strategy::Caching,
        Strategy::CachingExpandable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::FirstFit => "first-fit",
            Strategy::BestFit => "best-fit",
            Strategy::Buddy => "buddy",
            Strategy::Tlsf => "tlsf",
            Strategy::SizeClass => "pool",
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

/// What every allocation strategy does. [`super::Allocator`] adds taking the whole state as a
/// plain value.
pub trait Allocate {
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

    /// Moves live, unpinned blocks to compact free space, emitting `Move` decisions. `None` when
    /// this strategy cannot be defragmented.
    fn compact(&mut self, mem: &mut dyn Executor) -> Option<Compaction>;
}
