//! gpumem's predictive prefetch (beyond vLLM, `--offload-prefetch N`): while the next `N`
//! waiting requests queue, the CPU-resident chunks of their prompts past their GPU hit are
//! loaded into free GPU blocks and entered in the prefix cache, so that the admission finds
//! them on the GPU instead of waiting for its own load.
//!
//! What it may not do, and why it cannot:
//! - take a block from anyone: a prefetched block stays in vLLM's free queue, in its place, and
//!   the free count never changes; an allocation that reaches it takes it (the prefetch is
//!   wasted), exactly as it would have without the prefetch;
//! - evict a GPU-cached block: only free blocks holding no hash are loaded into, and only from
//!   the run of such blocks at the head of the free queue (vLLM reuses all of them before any
//!   cached one), the last of that run first, since they are handed out last;
//! - delay a load an admission waits for: on the link a prefetch yields to every load
//!   submitted while it is in flight (its end moves by that load's time).
//!
//! A chunk being prefetched is pinned in the CPU tier until its copy ends. A block is counted
//! once: a hit when a request takes it holding the prefetched hash, wasted when it is handed
//! out or evicted before that, or when its copy lands on a hash the GPU already holds.

use std::collections::HashSet;

use gpumem_core::kv::eviction::EvictionPolicy;
use gpumem_core::kv::hash::BlockHash;
use gpumem_core::kv::BlockId;
use gpumem_core::link::Link;

use super::requests::Status;
use super::VllmEngine;

/// Prefetched GPU blocks over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchTotals {
    /// GPU blocks whose prefetch copy was started.
    pub loads: u64,
    /// Prefetched blocks a request later took holding the prefetched content.
    pub hits: u64,
    /// Prefetched blocks handed out, evicted or redundant before any request used them.
    pub wasted: u64,
    /// Times the prefetch phase changed the free-block count (never, by construction).
    pub free_count_changes: u64,
}

/// One chunk's copy in flight.
struct Job {
    /// The CPU chunk pinned for it.
    slot: u32,
    /// (GPU block, hash it will hold, lost: handed out before the copy ended).
    blocks: Vec<(BlockId, BlockHash, bool)>,
    done_ns: u64,
}

pub(super) struct Prefetch {
    depth: usize,
    link: Link,
    block_bytes: u64,
    /// When the last prefetch copy ends.
    busy_until_ns: u64,
    jobs: Vec<Job>,
    /// Blocks whose copy landed, free and holding their prefetched hash.
    landed: Vec<(BlockId, BlockHash)>,
    /// Blocks in `jobs` or `landed`.
    marked: Vec<bool>,
    /// Hashes in flight.
    loading: HashSet<u64>,
    spans: Vec<(u64, u64)>,
    pub totals: PrefetchTotals,
}

impl Prefetch {
    pub fn new(depth: u32, link: Link, block_bytes: u64, num_gpu_blocks: u32) -> Prefetch {
        Prefetch {
            depth: depth as usize,
            link,
            block_bytes,
            busy_until_ns: 0,
            jobs: Vec::new(),
            landed: Vec::new(),
            marked: vec![false; num_gpu_blocks as usize],
            loading: HashSet::new(),
            spans: Vec::new(),
            totals: PrefetchTotals::default(),
        }
    }
}

impl VllmEngine<'_> {
    /// After `schedule()`: the prefetched blocks this step handed out (wasted) or hit.
    pub(super) fn prefetch_after_schedule(&mut self) {
        let Some(p) = self.tier.as_mut().and_then(|t| t.prefetch.as_mut()) else {
            return;
        };
        let pool = self.kv.pool();
        for job in &mut p.jobs {
            for (b, h, lost) in &mut job.blocks {
                if !*lost && pool.ref_cnt(*b) > 0 {
                    *lost = true;
                    p.totals.wasted += 1;
                    p.marked[*b as usize] = false;
                    p.loading.remove(&h.0);
                }
            }
        }
        let (marked, totals) = (&mut p.marked, &mut p.totals);
        p.landed.retain(|&(b, h)| {
            let held = pool.block_hash(b) == Some(h);
            let keep = held && pool.ref_cnt(b) == 0;
            if !keep {
                if held {
                    totals.hits += 1;
                } else {
                    totals.wasted += 1;
                }
                marked[b as usize] = false;
            }
            keep
        });
    }

    /// At the forward pass's start `now_ns`: the copies ended by then land in the prefix
    /// cache, and the next waiting requests' copies start.
    pub(super) fn prefetch_at(&mut self, now_ns: u64) {
        if self.tier.as_ref().is_none_or(|t| t.prefetch.is_none()) {
            return;
        }
        let free_before = self.kv.num_free_blocks();
        self.prefetch_yield();
        self.prefetch_land(now_ns);
        self.prefetch_issue(now_ns);
        if self.kv.num_free_blocks() != free_before {
            let p = self.prefetch_mut();
            p.totals.free_count_changes += 1;
        }
    }

    fn prefetch_mut(&mut self) -> &mut Prefetch {
        self.tier
            .as_mut()
            .and_then(|t| t.prefetch.as_mut())
            .expect("a prefetch")
    }

    /// Every load submitted since the last step holds the link: copies still running then
    /// end that much later.
    fn prefetch_yield(&mut self) {
        let tier = self.tier.as_mut().expect("a CPU tier");
        let p = tier.prefetch.as_mut().expect("a prefetch");
        tier.worker.take_load_spans(&mut p.spans);
        for &(start, took) in &p.spans {
            for job in &mut p.jobs {
                if job.done_ns > start {
                    job.done_ns = job.done_ns.saturating_add(took);
                }
            }
            if p.busy_until_ns > start {
                p.busy_until_ns = p.busy_until_ns.saturating_add(took);
            }
        }
    }

    fn prefetch_land(&mut self, now_ns: u64) {
        let tier = self.tier.as_mut().expect("a CPU tier");
        let p = tier.prefetch.as_mut().expect("a prefetch");
        let mut i = 0;
        while i < p.jobs.len() {
            if p.jobs[i].done_ns > now_ns {
                i += 1;
                continue;
            }
            // Removed in order: the copies landing in one step enter the cache in issue order.
            let job = p.jobs.remove(i);
            tier.connector.prefetch_unpin(job.slot);
            for (b, h, lost) in job.blocks {
                if lost {
                    continue;
                }
                p.loading.remove(&h.0);
                let pool = self.kv.pool_mut();
                let free_and_empty = pool.ref_cnt(b) == 0 && pool.block_hash(b).is_none();
                if !free_and_empty || pool.get_cached(h).is_some() {
                    p.totals.wasted += 1;
                    p.marked[b as usize] = false;
                    continue;
                }
                pool.cache_full_blocks(&[b], &[h], 0, 1);
                p.landed.push((b, h));
            }
        }
    }

    fn prefetch_issue(&mut self, now_ns: u64) {
        let depth = self.prefetch_mut().depth;
        let mut targets: Option<Vec<BlockId>> = None;
        let bs = self.cfg.block_size as u64;
        let candidates: Vec<usize> = self.waiting.iter().take(depth).copied().collect();
        for r in candidates {
            let q = self.requests.get_mut(r);
            if q.num_computed > 0 || !matches!(q.status, Status::Waiting | Status::Preempted) {
                continue;
            }
            q.update_hashes(self.cfg.block_size, &mut self.tok_buf);
            let q = self.requests.get(r);
            let mut hits = std::mem::take(&mut self.hit_buf);
            let local = self
                .kv
                .get_computed_blocks(&q.hashes, q.num_tokens, &mut hits);
            self.hit_buf = hits;
            let first = (local / bs) as usize;
            let max_blocks = (((q.num_tokens - 1) / bs) as usize).min(q.hashes.len());
            let tier = self.tier.as_mut().expect("a CPU tier");
            let bpc = tier.connector.config().blocks_per_chunk as usize;
            let pool = self.kv.pool();
            let p = tier.prefetch.as_mut().expect("a prefetch");
            let mut i = first;
            while i < max_blocks {
                let chunk = i / bpc;
                let chunk_end = (chunk + 1) * bpc;
                if chunk_end > q.hashes.len() {
                    break;
                }
                let wanted: Vec<(usize, BlockHash)> = (i..chunk_end.min(max_blocks))
                    .map(|j| (j, q.hashes[j]))
                    .filter(|&(_, h)| pool.get_cached(h).is_none() && !p.loading.contains(&h.0))
                    .collect();
                i = chunk_end;
                if wanted.is_empty() {
                    continue;
                }
                // The head run of the free queue: free blocks with no hash, which vLLM hands
                // out before any cached one; the last of them is taken first.
                let targets = targets.get_or_insert_with(|| {
                    let pool_blocks = pool.policy().order();
                    let mut out = Vec::new();
                    for b in pool_blocks {
                        let mine = p.marked[b as usize];
                        match pool.block_hash(b) {
                            Some(_) if !mine => break,
                            None if !mine => out.push(b),
                            _ => {}
                        }
                    }
                    out
                });
                if targets.len() < wanted.len() {
                    return;
                }
                let key = q.hashes[chunk_end - 1].0;
                let Some(slot) = tier.connector.prefetch_pin(key) else {
                    break;
                };
                let start = now_ns
                    .max(tier.worker.loads_busy_until_ns())
                    .max(p.busy_until_ns);
                let bytes = p.block_bytes.saturating_mul(wanted.len() as u64);
                let done_ns = start.saturating_add(p.link.transfer_ns(bytes));
                p.busy_until_ns = done_ns;
                let mut blocks = Vec::with_capacity(wanted.len());
                for (_, h) in wanted {
                    let b = targets.pop().expect("enough targets");
                    p.marked[b as usize] = true;
                    p.loading.insert(h.0);
                    blocks.push((b, h, false));
                }
                p.totals.loads += blocks.len() as u64;
                p.jobs.push(Job {
                    slot,
                    blocks,
                    done_ns,
                });
            }
        }
    }

    /// The prefetch's promises, walked: it never changed the free count, every block it
    /// counts is counted once, and every block it tracks is free and holds what it should.
    pub(super) fn prefetch_check(&self) -> Result<(), String> {
        let Some(p) = self.tier.as_ref().and_then(|t| t.prefetch.as_ref()) else {
            return Ok(());
        };
        let t = p.totals;
        if t.free_count_changes > 0 {
            return Err(format!(
                "the prefetch changed the free-block count in {} steps",
                t.free_count_changes
            ));
        }
        let tracked = p.landed.len() as u64
            + p.jobs
                .iter()
                .flat_map(|j| &j.blocks)
                .filter(|b| !b.2)
                .count() as u64;
        if t.hits + t.wasted + tracked != t.loads {
            return Err(format!(
                "prefetch: {} hits + {} wasted + {tracked} tracked != {} loads",
                t.hits, t.wasted, t.loads
            ));
        }
        let pool = self.kv.pool();
        for &(b, h) in &p.landed {
            if pool.ref_cnt(b) != 0 || pool.block_hash(b) != Some(h) {
                return Err(format!("prefetched block {b} is not free with its hash"));
            }
        }
        for (b, _, lost) in p.jobs.iter().flat_map(|j| &j.blocks) {
            if !lost && (pool.ref_cnt(*b) != 0 || pool.block_hash(*b).is_some()) {
                return Err(format!("block {b} being prefetched is not free and empty"));
            }
        }
        let marked = p.marked.iter().filter(|&&m| m).count() as u64;
        if marked != tracked {
            return Err(format!("prefetch marks {marked} blocks, tracks {tracked}"));
        }
        Ok(())
    }

    /// The prefetch's totals, when it is on.
    pub fn prefetch_totals(&self) -> Option<PrefetchTotals> {
        self.tier
            .as_ref()
            .and_then(|t| t.prefetch.as_ref())
            .map(|p| p.totals)
    }
}
