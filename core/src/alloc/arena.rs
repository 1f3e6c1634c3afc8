//! The address space of the arena strategies: one virtual range of the configured capacity,
//! mapped page by page from offset 0 as the strategy's top grows, trimmed on `empty_cache`; and
//! what the arena strategies share about the live blocks in it.

use serde::{Deserialize, Serialize};

use super::defrag::plan_segment;
use super::layout::{LiveBlock, SegmentLayout};
use super::strategy::{AllocConfig, AllocError};
use super::units::align_up;
use crate::decision::{AllocId, Decision, Loc, Refusal, SegmentId};
use crate::executor::Executor;

pub const ARENA_SEGMENT: SegmentId = SegmentId::arena(0);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arena {
    /// Length of the virtual range: the capacity, rounded down to whole pages.
    pub range_bytes: u64,
    pub page_bytes: u64,
    /// `[0, mapped_bytes)` is backed by memory; always a multiple of `page_bytes`.
    pub mapped_bytes: u64,
    va_reserved: bool,
}

impl Arena {
    pub fn new(config: &AllocConfig) -> Self {
        let range_bytes = config.capacity_bytes & !(config.page_bytes - 1);
        assert!(range_bytes > 0, "capacity below one page");
        Arena {
            range_bytes,
            page_bytes: config.page_bytes,
            mapped_bytes: 0,
            va_reserved: false,
        }
    }

    pub fn loc(offset: u64) -> Loc {
        Loc {
            segment: ARENA_SEGMENT,
            offset,
        }
    }

    /// Tells `mem` that block `id` of `bytes` now lies at `offset`; returns where that is.
    pub fn place(id: AllocId, offset: u64, bytes: u64, mem: &mut dyn Executor) -> Loc {
        let at = Arena::loc(offset);
        mem.apply(Decision::Place { id, at, bytes })
            .expect("place is never refused");
        at
    }

    /// Tells `mem` that block `id` of `bytes` at `offset` is free.
    pub fn free(id: AllocId, offset: u64, bytes: u64, mem: &mut dyn Executor) {
        let at = Arena::loc(offset);
        mem.apply(Decision::Free { id, at, bytes })
            .expect("free is never refused");
    }

    /// A request of `bytes` rounded up to `alignment` (at least one unit), or out of memory when
    /// that overflows or exceeds the range.
    #[inline]
    pub fn round_request(&self, bytes: u64, alignment: u64) -> Result<u64, AllocError> {
        align_up(bytes.max(1), alignment)
            .filter(|&b| b <= self.range_bytes)
            .ok_or(AllocError::OutOfMemory {
                rounded_bytes: bytes,
            })
    }

    /// Makes `[0, end)` mapped. On refusal nothing is mapped.
    pub fn ensure_mapped(&mut self, end: u64, mem: &mut dyn Executor) -> Result<(), Refusal> {
        if end <= self.mapped_bytes {
            return Ok(());
        }
        if end > self.range_bytes {
            return Err(Refusal::Capacity);
        }
        if !self.va_reserved {
            let reserve = Decision::ReserveVa {
                segment: ARENA_SEGMENT,
                bytes: self.range_bytes,
            };
            // A device may have less address space than the capacity asks for: then nothing
            // fits, and every request fails as out of memory.
            mem.apply(reserve)?;
            self.va_reserved = true;
        }
        let new_end = align_up(end, self.page_bytes).expect("end below range");
        mem.apply(Decision::Map {
            segment: ARENA_SEGMENT,
            offset: self.mapped_bytes,
            bytes: new_end - self.mapped_bytes,
        })?;
        self.mapped_bytes = new_end;
        Ok(())
    }

    /// Unmaps every whole page at or above `top` (the end of the highest live block).
    pub fn trim(&mut self, top: u64, mem: &mut dyn Executor) {
        let keep = align_up(top, self.page_bytes).expect("top below range");
        if keep < self.mapped_bytes {
            mem.apply(Decision::Unmap {
                segment: ARENA_SEGMENT,
                offset: keep,
                bytes: self.mapped_bytes - keep,
            })
            .expect("unmap is never refused");
            self.mapped_bytes = keep;
        }
    }

    /// The mapped part of the free extent `[start, start + len)`.
    pub fn mapped_part(&self, start: u64, len: u64) -> u64 {
        (start + len).min(self.mapped_bytes).saturating_sub(start)
    }

    /// The arena as one segment: live `blocks` (address order) and the free gaps between them,
    /// up to the mapped end.
    pub fn layout(&self, blocks: &[LiveBlock]) -> Vec<SegmentLayout> {
        if self.mapped_bytes == 0 {
            return Vec::new();
        }
        let mut layout = Vec::new();
        tile(blocks, self.mapped_bytes, |_, bytes, live| {
            layout.push((bytes, live.is_some()))
        });
        vec![SegmentLayout {
            segment: ARENA_SEGMENT,
            stream: 0,
            bytes: self.mapped_bytes,
            blocks: layout,
        }]
    }

    /// Live `blocks` (address order) are aligned, inside mapped memory, do not overlap, and sum
    /// to `allocated_bytes`.
    pub fn check_blocks(
        &self,
        blocks: &[LiveBlock],
        alignment: u64,
        allocated_bytes: u64,
    ) -> Result<(), String> {
        let mapped = self.mapped_bytes;
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
        let allocated: u64 = blocks.iter().map(|b| b.bytes).sum();
        if allocated != allocated_bytes {
            return Err(format!(
                "allocated {allocated_bytes} but blocks sum to {allocated}"
            ));
        }
        Ok(())
    }
}

/// Live blocks in address order, from (id, offset, bytes, requested bytes, pinned) in any order.
pub fn sorted_blocks(
    blocks: impl IntoIterator<Item = (AllocId, u64, u64, u64, bool)>,
) -> Vec<LiveBlock> {
    let mut blocks: Vec<LiveBlock> = blocks
        .into_iter()
        .map(|(id, offset, bytes, requested_bytes, pinned)| LiveBlock {
            id,
            at: Arena::loc(offset),
            bytes,
            requested_bytes,
            pinned,
        })
        .collect();
    blocks.sort_by_key(|b| b.at);
    blocks
}

/// Walks `[0, end)` in address order: each of the live `blocks` (address order, all below
/// `end`) as `f(offset, bytes, Some(block))`, each gap before, between and after them as
/// `f(offset, bytes, None)`.
pub fn tile<'a>(
    blocks: &'a [LiveBlock],
    end: u64,
    mut f: impl FnMut(u64, u64, Option<&'a LiveBlock>),
) {
    let mut cursor = 0;
    for b in blocks {
        if b.at.offset > cursor {
            f(cursor, b.at.offset - cursor, None);
        }
        f(b.at.offset, b.bytes, Some(b));
        cursor = b.at.offset + b.bytes;
    }
    if cursor < end {
        f(cursor, end - cursor, None);
    }
}

/// Slides the live, unpinned `blocks` (address order) down as [`plan_segment`] plans, emitting
/// a `Move` for each, and updates `blocks` to their new places. Returns (moves, bytes moved).
pub fn slide_down(blocks: &mut [LiveBlock], alignment: u64, mem: &mut dyn Executor) -> (u64, u64) {
    let moves = plan_segment(blocks, 0, alignment);
    let mut bytes_moved = 0;
    let mut k = 0;
    for m in &moves {
        m.apply(mem);
        bytes_moved += m.block.bytes;
        while blocks[k].id != m.block.id {
            k += 1;
        }
        blocks[k].at = m.to;
    }
    (moves.len() as u64, bytes_moved)
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
