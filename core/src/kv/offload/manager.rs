//! vLLM 0.33.0's `CPUOffloadingManager` (`kv_offload/cpu/manager.py`): the CPU tier's chunk
//! slots, which key each holds, reference counts, and the store and load protocol.
//!
//! A chunk's reference count is `-1` while its store is in flight (a lookup answers
//! [`LookupResult::HitPending`]), then the number of loads reading it; at 0 it is evictable.
//! `prepare_store` stores the offered keys that are absent, using free slots first (fresh
//! ones in order, then the most recently freed) and evicting exactly the shortage from the
//! policy, never a key of the same offer; if that many cannot be evicted, nothing is stored
//! (`None`) and the caller offers the same keys again later. Every offer and load is recorded
//! in the request's [`RequestAccess`], which the policy reads when the request finishes.
//!
//! Keys are given with their position (chunk index) in the request; a key has one position in
//! a request, since it is a prefix hash.

use super::access::RequestAccess;
use super::key_index::KeyIndex;
use super::policy::{ChunkPolicy, FinishedChunk, OffloadPolicyKind};

/// vLLM's `LookupResult` (without `RETRY`, which the CPU tier never answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    Miss,
    Hit,
    /// Resident, its store still in flight.
    HitPending,
}

/// Reference count of a slot that holds no chunk.
const EMPTY: i32 = i32::MIN;
/// Reference count of a chunk whose store is in flight.
const PENDING: i32 = -1;

/// What `prepare_store` decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOutput {
    /// (position, slot) of each key to store, in offer order.
    pub stored: Vec<(u32, u32)>,
    /// Chunks evicted to make room.
    pub evicted: u32,
}

/// CPU-tier events since they were last taken: vLLM's `BlockStored` / `BlockRemoved` with
/// medium `CPU`, one key each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierEvents {
    /// Chunks whose store completed.
    pub stored: u64,
    /// Chunks evicted by `prepare_store`.
    pub evicted: u64,
    /// Chunks dropped because their store or a load from them failed (gpumem's executor;
    /// vLLM's own copies never fail).
    pub dropped: u64,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct CpuOffloadManager {
    num_chunks: u32,
    /// Slots handed out fresh so far (slots `0..num_allocated` have been used).
    num_allocated: u32,
    /// Freed slots, reused last freed first.
    free_list: Vec<u32>,
    index: KeyIndex,
    keys: Vec<u64>,
    ref_cnt: Vec<i32>,
    num_evictable: u32,
    num_write_pending: u32,
    policy: ChunkPolicy,
    /// Slots protected from eviction by the offer in hand: `protect[slot] == protect_stamp`.
    protect: Vec<u32>,
    protect_stamp: u32,
    events: TierEvents,
    totals: TierEvents,
    /// Offers that could not be stored (vLLM's "store allocation failures").
    store_failures: u64,
}

impl CpuOffloadManager {
    pub fn new(num_chunks: u32, policy: OffloadPolicyKind) -> Self {
        let n = num_chunks as usize;
        CpuOffloadManager {
            num_chunks,
            num_allocated: 0,
            free_list: Vec::new(),
            index: KeyIndex::default(),
            keys: vec![0; n],
            ref_cnt: vec![EMPTY; n],
            num_evictable: 0,
            num_write_pending: 0,
            policy: policy.build(num_chunks),
            protect: vec![0; n],
            protect_stamp: 0,
            events: TierEvents::default(),
            totals: TierEvents::default(),
            store_failures: 0,
        }
    }

    pub fn num_chunks(&self) -> u32 {
        self.num_chunks
    }

    pub fn policy_kind(&self) -> OffloadPolicyKind {
        self.policy.kind()
    }

    pub fn policy(&self) -> &ChunkPolicy {
        &self.policy
    }

    /// Resident chunks (stored or being stored).
    pub fn num_resident(&self) -> u32 {
        self.index.len() as u32
    }

    pub fn num_evictable(&self) -> u32 {
        self.num_evictable
    }

    pub fn num_write_pending(&self) -> u32 {
        self.num_write_pending
    }

    pub fn store_failures(&self) -> u64 {
        self.store_failures
    }

    fn num_free(&self) -> u32 {
        self.free_list.len() as u32 + self.num_chunks - self.num_allocated
    }

    /// The slot holding `key`, stored or being stored.
    #[inline]
    pub fn slot_of(&self, key: u64) -> Option<u32> {
        self.index.get(key, &self.keys)
    }

    #[inline]
    pub fn lookup(&self, key: u64) -> LookupResult {
        match self.slot_of(key) {
            None => LookupResult::Miss,
            Some(s) if self.ref_cnt[s as usize] == PENDING => LookupResult::HitPending,
            Some(_) => LookupResult::Hit,
        }
    }

    /// vLLM's `_record_request_cache_access`: the chunks `req` observes (position, and slot
    /// when resident, as the caller found it in the index), the first observations told to
    /// the policy; `reused` positions count as reuses.
    fn record_access(
        &mut self,
        req: &mut RequestAccess,
        observed: &[(u32, Option<u32>)],
        reused: impl Iterator<Item = u32>,
    ) {
        let new: Vec<(u32, Option<u32>)> = observed
            .iter()
            .copied()
            .filter(|&(idx, _)| req.observe(idx))
            .collect();
        if !new.is_empty() {
            self.policy.on_request_access(&new, req);
        }
        for idx in reused {
            req.mark_reused(idx);
        }
    }

    /// vLLM's `prepare_store` for one offer (position, key), in chunk order.
    pub fn prepare_store(
        &mut self,
        req: &mut RequestAccess,
        offer: &[(u32, u64)],
    ) -> Option<StoreOutput> {
        let mut to_store: Vec<(u32, u64)> = Vec::new();
        let mut ready: Vec<u32> = Vec::new();
        // (position, slot) of the chunks the request observes: all but those another request
        // is storing. Found once here; nothing below changes the index before they are
        // recorded.
        let mut observed: Vec<(u32, Option<u32>)> = Vec::with_capacity(offer.len());
        // The slots of the offered keys already resident, whatever their state: what an
        // eviction to make room must spare.
        let mut resident: Vec<u32> = Vec::new();
        for &(idx, key) in offer {
            match self.slot_of(key) {
                None => {
                    to_store.push((idx, key));
                    observed.push((idx, None));
                }
                Some(s) => {
                    resident.push(s);
                    if self.ref_cnt[s as usize] >= 0 {
                        ready.push(idx);
                        observed.push((idx, Some(s)));
                    }
                }
            }
        }
        // ARC learns from ghosts before the inserts below drop them; once per key per request.
        let new_misses: Vec<u64> = to_store
            .iter()
            .filter(|&&(idx, _)| !req.store_missed(idx))
            .map(|&(_, k)| k)
            .collect();
        if !new_misses.is_empty() {
            self.policy.on_store_miss(&new_misses);
            for &(idx, _) in &to_store {
                req.mark_store_miss(idx);
            }
        }
        // Recorded before any early return.
        self.record_access(req, &observed, ready.iter().copied());
        if to_store.is_empty() {
            return Some(StoreOutput::default());
        }
        let evicted = self.make_room(to_store.len() as u32, &resident);
        let Some(evicted) = evicted else {
            self.store_failures += 1;
            return None;
        };
        let mut stored = Vec::with_capacity(to_store.len());
        for &(idx, key) in &to_store {
            let slot = self.allocate_slot();
            self.keys[slot as usize] = key;
            self.index.insert(key, slot, &self.keys);
            self.ref_cnt[slot as usize] = PENDING;
            self.policy.insert(slot, key, idx, req);
            req.mark_inserted(idx);
            stored.push((idx, slot));
        }
        self.num_write_pending += stored.len() as u32;
        Some(StoreOutput { stored, evicted })
    }

    /// Frees enough slots for `n` new chunks, evicting the shortage (never one of `spared`, the
    /// slots of the offer's resident keys, as `prepare_store` found them: nothing changes the
    /// index between). Returns the chunks evicted, or None when the shortage cannot be evicted.
    fn make_room(&mut self, n: u32, spared: &[u32]) -> Option<u32> {
        let free = self.num_free();
        if n <= free {
            return Some(0);
        }
        let shortage = n - free;
        if shortage > self.num_evictable {
            return None;
        }
        self.protect_stamp = self.protect_stamp.wrapping_add(1);
        if self.protect_stamp == 0 {
            self.protect.fill(0);
            self.protect_stamp = 1;
        }
        let mut protected_evictable = 0;
        for &s in spared {
            debug_assert_eq!(self.slot_of(self.keys[s as usize]), Some(s));
            self.protect[s as usize] = self.protect_stamp;
            protected_evictable += (self.ref_cnt[s as usize] == 0) as u32;
        }
        if shortage > self.num_evictable - protected_evictable {
            return None;
        }
        let (protect, stamp, keys) = (&self.protect, self.protect_stamp, &self.keys);
        let evicted = self
            .policy
            .evict(shortage, &|c| protect[c as usize] == stamp, &|c| {
                keys[c as usize]
            })
            .expect("enough unprotected chunks are evictable");
        for &slot in &evicted {
            debug_assert_eq!(self.ref_cnt[slot as usize], 0);
            self.release_slot(slot);
        }
        self.num_evictable -= shortage;
        self.events.evicted += shortage as u64;
        self.totals.evicted += shortage as u64;
        Some(shortage)
    }

    /// A free slot: a fresh one while any is left, else the one freed last.
    fn allocate_slot(&mut self) -> u32 {
        if self.num_allocated < self.num_chunks {
            self.num_allocated += 1;
            self.num_allocated - 1
        } else {
            self.free_list.pop().expect("a free slot")
        }
    }

    fn release_slot(&mut self, slot: u32) {
        let removed = self.index.remove(self.keys[slot as usize], slot);
        debug_assert!(removed, "slot {slot} was not in the index");
        self.ref_cnt[slot as usize] = EMPTY;
        self.free_list.push(slot);
    }

    /// vLLM's `complete_store` of one job's chunks (key, slot): ready (and evictable) on
    /// success; gone on failure (gpumem's executor refused the copy).
    pub fn complete_store(&mut self, chunks: &[(u64, u32)], success: bool) {
        for &(key, slot) in chunks {
            // Still this job's pending chunk. The index holds exactly each occupied slot's key
            // (`check_invariants`), so a pending slot that still has this key is the one the
            // index names: no lookup.
            if self.ref_cnt[slot as usize] != PENDING || self.keys[slot as usize] != key {
                continue;
            }
            debug_assert_eq!(self.slot_of(key), Some(slot));
            self.num_write_pending -= 1;
            if success {
                self.ref_cnt[slot as usize] = 0;
                self.num_evictable += 1;
                self.policy.mark_evictable(slot);
                self.events.stored += 1;
                self.totals.stored += 1;
            } else {
                self.policy.remove(slot);
                self.release_slot(slot);
                self.events.dropped += 1;
                self.totals.dropped += 1;
            }
        }
    }

    /// vLLM's `prepare_load`: pins the ready chunks of `keys` (position, key) for reading and
    /// records them as reused. Returns their slots.
    pub fn prepare_load(&mut self, req: &mut RequestAccess, keys: &[(u32, u64)]) -> Vec<u32> {
        let mut slots = Vec::with_capacity(keys.len());
        for &(_, key) in keys {
            let slot = self.slot_of(key).expect("a chunk to load is resident");
            let rc = &mut self.ref_cnt[slot as usize];
            assert!(*rc >= 0, "a chunk to load is ready");
            if *rc == 0 {
                self.policy.mark_non_evictable(slot);
                self.num_evictable -= 1;
            }
            *rc += 1;
            slots.push(slot);
        }
        let observed: Vec<(u32, Option<u32>)> = keys
            .iter()
            .zip(&slots)
            .map(|(&(idx, _), &slot)| (idx, Some(slot)))
            .collect();
        self.record_access(req, &observed, keys.iter().map(|&(i, _)| i));
        slots
    }

    /// Pins the ready chunk holding `key` for a read that is no request's (gpumem's prefetch):
    /// nothing is recorded for the eviction policy. Its slot, or None unless it is ready.
    pub fn pin_ready(&mut self, key: u64) -> Option<u32> {
        let slot = self.slot_of(key)?;
        let rc = &mut self.ref_cnt[slot as usize];
        if *rc < 0 {
            return None;
        }
        if *rc == 0 {
            self.policy.mark_non_evictable(slot);
            self.num_evictable -= 1;
        }
        *rc += 1;
        Some(slot)
    }

    /// vLLM's `complete_load`: unpins.
    pub fn complete_load(&mut self, slots: &[u32]) {
        for &slot in slots {
            let rc = &mut self.ref_cnt[slot as usize];
            assert!(*rc > 0, "a chunk being loaded is pinned");
            *rc -= 1;
            if *rc == 0 {
                self.num_evictable += 1;
                self.policy.mark_evictable(slot);
            }
        }
    }

    /// Drops a ready, unpinned chunk whose bytes proved wrong (gpumem's executor): it is never
    /// served again.
    pub fn drop_chunk(&mut self, key: u64, slot: u32) {
        if self.slot_of(key) != Some(slot) || self.ref_cnt[slot as usize] != 0 {
            return;
        }
        self.policy.mark_non_evictable(slot);
        self.num_evictable -= 1;
        self.policy.remove(slot);
        self.release_slot(slot);
        self.events.dropped += 1;
        self.totals.dropped += 1;
    }

    /// vLLM's `on_request_finished`: the policy commits what `req` did, once; `key_at` names
    /// the request's key at each position it observed.
    pub fn on_request_finished(&mut self, req: &mut RequestAccess, key_at: &dyn Fn(u32) -> u64) {
        if req.finished {
            return;
        }
        req.finished = true;
        let mut walk = Vec::new();
        for idx in req.observed_desc() {
            if let Some(chunk) = self.slot_of(key_at(idx)) {
                let reused = req.reused(idx);
                walk.push(FinishedChunk {
                    chunk,
                    insertion_only: req.inserted(idx) && !reused,
                    reused,
                });
            }
        }
        self.policy.on_request_finished(&walk, req);
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> TierEvents {
        std::mem::take(&mut self.events)
    }

    /// Events of the whole run.
    pub fn totals(&self) -> TierEvents {
        self.totals
    }

    /// The full walk: index and slots agree, counts agree, the free slots are exactly the
    /// unused ones, and the policy's own structure.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut resident = 0;
        let (mut evictable, mut pending) = (0, 0);
        for slot in 0..self.num_chunks {
            let rc = self.ref_cnt[slot as usize];
            if rc == EMPTY {
                continue;
            }
            if slot >= self.num_allocated {
                return Err(format!(
                    "cpu tier: slot {slot} holds a chunk but was never allocated"
                ));
            }
            resident += 1;
            let key = self.keys[slot as usize];
            if self.slot_of(key) != Some(slot) {
                return Err(format!(
                    "cpu tier: slot {slot}'s key {key:#x} points elsewhere"
                ));
            }
            match rc {
                PENDING => pending += 1,
                0 => evictable += 1,
                r if r > 0 => {}
                r => return Err(format!("cpu tier: slot {slot} has reference count {r}")),
            }
        }
        if let Some(s) = self
            .index
            .slots()
            .find(|&s| s >= self.num_chunks || self.ref_cnt[s as usize] == EMPTY)
        {
            return Err(format!(
                "cpu tier: the index files slot {s}, which holds no chunk"
            ));
        }
        if resident != self.index.len() {
            return Err(format!(
                "cpu tier: {resident} slots hold chunks, the index has {}",
                self.index.len()
            ));
        }
        if (evictable, pending) != (self.num_evictable, self.num_write_pending) {
            return Err(format!(
                "cpu tier: {evictable} evictable and {pending} pending, counted {} and {}",
                self.num_evictable, self.num_write_pending
            ));
        }
        let mut free: Vec<u32> = self.free_list.clone();
        free.sort_unstable();
        free.dedup();
        if free.len() != self.free_list.len()
            || free
                .iter()
                .any(|&s| s >= self.num_allocated || self.ref_cnt[s as usize] != EMPTY)
        {
            return Err("cpu tier: the free list holds a slot twice or one in use".into());
        }
        if resident as u32 + free.len() as u32 != self.num_allocated {
            return Err("cpu tier: allocated slots are neither free nor resident".into());
        }
        self.policy.check(
            &|c| (self.ref_cnt[c as usize] != EMPTY).then(|| self.keys[c as usize]),
            &|c| self.ref_cnt[c as usize] == 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(keys: &[u64]) -> Vec<(u32, u64)> {
        keys.iter()
            .enumerate()
            .map(|(i, &k)| (i as u32, k))
            .collect()
    }

    /// The oracle's first steps of a 6-chunk tier: A stores 4 chunks; B's 4 cannot be stored
    /// while A's are pending (2 free, the 4 pending not evictable); once A's complete, B's store
    /// evicts exactly 2 of them, A's tail first.
    #[test]
    fn store_evicts_exactly_the_shortage_tail_first() {
        let mut m = CpuOffloadManager::new(6, OffloadPolicyKind::Lru);
        let mut a = RequestAccess::new();
        let mut b = RequestAccess::new();
        let ka = offer(&[10, 11, 12, 13]);
        let kb = offer(&[20, 21, 22, 23]);
        let out = m.prepare_store(&mut a, &ka).unwrap();
        assert_eq!(out.stored, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(m.lookup(12), LookupResult::HitPending);
        assert_eq!(m.prepare_store(&mut b, &kb), None);
        assert_eq!(m.store_failures(), 1);
        let done: Vec<(u64, u32)> = ka.iter().zip(0..).map(|(&(_, k), s)| (k, s)).collect();
        m.complete_store(&done, true);
        assert_eq!(m.take_events().stored, 4);
        assert_eq!(m.lookup(12), LookupResult::Hit);
        let out = m.prepare_store(&mut b, &kb).unwrap();
        assert_eq!(out.evicted, 2);
        // Fresh slots 4 and 5, then the slots freed last first: A's 2 (evicted second), 3.
        assert_eq!(out.stored, vec![(0, 4), (1, 5), (2, 2), (3, 3)]);
        assert_eq!(m.lookup(13), LookupResult::Miss);
        assert_eq!(m.lookup(11), LookupResult::Hit);
        m.check_invariants().unwrap();
        // A finishes: its resident head chunks get fresh ranks.
        m.on_request_finished(&mut a, &|i| ka[i as usize].1);
        m.check_invariants().unwrap();
    }

    #[test]
    fn loads_pin_and_protected_keys_are_never_evicted() {
        for policy in OffloadPolicyKind::ALL {
            let mut m = CpuOffloadManager::new(3, policy);
            let mut a = RequestAccess::new();
            let k = offer(&[1, 2, 3]);
            m.prepare_store(&mut a, &k).unwrap();
            m.complete_store(&[(1, 0), (2, 1), (3, 2)], true);
            m.on_request_finished(&mut a, &|i| k[i as usize].1);
            let mut b = RequestAccess::new();
            let pinned = m.prepare_load(&mut b, &[(0, 1)]);
            assert_eq!(pinned, vec![0]);
            assert_eq!(m.num_evictable(), 2);
            // C offers [2, 3, 9]: 9 needs a slot; 2 and 3 are its own offer, 1 is pinned.
            let mut c = RequestAccess::new();
            assert_eq!(
                m.prepare_store(&mut c, &[(0, 2), (1, 3), (2, 9)]),
                None,
                "{policy}"
            );
            m.complete_load(&pinned);
            let out = m.prepare_store(&mut c, &[(0, 2), (1, 3), (2, 9)]).unwrap();
            assert_eq!(
                (out.evicted, out.stored.clone()),
                (1, vec![(2, 0)]),
                "{policy}"
            );
            assert_eq!(m.lookup(1), LookupResult::Miss);
            m.check_invariants().unwrap();
        }
    }
}
