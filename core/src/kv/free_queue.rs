//! vLLM's `FreeKVCacheBlockQueue`: an intrusive doubly linked list of free blocks, kept as two
//! index arrays over the block slab with a fake head and a fake tail, so that every operation
//! (pop from the head, push at either end, unlink from the middle) is O(1) and allocation-free.

use serde::{Deserialize, Serialize};

use super::block::BlockId;

const NONE: u32 = u32::MAX;

/// A block's neighbours in the queue, side by side (one cache line serves an unlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link {
    prev: NONE,
    next: NONE,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeQueue {
    /// `links[i]` for block `i`, both `NONE` when the block is not in the queue. Index `n` is
    /// the fake head, `n + 1` the fake tail.
    links: Vec<Link>,
    len: u32,
}

impl FreeQueue {
    /// A queue over `num_blocks` blocks holding `initial` in that order (head first).
    pub fn new(num_blocks: u32, initial: impl IntoIterator<Item = BlockId>) -> Self {
        let n = num_blocks as usize;
        let mut q = FreeQueue {
            links: vec![UNLINKED; n + 2],
            len: 0,
        };
        let (head, tail) = (q.head(), q.tail());
        q.links[head as usize].next = tail;
        q.links[tail as usize].prev = head;
        for b in initial {
            q.push_back(b);
        }
        q
    }

    #[inline]
    fn head(&self) -> u32 {
        (self.links.len() - 2) as u32
    }

    #[inline]
    fn tail(&self) -> u32 {
        (self.links.len() - 1) as u32
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
        self.links[b as usize].next != NONE
    }

    #[inline]
    fn link(&mut self, after: u32, b: u32) {
        let before = self.links[after as usize].next;
        self.links[b as usize].prev = after;
        self.links[b as usize].next = before;
        self.links[after as usize].next = b;
        self.links[before as usize].prev = b;
        self.len += 1;
    }

    /// Appends at the tail.
    #[inline]
    pub fn push_back(&mut self, b: BlockId) {
        debug_assert!(!self.contains(b), "block {b} already free");
        let last = self.links[self.tail() as usize].prev;
        self.link(last, b);
    }

    /// Puts `blocks` at the head, keeping their order: `blocks[0]` becomes the new head.
    pub fn prepend(&mut self, blocks: &[BlockId]) {
        let mut after = self.head();
        for &b in blocks {
            debug_assert!(!self.contains(b), "block {b} already free");
            self.link(after, b);
            after = b;
        }
    }

    /// Unlinks `b`, which must be in the queue.
    #[inline]
    pub fn remove(&mut self, b: BlockId) {
        let (p, n) = (self.links[b as usize].prev, self.links[b as usize].next);
        assert!(
            p != NONE && n != NONE,
            "remove of block {b}, which is not free"
        );
        self.links[p as usize].next = n;
        self.links[n as usize].prev = p;
        self.links[b as usize].prev = NONE;
        self.links[b as usize].next = NONE;
        self.len -= 1;
    }

    /// Takes the head block.
    #[inline]
    pub fn pop_front(&mut self) -> Option<BlockId> {
        let first = self.links[self.head() as usize].next;
        if first == self.tail() {
            return None;
        }
        self.remove(first);
        Some(first)
    }

    /// The blocks from head to tail.
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let tail = self.tail();
        let mut cur = self.links[self.head() as usize].next;
        std::iter::from_fn(move || {
            if cur == tail {
                return None;
            }
            let b = cur;
            cur = self.links[b as usize].next;
            Some(b)
        })
    }

    /// Full walk: links are symmetric and the length matches.
    pub fn check(&self) -> Result<(), String> {
        let mut count = 0u32;
        let mut prev = self.head();
        for b in self.iter() {
            if self.links[b as usize].prev != prev {
                return Err(format!("free queue: block {b} has a broken back link"));
            }
            count += 1;
            if count > self.len {
                return Err("free queue: longer than its length (cycle?)".into());
            }
            prev = b;
        }
        if self.links[self.tail() as usize].prev != prev {
            return Err("free queue: tail link broken".into());
        }
        if count != self.len {
            return Err(format!(
                "free queue: {count} linked, length says {}",
                self.len
            ));
        }
        let linked = self.links[..self.links.len() - 2]
            .iter()
            .filter(|l| l.next != NONE)
            .count() as u32;
        if linked != self.len {
            return Err(format!(
                "free queue: {linked} blocks have links, {count} reachable"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
