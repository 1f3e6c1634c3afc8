//! Property tests of the KV block pool and manager under random operation sequences: after
//! every operation the full invariant walk holds (free + used + null = total; no block both
//! free and referenced; every cached hash names a block holding it; reference counts equal the
//! request tables' counts), and prefix hits are what vLLM would serve.

use gpumem_core::kv::hash::{extend_block_hashes, ExtraKeys};
use gpumem_core::kv::{BlockHash, EvictionPolicy, KvCacheManager, KvConfig, SlotRequest};
use proptest::prelude::*;

const BS: u64 = 4;

#[derive(Clone, Debug)]
enum Op {
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

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..6, 0usize..3, proptest::collection::vec(0u32..3, 0..14), 1u64..24, any::<bool>())
            .prop_map(|(slot, prefix, tail, budget, gate)| Op::Admit { slot, prefix, tail, budget, gate }),
        4 => (any::<usize>(), 1u64..10).prop_map(|(pick, n)| Op::Grow { pick, n }),
        3 => any::<usize>().prop_map(|pick| Op::Sample { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
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

fn run(ops: Vec<Op>, num_blocks: u32, caching: bool) -> Result<(), TestCaseError> {
    let cfg = KvConfig {
        num_blocks,
        block_size: BS as u32,
        max_model_len: (num_blocks as u64 - 1) * BS,
        enable_prefix_caching: caching,
        watermark_blocks: 0,
    };
    let mut kv = KvCacheManager::new(cfg);
    let prefixes: [Vec<u32>; 3] = [
        vec![1, 2, 1, 2, 1, 2, 1, 2, 7],
        vec![1, 2, 1, 2, 5],
        vec![3],
    ];
    let mut reqs: Vec<Option<Req>> = vec![None; 6];
    let mut hits = Vec::new();
    for op in ops {
        match op {
            Op::Admit {
                slot: s,
                prefix,
                tail,
                budget,
                gate,
            } => {
                if reqs[s].is_some() {
                    continue;
                }
                let mut tokens = prefixes[prefix].clone();
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
                prop_assert!(hit < n_tok && hit % BS == 0);
                prop_assert_eq!(hit, hits.len() as u64 * BS);
                for (i, &b) in hits.iter().enumerate() {
                    prop_assert_eq!(kv.pool().block_hash(b), Some(r.hashes[i]));
                }
                let free_before = kv.num_free_blocks();
                let n = (n_tok - hit).min(budget);
                let any_running = reqs.iter().any(Option::is_some);
                if kv.allocate_slots(slot(&r, s, true), n, hit, &hits, gate, any_running) {
                    let mut r = r;
                    r.computed = hit + n;
                    reqs[s] = Some(r);
                } else {
                    // A refused allocation changes nothing.
                    prop_assert_eq!(kv.num_free_blocks(), free_before);
                    prop_assert!(kv.blocks(s).is_empty());
                }
            }
            Op::Grow { pick, n } => {
                let live: Vec<usize> = (0..6).filter(|&i| reqs[i].is_some()).collect();
                if live.is_empty() {
                    continue;
                }
                let i = live[pick % live.len()];
                let r = reqs[i].as_ref().unwrap();
                let todo = (r.tokens.len() as u64).saturating_sub(r.computed).min(n);
                if todo == 0 {
                    continue;
                }
                let before = kv.blocks(i).to_vec();
                if kv.allocate_slots(slot(r, i, false), todo, 0, &[], false, true) {
                    // Block tables are append-only.
                    prop_assert!(kv.blocks(i).starts_with(&before));
                    reqs[i].as_mut().unwrap().computed += todo;
                } else {
                    prop_assert_eq!(kv.blocks(i), &before[..]);
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
                let ids: Vec<u32> = ids.into_iter().filter(|&b| b < num_blocks).collect();
                kv.pool_mut().evict_blocks(&ids);
                for &b in &ids {
                    prop_assert_eq!(kv.pool().block_hash(b), None);
                }
            }
        }
        kv.check_invariants().map_err(TestCaseError::fail)?;
    }
    for i in 0..6 {
        kv.free(i);
    }
    kv.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(kv.num_free_blocks(), num_blocks - 1);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn pool_invariants_with_prefix_caching(ops in proptest::collection::vec(op(), 1..120), blocks in 6u32..20) {
        run(ops, blocks, true)?;
    }

    #[test]
    fn pool_invariants_without_prefix_caching(ops in proptest::collection::vec(op(), 1..80), blocks in 6u32..20) {
        run(ops, blocks, false)?;
    }
}

/// The free queue's order after a sequence of frees is vLLM's: uncached blocks at the head in
/// the order freed (tail of a request first), cached blocks at the tail.
#[test]
fn free_queue_order_is_vllms() {
    let cfg = KvConfig {
        num_blocks: 12,
        block_size: 4,
        max_model_len: 44,
        enable_prefix_caching: true,
        watermark_blocks: 0,
    };
    let mut kv = KvCacheManager::new(cfg);
    let tokens: Vec<u32> = (0..14).collect();
    let mut hashes = Vec::new();
    extend_block_hashes(&mut hashes, &tokens, 4, &ExtraKeys::NONE);
    let r = SlotRequest {
        req: 0,
        num_tokens: 14,
        num_computed_tokens: 0,
        block_hashes: &hashes,
        waiting: true,
    };
    assert!(kv.allocate_slots(r, 14, 0, &[], true, false));
    assert_eq!(kv.blocks(0), &[1, 2, 3, 4]);
    kv.free(0);
    assert_eq!(
        kv.pool().policy().order(),
        vec![4, 5, 6, 7, 8, 9, 10, 11, 3, 2, 1]
    );
}
