//! vLLM 0.33.0's `KVCacheManager` for one full-attention KV group (the unitary coordinator and
//! `FullAttentionManager` folded together): per-request block tables, the prefix lookup
//! (`get_computed_blocks`), `allocate_slots` with the full-sequence admission gate, `free`,
//! usage and prefix-cache statistics.
//!
//! Requests are named by dense indices the caller assigns (and may reuse once a request is
//! freed); the caller keeps each request's token counts and block hashes and passes them in a
//! [`SlotRequest`].
//!
//! Placed on an executor ([`KvCacheManager::place`]), the manager also carries its pool out
//! in memory, so that every engine driving it emits the same decision stream: it reserves the
//! pool as one segment, writes every block that `allocate_slots` schedules to be computed
//! (`WriteKv`: a full block holds its prefix hash, a filling one a value of the request and
//! its progress) and, through [`KvCacheManager::read_back_hits`], reads a waiting request's
//! prefix hits back before they count (`ReadKv`); a hit whose bytes are wrong is evicted and
//! not served. Unplaced, none of this costs anything but one branch per allocation.

use serde::{Deserialize, Serialize};

use super::block::{cdiv, full_blocks, BlockId};
use super::eviction::{EvictionPolicy, VllmLru};
use super::hash::BlockHash;
use super::pool::BlockPool;
use crate::decision::{Decision, Loc, Refusal, SegmentId};
use crate::executor::Executor;

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

/// What an admission asks of [`KvCacheManager::admit`] (vLLM's `allocate_slots` arguments
/// beyond the plain case).
#[derive(Clone, Copy, Debug)]
pub struct Admission<'h> {
    pub num_new_tokens: u64,
    /// GPU prefix-hit tokens and their blocks.
    pub hit_tokens: u64,
    pub hits: &'h [BlockId],
    /// Tokens past the hit that a connector loads (`num_external_computed_tokens`).
    pub external_tokens: u64,
    /// Blocks that must stay free for other in-flight prefills.
    pub reserved_blocks: u64,
    /// Do not cache the blocks yet (`delay_cache_blocks`: an asynchronous load fills them).
    pub delay_cache: bool,
    pub full_sequence_must_fit: bool,
    pub has_scheduled_reqs: bool,
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

/// How many hashes ahead a prefix lookup starts loading the map slots it will read.
const LOOKUP_AHEAD: usize = 4;

/// Untracked request (vLLM: not in `num_cached_block`).
const UNTRACKED: u32 = u32::MAX;

/// Where the KV pool lives on an executor: block `b` at offset `b × block_bytes` of `segment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPlacement {
    pub segment: SegmentId,
    pub block_bytes: u64,
}

impl KvPlacement {
    #[inline]
    fn at(&self, block: BlockId) -> Loc {
        Loc {
            segment: self.segment,
            offset: block as u64 * self.block_bytes,
        }
    }
}

/// Why the pool could not be placed on an executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceError {
    /// `num_blocks × block_bytes` does not fit in 64 bits.
    TooLarge,
    /// The executor refused to reserve the pool's `bytes`.
    Refused { bytes: u64, why: Refusal },
}

impl std::fmt::Display for PlaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlaceError::TooLarge => write!(f, "KV pool size overflows 64 bits"),
            PlaceError::Refused { bytes, why } => {
                write!(
                    f,
                    "the executor refused the KV pool of {bytes} bytes ({why:?})"
                )
            }
        }
    }
}

/// The executor a placed pool is carried out on.
struct Placed<'x> {
    placement: KvPlacement,
    exec: &'x mut dyn Executor,
    hits_refused: u64,
}

/// vLLM's KV cache manager; `'x` is the lifetime of the executor it may be placed on.
pub struct KvCacheManager<'x, P: EvictionPolicy = VllmLru> {
    config: KvConfig,
    pool: BlockPool<P>,
    /// Block table per request index.
    tables: Vec<Vec<BlockId>>,
    /// Full blocks of a running request already cached (vLLM's `num_cached_block`).
    num_cached: Vec<u32>,
    stats: PrefixCacheStats,
    /// Emptied tables of freed requests, kept for the next requests that take blocks.
    spare_tables: Vec<Vec<BlockId>>,
    placed: Option<Placed<'x>>,
    /// The last admission refused, its lookup watched in the pool.
    refused: Option<Refused>,
}

/// An admission the full-sequence gate refused (see
/// [`KvCacheManager::note_refused_admission`]).
#[derive(Clone, Copy, Debug)]
struct Refused {
    key: u64,
    req: usize,
    num_tokens: u64,
    /// Its prefix hits, and those of them that were free.
    hits: u64,
    evictable: u64,
}

/// Most emptied block tables kept for reuse (about the requests that run at once).
const MAX_SPARE_TABLES: usize = 1024;

impl KvCacheManager<'_, VllmLru> {
    pub fn new(config: KvConfig) -> Self {
        Self::with_policy(config, VllmLru::new(config.num_blocks))
    }
}

/// Where a placed pool lives and the executor it is carried out on.
pub type PlacedExecutor<'a> = (KvPlacement, &'a mut dyn Executor);

impl<'x, P: EvictionPolicy> KvCacheManager<'x, P> {
    pub fn with_policy(config: KvConfig, policy: P) -> Self {
        assert!(config.block_size > 0, "block size 0");
        KvCacheManager {
            pool: BlockPool::with_policy(config.num_blocks, config.enable_prefix_caching, policy),
            config,
            tables: Vec::new(),
            num_cached: Vec::new(),
            stats: PrefixCacheStats::default(),
            spare_tables: Vec::new(),
            placed: None,
            refused: None,
        }
    }

    /// Carries the pool out on `exec` from now on: reserves `num_blocks × block_bytes` as
    /// `placement.segment` at once; afterwards every block scheduled for computation is
    /// written and [`read_back_hits`](Self::read_back_hits) reads hits back. Call it before
    /// any block is taken. On error nothing is placed.
    pub fn place(
        &mut self,
        placement: KvPlacement,
        exec: &'x mut dyn Executor,
    ) -> Result<(), PlaceError> {
        assert!(self.placed.is_none(), "the KV pool is already placed");
        assert_eq!(
            self.pool.num_free(),
            self.config.num_blocks - 1,
            "place the KV pool before any block is taken"
        );
        let bytes = (self.config.num_blocks as u64)
            .checked_mul(placement.block_bytes)
            .ok_or(PlaceError::TooLarge)?;
        exec.apply(Decision::Reserve {
            segment: placement.segment,
            bytes,
        })
        .map_err(|why| PlaceError::Refused { bytes, why })?;
        self.placed = Some(Placed {
            placement,
            exec,
            hits_refused: 0,
        });
        Ok(())
    }

    /// Prefix hits whose bytes the executor refused (0 when not placed).
    pub fn hits_refused(&self) -> u64 {
        self.placed.as_ref().map_or(0, |p| p.hits_refused)
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
        if self.tables[req].capacity() == 0 {
            if let Some(spare) = self.spare_tables.pop() {
                self.tables[req] = spare;
            }
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
        let max_blocks = full_blocks(num_tokens - 1, self.config.block_size as u64) as usize;
        let looked_up = &block_hashes[..max_blocks.min(block_hashes.len())];
        for (i, &h) in looked_up.iter().enumerate() {
            if let Some(&ahead) = looked_up.get(i + LOOKUP_AHEAD) {
                self.pool.load_ahead(ahead);
            }
            match self.pool.get_cached(h) {
                Some(b) => out.push(b),
                None => break,
            }
        }
        out.len() as u64 * self.config.block_size as u64
    }

    /// Remembers that admitting the waiting request `r` (named `key` by the caller, a name no
    /// other request takes) was refused by the full-sequence gate of
    /// [`can_allocate_slots`](Self::can_allocate_slots) with `hits`, the blocks
    /// [`get_computed_blocks`](Self::get_computed_blocks) gave for it, and watches that
    /// lookup in the pool. Nothing is remembered for a request that holds blocks.
    pub fn note_refused_admission(&mut self, key: u64, r: SlotRequest<'_>, hits: &[BlockId]) {
        if self.num_cached.get(r.req).is_some_and(|&n| n != UNTRACKED) || r.num_tokens == 0 {
            return;
        }
        // Where the lookup stopped: at a miss (whose caching would extend the hits), or at
        // its limit.
        let max_blocks = full_blocks(r.num_tokens - 1, self.config.block_size as u64) as usize;
        let next = if self.config.enable_prefix_caching {
            r.block_hashes[..max_blocks.min(r.block_hashes.len())]
                .get(hits.len())
                .copied()
        } else {
            None
        };
        self.pool.watch(hits, next);
        self.refused = Some(Refused {
            key,
            req: r.req,
            num_tokens: r.num_tokens,
            hits: hits.len() as u64,
            evictable: hits.iter().filter(|&&b| self.pool.ref_cnt(b) == 0).count() as u64,
        });
    }

    /// Whether admitting the waiting request `r` (named `key`, as for
    /// [`note_refused_admission`](Self::note_refused_admission)) is certainly refused again by
    /// the full-sequence gate, without a lookup: its last refusal was noted, and since then
    /// its lookup's answer has not changed and none of its free hits was taken, so it needs
    /// at least the blocks it needed then, against the free blocks now. False when unsure.
    pub fn admission_still_refused(
        &self,
        key: u64,
        r: SlotRequest<'_>,
        has_scheduled_reqs: bool,
    ) -> bool {
        let Some(m) = self.refused else {
            return false;
        };
        if m.key != key
            || m.req != r.req
            || m.num_tokens != r.num_tokens
            || !self.pool.watch_unchanged()
            || self.num_cached.get(r.req).is_some_and(|&n| n != UNTRACKED)
        {
            return false;
        }
        let watermark = if has_scheduled_reqs && r.waiting {
            self.config.watermark_blocks as u64
        } else {
            0
        };
        let full = r.num_tokens.min(self.config.max_model_len);
        let required = cdiv(full, self.config.block_size as u64);
        let held = self.tables.get(r.req).map_or(0, Vec::len) as u64;
        // Hits free then are free now or gone with the watch: at least as many to take.
        let need = required.saturating_sub(m.hits + held) + m.evictable;
        need + watermark > self.pool.num_free() as u64
    }

    /// Forgets the refused admission (its request is admitted).
    fn forget_refused(&mut self) {
        if self.refused.take().is_some() {
            self.pool.unwatch();
        }
    }

    /// vLLM's `get_num_blocks_to_allocate` for full attention.
    fn blocks_to_allocate(&self, req: usize, num_tokens: u64, hits: &[BlockId]) -> u64 {
        let required = cdiv(num_tokens, self.config.block_size as u64);
        let held = self.tables.get(req).map_or(0, Vec::len) as u64;
        if self.num_cached.get(req).is_some_and(|&n| n != UNTRACKED) {
            debug_assert!(hits.is_empty());
            return required.saturating_sub(held);
        }
        let new = required.saturating_sub(hits.len() as u64 + held);
        // Hits sitting among the free blocks leave them when touched.
        let evictable = hits.iter().filter(|&&b| self.pool.ref_cnt(b) == 0).count() as u64;
        new + evictable
    }

    /// Whether [`allocate_slots`](Self::allocate_slots) with the same arguments would
    /// succeed: vLLM's checks, without taking any block.
    pub fn can_allocate_slots(
        &self,
        r: SlotRequest<'_>,
        num_new_tokens: u64,
        num_hit_tokens: u64,
        hits: &[BlockId],
        full_sequence_must_fit: bool,
        has_scheduled_reqs: bool,
    ) -> bool {
        let max_len = self.config.max_model_len;
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
        let total_computed = (r.num_computed_tokens + num_hit_tokens).min(max_len);
        let need = (total_computed + num_new_tokens).min(max_len);
        self.blocks_to_allocate(r.req, need, hits) + watermark <= free
    }

    /// vLLM's `allocate_slots` (no lookahead, external or encoder tokens): gives the request
    /// slots for `num_new_tokens` more tokens after its computed ones and its new prefix hits
    /// (`hits`, `num_hit_tokens`), then caches its newly full blocks. With
    /// `full_sequence_must_fit` (vLLM's `scheduler_reserve_full_isl`) it first refuses unless
    /// the whole request fits. Returns false, changing nothing, when the blocks are not there.
    /// Placed, it writes the blocks the new tokens fall in (they are computed in this step).
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
        let max_len = self.config.max_model_len;
        let total_computed = (r.num_computed_tokens + num_hit_tokens).min(max_len);
        let need = (total_computed + num_new_tokens).min(max_len);
        let running = self.num_cached.get(r.req).is_some_and(|&n| n != UNTRACKED);
        if running && !full_sequence_must_fit && !r.waiting {
            // The common case (a running request's next chunk or token): vLLM's checks come
            // down to the blocks it lacks, no watermark.
            let required = cdiv(need, self.config.block_size as u64);
            let held = self.tables[r.req].len() as u64;
            if required.saturating_sub(held) > self.pool.num_free() as u64 {
                return false;
            }
        } else if !self.can_allocate_slots(
            r,
            num_new_tokens,
            num_hit_tokens,
            hits,
            full_sequence_must_fit,
            has_scheduled_reqs,
        ) {
            return false;
        }
        self.ensure(r.req);
        if self.num_cached[r.req] == UNTRACKED {
            self.forget_refused();
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
        if let Some(placed) = self.placed.as_mut() {
            let computed = r.num_computed_tokens + num_hit_tokens;
            placed.write_blocks(
                &self.tables[r.req],
                r,
                computed,
                num_new_tokens,
                self.config.block_size,
            );
        }
        true
    }

    /// vLLM's `allocate_slots` checks for an admission that may also load `external` tokens
    /// from a connector and must leave `reserved_blocks` free (see [`Admission`]), without
    /// taking any block.
    pub fn can_admit(&self, r: SlotRequest<'_>, a: &Admission<'_>) -> bool {
        let max_len = self.config.max_model_len;
        let watermark = if a.has_scheduled_reqs && r.waiting {
            self.config.watermark_blocks as u64
        } else {
            0
        };
        let free = self.pool.num_free() as u64;
        if a.full_sequence_must_fit {
            let full = r.num_tokens.min(max_len);
            if self.blocks_to_allocate(r.req, full, a.hits) + watermark > free {
                return false;
            }
        }
        let total_computed =
            (r.num_computed_tokens + a.hit_tokens + a.external_tokens).min(max_len);
        let need = (total_computed + a.num_new_tokens).min(max_len);
        self.blocks_to_allocate(r.req, need, a.hits) + watermark + a.reserved_blocks <= free
    }

    /// vLLM's `allocate_slots` with a connector: the prefix hits are taken, then blocks for
    /// the `external` tokens (filled by a load, so not written here), then for the new tokens;
    /// the blocks are cached unless `delay_cache` (an asynchronous load caches them when it
    /// completes, [`cache_computed`](Self::cache_computed)). False, changing nothing, when the
    /// blocks are not there.
    pub fn admit(&mut self, r: SlotRequest<'_>, a: &Admission<'_>) -> bool {
        if !self.can_admit(r, a) {
            return false;
        }
        let max_len = self.config.max_model_len;
        let bs = self.config.block_size as u64;
        let local = r.num_computed_tokens + a.hit_tokens;
        let total_computed = (local + a.external_tokens).min(max_len);
        let need = (total_computed + a.num_new_tokens).min(max_len);
        self.ensure(r.req);
        if self.num_cached[r.req] == UNTRACKED {
            self.forget_refused();
        }
        if self.num_cached[r.req] == UNTRACKED && self.config.enable_prefix_caching {
            self.pool.touch(a.hits);
            self.tables[r.req].extend_from_slice(a.hits);
            self.num_cached[r.req] = a.hits.len() as u32;
        }
        if a.external_tokens > 0 {
            let table = &mut self.tables[r.req];
            let n = cdiv(local + a.external_tokens, bs).saturating_sub(table.len() as u64);
            self.pool.get_new_blocks(n as usize, table);
        }
        let required = cdiv(need, bs) as usize;
        let table = &mut self.tables[r.req];
        if required > table.len() {
            let n = required - table.len();
            self.pool.get_new_blocks(n, table);
        }
        if self.config.enable_prefix_caching && !a.delay_cache {
            self.cache_blocks(r, (total_computed + a.num_new_tokens).min(r.num_tokens));
        }
        if let Some(placed) = self.placed.as_mut() {
            let computed = local + a.external_tokens;
            placed.write_blocks(
                &self.tables[r.req],
                r,
                computed,
                a.num_new_tokens,
                self.config.block_size,
            );
        }
        true
    }

    /// Caches the request's full blocks up to `num_tokens` (vLLM's `cache_blocks`, as a
    /// completed asynchronous load does for its blocks). Nothing without prefix caching.
    pub fn cache_computed(&mut self, r: SlotRequest<'_>, num_tokens: u64) {
        if self.config.enable_prefix_caching && r.req < self.tables.len() {
            self.cache_blocks(r, num_tokens);
        }
    }

    /// Blocks the request still lacks for `num_tokens` tokens (vLLM's
    /// `_request_remaining_blocks`, what an in-flight prefill reserves).
    pub fn remaining_blocks(&self, req: usize, num_tokens: u64) -> u64 {
        let need = cdiv(
            num_tokens.min(self.config.max_model_len),
            self.config.block_size as u64,
        );
        need.saturating_sub(self.blocks(req).len() as u64)
    }

    /// Every request's block table (by request index) beside the executor the pool is placed
    /// on, if any: what a connector reads and writes through at once.
    pub fn tables_and_executor(&mut self) -> (&[Vec<BlockId>], Option<PlacedExecutor<'_>>) {
        let exec = self
            .placed
            .as_mut()
            .map(|p| (p.placement, &mut *p.exec as &mut dyn Executor));
        (&self.tables, exec)
    }

    /// Placed: where the pool lives and the executor it is carried out on (for the CPU tier's
    /// transfers).
    pub fn placed_executor(&mut self) -> Option<(KvPlacement, &mut dyn Executor)> {
        self.placed
            .as_mut()
            .map(|p| (p.placement, &mut *p.exec as &mut dyn Executor))
    }

    /// Placed: reads the hit blocks of a waiting request back in order, before they count
    /// (call it once its admission is known to succeed). The first block whose bytes are
    /// wrong is evicted from the prefix cache (never served again) and `hits` is cut before
    /// it. Returns the hit tokens left; unplaced, `hits` as they are.
    pub fn read_back_hits(&mut self, block_hashes: &[BlockHash], hits: &mut Vec<BlockId>) -> u64 {
        let bs = self.config.block_size as u64;
        let Some(placed) = self.placed.as_mut() else {
            return hits.len() as u64 * bs;
        };
        let served = placed.read_blocks(hits, block_hashes);
        if served < hits.len() {
            self.pool.evict_blocks(&hits[served..=served]);
            hits.truncate(served);
        }
        served as u64 * bs
    }

    /// vLLM's `cache_blocks`: caches the request's full blocks up to `num_tokens`.
    fn cache_blocks(&mut self, r: SlotRequest<'_>, num_tokens: u64) {
        let bs = self.config.block_size as u64;
        let cached = match self.num_cached[r.req] {
            UNTRACKED => 0,
            n => n as usize,
        };
        let hashed_tokens = r.block_hashes.len() as u64 * bs;
        let upto = num_tokens.min(hashed_tokens);
        // Nothing newly full (most calls: a decode token inside a block), without dividing.
        if (cached as u64 + 1) * bs > upto {
            return;
        }
        let full = full_blocks(upto, bs) as usize;
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
        self.pool.free_table(&table);
        // The request's index may stay unused a long time (a caller reuses indices of
        // finished requests for waiting ones): its table's memory goes to the next request
        // that takes blocks, or is returned.
        if self.spare_tables.len() < MAX_SPARE_TABLES && table.capacity() > 0 {
            table.clear();
            self.spare_tables.push(table);
        }
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

impl Placed<'_> {
    /// Reads `hits` back in order; returns how many hold what they should (the first one
    /// refused ends the run of hits).
    fn read_blocks(&mut self, hits: &[BlockId], hashes: &[BlockHash]) -> usize {
        for (i, (&block, hash)) in hits.iter().zip(hashes).enumerate() {
            let read = Decision::ReadKv {
                at: self.placement.at(block),
                bytes: self.placement.block_bytes,
                content: hash.0,
            };
            if self.exec.apply(read).is_err() {
                self.hits_refused += 1;
                return i;
            }
        }
        hits.len()
    }

    /// Writes the blocks of `table` that tokens `computed..computed + n` fall in: a full block
    /// holds its prefix hash, a filling one a value of the request and its progress.
    fn write_blocks(
        &mut self,
        table: &[BlockId],
        r: SlotRequest<'_>,
        computed: u64,
        n: u64,
        block_size: u32,
    ) {
        if n == 0 {
            return;
        }
        let bs = block_size as u64;
        let end = computed + n;
        let (first, last) = (
            full_blocks(computed, bs) as usize,
            full_blocks(end - 1, bs) as usize,
        );
        for (b, &block) in table.iter().enumerate().take(last + 1).skip(first) {
            let full = end >= (b as u64 + 1) * bs;
            let content = match r.block_hashes.get(b) {
                Some(h) if full => h.0,
                _ => filling_content(r.req, b, end),
            };
            let write = Decision::WriteKv {
                at: self.placement.at(block),
                bytes: self.placement.block_bytes,
                content,
            };
            self.exec
                .apply(write)
                .expect("an executor never refuses a KV write");
        }
    }
}

/// What a block holds while it fills: a value of (request, block index, tokens computed),
/// never equal to a prefix hash by more than chance.
fn filling_content(req: usize, block: usize, computed: u64) -> u64 {
    let mut x = (req as u64) << 40 ^ (block as u64) << 20 ^ computed ^ 0x5bd1_e995_0000_0000;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}
