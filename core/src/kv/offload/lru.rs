//! vLLM 0.33.0's `LRUCachePolicy` for the CPU tier (`kv_offload/cpu/policies/lru.py`), the
//! same order without its lazy heap.
//!
//! Every resident chunk has a rank; eviction takes the smallest ranks among the evictable
//! chunks (ready, not being loaded), skipping the chunks of the offer being stored. Ranks:
//! - a request takes the next counter value `R` when the policy first sees it; a chunk it
//!   stores or reads gets `(R, -position)` if that is higher than its rank (so within a
//!   request the tail goes before the head);
//! - when the request finishes, each of its resident chunks gets a fresh counter value, tail
//!   first, so its head becomes the newest.
//!
//! Where the evictable chunks wait, by the kind of their rank (each kind in rank order):
//! - `(R, -position)`: the bucket of request `R`, a set of positions whose largest member is
//!   the bucket's smallest rank; non-empty buckets are kept by `R`. A request's bucket is
//!   emptied when it finishes (all its chunks get fresh ranks), so buckets are few.
//! - fresh ranks: mostly handed out in increasing order, so a queue (`fresh`); a chunk that
//!   becomes evictable again under an older fresh rank (a load or a store completed after
//!   newer ranks were handed out) goes to a small heap (`late`) instead.
//!
//! Queue and heap entries are invalidated lazily (an entry counts only while its chunk is
//! evictable under exactly that rank) and compacted when stale entries outnumber live ones.
//! Every operation is O(1), or O(log n) for the heap and the set of buckets.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use super::access::RequestAccess;
use super::idx_set::IdxSet;

/// `sub` of a fresh rank `(counter, 0)`: above every `-position`.
const FRESH: u32 = u32::MAX;

/// A rank, ordered as vLLM's `(int, int)` tuples: `(hi, -position)` is `(hi, FRESH - 1 -
/// position)` here, `(hi, 0)` is `(hi, FRESH)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    pub hi: u64,
    pub sub: u32,
}

impl Rank {
    fn of_request(r: u64, idx: u32) -> Rank {
        Rank {
            hi: r,
            sub: FRESH - 1 - idx,
        }
    }

    fn fresh(hi: u64) -> Rank {
        Rank { hi, sub: FRESH }
    }

    fn is_fresh(self) -> bool {
        self.sub == FRESH
    }

    /// The position of a request rank.
    fn idx(self) -> u32 {
        FRESH - 1 - self.sub
    }
}

/// The evictable chunks ranked `(R, -position)` of one request `R`.
#[derive(Clone, Debug, Default)]
struct Bucket {
    positions: IdxSet,
    /// The chunk slot at each position in `positions`.
    chunk_at: Vec<u32>,
}

/// Per chunk slot: the rank's fields beside the flags, 16 bytes where a `Rank` field (padded
/// to 16) made 24. Eviction reads the slot of every queue entry it meets, at random, over a
/// tier of up to millions of slots.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    rank_hi: u64,
    rank_sub: u32,
    resident: bool,
    evictable: bool,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16);

impl Slot {
    fn new(rank: Rank, resident: bool, evictable: bool) -> Self {
        Slot {
            rank_hi: rank.hi,
            rank_sub: rank.sub,
            resident,
            evictable,
        }
    }

    #[inline]
    fn rank(&self) -> Rank {
        Rank {
            hi: self.rank_hi,
            sub: self.rank_sub,
        }
    }

    #[inline]
    fn set_rank(&mut self, rank: Rank) {
        self.rank_hi = rank.hi;
        self.rank_sub = rank.sub;
    }
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct OffloadLru {
    next_rank: u64,
    slots: Vec<Slot>,
    fresh: VecDeque<(u64, u32)>,
    /// Highest fresh rank ever queued in `fresh`.
    fresh_last: u64,
    late: BinaryHeap<Reverse<(u64, u32)>>,
    /// By `R`: a bucket per request that has a rank and has not finished.
    buckets: BTreeMap<u64, Bucket>,
    /// `R` of every bucket with an evictable chunk.
    nonempty: BTreeSet<u64>,
    num_evictable: u32,
}

impl OffloadLru {
    pub fn new(num_chunks: u32) -> Self {
        OffloadLru {
            slots: vec![Slot::default(); num_chunks as usize],
            ..OffloadLru::default()
        }
    }

    fn request_rank(&mut self, req: &mut RequestAccess) -> u64 {
        *req.lru_rank.get_or_insert_with(|| {
            self.next_rank += 1;
            self.next_rank
        })
    }

    /// `chunk` (a new store of position `idx` of `req`) is resident, not yet evictable.
    pub fn insert(&mut self, chunk: u32, idx: u32, req: &mut RequestAccess) {
        let r = self.request_rank(req);
        self.slots[chunk as usize] = Slot::new(Rank::of_request(r, idx), true, false);
    }

    /// `chunk` leaves the tier without being evicted (a failed store).
    pub fn remove(&mut self, chunk: u32) {
        self.unplace(chunk);
        self.slots[chunk as usize] = Slot::default();
    }

    /// vLLM's `on_request_access` for the chunks `req` observes for the first time, given as
    /// (position, slot if resident).
    pub fn on_request_access(&mut self, new: &[(u32, Option<u32>)], req: &mut RequestAccess) {
        let r = self.request_rank(req);
        for &(idx, chunk) in new {
            let Some(chunk) = chunk else { continue };
            let rank = Rank::of_request(r, idx);
            if self.slots[chunk as usize].rank() < rank {
                self.set_rank(chunk, rank);
            }
        }
    }

    /// vLLM's `on_request_finished`: each resident chunk of `tail_to_head` gets a fresh rank,
    /// in that order. `req`'s bucket is empty afterwards and goes.
    pub fn on_request_finished(&mut self, tail_to_head: &[u32], req: &RequestAccess) {
        for &chunk in tail_to_head {
            self.next_rank += 1;
            self.set_rank(chunk, Rank::fresh(self.next_rank));
        }
        if let Some(r) = req.lru_rank {
            if let Some(b) = self.buckets.remove(&r) {
                debug_assert!(
                    b.positions.is_empty(),
                    "request {r} left chunks in its bucket"
                );
            }
            self.nonempty.remove(&r);
        }
    }

    pub fn mark_evictable(&mut self, chunk: u32) {
        let s = &mut self.slots[chunk as usize];
        debug_assert!(s.resident && !s.evictable);
        s.evictable = true;
        self.num_evictable += 1;
        self.place(chunk);
    }

    pub fn mark_non_evictable(&mut self, chunk: u32) {
        debug_assert!(self.slots[chunk as usize].evictable);
        self.unplace(chunk);
        self.slots[chunk as usize].evictable = false;
        self.num_evictable -= 1;
    }

    fn set_rank(&mut self, chunk: u32, rank: Rank) {
        let evictable = self.slots[chunk as usize].evictable;
        if evictable {
            self.unplace(chunk);
        }
        self.slots[chunk as usize].set_rank(rank);
        if evictable {
            self.place(chunk);
        }
    }

    /// Files an evictable chunk under its rank.
    fn place(&mut self, chunk: u32) {
        let rank = self.slots[chunk as usize].rank();
        if rank.is_fresh() {
            if rank.hi > self.fresh_last {
                self.fresh.push_back((rank.hi, chunk));
                self.fresh_last = rank.hi;
            } else {
                self.late.push(Reverse((rank.hi, chunk)));
            }
            self.compact();
        } else {
            let b = self.buckets.entry(rank.hi).or_default();
            let idx = rank.idx();
            if b.positions.is_empty() {
                self.nonempty.insert(rank.hi);
            }
            b.positions.insert(idx);
            if b.chunk_at.len() <= idx as usize {
                b.chunk_at.resize(idx as usize + 1, 0);
            }
            b.chunk_at[idx as usize] = chunk;
        }
    }

    /// Takes an evictable chunk out of its place (queue and heap entries go stale by
    /// themselves once the slot is no longer evictable under that rank).
    fn unplace(&mut self, chunk: u32) {
        let s = self.slots[chunk as usize];
        let rank = s.rank();
        if !s.evictable || rank.is_fresh() {
            return;
        }
        let b = self
            .buckets
            .get_mut(&rank.hi)
            .expect("a live request's bucket");
        b.positions.remove(rank.idx());
        if b.positions.is_empty() {
            self.nonempty.remove(&rank.hi);
        }
    }

    /// A queue or heap entry still names an evictable chunk under that fresh rank.
    fn current(&self, hi: u64, chunk: u32) -> bool {
        let s = self.slots[chunk as usize];
        s.evictable && s.rank() == Rank::fresh(hi)
    }

    /// Drops stale entries once they outnumber the live ones (vLLM compacts its heap alike).
    fn compact(&mut self) {
        let limit = 2 * self.num_evictable as usize + 64;
        if self.fresh.len() > limit {
            let slots = &self.slots;
            self.fresh.retain(|&(hi, c)| {
                slots[c as usize].evictable && slots[c as usize].rank() == Rank::fresh(hi)
            });
        }
        if self.late.len() > limit {
            let slots = &self.slots;
            let live: Vec<Reverse<(u64, u32)>> = self
                .late
                .drain()
                .filter(|Reverse((hi, c))| {
                    slots[*c as usize].evictable && slots[*c as usize].rank() == Rank::fresh(*hi)
                })
                .collect();
            self.late = live.into();
        }
    }

    /// Evicts the `n` smallest-ranked evictable chunks not `protected`; the caller has checked
    /// that there are that many. Returns their slots, smallest rank first.
    pub fn evict(&mut self, n: u32, protected: &dyn Fn(u32) -> bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(n as usize);
        // Protected queue and heap entries set aside during this call, put back after.
        let mut deferred: Vec<(u64, u32)> = Vec::new();
        // Per bucket: positions at or above this one are protected (skipped this call).
        let mut bucket_below: Vec<(u64, u32)> = Vec::new();
        while (out.len() as u32) < n {
            while let Some(&(hi, c)) = self.fresh.front() {
                if self.current(hi, c) {
                    break;
                }
                self.fresh.pop_front();
            }
            while let Some(&Reverse((hi, c))) = self.late.peek() {
                if self.current(hi, c) {
                    break;
                }
                self.late.pop();
            }
            let queue = self.fresh.front().map(|&(hi, c)| (Rank::fresh(hi), c));
            let heap = self
                .late
                .peek()
                .map(|&Reverse((hi, c))| (Rank::fresh(hi), c));
            let bucket = self.bucket_candidate(&mut bucket_below, protected);
            let best = [queue, heap, bucket]
                .into_iter()
                .flatten()
                .min_by_key(|&(rank, _)| rank)
                .expect("the caller checked that enough chunks are evictable");
            let (rank, chunk) = best;
            if rank.is_fresh() {
                if queue.is_some_and(|q| q.0 == rank) {
                    self.fresh.pop_front();
                } else {
                    self.late.pop();
                }
                if protected(chunk) {
                    deferred.push((rank.hi, chunk));
                    continue;
                }
            }
            // Bucket candidates are never protected (skipped above).
            self.unplace(chunk);
            self.slots[chunk as usize] = Slot::default();
            self.num_evictable -= 1;
            out.push(chunk);
        }
        for (hi, c) in deferred {
            self.late.push(Reverse((hi, c)));
        }
        out
    }

    /// The smallest-ranked unprotected chunk in a bucket: the largest position below the
    /// call's protected mark in the first bucket that has one.
    fn bucket_candidate(
        &self,
        below: &mut Vec<(u64, u32)>,
        protected: &dyn Fn(u32) -> bool,
    ) -> Option<(Rank, u32)> {
        for &r in &self.nonempty {
            let b = &self.buckets[&r];
            let mut mark = below
                .iter()
                .find(|(x, _)| *x == r)
                .map_or(u32::MAX, |&(_, m)| m);
            let mut found = None;
            let mut next = if mark == u32::MAX {
                b.positions.max()
            } else {
                b.positions.max_below(mark)
            };
            while let Some(idx) = next {
                let chunk = b.chunk_at[idx as usize];
                if !protected(chunk) {
                    found = Some((Rank::of_request(r, idx), chunk));
                    break;
                }
                mark = idx;
                next = b.positions.max_below(idx);
            }
            if mark != u32::MAX {
                match below.iter_mut().find(|(x, _)| *x == r) {
                    Some(e) => e.1 = mark,
                    None => below.push((r, mark)),
                }
            }
            if found.is_some() {
                return found;
            }
        }
        None
    }

    pub fn num_evictable(&self) -> u32 {
        self.num_evictable
    }

    /// The evictable chunks in eviction order (tests).
    pub fn order(&self) -> Vec<u32> {
        let mut all: Vec<(Rank, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.evictable)
            .map(|(c, s)| (s.rank(), c as u32))
            .collect();
        all.sort();
        all.into_iter().map(|(_, c)| c).collect()
    }

    /// The rank of a resident chunk (tests).
    pub fn rank(&self, chunk: u32) -> Option<Rank> {
        let s = self.slots[chunk as usize];
        s.resident.then_some(s.rank())
    }

    /// Every evictable chunk is filed exactly where its rank says; counts agree.
    pub fn check(
        &self,
        resident: &dyn Fn(u32) -> bool,
        evictable: &dyn Fn(u32) -> bool,
    ) -> Result<(), String> {
        let mut n = 0;
        for (c, s) in self.slots.iter().enumerate() {
            let c = c as u32;
            if s.resident != resident(c) {
                return Err(format!(
                    "lru: slot {c} resident {} in the policy",
                    s.resident
                ));
            }
            if s.evictable != evictable(c) {
                return Err(format!(
                    "lru: slot {c} evictable {} in the policy",
                    s.evictable
                ));
            }
            if !s.evictable {
                continue;
            }
            n += 1;
            let rank = s.rank();
            if rank.is_fresh() {
                let queued = self.fresh.iter().any(|&(hi, x)| x == c && hi == rank.hi);
                let heaped = self
                    .late
                    .iter()
                    .any(|&Reverse((hi, x))| x == c && hi == rank.hi);
                if !queued && !heaped {
                    return Err(format!("lru: evictable slot {c} is filed nowhere"));
                }
            } else {
                let b = self
                    .buckets
                    .get(&rank.hi)
                    .ok_or_else(|| format!("lru: slot {c}: no bucket {}", rank.hi))?;
                if !b.positions.contains(rank.idx()) || b.chunk_at[rank.idx() as usize] != c {
                    return Err(format!("lru: slot {c} missing from bucket {}", rank.hi));
                }
            }
        }
        if n != self.num_evictable {
            return Err(format!(
                "lru: {n} evictable, counted {}",
                self.num_evictable
            ));
        }
        let in_buckets: u32 = self.buckets.values().map(|b| b.positions.len()).sum();
        let bucketed = self
            .slots
            .iter()
            .filter(|s| s.evictable && !s.rank().is_fresh())
            .count() as u32;
        if in_buckets != bucketed {
            return Err(format!(
                "lru: {in_buckets} bucket entries for {bucketed} chunks"
            ));
        }
        for (r, b) in &self.buckets {
            if b.positions.is_empty() == self.nonempty.contains(r) {
                return Err(format!("lru: bucket {r} emptiness misfiled"));
            }
        }
        let mut last = 0;
        for &(hi, _) in &self.fresh {
            if hi <= last {
                return Err("lru: the fresh queue is out of order".into());
            }
            last = hi;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM's worked order: a request's chunks go tail first; on finish its head is newest.
    #[test]
    fn tail_before_head_then_finish_makes_the_head_newest() {
        let mut lru = OffloadLru::new(8);
        let mut a = RequestAccess::new();
        for (chunk, idx) in [(0, 0), (1, 1), (2, 2)] {
            lru.on_request_access(&[(idx, None)], &mut a);
            lru.insert(chunk, idx, &mut a);
            lru.mark_evictable(chunk);
        }
        assert_eq!(lru.order(), vec![2, 1, 0]);
        let mut b = RequestAccess::new();
        lru.on_request_access(&[(0, Some(3))], &mut b);
        lru.insert(3, 0, &mut b);
        lru.mark_evictable(3);
        // B's rank is newer than A's.
        assert_eq!(lru.order(), vec![2, 1, 0, 3]);
        // A finishes: fresh ranks tail first, so 0 (its head) is newest of all.
        lru.on_request_finished(&[2, 1, 0], &a);
        assert_eq!(lru.order(), vec![3, 2, 1, 0]);
        lru.check(&|c| c < 4, &|c| c < 4).unwrap();
        let none = |_: u32| false;
        assert_eq!(lru.evict(2, &none), vec![3, 2]);
        let protect_1 = |c: u32| c == 1;
        assert_eq!(lru.evict(1, &protect_1), vec![0]);
        assert_eq!(lru.order(), vec![1]);
        lru.check(&|c| c == 1, &|c| c == 1).unwrap();
    }

    #[test]
    fn a_chunk_evictable_again_returns_to_its_old_place() {
        let mut lru = OffloadLru::new(4);
        let mut a = RequestAccess::new();
        lru.on_request_access(&[(0, None), (1, None)], &mut a);
        lru.insert(0, 0, &mut a);
        lru.insert(1, 1, &mut a);
        lru.on_request_finished(&[1, 0], &a);
        lru.mark_evictable(0);
        let mut b = RequestAccess::new();
        lru.on_request_access(&[(0, None)], &mut b);
        lru.insert(2, 0, &mut b);
        lru.on_request_finished(&[2], &b);
        lru.mark_evictable(2);
        // Chunk 1's store completes late: its fresh rank is older than chunk 2's.
        lru.mark_evictable(1);
        assert_eq!(lru.order(), vec![1, 0, 2]);
        let none = |_: u32| false;
        assert_eq!(lru.evict(3, &none), vec![1, 0, 2]);
    }
}
