//! vLLM's `FreeKVCacheBlockQueue`: the free blocks in order (pop from the head, push at either
//! end, unlink from the middle), every operation O(1), amortized over the rare compactions.
//!
//! vLLM keeps a doubly linked list. Here the order lives in a ring of block ids with holes:
//! unlinking a block leaves a hole that popping skips, and the ring is compacted (in order)
//! when it runs full. A pool that evicts least recently freed blocks first hands out blocks
//! that are cold in cache; walking a list would chase one cold link per block, the ring reads
//! ahead in order (and the hardware prefetches it). Each block's place in the ring is kept in
//! `pos`, so membership and unlinking need no search.

use serde::{Deserialize, Serialize};

use super::block::BlockId;

/// Not in the queue (`pos`), or a hole (`ring`).
const NONE: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeQueue {
    /// Block ids from `head` to `tail` (indices wrap at the ring's power-of-two length), with
    /// [`NONE`] where a block was unlinked.
    ring: Vec<u32>,
    /// Per block: its index in `ring`, or [`NONE`].
    pos: Vec<u32>,
    /// Free-running positions; `tail - head` entries (blocks and holes) are in use.
    head: u32,
    tail: u32,
    len: u32,
}

impl FreeQueue {
    /// A queue over `num_blocks` blocks holding `initial` in that order (head first).
    pub fn new(num_blocks: u32, initial: impl IntoIterator<Item = BlockId>) -> Self {
        let capacity = (2 * num_blocks as usize).next_power_of_two().max(4);
        assert!(capacity <= 1 << 31, "too many blocks for the free queue");
        let mut q = FreeQueue {
            ring: vec![NONE; capacity],
            pos: vec![NONE; num_blocks as usize],
            head: 0,
            tail: 0,
            len: 0,
        };
        for b in initial {
            q.push_back(b);
        }
        q
    }

    #[inline]
    fn mask(&self) -> u32 {
        self.ring.len() as u32 - 1
    }

    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn contains(&self, b: BlockId) -> bool {
        self.pos[b as usize] != NONE
    }

    /// Entries (blocks and holes) between head and tail.
    #[inline]
    fn used(&self) -> u32 {
        self.tail.wrapping_sub(self.head)
    }

    /// Makes room for one more entry: when the ring is full, rewrites its blocks in order
    /// from index 0, without the holes.
    #[inline]
    fn reserve_one(&mut self) {
        if self.used() as usize == self.ring.len() {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let blocks: Vec<BlockId> = self.iter().collect();
        self.ring.fill(NONE);
        for (i, &b) in blocks.iter().enumerate() {
            self.ring[i] = b;
            self.pos[b as usize] = i as u32;
        }
        self.head = 0;
        self.tail = blocks.len() as u32;
    }

    /// Appends at the tail.
    #[inline]
    pub fn push_back(&mut self, b: BlockId) {
        debug_assert!(!self.contains(b), "block {b} already free");
        self.reserve_one();
        let i = self.tail & self.mask();
        self.ring[i as usize] = b;
        self.pos[b as usize] = i;
        self.tail = self.tail.wrapping_add(1);
        self.len += 1;
    }

    /// Puts `blocks` at the head, keeping their order: `blocks[0]` becomes the new head.
    pub fn prepend(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            debug_assert!(!self.contains(b), "block {b} already free");
            self.reserve_one();
            self.head = self.head.wrapping_sub(1);
            let i = self.head & self.mask();
            self.ring[i as usize] = b;
            self.pos[b as usize] = i;
            self.len += 1;
        }
    }

    /// Unlinks `b`, which must be in the queue.
    #[inline]
    pub fn remove(&mut self, b: BlockId) {
        let i = self.pos[b as usize];
        assert!(i != NONE, "remove of block {b}, which is not free");
        self.ring[i as usize] = NONE;
        self.pos[b as usize] = NONE;
        self.len -= 1;
    }

    /// Takes the head block.
    #[inline]
    pub fn pop_front(&mut self) -> Option<BlockId> {
        if self.len == 0 {
            // Only holes (if anything) are left: drop them.
            self.head = self.tail;
            return None;
        }
        let mask = self.mask();
        loop {
            let b = self.ring[(self.head & mask) as usize];
            self.ring[(self.head & mask) as usize] = NONE;
            self.head = self.head.wrapping_add(1);
            if b != NONE {
                self.pos[b as usize] = NONE;
                self.len -= 1;
                return Some(b);
            }
        }
    }

    /// Takes the `n` head blocks into `out`, in order; false (having taken what there was) if
    /// fewer were free.
    #[inline]
    pub fn pop_front_n(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        if n > self.len as usize {
            while let Some(b) = self.pop_front() {
                out.push(b);
            }
            return false;
        }
        let first = out.len();
        out.resize(first + n, 0);
        let mask = self.mask();
        let mut head = self.head;
        for taken in &mut out[first..] {
            let b = loop {
                let i = (head & mask) as usize;
                let b = self.ring[i];
                self.ring[i] = NONE;
                head = head.wrapping_add(1);
                if b != NONE {
                    break b;
                }
            };
            self.pos[b as usize] = NONE;
            *taken = b;
        }
        self.head = head;
        self.len -= n as u32;
        true
    }

    /// The blocks from head to tail.
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mask = self.mask();
        (0..self.used())
            .map(move |k| self.ring[(self.head.wrapping_add(k) & mask) as usize])
            .filter(|&b| b != NONE)
    }

    /// Full walk: every block in the ring knows its place, every placed block is there, and
    /// the length matches.
    pub fn check(&self) -> Result<(), String> {
        let mask = self.mask();
        let mut count = 0u32;
        for k in 0..self.used() {
            let i = self.head.wrapping_add(k) & mask;
            let b = self.ring[i as usize];
            if b == NONE {
                continue;
            }
            if self.pos.get(b as usize) != Some(&i) {
                return Err(format!(
                    "free queue: block {b} at {i} does not know its place"
                ));
            }
            count += 1;
        }
        if count != self.len {
            return Err(format!(
                "free queue: {count} blocks queued, length says {}",
                self.len
            ));
        }
        let placed = self.pos.iter().filter(|&&i| i != NONE).count() as u32;
        if placed != self.len {
            return Err(format!(
                "free queue: {placed} blocks have a place, {count} are queued"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn order_of_operations() {
        let mut q = FreeQueue::new(10, 1..10);
        assert_eq!(q.len(), 9);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.pop_front(), Some(2));
        q.remove(5);
        q.prepend(&[2, 1]);
        q.push_back(5);
        assert_eq!(
            q.iter().collect::<Vec<_>>(),
            vec![2, 1, 3, 4, 6, 7, 8, 9, 5]
        );
        q.check().unwrap();
        while q.pop_front().is_some() {}
        assert!(q.is_empty());
        q.check().unwrap();
        q.prepend(&[]);
        q.push_back(3);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![3]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        PushBack(u32),
        Prepend(Vec<u32>),
        Remove(u32),
        Pop,
        PopN(usize),
    }

    proptest! {
        /// Against a VecDeque: the same order after every operation, through wrap-arounds,
        /// holes and compactions (a small ring fills up quickly).
        #[test]
        fn keeps_the_order_of_a_deque(ops in proptest::collection::vec(prop_oneof![
            3 => (0u32..12).prop_map(Op::PushBack),
            2 => proptest::collection::vec(0u32..12, 0..4).prop_map(Op::Prepend),
            2 => (0u32..12).prop_map(Op::Remove),
            3 => Just(Op::Pop),
            2 => (0usize..9).prop_map(Op::PopN),
        ], 1..400)) {
            let mut q = FreeQueue::new(12, 0..6);
            let mut model: VecDeque<u32> = (0..6).collect();
            for op in ops {
                match op {
                    Op::PushBack(b) if !model.contains(&b) => {
                        q.push_back(b);
                        model.push_back(b);
                    }
                    Op::Prepend(bs) => {
                        let mut fresh = Vec::new();
                        for b in bs {
                            if !model.contains(&b) && !fresh.contains(&b) {
                                fresh.push(b);
                            }
                        }
                        q.prepend(&fresh);
                        for &b in fresh.iter().rev() {
                            model.push_front(b);
                        }
                    }
                    Op::Remove(b) if model.contains(&b) => {
                        q.remove(b);
                        model.retain(|&x| x != b);
                    }
                    Op::Pop => prop_assert_eq!(q.pop_front(), model.pop_front()),
                    Op::PopN(n) => {
                        let mut out = vec![99];
                        let all = q.pop_front_n(n, &mut out);
                        let taken: Vec<u32> = (0..n.min(model.len())).filter_map(|_| model.pop_front()).collect();
                        prop_assert_eq!(all, taken.len() == n);
                        prop_assert_eq!(&out[1..], &taken[..]);
                    }
                    _ => {}
                }
                prop_assert_eq!(q.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(q.len() as usize, model.len());
                for b in 0..12 {
                    prop_assert_eq!(q.contains(b), model.contains(&b));
                }
                q.check().map_err(TestCaseError::fail)?;
            }
        }
    }
}
