//! `first-fit` (address-ordered) and `best-fit` (smallest fitting extent, lowest address on
//! ties) over the arena's [`FreeExtents`].

use serde::{Deserialize, Serialize};

use super::arena::{check_tiling, slide_down, sorted_blocks, Arena};
use super::defrag::Compaction;
use super::extents::FreeExtents;
use super::layout::{FreeSummary, LiveBlock, SegmentLayout};
use super::live::LiveTable;
use super::strategy::{AllocConfig, AllocError, AllocRequest, Allocate, Strategy};
use crate::decision::{AllocId, Loc};
use crate::executor::Executor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FitPolicy {
    First,
    Best,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Live {
    offset: u64,
    bytes: u64,
    requested_bytes: u64,
    pinned: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitAllocator {
    policy: FitPolicy,
    alignment_bytes: u64,
    arena: Arena,
    free: FreeExtents,
    live: LiveTable<Live>,
    allocated_bytes: u64,
}

impl FitAllocator {
    pub fn new(policy: FitPolicy, config: &AllocConfig) -> Self {
        let arena = Arena::new(config);
        FitAllocator {
            policy,
            alignment_bytes: config.alignment_bytes,
            free: Self::extents(policy, &[], arena.range_bytes),
            live: LiveTable::default(),
            allocated_bytes: 0,
            arena,
        }
    }

    /// The free gaps between `blocks`; first fit scans them in address order.
    fn extents(policy: FitPolicy, blocks: &[LiveBlock], end: u64) -> FreeExtents {
        let free = FreeExtents::between(blocks, end);
        match policy {
            FitPolicy::First => free.with_address_order(),
            FitPolicy::Best => free,
        }
    }

    fn find(&self, bytes: u64) -> Option<(u64, u64)> {
        match self.policy {
            FitPolicy::Best => self.free.best_fit(bytes),
            FitPolicy::First => self.free.first_fit(bytes),
        }
    }

    /// Start of the free extent that runs to the end of the range, i.e. the top of the heap.
    fn top(&self) -> u64 {
        self.free.top(self.arena.range_bytes)
    }
}

impl Allocate for FitAllocator {
    fn strategy(&self) -> Strategy {
        match self.policy {
            FitPolicy::First => Strategy::FirstFit,
            FitPolicy::Best => Strategy::BestFit,
        }
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError> {
        let bytes = self.arena.round_request(req.bytes, self.alignment_bytes)?;
        let oom = AllocError::OutOfMemory {
            rounded_bytes: bytes,
        };
        let (offset, len) = self.find(bytes).ok_or(oom)?;
        self.arena
            .ensure_mapped(offset + bytes, mem)
            .map_err(|_| oom)?;
        self.free.take(offset, len, bytes);
        let live = Live {
            offset,
            bytes,
            requested_bytes: req.bytes,
            pinned: req.pinned,
        };
        self.live.insert(req.id, live);
        self.allocated_bytes += bytes;
        Ok(Arena::place(req.id, offset, bytes, mem))
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        let b = self.live.remove(id);
        self.allocated_bytes -= b.bytes;
        Arena::free(id, b.offset, b.bytes, mem);
        self.free.insert(b.offset, b.bytes);
    }

    fn empty_cache(&mut self, mem: &mut dyn Executor) {
        let top = self.top();
        self.arena.trim(top, mem);
    }

    fn free_summary(&self) -> FreeSummary {
        FreeSummary::single(
            self.arena.mapped_bytes - self.allocated_bytes,
            self.free.largest_mapped(&self.arena),
        )
    }

    fn live_blocks(&self) -> Vec<LiveBlock> {
        sorted_blocks(
            self.live
                .iter()
                .map(|(id, l)| (id, l.offset, l.bytes, l.requested_bytes, l.pinned)),
        )
    }

    fn reserved_bytes(&self) -> u64 {
        self.arena.mapped_bytes
    }

    fn layout(&self) -> Vec<SegmentLayout> {
        self.arena.layout(&self.live_blocks())
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.free.check()?;
        let blocks = self.live_blocks();
        let mut pieces: Vec<(u64, u64, bool)> =
            self.free.iter().map(|(o, l)| (o, l, false)).collect();
        pieces.extend(blocks.iter().map(|b| (b.at.offset, b.bytes, true)));
        pieces.sort();
        check_tiling(&pieces, self.arena.range_bytes)?;
        self.arena
            .check_blocks(&blocks, self.alignment_bytes, self.allocated_bytes)
    }

    fn compact(&mut self, mem: &mut dyn Executor) -> Option<Compaction> {
        let before = self.free.largest_mapped(&self.arena);
        let mut blocks = self.live_blocks();
        let (moves, bytes_moved) = slide_down(&mut blocks, self.alignment_bytes, mem);
        for b in &blocks {
            let slot = self.live.get_mut(b.id).expect("block is live");
            slot.offset = b.at.offset;
        }
        self.free = Self::extents(self.policy, &blocks, self.arena.range_bytes);
        Some(Compaction {
            moves,
            bytes_moved,
            largest_free_bytes_before: before,
            largest_free_bytes_after: self.free.largest_mapped(&self.arena),
        })
    }
}
