//! `caching` and `caching-expandable`: PyTorch's CUDA caching allocator
//! (`c10/cuda/CUDACachingAllocator.cpp`), modelled after `shared/notes/pytorch-allocator-and-
//! fragmentation.md` §1 with PyTorch's default configuration: no `max_split_size`, no
//! `roundup_power2_divisions`, no garbage collection, no memory fraction. The capacity of the
//! [`Executor`](crate::executor::Executor) plays the part of `cudaMalloc` refusing.
//!
//! Model:
//! - a request is rounded to a multiple of `kMinBlockSize` (the config's `alignment_bytes`, 512
//!   by default; at least one of it) and served from the small pool if the rounded size is at
//!   most 1 MiB, else from the large pool;
//! - each pool keeps its free blocks ordered by (stream, size, address); the lower bound of
//!   (stream, rounded) is the best fit, and a block of another stream never serves;
//! - a miss gets new memory (`alloc_block`): a segment of 2 MiB (small), 20 MiB (large, under
//!   10 MiB) or the request rounded up to 2 MiB; if that is refused, every cached free whole
//!   segment is released (`empty_cache`) and the reservation is tried once more, then the request
//!   fails;
//! - the block found is split if the remainder is at least 512 B (small pool, or any pool with
//!   expandable segments) or more than 1 MiB (large pool); the allocation takes the front;
//! - a free coalesces with its free neighbours inside its segment only.
//!
//! With `expandable`, each (stream, pool) grows one virtual range (2 MiB pages for the small pool,
//! 20 MiB for the large one) instead of taking new segments: see [`expandable`].
//!
//! **Addresses.** PyTorch orders free blocks by the device pointer, which comes from `cudaMalloc`.
//! Here every segment (physical or virtual) lies in a synthetic address space in which a segment
//! sits above every segment created before it and addresses are never reused: address order is
//! (segment id, offset), and ids are handed out in creation order. A recorded trace whose driver
//! reused a freed address may therefore break a tie between equal-sized free blocks differently.
//!
//! **Not modelled:** deferred frees of blocks used on other streams (`recordStream`, the
//! `active_pending_free` state): every free completes at once; CUDA-graph private pools and
//! `MemPool`s (with their `use_on_oom` and `no_split` flags); free-memory callbacks;
//! `release_available_cached_blocks`, the oversize rules and GC (all inert by default); the
//! memory fraction; stream synchronisation before unmapping. `compact` has no PyTorch
//! counterpart: it is gpumem's defragmentation applied inside each segment.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::defrag::Compaction;
use super::layout::{FreeSpace, FreeSummary, LiveBlock, SegmentLayout};
use super::strategy::{AllocConfig, AllocError, AllocRequest, Allocate, Strategy};
use super::units::{align_up, MIB};
use crate::decision::{AllocId, Decision, Loc, SegmentId};
use crate::executor::Executor;

mod blocks;
mod compact;
pub mod expandable;
mod inspect;
#[cfg(test)]
mod tests;

/// `kSmallSize`: a rounded size up to this goes to the small pool.
pub const SMALL_SIZE: u64 = MIB;
/// `kSmallBuffer`: a small-pool segment, and the page of a small expandable range.
pub const SMALL_BUFFER: u64 = 2 * MIB;
/// `kMinLargeAlloc`: requests below this (and above 1 MiB) get a `LARGE_BUFFER` segment.
pub const MIN_LARGE_ALLOC: u64 = 10 * MIB;
/// `kRoundLarge`: larger segments are rounded up to a multiple of this.
pub const ROUND_LARGE: u64 = 2 * MIB;
/// `kLargeBuffer`: segment for 1–10 MiB requests, and the page of a large expandable range.
pub const LARGE_BUFFER: u64 = 20 * MIB;

/// No block: the end of a segment's block list.
const NIL: u32 = u32::MAX;

/// Which of PyTorch's two pools of cached blocks a block belongs to: small (rounded size up to
/// 1 MiB) or large. A block of one never serves a request of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SizePool {
    Small,
    Large,
}

impl SizePool {
    /// `get_pool`: a rounded size of exactly 1 MiB is still small (the code, not the docstring).
    pub fn of(rounded_bytes: u64) -> SizePool {
        if rounded_bytes <= SMALL_SIZE {
            SizePool::Small
        } else {
            SizePool::Large
        }
    }

    /// Position in [`FreeSummary::size_pools`].
    pub fn index(self) -> usize {
        match self {
            SizePool::Small => 0,
            SizePool::Large => 1,
        }
    }

    /// Page size of an expandable range of this pool.
    pub fn page_bytes(self) -> u64 {
        match self {
            SizePool::Small => SMALL_BUFFER,
            SizePool::Large => LARGE_BUFFER,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    /// Free and backed by memory: in its pool's `blocks`.
    Free,
    Live(AllocId),
    /// Free virtual space of an expandable range, not backed: in its pool's `unmapped`.
    Unmapped,
    /// A slab slot that holds no block.
    Vacant,
}

impl State {
    fn is_free_space(self) -> bool {
        matches!(self, State::Free | State::Unmapped)
    }
}

/// A block header in the slab. Blocks of a segment form a doubly linked list in address order
/// (`prev`/`next` are slab indices, `NIL` at the ends) that tiles the segment exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Block {
    segment: u32,
    stream: u32,
    pool: SizePool,
    offset: u64,
    size: u64,
    prev: u32,
    next: u32,
    state: State,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Segment {
    stream: u32,
    pool: SizePool,
    /// Physical bytes, or the length of the virtual range.
    bytes: u64,
    expandable: bool,
    /// The block at offset 0.
    first: u32,
    /// Bytes backed by memory: `bytes` for a physical segment, mapped pages for a virtual range.
    mapped_bytes: u64,
    live_count: u64,
    live_bytes: u64,
}

impl Segment {
    /// This segment's share of `inactive_split_bytes`: free bytes of a non-expandable segment
    /// that still holds a live block, which `empty_cache` cannot return.
    fn inactive_split_bytes(&self) -> u64 {
        if !self.expandable && self.live_count > 0 {
            self.bytes - self.live_bytes
        } else {
            0
        }
    }
}

/// (stream, size, segment, offset, slab index): PyTorch's (stream, size, ptr) order. The index
/// never decides anything: (segment, offset) is unique.
type FreeKey = (u32, u64, u32, u64, u32);
/// (stream, segment, offset, slab index): PyTorch's (stream, ptr) order of unmapped blocks.
type UnmappedKey = (u32, u32, u64, u32);

/// The free blocks of one size pool (PyTorch's `BlockPool`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct CachedBlocks {
    blocks: BTreeSet<FreeKey>,
    unmapped: BTreeSet<UnmappedKey>,
    /// Σ sizes of `blocks`.
    free_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Live {
    block: u32,
    requested_bytes: u64,
    pinned: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Counters {
    num_alloc_retries: u64,
    num_ooms: u64,
    num_device_alloc: u64,
    num_device_free: u64,
    reserved_bytes_peak: u64,
}

/// PyTorch's `DeviceStats`, the parts this model keeps (all pools together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachingStats {
    /// Physical segments held (`segment`); expandable ranges are not counted, as in PyTorch.
    pub segments: u64,
    /// Expandable virtual ranges held.
    pub va_ranges: u64,
    pub reserved_bytes: u64,
    pub reserved_bytes_peak: u64,
    pub allocated_bytes: u64,
    pub inactive_split_bytes: u64,
    /// Reservations retried after releasing the cache.
    pub num_alloc_retries: u64,
    pub num_ooms: u64,
    /// Successful `Reserve`s and `Map`s.
    pub num_device_alloc: u64,
    /// `Release`s and `Unmap`s.
    pub num_device_free: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Caching {
    expandable: bool,
    /// `kMinBlockSize`.
    min_block_bytes: u64,
    /// The device's memory, which sizes the expandable virtual ranges.
    capacity_bytes: u64,
    /// Indexed by [`SizePool::index`].
    size_pools: [CachedBlocks; 2],
    blocks: Vec<Block>,
    /// Vacant slab slots, reused last in, first out.
    vacant: Vec<u32>,
    segments: BTreeMap<u32, Segment>,
    /// The next segment id; ids are never reused, not even those of refused reservations.
    next_segment: u32,
    /// Indexed by `AllocId`.
    live: Vec<Option<Live>>,
    reserved_bytes: u64,
    allocated_bytes: u64,
    inactive_split_bytes: u64,
    counters: Counters,
}

impl Caching {
    pub fn new(config: &AllocConfig, expandable: bool) -> Self {
        Caching {
            expandable,
            min_block_bytes: config.alignment_bytes.max(1),
            capacity_bytes: config.capacity_bytes,
            size_pools: Default::default(),
            blocks: Vec::new(),
            vacant: Vec::new(),
            segments: BTreeMap::new(),
            next_segment: 0,
            live: Vec::new(),
            reserved_bytes: 0,
            allocated_bytes: 0,
            inactive_split_bytes: 0,
            counters: Counters::default(),
        }
    }

    /// `round_size`: at least one `kMinBlockSize`, a multiple of it; `None` on overflow.
    pub fn round_size(&self, bytes: u64) -> Option<u64> {
        align_up(bytes.max(self.min_block_bytes), self.min_block_bytes)
    }

    /// `get_allocation_size`: the segment a miss of `rounded` bytes reserves.
    pub fn allocation_size(rounded: u64) -> Option<u64> {
        if rounded <= SMALL_SIZE {
            Some(SMALL_BUFFER)
        } else if rounded < MIN_LARGE_ALLOC {
            Some(LARGE_BUFFER)
        } else {
            align_up(rounded, ROUND_LARGE)
        }
    }

    pub fn stats(&self) -> CachingStats {
        let va_ranges = self.segments.values().filter(|s| s.expandable).count() as u64;
        CachingStats {
            segments: self.segments.len() as u64 - va_ranges,
            va_ranges,
            reserved_bytes: self.reserved_bytes,
            reserved_bytes_peak: self.counters.reserved_bytes_peak,
            allocated_bytes: self.allocated_bytes,
            inactive_split_bytes: self.inactive_split_bytes,
            num_alloc_retries: self.counters.num_alloc_retries,
            num_ooms: self.counters.num_ooms,
            num_device_alloc: self.counters.num_device_alloc,
            num_device_free: self.counters.num_device_free,
        }
    }

    /// `get_free_block`: the lower bound of (stream, size) in the pool, unless it belongs to
    /// another stream. With expandable segments the search walks on while the next block of the
    /// stream has a strictly smaller "expandable size" (its size plus a directly following
    /// unmapped block), so that the growable tail is taken last. Takes the block out of the pool.
    fn get_free_block(&mut self, stream: u32, pool: SizePool, size: u64) -> Option<u32> {
        let set = &self.size_pools[pool.index()].blocks;
        let mut candidates = set.range((stream, size, 0, 0, 0)..);
        let mut found = *candidates.next().filter(|k| k.0 == stream)?;
        if self.expandable {
            let expandable_size = |k: &FreeKey| {
                let next = self.b(k.4).next;
                match next {
                    NIL => k.1,
                    n if self.b(n).state == State::Unmapped => k.1 + self.b(n).size,
                    _ => k.1,
                }
            };
            for next in candidates {
                if next.0 != stream || expandable_size(next) >= expandable_size(&found) {
                    break;
                }
                found = *next;
            }
        }
        self.remove_free(found.4);
        Some(found.4)
    }

    /// `should_split`, without `max_split_size` and no-split pools.
    fn should_split(&self, pool: SizePool, remaining: u64) -> bool {
        if pool == SizePool::Small || self.expandable {
            remaining >= self.min_block_bytes
        } else {
            remaining > SMALL_SIZE
        }
    }

    /// `alloc_block`: new memory for a miss, as a free block in no index. `None` if refused.
    fn alloc_block(
        &mut self,
        stream: u32,
        pool: SizePool,
        size: u64,
        alloc_size: u64,
        retry: bool,
        mem: &mut dyn Executor,
    ) -> Option<u32> {
        if retry {
            self.counters.num_alloc_retries += 1;
        }
        if self.expandable {
            return self.try_allocate_expandable_block(stream, pool, size, mem);
        }
        let id = self.take_segment_id()?;
        let reserve = Decision::Reserve {
            segment: SegmentId::arena(id),
            bytes: alloc_size,
        };
        mem.apply(reserve).ok()?;
        self.charge(alloc_size);
        let block = self.new_block(Block {
            segment: id,
            stream,
            pool,
            offset: 0,
            size: alloc_size,
            prev: NIL,
            next: NIL,
            state: State::Free,
        });
        let segment = Segment {
            stream,
            pool,
            bytes: alloc_size,
            expandable: false,
            first: block,
            mapped_bytes: alloc_size,
            live_count: 0,
            live_bytes: 0,
        };
        self.segments.insert(id, segment);
        Some(block)
    }

    /// The split part of `alloc_found_block`: block `i` (in no index) keeps its front `size`
    /// bytes if the remainder should split; the remainder goes back to the pool.
    fn split_found_block(&mut self, i: u32, size: u64) {
        let b = *self.b(i);
        let remaining = b.size - size;
        if !self.should_split(b.pool, remaining) {
            return;
        }
        let rest = self.new_block(Block {
            offset: b.offset + size,
            size: remaining,
            state: State::Free,
            ..b
        });
        self.link(b.segment, rest, b.next);
        self.link(b.segment, i, rest);
        self.bm(i).size = size;
        self.insert_free(rest);
    }

    /// `free_block`: coalesce with the previous, then the next block, and index the result.
    fn free_block(&mut self, i: u32) {
        self.bm(i).state = State::Free;
        let (prev, next) = (self.b(i).prev, self.b(i).next);
        self.try_merge(i, prev);
        self.try_merge(i, next);
        self.insert_free(i);
    }

    /// `release_cached_blocks` (= `empty_cache`): the large pool, then the small one; in each,
    /// in (stream, size, address) order, every free block that is a whole non-expandable segment
    /// is released, then the whole pages inside the free blocks of expandable ranges are
    /// unmapped, and a range left entirely unmapped is released.
    fn release_cached_blocks(&mut self, mem: &mut dyn Executor) {
        for pool in [SizePool::Large, SizePool::Small] {
            let keys: Vec<u32> = self.size_pools[pool.index()]
                .blocks
                .iter()
                .map(|k| k.4)
                .collect();
            let mut to_unmap = Vec::new();
            for i in keys {
                let b = *self.b(i);
                if self.seg(b.segment).expandable {
                    to_unmap.push(i);
                } else if b.prev == NIL && b.next == NIL {
                    self.release_segment(i, mem);
                }
            }
            for i in to_unmap {
                self.unmap_block(i, mem);
                let b = *self.b(i);
                if b.state == State::Unmapped && b.prev == NIL && b.next == NIL {
                    self.release_va_range(i, mem);
                }
            }
        }
    }

    /// `release_block`: returns the whole-segment free block `i` and its segment.
    fn release_segment(&mut self, i: u32, mem: &mut dyn Executor) {
        let segment = self.b(i).segment;
        self.remove_free(i);
        self.drop_block(i);
        let seg = self.segments.remove(&segment).expect("segment of a block");
        let release = Decision::Release {
            segment: SegmentId::arena(segment),
        };
        mem.apply(release).expect("release is never refused");
        self.reserved_bytes -= seg.bytes;
        self.counters.num_device_free += 1;
    }

    fn live_entry(&self, id: AllocId) -> Live {
        self.live
            .get(id.0 as usize)
            .copied()
            .flatten()
            .unwrap_or_else(|| panic!("free of {id:?}, which is not live"))
    }

    fn largest_free_bytes(&self, pool: SizePool) -> u64 {
        let set = &self.size_pools[pool.index()].blocks;
        let mut largest = 0;
        let mut stream = set.first().map(|k| k.0);
        while let Some(s) = stream {
            let last = set
                .range(..=(s, u64::MAX, u32::MAX, u64::MAX, u32::MAX))
                .next_back();
            largest = largest.max(last.map_or(0, |k| k.1));
            stream = s
                .checked_add(1)
                .and_then(|n| set.range((n, 0, 0, 0, 0)..).next())
                .map(|k| k.0);
        }
        largest
    }
}

impl Allocate for Caching {
    fn strategy(&self) -> Strategy {
        if self.expandable {
            Strategy::CachingExpandable
        } else {
            Strategy::Caching
        }
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError> {
        let slot = req.id.0 as usize;
        let taken = self.live.get(slot).is_some_and(Option::is_some);
        assert!(!taken, "{:?} allocated twice", req.id);
        let sizes = self
            .round_size(req.bytes)
            .and_then(|size| Some((size, Self::allocation_size(size)?)));
        let Some((size, alloc_size)) = sizes else {
            self.counters.num_ooms += 1;
            return Err(AllocError::OutOfMemory {
                rounded_bytes: req.bytes,
            });
        };
        let pool = SizePool::of(size);
        let found = self.get_free_block(req.stream, pool, size).or_else(|| {
            self.alloc_block(req.stream, pool, size, alloc_size, false, mem)
                .or_else(|| {
                    self.release_cached_blocks(mem);
                    self.alloc_block(req.stream, pool, size, alloc_size, true, mem)
                })
        });
        let Some(i) = found else {
            self.counters.num_ooms += 1;
            return Err(AllocError::OutOfMemory {
                rounded_bytes: size,
            });
        };
        self.split_found_block(i, size);
        self.bm(i).state = State::Live(req.id);
        let b = *self.b(i);
        if slot >= self.live.len() {
            self.live.resize(slot + 1, None);
        }
        self.live[slot] = Some(Live {
            block: i,
            requested_bytes: req.bytes,
            pinned: req.pinned,
        });
        self.allocated_bytes += b.size;
        self.change_live(b.segment, b.size, true);
        let at = Loc {
            segment: SegmentId::arena(b.segment),
            offset: b.offset,
        };
        mem.apply(Decision::Place {
            id: req.id,
            at,
            bytes: b.size,
        })
        .expect("place is never refused");
        Ok(at)
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        let live = self.live_entry(id);
        self.live[id.0 as usize] = None;
        let b = *self.b(live.block);
        self.allocated_bytes -= b.size;
        self.change_live(b.segment, b.size, false);
        let at = Loc {
            segment: SegmentId::arena(b.segment),
            offset: b.offset,
        };
        mem.apply(Decision::Free {
            id,
            at,
            bytes: b.size,
        })
        .expect("free is never refused");
        self.free_block(live.block);
    }

    fn empty_cache(&mut self, mem: &mut dyn Executor) {
        self.release_cached_blocks(mem);
    }

    fn free_summary(&self) -> FreeSummary {
        let pool = |kind: SizePool| FreeSpace {
            free_bytes: self.size_pools[kind.index()].free_bytes,
            largest_free_bytes: self.largest_free_bytes(kind),
        };
        FreeSummary {
            size_pools: [pool(SizePool::Small), pool(SizePool::Large)],
            inactive_split_bytes: self.inactive_split_bytes,
        }
    }

    fn live_blocks(&self) -> Vec<LiveBlock> {
        let mut blocks: Vec<LiveBlock> = self
            .live
            .iter()
            .enumerate()
            .filter_map(|(id, l)| l.map(|l| self.live_block(AllocId(id as u64), l)))
            .collect();
        blocks.sort_by_key(|b| b.at);
        blocks
    }

    fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    fn layout(&self) -> Vec<SegmentLayout> {
        self.segment_layouts()
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.check()
    }

    fn compact(&mut self, mem: &mut dyn Executor) -> Option<Compaction> {
        Some(self.compact_segments(mem))
    }
}
