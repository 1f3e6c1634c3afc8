//! `first-fit` (address-ordered) and `best-fit` (smallest fitting extent, lowest address on
//! ties) over the arena. Free extents are kept twice, by address and by (size, address), and are
//! always maximal: two free extents never touch.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::arena::{Arena, ARENA_SEGMENT};
use super::{
    align_up, AllocConfig, AllocError, AllocRequest, Allocator, AllocatorState, FreeSummary,
    LiveBlock, PoolFree, SegmentLayout, Strategy,
};
use crate::decision::{AllocId, Decision, Loc};
use crate::defrag::{plan_segment, Compaction};
use crate::memory::Memory;

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
    /// offset → length of every free extent.
    free_by_offset: BTreeMap<u64, u64>,
    /// (length, offset) of every free extent.
    free_by_size: BTreeSet<(u64, u64)>,
    /// Indexed by `AllocId`.
    live: Vec<Option<Live>>,
    allocated_bytes: u64,
}

impl FitAllocator {
    pub fn new(policy: FitPolicy, config: &AllocConfig) -> Self {
        let arena = Arena::new(config);
        let mut a = FitAllocator {
            policy,
            alignment_bytes: config.alignment_bytes,
            free_by_offset: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            live: Vec::new(),
            allocated_bytes: 0,
            arena,
        };
        a.insert_free(0, a.arena.range_bytes);
        a
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        debug_assert!(len > 0);
        self.free_by_offset.insert(offset, len);
        self.free_by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        let removed = self.free_by_offset.remove(&offset);
        debug_assert_eq!(removed, Some(len));
        self.free_by_size.remove(&(len, offset));
    }

    fn find(&self, bytes: u64) -> Option<(u64, u64)> {
        match self.policy {
            FitPolicy::Best => self
                .free_by_size
                .range((bytes, 0)..)
                .next()
                .map(|&(len, offset)| (offset, len)),
            FitPolicy::First => self
                .free_by_offset
                .iter()
                .find(|(_, &len)| len >= bytes)
                .map(|(&offset, &len)| (offset, len)),
        }
    }

    fn live_at(&self, id: AllocId) -> Live {
        self.live
            .get(id.0 as usize)
            .copied()
            .flatten()
            .unwrap_or_else(|| panic!("free of {id:?}, which is not live"))
    }

    /// Start of the free extent that runs to the end of the range, i.e. the top of the heap.
    fn top(&self) -> u64 {
        match self.free_by_offset.last_key_value() {
            Some((&offset, &len)) if offset + len == self.arena.range_bytes => offset,
            _ => self.arena.range_bytes,
        }
    }

    fn rebuild_free(&mut self) {
        self.free_by_offset.clear();
        self.free_by_size.clear();
        let mut blocks: Vec<Live> = self.live.iter().flatten().copied().collect();
        blocks.sort_by_key(|b| b.offset);
        let mut cursor = 0;
        for b in blocks {
            if b.offset > cursor {
                self.insert_free(cursor, b.offset - cursor);
            }
            cursor = b.offset + b.bytes;
        }
        if cursor < self.arena.range_bytes {
            self.insert_free(cursor, self.arena.range_bytes - cursor);
        }
    }
}

impl Allocator for FitAllocator {
    fn strategy(&self) -> Strategy {
        match self.policy {
            FitPolicy::First => Strategy::FirstFit,
            FitPolicy::Best => Strategy::BestFit,
        }
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Memory) -> Result<Loc, AllocError> {
        let bytes = align_up(req.bytes.max(1), self.alignment_bytes)
            .filter(|&b| b <= self.arena.range_bytes)
            .ok_or(AllocError::OutOfMemory {
                rounded_bytes: req.bytes,
            })?;
        let oom = AllocError::OutOfMemory {
            rounded_bytes: bytes,
        };
        let (offset, len) = self.find(bytes).ok_or(oom)?;
        self.arena
            .ensure_mapped(offset + bytes, mem)
            .map_err(|_| oom)?;
        self.remove_free(offset, len);
        if len > bytes {
            self.insert_free(offset + bytes, len - bytes);
        }
        let slot = req.id.0 as usize;
        if slot >= self.live.len() {
            self.live.resize(slot + 1, None);
        }
        assert!(self.live[slot].is_none(), "{:?} allocated twice", req.id);
        self.live[slot] = Some(Live {
            offset,
            bytes,
            requested_bytes: req.bytes,
            pinned: req.pinned,
        });
        self.allocated_bytes += bytes;
        let at = Arena::loc(offset);
        mem.apply(Decision::Place {
            id: req.id,
            at,
            bytes,
        })
        .expect("place is never refused");
        Ok(at)
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Memory) {
        let b = self.live_at(id);
        self.live[id.0 as usize] = None;
        self.allocated_bytes -= b.bytes;
        let at = Arena::loc(b.offset);
        mem.apply(Decision::Free {
            id,
            at,
            bytes: b.bytes,
        })
        .expect("free is never refused");
        let mut start = b.offset;
        let mut len = b.bytes;
        if let Some((&p_off, &p_len)) = self.free_by_offset.range(..start).next_back() {
            if p_off + p_len == start {
                self.remove_free(p_off, p_len);
                start = p_off;
                len += p_len;
            }
        }
        if let Some(&n_len) = self.free_by_offset.get(&(b.offset + b.bytes)) {
            self.remove_free(b.offset + b.bytes, n_len);
            len += n_len;
        }
        self.insert_free(start, len);
    }

    fn empty_cache(&mut self, mem: &mut dyn Memory) {
        let top = self.top();
        self.arena.trim(top, mem);
    }

    fn free_summary(&self) -> FreeSummary {
        let mapped = self.arena.mapped_bytes;
        let top = self.top();
        let tail = self.arena.mapped_part(top, self.arena.range_bytes - top);
        let hole = self
            .free_by_size
            .iter()
            .rev()
            .find(|&&(_, offset)| offset != top)
            .map_or(0, |&(len, _)| len);
        FreeSummary {
            pools: [
                PoolFree {
                    free_bytes: mapped - self.allocated_bytes,
                    largest_free_bytes: hole.max(tail),
                },
                PoolFree::default(),
            ],
            inactive_split_bytes: 0,
        }
    }

    fn live_blocks(&self) -> Vec<LiveBlock> {
        let mut blocks: Vec<LiveBlock> = self
            .live
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                l.map(|l| LiveBlock {
                    id: AllocId(i as u64),
                    at: Arena::loc(l.offset),
                    bytes: l.bytes,
                    requested_bytes: l.requested_bytes,
                    pinned: l.pinned,
                })
            })
            .collect();
        blocks.sort_by_key(|b| b.at);
        blocks
    }

    fn reserved_bytes(&self) -> u64 {
        self.arena.mapped_bytes
    }

    fn layout(&self) -> Vec<SegmentLayout> {
        arena_layout(&self.arena, &self.live_blocks())
    }

    fn check_invariants(&self) -> Result<(), String> {
        if self.free_by_offset.len() != self.free_by_size.len() {
            return Err("free indexes differ in length".into());
        }
        for &(len, offset) in &self.free_by_size {
            if self.free_by_offset.get(&offset) != Some(&len) {
                return Err(format!("free extent {offset}+{len} missing by offset"));
            }
        }
        let mut pieces: Vec<(u64, u64, bool)> = self
            .free_by_offset
            .iter()
            .map(|(&o, &l)| (o, l, false))
            .collect();
        let blocks = self.live_blocks();
        pieces.extend(blocks.iter().map(|b| (b.at.offset, b.bytes, true)));
        pieces.sort();
        check_tiling(&pieces, self.arena.range_bytes)?;
        check_blocks(&blocks, self.alignment_bytes, self.arena.mapped_bytes)?;
        let allocated: u64 = blocks.iter().map(|b| b.bytes).sum();
        if allocated != self.allocated_bytes {
            return Err(format!(
                "allocated {} but blocks sum to {allocated}",
                self.allocated_bytes
            ));
        }
        Ok(())
    }

    fn snapshot(&self) -> AllocatorState {
        AllocatorState::Fit(self.clone())
    }

    fn compact(&mut self, mem: &mut dyn Memory) -> Option<Compaction> {
        let before = self.free_summary().pools[0].largest_free_bytes;
        let moves = plan_segment(&self.live_blocks(), 0, self.alignment_bytes);
        let mut bytes_moved = 0;
        for m in &moves {
            let slot = self.live[m.block.id.0 as usize]
                .as_mut()
                .expect("planned block is live");
            slot.offset = m.to.offset;
            bytes_moved += m.block.bytes;
            mem.apply(Decision::Move {
                id: m.block.id,
                from: m.block.at,
                to: m.to,
                bytes: m.block.bytes,
            })
            .expect("move is never refused");
        }
        self.rebuild_free();
        Some(Compaction {
            moves: moves.len() as u64,
            bytes_moved,
            largest_free_bytes_before: before,
            largest_free_bytes_after: self.free_summary().pools[0].largest_free_bytes,
        })
    }
}

/// The arena as one segment: live blocks and the free gaps between them, up to the mapped end.
pub fn arena_layout(arena: &Arena, blocks: &[LiveBlock]) -> Vec<SegmentLayout> {
    if arena.mapped_bytes == 0 {
        return Vec::new();
    }
    let mut layout = Vec::new();
    let mut cursor = 0;
    for b in blocks {
        if b.at.offset > cursor {
            layout.push((b.at.offset - cursor, false));
        }
        layout.push((b.bytes, true));
        cursor = b.at.offset + b.bytes;
    }
    if cursor < arena.mapped_bytes {
        layout.push((arena.mapped_bytes - cursor, false));
    }
    vec![SegmentLayout {
        segment: ARENA_SEGMENT,
        stream: 0,
        bytes: arena.mapped_bytes,
        blocks: layout,
    }]
}

/// `pieces` (offset, length, live) sorted by offset must tile `[0, range)` exactly, and no two
/// free pieces may touch.
pub fn check_tiling(pieces: &[(u64, u64, bool)], range: u64) -> Result<(), String> {
    let mut cursor = 0;
    let mut prev_free = false;
    for &(offset, len, live) in pieces {
        if offset != cursor {
            return Err(format!(
                "gap or overlap at {cursor}: next piece starts at {offset}"
            ));
        }
        if len == 0 {
            return Err(format!("empty piece at {offset}"));
        }
        if !live && prev_free {
            return Err(format!("free extents touch at {offset}: not coalesced"));
        }
        prev_free = !live;
        cursor = offset + len;
    }
    if cursor != range {
        return Err(format!("pieces end at {cursor}, range is {range}"));
    }
    Ok(())
}

/// Live blocks are aligned, inside mapped memory, and do not overlap (sorted by offset).
pub fn check_blocks(blocks: &[LiveBlock], alignment: u64, mapped: u64) -> Result<(), String> {
    let mut end = 0;
    for b in blocks {
        if b.at.offset % alignment != 0 || b.bytes % alignment != 0 {
            return Err(format!(
                "{:?} misaligned at {}+{}",
                b.id, b.at.offset, b.bytes
            ));
        }
        if b.at.offset < end {
            return Err(format!("{:?} overlaps the block before it", b.id));
        }
        end = b.at.offset + b.bytes;
        if end > mapped {
            return Err(format!("{:?} ends at {end}, beyond mapped {mapped}", b.id));
        }
    }
    Ok(())
}
