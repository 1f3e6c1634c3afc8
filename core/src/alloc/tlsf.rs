//! `tlsf`: Two-Level Segregated Fit over the arena (Masmano, Ripoll, Crespo, Real, ECRTS 2004).
//!
//! Sizes are counted in units of the alignment. The first level is `floor(log2 units)` (stored
//! as `floor(log2 units) − SL_LOG2 + 1`), the second splits each power-of-two range into
//! [`SL_COUNT`] linear sub-ranges; sizes below [`SL_COUNT`] units share first level 0 with one
//! class per unit. `alloc` rounds the request up to the next sub-range boundary
//! ([`mapping_search`]), so every block in the list found fits, and takes the first non-empty
//! list at or above it through two bitmaps (trailing zeros): O(1). The front of the block is
//! used and the remainder goes back as a free block. `free` coalesces with both physical
//! neighbours in O(1). Only where that good-fit search finds nothing — where plain TLSF would
//! report out of memory — is the request's own class scanned for a block that happens to be
//! large enough, so a request that one free block could hold is never refused.
//!
//! Metadata lives out of band: a slab of 32-byte block headers holds every block (live or free)
//! with the indices of its physical neighbours and, when free, of its neighbours in its
//! size-class list (intrusive doubly linked lists). Slab entries are recycled through a
//! free-slot list, and a table indexed by `AllocId` points at the block of each live allocation.
//! Nothing on the hot path allocates once these vectors have grown to the working set.

use serde::{Deserialize, Serialize};

use super::arena::{check_tiling, slide_down, tile, Arena};
use super::defrag::Compaction;
use super::layout::{FreeSummary, LiveBlock, SegmentLayout};
use super::strategy::{AllocConfig, AllocError, AllocRequest, Allocate, Strategy};
use crate::decision::{AllocId, Loc};
use crate::executor::Executor;

/// log2 of the number of second-level classes per first-level class.
pub const SL_LOG2: u32 = 5;
/// Second-level classes per first-level class.
pub const SL_COUNT: u32 = 1 << SL_LOG2;
/// Blocks of the request's own class tried before good fit: a block there that fits keeps the
/// larger blocks whole (on the peers benchmark's stream, 0.116% refused → 0.070%, against
/// xalloc's 0.095%), and a few probes keep the allocation O(1).
const OWN_CLASS_PROBES: usize = 4;
/// "No block": the end of a list or of the physical chain.
const NIL: u32 = u32::MAX;
/// `prev_free` of a live block.
const LIVE: u32 = u32::MAX - 1;
/// `prev_free` of a recycled slab entry.
const VACANT: u32 = u32::MAX - 2;
/// Slab indices stay below the markers.
const MAX_BLOCKS: usize = (u32::MAX - 2) as usize;

/// The class `(fl, sl)` a free block of `units` alignment units is filed under.
///
/// Without a branch: sizes either side of [`SL_COUNT`] units alternate at random, and the
/// branch between the linear and the logarithmic range was a third of `tlsf`'s mispredicted
/// branches on the peers benchmark. Below [`SL_COUNT`] the level computes as that of
/// `SL_COUNT − 1` (first level 0) and the shift as 0, so the second level is `units` itself.
#[inline]
pub fn mapping_insert(units: u64) -> (u32, u32) {
    debug_assert!(units > 0);
    let f = 63 - (units | (SL_COUNT as u64 - 1)).leading_zeros();
    let shift = f.max(SL_LOG2) - SL_LOG2;
    let sl = (units >> shift) as u32 & (SL_COUNT - 1);
    (f + 1 - SL_LOG2, sl)
}

/// The lowest class whose every block holds `units`: the request rounded up to the next
/// sub-range boundary (below [`SL_COUNT`] units every class holds one size: no rounding).
#[inline]
pub fn mapping_search(units: u64) -> (u32, u32) {
    let f = 63 - (units | (SL_COUNT as u64 - 1)).leading_zeros();
    let shift = f.max(SL_LOG2) - SL_LOG2;
    mapping_insert(units + (1u64 << shift) - 1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Live,
    /// A recycled slab entry, linked through `next_free` in the free-slot list.
    Vacant,
}

/// One block of the arena, live or free: 32 bytes, two to a cache line. The state is encoded
/// in `prev_free` ([`LIVE`], [`VACANT`], else free); what a live block holds is in
/// `Tlsf::owners`, which the free path never reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(C, align(32))]
struct BlockHeader {
    offset: u64,
    bytes: u64,
    /// Physical neighbours (lower and higher address), `NIL` at the ends of the range.
    prev_phys: u32,
    next_phys: u32,
    /// Neighbours in the size-class list while free; `next_free` also links vacant slots.
    prev_free: u32,
    next_free: u32,
}

impl BlockHeader {
    const VACANT: BlockHeader = BlockHeader {
        offset: 0,
        bytes: 0,
        prev_phys: NIL,
        next_phys: NIL,
        prev_free: VACANT,
        next_free: NIL,
    };

    #[inline]
    fn state(&self) -> State {
        match self.prev_free {
            LIVE => State::Live,
            VACANT => State::Vacant,
            _ => State::Free,
        }
    }

    #[inline]
    fn is_free(&self) -> bool {
        !matches!(self.prev_free, LIVE | VACANT)
    }
}

/// What a live block holds, at its slab index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    id: u64,
    requested_bytes: u64,
    pinned: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tlsf {
    alignment_bytes: u64,
    align_log2: u32,
    arena: Arena,
    /// Number of first-level classes the range needs.
    fl_count: u32,
    /// Bit `fl` set iff some list of first level `fl` is non-empty.
    fl_bitmap: u64,
    /// Per first level: bit `sl` set iff list `(fl, sl)` is non-empty.
    sl_bitmap: Vec<u32>,
    /// Head of list `(fl, sl)` at `fl * SL_COUNT + sl`.
    heads: Vec<u32>,
    blocks: Vec<BlockHeader>,
    /// Parallel to `blocks`: the allocation in each live block (stale for other blocks).
    owners: Vec<Owner>,
    /// Head of the free-slot list of `blocks`.
    vacant: u32,
    /// The block at offset 0 and the block that ends at the end of the range.
    first: u32,
    last: u32,
    /// Indexed by `AllocId`: the live block, or `NIL`.
    live: Vec<u32>,
    live_count: u64,
    allocated_bytes: u64,
    /// The largest free block other than `last`, once [`Tlsf::largest_free`] has looked.
    #[serde(skip)]
    largest: LargestCache,
}

/// The largest free block other than the last, or [`LargestCache::UNKNOWN`]: a free block
/// filed raises it, removing one as large forgets it, and only then does the next look scan a
/// list. Statistics sampled after every operation read it; it is never part of the state (two
/// allocators that differ only here are equal).
#[derive(Clone, Debug)]
struct LargestCache(std::cell::Cell<u64>);

impl LargestCache {
    const UNKNOWN: u64 = u64::MAX;

    #[inline]
    fn filed(&self, bytes: u64) {
        let c = self.0.get();
        if c != Self::UNKNOWN && bytes > c {
            self.0.set(bytes);
        }
    }

    #[inline]
    fn removed(&self, bytes: u64) {
        if bytes >= self.0.get() {
            self.0.set(Self::UNKNOWN);
        }
    }

    fn forget(&self) {
        self.0.set(Self::UNKNOWN);
    }
}

impl Default for LargestCache {
    fn default() -> Self {
        LargestCache(std::cell::Cell::new(Self::UNKNOWN))
    }
}

impl PartialEq for LargestCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Tlsf {
    pub fn new(config: &AllocConfig) -> Self {
        let arena = Arena::new(config);
        let align_log2 = config.alignment_bytes.trailing_zeros();
        let fl_count = mapping_insert(arena.range_bytes >> align_log2).0 + 1;
        let mut t = Tlsf {
            alignment_bytes: config.alignment_bytes,
            align_log2,
            fl_count,
            fl_bitmap: 0,
            sl_bitmap: vec![0; fl_count as usize],
            heads: vec![NIL; (fl_count * SL_COUNT) as usize],
            blocks: Vec::new(),
            owners: Vec::new(),
            vacant: NIL,
            first: NIL,
            last: NIL,
            live: Vec::new(),
            live_count: 0,
            allocated_bytes: 0,
            largest: LargestCache::default(),
            arena,
        };
        t.rebuild(&[]);
        t
    }

    #[inline]
    fn class_of(&self, bytes: u64) -> (u32, u32) {
        mapping_insert(bytes >> self.align_log2)
    }

    /// The first non-empty list at or above `(fl, sl)`.
    #[inline]
    fn find_suitable(&self, fl: u32, sl: u32) -> Option<u32> {
        if fl >= self.fl_count {
            return None;
        }
        let sl_map = self.sl_bitmap[fl as usize] & (u32::MAX << sl);
        let (fl, sl) = if sl_map != 0 {
            (fl, sl_map.trailing_zeros())
        } else {
            let fl_map = self.fl_bitmap & (u64::MAX << (fl + 1));
            if fl_map == 0 {
                return None;
            }
            let fl = fl_map.trailing_zeros();
            (fl, self.sl_bitmap[fl as usize].trailing_zeros())
        };
        Some(self.heads[(fl * SL_COUNT + sl) as usize])
    }

    /// The first block of the request's own class, among its first `probes`, that is large
    /// enough (good fit rounds up past that class, so it would split a larger block instead).
    #[inline]
    fn scan_own_class(&self, bytes: u64, probes: usize) -> Option<u32> {
        let (fl, sl) = self.class_of(bytes);
        let mut i = self.heads[(fl * SL_COUNT + sl) as usize];
        let mut probed = 0;
        while i != NIL && probed < probes {
            if self.blocks[i as usize].bytes >= bytes {
                return Some(i);
            }
            i = self.blocks[i as usize].next_free;
            probed += 1;
        }
        None
    }

    #[inline(always)]
    fn insert_free(&mut self, i: u32) {
        let bytes = self.blocks[i as usize].bytes;
        if i != self.last {
            self.largest.filed(bytes);
        }
        let (fl, sl) = self.class_of(bytes);
        let h = (fl * SL_COUNT + sl) as usize;
        let head = self.heads[h];
        {
            let b = &mut self.blocks[i as usize];
            b.prev_free = NIL;
            b.next_free = head;
        }
        // The old head points back at `i`; with no old head, `i`'s own `prev_free` is
        // rewritten as the NIL it already is. A select, not a branch: whether a list is empty
        // is as good as random.
        let (fix, back) = if head != NIL { (head, i) } else { (i, NIL) };
        self.blocks[fix as usize].prev_free = back;
        self.heads[h] = i;
        self.sl_bitmap[fl as usize] |= 1 << sl;
        self.fl_bitmap |= 1 << fl;
    }

    #[inline(always)]
    fn remove_free(&mut self, i: u32) {
        let b = self.blocks[i as usize];
        debug_assert_eq!(b.state(), State::Free);
        if i != self.last {
            self.largest.removed(b.bytes);
        }
        // Selects, not branches, as in `insert_free`: a link that has no neighbour to go to
        // rewrites `i`'s own field with the value it holds, the head is rewritten unchanged
        // unless `i` was it, and a list's bit is cleared only when that left it empty.
        let (fl, sl) = self.class_of(b.bytes);
        let h = (fl * SL_COUNT + sl) as usize;
        let was_head = b.prev_free == NIL;
        let before = if was_head { i } else { b.prev_free };
        self.blocks[before as usize].next_free = b.next_free;
        let after = if b.next_free != NIL { b.next_free } else { i };
        self.blocks[after as usize].prev_free = b.prev_free;
        let head = if was_head { b.next_free } else { self.heads[h] };
        self.heads[h] = head;
        self.sl_bitmap[fl as usize] &= !(((head == NIL) as u32) << sl);
        let sl_empty = self.sl_bitmap[fl as usize] == 0;
        self.fl_bitmap &= !((sl_empty as u64) << fl);
    }

    #[inline]
    fn take_slot(&mut self) -> u32 {
        if self.vacant != NIL {
            let i = self.vacant;
            self.vacant = self.blocks[i as usize].next_free;
            i
        } else {
            assert!(self.blocks.len() < MAX_BLOCKS, "too many blocks");
            self.blocks.push(BlockHeader::VACANT);
            self.owners.push(Owner::default());
            (self.blocks.len() - 1) as u32
        }
    }

    #[inline]
    fn release_slot(&mut self, i: u32) {
        self.blocks[i as usize] = BlockHeader {
            next_free: self.vacant,
            ..BlockHeader::VACANT
        };
        self.vacant = i;
    }

    fn live_index(&self, id: AllocId) -> u32 {
        match self.live.get(id.0 as usize) {
            Some(&i) if i != NIL => i,
            _ => panic!("free of {id:?}, which is not live"),
        }
    }

    /// Start of the free block that runs to the end of the range (the top), or the range end.
    fn top(&self) -> u64 {
        let last = &self.blocks[self.last as usize];
        if last.is_free() {
            last.offset
        } else {
            self.arena.range_bytes
        }
    }

    /// Largest free extent inside mapped memory. Only the last block can reach beyond mapped
    /// memory; every other free block lies below a live block. The largest of the others is
    /// kept ([`LargestCache`]) and found again only when a block that large left its list.
    #[inline]
    fn largest_free(&self) -> u64 {
        let last = &self.blocks[self.last as usize];
        let tail = if last.is_free() {
            self.arena.mapped_part(last.offset, last.bytes)
        } else {
            0
        };
        let mut others = self.largest.0.get();
        if others == LargestCache::UNKNOWN {
            others = self.largest_other();
            self.largest.0.set(others);
        }
        others.max(tail)
    }

    /// The largest free block other than the last (0 if none): it is in the highest non-empty
    /// list that holds one, so only that list is scanned.
    fn largest_other(&self) -> u64 {
        let mut fl_map = self.fl_bitmap;
        while fl_map != 0 {
            let fl = 63 - fl_map.leading_zeros();
            let mut sl_map = self.sl_bitmap[fl as usize];
            while sl_map != 0 {
                let sl = 31 - sl_map.leading_zeros();
                let mut best = 0;
                let mut i = self.heads[(fl * SL_COUNT + sl) as usize];
                while i != NIL {
                    if i != self.last {
                        best = best.max(self.blocks[i as usize].bytes);
                    }
                    i = self.blocks[i as usize].next_free;
                }
                if best > 0 {
                    return best;
                }
                sl_map &= !(1 << sl);
            }
            fl_map &= !(1 << fl);
        }
        0
    }

    /// Rebuilds every block, list and bitmap from live blocks in address order (which carry
    /// their final offsets).
    fn rebuild(&mut self, blocks: &[LiveBlock]) {
        // `last` is stale until the end: nothing filed below may count.
        self.largest.forget();
        self.fl_bitmap = 0;
        self.sl_bitmap.iter_mut().for_each(|m| *m = 0);
        self.heads.iter_mut().for_each(|h| *h = NIL);
        self.blocks.clear();
        self.owners.clear();
        self.vacant = NIL;
        self.live.iter_mut().for_each(|l| *l = NIL);
        self.live_count = 0;
        self.allocated_bytes = 0;
        let mut prev = NIL;
        let range = self.arena.range_bytes;
        tile(blocks, range, |offset, bytes, live| {
            let i = self.take_slot();
            self.blocks[i as usize] = BlockHeader {
                offset,
                bytes,
                prev_phys: prev,
                ..BlockHeader::VACANT
            };
            if prev != NIL {
                self.blocks[prev as usize].next_phys = i;
            }
            match live {
                Some(l) => {
                    self.blocks[i as usize].prev_free = LIVE;
                    self.owners[i as usize] = Owner {
                        id: l.id.0,
                        requested_bytes: l.requested_bytes,
                        pinned: l.pinned,
                    };
                    self.live[l.id.0 as usize] = i;
                    self.live_count += 1;
                    self.allocated_bytes += bytes;
                }
                None => self.insert_free(i),
            }
            prev = i;
        });
        self.first = 0;
        self.last = prev;
        self.largest.forget();
    }
}

impl Allocate for Tlsf {
    fn strategy(&self) -> Strategy {
        Strategy::Tlsf
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError> {
        let bytes = self.arena.round_request(req.bytes, self.alignment_bytes)?;
        let oom = AllocError::OutOfMemory {
            rounded_bytes: bytes,
        };
        let (fl, sl) = mapping_search(bytes >> self.align_log2);
        let i = match self
            .scan_own_class(bytes, OWN_CLASS_PROBES)
            .or_else(|| self.find_suitable(fl, sl))
        {
            Some(i) => i,
            None => self.scan_own_class(bytes, usize::MAX).ok_or(oom)?,
        };
        let b = self.blocks[i as usize];
        let end = b.offset + bytes;
        if end > self.arena.mapped_bytes {
            self.arena.ensure_mapped(end, mem).map_err(|_| oom)?;
        }
        let slot = req.id.0 as usize;
        if slot >= self.live.len() {
            self.live.resize(slot + 1, NIL);
        }
        assert!(self.live[slot] == NIL, "{:?} allocated twice", req.id);
        self.remove_free(i);
        if b.bytes > bytes {
            let r = self.take_slot();
            self.blocks[r as usize] = BlockHeader {
                offset: end,
                bytes: b.bytes - bytes,
                prev_phys: i,
                next_phys: b.next_phys,
                ..BlockHeader::VACANT
            };
            if b.next_phys != NIL {
                self.blocks[b.next_phys as usize].prev_phys = r;
            } else {
                self.last = r;
            }
            self.blocks[i as usize].next_phys = r;
            self.insert_free(r);
        }
        let h = &mut self.blocks[i as usize];
        h.bytes = bytes;
        h.prev_free = LIVE;
        self.owners[i as usize] = Owner {
            id: req.id.0,
            requested_bytes: req.bytes,
            pinned: req.pinned,
        };
        self.live[slot] = i;
        self.live_count += 1;
        self.allocated_bytes += bytes;
        Ok(Arena::place(req.id, b.offset, bytes, mem))
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        let mut i = self.live_index(id);
        self.live[id.0 as usize] = NIL;
        let b = self.blocks[i as usize];
        self.live_count -= 1;
        self.allocated_bytes -= b.bytes;
        Arena::free(id, b.offset, b.bytes, mem);
        let next = b.next_phys;
        if next != NIL && self.blocks[next as usize].is_free() {
            self.remove_free(next);
            let n = self.blocks[next as usize];
            let h = &mut self.blocks[i as usize];
            h.bytes += n.bytes;
            h.next_phys = n.next_phys;
            if n.next_phys != NIL {
                self.blocks[n.next_phys as usize].prev_phys = i;
            } else {
                self.last = i;
            }
            self.release_slot(next);
        }
        let prev = b.prev_phys;
        if prev != NIL && self.blocks[prev as usize].is_free() {
            self.remove_free(prev);
            let h = self.blocks[i as usize];
            let p = &mut self.blocks[prev as usize];
            p.bytes += h.bytes;
            p.next_phys = h.next_phys;
            if h.next_phys != NIL {
                self.blocks[h.next_phys as usize].prev_phys = prev;
            } else {
                self.last = prev;
            }
            self.release_slot(i);
            i = prev;
        }
        self.insert_free(i);
    }

    fn empty_cache(&mut self, mem: &mut dyn Executor) {
        let top = self.top();
        self.arena.trim(top, mem);
    }

    fn free_summary(&self) -> FreeSummary {
        FreeSummary::single(
            self.arena.mapped_bytes - self.allocated_bytes,
            self.largest_free(),
        )
    }

    fn live_blocks(&self) -> Vec<LiveBlock> {
        let mut blocks = Vec::with_capacity(self.live_count as usize);
        let mut i = self.first;
        while i != NIL {
            let b = &self.blocks[i as usize];
            if b.state() == State::Live {
                let o = &self.owners[i as usize];
                blocks.push(LiveBlock {
                    id: AllocId(o.id),
                    at: Arena::loc(b.offset),
                    bytes: b.bytes,
                    requested_bytes: o.requested_bytes,
                    pinned: o.pinned,
                });
            }
            i = b.next_phys;
        }
        blocks
    }

    fn reserved_bytes(&self) -> u64 {
        self.arena.mapped_bytes
    }

    fn layout(&self) -> Vec<SegmentLayout> {
        self.arena.layout(&self.live_blocks())
    }

    fn check_invariants(&self) -> Result<(), String> {
        let n = self.blocks.len();
        let idx_ok = |i: u32| i == NIL || (i as usize) < n;
        // Physical chain: tiles the range, links agree both ways.
        let mut pieces = Vec::new();
        let mut free_in_chain = 0usize;
        let mut live_in_chain = 0usize;
        let mut prev = NIL;
        let mut i = self.first;
        if self.first != 0 && n > 0 {
            return Err(format!("first block is {}, not 0", self.first));
        }
        while i != NIL {
            if !idx_ok(i) || pieces.len() > n {
                return Err(format!("physical chain broken at {i}"));
            }
            let b = &self.blocks[i as usize];
            if b.prev_phys != prev {
                return Err(format!("block {i}: prev_phys {} ≠ {prev}", b.prev_phys));
            }
            match b.state() {
                State::Free => free_in_chain += 1,
                State::Live => live_in_chain += 1,
                State::Vacant => return Err(format!("vacant slot {i} in the physical chain")),
            }
            if (b.offset | b.bytes) & (self.alignment_bytes - 1) != 0 {
                return Err(format!("block {i} misaligned: {}+{}", b.offset, b.bytes));
            }
            pieces.push((b.offset, b.bytes, b.state() == State::Live));
            prev = i;
            i = b.next_phys;
        }
        if prev != self.last {
            return Err(format!("chain ends at {prev}, last is {}", self.last));
        }
        check_tiling(&pieces, self.arena.range_bytes)?;
        // Size-class lists and bitmaps.
        let mut free_in_lists = 0usize;
        let mut fl_expect = 0u64;
        for fl in 0..self.fl_count {
            let mut sl_expect = 0u32;
            for sl in 0..SL_COUNT {
                let mut prev = NIL;
                let mut i = self.heads[(fl * SL_COUNT + sl) as usize];
                if i != NIL {
                    sl_expect |= 1 << sl;
                }
                while i != NIL {
                    if !idx_ok(i) || free_in_lists > n {
                        return Err(format!("list ({fl},{sl}) broken at {i}"));
                    }
                    let b = &self.blocks[i as usize];
                    if b.state() != State::Free {
                        return Err(format!("block {i} in list ({fl},{sl}) is not free"));
                    }
                    if b.prev_free != prev {
                        return Err(format!("block {i}: prev_free {} ≠ {prev}", b.prev_free));
                    }
                    if self.class_of(b.bytes) != (fl, sl) {
                        return Err(format!(
                            "block {i} of {} bytes in list ({fl},{sl})",
                            b.bytes
                        ));
                    }
                    free_in_lists += 1;
                    prev = i;
                    i = b.next_free;
                }
            }
            if sl_expect != self.sl_bitmap[fl as usize] {
                return Err(format!(
                    "second-level bitmap of {fl} disagrees with its lists"
                ));
            }
            if sl_expect != 0 {
                fl_expect |= 1 << fl;
            }
        }
        if fl_expect != self.fl_bitmap {
            return Err("first-level bitmap disagrees with the lists".into());
        }
        let kept = self.largest.0.get();
        if kept != LargestCache::UNKNOWN && kept != self.largest_other() {
            return Err(format!(
                "largest free block kept as {kept}, lists say {}",
                self.largest_other()
            ));
        }
        if free_in_lists != free_in_chain {
            return Err(format!(
                "{free_in_lists} blocks in lists, {free_in_chain} free in chain"
            ));
        }
        // Every slab entry is in the chain or in the free-slot list.
        let mut vacant = 0usize;
        let mut i = self.vacant;
        while i != NIL {
            if !idx_ok(i) || vacant > n || self.blocks[i as usize].state() != State::Vacant {
                return Err(format!("free-slot list broken at {i}"));
            }
            vacant += 1;
            i = self.blocks[i as usize].next_free;
        }
        if vacant + free_in_chain + live_in_chain != n {
            return Err(format!(
                "{n} slab entries, {vacant} vacant, {} in chain",
                pieces.len()
            ));
        }
        // The id table and live blocks.
        let mut live_in_table = 0usize;
        for (id, &i) in self.live.iter().enumerate() {
            if i == NIL {
                continue;
            }
            live_in_table += 1;
            let b = self.blocks.get(i as usize).ok_or("id table out of range")?;
            if b.state() != State::Live || self.owners[i as usize].id != id as u64 {
                return Err(format!(
                    "id {id} points at block {i}, which does not hold it"
                ));
            }
        }
        if live_in_table != live_in_chain || live_in_table as u64 != self.live_count {
            return Err(format!(
                "{live_in_table} ids live, {live_in_chain} live blocks, count {}",
                self.live_count
            ));
        }
        self.arena.check_blocks(
            &self.live_blocks(),
            self.alignment_bytes,
            self.allocated_bytes,
        )?;
        if self.arena.mapped_bytes & (self.arena.page_bytes - 1) != 0 {
            return Err(format!(
                "mapped {} is not whole pages",
                self.arena.mapped_bytes
            ));
        }
        Ok(())
    }

    fn compact(&mut self, mem: &mut dyn Executor) -> Option<Compaction> {
        let before = self.largest_free();
        let mut blocks = self.live_blocks();
        let (moves, bytes_moved) = slide_down(&mut blocks, self.alignment_bytes, mem);
        self.rebuild(&blocks);
        Some(Compaction {
            moves,
            bytes_moved,
            largest_free_bytes_before: before,
            largest_free_bytes_after: self.largest_free(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::tests::request as req;
    use crate::alloc::units::{KIB, MIB};
    use crate::books::Books;

    fn config(capacity_bytes: u64) -> AllocConfig {
        AllocConfig {
            capacity_bytes,
            alignment_bytes: 512,
            page_bytes: 2 * MIB,
        }
    }

    /// The mappings as the paper writes them, with the branch between the linear and the
    /// logarithmic range.
    fn mapping_insert_reference(units: u64) -> (u32, u32) {
        if units < SL_COUNT as u64 {
            (0, units as u32)
        } else {
            let f = 63 - units.leading_zeros();
            (
                f - SL_LOG2 + 1,
                ((units >> (f - SL_LOG2)) as u32) ^ SL_COUNT,
            )
        }
    }

    fn mapping_search_reference(units: u64) -> (u32, u32) {
        if units < SL_COUNT as u64 {
            mapping_insert_reference(units)
        } else {
            let f = 63 - units.leading_zeros();
            mapping_insert_reference(units + (1u64 << (f - SL_LOG2)) - 1)
        }
    }

    #[test]
    fn branchless_mappings_agree_with_the_reference_at_every_boundary() {
        let mut sizes: Vec<u64> = (1..5000).collect();
        for bit in 5..63 {
            for delta in [-1i64, 0, 1] {
                sizes.push(((1u64 << bit) as i64 + delta) as u64);
            }
        }
        sizes.push((1 << 63) - 1);
        for units in sizes {
            assert_eq!(
                mapping_insert(units),
                mapping_insert_reference(units),
                "{units}"
            );
            assert_eq!(
                mapping_search(units),
                mapping_search_reference(units),
                "{units}"
            );
        }
        assert_eq!(mapping_insert(u64::MAX), mapping_insert_reference(u64::MAX));
    }

    proptest::proptest! {
        #[test]
        fn branchless_mappings_agree_with_the_reference(units in 1u64..(1 << 63)) {
            proptest::prop_assert_eq!(mapping_insert(units), mapping_insert_reference(units));
            proptest::prop_assert_eq!(mapping_search(units), mapping_search_reference(units));
        }
    }

    #[test]
    fn mapping_insert_is_linear_below_32_units_then_logarithmic() {
        assert_eq!(mapping_insert(1), (0, 1));
        assert_eq!(mapping_insert(31), (0, 31));
        assert_eq!(mapping_insert(32), (1, 0));
        assert_eq!(mapping_insert(63), (1, 31));
        assert_eq!(mapping_insert(64), (2, 0));
        assert_eq!(mapping_insert(65), (2, 0));
        assert_eq!(mapping_insert(66), (2, 1));
        assert_eq!(mapping_insert(127), (2, 31));
        assert_eq!(mapping_insert(128), (3, 0));
        // 2^40 units + one sub-range step of 2^35.
        assert_eq!(mapping_insert((1 << 40) + (1 << 35)), (36, 1));
        assert_eq!(mapping_insert((1 << 41) - 1), (36, 31));
    }

    #[test]
    fn mapping_search_rounds_up_to_a_class_whose_blocks_all_fit() {
        assert_eq!(mapping_search(31), (0, 31));
        assert_eq!(mapping_search(33), (1, 1));
        assert_eq!(mapping_search(64), (2, 0));
        assert_eq!(mapping_search(65), (2, 1));
        assert_eq!(mapping_search(127), (3, 0));
        // Exhaustively: the smallest size of the searched class is ≥ the request, and the
        // class before it could hold a block smaller than the request.
        let class_min = |(fl, sl): (u32, u32)| -> u64 {
            if fl == 0 {
                sl as u64
            } else {
                let f = fl + SL_LOG2 - 1;
                (1u64 << f) + ((sl as u64) << (f - SL_LOG2))
            }
        };
        for units in 1..5000u64 {
            let c = mapping_search(units);
            assert!(class_min(c) >= units, "{units}: {c:?}");
            assert_eq!(mapping_insert(class_min(c)), c);
            assert!(mapping_insert(units) <= c);
            let own = mapping_insert(units);
            assert!(class_min(own) <= units);
        }
    }

    #[test]
    fn splits_from_the_front_and_coalesces_both_ways() {
        let mut mem = crate::executor::Ledger::new(Books::new(64 * MIB));
        let mut t = Tlsf::new(&config(64 * MIB));
        let a = t.alloc(req(0, 1000), &mut mem).unwrap();
        let b = t.alloc(req(1, 4 * KIB), &mut mem).unwrap();
        let c = t.alloc(req(2, 512), &mut mem).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 1024, 5120));
        assert_eq!(mem.books.reserved_bytes(), 2 * MIB);
        t.check_invariants().unwrap();
        t.free(AllocId(0), &mut mem);
        t.free(AllocId(2), &mut mem);
        t.check_invariants().unwrap();
        // Holes: [0, 1024) and the top from 5120. A 1 KiB request reuses the hole at 0.
        assert_eq!(t.alloc(req(3, 1024), &mut mem).unwrap().offset, 0);
        t.free(AllocId(3), &mut mem);
        t.free(AllocId(1), &mut mem);
        t.check_invariants().unwrap();
        // Everything coalesced into one block, slots recycled.
        assert_eq!(t.first, t.last);
        let s = t.free_summary().size_pools[0];
        assert_eq!((s.free_bytes, s.largest_free_bytes), (2 * MIB, 2 * MIB));
        t.empty_cache(&mut mem);
        assert_eq!(mem.books.reserved_bytes(), 0);
    }

    #[test]
    fn a_hole_of_the_request_class_is_used_when_it_fits_and_skipped_when_not() {
        let mut mem = crate::executor::Ledger::new(Books::new(64 * MIB));
        let mut t = Tlsf::new(&config(64 * MIB));
        // Holes of 65 and 64 units (class (2,0) holds 64..66 units) between live blocks.
        t.alloc(req(0, 65 * 512), &mut mem).unwrap();
        t.alloc(req(1, 512), &mut mem).unwrap();
        t.alloc(req(2, 64 * 512), &mut mem).unwrap();
        t.alloc(req(3, 512), &mut mem).unwrap();
        t.free(AllocId(0), &mut mem);
        t.free(AllocId(2), &mut mem);
        // 65 units: the 64-unit hole (first in its list) is too small, the 65-unit one fits.
        assert_eq!(t.alloc(req(4, 65 * 512), &mut mem).unwrap().offset, 0);
        // 65 units again: only the 64-unit hole is left in the class; good fit takes the top.
        assert_eq!(
            t.alloc(req(5, 65 * 512), &mut mem).unwrap().offset,
            131 * 512
        );
        // 64 units is served from the hole.
        assert_eq!(
            t.alloc(req(6, 64 * 512), &mut mem).unwrap().offset,
            66 * 512
        );
        t.check_invariants().unwrap();
    }

    #[test]
    fn the_whole_range_can_be_taken_though_good_fit_rounds_past_it() {
        // 130 MiB = 2^18 units + one page: the search for the whole range rounds up to the next
        // 4 MiB sub-range, past the only block, which is in the request's own class.
        let cap = 130 * MIB;
        assert!(mapping_search(cap / 512) > mapping_insert(cap / 512));
        let mut mem = crate::executor::Ledger::new(Books::new(cap));
        let mut t = Tlsf::new(&config(cap));
        assert_eq!(t.alloc(req(0, cap), &mut mem).unwrap().offset, 0);
        assert!(t.alloc(req(1, 1), &mut mem).is_err());
        t.check_invariants().unwrap();
        assert_eq!(t.free_summary().size_pools[0].free_bytes, 0);
    }

    #[test]
    fn largest_free_is_exact_with_holes_in_many_classes() {
        let mut mem = crate::executor::Ledger::new(Books::new(64 * MIB));
        let mut t = Tlsf::new(&config(64 * MIB));
        let sizes = [3u64, 1, 40, 1, 70, 1, 69, 1, 5, 1];
        for (i, &u) in sizes.iter().enumerate() {
            t.alloc(req(i as u64, u * 512), &mut mem).unwrap();
        }
        for i in [0u64, 2, 4, 6, 8] {
            t.free(AllocId(i), &mut mem);
        }
        t.check_invariants().unwrap();
        // Holes of 3, 40, 70, 69, 5 units; the top's mapped part is 2 MiB − 192 units.
        let tail = 2 * MIB - 192 * 512;
        let s = t.free_summary().size_pools[0];
        assert_eq!(s.largest_free_bytes, tail);
        assert_eq!(s.free_bytes, tail + (3 + 40 + 70 + 69 + 5) * 512);
        // Fill the top up to the mapped end: the 70-unit hole is then the largest.
        t.alloc(req(20, tail), &mut mem).unwrap();
        assert_eq!(t.free_summary().size_pools[0].largest_free_bytes, 70 * 512);
    }
}
