//! Giving cached memory back: `empty_cache` (`release_cached_blocks`), the oversize release of a
//! failed reservation (`release_available_cached_blocks`) and garbage collection
//! (`garbage_collect_cached_blocks`).

use super::{Caching, FreeKey, Params, PoolId, SizePool, State, DEFAULT_POOL, NIL};
use crate::decision::{AllocId, Decision, SegmentId};
use crate::executor::Executor;

use super::events::SegmentEventKind;

impl Caching {
    /// `release_cached_blocks` (= `empty_cache`): every pending free completes
    /// (`synchronize_and_free_events`), then the default pool's large blocks, then its small
    /// ones, then the small and large blocks of every freeable private pool are released.
    pub(super) fn release_cached_blocks(&mut self, mem: &mut dyn Executor) {
        self.synchronize_and_free_events(mem);
        self.release_blocks(DEFAULT_POOL, SizePool::Large, mem);
        self.release_blocks(DEFAULT_POOL, SizePool::Small, mem);
        let freeable: Vec<PoolId> = self.freeable_pools.iter().copied().collect();
        for pool_id in freeable {
            self.release_blocks(pool_id, SizePool::Small, mem);
            self.release_blocks(pool_id, SizePool::Large, mem);
        }
    }

    /// Completes every pending free, oldest request first.
    fn synchronize_and_free_events(&mut self, mem: &mut dyn Executor) {
        let pending: Vec<AllocId> = std::mem::take(&mut self.pending);
        for id in pending {
            if let Some(events) = &self.events {
                self.completions.push((id, events.len()));
            }
            self.complete_free(id, mem);
        }
    }

    /// `release_blocks`: in (stream, size, address) order, every free block of the pool that is a
    /// whole non-expandable segment is released; then the whole pages inside the free blocks of
    /// expandable ranges are unmapped, and a range left entirely unmapped is released.
    fn release_blocks(&mut self, pool_id: PoolId, pool: SizePool, mem: &mut dyn Executor) {
        let keys: Vec<u32> = self.pool_keys(pool_id, pool).map(|k| k.4).collect();
        let mut to_unmap = Vec::new();
        for i in keys {
            let b = *self.b(i);
            if self.seg(b.segment).expandable {
                to_unmap.push(i);
            } else if b.prev == NIL && b.next == NIL {
                self.release_segment(i, mem);
            }
        }
        for i in to_unmap {
            self.unmap_block(i, mem);
            let b = *self.b(i);
            if b.state == State::Unmapped && b.prev == NIL && b.next == NIL {
                self.release_va_range(i, mem);
            }
        }
    }

    /// The free blocks of one `BlockPool`, in its order.
    fn pool_keys(&self, pool_id: PoolId, pool: SizePool) -> impl Iterator<Item = &FreeKey> {
        self.size_pools[pool.index()]
            .blocks
            .range((pool_id, 0, 0, 0, 0)..)
            .take_while(move |k| k.0 == pool_id)
    }

    /// `release_block`: returns the whole-segment free block `i` and its segment.
    pub(super) fn release_segment(&mut self, i: u32, mem: &mut dyn Executor) {
        let segment = self.b(i).segment;
        self.remove_free(i);
        self.drop_block(i);
        let seg = self.remove_segment(segment);
        let release = Decision::Release {
            segment: SegmentId::arena(segment),
        };
        mem.apply(release).expect("release is never refused");
        self.reserved_bytes -= seg.bytes;
        self.counters.num_device_free += 1;
        self.emit(
            SegmentEventKind::Free,
            seg.address,
            seg.bytes,
            seg.stream,
            seg.pool_id,
        );
    }

    /// Whether free block `i` is a whole non-expandable segment (what `cudaFree` can return).
    fn is_whole_segment(&self, i: u32) -> bool {
        let b = self.b(i);
        b.prev == NIL && b.next == NIL && !self.seg(b.segment).expandable
    }

    /// `release_available_cached_blocks` (only with `max_split_size`): releases the smallest
    /// cached block of the stream at least max(request, max_split_size), or else oversize blocks
    /// from the largest down until that much is released. True if enough was released.
    pub(super) fn release_available_cached_blocks(
        &mut self,
        p: Params,
        mem: &mut dyn Executor,
    ) -> bool {
        let Some(max_split) = self.settings.max_split_bytes else {
            return false;
        };
        let key_size = p.size.max(max_split);
        let keys: Vec<FreeKey> = self.pool_keys(p.pool_id, p.pool).copied().collect();
        let at = keys.partition_point(|k| (k.1, k.2) < (p.stream, key_size));
        let single = keys
            .get(at)
            .filter(|k| k.1 == p.stream && !self.seg(self.b(k.4).segment).expandable);
        if let Some(k) = single {
            // An oversize block is never split (the oversize rules keep small requests away and
            // large ones unsplit), but a block split before `max_split_size` was set may be.
            if self.is_whole_segment(k.4) {
                self.release_segment(k.4, mem);
            }
            return true;
        }
        let mut released = 0u64;
        for k in keys[..at].iter().rev() {
            if released >= key_size || k.2 < max_split || k.1 != p.stream {
                break;
            }
            if self.is_whole_segment(k.4) {
                released += k.2;
                self.release_segment(k.4, mem);
            }
        }
        released >= key_size
    }

    /// `garbage_collect_cached_blocks`: when reserved memory exceeds the threshold share of the
    /// allowed maximum, releases whole cached segments of the default large pool whose age (in
    /// `get_free_block` calls since they were cached) is at least the mean age, pass after pass,
    /// until the excess is reclaimed or a pass frees nothing.
    pub(super) fn garbage_collect_cached_blocks(&mut self, mem: &mut dyn Executor) {
        let Some(allowed) = self.settings.allowed_bytes(self.capacity_bytes) else {
            return;
        };
        let threshold = (self.settings.garbage_collection_threshold * allowed as f64) as u64;
        if self.reserved_bytes <= threshold {
            return;
        }
        let target = self.reserved_bytes - threshold;
        let now = self.gc_calls[SizePool::Large.index()];
        let age = |c: &Caching, i: u32| now - c.b(i).gc_base;
        let unsplit = |c: &Caching, i: u32| c.b(i).prev == NIL && c.b(i).next == NIL;
        let candidates: Vec<u32> = self
            .pool_keys(DEFAULT_POOL, SizePool::Large)
            .map(|k| k.4)
            .filter(|&i| unsplit(self, i))
            .collect();
        let mut total_age: u64 = candidates.iter().map(|&i| age(self, i)).sum();
        let mut count = candidates.len() as u64;
        let mut reclaimed = 0u64;
        let mut freed = true;
        while reclaimed < target && freed && count > 0 {
            let mean_age = total_age as f64 / count as f64;
            freed = false;
            let keys: Vec<u32> = self
                .pool_keys(DEFAULT_POOL, SizePool::Large)
                .map(|k| k.4)
                .collect();
            for i in keys {
                if self.is_whole_segment(i) && age(self, i) as f64 >= mean_age {
                    freed = true;
                    reclaimed += self.b(i).size;
                    total_age -= age(self, i);
                    count -= 1;
                    self.release_segment(i, mem);
                }
            }
        }
    }
}
