//! The block slab, the per-segment block lists, the pools' free indexes and the segments'
//! addresses: the bookkeeping every path of the allocator shares. Blocks are slab indices, never
//! pointers.

use super::events::{AddressHint, SegmentEvent, SegmentEventKind};
use super::{Block, Caching, FreeKey, Params, PoolId, Segment, State, UnmappedKey, NIL};
use crate::alloc::units::{align_up, MIB};
use crate::decision::AllocId;

/// Synthetic addresses are handed out on this alignment (the driver's 2 MiB granularity).
const ADDRESS_ALIGN: u64 = 2 * MIB;

impl Caching {
    pub(super) fn b(&self, i: u32) -> &Block {
        &self.blocks[i as usize]
    }

    pub(super) fn bm(&mut self, i: u32) -> &mut Block {
        &mut self.blocks[i as usize]
    }

    pub(super) fn seg(&self, id: u32) -> &Segment {
        self.segments.get(&id).expect("block of a known segment")
    }

    pub(super) fn seg_mut(&mut self, id: u32) -> &mut Segment {
        self.segments
            .get_mut(&id)
            .expect("block of a known segment")
    }

    /// Device address of block `i`.
    pub(super) fn addr(&self, i: u32) -> u64 {
        let b = self.b(i);
        self.seg(b.segment).address + b.offset
    }

    pub(super) fn new_block(&mut self, b: Block) -> u32 {
        match self.vacant.pop() {
            Some(i) => {
                self.blocks[i as usize] = b;
                i
            }
            None => {
                self.blocks.push(b);
                u32::try_from(self.blocks.len() - 1).expect("fewer than 2^32 blocks")
            }
        }
    }

    pub(super) fn drop_block(&mut self, i: u32) {
        let b = self.bm(i);
        b.state = State::Vacant;
        b.prev = NIL;
        b.next = NIL;
        self.vacant.push(i);
    }

    /// Makes `b` follow `a` in `segment`'s list; `a == NIL` makes `b` the first block.
    pub(super) fn link(&mut self, segment: u32, a: u32, b: u32) {
        if a == NIL {
            self.seg_mut(segment).first = b;
        } else {
            self.bm(a).next = b;
        }
        if b != NIL {
            self.bm(b).prev = a;
        }
    }

    pub(super) fn free_key(&self, i: u32) -> FreeKey {
        let b = self.b(i);
        (b.pool_id, b.stream, b.size, self.addr(i), i)
    }

    pub(super) fn unmapped_key(&self, i: u32) -> UnmappedKey {
        let b = self.b(i);
        (b.pool_id, b.stream, self.addr(i), i)
    }

    /// `insert_into_blocks`: indexes free block `i`, stamping its age base.
    pub(super) fn insert_free(&mut self, i: u32) {
        debug_assert_eq!(self.b(i).state, State::Free);
        let (pool_id, pool, size) = (self.b(i).pool_id, self.b(i).pool, self.b(i).size);
        self.bm(i).gc_base = if pool_id == super::DEFAULT_POOL {
            self.gc_calls[pool.index()]
        } else {
            0
        };
        let key = self.free_key(i);
        let p = &mut self.size_pools[pool.index()];
        let inserted = p.blocks.insert(key);
        debug_assert!(inserted, "free block indexed twice");
        p.free_bytes += size;
    }

    pub(super) fn remove_free(&mut self, i: u32) {
        let (key, pool, size) = (self.free_key(i), self.b(i).pool, self.b(i).size);
        let p = &mut self.size_pools[pool.index()];
        let removed = p.blocks.remove(&key);
        debug_assert!(removed, "free block not indexed");
        p.free_bytes -= size;
    }

    pub(super) fn insert_unmapped(&mut self, i: u32) {
        debug_assert_eq!(self.b(i).state, State::Unmapped);
        let (key, pool) = (self.unmapped_key(i), self.b(i).pool);
        let inserted = self.size_pools[pool.index()].unmapped.insert(key);
        debug_assert!(inserted, "unmapped block indexed twice");
    }

    pub(super) fn remove_unmapped(&mut self, i: u32) {
        let (key, pool) = (self.unmapped_key(i), self.b(i).pool);
        let removed = self.size_pools[pool.index()].unmapped.remove(&key);
        debug_assert!(removed, "unmapped block not indexed");
    }

    /// `try_merge_blocks`: absorbs neighbour `src` into `dst` (which is in no index yet) if both
    /// are free space of the same mapped state. `dst` survives.
    pub(super) fn try_merge(&mut self, dst: u32, src: u32) {
        if src == NIL {
            return;
        }
        let (d, s) = (*self.b(dst), *self.b(src));
        if s.state != d.state || !s.state.is_free_space() {
            return;
        }
        match s.state {
            State::Free => self.remove_free(src),
            _ => self.remove_unmapped(src),
        }
        if d.prev == src {
            self.bm(dst).offset = s.offset;
            self.link(d.segment, s.prev, dst);
        } else {
            debug_assert_eq!(d.next, src, "merge of blocks that do not touch");
            self.link(d.segment, dst, s.next);
        }
        self.bm(dst).size += s.size;
        self.drop_block(src);
    }

    pub(super) fn take_segment_id(&mut self) -> Option<u32> {
        let id = self.next_segment;
        self.next_segment = id.checked_add(1)?;
        Some(id)
    }

    /// Registers a segment under its id and address.
    pub(super) fn add_segment(&mut self, id: u32, segment: Segment) {
        let end = segment.address.saturating_add(segment.bytes);
        self.next_address = self
            .next_address
            .max(align_up(end, ADDRESS_ALIGN).unwrap_or(u64::MAX));
        self.by_address.insert(segment.address, id);
        self.segments.insert(id, segment);
    }

    /// Forgets a segment.
    pub(super) fn remove_segment(&mut self, id: u32) -> Segment {
        let seg = self.segments.remove(&id).expect("segment of a block");
        self.by_address.remove(&seg.address);
        seg
    }

    /// Whether `[address, address + bytes)` overlaps a segment held.
    pub(super) fn overlaps_a_segment(&self, address: u64, bytes: u64) -> bool {
        let end = address.saturating_add(bytes);
        let before = self.by_address.range(..end).next_back();
        before.is_some_and(|(&a, &id)| a.saturating_add(self.seg(id).bytes) > address)
    }

    /// The address of a new segment (or virtual range) of `bytes` that request `p` creates:
    /// the first unused hint of the recording that fits (same kind, stream and pool; the same
    /// size for a physical segment) and overlaps nothing, else the next synthetic address.
    pub(super) fn segment_address(&mut self, kind: SegmentEventKind, p: Params, bytes: u64) -> u64 {
        self.hinted_address(kind, p.stream, p.pool_id, bytes)
            .unwrap_or(self.next_address)
    }

    /// The first unused hint that fits a new segment of `bytes` (see [`Self::segment_address`]),
    /// used up.
    pub(super) fn hinted_address(
        &mut self,
        kind: SegmentEventKind,
        stream: u32,
        pool: PoolId,
        bytes: u64,
    ) -> Option<u64> {
        let fits = |h: &AddressHint| {
            h.kind == kind
                && h.stream == stream
                && h.pool == pool
                && (kind != SegmentEventKind::Alloc || h.bytes == bytes)
        };
        let found = (0..self.hints.len()).find(|&k| {
            fits(&self.hints[k]) && !self.overlaps_a_placed_segment(self.hints[k].address, bytes)
        })?;
        let address = self.hints.remove(found).address;
        // A range whose address no recording has named yet moves out of the way.
        let end = address.saturating_add(bytes);
        let in_the_way: Vec<u32> = self
            .by_address
            .range(..end)
            .filter(|&(&a, &id)| a.saturating_add(self.seg(id).bytes) > address)
            .map(|(_, &id)| id)
            .collect();
        for id in in_the_way {
            debug_assert!(self.unplaced.contains(&id));
            let to = self
                .next_address
                .max(align_up(end, ADDRESS_ALIGN).unwrap_or(u64::MAX));
            self.move_segment(id, to);
        }
        Some(address)
    }

    /// Whether `[address, address + bytes)` overlaps a segment held other than a virtual range
    /// no recording has named yet.
    fn overlaps_a_placed_segment(&self, address: u64, bytes: u64) -> bool {
        let end = address.saturating_add(bytes);
        for (&a, &id) in self.by_address.range(..end).rev() {
            if a.saturating_add(self.seg(id).bytes) <= address {
                return false;
            }
            if !self.unplaced.contains(&id) {
                return true;
            }
        }
        false
    }

    /// Moves segment `id` to `address`: a virtual range no recording has named yet, never
    /// mapped, so one unmapped block (re-indexed: its key holds its address).
    pub(super) fn move_segment(&mut self, id: u32, address: u64) {
        let (old, first) = (self.seg(id).address, self.seg(id).first);
        debug_assert!(
            self.b(first).state == State::Unmapped && self.b(first).next == NIL,
            "only a range never mapped moves"
        );
        self.remove_unmapped(first);
        self.by_address.remove(&old);
        self.by_address.insert(address, id);
        self.seg_mut(id).address = address;
        self.insert_unmapped(first);
        let end = address.saturating_add(self.seg(id).bytes);
        self.next_address = self
            .next_address
            .max(align_up(end, ADDRESS_ALIGN).unwrap_or(u64::MAX));
    }

    /// A map of `[address, …)` into a range the allocator holds is the recording's `segment_map`
    /// at that address, if it names one: that hint is used up, so that a range the request
    /// creates later (after its retry released the range just mapped into) takes the next map
    /// the recording names, not the one made into the old range.
    pub(super) fn use_map_hint(&mut self, address: u64, stream: u32, pool: PoolId) {
        let k = self.hints.iter().position(|h| {
            h.kind == SegmentEventKind::Map
                && h.address == address
                && h.stream == stream
                && h.pool == pool
        });
        if let Some(k) = k {
            self.hints.remove(k);
        }
    }

    /// Addresses the recording gave the segments (`segment_alloc`) and virtual ranges (first
    /// `segment_map`) the next request creates; replaces any left from the request before.
    pub fn set_address_hints(&mut self, hints: Vec<AddressHint>) {
        self.hints = hints;
    }

    /// Synthetic addresses start at or above `floor` (the end of every address a recording
    /// names), so that they never collide with a recorded one.
    pub fn set_address_floor(&mut self, floor: u64) {
        let floor = align_up(floor, ADDRESS_ALIGN).unwrap_or(u64::MAX);
        self.next_address = self.next_address.max(floor);
    }

    /// Starts (or stops) keeping the segment events.
    pub fn record_segment_events(&mut self, on: bool) {
        self.events = on.then(Vec::new);
    }

    /// The segment events since the last call, in order.
    pub fn take_segment_events(&mut self) -> Vec<SegmentEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The pending frees `release_cached_blocks` completed (`synchronize_and_free_events`:
    /// `empty_cache`, or a retry) since the last call, when recording segment events: each with
    /// the number of segment events made before it since the last
    /// [`Self::take_segment_events`], which is where PyTorch traces its `free_completed`.
    pub fn take_completions(&mut self) -> Vec<(AllocId, usize)> {
        std::mem::take(&mut self.completions)
    }

    pub(super) fn emit(
        &mut self,
        kind: SegmentEventKind,
        address: u64,
        bytes: u64,
        stream: u32,
        pool: PoolId,
    ) {
        if let Some(events) = &mut self.events {
            events.push(SegmentEvent {
                kind,
                address,
                bytes,
                stream,
                pool,
            });
        }
    }

    pub(super) fn charge(&mut self, bytes: u64) {
        self.reserved_bytes += bytes;
        let peak = &mut self.counters.reserved_bytes_peak;
        *peak = (*peak).max(self.reserved_bytes);
        self.counters.num_device_alloc += 1;
    }

    pub(super) fn change_live(&mut self, segment: u32, bytes: u64, added: bool) {
        let s = self.seg_mut(segment);
        let before = s.inactive_split_bytes();
        if added {
            s.live_count += 1;
            s.live_bytes += bytes;
        } else {
            s.live_count -= 1;
            s.live_bytes -= bytes;
        }
        let after = s.inactive_split_bytes();
        self.inactive_split_bytes = self.inactive_split_bytes - before + after;
    }
}
