//! Property tests of the KV block pool and manager under random operation sequences: after
//! every operation the full invariant walk holds (free + used + null = total; no block both
//! free and referenced; every cached hash names a block holding it; reference counts equal the
//! request tables' counts), and prefix hits are what vLLM would serve.

mod common;

use common::kv_model::{config, op, run};
use gpumem_core::kv::hash::{extend_block_hashes, ExtraKeys};
use gpumem_core::kv::{EvictionPolicy, KvCacheManager, SlotRequest, VllmLru};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // The op model of `common::kv_model` (three shared prefixes) over vLLM's LRU free queue.

    #[test]
    fn pool_invariants_with_prefix_caching(ops in proptest::collection::vec(op(3, 2), 1..120), blocks in 6u32..20) {
        run(VllmLru::new(blocks), &ops, blocks, true, |_, _| Ok(()))?;
    }

    #[test]
    fn pool_invariants_without_prefix_caching(ops in proptest::collection::vec(op(3, 2), 1..80), blocks in 6u32..20) {
        run(VllmLru::new(blocks), &ops, blocks, false, |_, _| Ok(()))?;
    }
}

/// The free queue's order after a sequence of frees is vLLM's: uncached blocks at the head in
/// the order freed (tail of a request first), cached blocks at the tail.
#[test]
fn free_queue_order_is_vllms() {
    let mut kv = KvCacheManager::new(config(12, true));
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

/// Placed on an executor, the manager reserves its pool, writes every computed block, and a
/// prefix hit whose bytes are wrong is evicted and not served; the hits before it still are.
#[test]
fn a_hit_on_wrong_bytes_is_evicted_and_not_served() {
    use common::kv_model::{ContentMemory, BLOCK_BYTES};
    use gpumem_core::executor::Executor;
    let mut memory = ContentMemory::new(12);
    let contents = memory.contents.clone();
    let mut kv = KvCacheManager::new(config(12, true));
    kv.place(ContentMemory::placement(), &mut memory).unwrap();
    let tokens: Vec<u32> = (0..14).collect();
    let mut hashes = Vec::new();
    extend_block_hashes(&mut hashes, &tokens, 4, &ExtraKeys::NONE);
    let first = SlotRequest {
        req: 0,
        num_tokens: 14,
        num_computed_tokens: 0,
        block_hashes: &hashes,
        waiting: true,
    };
    assert!(kv.allocate_slots(first, 14, 0, &[], true, false));
    // Three full blocks hold their hashes, the fourth a value of the request.
    let table = kv.blocks(0).to_vec();
    for (i, &b) in table.iter().enumerate() {
        let held = contents.borrow()[&(b as u64 * BLOCK_BYTES)];
        assert_eq!(held == hashes.get(i).map_or(0, |h| h.0), i < 3, "block {i}");
    }
    kv.free(0);

    let mut hits = Vec::new();
    assert_eq!(kv.get_computed_blocks(&hashes, 14, &mut hits), 12);
    let bad = hits[1];
    *contents
        .borrow_mut()
        .get_mut(&(bad as u64 * BLOCK_BYTES))
        .unwrap() ^= 1;
    assert_eq!(kv.read_back_hits(&hashes, &mut hits), 4);
    assert_eq!(hits, [table[0]]);
    assert_eq!(kv.hits_refused(), 1);
    assert_eq!(kv.pool().block_hash(bad), None, "the bad block is evicted");
    assert_eq!(kv.get_computed_blocks(&hashes, 14, &mut hits), 4);
    kv.check_invariants().unwrap();
    drop(kv);
    assert_eq!(memory.books().reserved_bytes(), 12 * BLOCK_BYTES);
}

/// A refused admission is remembered: refused again without a lookup while the free blocks
/// stay too few and the lookup's answer cannot have changed; no longer once enough blocks are
/// free, and forgotten once a request is admitted.
#[test]
fn a_refused_admission_is_remembered_while_it_must_be_refused() {
    let mut kv = KvCacheManager::new(config(8, true));
    let hashes_of = |tokens: &[u32]| {
        let mut h = Vec::new();
        extend_block_hashes(&mut h, tokens, 4, &ExtraKeys::NONE);
        h
    };
    let req = |req, tokens: &[u32], hashes| SlotRequest {
        req,
        num_tokens: tokens.len() as u64,
        num_computed_tokens: 0,
        block_hashes: hashes,
        waiting: true,
    };
    // A holds four cached blocks, B one: two of seven free.
    let a: Vec<u32> = (0..16).collect();
    let ha = hashes_of(&a);
    assert!(kv.allocate_slots(req(0, &a, &ha), 16, 0, &[], true, false));
    let b: Vec<u32> = (100..104).collect();
    let hb = hashes_of(&b);
    assert!(kv.allocate_slots(req(2, &b, &hb), 4, 0, &[], true, true));
    // W starts with A's tokens: four hits in use, three more blocks needed.
    let w: Vec<u32> = (0..16).chain(200..212).collect();
    let hw = hashes_of(&w);
    let mut hits = Vec::new();
    let hit = kv.get_computed_blocks(&hw, 28, &mut hits);
    assert_eq!(hit, 16);
    assert!(!kv.can_allocate_slots(req(1, &w, &hw), 12, hit, &hits, true, true));
    assert!(
        !kv.admission_still_refused(7, req(1, &w, &hw), true),
        "not noted yet"
    );
    kv.note_refused_admission(7, req(1, &w, &hw), &hits);
    assert!(kv.admission_still_refused(7, req(1, &w, &hw), true));
    assert!(
        !kv.admission_still_refused(8, req(1, &w, &hw), true),
        "another request"
    );
    kv.check_invariants().unwrap();
    // B finishes: three free, W fits.
    kv.free(2);
    assert!(!kv.admission_still_refused(7, req(1, &w, &hw), true));
    assert!(kv.can_allocate_slots(req(1, &w, &hw), 12, hit, &hits, true, true));
    assert!(kv.allocate_slots(req(1, &w, &hw), 12, hit, &hits, true, true));
    assert!(
        !kv.admission_still_refused(7, req(1, &w, &hw), true),
        "forgotten once admitted"
    );
    kv.check_invariants().unwrap();
}
