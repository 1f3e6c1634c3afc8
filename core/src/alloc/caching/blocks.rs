//! The block slab, the per-segment block lists and the pools' free indexes: the bookkeeping
//! every path of the allocator shares. Blocks are slab indices, never pointers.

use super::{Block, Caching, FreeKey, Segment, State, UnmappedKey, NIL};

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
        (b.stream, b.size, b.segment, b.offset, i)
    }

    pub(super) fn unmapped_key(&self, i: u32) -> UnmappedKey {
        let b = self.b(i);
        (b.stream, b.segment, b.offset, i)
    }

    pub(super) fn insert_free(&mut self, i: u32) {
        debug_assert_eq!(self.b(i).state, State::Free);
        let (key, pool, size) = (self.free_key(i), self.b(i).pool, self.b(i).size);
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
