//! `caching` and `caching-expandable`: PyTorch's CUDA caching allocator
//! (`c10/cuda/CUDACachingAllocator.cpp`, PyTorch 2.x), modelled after `shared/notes/pytorch-
//! allocator-and-fragmentation.md` §1. The capacity of the
//! [`Executor`] plays the part of `cudaMalloc` refusing.
//!
//! Model:
//! - a request is rounded (`round_size`: to a multiple of `kMinBlockSize`, the config's
//!   `alignment_bytes`, or to a power-of-two division with `roundup_power2_divisions`) and served
//!   from the small pool if the rounded size is at most 1 MiB, else from the large pool;
//! - each pool keeps its free blocks ordered by (stream, size, address); the lower bound of
//!   (stream, rounded) is the best fit, and a block of another stream never serves. Private
//!   pools (CUDA graphs, `MemPool`s: [`PoolId`] other than 0) have pools of their own;
//! - a miss gets new memory (`alloc_block`): a segment of 2 MiB (small), 20 MiB (large, under
//!   10 MiB) or the request rounded up to 2 MiB. If that is refused: with `max_split_size`, cached
//!   oversize blocks are released until enough is free (`release_available_cached_blocks`) and
//!   the reservation is tried again; then every pending free completes, every cached free whole
//!   segment is released (`empty_cache`) and the reservation is tried once more; then the request
//!   fails. With a memory fraction, the allocator refuses reservations beyond it by itself and,
//!   with `garbage_collection_threshold`, releases old cached segments before reserving;
//! - the block found is split if the remainder is at least 512 B (small pool, or any pool with
//!   expandable segments) or more than 1 MiB (large pool, request under `max_split_size`); the
//!   allocation takes the front;
//! - a free coalesces with its free neighbours inside its segment only. A free requested while
//!   the block is still in use on another stream (`record_stream`) is pending until it
//!   completes ([`Caching::free_requested`]); `empty_cache` completes every pending free first.
//!
//! With expandable segments, each (stream, pool) grows one virtual range (2 MiB pages for the
//! small pool, 20 MiB for the large one) instead of taking new segments: see [`expandable`].
//!
//! **Addresses.** PyTorch orders free blocks by the device pointer, which comes from the driver.
//! Every segment here has an address: the one a recording names ([`Caching::set_address_hints`],
//! [`Caching::restore`]), else a synthetic one above every segment before it, so that without a
//! recording address order is creation order.
//!
//! **Segment events.** With [`Caching::record_segment_events`], every `segment_alloc`,
//! `segment_free`, `segment_map` and `segment_unmap` PyTorch would trace is kept, in order, for a
//! comparison with a recording.
//!
//! **Not modelled:** `MemPool`s' `use_on_oom` and `no_split` flags; free-memory callbacks; the
//! capture state (a private pool's requests never release the cache, as during a capture);
//! stream synchronisation before unmapping. `compact` has no PyTorch counterpart: it is
//! gpumem's defragmentation applied inside each segment.

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
pub mod events;
pub mod expandable;
mod inspect;
mod release;
pub mod restore;
pub mod settings;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_recorded;

pub use events::{AddressHint, SegmentEvent, SegmentEventKind};
pub use inspect::RecordedLayout;
pub use restore::{RestoredBlock, RestoredSegment};
pub use settings::CachingSettings;

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

/// Where synthetic segment addresses start: above any address a CUDA driver hands out on the
/// machines PyTorch runs on (47-bit user space), so they never collide with recorded ones.
pub const SYNTHETIC_ADDRESS_BASE: u64 = 1 << 52;

/// No block: the end of a segment's block list.
const NIL: u32 = u32::MAX;

/// A pool of cached blocks: 0 is the default pool; others are private pools (a CUDA graph's
/// capture pool or a `MemPool`), numbered densely by whoever names them.
pub type PoolId = u32;
/// The default pool.
pub const DEFAULT_POOL: PoolId = 0;

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
    pool_id: PoolId,
    stream: u32,
    pool: SizePool,
    offset: u64,
    size: u64,
    prev: u32,
    next: u32,
    state: State,
    /// `gc_count_base`: the pool's `get_free_block` calls when the block was last indexed free.
    gc_base: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Segment {
    /// Device address of offset 0 (recorded or synthetic).
    address: u64,
    pool_id: PoolId,
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

/// (pool id, stream, size, address, slab index): PyTorch's (stream, size, ptr) order inside one
/// `BlockPool`. The slab index never decides anything: addresses are unique.
type FreeKey = (PoolId, u32, u64, u64, u32);
/// (pool id, stream, address, slab index): PyTorch's (stream, ptr) order of unmapped blocks.
type UnmappedKey = (PoolId, u32, u64, u32);

/// The free blocks of one size pool (PyTorch's `BlockPool`), every pool id side by side.
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
    /// Freed by the program but still in use on another stream: not reusable until completed.
    pending: bool,
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

/// What one request needs, once rounded: PyTorch's `AllocParams`.
#[derive(Clone, Copy, Debug)]
struct Params {
    pool_id: PoolId,
    stream: u32,
    pool: SizePool,
    /// The rounded request.
    size: u64,
    /// The segment a miss reserves.
    alloc_size: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Caching {
    strategy: Strategy,
    settings: CachingSettings,
    /// `kMinBlockSize`.
    min_block_bytes: u64,
    /// The device's memory, which sizes the expandable virtual ranges and the memory fraction.
    capacity_bytes: u64,
    /// Indexed by [`SizePool::index`].
    size_pools: [CachedBlocks; 2],
    blocks: Vec<Block>,
    /// Vacant slab slots, reused last in, first out.
    vacant: Vec<u32>,
    segments: BTreeMap<u32, Segment>,
    /// Segment address → segment id.
    by_address: BTreeMap<u64, u32>,
    /// The next segment id; ids are never reused, not even those of refused reservations.
    next_segment: u32,
    /// The next synthetic address.
    next_address: u64,
    /// Indexed by `AllocId`.
    live: Vec<Option<Live>>,
    /// Pending frees in the order they were requested.
    pending: Vec<AllocId>,
    /// Private pools whose owner is gone: `empty_cache` releases their cached segments too.
    freeable_pools: BTreeSet<PoolId>,
    /// `get_free_blocks_call_count` of the default small and large pools.
    gc_calls: [u64; 2],
    reserved_bytes: u64,
    allocated_bytes: u64,
    inactive_split_bytes: u64,
    counters: Counters,
    /// Addresses a recording gave the segments the current request creates.
    hints: Vec<AddressHint>,
    /// Virtual ranges reserved at a synthetic address and never mapped: a map that failed in a
    /// new range leaves it reserved, and a recording names its address only at its first map.
    #[serde(default)]
    unplaced: Vec<u32>,
    /// Segment events since the last [`Caching::take_segment_events`], when recording.
    events: Option<Vec<SegmentEvent>>,
    /// Pending frees `release_cached_blocks` completed since the last
    /// [`Caching::take_completions`], when recording: each with the number of segment events
    /// in `events` before it.
    #[serde(default)]
    completions: Vec<(AllocId, usize)>,
    /// Reservations still to refuse as the device refused them in a recording (its free
    /// memory is not recorded): [`Caching::alloc_refused`].
    #[serde(default)]
    refusals_left: u32,
}

impl Caching {
    /// PyTorch's defaults, with or without expandable segments.
    pub fn new(config: &AllocConfig, expandable: bool) -> Self {
        let settings = CachingSettings {
            expandable_segments: expandable,
            ..CachingSettings::default()
        };
        Caching::with_settings(config, settings)
    }

    /// The allocator with `settings`; it reports itself as `caching-expandable` when expandable
    /// segments are on.
    pub fn with_settings(config: &AllocConfig, settings: CachingSettings) -> Self {
        let strategy = if settings.expandable_segments {
            Strategy::CachingExpandable
        } else {
            Strategy::Caching
        };
        Caching {
            strategy,
            settings,
            min_block_bytes: config.alignment_bytes.max(1),
            capacity_bytes: config.capacity_bytes,
            size_pools: Default::default(),
            blocks: Vec::new(),
            vacant: Vec::new(),
            segments: BTreeMap::new(),
            by_address: BTreeMap::new(),
            next_segment: 0,
            next_address: SYNTHETIC_ADDRESS_BASE,
            live: Vec::new(),
            pending: Vec::new(),
            freeable_pools: BTreeSet::new(),
            gc_calls: [0; 2],
            reserved_bytes: 0,
            allocated_bytes: 0,
            inactive_split_bytes: 0,
            counters: Counters::default(),
            hints: Vec::new(),
            completions: Vec::new(),
            unplaced: Vec::new(),
            events: None,
            refusals_left: 0,
        }
    }

    /// Reports itself as `strategy` (the name it was asked for by).
    pub fn named(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    pub fn settings(&self) -> &CachingSettings {
        &self.settings
    }

    /// `round_size`: `None` on overflow.
    pub fn round_size(&self, bytes: u64) -> Option<u64> {
        self.settings.round_size(bytes, self.min_block_bytes)
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

    /// `malloc` into pool `pool_id` (0: the default pool; another: a private pool, as during a
    /// CUDA graph capture).
    pub fn alloc_in(
        &mut self,
        req: AllocRequest,
        pool_id: PoolId,
        mem: &mut dyn Executor,
    ) -> Result<Loc, AllocError> {
        self.malloc(req, pool_id, true, mem)
    }

    /// `malloc` as a recording shows it when the device refused its first `refusals`
    /// reservations (`u32::MAX`: all of them, an `oom`): the cache search had failed (or
    /// there would have been no reservation to refuse), so it is not repeated; what follows —
    /// the oversize release, `empty_cache` and the retry — runs as always.
    pub fn alloc_refused(
        &mut self,
        req: AllocRequest,
        pool_id: PoolId,
        refusals: u32,
        mem: &mut dyn Executor,
    ) -> Result<Loc, AllocError> {
        self.refusals_left = refusals;
        let at = self.malloc(req, pool_id, false, mem);
        self.refusals_left = 0;
        at
    }

    fn malloc(
        &mut self,
        req: AllocRequest,
        pool_id: PoolId,
        search: bool,
        mem: &mut dyn Executor,
    ) -> Result<Loc, AllocError> {
        let slot = req.id.0 as usize;
        let taken = self.live.get(slot).is_some_and(Option::is_some);
        assert!(!taken, "{:?} allocated twice", req.id);
        let Some(p) = self.params(req, pool_id) else {
            self.counters.num_ooms += 1;
            return Err(AllocError::OutOfMemory {
                rounded_bytes: req.bytes,
            });
        };
        let Some(i) = self.find_or_reserve(p, search, mem) else {
            self.counters.num_ooms += 1;
            return Err(AllocError::OutOfMemory {
                rounded_bytes: p.size,
            });
        };
        self.split_found_block(i, p.size);
        Ok(self.mark_live(i, req, mem))
    }

    fn params(&self, req: AllocRequest, pool_id: PoolId) -> Option<Params> {
        let size = self.round_size(req.bytes)?;
        Some(Params {
            pool_id,
            stream: req.stream,
            pool: SizePool::of(size),
            size,
            alloc_size: Self::allocation_size(size)?,
        })
    }

    /// The search of `malloc`: a cached block, else new memory, else the same after releasing
    /// cached memory. The block found is in no index.
    fn find_or_reserve(&mut self, p: Params, search: bool, mem: &mut dyn Executor) -> Option<u32> {
        if search {
            if let Some(i) = self.get_free_block(p) {
                return Some(i);
            }
        }
        if self.settings.collects_garbage() {
            self.garbage_collect_cached_blocks(mem);
        }
        if let Some(i) = self.alloc_block(p, false, mem) {
            return Some(i);
        }
        if self.release_available_cached_blocks(p, mem) {
            if let Some(i) = self.alloc_block(p, false, mem) {
                return Some(i);
            }
        }
        // A private pool's requests come during a capture, which never releases the cache.
        if p.pool_id == DEFAULT_POOL {
            self.release_cached_blocks(mem);
            return self.alloc_block(p, true, mem);
        }
        None
    }

    /// Block `i` (split, in no index) now holds `req`.
    fn mark_live(&mut self, i: u32, req: AllocRequest, mem: &mut dyn Executor) -> Loc {
        self.bm(i).state = State::Live(req.id);
        let b = *self.b(i);
        let slot = req.id.0 as usize;
        if slot >= self.live.len() {
            self.live.resize(slot + 1, None);
        }
        self.live[slot] = Some(Live {
            block: i,
            requested_bytes: req.bytes,
            pinned: req.pinned,
            pending: false,
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
        at
    }

    /// `free` of a block still in use on other streams: it stays where it is, unusable, until
    /// [`Allocate::free`] completes it or `empty_cache` synchronises.
    pub fn free_requested(&mut self, id: AllocId) {
        let slot = id.0 as usize;
        let live = self.live_entry(id);
        if !live.pending {
            self.live[slot] = Some(Live {
                pending: true,
                ..live
            });
            self.pending.push(id);
        }
    }

    /// Whether `id` is live or pending.
    pub fn holds(&self, id: AllocId) -> bool {
        self.live.get(id.0 as usize).is_some_and(Option::is_some)
    }

    /// Marks private pool `pool_id` freeable (its graphs are gone): `empty_cache` releases its
    /// cached segments too.
    pub fn mark_pool_freeable(&mut self, pool_id: PoolId) {
        if pool_id != DEFAULT_POOL {
            self.freeable_pools.insert(pool_id);
        }
    }

    /// `get_free_block`: the lower bound of (stream, size) in the pool, unless it belongs to
    /// another stream or breaks the oversize rules. With expandable segments the search walks on
    /// while the next block of the stream has a strictly smaller "expandable size" (its size plus
    /// a directly following unmapped block), so that the growable tail is taken last; with them
    /// turned off, blocks of expandable ranges are skipped. Takes the block out of the pool.
    fn get_free_block(&mut self, p: Params) -> Option<u32> {
        if self.settings.collects_garbage() && p.pool_id == DEFAULT_POOL {
            self.gc_calls[p.pool.index()] += 1;
        }
        let lane = (p.pool_id, p.stream);
        let set = &self.size_pools[p.pool.index()].blocks;
        let mut candidates = set.range((p.pool_id, p.stream, p.size, 0, 0)..);
        let mut found = *candidates.next().filter(|k| (k.0, k.1) == lane)?;
        if self.seg(self.b(found.4).segment).expandable {
            if self.settings.expandable_segments {
                for next in candidates {
                    let walk = self.seg(self.b(found.4).segment).expandable
                        && (next.0, next.1) == lane
                        && self.expandable_size(next.4) < self.expandable_size(found.4);
                    if !walk {
                        break;
                    }
                    found = *next;
                }
            } else {
                found = *candidates
                    .find(|k| (k.0, k.1) != lane || !self.seg(self.b(k.4).segment).expandable)
                    .filter(|k| (k.0, k.1) == lane)?;
            }
        }
        let max_split = self.settings.max_split();
        if p.size < max_split && found.2 >= max_split {
            return None;
        }
        let rounding = self.settings.max_non_split_rounding_bytes;
        if p.size >= max_split && found.2 >= p.size.saturating_add(rounding) {
            return None;
        }
        self.remove_free(found.4);
        Some(found.4)
    }

    /// A free block's size plus a directly following unmapped block.
    fn expandable_size(&self, i: u32) -> u64 {
        let b = self.b(i);
        match b.next {
            NIL => b.size,
            n if self.b(n).state == State::Unmapped => b.size + self.b(n).size,
            _ => b.size,
        }
    }

    /// `should_split`: the remainder of a block of `pool` cut to `size` becomes a block.
    fn should_split(&self, pool: SizePool, size: u64, remaining: u64) -> bool {
        if pool == SizePool::Small || self.settings.expandable_segments {
            remaining >= self.min_block_bytes
        } else {
            size < self.settings.max_split() && remaining > SMALL_SIZE
        }
    }

    /// `alloc_block`: new memory for a miss, as a free block in no index. `None` if refused, by
    /// the memory fraction or by the device.
    fn alloc_block(&mut self, p: Params, retry: bool, mem: &mut dyn Executor) -> Option<u32> {
        if retry {
            self.counters.num_alloc_retries += 1;
        }
        if self.refusals_left > 0 {
            self.refusals_left -= 1;
            return None;
        }
        if let Some(allowed) = self.settings.allowed_bytes(self.capacity_bytes) {
            if self.reserved_bytes.saturating_add(p.alloc_size) > allowed {
                return None;
            }
        }
        if self.settings.expandable_segments {
            return self.try_allocate_expandable_block(p, mem);
        }
        let id = self.take_segment_id()?;
        let reserve = Decision::Reserve {
            segment: SegmentId::arena(id),
            bytes: p.alloc_size,
        };
        mem.apply(reserve).ok()?;
        let address = self.segment_address(SegmentEventKind::Alloc, p, p.alloc_size);
        self.charge(p.alloc_size);
        let block = self.new_block(Block {
            segment: id,
            pool_id: p.pool_id,
            stream: p.stream,
            pool: p.pool,
            offset: 0,
            size: p.alloc_size,
            prev: NIL,
            next: NIL,
            state: State::Free,
            gc_base: 0,
        });
        self.add_segment(
            id,
            Segment {
                address,
                pool_id: p.pool_id,
                stream: p.stream,
                pool: p.pool,
                bytes: p.alloc_size,
                expandable: false,
                first: block,
                mapped_bytes: p.alloc_size,
                live_count: 0,
                live_bytes: 0,
            },
        );
        self.emit(
            SegmentEventKind::Alloc,
            address,
            p.alloc_size,
            p.stream,
            p.pool_id,
        );
        Some(block)
    }

    /// The split part of `alloc_found_block`: block `i` (in no index) keeps its front `size`
    /// bytes if the remainder should split; the remainder goes back to the pool.
    fn split_found_block(&mut self, i: u32, size: u64) {
        let b = *self.b(i);
        let remaining = b.size - size;
        if !self.should_split(b.pool, size, remaining) {
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

    /// Completes the free of live or pending `id`: the block returns to its pool.
    fn complete_free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        let live = self.live_entry(id);
        self.live[id.0 as usize] = None;
        if live.pending {
            self.pending.retain(|&p| p != id);
        }
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
        let mut lane = set.first().map(|k| (k.0, k.1));
        while let Some((pool_id, stream)) = lane {
            let last = set
                .range(..=(pool_id, stream, u64::MAX, u64::MAX, u32::MAX))
                .next_back();
            largest = largest.max(last.map_or(0, |k| k.2));
            lane = set
                .range((pool_id, stream, u64::MAX, u64::MAX, u32::MAX)..)
                .next()
                .map(|k| (k.0, k.1));
        }
        largest
    }
}

impl Allocate for Caching {
    fn strategy(&self) -> Strategy {
        self.strategy
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError> {
        self.alloc_in(req, DEFAULT_POOL, mem)
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        self.complete_free(id, mem);
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
