//! Leaf-first LRU over the prefix tree of cached blocks.
//!
//! A cached block's parent is the block before it in the block table of the request that
//! cached it. A free cached block with no cached child is a leaf; one whose child still holds
//! content is inner. Blocks without content are reused first (in vLLM's order), then leaves,
//! least recently released first, and inner blocks only when no free leaf is left, so a
//! prefix is never cut in the middle while its tail stays cached.
//!
//! Under vLLM's own discipline (a request's blocks released tail first, a hit needing every
//! block before it) the LRU head is almost always a leaf already; the two differ where the
//! block tree and the release order disagree, e.g. a block-aligned prompt recomputed into a
//! duplicate of a cached block, whose own children are then held by another request.
//!
//! Parent links carry the parent's generation (bumped whenever its content goes), so a stale
//! link never touches a block that was evicted and reused.

use super::{ClassedFree, EvictionPolicy};
use crate::kv::block::BlockId;
use crate::kv::hash::BlockHash;

const NO_PARENT: u32 = u32::MAX;
const LEAF: usize = 0;
const INNER: usize = 1;

#[derive(Clone, Debug)]
pub struct LeafLru {
    /// Free blocks: class 0 holds leaves, class 1 inner blocks.
    free: ClassedFree<2>,
    cached: Vec<bool>,
    parent: Vec<u32>,
    parent_gen: Vec<u64>,
    gen: Vec<u64>,
    /// Cached blocks whose live parent link names this block.
    children: Vec<u32>,
}

impl LeafLru {
    /// All blocks but the null block free, in id order.
    pub fn new(num_blocks: u32) -> Self {
        let n = num_blocks as usize;
        LeafLru {
            free: ClassedFree::new(num_blocks),
            cached: vec![false; n],
            parent: vec![NO_PARENT; n],
            parent_gen: vec![0; n],
            gen: vec![0; n],
            children: vec![0; n],
        }
    }

    /// Cached children of `block` (0 for a leaf or a block without content).
    pub fn children(&self, block: BlockId) -> u32 {
        self.children[block as usize]
    }

    /// The live parent of a cached block.
    fn live_parent(&self, b: BlockId) -> Option<BlockId> {
        let p = self.parent[b as usize];
        (p != NO_PARENT && self.gen[p as usize] == self.parent_gen[b as usize]).then_some(p)
    }

    fn class(&self, b: BlockId) -> usize {
        if self.children[b as usize] > 0 {
            INNER
        } else {
            LEAF
        }
    }
}

impl EvictionPolicy for LeafLru {
    fn name(&self) -> &'static str {
        "leaf-lru"
    }

    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]) {
        self.free.prepend_uncached(reuse_first);
        for &b in reuse_last {
            if self.cached[b as usize] {
                let c = self.class(b);
                self.free.push_cached(b, c);
            } else {
                self.free.push_uncached(b);
            }
        }
    }

    fn take(&mut self, block: BlockId) {
        self.free.take(block);
    }

    fn pop(&mut self) -> Option<BlockId> {
        self.free
            .pop_uncached()
            .or_else(|| self.free.pop_class(LEAF))
            .or_else(|| self.free.pop_class(INNER))
    }

    fn len(&self) -> u32 {
        self.free.len()
    }

    fn contains(&self, block: BlockId) -> bool {
        self.free.contains(block)
    }

    fn order(&self) -> Vec<BlockId> {
        // Popping never changes a class: the order is the classes one after the other.
        let mut sim = self.clone();
        std::iter::from_fn(|| sim.pop()).collect()
    }

    fn on_cached(&mut self, block: BlockId, _hash: BlockHash, parent: Option<BlockId>) {
        let b = block as usize;
        if self.cached[b] {
            return;
        }
        self.cached[b] = true;
        self.parent[b] = NO_PARENT;
        if let Some(p) = parent.filter(|&p| self.cached[p as usize]) {
            self.parent[b] = p;
            self.parent_gen[b] = self.gen[p as usize];
            self.children[p as usize] += 1;
            self.free.reclass(p, INNER);
        }
    }

    fn on_evicted(&mut self, block: BlockId, _hash: BlockHash) {
        let b = block as usize;
        if !self.cached[b] {
            return;
        }
        if let Some(p) = self.live_parent(block) {
            self.children[p as usize] -= 1;
            if self.children[p as usize] == 0 {
                self.free.reclass(p, LEAF);
            }
        }
        self.cached[b] = false;
        self.parent[b] = NO_PARENT;
        self.children[b] = 0;
        self.gen[b] += 1;
        self.free.uncache(block);
    }

    fn on_reset(&mut self) {
        self.free.uncache_all();
        self.cached.fill(false);
        self.parent.fill(NO_PARENT);
        self.children.fill(0);
        self.gen.iter_mut().for_each(|g| *g += 1);
    }

    fn check(&self) -> Result<(), String> {
        self.free.check()?;
        let mut kids = vec![0u32; self.children.len()];
        for b in 0..self.cached.len() {
            if !self.cached[b] {
                continue;
            }
            if let Some(p) = self.live_parent(b as BlockId) {
                if !self.cached[p as usize] {
                    return Err(format!(
                        "leaf-lru: block {b}'s live parent {p} has no content"
                    ));
                }
                kids[p as usize] += 1;
            }
        }
        for (b, (&k, &c)) in kids.iter().zip(&self.children).enumerate() {
            if k != c {
                return Err(format!(
                    "leaf-lru: block {b} counts {c} children, {k} link to it"
                ));
            }
            let bid = b as BlockId;
            if self.free.contains(bid) {
                let want = self.cached[b].then(|| self.class(bid));
                if self.free.class_of(bid) != want {
                    return Err(format!(
                        "leaf-lru: free block {b} filed in {:?}, belongs in {want:?}",
                        self.free.class_of(bid)
                    ));
                }
            }
        }
        Ok(())
    }
}
