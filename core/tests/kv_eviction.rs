//! Eviction policies behind `EvictionPolicy` (`lru`, `arc`, `leaf-lru`): under random
//! operation sequences (the op model of `common::kv_model`, shared with `kv_pool.rs`) every
//! policy keeps the pool's invariants and its own, never hands out a block that is
//! referenced, and serves only correct hits;
//! `lru` through the run-time [`Eviction`] enum is vLLM's free queue exactly; with prefix
//! caching off every policy is LRU; and on crafted sequences each other policy serves
//! different hits than LRU.

mod common;

use common::kv_model::{config, op, slot, Op, Req, Step, BS, SLOTS};
use gpumem_core::kv::eviction::{parse_eviction, Eviction, EvictionKind};
use gpumem_core::kv::hash::{extend_block_hashes, ExtraKeys};
use gpumem_core::kv::{BlockHash, BlockId, EvictionPolicy, KvCacheManager, VllmLru};
use proptest::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// A policy that records every block it hands out, to check them against reference counts.
#[derive(Clone, Debug)]
struct Audited<P> {
    inner: P,
    popped: Rc<RefCell<Vec<BlockId>>>,
}

impl<P: EvictionPolicy> EvictionPolicy for Audited<P> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn release(&mut self, reuse_first: &[BlockId], reuse_last: &[BlockId]) {
        for &b in reuse_first.iter().chain(reuse_last) {
            assert!(!self.inner.contains(b), "block {b} released twice");
        }
        self.inner.release(reuse_first, reuse_last)
    }
    fn take(&mut self, block: BlockId) {
        assert!(self.inner.contains(block), "take of non-free block {block}");
        self.inner.take(block)
    }
    fn pop(&mut self) -> Option<BlockId> {
        let b = self.inner.pop();
        if let Some(b) = b {
            assert!(!self.inner.contains(b), "popped block {b} still free");
            self.popped.borrow_mut().push(b);
        }
        b
    }
    fn len(&self) -> u32 {
        self.inner.len()
    }
    fn contains(&self, block: BlockId) -> bool {
        self.inner.contains(block)
    }
    fn order(&self) -> Vec<BlockId> {
        self.inner.order()
    }
    fn check(&self) -> Result<(), String> {
        self.inner.check()?;
        let order = self.inner.order();
        if order.len() != self.inner.len() as usize {
            return Err(format!(
                "order has {} blocks, len {}",
                order.len(),
                self.inner.len()
            ));
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != order.len() || order.iter().any(|&b| !self.inner.contains(b)) {
            return Err(format!("order {order:?} is not the free set"));
        }
        Ok(())
    }
    fn on_cached(&mut self, block: BlockId, hash: BlockHash, parent: Option<BlockId>) {
        assert!(!self.inner.contains(block), "cached a free block {block}");
        self.inner.on_cached(block, hash, parent)
    }
    fn on_hit(&mut self, block: BlockId) {
        assert!(!self.inner.contains(block), "hit block {block} still free");
        self.inner.on_hit(block)
    }
    fn on_evicted(&mut self, block: BlockId, hash: BlockHash) {
        self.inner.on_evicted(block, hash)
    }
    fn on_reset(&mut self) {
        assert_eq!(self.inner.len() as usize, self.inner.order().len());
        self.inner.on_reset()
    }
}

/// What one run observed, to compare policies in lockstep.
#[derive(Debug, Default, PartialEq, Eq)]
struct Trace {
    /// Block tables after every op.
    tables: Vec<Vec<Vec<BlockId>>>,
    hits: Vec<u64>,
    free_order: Vec<Vec<BlockId>>,
}

/// Runs `ops` (the model of `common::kv_model`) on a manager over `policy` behind [`Audited`],
/// checking besides the model's own checks that every block handed out was unreferenced
/// before the op and not one of its hits.
fn run<P: EvictionPolicy + Clone>(
    policy: P,
    ops: &[Op],
    num_blocks: u32,
    caching: bool,
) -> Result<Trace, TestCaseError> {
    let popped = Rc::new(RefCell::new(Vec::new()));
    let audited = Audited {
        inner: policy,
        popped: popped.clone(),
    };
    let mut trace = Trace::default();
    common::kv_model::run(audited, ops, num_blocks, caching, |kv, step: Step<'_>| {
        if let Some(hit) = step.admitted {
            trace.hits.push(hit);
        }
        let popped = std::mem::take(&mut *popped.borrow_mut());
        for b in popped {
            prop_assert_eq!(
                step.refs_before[b as usize],
                0,
                "handed out block {} with references",
                b
            );
            prop_assert!(
                !step.hits.contains(&b),
                "handed out block {} that was just hit",
                b
            );
            prop_assert_eq!(kv.pool().ref_cnt(b), 1);
        }
        trace
            .tables
            .push((0..SLOTS).map(|i| kv.blocks(i).to_vec()).collect());
        trace.free_order.push(kv.pool().policy().order());
        Ok(())
    })?;
    Ok(trace)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Every policy keeps the invariants and never evicts a referenced block.
    #[test]
    fn every_policy_keeps_the_invariants(
        ops in proptest::collection::vec(op(4, 3), 1..140),
        blocks in 6u32..20,
        caching in prop_oneof![4 => Just(true), 1 => Just(false)],
    ) {
        for kind in EvictionKind::ALL {
            run(kind.build(blocks), &ops, blocks, caching)?;
        }
    }

    /// `lru` through the run-time enum is vLLM's free queue, decision for decision.
    #[test]
    fn lru_kind_is_vllms_free_queue(
        ops in proptest::collection::vec(op(4, 3), 1..140),
        blocks in 6u32..20,
    ) {
        let a = run(VllmLru::new(blocks), &ops, blocks, true)?;
        let b = run(EvictionKind::Lru.build(blocks), &ops, blocks, true)?;
        prop_assert_eq!(a, b);
    }

    /// Without prefix caching no block holds content: every policy is LRU.
    #[test]
    fn without_caching_every_policy_is_lru(
        ops in proptest::collection::vec(op(4, 3), 1..100),
        blocks in 6u32..20,
    ) {
        let lru = run(VllmLru::new(blocks), &ops, blocks, false)?;
        for kind in [EvictionKind::Arc, EvictionKind::LeafLru] {
            let other = run(kind.build(blocks), &ops, blocks, false)?;
            prop_assert_eq!(&lru, &other, "{}", kind);
        }
    }
}

/// A tiny request driver for the crafted sequences.
struct Driver {
    kv: KvCacheManager<'static, Eviction>,
    reqs: Vec<Option<Req>>,
}

impl Driver {
    fn new(kind: EvictionKind, num_blocks: u32) -> Self {
        Driver {
            kv: KvCacheManager::with_policy(config(num_blocks, true), kind.build(num_blocks)),
            reqs: vec![None; 16],
        }
    }

    fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
        let mut h = Vec::new();
        extend_block_hashes(&mut h, tokens, BS as usize, &ExtraKeys::NONE);
        h
    }

    /// Admits request `i` with its whole prompt computed; returns the hit tokens.
    fn admit(&mut self, i: usize, tokens: &[u32]) -> u64 {
        let r = Req {
            tokens: tokens.to_vec(),
            hashes: Self::hashes(tokens),
            computed: 0,
        };
        let mut hits = Vec::new();
        let n = tokens.len() as u64;
        let hit = self.kv.get_computed_blocks(&r.hashes, n, &mut hits);
        let running = self.reqs.iter().any(Option::is_some);
        assert!(
            self.kv
                .allocate_slots(slot(&r, i, true), n - hit, hit, &hits, true, running),
            "request {i} does not fit"
        );
        self.reqs[i] = Some(Req { computed: n, ..r });
        self.kv.check_invariants().unwrap();
        hit
    }

    /// Request `i` samples `more` tokens and computes them.
    fn extend(&mut self, i: usize, more: &[u32]) {
        let r = self.reqs[i].as_mut().unwrap();
        r.tokens.extend_from_slice(more);
        r.hashes = Self::hashes(&r.tokens);
        let r = self.reqs[i].as_ref().unwrap();
        let n = r.tokens.len() as u64 - r.computed;
        assert!(self
            .kv
            .allocate_slots(slot(r, i, false), n, 0, &[], false, true));
        self.reqs[i].as_mut().unwrap().computed += n;
        self.kv.check_invariants().unwrap();
    }

    fn free(&mut self, i: usize) {
        self.kv.free(i);
        self.reqs[i] = None;
        self.kv.check_invariants().unwrap();
    }
}

/// A hot prompt hit twice, then a scan of one-off prompts: LRU evicts the hot prefix (it was
/// released first), ARC keeps it in T2 and evicts the scan from T1.
fn scan_after_hot(kind: EvictionKind) -> (u64, u64) {
    let mut d = Driver::new(kind, 9);
    let hot: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
    assert_eq!(d.admit(0, &hot), 0);
    d.free(0);
    let second = d.admit(0, &hot);
    d.free(0);
    for s in 0..4u32 {
        let scan: Vec<u32> = (0..9).map(|t| 100 + s * 10 + t).collect();
        d.admit(1, &scan);
        d.free(1);
    }
    (second, d.admit(0, &hot))
}

#[test]
fn arc_keeps_a_hot_prefix_through_a_scan() {
    let (lru_second, lru_after) = scan_after_hot(EvictionKind::Lru);
    let (arc_second, arc_after) = scan_after_hot(EvictionKind::Arc);
    assert_eq!((lru_second, arc_second), (8, 8));
    assert_eq!(arc_after, 8, "ARC keeps the twice-used prefix");
    assert_eq!(lru_after, 0, "LRU flushed it");
}

/// A block-aligned prompt recomputes its last block into a duplicate of a cached block; the
/// duplicate's child is then hit (through the first holder) and held by another request. On
/// release the duplicate is the oldest free cached block: LRU evicts it (losing nothing, the
/// first holder still has the hash) while leaf-first LRU keeps it as an inner block of the
/// tree and evicts its leaf child, so a later request hits one block less.
fn duplicate_parent(kind: EvictionKind) -> (u64, u64) {
    let mut d = Driver::new(kind, 8);
    let p = [1u32, 2, 3, 4];
    let q = [5u32, 6, 7, 8];
    // A caches p and stays.
    assert_eq!(d.admit(0, &[&p[..], &[9]].concat()), 0);
    // C's prompt is exactly p: the last token is never a hit, so p is recomputed (duplicate).
    assert_eq!(d.admit(1, &p), 0);
    // C generates q and one more token: block c = h(p, q) is cached with parent p'.
    d.extend(1, &[5, 6, 7, 8, 10]);
    // D hits p (first holder) and c, holds them.
    let d_hits = d.admit(2, &[&p[..], &q[..], &[11]].concat());
    assert_eq!(d_hits, 8);
    d.free(1); // releases p' (c is still held by D)
    d.free(0); // p still held by D
    d.free(2); // releases c, then p
    assert_eq!(d.kv.num_free_blocks(), 7);
    // E needs all 4 blocks without content and one cached block.
    let e: Vec<u32> = (100..118).collect();
    assert_eq!(d.admit(3, &e), 0);
    d.free(3);
    (d_hits, d.admit(4, &[&p[..], &q[..], &[12]].concat()))
}

#[test]
fn leaf_lru_keeps_inner_blocks_lru_would_evict() {
    let (_, lru) = duplicate_parent(EvictionKind::Lru);
    let (_, leaf) = duplicate_parent(EvictionKind::LeafLru);
    assert_eq!(lru, 8, "LRU evicted the duplicate");
    assert_eq!(leaf, 4, "leaf-first evicted the leaf under the duplicate");
}

#[test]
fn parse_names() {
    for kind in EvictionKind::ALL {
        assert_eq!(parse_eviction(kind.name()), Ok(kind));
        assert_eq!(kind.name().parse::<EvictionKind>(), Ok(kind));
        assert_eq!(kind.build(4).kind(), kind);
        assert_eq!(kind.build(4).name(), kind.name());
    }
    assert_eq!(parse_eviction("LEAF_LRU"), Ok(EvictionKind::LeafLru));
    let e = parse_eviction("lfu").unwrap_err();
    assert!(e.contains("lru, arc, leaf-lru"), "{e}");
    assert_eq!(EvictionKind::default(), EvictionKind::Lru);
    assert_eq!(
        serde_json::to_string(&EvictionKind::LeafLru).unwrap(),
        "\"leaf-lru\""
    );
}
