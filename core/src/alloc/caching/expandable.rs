//! Expandable segments (`expandable_segments:True`, notes §1.10).
//!
//! Each (stream, pool) gets a virtual range, created lazily (`ReserveVa`) when no existing one
//! can fit a request, of ⌈1.125 × capacity / page⌉ pages (`totalGlobalMem + totalGlobalMem / 8`;
//! the books do not charge address space). Pages are 2 MiB in the small pool and 20 MiB in the
//! large one. A range starts as one unmapped block. A miss maps whole pages at the lowest address
//! that can fit the rounded request (a run of free mapped and unmapped blocks), merges and splits
//! with any remainder of at least 512 B; `empty_cache` unmaps the whole pages strictly inside
//! free blocks and releases a range once it is entirely unmapped. Unmapped blocks therefore
//! always start and end on page boundaries, and a block never spans two ranges.

use super::events::SegmentEventKind;
use super::{Block, Caching, Params, Segment, SizePool, State, NIL};
use crate::decision::{Decision, SegmentId};
use crate::executor::Executor;

impl Caching {
    /// Length of every expandable range of `pool`: whole pages covering 1⅛ × the capacity.
    pub fn va_range_bytes(&self, pool: SizePool) -> u64 {
        let page = u128::from(pool.page_bytes());
        let want = u128::from(self.capacity_bytes) + u128::from(self.capacity_bytes / 8);
        let bytes = want.div_ceil(page) * page;
        u64::try_from(bytes).unwrap_or(u64::MAX / (page as u64) * page as u64)
    }

    /// `try_allocate_expandable_block`: a free mapped block of at least `size` (the rounded
    /// request), in no index, or `None` if a mapping was refused. Pages mapped before a refusal
    /// stay mapped (as free memory), as in PyTorch.
    ///
    /// A request larger than a whole range fails without reserving one (PyTorch would reserve
    /// a range and fail to map it).
    pub(super) fn try_allocate_expandable_block(
        &mut self,
        p: Params,
        mem: &mut dyn Executor,
    ) -> Option<u32> {
        let size = p.size;
        if size > self.va_range_bytes(p.pool) {
            return None;
        }
        let mut candidate = match self.find_expandable_block(p) {
            Some(c) => c,
            None => self.new_va_range(p, mem)?,
        };
        if self.b(candidate).state == State::Unmapped {
            let bytes = size.min(self.b(candidate).size);
            candidate = self.map_block(candidate, bytes, mem)?;
        }
        while self.b(candidate).size < size {
            // Invariant: free → unmapped → … covers `size`.
            let next = self.b(candidate).next;
            assert!(
                next != NIL && self.b(next).state == State::Unmapped,
                "expandable run ends before {size} bytes"
            );
            let remaining = size - self.b(candidate).size;
            let bytes = remaining.min(self.b(next).size);
            candidate = self.map_block(next, bytes, mem)?;
        }
        self.remove_free(candidate);
        Some(candidate)
    }

    /// `find_expandable_block`: for each unmapped block of `stream` in address order, a run
    /// starting at it (or at the free mapped block right before it) of free and unmapped blocks
    /// totalling at least `size`. Returns the run's first block.
    fn find_expandable_block(&self, p: Params) -> Option<u32> {
        let allocatable = |i: u32| i != NIL && self.b(i).state.is_free_space();
        let size = p.size;
        let unmapped = &self.size_pools[p.pool.index()].unmapped;
        for &(pool_id, s, _, u) in unmapped.range((p.pool_id, p.stream, 0, 0)..) {
            if (pool_id, s) != (p.pool_id, p.stream) {
                break;
            }
            let prev = self.b(u).prev;
            let start = if allocatable(prev) { prev } else { u };
            let mut bytes = 0u64;
            let mut b = start;
            while bytes < size && allocatable(b) {
                bytes += self.b(b).size;
                b = self.b(b).next;
            }
            if bytes >= size {
                return Some(start);
            }
        }
        None
    }

    /// Reserves a new range for the request's (stream, pool): one unmapped block, indexed. Its
    /// address is the recording's first `segment_map` of the request, if any.
    fn new_va_range(&mut self, p: Params, mem: &mut dyn Executor) -> Option<u32> {
        let bytes = self.va_range_bytes(p.pool);
        let id = self.take_segment_id()?;
        let reserve = Decision::ReserveVa {
            segment: SegmentId::arena(id),
            bytes,
        };
        mem.apply(reserve).ok()?;
        let hinted = self.hinted_address(SegmentEventKind::Map, p.stream, p.pool_id, bytes);
        let address = hinted.unwrap_or(self.next_address);
        if hinted.is_none() {
            self.unplaced.push(id);
        }
        let block = Block {
            segment: id,
            pool_id: p.pool_id,
            stream: p.stream,
            pool: p.pool,
            offset: 0,
            size: bytes,
            prev: NIL,
            next: NIL,
            state: State::Unmapped,
            gc_base: 0,
        };
        let first = self.new_block(block);
        let segment = Segment {
            address,
            pool_id: p.pool_id,
            stream: p.stream,
            pool: p.pool,
            bytes,
            expandable: true,
            first,
            mapped_bytes: 0,
            live_count: 0,
            live_bytes: 0,
        };
        self.add_segment(id, segment);
        self.insert_unmapped(first);
        Some(first)
    }

    /// `map_block`: maps ⌈bytes / page⌉ pages at the start of unmapped block `i`, leaving the
    /// rest unmapped; the mapped part merges with free mapped neighbours and is indexed as free.
    /// Returns the merged block, or `None` (nothing changed) if the mapping was refused.
    fn map_block(&mut self, i: u32, bytes: u64, mem: &mut dyn Executor) -> Option<u32> {
        let b = *self.b(i);
        debug_assert_eq!(b.state, State::Unmapped);
        let page = b.pool.page_bytes();
        let bytes = bytes.div_ceil(page) * page;
        debug_assert_eq!(b.offset % page, 0, "unmapped block off a page boundary");
        debug_assert!(bytes <= b.size && bytes > 0);
        let map = Decision::Map {
            segment: SegmentId::arena(b.segment),
            offset: b.offset,
            bytes,
        };
        mem.apply(map).ok()?;
        self.place_range(b.segment);
        self.remove_unmapped(i);
        if bytes < b.size {
            let rest = self.new_block(Block {
                offset: b.offset + bytes,
                size: b.size - bytes,
                ..b
            });
            self.link(b.segment, rest, b.next);
            self.link(b.segment, i, rest);
            self.bm(i).size = bytes;
            self.insert_unmapped(rest);
        }
        self.bm(i).state = State::Free;
        let (prev, next) = (self.b(i).prev, self.b(i).next);
        self.try_merge(i, prev);
        self.try_merge(i, next);
        self.insert_free(i);
        self.charge(bytes);
        self.seg_mut(b.segment).mapped_bytes += bytes;
        let address = self.seg(b.segment).address + b.offset;
        self.use_map_hint(address, b.stream, b.pool_id);
        self.emit(SegmentEventKind::Map, address, bytes, b.stream, b.pool_id);
        Some(i)
    }

    /// The first map of a range reserved at a synthetic address: PyTorch reserved it (in
    /// `find_expandable_block`) for a request whose map failed, and the recording names its
    /// address only now. It moves to the first map the recording names for the request, if
    /// one fits.
    fn place_range(&mut self, segment: u32) {
        let Some(k) = self.unplaced.iter().position(|&s| s == segment) else {
            return;
        };
        self.unplaced.swap_remove(k);
        let seg = self.seg(segment);
        let (old, stream, pool_id, bytes) = (seg.address, seg.stream, seg.pool_id, seg.bytes);
        // Overlapping its own synthetic place is no obstacle.
        self.by_address.remove(&old);
        let hinted = self.hinted_address(SegmentEventKind::Map, stream, pool_id, bytes);
        self.by_address.insert(old, segment);
        if let Some(address) = hinted {
            self.move_segment(segment, address);
        }
    }

    /// `unmap_block`: unmaps the whole pages strictly inside free block `i`; the partial pages
    /// at its ends stay free and mapped. The unmapped part merges with unmapped neighbours.
    pub(super) fn unmap_block(&mut self, i: u32, mem: &mut dyn Executor) {
        let b = *self.b(i);
        debug_assert_eq!(b.state, State::Free);
        let page = b.pool.page_bytes();
        let end = b.offset + b.size;
        let begin = b.offset.div_ceil(page) * page;
        let stop = end / page * page;
        if begin >= stop {
            return;
        }
        let unmap = Decision::Unmap {
            segment: SegmentId::arena(b.segment),
            offset: begin,
            bytes: stop - begin,
        };
        mem.apply(unmap).expect("unmap is never refused");
        self.remove_free(i);
        if begin > b.offset {
            let before = self.new_block(Block {
                size: begin - b.offset,
                ..b
            });
            self.link(b.segment, b.prev, before);
            self.link(b.segment, before, i);
            self.insert_free(before);
        }
        if stop < end {
            let after = self.new_block(Block {
                offset: stop,
                size: end - stop,
                ..b
            });
            self.link(b.segment, after, b.next);
            self.link(b.segment, i, after);
            self.insert_free(after);
        }
        let m = self.bm(i);
        m.offset = begin;
        m.size = stop - begin;
        m.state = State::Unmapped;
        let (prev, next) = (m.prev, m.next);
        self.try_merge(i, prev);
        self.try_merge(i, next);
        self.insert_unmapped(i);
        self.reserved_bytes -= stop - begin;
        self.seg_mut(b.segment).mapped_bytes -= stop - begin;
        self.counters.num_device_free += 1;
        let address = self.seg(b.segment).address + begin;
        self.emit(
            SegmentEventKind::Unmap,
            address,
            stop - begin,
            b.stream,
            b.pool_id,
        );
    }

    /// `release_expandable_segment`: frees the range whose only block is the unmapped `i`.
    pub(super) fn release_va_range(&mut self, i: u32, mem: &mut dyn Executor) {
        let segment = self.b(i).segment;
        self.remove_unmapped(i);
        self.drop_block(i);
        let seg = self.remove_segment(segment);
        self.unplaced.retain(|&s| s != segment);
        debug_assert_eq!(seg.mapped_bytes, 0);
        let release = Decision::ReleaseVa {
            segment: SegmentId::arena(segment),
        };
        mem.apply(release)
            .expect("releasing address space is never refused");
    }
}
