//! Adaptive replacement (ARC, Megiddo and Modha) over the prefix cache's blocks.
//!
//! Every block with cached content is in one of two lists: T1 (cached, not hit since) or T2
//! (hit by a prefix lookup at least once, or re-cached soon after it was evicted). Evicted
//! hashes are remembered in ghost lists B1 / B2 (bounded by the pool's size). Caching a hash
//! found in B1 raises the target size of T1 (recency was evicted too early), one found in B2
//! lowers it. When a block must be handed out, blocks without content go first (in vLLM's
//! order); then the least recently released free block of T1 while T1 is above its target,
//! else of T2 (falling back to the other list when the chosen one has no free block).
//!
//! Membership counts every block with content, in use or free; only free blocks are
//! candidates. Integer arithmetic only; ghosts are a FIFO plus a lookup map that is never
//! iterated, so nothing depends on hash-map order.

use std::collections::VecDeque;

use super::{ClassedFree, EvictionPolicy};
use crate::kv::block::BlockId;
use crate::kv::hash::{BlockHash, BlockHashMap};

const NONE: u8 = 0;
const T1: u8 = 1;
const T2: u8 = 2;

/// A bounded FIFO of evicted hashes with O(1) membership.
#[derive(Clone, Debug, Default)]
struct Ghosts {
    order: VecDeque<(BlockHash, u64)>,
    live: BlockHashMap<u64>,
    next: u64,
    cap: usize,
}

impl Ghosts {
    fn new(cap: usize) -> Self {
        Ghosts {
            cap,
            ..Default::default()
        }
    }

    fn len(&self) -> usize {
        self.live.len()
    }

    fn push(&mut self, h: BlockHash) {
        let s = self.next;
        self.next += 1;
        self.live.insert(h, s);
        self.order.push_back((h, s));
        while self.live.len() > self.cap {
            let Some((old, st)) = self.order.pop_front() else {
                break;
            };
            if self.live.get(&old) == Some(&st) {
                self.live.remove(&old);
            }
        }
        // Drop stale entries (removed or pushed again) so the FIFO stays O(cap).
        if self.order.len() > 2 * self.cap + 64 {
            let live = &self.live;
            self.order.retain(|(h, s)| live.get(h) == Some(s));
        }
    }

    fn remove(&mut self, h: BlockHash) -> bool {
        self.live.remove(&h).is_some()
    }

    fn clear(&mut self) {
        self.order.clear();
        self.live.clear();
    }
}

#[derive(Clone, Debug)]
pub struct ArcPolicy {
    /// Free blocks: class 0 holds T1's, class 1 T2's.
    free: ClassedFree<2>,
    /// List of every block's cached content (NONE, T1, T2).
    list: Vec<u8>,
    /// The list a block was in when [`pop`](EvictionPolicy::pop) handed it out, until the
    /// pool reports its content evicted.
    evicting: Vec<u8>,
    t1: u32,
    t2: u32,
    /// ARC's `p`: the target size of T1.
    target: u32,
    /// Blocks in the pool (null block excepted).
    cap: u32,
    b1: Ghosts,
    b2: Ghosts,
}

impl ArcPolicy {
    /// All blocks but the null block free, in id order.
    pub fn new(num_blocks: u32) -> Self {
        let cap = num_blocks.saturating_sub(1);
        ArcPolicy {
            free: ClassedFree::new(num_blocks),
            list: vec![NONE; num_blocks as usize],
            evicting: vec![NONE; num_blocks as usize],
            t1: 0,
            t2: 0,
            target: 0,
            cap,
            b1: Ghosts::new(cap as usize),
            b2: Ghosts::new(cap as usize),
        }
    }

    /// ARC's adaptive target size of T1.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Blocks with content in T1 and T2 (in use or free), and ghost hashes in B1 and B2.
    pub fn sizes(&self) -> [usize; 4] {
        [
            self.t1 as usize,
            self.t2 as usize,
            self.b1.len(),
            self.b2.len(),
        ]
    }

    fn drop_member(&mut self, b: BlockId) -> u8 {
        let l = std::mem::replace(&mut self.list[b as usize], NONE);
        match l {
            T1 => self.t1 -= 1,
            T2 => self.t2 -= 1,
            _ => {}
        }
        l
    }
}

impl EvictionPolicy for ArcPolicy {
    fn name(&self) -> &'static str {
        "arc"
    }

    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]) {
        self.free.prepend_uncached(reuse_first);
        for &b in reuse_last {
            match self.list[b as usize] {
                T1 => self.free.push_cached(b, 0),
                T2 => self.free.push_cached(b, 1),
                _ => self.free.push_uncached(b),
            }
        }
    }

    fn take(&mut self, block: BlockId) {
        self.free.take(block);
    }

    fn pop(&mut self) -> Option<BlockId> {
        if let Some(b) = self.free.pop_uncached() {
            return Some(b);
        }
        let (n1, n2) = (self.free.class_len(0), self.free.class_len(1));
        let from_t1 = n1 > 0 && (n2 == 0 || self.t1 > self.target);
        let b = self.free.pop_class(if from_t1 { 0 } else { 1 })?;
        self.evicting[b as usize] = self.drop_member(b);
        Some(b)
    }

    fn len(&self) -> u32 {
        self.free.len()
    }

    fn contains(&self, block: BlockId) -> bool {
        self.free.contains(block)
    }

    fn order(&self) -> Vec<BlockId> {
        let mut sim = self.clone();
        std::iter::from_fn(|| sim.pop()).collect()
    }

    fn on_cached(&mut self, block: BlockId, hash: BlockHash, _parent: Option<BlockId>) {
        self.drop_member(block);
        let (l1, l2) = (self.b1.len() as u32, self.b2.len() as u32);
        let list = if self.b1.remove(hash) {
            // Evicted from T1 and wanted again: recency deserved more room.
            self.target = self.cap.min(self.target + (l2 / l1).max(1));
            T2
        } else if self.b2.remove(hash) {
            self.target = self.target.saturating_sub((l1 / l2).max(1));
            T2
        } else {
            T1
        };
        self.list[block as usize] = list;
        if list == T1 {
            self.t1 += 1;
        } else {
            self.t2 += 1;
        }
    }

    fn on_hit(&mut self, block: BlockId) {
        if self.list[block as usize] == T1 {
            self.list[block as usize] = T2;
            self.t1 -= 1;
            self.t2 += 1;
            self.free.reclass(block, 1);
        }
    }

    fn on_evicted(&mut self, block: BlockId, hash: BlockHash) {
        let list = if self.list[block as usize] != NONE {
            self.free.uncache(block);
            self.drop_member(block)
        } else {
            std::mem::replace(&mut self.evicting[block as usize], NONE)
        };
        match list {
            T1 => self.b1.push(hash),
            T2 => self.b2.push(hash),
            _ => {}
        }
    }

    fn on_reset(&mut self) {
        self.free.uncache_all();
        self.list.fill(NONE);
        self.evicting.fill(NONE);
        self.t1 = 0;
        self.t2 = 0;
        self.target = 0;
        self.b1.clear();
        self.b2.clear();
    }

    fn check(&self) -> Result<(), String> {
        self.free.check()?;
        let (mut t1, mut t2) = (0u32, 0u32);
        for (b, &l) in self.list.iter().enumerate() {
            let bid = b as BlockId;
            match l {
                T1 => t1 += 1,
                T2 => t2 += 1,
                NONE => {}
                x => return Err(format!("arc: block {b} in list {x}")),
            }
            let class = self.free.class_of(bid);
            let want = match l {
                T1 => Some(0),
                T2 => Some(1),
                _ => None,
            };
            if self.free.contains(bid) && class != want {
                return Err(format!(
                    "arc: free block {b} of list {l} filed in class {class:?}"
                ));
            }
            if l != NONE && self.evicting[b] != NONE {
                return Err(format!("arc: block {b} both cached and being evicted"));
            }
        }
        if (t1, t2) != (self.t1, self.t2) {
            return Err(format!(
                "arc: counts T1 {} T2 {}, lists hold {t1} and {t2}",
                self.t1, self.t2
            ));
        }
        if self.target > self.cap {
            return Err(format!(
                "arc: target {} above capacity {}",
                self.target, self.cap
            ));
        }
        if self.b1.len() > self.cap as usize || self.b2.len() > self.cap as usize {
            return Err("arc: a ghost list above capacity".into());
        }
        Ok(())
    }
}
