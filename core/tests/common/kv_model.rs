//! The random-operation model of the KV cache manager, shared by `kv_pool.rs` and
//! `kv_eviction.rs`: requests admitted into a few slots over shared prefixes, growing,
//! sampling and freed in random order, with prefix-cache resets and evictions in between.
//! [`run`] applies the ops to a manager over any eviction policy and checks after every op the
//! full invariant walk and what the manager promises whatever the policy; the caller checks
//! the rest through its `check` hook. The manager is placed on a [`ContentMemory`], so every
//! run also checks that the blocks it writes hold what its prefix cache promises.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use gpumem_core::books::Books;
use gpumem_core::decision::{Decision, Refusal, SegmentId};
use gpumem_core::digest::Digest;
use gpumem_core::executor::{Executor, Ledger};
use gpumem_core::kv::hash::{extend_block_hashes, ExtraKeys};
use gpumem_core::kv::{
    BlockHash, BlockId, EvictionPolicy, KvCacheManager, KvConfig, KvPlacement, SlotRequest,
};
use gpumem_core::place::{Owner, Place};
use proptest::prelude::*;

/// Bytes per block of the placement every run uses.
pub const BLOCK_BYTES: u64 = 64;

/// The segment the model's pool is placed in.
pub const SEGMENT: SegmentId = SegmentId::new(Place::GPU0, Owner::KvPool, 0);

/// The content each written block holds, by offset (shared with the test, which reads it
/// while the manager holds the executor).
pub type Contents = Rc<RefCell<BTreeMap<u64, u64>>>;

/// An executor that remembers what each KV block was last written with and refuses a read
/// that expects anything else.
pub struct ContentMemory {
    ledger: Ledger,
    pub contents: Contents,
}

impl ContentMemory {
    pub fn new(num_blocks: u32) -> Self {
        ContentMemory {
            ledger: Ledger::new(Books::new(num_blocks as u64 * BLOCK_BYTES)),
            contents: Contents::default(),
        }
    }

    pub fn placement() -> KvPlacement {
        KvPlacement {
            segment: SEGMENT,
            block_bytes: BLOCK_BYTES,
        }
    }
}

impl Executor for ContentMemory {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let outcome = match d {
            Decision::WriteKv { at, content, .. } => {
                self.contents.borrow_mut().insert(at.offset, content);
                Ok(())
            }
            Decision::ReadKv { at, content, .. } => match self.contents.borrow().get(&at.offset) {
                Some(&c) if c == content => Ok(()),
                _ => Err(Refusal::Mismatch),
            },
            _ => Ok(()),
        };
        self.ledger.record(d, outcome);
        outcome
    }

    fn books(&self) -> &Books {
        &self.ledger.books
    }

    fn digest(&self) -> &Digest {
        &self.ledger.digest
    }
}

pub const BS: u64 = 4;
/// Request slots.
pub const SLOTS: usize = 6;

/// The shared prompt prefixes `Op::Admit` draws from (the first `prefixes` of them, see
/// [`op`]), over a tiny alphabet so that prefixes repeat.
const PREFIXES: [&[u32]; 4] = [
    &[1, 2, 1, 2, 1, 2, 1, 2, 7],
    &[1, 2, 1, 2, 5],
    &[3],
    &[1, 2, 1, 2],
];

#[derive(Clone, Debug)]
pub enum Op {
    /// Admit a new request into slot `slot` (if free): one of a few shared prefixes, then a
    /// random tail, over a tiny alphabet so that prefixes repeat.
    Admit {
        slot: usize,
        prefix: usize,
        tail: Vec<u32>,
        budget: u64,
        gate: bool,
    },
    /// A running request computes up to `n` more tokens (prefill chunk or decode).
    Grow {
        pick: usize,
        n: u64,
    },
    /// A running request samples a token (its sequence grows by one).
    Sample {
        pick: usize,
    },
    /// Free a running request (finished or preempted).
    Free {
        pick: usize,
    },
    ResetPrefixCache,
    EvictBlocks(Vec<u32>),
}

/// One random op: admissions draw from the first `prefixes` of the shared prefixes, and
/// `free_weight` is the weight of `Op::Free` (against 4 admit, 4 grow, 3 sample, 1 reset,
/// 1 evict).
pub fn op(prefixes: usize, free_weight: u32) -> impl Strategy<Value = Op> {
    assert!((1..=PREFIXES.len()).contains(&prefixes));
    prop_oneof![
        4 => (0usize..SLOTS, 0usize..prefixes, proptest::collection::vec(0u32..3, 0..14), 1u64..24, any::<bool>())
            .prop_map(|(slot, prefix, tail, budget, gate)| Op::Admit { slot, prefix, tail, budget, gate }),
        4 => (any::<usize>(), 1u64..10).prop_map(|(pick, n)| Op::Grow { pick, n }),
        3 => any::<usize>().prop_map(|pick| Op::Sample { pick }),
        free_weight => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::ResetPrefixCache),
        1 => proptest::collection::vec(1u32..20, 0..4).prop_map(Op::EvictBlocks),
    ]
}

#[derive(Clone, Debug)]
pub struct Req {
    pub tokens: Vec<u32>,
    pub hashes: Vec<BlockHash>,
    pub computed: u64,
}

pub fn slot(r: &Req, idx: usize, waiting: bool) -> SlotRequest<'_> {
    SlotRequest {
        req: idx,
        num_tokens: r.tokens.len() as u64,
        num_computed_tokens: r.computed,
        block_hashes: &r.hashes,
        waiting,
    }
}

pub fn config(num_blocks: u32, caching: bool) -> KvConfig {
    KvConfig {
        num_blocks,
        block_size: BS as u32,
        max_model_len: (num_blocks as u64 - 1) * BS,
        enable_prefix_caching: caching,
        watermark_blocks: 0,
    }
}

/// What one applied op leaves for the caller's `check`.
#[allow(dead_code)] // read by kv_eviction.rs only
pub struct Step<'a> {
    /// Every block's reference count before the op.
    pub refs_before: &'a [u32],
    /// The prefix hits the op looked up (empty unless it was an admission).
    pub hits: &'a [BlockId],
    /// The hit tokens of an admission that was allocated.
    pub admitted: Option<u64>,
}

/// Runs `ops` on a manager over `policy`, checking after every op that changed anything the
/// full invariant walk, then `check`. Along the way: hits are whole blocks, never the last
/// token, and each holds the request's hash; a refused allocation changes nothing; block
/// tables are append-only; a freed request holds no blocks; a reset succeeds exactly when
/// every block is free and then leaves no cached hash; evicted blocks lose their hash. At the
/// end every request is freed and every block is free again. The last admission the
/// full-sequence gate refused is remembered (`note_refused_admission`) and, after every later
/// op, while the manager says it is still refused without a lookup, a fresh lookup and the gate
/// refuse it too.
pub fn run<P: EvictionPolicy>(
    policy: P,
    ops: &[Op],
    num_blocks: u32,
    caching: bool,
    mut check: impl FnMut(&KvCacheManager<P>, Step<'_>) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let cfg = config(num_blocks, caching);
    let mut memory = ContentMemory::new(num_blocks);
    let contents = memory.contents.clone();
    let mut kv = KvCacheManager::with_policy(cfg, policy);
    kv.place(ContentMemory::placement(), &mut memory)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut reqs: Vec<Option<Req>> = vec![None; SLOTS];
    let mut hits = Vec::new();
    // The last refused admission: (its name, slot, request); and a fresh lookup's hits.
    let mut refused: Option<(u64, usize, Req)> = None;
    let mut names = 0u64;
    let mut fresh = Vec::new();
    let live = |reqs: &[Option<Req>], pick: usize| {
        let live: Vec<usize> = (0..SLOTS).filter(|&i| reqs[i].is_some()).collect();
        (!live.is_empty()).then(|| live[pick % live.len()])
    };
    for op in ops {
        let refs_before: Vec<u32> = (0..num_blocks).map(|b| kv.pool().ref_cnt(b)).collect();
        let mut admitted = None;
        hits.clear();
        match op {
            &Op::Admit {
                slot: s,
                prefix,
                ref tail,
                budget,
                gate,
            } => {
                if reqs[s].is_some() {
                    continue;
                }
                let mut tokens = PREFIXES[prefix].to_vec();
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
                // Never the last token; whole blocks; each hit holds the request's hash.
                prop_assert!(hit < n_tok && hit.is_multiple_of(BS));
                prop_assert_eq!(hit, hits.len() as u64 * BS);
                for (i, &b) in hits.iter().enumerate() {
                    prop_assert_eq!(kv.pool().block_hash(b), Some(r.hashes[i]));
                }
                let free_before = kv.num_free_blocks();
                let n = (n_tok - hit).min(budget);
                let any_running = reqs.iter().any(Option::is_some);
                let can =
                    kv.can_allocate_slots(slot(&r, s, true), n, hit, &hits, gate, any_running);
                if can {
                    // Nothing is corrupt: every hit reads back.
                    prop_assert_eq!(kv.read_back_hits(&r.hashes, &mut hits), hit);
                }
                let allocated =
                    kv.allocate_slots(slot(&r, s, true), n, hit, &hits, gate, any_running);
                prop_assert_eq!(
                    allocated,
                    can,
                    "can_allocate_slots foretells allocate_slots"
                );
                if !allocated && gate {
                    names += 1;
                    kv.note_refused_admission(names, slot(&r, s, true), &hits);
                    refused = Some((names, s, r.clone()));
                }
                if allocated {
                    if refused.as_ref().is_some_and(|&(_, rs, _)| rs == s) {
                        refused = None;
                    }
                    admitted = Some(hit);
                    reqs[s] = Some(Req {
                        computed: hit + n,
                        ..r
                    });
                } else {
                    // A refused allocation changes nothing.
                    prop_assert_eq!(kv.num_free_blocks(), free_before);
                    prop_assert!(kv.blocks(s).is_empty());
                }
            }
            &Op::Grow { pick, n } => {
                let Some(i) = live(&reqs, pick) else {
                    continue;
                };
                let r = reqs[i].as_ref().unwrap();
                let todo = (r.tokens.len() as u64).saturating_sub(r.computed).min(n);
                if todo == 0 {
                    continue;
                }
                let before = kv.blocks(i).to_vec();
                let can = kv.can_allocate_slots(slot(r, i, false), todo, 0, &[], false, true);
                let allocated = kv.allocate_slots(slot(r, i, false), todo, 0, &[], false, true);
                prop_assert_eq!(
                    allocated,
                    can,
                    "can_allocate_slots foretells allocate_slots"
                );
                if allocated {
                    // Block tables are append-only.
                    prop_assert!(kv.blocks(i).starts_with(&before));
                    reqs[i].as_mut().unwrap().computed += todo;
                } else {
                    prop_assert_eq!(kv.blocks(i), &before[..]);
                }
            }
            &Op::Sample { pick } => {
                let Some(i) = live(&reqs, pick) else {
                    continue;
                };
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
            &Op::Free { pick } => {
                let Some(i) = live(&reqs, pick) else {
                    continue;
                };
                kv.free(i);
                reqs[i] = None;
                prop_assert!(kv.blocks(i).is_empty());
            }
            Op::ResetPrefixCache => {
                let all_free = kv.num_free_blocks() == num_blocks - 1;
                prop_assert_eq!(kv.reset_prefix_cache(), all_free);
                if all_free {
                    prop_assert_eq!(kv.pool().summary().cached_hashes, 0);
                }
            }
            Op::EvictBlocks(ids) => {
                let ids: Vec<u32> = ids.iter().copied().filter(|&b| b < num_blocks).collect();
                kv.pool_mut().evict_blocks(&ids);
                for &b in &ids {
                    prop_assert_eq!(kv.pool().block_hash(b), None);
                }
            }
        }
        kv.check_invariants().map_err(TestCaseError::fail)?;
        if let Some((name, s, r)) = &refused {
            let any_running = reqs.iter().any(Option::is_some);
            if kv.admission_still_refused(*name, slot(r, *s, true), any_running) {
                let n_tok = r.tokens.len() as u64;
                let hit = kv.get_computed_blocks(&r.hashes, n_tok, &mut fresh);
                for budget in [1, n_tok - hit] {
                    let n = (n_tok - hit).min(budget);
                    prop_assert!(
                        !kv.can_allocate_slots(
                            slot(r, *s, true),
                            n,
                            hit,
                            &fresh,
                            true,
                            any_running
                        ),
                        "a refusal remembered for a request the gate now admits"
                    );
                }
            }
        }
        // Every cached block holds its hash in memory: a hit on it would read back.
        for b in 1..num_blocks {
            if let Some(h) = kv.pool().block_hash(b) {
                let held = contents.borrow().get(&(b as u64 * BLOCK_BYTES)).copied();
                prop_assert_eq!(
                    held,
                    Some(h.0),
                    "block {} holds other bytes than its hash",
                    b
                );
            }
        }
        check(
            &kv,
            Step {
                refs_before: &refs_before,
                hits: &hits,
                admitted,
            },
        )?;
    }
    for i in 0..SLOTS {
        kv.free(i);
    }
    kv.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(kv.num_free_blocks(), num_blocks - 1);
    Ok(())
}
