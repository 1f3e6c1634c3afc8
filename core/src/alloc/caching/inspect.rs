//! Read-only views of the allocator: live blocks, segment layouts (also as a snapshot records
//! them), and the full invariant walk.

use serde::{Deserialize, Serialize};

use super::{Caching, Live, PoolId, SizePool, State, NIL};
use crate::alloc::layout::{LiveBlock, SegmentLayout};
use crate::decision::{AllocId, Loc, SegmentId};

/// A segment as `torch.cuda.memory._snapshot()` reports it: a physical segment, or one
/// contiguous mapped range of an expandable one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordedLayout {
    pub address: u64,
    pub bytes: u64,
    pub stream: u32,
    pub pool: PoolId,
    pub size_pool: SizePool,
    pub expandable: bool,
    /// (block bytes, live or pending) in address order, covering the segment exactly.
    pub blocks: Vec<(u64, bool)>,
}

impl Caching {
    pub(super) fn live_block(&self, id: AllocId, live: Live) -> LiveBlock {
        let b = self.b(live.block);
        LiveBlock {
            id,
            at: Loc {
                segment: SegmentId::arena(b.segment),
                offset: b.offset,
            },
            bytes: b.size,
            requested_bytes: live.requested_bytes,
            pinned: live.pinned,
        }
    }

    /// One layout per physical segment, and one per contiguous mapped range of an expandable
    /// range (as PyTorch's snapshot reports them), in segment id order, then address order.
    pub(super) fn segment_layouts(&self) -> Vec<SegmentLayout> {
        let mut layouts = Vec::new();
        for (&id, seg) in &self.segments {
            for run in self.mapped_runs(id) {
                let blocks = run
                    .blocks
                    .iter()
                    .map(|&i| (self.b(i).size, matches!(self.b(i).state, State::Live(_))))
                    .collect();
                layouts.push(SegmentLayout {
                    segment: SegmentId::arena(id),
                    stream: seg.stream,
                    bytes: run.end - run.start,
                    blocks,
                });
            }
        }
        layouts
    }

    /// The segments as a snapshot reports them, in address order.
    pub fn recorded_layout(&self) -> Vec<RecordedLayout> {
        let mut out = Vec::new();
        for (&id, seg) in &self.segments {
            for run in self.mapped_runs(id) {
                out.push(RecordedLayout {
                    address: seg.address + run.start,
                    bytes: run.end - run.start,
                    stream: seg.stream,
                    pool: seg.pool_id,
                    size_pool: seg.pool,
                    expandable: seg.expandable,
                    blocks: run
                        .blocks
                        .iter()
                        .map(|&i| (self.b(i).size, matches!(self.b(i).state, State::Live(_))))
                        .collect(),
                });
            }
        }
        out.sort();
        out
    }

    /// The device address of `at` (a place this allocator handed out).
    pub fn address_of(&self, at: Loc) -> Option<u64> {
        let seg = self.segments.get(&at.segment.index)?;
        Some(seg.address + at.offset)
    }

    /// Whether a block of `pool` cut to `size` bytes leaves a block of `remaining` bytes
    /// (`should_split`): what tells the size of a block from its request.
    pub fn would_split(&self, pool: SizePool, size: u64, remaining: u64) -> bool {
        self.should_split(pool, size, remaining)
    }

    /// The pool and stream of the segment (or mapped range) that holds `address`, if any.
    pub fn segment_at(&self, address: u64) -> Option<(PoolId, u32)> {
        let (&base, &id) = self.by_address.range(..=address).next_back()?;
        let seg = self.seg(id);
        (address < base.saturating_add(seg.bytes)).then_some((seg.pool_id, seg.stream))
    }

    /// Walks every segment's block list and checks it against the indexes and the counters.
    pub(super) fn check(&self) -> Result<(), String> {
        let mut visited = 0usize;
        let mut free_count = [0usize; 2];
        let mut free_bytes = [0u64; 2];
        let mut unmapped_count = [0usize; 2];
        let mut live_count = 0usize;
        let (mut reserved, mut allocated, mut inactive) = (0u64, 0u64, 0u64);
        let min = self.min_block_bytes;
        if self.by_address.len() != self.segments.len()
            || self
                .by_address
                .iter()
                .any(|(&a, id)| self.segments.get(id).map(|s| s.address) != Some(a))
        {
            return Err("address index out of date".into());
        }
        let mut end_before = 0u64;
        for (&a, id) in &self.by_address {
            if a < end_before {
                return Err(format!(
                    "segment {id} at {a:#x} overlaps the segment before it"
                ));
            }
            end_before = a + self.seg(*id).bytes;
        }
        for (&id, seg) in &self.segments {
            if id >= self.next_segment {
                return Err(format!(
                    "segment {id} not below the next id {}",
                    self.next_segment
                ));
            }
            let p = seg.pool.index();
            let page = seg.pool.page_bytes();
            let (mut cursor, mut mapped, mut seg_live, mut seg_live_bytes) = (0u64, 0u64, 0, 0);
            let mut prev = NIL;
            let mut prev_state = State::Vacant;
            let mut i = seg.first;
            while i != NIL {
                let b = self
                    .blocks
                    .get(i as usize)
                    .ok_or_else(|| format!("segment {id}: block {i} outside the slab"))?;
                visited += 1;
                if visited > self.blocks.len() {
                    return Err(format!("segment {id}: block list has a cycle"));
                }
                let at = format!("segment {id} block {i} at {}+{}", b.offset, b.size);
                if b.segment != id
                    || b.stream != seg.stream
                    || b.pool != seg.pool
                    || b.pool_id != seg.pool_id
                {
                    return Err(format!(
                        "{at}: segment, stream or pool differs from its segment"
                    ));
                }
                if b.prev != prev {
                    return Err(format!("{at}: prev link {} should be {prev}", b.prev));
                }
                if b.offset != cursor || b.size == 0 {
                    return Err(format!("{at}: does not tile (expected offset {cursor})"));
                }
                if b.state == prev_state && b.state.is_free_space() {
                    return Err(format!(
                        "{at}: touches a free block of the same mapped state"
                    ));
                }
                match b.state {
                    State::Vacant => return Err(format!("{at}: vacant block in a list")),
                    State::Free => {
                        if !self.size_pools[p].blocks.contains(&self.free_key(i)) {
                            return Err(format!("{at}: free block not in its pool"));
                        }
                        free_count[p] += 1;
                        free_bytes[p] += b.size;
                        mapped += b.size;
                    }
                    State::Unmapped => {
                        if !seg.expandable {
                            return Err(format!("{at}: unmapped block in a physical segment"));
                        }
                        if b.offset % page != 0 || b.size % page != 0 {
                            return Err(format!("{at}: unmapped block not on page boundaries"));
                        }
                        if !self.size_pools[p].unmapped.contains(&self.unmapped_key(i)) {
                            return Err(format!("{at}: unmapped block not in its pool"));
                        }
                        unmapped_count[p] += 1;
                    }
                    State::Live(aid) => {
                        let entry = self.live.get(aid.0 as usize).copied().flatten();
                        if entry.map(|l| l.block) != Some(i) {
                            return Err(format!("{at}: live as {aid:?}, which is not here"));
                        }
                        if b.offset % min != 0 || b.size % min != 0 {
                            return Err(format!("{at}: live block misaligned"));
                        }
                        live_count += 1;
                        seg_live += 1;
                        seg_live_bytes += b.size;
                        mapped += b.size;
                    }
                }
                cursor += b.size;
                prev_state = b.state;
                prev = i;
                i = b.next;
            }
            if cursor != seg.bytes {
                return Err(format!(
                    "segment {id}: blocks end at {cursor}, not {}",
                    seg.bytes
                ));
            }
            if mapped != seg.mapped_bytes || (!seg.expandable && mapped != seg.bytes) {
                return Err(format!(
                    "segment {id}: {mapped} bytes mapped, books say {}",
                    seg.mapped_bytes
                ));
            }
            if seg.expandable && mapped % page != 0 {
                return Err(format!(
                    "segment {id}: {mapped} mapped bytes are not whole pages"
                ));
            }
            if (seg_live, seg_live_bytes) != (seg.live_count, seg.live_bytes) {
                return Err(format!("segment {id}: live count or bytes out of date"));
            }
            reserved += mapped;
            allocated += seg_live_bytes;
            inactive += seg.inactive_split_bytes();
        }
        for (p, pool) in self.size_pools.iter().enumerate() {
            if pool.blocks.len() != free_count[p] || pool.unmapped.len() != unmapped_count[p] {
                return Err(format!(
                    "pool {p}: index holds blocks that are not in any segment"
                ));
            }
            if pool.free_bytes != free_bytes[p] {
                return Err(format!(
                    "pool {p}: free bytes {} but blocks sum to {}",
                    pool.free_bytes, free_bytes[p]
                ));
            }
        }
        if visited + self.vacant.len() != self.blocks.len() {
            return Err("slab: blocks neither in a segment nor vacant".into());
        }
        if self
            .vacant
            .iter()
            .any(|&i| self.b(i).state != State::Vacant)
        {
            return Err("slab: a vacant slot holds a block".into());
        }
        if self.live.iter().flatten().count() != live_count {
            return Err("live map holds allocations that are not in any segment".into());
        }
        let pending = self.live.iter().flatten().filter(|l| l.pending).count();
        if pending != self.pending.len()
            || self.pending.iter().any(|id| {
                !self
                    .live
                    .get(id.0 as usize)
                    .copied()
                    .flatten()
                    .is_some_and(|l| l.pending)
            })
        {
            return Err("pending frees out of date".into());
        }
        if reserved != self.reserved_bytes {
            return Err(format!(
                "reserved {} but segments hold {reserved}",
                self.reserved_bytes
            ));
        }
        if allocated != self.allocated_bytes {
            return Err(format!(
                "allocated {} but live blocks sum to {allocated}",
                self.allocated_bytes
            ));
        }
        if inactive != self.inactive_split_bytes {
            return Err(format!(
                "inactive split {} but segments say {inactive}",
                self.inactive_split_bytes
            ));
        }
        Ok(())
    }
}
