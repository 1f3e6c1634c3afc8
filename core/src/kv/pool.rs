//! vLLM 0.33.0's `BlockPool`: every block's reference count and hash, the prefix-cache map
//! from hash to the blocks holding it, and the free blocks (ordered by an [`EvictionPolicy`]).
//!
//! Semantics reproduced exactly:
//! - block 0 is the null block, taken at start-up; it is never free and never counted;
//! - new blocks come from the policy (vLLM: the head of the free queue); a block handed out
//!   that still holds a hash is evicted then, lazily: its map entry is removed and counted as
//!   one removed hash (vLLM's `BlockRemoved`);
//! - `touch` takes a free block that a prefix lookup hit out of the free blocks (its count
//!   goes 0 → 1) and otherwise only increments the count;
//! - `free_blocks` decrements counts in the given order and hands the blocks that reach 0 to
//!   the policy, split into uncached (reuse first) and cached (reuse last);
//! - only full blocks are cached, by `cache_full_blocks`; the same hash may be held by several
//!   blocks (block tables are append-only), a lookup returns the one inserted first;
//! - `reset_prefix_cache` succeeds only when every block is free.
//!
//! The policy hears of cached content through its hooks (`on_cached` with the block before it
//! in the request's table, `on_hit` on every touch, `on_evicted` whenever a hash leaves a
//! block, `on_reset`); vLLM's LRU ignores them.

use serde::{Deserialize, Serialize};

use super::block::{BlockId, NULL_BLOCK};
use super::eviction::{EvictionPolicy, VllmLru};
use super::hash::BlockHash;
use super::prefix_map::{prefetch, PrefixMap};

/// Stored and removed hash counts (vLLM's `BlockStored` / `BlockRemoved` events, counted by
/// hashes), since they were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCounters {
    pub stored: u64,
    pub removed: u64,
}

/// The KV-cache events vLLM publishes, with gpumem's hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEvent {
    /// Newly full blocks cached by one request in one call; `parent` is the hash of the block
    /// before the first one (None at the start of the prompt).
    Stored {
        parent: Option<BlockHash>,
        hashes: Vec<BlockHash>,
    },
    /// One hash evicted from one block.
    Removed { hash: BlockHash },
    /// `reset_prefix_cache` succeeded.
    AllCleared,
}

/// Reference counts and hashes of every block, as a plain value (for reports and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPoolSummary {
    pub num_blocks: u32,
    pub free_blocks: u32,
    /// Blocks with a hash (free or in use).
    pub cached_blocks: u32,
    /// Distinct hashes in the prefix-cache map.
    pub cached_hashes: u32,
}

/// One block's reference count and the hash it holds, side by side: the pool reads and writes
/// both for the same block, and one cache line serves them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BlockState {
    hash: u64,
    ref_cnt: u32,
    hashed: bool,
    /// One of the hits of the watched lookup (see [`BlockPool::watch`]).
    watched: bool,
}

impl BlockState {
    #[inline]
    fn hash(&self) -> Option<BlockHash> {
        self.hashed.then_some(BlockHash(self.hash))
    }

    #[inline]
    fn take_hash(&mut self) -> Option<BlockHash> {
        let h = self.hash();
        self.hashed = false;
        h
    }

    #[inline]
    fn set_hash(&mut self, h: BlockHash) {
        self.hash = h.0;
        self.hashed = true;
    }
}

/// How many blocks ahead the pool starts loading the prefix-map slots it will touch.
const LOAD_AHEAD: usize = 4;

/// One prefix lookup's answer, watched for anything that could change it or its blocks'
/// standing: its hit blocks losing their hash (an eviction: a later holder of the same hash,
/// or none, would answer), the hash after its last hit being cached (the run of hits would
/// grow), and any touch (a free hit taken out of the free blocks). While none of these has
/// happened, the same lookup gives the same blocks, and none of them has gained a reference.
#[derive(Clone, Debug, Default)]
struct Watch {
    blocks: Vec<BlockId>,
    /// The hash whose caching would extend the hits (None: the lookup stopped at its limit).
    next: Option<BlockHash>,
    changed: bool,
}

#[derive(Clone, Debug)]
pub struct BlockPool<P: EvictionPolicy = VllmLru> {
    num_blocks: u32,
    enable_caching: bool,
    /// Reference count and hash of every block.
    blocks: Vec<BlockState>,
    cached: PrefixMap,
    policy: P,
    counters: StepCounters,
    totals: StepCounters,
    events: Option<Vec<KvEvent>>,
    reuse_first: Vec<BlockId>,
    reuse_last: Vec<BlockId>,
    watch: Watch,
}

impl BlockPool<VllmLru> {
    /// vLLM's pool: `num_blocks` includes the null block 0.
    pub fn new(num_blocks: u32, enable_caching: bool) -> Self {
        Self::with_policy(num_blocks, enable_caching, VllmLru::new(num_blocks))
    }
}

impl<P: EvictionPolicy> BlockPool<P> {
    /// A pool over `num_blocks` blocks whose `policy` holds blocks `1..num_blocks` as free.
    pub fn with_policy(num_blocks: u32, enable_caching: bool, policy: P) -> Self {
        assert!(num_blocks >= 1, "a pool needs at least the null block");
        assert!(
            num_blocks <= super::prefix_map::MAX_BLOCKS,
            "too many blocks"
        );
        assert_eq!(
            policy.len(),
            num_blocks - 1,
            "policy must start with every block free"
        );
        BlockPool {
            num_blocks,
            enable_caching,
            blocks: vec![BlockState::default(); num_blocks as usize],
            cached: PrefixMap::new(num_blocks),
            policy,
            counters: StepCounters::default(),
            totals: StepCounters::default(),
            events: None,
            reuse_first: Vec::new(),
            reuse_last: Vec::new(),
            watch: Watch {
                changed: true,
                ..Watch::default()
            },
        }
    }

    /// Also record [`KvEvent`]s (drained by [`take_events`](Self::take_events)).
    pub fn record_events(&mut self, on: bool) {
        self.events = on.then(Vec::new);
    }

    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    pub fn caching_enabled(&self) -> bool {
        self.enable_caching
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// vLLM's `get_num_free_blocks` (cached free blocks count as free).
    #[inline]
    pub fn num_free(&self) -> u32 {
        self.policy.len()
    }

    /// vLLM's `get_usage`: 1 − free / (num_blocks − 1).
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks - 1;
        if total == 0 {
            return 0.0;
        }
        1.0 - self.num_free() as f64 / total as f64
    }

    #[inline]
    pub fn ref_cnt(&self, b: BlockId) -> u32 {
        self.blocks[b as usize].ref_cnt
    }

    #[inline]
    pub fn block_hash(&self, b: BlockId) -> Option<BlockHash> {
        self.blocks[b as usize].hash()
    }

    /// Starts loading what [`get_cached`](Self::get_cached) of `h` will read (a hint).
    #[inline]
    pub fn load_ahead(&self, h: BlockHash) {
        self.cached.load_ahead(h);
    }

    /// The block to serve a hit on `h`: the first inserted of the blocks holding it.
    #[inline]
    pub fn get_cached(&self, h: BlockHash) -> Option<BlockId> {
        self.cached.first(h, |b| self.blocks[b as usize].hash)
    }

    /// Watches the answer of a prefix lookup from now on: `hits` (the blocks it served) and
    /// `next`, the hash after them it looked up and missed (None when it stopped at its
    /// limit). Replaces the previous watch. [`watch_unchanged`](Self::watch_unchanged) then
    /// says whether the same lookup would still serve exactly these blocks, none of them
    /// taken since. The hooks cost a flag test on blocks already loaded.
    pub fn watch(&mut self, hits: &[BlockId], next: Option<BlockHash>) {
        let mut blocks = std::mem::take(&mut self.watch.blocks);
        for &b in &blocks {
            self.blocks[b as usize].watched = false;
        }
        blocks.clear();
        blocks.extend_from_slice(hits);
        for &b in hits {
            self.blocks[b as usize].watched = true;
        }
        self.watch = Watch {
            blocks,
            next,
            changed: false,
        };
    }

    /// Whether nothing that could change the watched lookup's answer, or take one of its
    /// free hits, has happened since [`watch`](Self::watch) (false before any watch).
    #[inline]
    pub fn watch_unchanged(&self) -> bool {
        !self.watch.changed
    }

    /// Ends the watch (the watched lookup's request was admitted).
    pub fn unwatch(&mut self) {
        self.watch(&[], None);
        self.watch.changed = true;
    }

    /// Takes `n` blocks from the free blocks (evicting cached content lazily), each with a
    /// reference count of 1, and appends them to `out`. Panics if fewer than `n` are free:
    /// callers check first.
    pub fn get_new_blocks(&mut self, n: usize, out: &mut Vec<BlockId>) {
        assert!(
            n <= self.num_free() as usize,
            "get_new_blocks({n}) with {} free",
            self.num_free()
        );
        out.reserve(n);
        if self.enable_caching && self.policy.pop_ignores_evictions() {
            // Take them all first: evicting each then finds the map slots it touches already
            // on their way (one cache miss per block, overlapped).
            let first = out.len();
            assert!(self.policy.pop_n(n, out), "free count out of sync");
            let taken = &out[first..];
            for (i, &b) in taken.iter().enumerate() {
                if let Some(&a) = taken.get(i + 2 * LOAD_AHEAD) {
                    prefetch(&self.blocks[a as usize]);
                }
                if let Some(h) = taken.get(i + LOAD_AHEAD).and_then(|&a| self.block_hash(a)) {
                    self.cached.load_ahead(h);
                }
                self.maybe_evict(b);
                self.take_new(b);
            }
            return;
        }
        for _ in 0..n {
            let b = self.policy.pop().expect("free count out of sync");
            if self.enable_caching {
                self.maybe_evict(b);
            }
            self.take_new(b);
            out.push(b);
        }
    }

    /// A free block handed out: one reference.
    #[inline]
    fn take_new(&mut self, b: BlockId) {
        let r = &mut self.blocks[b as usize].ref_cnt;
        debug_assert_eq!(*r, 0, "free block {b} is referenced");
        *r = 1;
    }

    /// Removes every map entry that points at `b` and clears its hash. Returns whether it held
    /// a hash.
    #[inline]
    fn maybe_evict(&mut self, b: BlockId) -> bool {
        let state = &mut self.blocks[b as usize];
        let Some(h) = state.take_hash() else {
            return false;
        };
        if state.watched {
            self.watch.changed = true;
        }
        self.policy.on_evicted(b, h);
        if self.remove_holder(h, b) {
            self.counters.removed += 1;
            self.totals.removed += 1;
            if let Some(ev) = &mut self.events {
                ev.push(KvEvent::Removed { hash: h });
            }
        }
        true
    }

    fn remove_holder(&mut self, h: BlockHash, b: BlockId) -> bool {
        self.cached.remove(h, b, |x| self.blocks[x as usize].hash)
    }

    /// vLLM's `touch`: each block hit by a prefix lookup gains a reference; a free one leaves
    /// the free blocks.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        self.watch.changed = true;
        for &b in blocks {
            if b == NULL_BLOCK {
                continue;
            }
            let r = &mut self.blocks[b as usize].ref_cnt;
            if *r == 0 {
                self.policy.take(b);
            }
            *r += 1;
            self.policy.on_hit(b);
        }
    }

    /// vLLM's `free_blocks`: `ordered` is in eviction priority (first evicted first).
    pub fn free_blocks(&mut self, ordered: impl IntoIterator<Item = BlockId>) {
        let (mut first, mut last) = self.release_lists();
        for b in ordered {
            self.unref(b, &mut first, &mut last);
        }
        self.release(first, last);
    }

    /// [`free_blocks`](Self::free_blocks) of a request's block table, tail first (vLLM's
    /// `free`), loading each block's state a few blocks ahead.
    pub fn free_table(&mut self, table: &[BlockId]) {
        let (mut first, mut last) = self.release_lists();
        for i in (0..table.len()).rev() {
            if let Some(&ahead) = i.checked_sub(LOAD_AHEAD).map(|k| &table[k]) {
                prefetch(&self.blocks[ahead as usize]);
            }
            self.unref(table[i], &mut first, &mut last);
        }
        self.release(first, last);
    }

    /// The reused lists for blocks that become free, emptied.
    fn release_lists(&mut self) -> (Vec<BlockId>, Vec<BlockId>) {
        let mut first = std::mem::take(&mut self.reuse_first);
        let mut last = std::mem::take(&mut self.reuse_last);
        first.clear();
        last.clear();
        (first, last)
    }

    /// Drops one reference to `b`; a block no one holds goes to `first` (no hash: reused
    /// first) or `last` (cached: reused last).
    #[inline]
    fn unref(&mut self, b: BlockId, first: &mut Vec<BlockId>, last: &mut Vec<BlockId>) {
        if b == NULL_BLOCK {
            return;
        }
        let state = &mut self.blocks[b as usize];
        assert!(
            state.ref_cnt > 0,
            "free of block {b}, which is not referenced"
        );
        state.ref_cnt -= 1;
        if state.ref_cnt == 0 {
            if !state.hashed || !self.enable_caching {
                first.push(b);
            } else {
                last.push(b);
            }
        }
    }

    /// Hands the blocks no one holds to the policy, and keeps the lists for next time.
    fn release(&mut self, first: Vec<BlockId>, last: Vec<BlockId>) {
        self.policy.release(&first, &last);
        self.reuse_first = first;
        self.reuse_last = last;
    }

    /// vLLM's `cache_full_blocks`: gives blocks `num_cached..num_full` of a request's table
    /// their hashes (`hashes[i]` for block `i`) and enters them in the map. One `Stored` event
    /// for the call.
    pub fn cache_full_blocks(
        &mut self,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        num_cached: usize,
        num_full: usize,
    ) {
        if num_cached >= num_full || !self.enable_caching {
            return;
        }
        assert!(num_full <= blocks.len() && num_full <= hashes.len());
        let mut stored = 0u64;
        for i in num_cached..num_full {
            if i + LOAD_AHEAD < num_full {
                self.cached.load_ahead(hashes[i + LOAD_AHEAD]);
            }
            let b = blocks[i];
            if b == NULL_BLOCK {
                continue;
            }
            let h = hashes[i];
            stored += 1;
            match self.blocks[b as usize].hash() {
                Some(old) if old == h => continue,
                Some(old) => panic!("block {b} already holds hash {old:?}"),
                None => {}
            }
            self.blocks[b as usize].set_hash(h);
            let parent = i
                .checked_sub(1)
                .map(|j| blocks[j])
                .filter(|&p| p != NULL_BLOCK);
            self.policy.on_cached(b, h, parent);
            if self.watch.next == Some(h) {
                self.watch.changed = true;
            }
            self.cached.insert(h, b, |x| self.blocks[x as usize].hash);
        }
        self.counters.stored += stored;
        self.totals.stored += stored;
        if let Some(ev) = &mut self.events {
            ev.push(KvEvent::Stored {
                parent: num_cached.checked_sub(1).map(|i| hashes[i]),
                hashes: hashes[num_cached..num_full].to_vec(),
            });
        }
    }

    /// vLLM's `evict_blocks`: drops the cached content of these blocks (in use or free).
    pub fn evict_blocks(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            assert!(b < self.num_blocks, "evict of unknown block {b}");
            self.maybe_evict(b);
        }
    }

    /// vLLM's `reset_prefix_cache`: clears every hash if no block is in use; false otherwise.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_blocks - self.num_free() != 1 {
            return false;
        }
        self.cached.clear();
        self.watch.changed = true;
        self.blocks.iter_mut().for_each(|s| {
            s.take_hash();
        });
        self.policy.on_reset();
        if let Some(ev) = &mut self.events {
            ev.push(KvEvent::AllCleared);
        }
        true
    }

    /// Stored/removed hash counts since the last call.
    pub fn take_counters(&mut self) -> StepCounters {
        std::mem::take(&mut self.counters)
    }

    /// Stored/removed hash counts since the start.
    pub fn totals(&self) -> StepCounters {
        self.totals
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn summary(&self) -> BlockPoolSummary {
        BlockPoolSummary {
            num_blocks: self.num_blocks,
            free_blocks: self.num_free(),
            cached_blocks: self.blocks.iter().filter(|s| s.hashed).count() as u32,
            cached_hashes: self.cached.len() as u32,
        }
    }

    /// Full walk of the pool's invariants: the policy's structure; a block is free exactly
    /// when nothing references it; free + used + null = total; every map entry points at a
    /// block holding that hash and every hashed block is in the map.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.policy.check()?;
        if self.policy.contains(NULL_BLOCK) || self.blocks[0].ref_cnt != 0 || self.blocks[0].hashed
        {
            return Err("null block is free, referenced or hashed".into());
        }
        let mut used = 0u32;
        for b in 1..self.num_blocks {
            let free = self.policy.contains(b);
            let r = self.blocks[b as usize].ref_cnt;
            if free == (r > 0) {
                return Err(format!("block {b}: free {free} with {r} references"));
            }
            used += (r > 0) as u32;
            if let Some(h) = self.block_hash(b) {
                let held = self
                    .cached
                    .holders(h, |x| self.blocks[x as usize].hash)
                    .any(|x| x == b);
                if !held {
                    return Err(format!(
                        "block {b} holds {h:?}, which the map does not name"
                    ));
                }
            }
        }
        if used + self.num_free() + 1 != self.num_blocks {
            return Err(format!(
                "{used} used + {} free + null != {} blocks",
                self.num_free(),
                self.num_blocks
            ));
        }
        let mut entries = 0usize;
        let hash_of = |x: BlockId| self.blocks[x as usize].hash;
        self.cached.check(hash_of)?;
        for first in self.cached.first_blocks() {
            let h = BlockHash(hash_of(first));
            let s: Vec<BlockId> = self.cached.holders(h, hash_of).collect();
            if s.is_empty() {
                return Err(format!("{h:?} maps to no block"));
            }
            for (i, &b) in s.iter().enumerate() {
                if self.blocks.get(b as usize).and_then(BlockState::hash) != Some(h) {
                    return Err(format!("{h:?} maps to block {b}, which does not hold it"));
                }
                if s[..i].contains(&b) {
                    return Err(format!("{h:?} names block {b} twice"));
                }
            }
            entries += s.len();
        }
        let hashed = self.blocks.iter().filter(|s| s.hashed).count();
        if entries != hashed {
            return Err(format!("{entries} map entries for {hashed} hashed blocks"));
        }
        if !self.enable_caching && hashed > 0 {
            return Err("hashes with prefix caching off".into());
        }
        let watched = self.blocks.iter().filter(|s| s.watched).count();
        let listed = &self.watch.blocks;
        if watched != listed.len() || listed.iter().any(|&b| !self.blocks[b as usize].watched) {
            return Err(format!(
                "{watched} blocks flagged watched, {} in the watch",
                listed.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: u64) -> BlockHash {
        BlockHash(x)
    }

    /// vLLM's own example (notes §1.5): block size 4, 10 blocks, a 14-token request gets blocks
    /// [1,2,3,4], caches 3, and after its free the queue is [4,5,6,7,8,9,3,2,1].
    #[test]
    fn free_order_matches_vllm() {
        let mut p = BlockPool::new(10, true);
        let mut got = Vec::new();
        p.get_new_blocks(4, &mut got);
        assert_eq!(got, vec![1, 2, 3, 4]);
        p.cache_full_blocks(&got, &[h(10), h(11), h(12)], 0, 3);
        assert_eq!(
            p.take_counters(),
            StepCounters {
                stored: 3,
                removed: 0
            }
        );
        p.free_blocks(got.iter().rev().copied());
        assert_eq!(p.policy().order(), vec![4, 5, 6, 7, 8, 9, 3, 2, 1]);
        p.check_invariants().unwrap();
        // A hit on block 2 takes it out of the queue without reordering the rest.
        p.touch(&[p.get_cached(h(10)).unwrap(), p.get_cached(h(11)).unwrap()]);
        assert_eq!(p.policy().order(), vec![4, 5, 6, 7, 8, 9, 3]);
        assert_eq!(p.ref_cnt(1), 1);
        // Taking 7 blocks evicts block 3 lazily: one removed hash.
        let mut more = Vec::new();
        p.get_new_blocks(7, &mut more);
        assert_eq!(more, vec![4, 5, 6, 7, 8, 9, 3]);
        assert_eq!(
            p.take_counters(),
            StepCounters {
                stored: 0,
                removed: 1
            }
        );
        assert_eq!(p.get_cached(h(12)), None);
        assert_eq!(p.num_free(), 0);
        assert!(!p.reset_prefix_cache());
        p.check_invariants().unwrap();
        p.free_blocks(more.iter().rev().copied());
        p.free_blocks([2, 1]);
        assert!(p.reset_prefix_cache());
        assert_eq!(p.get_cached(h(10)), None);
        p.check_invariants().unwrap();
    }

    /// A watched lookup's answer counts as changed exactly on what could change it: an
    /// eviction of one of its hits, the caching of the hash after them, a touch, a reset;
    /// other evictions, cachings and frees leave it.
    #[test]
    fn a_watch_sees_what_changes_a_lookup() {
        let mut p = BlockPool::new(12, true);
        assert!(!p.watch_unchanged(), "nothing watched yet");
        let mut a = Vec::new();
        p.get_new_blocks(3, &mut a);
        p.cache_full_blocks(&a, &[h(1), h(2), h(3)], 0, 3);
        p.free_blocks(a.iter().rev().copied());
        // A lookup of [1, 2, 3, 4, 5] serves a's three blocks and misses 4.
        let rewatch = |p: &mut BlockPool| {
            p.watch(&a, Some(h(4)));
            assert!(p.watch_unchanged());
        };
        rewatch(&mut p);
        // Unrelated: another request's blocks cached (not hash 4), evicted, freed.
        let mut b = Vec::new();
        p.get_new_blocks(2, &mut b);
        p.cache_full_blocks(&b, &[h(9), h(5)], 0, 2);
        p.evict_blocks(&b[..1]);
        p.free_blocks(b.iter().rev().copied());
        assert!(p.watch_unchanged());
        p.check_invariants().unwrap();
        // Hash 4 cached: the hits would grow.
        let mut c = Vec::new();
        p.get_new_blocks(1, &mut c);
        p.cache_full_blocks(&c, &[h(4)], 0, 1);
        assert!(!p.watch_unchanged(), "the hash after the hits was cached");
        p.free_blocks(c.clone());
        // A hit evicted (as an allocation reaching it would).
        rewatch(&mut p);
        p.evict_blocks(&a[1..2]);
        assert!(!p.watch_unchanged(), "a hit lost its hash");
        p.check_invariants().unwrap();
        // A touch: a free hit may have been taken.
        p.watch(&a[..1], Some(h(2)));
        p.touch(&[]);
        assert!(!p.watch_unchanged(), "a touch");
        // A reset.
        p.watch(&a[..1], None);
        assert!(p.reset_prefix_cache());
        assert!(!p.watch_unchanged(), "a reset");
        // Unwatched: no block stays flagged.
        p.unwatch();
        assert!(!p.watch_unchanged());
        p.check_invariants().unwrap();
    }

    #[test]
    fn duplicates_and_caching_off() {
        let mut p = BlockPool::new(6, true);
        p.record_events(true);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        p.get_new_blocks(1, &mut a);
        p.get_new_blocks(1, &mut b);
        p.cache_full_blocks(&a, &[h(7)], 0, 1);
        p.cache_full_blocks(&b, &[h(7)], 0, 1);
        assert_eq!(p.get_cached(h(7)), Some(a[0]));
        p.free_blocks(a.clone());
        p.free_blocks(b.clone());
        p.check_invariants().unwrap();
        let mut all = Vec::new();
        p.get_new_blocks(5, &mut all);
        assert_eq!(p.take_counters().removed, 2, "one removal per holder");
        let ev = p.take_events();
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, KvEvent::Removed { .. }))
                .count(),
            2
        );
        p.free_blocks(all.iter().rev().copied());

        let mut off = BlockPool::new(6, false);
        let mut x = Vec::new();
        off.get_new_blocks(3, &mut x);
        off.cache_full_blocks(&x, &[h(1), h(2), h(3)], 0, 3);
        off.free_blocks(x.iter().rev().copied());
        assert_eq!(off.policy().order(), vec![3, 2, 1, 4, 5]);
        assert_eq!(off.take_counters(), StepCounters::default());
        off.check_invariants().unwrap();
    }
}
