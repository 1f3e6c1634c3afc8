//! `buddy`: the binary buddy system (Knowlton 1965) over the arena.
//!
//! Block sizes are powers of two, `alignment << order`, from the alignment (order 0) up to the
//! largest power of two no larger than the range. The range (capacity rounded down to pages) is
//! covered by top-level blocks of decreasing power-of-two sizes, e.g. 80 GiB = 64 GiB + 16 GiB at
//! offsets 0 and 64 GiB, so all of it is usable. Each top-level block starts at a multiple of its
//! size, hence every block of every order is aligned to its size, its buddy is at
//! `offset ^ size`, and a block may merge with its buddy exactly when their parent
//! `[offset & !(2·size − 1), +2·size)` ends inside the range (an aligned block that ends inside
//! the range never straddles two top-level blocks).
//!
//! `alloc` takes the lowest-address free block of the smallest sufficient order that lies in
//! mapped memory (else the lowest-address sufficient block) and splits it down, keeping the
//! lower half each time; `free` merges with the buddy while it is free, upward. A bitmap of
//! the orders that have a free block lets `alloc` visit only those (most of the 20-odd orders
//! are empty at any time), and nothing is indexed by offset: only `empty_cache` and the
//! layout need the live blocks in address order, and they walk the live table.

use serde::{Deserialize, Serialize};

use super::bits::IndexSet;

use super::arena::{check_tiling, sorted_blocks, Arena};
use super::defrag::Compaction;
use super::layout::{FreeSummary, LiveBlock, SegmentLayout};
use super::live::LiveTable;
use super::strategy::{AllocConfig, AllocError, AllocRequest, Allocate, Strategy};
use super::units::align_up;
use crate::decision::{AllocId, Loc};
use crate::executor::Executor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Live {
    offset: u64,
    order: u32,
    requested_bytes: u64,
    pinned: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buddy {
    alignment_bytes: u64,
    align_log2: u32,
    max_order: u32,
    arena: Arena,
    /// `free[k]`: the free blocks of `alignment << k` bytes, each as its offset / its size.
    free: Vec<IndexSet>,
    /// Bit `k` set iff `free[k]` is not empty.
    nonempty: u64,
    /// Live blocks by `AllocId`: 4 bytes per id ever seen, the records packed.
    live: LiveTable<Live>,
    allocated_bytes: u64,
}

impl Buddy {
    pub fn new(config: &AllocConfig) -> Self {
        let arena = Arena::new(config);
        let align_log2 = config.alignment_bytes.trailing_zeros();
        let range = arena.range_bytes;
        let max_order = (63 - range.leading_zeros()) - align_log2;
        let mut b = Buddy {
            alignment_bytes: config.alignment_bytes,
            align_log2,
            max_order,
            arena,
            free: (0..=max_order)
                .map(|k| IndexSet::new(range >> (align_log2 + k)))
                .collect(),
            nonempty: 0,
            live: LiveTable::default(),
            allocated_bytes: 0,
        };
        let mut offset = 0;
        for bit in (align_log2..64).rev() {
            if range & (1 << bit) != 0 {
                b.insert_free(bit - align_log2, offset);
                offset += 1 << bit;
            }
        }
        debug_assert_eq!(offset, range);
        b
    }

    #[inline]
    fn insert_free(&mut self, order: u32, offset: u64) {
        let inserted = self.free[order as usize].insert(offset >> (self.align_log2 + order));
        debug_assert!(
            inserted,
            "free block {offset} of order {order} inserted twice"
        );
        self.nonempty |= 1 << order;
    }

    /// Removes the free block of `order` at `offset`; false if there is none.
    #[inline]
    fn remove_free(&mut self, order: u32, offset: u64) -> bool {
        let set = &mut self.free[order as usize];
        let removed = set.remove(offset >> (self.align_log2 + order));
        if set.is_empty() {
            self.nonempty &= !(1 << order);
        }
        removed
    }

    #[inline]
    fn size(&self, order: u32) -> u64 {
        self.alignment_bytes << order
    }

    /// The order of the smallest block that holds `bytes`, if any block does.
    fn order_for(&self, bytes: u64) -> Option<u32> {
        let units = align_up(bytes.max(1), self.alignment_bytes)? >> self.align_log2;
        let order = units.checked_next_power_of_two()?.trailing_zeros();
        (order <= self.max_order).then_some(order)
    }

    /// Whether the block of `order` at `offset` may merge with its buddy: its parent lies
    /// inside one top-level block.
    fn has_parent(&self, offset: u64, order: u32) -> bool {
        if order >= self.max_order {
            return false;
        }
        let parent_size = self.size(order + 1);
        (offset & !(parent_size - 1)) + parent_size <= self.arena.range_bytes
    }

    /// The free block to split for a block of `order`: the smallest sufficient order whose
    /// lowest free block fits in mapped memory (classic buddy), else the lowest-address free
    /// block of any sufficient order, so that the mapped heap grows from the bottom instead of
    /// jumping to a higher, smaller top-level block (80 GiB = 64 GiB + 16 GiB).
    fn choose(&self, order: u32, bytes: u64) -> Option<(u32, u64)> {
        let mapped = self.arena.mapped_bytes;
        let mut orders = self.nonempty & (u64::MAX << order);
        let candidates = std::iter::from_fn(|| {
            (orders != 0).then(|| {
                let k = orders.trailing_zeros();
                orders &= orders - 1;
                let first = self.free[k as usize].first().expect("a non-empty order");
                (k, first << (self.align_log2 + k))
            })
        });
        let mut lowest: Option<(u32, u64)> = None;
        for (k, offset) in candidates {
            if offset + bytes <= mapped {
                return Some((k, offset));
            }
            if lowest.is_none_or(|(_, o)| offset < o) {
                lowest = Some((k, offset));
            }
        }
        lowest
    }

    /// End of the highest live block (0 when none). A walk of the live table: only
    /// `empty_cache` asks.
    fn top(&self) -> u64 {
        self.live
            .iter()
            .map(|(_, b)| b.offset + self.size(b.order))
            .max()
            .unwrap_or(0)
    }

    /// The mapped part of the largest free block. Per order, only the lowest free block that
    /// starts in mapped memory can matter (the one after it, if any, starts above the first's
    /// end); a fully mapped block of order k beats every smaller order.
    fn largest_free(&self) -> u64 {
        let mapped = self.arena.mapped_bytes;
        let mut best = 0;
        let mut orders = self.nonempty;
        while orders != 0 {
            let k = 63 - orders.leading_zeros();
            orders &= !(1 << k);
            let size = self.size(k);
            if size <= best {
                break;
            }
            let lowest = self.free[k as usize]
                .first()
                .map(|i| i << (self.align_log2 + k));
            if let Some(offset) = lowest.filter(|&offset| offset < mapped) {
                let part = self.arena.mapped_part(offset, size);
                best = best.max(part);
            }
        }
        best
    }
}

impl Allocate for Buddy {
    fn strategy(&self) -> Strategy {
        Strategy::Buddy
    }

    fn alloc(&mut self, req: AllocRequest, mem: &mut dyn Executor) -> Result<Loc, AllocError> {
        let order = self.order_for(req.bytes).ok_or(AllocError::OutOfMemory {
            rounded_bytes: req.bytes,
        })?;
        let bytes = self.size(order);
        let oom = AllocError::OutOfMemory {
            rounded_bytes: bytes,
        };
        let (from, offset) = self.choose(order, bytes).ok_or(oom)?;
        self.arena
            .ensure_mapped(offset + bytes, mem)
            .map_err(|_| oom)?;
        assert!(
            self.live.get(req.id).is_none(),
            "{:?} allocated twice",
            req.id
        );
        self.remove_free(from, offset);
        for k in (order..from).rev() {
            let upper = offset + self.size(k);
            self.insert_free(k, upper);
        }
        let live = Live {
            offset,
            order,
            requested_bytes: req.bytes,
            pinned: req.pinned,
        };
        self.live.insert(req.id, live);
        self.allocated_bytes += bytes;
        Ok(Arena::place(req.id, offset, bytes, mem))
    }

    fn free(&mut self, id: AllocId, mem: &mut dyn Executor) {
        let b = self.live.remove(id);
        let bytes = self.size(b.order);
        self.allocated_bytes -= bytes;
        Arena::free(id, b.offset, bytes, mem);
        let (mut offset, mut order) = (b.offset, b.order);
        while self.has_parent(offset, order) {
            let size = self.size(order);
            if !self.remove_free(order, offset ^ size) {
                break;
            }
            offset &= !(2 * size - 1);
            order += 1;
        }
        self.insert_free(order, offset);
    }

    fn empty_cache(&mut self, mem: &mut dyn Executor) {
        let top = self.top();
        self.arena.trim(top, mem);
    }

    /// Free bytes in mapped memory, and the mapped part of the largest free *block*: adjacent
    /// free blocks that are not buddies cannot serve one request together.
    fn free_summary(&self) -> FreeSummary {
        FreeSummary::single(
            self.arena.mapped_bytes - self.allocated_bytes,
            self.largest_free(),
        )
    }

    fn live_blocks(&self) -> Vec<LiveBlock> {
        sorted_blocks(self.live.iter().map(|(id, b)| {
            (
                id,
                b.offset,
                self.size(b.order),
                b.requested_bytes,
                b.pinned,
            )
        }))
    }

    fn reserved_bytes(&self) -> u64 {
        self.arena.mapped_bytes
    }

    fn layout(&self) -> Vec<SegmentLayout> {
        self.arena.layout(&self.live_blocks())
    }

    fn check_invariants(&self) -> Result<(), String> {
        let range = self.arena.range_bytes;
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        for (k, set) in self.free.iter().enumerate() {
            let k = k as u32;
            if set.is_empty() == (self.nonempty & (1 << k) != 0) {
                return Err(format!(
                    "order {k}'s bit does not say whether it has a free block"
                ));
            }
            let size = self.size(k);
            for offset in set.iter().map(|i| i << (self.align_log2 + k)) {
                if offset % size != 0 || offset + size > range {
                    return Err(format!("free block {offset} of order {k} misplaced"));
                }
                if self.has_parent(offset, k)
                    && set.contains((offset ^ size) >> (self.align_log2 + k))
                {
                    return Err(format!(
                        "free buddies {offset} and {} not merged",
                        offset ^ size
                    ));
                }
                pieces.push((offset, size, false));
            }
        }
        for (id, l) in self.live.iter() {
            let i = id.0;
            let size = self.size(l.order);
            if l.offset % size != 0 || l.offset + size > range || l.order > self.max_order {
                return Err(format!(
                    "live block {i} at {} of order {} misplaced",
                    l.offset, l.order
                ));
            }
            pieces.push((l.offset, size, true));
        }
        pieces.sort_unstable();
        // Neighbouring free blocks that are not buddies touch legitimately; tile their unions.
        let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(pieces.len());
        for p in pieces {
            match merged.last_mut() {
                Some(last) if !last.2 && !p.2 && last.0 + last.1 == p.0 => last.1 += p.1,
                _ => merged.push(p),
            }
        }
        check_tiling(&merged, range)?;
        self.arena.check_blocks(
            &self.live_blocks(),
            self.alignment_bytes,
            self.allocated_bytes,
        )
    }

    /// Buddy blocks cannot slide freely: a block must sit at a multiple of its own size and the
    /// free space it leaves merges only with its buddy, so the sliding planner does not apply.
    fn compact(&mut self, _mem: &mut dyn Executor) -> Option<Compaction> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::tests::request as req;
    use crate::alloc::units::{GIB, MIB};
    use crate::books::Books;

    /// 12 KiB of 4 KiB pages, 512 B alignment: top-level blocks 8 KiB at 0 and 4 KiB at 8 KiB.
    fn small() -> (Buddy, crate::executor::Ledger) {
        let config = AllocConfig {
            capacity_bytes: 12 * 1024,
            alignment_bytes: 512,
            page_bytes: 4096,
        };
        (
            Buddy::new(&config),
            crate::executor::Ledger::new(Books::new(config.capacity_bytes)),
        )
    }

    fn free_sets(b: &Buddy) -> Vec<Vec<u64>> {
        (0..=b.max_order)
            .map(|k| {
                let shift = b.align_log2 + k;
                b.free[k as usize].iter().map(|i| i << shift).collect()
            })
            .collect()
    }

    #[test]
    fn the_range_is_covered_by_decreasing_powers_of_two() {
        let (b, _) = small();
        assert_eq!(b.max_order, 4);
        assert_eq!(
            free_sets(&b),
            vec![vec![], vec![], vec![], vec![8192], vec![0]]
        );
        let config = AllocConfig::default();
        let b = Buddy::new(&config);
        let top: Vec<(u32, Vec<u64>)> = (0..=b.max_order)
            .filter(|&k| !b.free[k as usize].is_empty())
            .map(|k| (k, free_sets(&b)[k as usize].clone()))
            .collect();
        // 80 GiB = 64 GiB at 0 + 16 GiB at 64 GiB (orders counted from 512 B = 2^9).
        assert_eq!(top, vec![(25, vec![64 * GIB]), (27, vec![0])]);
    }

    #[test]
    fn split_keeps_the_lower_half_and_files_the_upper_halves() {
        let (mut b, mut mem) = small();
        // Nothing is mapped: the lowest sufficient block, the 8 KiB one at 0, splits down.
        assert_eq!(b.alloc(req(0, 1), &mut mem).unwrap().offset, 0);
        assert_eq!(
            free_sets(&b),
            vec![vec![512], vec![1024], vec![2048], vec![4096, 8192], vec![]]
        );
        // 1000 B rounds to 1 KiB: the 1 KiB block at 1 KiB lies in mapped memory.
        assert_eq!(b.alloc(req(1, 1000), &mut mem).unwrap().offset, 1024);
        // 3 KiB rounds to 4 KiB: no sufficient block is mapped, the lowest (4 KiB) is taken
        // rather than the equally sized top-level block at 8 KiB.
        assert_eq!(b.alloc(req(2, 3 * 1024), &mut mem).unwrap().offset, 4096);
        assert_eq!(
            free_sets(&b),
            vec![vec![512], vec![], vec![2048], vec![8192], vec![]]
        );
        assert_eq!(mem.books.allocated_bytes, 512 + 1024 + 4096);
        b.check_invariants().unwrap();
    }

    #[test]
    fn free_merges_with_free_buddies_upward_but_not_across_top_level_blocks() {
        let (mut b, mut mem) = small();
        b.alloc(req(0, 1), &mut mem).unwrap(); // 0
        b.alloc(req(1, 1000), &mut mem).unwrap(); // 1024
        b.alloc(req(2, 3 * 1024), &mut mem).unwrap(); // 4096
        b.free(AllocId(0), &mut mem);
        // 0 merges with 512 into 1 KiB at 0; its buddy at 1024 is live: stops there.
        assert_eq!(
            free_sets(&b),
            vec![vec![], vec![0], vec![2048], vec![8192], vec![]]
        );
        b.free(AllocId(1), &mut mem);
        // Up to 4 KiB at 0, whose buddy at 4096 is live.
        assert_eq!(
            free_sets(&b),
            vec![vec![], vec![], vec![], vec![0, 8192], vec![]]
        );
        b.check_invariants().unwrap();
        let s = b.free_summary().size_pools[0];
        assert_eq!((s.free_bytes, s.largest_free_bytes), (4096, 4096));
        b.free(AllocId(2), &mut mem);
        // 8 KiB at 0 is whole again; the 4 KiB top-level block at 8 KiB never joins it (their
        // parent would end at 16 KiB, beyond the range).
        assert_eq!(
            free_sets(&b),
            vec![vec![], vec![], vec![], vec![8192], vec![0]]
        );
        b.empty_cache(&mut mem);
        assert_eq!(mem.books.reserved_bytes(), 0);
    }

    #[test]
    fn requests_beyond_the_largest_block_are_refused() {
        let config = AllocConfig {
            capacity_bytes: 80 * GIB,
            ..AllocConfig::default()
        };
        let mut b = Buddy::new(&config);
        let mut mem = crate::executor::Ledger::new(Books::new(config.capacity_bytes));
        assert!(b.alloc(req(0, 64 * GIB + 1), &mut mem).is_err());
        assert!(b.alloc(req(1, u64::MAX), &mut mem).is_err());
        // The heap grows from the bottom: 16 GiB comes from the 64 GiB block at 0, not from
        // the 16 GiB top-level block at 64 GiB.
        assert_eq!(b.alloc(req(2, 16 * GIB), &mut mem).unwrap().offset, 0);
        assert_eq!(
            b.alloc(req(3, 20 * GIB), &mut mem).unwrap().offset,
            32 * GIB
        );
        assert_eq!(
            b.alloc(req(4, 16 * GIB), &mut mem).unwrap().offset,
            16 * GIB
        );
        assert!(b.alloc(req(5, 32 * GIB), &mut mem).is_err());
        assert_eq!(
            b.alloc(req(6, 16 * GIB), &mut mem).unwrap().offset,
            64 * GIB
        );
        assert!(b.alloc(req(7, 2 * MIB), &mut mem).is_err());
        b.check_invariants().unwrap();
        assert_eq!(mem.books.reserved_bytes(), 80 * GIB);
    }

    #[test]
    fn largest_free_counts_only_mapped_memory() {
        let config = AllocConfig {
            capacity_bytes: 64 * MIB,
            ..AllocConfig::default()
        };
        let mut b = Buddy::new(&config);
        let mut mem = crate::executor::Ledger::new(Books::new(config.capacity_bytes));
        b.alloc(req(0, 512), &mut mem).unwrap();
        // 2 MiB mapped; free blocks 512 B .. 1 MiB below it, then 2, 4, .. 32 MiB above.
        let s = b.free_summary().size_pools[0];
        assert_eq!((s.free_bytes, s.largest_free_bytes), (2 * MIB - 512, MIB));
    }
}
