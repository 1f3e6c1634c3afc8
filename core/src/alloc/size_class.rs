//! `pool` on the command line: simple segregated storage with size classes, over an address-ordered best-fit heap
//! on the arena.
//!
//! Classes are 512 B × 2^k with four linear steps per doubling (512, 640, 768, 896, 1024, 1280,
//! …) up to 64 MiB, each rounded up to the alignment (duplicates dropped: with 512 B alignment
//! the classes below 2 KiB are 512, 1024 and 1536). A request takes the smallest class that
//! holds it. A class's blocks are carved from slabs of `max(4, ⌈2 MiB / class⌉)` blocks — at
//! least 2 MiB and 4 blocks, rounded up to whole blocks so that a slab has no slack — taken from
//! the heap (best fit, lowest address on ties) and mapped whole. When the heap has no room for a
//! whole slab, a slab of a single block is tried. A class allocates from its lowest-address slab
//! that has a free block, and there from the lowest free block; there is no splitting or
//! coalescing of class blocks. A slab whose last live block is freed returns to the heap, so
//! freeing everything restores the initial state. Requests above 64 MiB go to the heap directly.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::arena::{check_tiling, sorted_blocks, Arena};
use super::defrag::Compaction;
use super::extents::FreeExtents;
use super::layout::{FreeSummary, LiveBlock, SegmentLayout};
use super::strategy::{AllocConfig, AllocError, AllocRequest, Allocate, Strategy};
use super::units::{align_up, MIB};
use crate::decision::{AllocId, Loc};
use crate::executor::Executor;

/// The smallest nominal class.
pub const MIN_CLASS_BYTES: u64 = 512;
/// The largest class; larger requests go to the heap.
pub const MAX_CLASS_BYTES: u64 = 64 * MIB;
/// Linear steps per doubling.
pub const STEPS_PER_DOUBLING: u64 = 4;
/// A slab holds at least this many bytes and at least [`SLAB_MIN_BLOCKS`] blocks.
pub const SLAB_MIN_BYTES: u64 = 2 * MIB;
pub const SLAB_MIN_BLOCKS: u64 = 4;

/// Class sizes, ascending: the nominal classes rounded up to `alignment`, without duplicates
/// and without any that rounding pushed above [`MAX_CLASS_BYTES`].
pub fn class_sizes(alignment: u64) -> Vec<u64> {
    let mut classes: Vec<u64> = Vec::new();
    let mut base = MIN_CLASS_BYTES;
    while base <= MAX_CLASS_BYTES {
        for step in 0..STEPS_PER_DOUBLING {
            let nominal = base + step * (base / STEPS_PER_DOUBLING);
            if nominal > MAX_CLASS_BYTES {
                break;
            }
            let c = align_up(nominal, alignment).expect("class below 2^60");
            if c <= MAX_CLASS_BYTES && classes.last() != Some(&c) {
                classes.push(c);
            }
        }
        base *= 2;
    }
    classes
}

/// Blocks in a full slab of class size `class`.
pub fn slab_blocks(class: u64) -> u64 {
    SLAB_MIN_BYTES.div_ceil(class).max(SLAB_MIN_BLOCKS)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Slab {
    class: u32,
    blocks: u64,
    live: u64,
    /// Bit i set iff block i is live.
    used: Vec<u64>,
}

impl Slab {
    fn first_unused(&self) -> Option<u64> {
        self.used
            .iter()
            .enumerate()
            .find(|(_, &w)| w != u64::MAX)
            .map(|(i, &w)| i as u64 * 64 + (!w).trailing_zeros() as u64)
            .filter(|&b| b < self.blocks)
    }

    fn bit(&self, i: u64) -> bool {
        self.used[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: u64) {
        self.used[(i / 64) as usize] ^= 1 << (i % 64);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Live {
    offset: u64,
    bytes: u64,
    requested_bytes: u64,
    pinned: bool,
    /// Offset of the slab holding the block; `None` for a block taken from the heap.
    slab: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizeClassAllocator {
    alignment_bytes: u64,
    arena: Arena,
    classes: Vec<u64>,
    /// Heap free extents.
    heap: FreeExtents,
    /// Slabs by offset.
    slabs: BTreeMap<u64, Slab>,
    /// Per class: offsets of its slabs with at least one free block.
    partial: Vec<BTreeSet<u64>>,
    /// Indexed by `AllocId`.
    live: Vec<Option<Live>>,
    allocated_bytes: u64,
}

impl SizeClassAllocator {
    pub fn new(config: &AllocConfig) -> Self {
        let arena = Arena::new(config);
        let classes = class_sizes(config.alignment_bytes);
        SizeClassAllocator {
            alignment_bytes: config.alignment_bytes,
            partial: vec![BTreeSet::new(); classes.len()],
            classes,
            heap: FreeExtents::between(&[], arena.range_bytes),
            slabs: BTreeMap::new(),
            live: Vec::new(),
            allocated_bytes: 0,
            arena,
        }
    }

    /// Index of the smallest class holding `bytes` (already aligned), if any.
    fn class_of(&self, bytes: u64) -> Option<usize> {
        let i = self.classes.partition_point(|&c| c < bytes);
        (i < self.classes.len()).then_some(i)
    }

    /// Finds room in the heap for `bytes`, maps it, takes it. On failure nothing changed.
    fn heap_alloc(&mut self, bytes: u64, mem: &mut dyn Executor) -> Result<u64, ()> {
        let (offset, len) = self.heap.best_fit(bytes).ok_or(())?;
        self.arena
            .ensure_mapped(offset + bytes, mem)
            .map_err(|_| ())?;
        self.heap.take(offset, len, bytes);
        Ok(offset)
    }

    /// A block of class `ci`: from the lowest-address partial slab, else from a new slab.
    fn class_alloc(&mut self, ci: usize, mem: &mut dyn Executor) -> Result<(u64, u64), ()> {
        let c = self.classes[ci];
        if let Some(&s_off) = self.partial[ci].first() {
            let slab = self.slabs.get_mut(&s_off).expect("partial slab exists");
            let i = slab.first_unused().expect("partial slab has a free block");
            slab.flip(i);
            slab.live += 1;
            if slab.live == slab.blocks {
                self.partial[ci].remove(&s_off);
            }
            return Ok((s_off, s_off + i * c));
        }
        let full = slab_blocks(c);
        let blocks = if self.heap.best_fit(full * c).is_some() {
            full
        } else {
            1
        };
        let s_off = self.heap_alloc(blocks * c, mem)?;
        let mut slab = Slab {
            class: ci as u32,
            blocks,
            live: 1,
            used: vec![0; blocks.div_ceil(64) as usize],
        };
        slab.flip(0);
        if blocks > 1 {
            self.partial[ci].insert(s_off);
        }
        self.slabs.insert(s_off, slab);
        Ok((s_off, s_off))
    }

    fn live_at(&self, id: AllocId) -> Live {
        self.live
            .get(id.0 as usize)
            .copied()
            .flatten()
            .unwrap_or_else(|| panic!("free of {id:?}, which is not live"))
    }

    /// Start of the heap extent that runs to the end of the range, i.e. the top.
    fn top(&self) -> u64 {
        self.heap.top(self.arena.range_bytes)
    }

    /// The largest of: the largest mapped heap extent and the largest class with a free slab
    /// block (which counts only its own size).
    fn largest_free(&self) -> u64 {
        let block = (0..self.classes.len())
            .rev()
            .find(|&ci| !self.partial[ci].is_empty())
            .map_or(0, |ci| self.classes[ci]);
        self.heap.largest_mapped(&self.arena).max(block)
    }
}

impl Allocate for SizeClassAllocator {
    fn strategy(&self) -> Strategy {
        Strategy::SizeClass
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError> {
        let aligned = self.arena.round_request(req.bytes, self.alignment_bytes)?;
        let slot = req.id.0 as usize;
        assert!(
            self.live.get(slot).is_none_or(|l| l.is_none()),
            "{:?} allocated twice",
            req.id
        );
        let (bytes, offset, slab) = match self.class_of(aligned) {
            Some(ci) => {
                let c = self.classes[ci];
                let (s_off, offset) = self
                    .class_alloc(ci, mem)
                    .map_err(|_| AllocError::OutOfMemory { rounded_bytes: c })?;
                (c, offset, Some(s_off))
            }
            None => {
                let offset =
                    self.heap_alloc(aligned, mem)
                        .map_err(|_| AllocError::OutOfMemory {
                            rounded_bytes: aligned,
                        })?;
                (aligned, offset, None)
            }
        };
        if slot >= self.live.len() {
            self.live.resize(slot + 1, None);
        }
        self.live[slot] = Some(Live {
            offset,
            bytes,
            requested_bytes: req.bytes,
            pinned: req.pinned,
            slab,
        });
        self.allocated_bytes += bytes;
        Ok(Arena::place(req.id, offset, bytes, mem))
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        let b = self.live_at(id);
        self.live[id.0 as usize] = None;
        self.allocated_bytes -= b.bytes;
        Arena::free(id, b.offset, b.bytes, mem);
        let Some(s_off) = b.slab else {
            self.heap.insert(b.offset, b.bytes);
            return;
        };
        let slab = self.slabs.get_mut(&s_off).expect("slab of a live block");
        let ci = slab.class as usize;
        if slab.live == slab.blocks {
            self.partial[ci].insert(s_off);
        }
        slab.flip((b.offset - s_off) / b.bytes);
        slab.live -= 1;
        if slab.live == 0 {
            let len = slab.blocks * b.bytes;
            self.slabs.remove(&s_off);
            self.partial[ci].remove(&s_off);
            self.heap.insert(s_off, len);
        }
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
        sorted_blocks(self.live.iter().enumerate().filter_map(|(i, l)| {
            l.map(|l| {
                let id = AllocId(i as u64);
                (id, l.offset, l.bytes, l.requested_bytes, l.pinned)
            })
        }))
    }

    fn reserved_bytes(&self) -> u64 {
        self.arena.mapped_bytes
    }

    fn layout(&self) -> Vec<SegmentLayout> {
        self.arena.layout(&self.live_blocks())
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.heap.check()?;
        // Heap extents, slabs and large blocks tile the range.
        let mut pieces: Vec<(u64, u64, bool)> =
            self.heap.iter().map(|(o, l)| (o, l, false)).collect();
        let mut slab_live: BTreeMap<u64, u64> = BTreeMap::new();
        for (i, l) in self.live.iter().enumerate() {
            let Some(l) = l else { continue };
            match l.slab {
                None => {
                    if self.class_of(l.bytes).is_some() {
                        return Err(format!("heap block {i} of {} bytes has a class", l.bytes));
                    }
                    pieces.push((l.offset, l.bytes, true));
                }
                Some(s_off) => {
                    let slab = self
                        .slabs
                        .get(&s_off)
                        .ok_or(format!("block {i}: no slab"))?;
                    let c = self.classes[slab.class as usize];
                    let k = (l.offset - s_off) / c;
                    if c != l.bytes || l.offset < s_off || (l.offset - s_off) % c != 0 {
                        return Err(format!("block {i} misplaced in slab {s_off}"));
                    }
                    if k >= slab.blocks || !slab.bit(k) {
                        return Err(format!("block {i} not marked live in slab {s_off}"));
                    }
                    *slab_live.entry(s_off).or_default() += 1;
                }
            }
        }
        for (&s_off, slab) in &self.slabs {
            let ci = slab.class as usize;
            let c = *self.classes.get(ci).ok_or("slab of unknown class")?;
            let bytes = slab.blocks * c;
            pieces.push((s_off, bytes, true));
            let ones: u64 = slab.used.iter().map(|w| w.count_ones() as u64).sum();
            if slab.blocks == 0 || slab.used.len() as u64 != slab.blocks.div_ceil(64) {
                return Err(format!("slab {s_off} has a bitmap of the wrong size"));
            }
            if slab.first_unused().is_none() != (slab.live == slab.blocks) {
                return Err(format!(
                    "slab {s_off}: bitmap and live count disagree on fullness"
                ));
            }
            if ones != slab.live || slab_live.get(&s_off) != Some(&slab.live) {
                return Err(format!("slab {s_off}: live count {} disagrees", slab.live));
            }
            if slab.blocks != 1 && slab.blocks != slab_blocks(c) {
                return Err(format!("slab {s_off} has {} blocks", slab.blocks));
            }
            if s_off + bytes > self.arena.mapped_bytes {
                return Err(format!("slab {s_off} not entirely mapped"));
            }
            if self.partial[ci].contains(&s_off) != (slab.live < slab.blocks) {
                return Err(format!("slab {s_off}: partial set disagrees"));
            }
        }
        for (ci, set) in self.partial.iter().enumerate() {
            for s_off in set {
                if self.slabs.get(s_off).is_none_or(|s| s.class as usize != ci) {
                    return Err(format!("partial slab {s_off} of class {ci} missing"));
                }
            }
        }
        pieces.sort_unstable();
        check_tiling(&pieces, self.arena.range_bytes)?;
        self.arena.check_blocks(
            &self.live_blocks(),
            self.alignment_bytes,
            self.allocated_bytes,
        )
    }

    /// Class blocks are interchangeable only within their slab and class, and a slab leaves only
    /// when empty; sliding blocks across slabs would break that, so the pool is not compacted.
    fn compact(&mut self, _mem: &mut dyn Executor) -> Option<Compaction> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::tests::request as req;
    use crate::alloc::units::{GIB, KIB};
    use crate::books::Books;

    fn pool(capacity_bytes: u64) -> (SizeClassAllocator, crate::executor::Ledger) {
        let config = AllocConfig {
            capacity_bytes,
            ..AllocConfig::default()
        };
        (
            SizeClassAllocator::new(&config),
            crate::executor::Ledger::new(Books::new(capacity_bytes)),
        )
    }

    #[test]
    fn classes_step_four_times_per_doubling_rounded_to_the_alignment() {
        let c = class_sizes(128);
        assert_eq!(&c[..9], &[512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048]);
        assert_eq!(*c.last().unwrap(), 64 * MIB);
        assert_eq!(c.len(), 17 * 4 + 1);
        let c = class_sizes(512);
        assert_eq!(&c[..8], &[512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]);
        assert!(c.windows(2).all(|w| w[0] < w[1] && w[1] % 512 == 0));
        assert_eq!(&c[c.len() - 3..], &[48 * MIB, 56 * MIB, 64 * MIB]);
    }

    #[test]
    fn requests_round_to_the_smallest_class_that_holds_them() {
        let (p, _) = pool(GIB);
        let class = |b: u64| p.class_of(align_up(b, 512).unwrap()).map(|i| p.classes[i]);
        assert_eq!(class(1), Some(512));
        assert_eq!(class(513), Some(1024));
        assert_eq!(class(1537), Some(2048));
        assert_eq!(class(5 * KIB + 1), Some(6 * KIB));
        assert_eq!(class(40 * MIB + 1), Some(48 * MIB));
        assert_eq!(class(64 * MIB), Some(64 * MIB));
        assert_eq!(class(64 * MIB + 1), None);
        assert_eq!(slab_blocks(512), 4096);
        assert_eq!(slab_blocks(1536), 1366);
        assert_eq!(slab_blocks(3 * MIB), 4);
    }

    #[test]
    fn blocks_come_from_the_lowest_slab_and_slabs_return_when_empty() {
        let (mut p, mut mem) = pool(GIB);
        // Class 1024: one slab of 2048 blocks at 0. Class 512: its slab follows at 2 MiB.
        assert_eq!(p.alloc(req(0, 1000), &mut mem).unwrap().offset, 0);
        assert_eq!(p.alloc(req(1, 1000), &mut mem).unwrap().offset, 1024);
        assert_eq!(p.alloc(req(2, 100), &mut mem).unwrap().offset, 2 * MIB);
        assert_eq!(p.alloc(req(3, 1024), &mut mem).unwrap().offset, 2048);
        assert_eq!(mem.books.reserved_bytes(), 4 * MIB);
        // The lowest free block is reused first.
        p.free(AllocId(1), &mut mem);
        assert_eq!(p.alloc(req(4, 700), &mut mem).unwrap().offset, 1024);
        p.check_invariants().unwrap();
        // Large requests bypass the classes: 65 MiB from the heap after both slabs.
        let big = p.alloc(req(5, 65 * MIB), &mut mem).unwrap();
        assert_eq!(big.offset, 4 * MIB);
        // Emptying the 512 B slab returns it to the heap as a hole between the others.
        p.free(AllocId(2), &mut mem);
        assert_eq!(p.heap.first(), Some((2 * MIB, 2 * MIB)));
        let s = p.free_summary().size_pools[0];
        assert_eq!(
            s.free_bytes,
            mem.books.reserved_bytes() - mem.books.allocated_bytes
        );
        assert_eq!(s.largest_free_bytes, 2 * MIB);
        for id in [0, 3, 4, 5] {
            p.free(AllocId(id), &mut mem);
        }
        p.check_invariants().unwrap();
        assert!(p.slabs.is_empty());
        assert_eq!(p.heap.len(), 1);
        p.empty_cache(&mut mem);
        assert_eq!(mem.books.reserved_bytes(), 0);
    }

    #[test]
    fn a_single_block_slab_when_a_whole_slab_does_not_fit() {
        let (mut p, mut mem) = pool(96 * MIB);
        // 48 MiB class: a full slab (4 blocks, 192 MiB) cannot fit in 96 MiB.
        assert_eq!(p.alloc(req(0, 41 * MIB), &mut mem).unwrap().offset, 0);
        assert_eq!(p.slabs[&0].blocks, 1);
        assert_eq!(
            p.alloc(req(1, 41 * MIB), &mut mem).unwrap().offset,
            48 * MIB
        );
        assert!(p.alloc(req(2, 512), &mut mem).is_err());
        p.check_invariants().unwrap();
        assert_eq!(p.free_summary().size_pools[0].free_bytes, 0);
    }

    #[test]
    fn a_free_slab_block_counts_only_its_own_size() {
        let (mut p, mut mem) = pool(8 * MIB);
        // One 2 MiB slab of class 512 fills the mapped 2 MiB; then 1 free block of 512.
        for id in 0..4096 {
            p.alloc(req(id, 512), &mut mem).unwrap();
        }
        assert_eq!(mem.books.reserved_bytes(), 2 * MIB);
        p.free(AllocId(7), &mut mem);
        p.free(AllocId(8), &mut mem);
        let s = p.free_summary().size_pools[0];
        assert_eq!((s.free_bytes, s.largest_free_bytes), (1024, 512));
        p.check_invariants().unwrap();
    }
}
