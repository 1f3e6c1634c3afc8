//! vLLM 0.33.0's `KVCacheManager` for one full-attention KV group (the unitary coordinator and
//! `FullAttentionManager` folded together): per-request block tables, the prefix lookup
//! (`get_computed_blocks`), `allocate_slots` with the full-sequence admission gate, `free`,
//! usage and prefix-cache statistics.
//!
//! Requests are named by dense indices the caller assigns; the caller keeps each request's
//! token counts and block hashes and passes them in a [`SlotRequest`].

use serde::{Deserialize, Serialize};

use super::block::{cdiv, BlockId};
use super::eviction::{EvictionPolicy, VllmLru};
use super::hash::BlockHash;
use super::pool::BlockPool;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvConfig {
    /// vLLM's `num_gpu_blocks`, the null block included.
    pub num_blocks: u32,
    /// Tokens per block (also the hash block size).
    pub block_size: u32,
    pub max_model_len: u64,
    pub enable_prefix_caching: bool,
    /// vLLM's `int(watermark * num_blocks)`: blocks kept free when admitting a waiting or
    /// preempted request while others run (0 by default).
    pub watermark_blocks: u32,
}

/// What the manager needs to know about a request at one call.
#[derive(Clone, Copy, Debug)]
pub struct SlotRequest<'a> {
    /// Dense request index.
    pub req: usize,
    /// Prompt and output tokens so far (vLLM's `num_tokens`).
    pub num_tokens: u64,
    /// Tokens whose KV is computed or scheduled (vLLM's `num_computed_tokens`).
    pub num_computed_tokens: u64,
    /// Hashes of the request's full blocks (empty when prefix caching is off).
    pub block_hashes: &'a [BlockHash],
    /// The request is WAITING or PREEMPTED (the watermark applies to it).
    pub waiting: bool,
}

/// vLLM's `PrefixCacheStats` (tokens), with preempted requests kept apart as vLLM keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCacheStats {
    pub requests: u64,
    pub queries: u64,
    pub hits: u64,
    pub preempted_requests: u64,
    pub preempted_queries: u64,
    pub preempted_hits: u64,
}

impl PrefixCacheStats {
    /// vLLM's hit rate: hits / queries over requests never preempted.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.hits as f64 / self.queries as f64
        }
    }

    /// Hit rate counting the re-admissions of preempted requests too.
    pub fn hit_rate_with_preempted(&self) -> f64 {
        let q = self.queries + self.preempted_queries;
        if q == 0 {
            0.0
        } else {
            (self.hits + self.preempted_hits) as f64 / q as f64
        }
    }
}

/// Untracked request (vLLM: not in `num_cached_block`).
const UNTRACKED: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct KvCacheManager<P: EvictionPolicy = VllmLru> {
    config: KvConfig,
    pool: BlockPool<P>,
    /// Block table per request index.
    tables: Vec<Vec<BlockId>>,
    /// Full blocks of a running request already cached (vLLM's `num_cached_block`).
    num_cached: Vec<u32>,
    stats: PrefixCacheStats,
}

impl KvCacheManager<VllmLru> {
    pub fn new(config: KvConfig) -> Self {
        Self::with_policy(config, VllmLru::new(config.num_blocks))
    }
}

impl<P: EvictionPolicy> KvCacheManager<P> {
    pub fn with_policy(config: KvConfig, policy: P) -> Self {
        assert!(config.block_size > 0, "block size 0");
        KvCacheManager {
            pool: BlockPool::with_policy(config.num_blocks, config.enable_prefix_caching, policy),
            config,
            tables: Vec::new(),
            num_cached: Vec::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    pub fn config(&self) -> &KvConfig {
        &self.config
    }

    pub fn pool(&self) -> &BlockPool<P> {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut BlockPool<P> {
        &mut self.pool
    }

    /// vLLM's `usage`.
    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    pub fn num_free_blocks(&self) -> u32 {
        self.pool.num_free()
    }

    pub fn stats(&self) -> &PrefixCacheStats {
        &self.stats
    }

    /// The request's block table (empty when it holds none).
    pub fn blocks(&self, req: usize) -> &[BlockId] {
        self.tables.get(req).map_or(&[], |t| t.as_slice())
    }

    fn ensure(&mut self, req: usize) {
        if req >= self.tables.len() {
            self.tables.resize_with(req + 1, Vec::new);
            self.num_cached.resize(req + 1, UNTRACKED);
        }
    }

    /// vLLM's `get_computed_blocks`: the longest run of cached full blocks from the start of
    /// the request, never covering its last token (that one must be recomputed for logits, so
    /// a block-aligned request hits one block fewer). Appends the hit blocks to `out` (cleared
    /// first) and returns the hit tokens. No side effect: blocks are taken only by
    /// `allocate_slots`.
    pub fn get_computed_blocks(
        &self,
        block_hashes: &[BlockHash],
        num_tokens: u64,
        out: &mut Vec<BlockId>,
    ) -> u64 {
        out.clear();
        if !self.config.enable_prefix_caching || num_tokens == 0 {
            return 0;
        }
        let max_blocks = ((num_tokens - 1) / self.config.block_size as u64) as usize;
        for &h in block_hashes.iter().take(max_blocks) {
            match self.pool.get_cached(h) {
                Some(b) => out.push(b),
                None => break,
            }
        }
        out.len() as u64 * self.config.block_size as u64
    }

    /// vLLM's `get_num_blocks_to_allocate` for full attention.
    fn blocks_to_allocate(&self, req: usize, num_tokens: u64, hits: &[BlockId]) -> u64 {
        let required = cdiv(num_tokens, self.config.block_size as u64);
        let held = self.tables[req].len() as u64;
        if self.num_cached[req] != UNTRACKED {
            debug_assert!(hits.is_empty());
            return required.saturating_sub(held);
        }
        let new = required.saturating_sub(hits.len() as u64 + held);
        // Hits sitting among the free blocks leave them when touched.
        let evictable = hits.iter().filter(|&&b| self.pool.ref_cnt(b) == 0).count() as u64;
        new + evictable
    }

    /// vLLM's `allocate_slots` (no lookahead, external or encoder tokens): gives the request
    /// slots for `num_new_tokens` more tokens after its computed ones and its new prefix hits
    /// (`hits`, `num_hit_tokens`), then caches its newly full blocks. With
    /// `full_sequence_must_fit` (vLLM's `scheduler_reserve_full_isl`) it first refuses unless
    /// the whole request fits. Returns false, changing nothing, when the blocks are not there.
    pub fn allocate_slots(
        &mut self,
        r: SlotRequest<'_>,
        num_new_tokens: u64,
        num_hit_tokens: u64,
        hits: &[BlockId],
        full_sequence_must_fit: bool,
        has_scheduled_reqs: bool,
    ) -> bool {
        assert!(
            num_new_tokens > 0 || num_hit_tokens > 0,
            "allocate_slots with nothing to allocate"
        );
        self.ensure(r.req);
        let max_len = self.config.max_model_len;
        let num_local_computed = r.num_computed_tokens + num_hit_tokens;
        let total_computed = num_local_computed.min(max_len);
        let watermark = if has_scheduled_reqs && r.waiting {
            self.config.watermark_blocks as u64
        } else {
            0
        };
        let free = self.pool.num_free() as u64;
        if full_sequence_must_fit {
            let full = r.num_tokens.min(max_len);
            if self.blocks_to_allocate(r.req, full, hits) + watermark > free {
                return false;
            }
        }
        let need = (total_computed + num_new_tokens).min(max_len);
        if self.blocks_to_allocate(r.req, need, hits) + watermark > free {
            return false;
        }
        if self.num_cached[r.req] == UNTRACKED && self.config.enable_prefix_caching {
            // First allocation: take the hit blocks (they can no longer be evicted by the
            // allocation below) and mark them as already cached.
            debug_assert!(self.tables[r.req].is_empty());
            self.pool.touch(hits);
            self.tables[r.req].extend_from_slice(hits);
            self.num_cached[r.req] = hits.len() as u32;
        }
        let required = cdiv(need, self.config.block_size as u64) as usize;
        let table = &mut self.tables[r.req];
        if required > table.len() {
            let n = required - table.len();
            self.pool.get_new_blocks(n, table);
        }
        if self.config.enable_prefix_caching {
            self.cache_blocks(r, (total_computed + num_new_tokens).min(r.num_tokens));
        }
        true
    }

    /// vLLM's `cache_blocks`: caches the request's full blocks up to `num_tokens`.
    fn cache_blocks(&mut self, r: SlotRequest<'_>, num_tokens: u64) {
        let bs = self.config.block_size as u64;
        let cached = match self.num_cached[r.req] {
            UNTRACKED => 0,
            n => n as usize,
        };
        let hashed_tokens = r.block_hashes.len() as u64 * bs;
        let full = (num_tokens.min(hashed_tokens) / bs) as usize;
        if cached >= full {
            return;
        }
        self.pool
            .cache_full_blocks(&self.tables[r.req], r.block_hashes, cached, full);
        self.num_cached[r.req] = full as u32;
    }

    /// vLLM's `free`: returns the request's blocks to the pool, tail first, and forgets it.
    pub fn free(&mut self, req: usize) {
        if req >= self.tables.len() {
            return;
        }
        let mut table = std::mem::take(&mut self.tables[req]);
        self.num_cached[req] = UNTRACKED;
        self.pool.free_blocks(table.iter().rev().copied());
        table.clear();
        self.tables[req] = table;
    }

    /// vLLM's `record_prefix_cache_stats`, called when a waiting request is admitted.
    pub fn record_prefix_cache_stats(&mut self, num_tokens: u64, num_hits: u64, preempted: bool) {
        if !self.config.enable_prefix_caching {
            return;
        }
        let s = &mut self.stats;
        if preempted {
            s.preempted_requests += 1;
            s.preempted_queries += num_tokens;
            s.preempted_hits += num_hits;
        } else {
            s.requests += 1;
            s.queries += num_tokens;
            s.hits += num_hits;
        }
    }

    /// vLLM's `reset_prefix_cache` (fails while any block is in use).
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset_prefix_cache()
    }

    /// The pool's invariants, and every block's reference count equal to the number of block
    /// tables that hold it.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut counts = vec![0u32; self.config.num_blocks as usize];
        for (req, t) in self.tables.iter().enumerate() {
            for (i, &b) in t.iter().enumerate() {
                if b == 0 || b >= self.config.num_blocks {
                    return Err(format!("request {req} holds block {b}"));
                }
                if t[..i].contains(&b) {
                    return Err(format!("request {req} holds block {b} twice"));
                }
                counts[b as usize] += 1;
            }
            let n = self.num_cached[req];
            if n != UNTRACKED && n as usize > t.len() {
                return Err(format!("request {req}: {n} cached of {} blocks", t.len()));
            }
        }
        for (b, &c) in counts.iter().enumerate() {
            let r = self.pool.ref_cnt(b as BlockId);
            if r != c {
                return Err(format!("block {b}: ref count {r}, held by {c} tables"));
            }
        }
        Ok(())
    }
}
