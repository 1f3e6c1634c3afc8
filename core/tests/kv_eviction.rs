//! Eviction policies behind `EvictionPolicy` (`lru`, `arc`, `leaf-lru`): under random
//! operation sequences (the op model of `kv_pool.rs`) every policy keeps the pool's invariants
//! and its own, never hands out a block that is referenced, and serves only correct hits;
//! `lru` through the run-time [`Eviction`] enum is vLLM's free queue exactly; with prefix
//! caching off every policy is LRU; and on crafted sequences each other policy serves
//! different hits than LRU.

use gpumem_core::kv::eviction::{parse_eviction, Eviction, EvictionKind};
use gpumem_core::kv::hash::{extend_block_hashes, ExtraKeys};
use gpumem_core::kv::{
    BlockHash, BlockId, EvictionPolicy, KvCacheManager, KvConfig, SlotRequest, VllmLru,
};
use proptest::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

const BS: u64 = 4;

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

#[derive(Clone, Debug)]
enum Op {
    Admit {
        slot: usize,
        prefix: usize,
        tail: Vec<u32>,
        budget: u64,
        gate: bool,
    },
    Grow {
        pick: usize,
        n: u64,
    },
    Sample {
        pick: usize,
    },
    Free {
        pick: usize,
    },
    ResetPrefixCache,
    EvictBlocks(Vec<u32>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..6, 0usize..4, proptest::collection::vec(0u32..3, 0..14), 1u64..24, any::<bool>())
            .prop_map(|(slot, prefix, tail, budget, gate)| Op::Admit { slot, prefix, tail, budget, gate }),
        4 => (any::<usize>(), 1u64..10).prop_map(|(pick, n)| Op::Grow { pick, n }),
        3 => any::<usize>().prop_map(|pick| Op::Sample { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::ResetPrefixCache),
        1 => proptest::collection::vec(1u32..20, 0..4).prop_map(Op::EvictBlocks),
    ]
}

#[derive(Clone, Debug)]
struct Req {
    tokens: Vec<u32>,
    hashes: Vec<BlockHash>,
    computed: u64,
}

fn slot(r: &Req, idx: usize, waiting: bool) -> SlotRequest<'_> {
    SlotRequest {
        req: idx,
        num_tokens: r.tokens.len() as u64,
        num_computed_tokens: r.computed,
        block_hashes: &r.hashes,
        waiting,
    }
}

fn config(num_blocks: u32, caching: bool) -> KvConfig {
    KvConfig {
        num_blocks,
        block_size: BS as u32,
        max_model_len: (num_blocks as u64 - 1) * BS,
        enable_prefix_caching: caching,
        watermark_blocks: 0,
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

/// Runs `ops` on a manager over `policy`, checking after every op the full invariant walk,
/// that every block handed out was unreferenced before the op and not one of its hits, and
/// that every hit holds the request's hash.
fn run<P: EvictionPolicy + Clone>(
    policy: P,
    ops: &[Op],
    num_blocks: u32,
    caching: bool,
) -> Result<Trace, TestCaseError> {
    let cfg = config(num_blocks, caching);
    let popped = Rc::new(RefCell::new(Vec::new()));
    let mut kv = KvCacheManager::with_policy(
        cfg,
        Audited {
            inner: policy,
            popped: popped.clone(),
        },
    );
    let prefixes: [Vec<u32>; 4] = [
        vec![1, 2, 1, 2, 1, 2, 1, 2, 7],
        vec![1, 2, 1, 2, 5],
        vec![3],
        vec![1, 2, 1, 2],
    ];
    let mut reqs: Vec<Option<Req>> = vec![None; 6];
    let mut hits = Vec::new();
    let mut trace = Trace::default();
    for op in ops {
        let refs: Vec<u32> = (0..num_blocks).map(|b| kv.pool().ref_cnt(b)).collect();
        hits.clear();
        match op {
            Op::Admit {
                slot: s,
                prefix,
                tail,
                budget,
                gate,
            } => {
                let s = *s;
                if reqs[s].is_some() {
                    continue;
                }
                let mut tokens = prefixes[*prefix].clone();
                tokens.extend(tail);
                if tokens.len() as u64 >= cfg.max_model_len {
                    continue;
                }
                let mut hashes = Vec::new();
                if caching {
                    extend_block_hashes(&mut hashes, &tokens, BS as usize, &ExtraKeys::NONE);
                }
                let r = Req {
                    tokens,
                    hashes,
                    computed: 0,
                };
                let n_tok = r.tokens.len() as u64;
                let hit = kv.get_computed_blocks(&r.hashes, n_tok, &mut hits);
                for (i, &b) in hits.iter().enumerate() {
                    prop_assert_eq!(kv.pool().block_hash(b), Some(r.hashes[i]));
                }
                let n = (n_tok - hit).min(*budget);
                let any_running = reqs.iter().any(Option::is_some);
                if kv.allocate_slots(slot(&r, s, true), n, hit, &hits, *gate, any_running) {
                    trace.hits.push(hit);
                    let mut r = r;
                    r.computed = hit + n;
                    reqs[s] = Some(r);
                }
            }
            Op::Grow { pick, n } => {
                let live: Vec<usize> = (0..6).filter(|&i| reqs[i].is_some()).collect();
                if live.is_empty() {
                    continue;
                }
                let i = live[pick % live.len()];
                let r = reqs[i].as_ref().unwrap();
                let todo = (r.tokens.len() as u64).saturating_sub(r.computed).min(*n);
                if todo == 0 {
                    continue;
                }
                if kv.allocate_slots(slot(r, i, false), todo, 0, &[], false, true) {
                    reqs[i].as_mut().unwrap().computed += todo;
                }
            }
            Op::Sample { pick } => {
                let live: Vec<usize> = (0..6).filter(|&i| reqs[i].is_some()).collect();
                if live.is_empty() {
                    continue;
                }
                let i = live[pick % live.len()];
                let r = reqs[i].as_mut().unwrap();
                if r.computed < r.tokens.len() as u64
                    || r.tokens.len() as u64 + 1 >= cfg.max_model_len
                {
                    continue;
                }
                r.tokens.push(9 + (pick % 2) as u32);
                if caching {
                    extend_block_hashes(&mut r.hashes, &r.tokens, BS as usize, &ExtraKeys::NONE);
                }
            }
            Op::Free { pick } => {
                let live: Vec<usize> = (0..6).filter(|&i| reqs[i].is_some()).collect();
                if live.is_empty() {
                    continue;
                }
                let i = live[pick % live.len()];
                kv.free(i);
                reqs[i] = None;
            }
            Op::ResetPrefixCache => {
                let all_free = kv.num_free_blocks() == num_blocks - 1;
                prop_assert_eq!(kv.reset_prefix_cache(), all_free);
            }
            Op::EvictBlocks(ids) => {
                let ids: Vec<u32> = ids.iter().copied().filter(|&b| b < num_blocks).collect();
                kv.pool_mut().evict_blocks(&ids);
            }
        }
        kv.check_invariants().map_err(TestCaseError::fail)?;
        let popped = std::mem::take(&mut *popped.borrow_mut());
        for b in popped {
            prop_assert_eq!(
                refs[b as usize],
                0,
                "handed out block {} with references",
                b
            );
            prop_assert!(
                !hits.contains(&b),
                "handed out block {} that was just hit",
                b
            );
            prop_assert_eq!(kv.pool().ref_cnt(b), 1);
        }
        trace
            .tables
            .push((0..6).map(|i| kv.blocks(i).to_vec()).collect());
        trace.free_order.push(kv.pool().policy().order());
    }
    for i in 0..6 {
        kv.free(i);
    }
    kv.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(kv.num_free_blocks(), num_blocks - 1);
    Ok(trace)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Every policy keeps the invariants and never evicts a referenced block.
    #[test]
    fn every_policy_keeps_the_invariants(
        ops in proptest::collection::vec(op(), 1..140),
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
        ops in proptest::collection::vec(op(), 1..140),
        blocks in 6u32..20,
    ) {
        let a = run(VllmLru::new(blocks), &ops, blocks, true)?;
        let b = run(EvictionKind::Lru.build(blocks), &ops, blocks, true)?;
        prop_assert_eq!(a, b);
    }

    /// Without prefix caching no block holds content: every policy is LRU.
    #[test]
    fn without_caching_every_policy_is_lru(
        ops in proptest::collection::vec(op(), 1..100),
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
    kv: KvCacheManager<Eviction>,
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
