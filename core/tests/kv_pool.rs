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
