//! Which free block the pool hands out next. A free block may still hold a cached prefix (it
//! has a hash): handing it out evicts that prefix, lazily. The policy only orders free blocks;
//! the pool keeps reference counts and the prefix-cache map, and tells the policy what happens
//! to cached content through hooks (cached, hit, evicted, reset) that default to nothing.
//!
//! Policies, selectable by name with [`parse_eviction`] and built with [`EvictionKind::build`]
//! into the enum [`Eviction`] (what an engine that picks its policy at run time holds):
//! - `lru` — [`VllmLru`], vLLM 0.33.0's free queue exactly (the default; conformance);
//! - `arc` — [`ArcPolicy`], adaptive replacement (recency list T1, frequency list T2, ghost
//!   lists of evicted hashes steering the target size of T1): blocks hit again survive a scan
//!   of one-off prompts that would flush LRU;
//! - `leaf-lru` — [`LeafLru`], leaf-first LRU over the prefix tree: a free cached block whose
//!   cached child still exists is evicted only when no free leaf is left.
//!
//! Every policy reuses blocks without cached content first, in vLLM's order (the head of the
//! free queue), and never decides anything by hash-map iteration order or randomness.

mod arc;
mod leaf_lru;

pub use arc::ArcPolicy;
pub use leaf_lru::LeafLru;

use serde::{Deserialize, Serialize};

use super::block::BlockId;
use super::free_queue::FreeQueue;
use super::hash::BlockHash;

pub trait EvictionPolicy {
    fn name(&self) -> &'static str;

    /// Blocks whose last holder let go, in vLLM's order: `reuse_first` are blocks without a
    /// hash (or every block when prefix caching is off), `reuse_last` are cached blocks; each
    /// list is in the order the pool got them (a request's blocks tail first).
    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]);

    /// A free block was hit by a prefix lookup and is in use again (vLLM's `touch`).
    fn take(&mut self, block: BlockId);

    /// The free block to hand out next.
    fn pop(&mut self) -> Option<BlockId>;

    /// The next `n` free blocks to hand out, into `out` in that order; false (having taken
    /// what there was) if fewer were free.
    #[inline]
    fn pop_n(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        for _ in 0..n {
            match self.pop() {
                Some(b) => out.push(b),
                None => return false,
            }
        }
        true
    }

    /// True when what `pop` hands out never depends on `on_evicted`: the pool may then take
    /// several blocks before it evicts their content (and load ahead what it will touch).
    #[inline]
    fn pop_ignores_evictions(&self) -> bool {
        false
    }

    fn len(&self) -> u32;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, block: BlockId) -> bool;

    /// Free blocks in the order they would be handed out.
    fn order(&self) -> Vec<BlockId>;

    /// Full walk of the policy's own structure.
    fn check(&self) -> Result<(), String>;

    /// `block` (in use) now holds the cached content `hash`; `parent` is the block before it in
    /// the block table of the request that cached it (None for a request's first block).
    #[inline]
    fn on_cached(&mut self, _block: BlockId, _hash: BlockHash, _parent: Option<BlockId>) {}

    /// A prefix lookup hit `block` and the request took it (vLLM's `touch`); the block is in
    /// use now (when it was free, [`take`](Self::take) came first).
    #[inline]
    fn on_hit(&mut self, _block: BlockId) {}

    /// `block`'s cached content `hash` is gone: lazily, after [`pop`](Self::pop) handed the
    /// block out, or by `evict_blocks` (the block may then be free or in use).
    #[inline]
    fn on_evicted(&mut self, _block: BlockId, _hash: BlockHash) {}

    /// `reset_prefix_cache` succeeded: every block is free and none holds content any more.
    #[inline]
    fn on_reset(&mut self) {}
}

/// vLLM 0.33.0's `FreeKVCacheBlockQueue` discipline: new blocks come from the head; freed
/// blocks without a hash go to the head (LIFO reuse, `prepend_n`), cached ones to the tail
/// (`append_n`), so cached blocks are evicted least recently released first and, within one
/// request, tail of the chain first. A touch unlinks a block without reordering anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VllmLru {
    queue: FreeQueue,
}

impl VllmLru {
    /// All blocks but the null block, in id order.
    pub fn new(num_blocks: u32) -> Self {
        VllmLru {
            queue: FreeQueue::new(num_blocks, 1..num_blocks),
        }
    }
}

impl EvictionPolicy for VllmLru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]) {
        self.queue.prepend(reuse_first);
        for &b in reuse_last {
            self.queue.push_back(b);
        }
    }

    #[inline]
    fn take(&mut self, block: BlockId) {
        self.queue.remove(block);
    }

    #[inline]
    fn pop(&mut self) -> Option<BlockId> {
        self.queue.pop_front()
    }

    #[inline]
    fn pop_n(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        self.queue.pop_front_n(n, out)
    }

    /// The free queue's order is fixed by releases and touches alone.
    #[inline]
    fn pop_ignores_evictions(&self) -> bool {
        true
    }

    #[inline]
    fn len(&self) -> u32 {
        self.queue.len()
    }

    #[inline]
    fn contains(&self, block: BlockId) -> bool {
        self.queue.contains(block)
    }

    fn order(&self) -> Vec<BlockId> {
        self.queue.iter().collect()
    }

    fn check(&self) -> Result<(), String> {
        self.queue.check()
    }
}

/// The eviction policies by name.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionKind {
    /// vLLM 0.33.0's LRU free queue ([`VllmLru`]).
    #[default]
    Lru,
    /// Adaptive replacement ([`ArcPolicy`]).
    Arc,
    /// Leaf-first LRU over the prefix tree ([`LeafLru`]).
    LeafLru,
}

impl EvictionKind {
    pub const ALL: [EvictionKind; 3] =
        [EvictionKind::Lru, EvictionKind::Arc, EvictionKind::LeafLru];

    pub fn name(self) -> &'static str {
        match self {
            EvictionKind::Lru => "lru",
            EvictionKind::Arc => "arc",
            EvictionKind::LeafLru => "leaf-lru",
        }
    }

    /// The policy over a pool of `num_blocks` blocks (null block included), every block but
    /// the null block free.
    pub fn build(self, num_blocks: u32) -> Eviction {
        match self {
            EvictionKind::Lru => Eviction::Lru(VllmLru::new(num_blocks)),
            EvictionKind::Arc => Eviction::Arc(ArcPolicy::new(num_blocks)),
            EvictionKind::LeafLru => Eviction::LeafLru(LeafLru::new(num_blocks)),
        }
    }
}

impl std::fmt::Display for EvictionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EvictionKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_eviction(s)
    }
}

/// The policy named `name`: `lru` (vLLM's default), `arc`, `leaf-lru` (also `leaf_lru`);
/// case-insensitive.
pub fn parse_eviction(name: &str) -> Result<EvictionKind, String> {
    match name.trim().to_ascii_lowercase().as_str() {
        "lru" | "vllm" | "vllm-lru" => Ok(EvictionKind::Lru),
        "arc" => Ok(EvictionKind::Arc),
        "leaf-lru" | "leaf_lru" | "leaflru" => Ok(EvictionKind::LeafLru),
        _ => Err(format!(
            "unknown eviction policy {name:?} (expected one of: {})",
            EvictionKind::ALL.map(EvictionKind::name).join(", ")
        )),
    }
}

/// Any of the policies, chosen at run time ([`EvictionKind::build`]); dispatches by `match`.
#[derive(Clone, Debug)]
pub enum Eviction {
    Lru(VllmLru),
    Arc(ArcPolicy),
    LeafLru(LeafLru),
}

impl Eviction {
    pub fn kind(&self) -> EvictionKind {
        match self {
            Eviction::Lru(_) => EvictionKind::Lru,
            Eviction::Arc(_) => EvictionKind::Arc,
            Eviction::LeafLru(_) => EvictionKind::LeafLru,
        }
    }
}

macro_rules! dispatch {
    ($self:expr, $p:ident => $e:expr) => {
        match $self {
            Eviction::Lru($p) => $e,
            Eviction::Arc($p) => $e,
            Eviction::LeafLru($p) => $e,
        }
    };
}

impl EvictionPolicy for Eviction {
    fn name(&self) -> &'static str {
        dispatch!(self, p => p.name())
    }

    #[inline]
    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]) {
        dispatch!(self, p => p.release(reuse_first, reuse_last))
    }

    #[inline]
    fn take(&mut self, block: BlockId) {
        dispatch!(self, p => p.take(block))
    }

    #[inline]
    fn pop(&mut self) -> Option<BlockId> {
        dispatch!(self, p => p.pop())
    }

    #[inline]
    fn pop_n(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        dispatch!(self, p => p.pop_n(n, out))
    }

    #[inline]
    fn pop_ignores_evictions(&self) -> bool {
        dispatch!(self, p => p.pop_ignores_evictions())
    }

    #[inline]
    fn len(&self) -> u32 {
        dispatch!(self, p => p.len())
    }

    #[inline]
    fn contains(&self, block: BlockId) -> bool {
        dispatch!(self, p => p.contains(block))
    }

    fn order(&self) -> Vec<BlockId> {
        dispatch!(self, p => p.order())
    }

    fn check(&self) -> Result<(), String> {
        dispatch!(self, p => p.check())
    }

    #[inline]
    fn on_cached(&mut self, block: BlockId, hash: BlockHash, parent: Option<BlockId>) {
        dispatch!(self, p => p.on_cached(block, hash, parent))
    }

    #[inline]
    fn on_hit(&mut self, block: BlockId) {
        dispatch!(self, p => p.on_hit(block))
    }

    #[inline]
    fn on_evicted(&mut self, block: BlockId, hash: BlockHash) {
        dispatch!(self, p => p.on_evicted(block, hash))
    }

    #[inline]
    fn on_reset(&mut self) {
        dispatch!(self, p => p.on_reset())
    }
}

/// Free blocks without cached content, and free cached blocks ordered by release stamp, in
/// a few classes (the building block of [`ArcPolicy`] and [`LeafLru`]).
///
/// Blocks without content are reused first, exactly as vLLM's free queue reuses them (freed
/// ones at the head, LIFO); then the cached classes in class order, each least recently
/// released first. Stamps are a counter, so ties cannot happen.
#[derive(Clone, Debug)]
pub(crate) struct ClassedFree<const N: usize> {
    uncached: FreeQueue,
    classes: [std::collections::BTreeSet<(u64, BlockId)>; N],
    /// Per block: 0 not free, 1 free without content, `2 + c` free in class `c`.
    slot: Vec<u8>,
    stamp: Vec<u64>,
    next_stamp: u64,
}

impl<const N: usize> ClassedFree<N> {
    pub(crate) fn new(num_blocks: u32) -> Self {
        let mut slot = vec![1u8; num_blocks as usize];
        if let Some(s) = slot.first_mut() {
            *s = 0;
        }
        ClassedFree {
            uncached: FreeQueue::new(num_blocks, 1..num_blocks),
            classes: std::array::from_fn(|_| Default::default()),
            slot,
            stamp: vec![0; num_blocks as usize],
            next_stamp: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> u32 {
        self.uncached.len() + self.classes.iter().map(|c| c.len() as u32).sum::<u32>()
    }

    #[inline]
    pub(crate) fn contains(&self, b: BlockId) -> bool {
        self.slot[b as usize] != 0
    }

    /// The class of a free cached block.
    #[inline]
    pub(crate) fn class_of(&self, b: BlockId) -> Option<usize> {
        match self.slot[b as usize] {
            0 | 1 => None,
            s => Some(s as usize - 2),
        }
    }

    /// Blocks without content, `blocks[0]` reused first (vLLM's `prepend_n`).
    pub(crate) fn prepend_uncached(&mut self, blocks: &[BlockId]) {
        self.uncached.prepend(blocks);
        for &b in blocks {
            self.slot[b as usize] = 1;
        }
    }

    pub(crate) fn push_uncached(&mut self, b: BlockId) {
        self.uncached.push_back(b);
        self.slot[b as usize] = 1;
    }

    /// A cached block released now (the most recent stamp).
    pub(crate) fn push_cached(&mut self, b: BlockId, class: usize) {
        debug_assert!(!self.contains(b));
        let s = self.next_stamp;
        self.next_stamp += 1;
        self.stamp[b as usize] = s;
        self.classes[class].insert((s, b));
        self.slot[b as usize] = 2 + class as u8;
    }

    /// Moves a free cached block to another class, keeping its stamp.
    pub(crate) fn reclass(&mut self, b: BlockId, class: usize) {
        if let Some(c) = self.class_of(b) {
            if c != class {
                let key = (self.stamp[b as usize], b);
                self.classes[c].remove(&key);
                self.classes[class].insert(key);
                self.slot[b as usize] = 2 + class as u8;
            }
        }
    }

    /// A free cached block lost its content: it moves behind the blocks without content.
    pub(crate) fn uncache(&mut self, b: BlockId) {
        if let Some(c) = self.class_of(b) {
            self.classes[c].remove(&(self.stamp[b as usize], b));
            self.push_uncached(b);
        }
    }

    /// Every free cached block loses its content (reset): they follow the blocks without
    /// content, least recently released first.
    pub(crate) fn uncache_all(&mut self) {
        let mut all: Vec<(u64, BlockId)> = Vec::new();
        for c in &mut self.classes {
            all.extend(std::mem::take(c));
        }
        all.sort_unstable();
        for (_, b) in all {
            self.push_uncached(b);
        }
    }

    /// Unlinks a free block.
    pub(crate) fn take(&mut self, b: BlockId) {
        match self.slot[b as usize] {
            0 => panic!("take of block {b}, which is not free"),
            1 => self.uncached.remove(b),
            s => {
                let removed = self.classes[s as usize - 2].remove(&(self.stamp[b as usize], b));
                debug_assert!(removed);
            }
        }
        self.slot[b as usize] = 0;
    }

    /// The next block without content, if any.
    pub(crate) fn pop_uncached(&mut self) -> Option<BlockId> {
        let b = self.uncached.pop_front()?;
        self.slot[b as usize] = 0;
        Some(b)
    }

    /// The least recently released block of `class`, if any.
    pub(crate) fn pop_class(&mut self, class: usize) -> Option<BlockId> {
        let (_, b) = self.classes[class].pop_first()?;
        self.slot[b as usize] = 0;
        Some(b)
    }

    pub(crate) fn class_len(&self, class: usize) -> usize {
        self.classes[class].len()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        self.uncached.check()?;
        let mut n = 0usize;
        for (b, &s) in self.slot.iter().enumerate() {
            let b = b as BlockId;
            match s {
                0 => {}
                1 => {
                    if !self.uncached.contains(b) {
                        return Err(format!("block {b} marked free without content, not queued"));
                    }
                }
                s => {
                    let c = s as usize - 2;
                    if c >= N || !self.classes[c].contains(&(self.stamp[b as usize], b)) {
                        return Err(format!("block {b} marked free in class {c}, not there"));
                    }
                }
            }
            n += (s != 0) as usize;
        }
        if self.slot.first().is_some_and(|&s| s != 0) {
            return Err("the null block is free".into());
        }
        if n != self.len() as usize {
            return Err(format!("{n} blocks marked free, {} held", self.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::pool::BlockPool;

    fn h(x: u64) -> BlockHash {
        BlockHash(x)
    }

    #[test]
    fn arc_adapts_to_ghost_hits() {
        let mut p = BlockPool::with_policy(5, true, ArcPolicy::new(5));
        let mut a = Vec::new();
        p.get_new_blocks(1, &mut a);
        p.cache_full_blocks(&a, &[h(1)], 0, 1);
        p.free_blocks(a.clone());
        assert_eq!(p.policy().sizes(), [1, 0, 0, 0]);
        // Blocks without content go first, then the T1 block: its hash becomes a B1 ghost.
        assert_eq!(p.policy().order(), vec![2, 3, 4, 1]);
        let mut all = Vec::new();
        p.get_new_blocks(4, &mut all);
        assert_eq!(p.policy().sizes(), [0, 0, 1, 0]);
        p.free_blocks(all.iter().rev().copied());
        p.check_invariants().unwrap();
        // Re-cached soon after: a B1 hit raises T1's target and the block goes to T2.
        let mut b = Vec::new();
        p.get_new_blocks(1, &mut b);
        p.cache_full_blocks(&b, &[h(1)], 0, 1);
        assert_eq!(p.policy().target(), 1);
        assert_eq!(p.policy().sizes(), [0, 1, 0, 0]);
        // A T1 block at the target stays while T2 has a free block.
        let mut c = Vec::new();
        p.get_new_blocks(1, &mut c);
        p.cache_full_blocks(&c, &[h(2)], 0, 1);
        p.free_blocks(b.iter().chain(&c).copied());
        let order = p.policy().order();
        assert_eq!(
            &order[order.len() - 2..],
            &[b[0], c[0]],
            "T2 first at the target"
        );
        // Evicting the T2 block leaves a B2 ghost; caching it again lowers the target.
        let mut all = Vec::new();
        p.get_new_blocks(3, &mut all);
        assert_eq!(all[2], b[0]);
        assert_eq!(p.policy().sizes(), [1, 0, 0, 1]);
        p.cache_full_blocks(&all[..1], &[h(1)], 0, 1);
        assert_eq!(p.policy().target(), 0);
        p.free_blocks(all.iter().rev().copied());
        // A hit moves a T1 block to T2.
        let hit = p.get_cached(h(2)).unwrap();
        p.touch(&[hit]);
        assert_eq!(p.policy().sizes(), [0, 2, 0, 0]);
        p.free_blocks([hit]);
        p.check_invariants().unwrap();
        assert!(p.reset_prefix_cache());
        assert_eq!(p.policy().sizes(), [0, 0, 0, 0]);
        p.check_invariants().unwrap();
    }

    #[test]
    fn leaf_lru_evicts_children_before_parents() {
        let mut lru = BlockPool::new(6, true);
        let mut leaf = BlockPool::with_policy(6, true, LeafLru::new(6));
        for p in [&mut lru as &mut dyn Driver, &mut leaf as &mut dyn Driver] {
            p.run();
        }
        // Block 1 (the parent) was released before its child 2: LRU evicts it first,
        // leaf-first evicts the child first.
        assert_eq!(lru.policy().order(), vec![3, 4, 5, 1, 2]);
        assert_eq!(leaf.policy().order(), vec![3, 4, 5, 2, 1]);
        assert_eq!(leaf.policy().children(1), 1);
        let mut got = Vec::new();
        leaf.get_new_blocks(4, &mut got);
        assert_eq!(got, vec![3, 4, 5, 2]);
        assert_eq!(
            leaf.policy().children(1),
            0,
            "the child's eviction makes a leaf"
        );
        leaf.check_invariants().unwrap();
    }

    trait Driver {
        fn run(&mut self);
    }

    impl<P: EvictionPolicy> Driver for BlockPool<P> {
        /// A chain of two blocks; a second holder keeps the child while the parent is released.
        fn run(&mut self) {
            let mut a = Vec::new();
            self.get_new_blocks(2, &mut a);
            self.cache_full_blocks(&a, &[h(10), h(11)], 0, 2);
            self.touch(&a[1..]);
            self.free_blocks(a.iter().rev().copied());
            self.free_blocks([a[1]]);
            self.check_invariants().unwrap();
        }
    }
}
