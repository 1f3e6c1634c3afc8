//! vLLM 0.33.0's `ARCCachePolicy` for the CPU tier (`kv_offload/cpu/policies/arc.py`).
//!
//! Resident chunks are in T1 (stored, not reused since) or T2 (reused by a request that has
//! finished); B1 and B2 hold the keys lately evicted from each (ghosts, at most the capacity
//! each). New chunks enter T1. When a request finishes, walking its chunks tail to head, the
//! ones it only inserted move to the most recent end of their list and the ready ones it
//! reused move to T2's most recent end. A store miss whose key is a ghost adapts the target
//! size of T1 (up for B1, down for B2, by `max(1, |other| / |this|)`). Eviction takes T1's
//! least recent evictable chunk while T1 holds at least `int(target)` chunks (counting the
//! ones taken in this call), else T2's, and falls back to the other list.
//!
//! The target is a float because vLLM's is: IEEE-754 division, addition and comparison are
//! exact to the last bit on every machine, so the decisions are vLLM's and deterministic.
//!
//! Order within a list is a sequence number taken at each move to the recent end; the
//! evictable chunks of each list are kept by it (`BTreeMap`), so an eviction walks only
//! chunks it may take. O(log n) per operation.

use std::collections::BTreeMap;

use crate::kv::hash::HashKeyHasher;

type GhostMap =
    std::collections::HashMap<u64, (bool, u64), std::hash::BuildHasherDefault<HashKeyHasher>>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum List {
    #[default]
    None,
    T1,
    T2,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    list: List,
    seq: u64,
    evictable: bool,
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct OffloadArc {
    capacity: u64,
    target_t1: f64,
    next_seq: u64,
    slots: Vec<Slot>,
    t1_len: u64,
    t2_len: u64,
    t1_evictable: BTreeMap<u64, u32>,
    t2_evictable: BTreeMap<u64, u32>,
    /// Ghost key → (in B1, sequence number).
    ghosts: GhostMap,
    b1: BTreeMap<u64, u64>,
    b2: BTreeMap<u64, u64>,
}

impl OffloadArc {
    pub fn new(num_chunks: u32) -> Self {
        OffloadArc {
            capacity: num_chunks as u64,
            slots: vec![Slot::default(); num_chunks as usize],
            ..OffloadArc::default()
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn evictable_of(&mut self, list: List) -> &mut BTreeMap<u64, u32> {
        match list {
            List::T1 => &mut self.t1_evictable,
            List::T2 => &mut self.t2_evictable,
            List::None => unreachable!("a resident chunk is in T1 or T2"),
        }
    }

    /// Moves `chunk` to the recent end of `list` (taking it from where it is).
    fn move_to_end(&mut self, chunk: u32, list: List) {
        let s = self.slots[chunk as usize];
        if s.evictable {
            self.evictable_of(s.list).remove(&s.seq);
        }
        match s.list {
            List::T1 => self.t1_len -= 1,
            List::T2 => self.t2_len -= 1,
            List::None => {}
        }
        match list {
            List::T1 => self.t1_len += 1,
            List::T2 => self.t2_len += 1,
            List::None => {}
        }
        let seq = self.seq();
        self.slots[chunk as usize].list = list;
        self.slots[chunk as usize].seq = seq;
        if s.evictable && list != List::None {
            self.evictable_of(list).insert(seq, chunk);
        }
    }

    fn drop_ghost(&mut self, key: u64) {
        if let Some((in_b1, seq)) = self.ghosts.remove(&key) {
            if in_b1 {
                self.b1.remove(&seq);
            } else {
                self.b2.remove(&seq);
            }
        }
    }

    /// A new chunk (pending store) enters T1; its key stops being a ghost.
    pub fn insert(&mut self, chunk: u32, key: u64) {
        debug_assert_eq!(self.slots[chunk as usize].list, List::None);
        self.slots[chunk as usize].evictable = false;
        self.move_to_end(chunk, List::T1);
        self.drop_ghost(key);
    }

    /// `chunk` leaves the tier without becoming a ghost (a failed store).
    pub fn remove(&mut self, chunk: u32) {
        self.move_to_end(chunk, List::None);
        self.slots[chunk as usize] = Slot::default();
    }

    /// vLLM's `_adapt_to_ghost_hit`.
    fn adapt_to_ghost_hit(&mut self, key: u64) {
        let Some(&(in_b1, seq)) = self.ghosts.get(&key) else {
            return;
        };
        let (b1, b2) = (self.b1.len() as f64, self.b2.len() as f64);
        if in_b1 {
            let delta = f64::max(1.0, b2 / b1);
            self.target_t1 = f64::min(self.target_t1 + delta, self.capacity as f64);
            self.b1.remove(&seq);
        } else {
            let delta = f64::max(1.0, b1 / b2);
            self.target_t1 = f64::max(self.target_t1 - delta, 0.0);
            self.b2.remove(&seq);
        }
        let seq = self.seq();
        if in_b1 {
            self.b1.insert(seq, key);
        } else {
            self.b2.insert(seq, key);
        }
        self.ghosts.insert(key, (in_b1, seq));
    }

    /// vLLM's `on_store_miss`: the keys of one offer that are not resident, in offer order.
    pub fn on_store_miss(&mut self, keys: &[u64]) {
        for &k in keys.iter().rev() {
            self.adapt_to_ghost_hit(k);
        }
    }

    /// vLLM's `on_request_finished`, over the request's resident chunks tail to head: (slot,
    /// inserted only, reused).
    pub fn on_request_finished(&mut self, tail_to_head: &[(u32, bool, bool)]) {
        for &(chunk, insertion_only, reused) in tail_to_head {
            let list = self.slots[chunk as usize].list;
            if insertion_only {
                // A store is no frequency hit: recency only, in its own list.
                self.move_to_end(chunk, list);
            } else if reused {
                self.move_to_end(chunk, List::T2);
            }
        }
    }

    pub fn mark_evictable(&mut self, chunk: u32) {
        let s = self.slots[chunk as usize];
        debug_assert!(s.list != List::None && !s.evictable);
        self.slots[chunk as usize].evictable = true;
        self.evictable_of(s.list).insert(s.seq, chunk);
    }

    pub fn mark_non_evictable(&mut self, chunk: u32) {
        let s = self.slots[chunk as usize];
        debug_assert!(s.evictable);
        self.evictable_of(s.list).remove(&s.seq);
        self.slots[chunk as usize].evictable = false;
    }

    /// vLLM's `evict`: `n` chunks not `protected`, all or none; `key_of` names a slot's key
    /// (it becomes a ghost). Returns the slots in the order taken.
    pub fn evict(
        &mut self,
        n: u32,
        protected: &dyn Fn(u32) -> bool,
        key_of: &dyn Fn(u32) -> u64,
    ) -> Option<Vec<u32>> {
        let taken = self.select(n, protected)?;
        for &(chunk, from_t1) in &taken {
            let key = key_of(chunk);
            self.move_to_end(chunk, List::None);
            self.slots[chunk as usize] = Slot::default();
            let seq = self.seq();
            if from_t1 {
                self.b1.insert(seq, key);
            } else {
                self.b2.insert(seq, key);
            }
            self.ghosts.insert(key, (from_t1, seq));
        }
        for in_b1 in [true, false] {
            loop {
                let ghost = if in_b1 { &mut self.b1 } else { &mut self.b2 };
                if ghost.len() as u64 <= self.capacity {
                    break;
                }
                let (_, key) = ghost.pop_first().expect("a ghost");
                self.ghosts.remove(&key);
            }
        }
        Some(taken.into_iter().map(|(c, _)| c).collect())
    }

    /// The chunks `evict` takes, (slot, from T1), without taking them; None if there are not
    /// `n`. The two walks only go forward, as vLLM's iterators do.
    fn select(&self, n: u32, protected: &dyn Fn(u32) -> bool) -> Option<Vec<(u32, bool)>> {
        let mut taken: Vec<(u32, bool)> = Vec::with_capacity(n as usize);
        let mut virtual_t1 = self.t1_len;
        let target = self.target_t1 as u64; // Python's int(): toward zero, and it is >= 0
        let mut t1 = self
            .t1_evictable
            .values()
            .copied()
            .filter(|&c| !protected(c));
        let mut t2 = self
            .t2_evictable
            .values()
            .copied()
            .filter(|&c| !protected(c));
        for _ in 0..n {
            let mut candidate = None;
            if virtual_t1 >= target {
                if let Some(c) = t1.next() {
                    candidate = Some((c, true));
                    virtual_t1 = virtual_t1.saturating_sub(1);
                }
            }
            if candidate.is_none() {
                candidate = t2.next().map(|c| (c, false));
            }
            if candidate.is_none() {
                let c = t1.next()?;
                candidate = Some((c, true));
                virtual_t1 = virtual_t1.saturating_sub(1);
            }
            taken.extend(candidate);
        }
        Some(taken)
    }

    pub fn target_t1(&self) -> f64 {
        self.target_t1
    }

    /// (|T1|, |T2|, |B1|, |B2|).
    pub fn sizes(&self) -> (u64, u64, usize, usize) {
        (self.t1_len, self.t2_len, self.b1.len(), self.b2.len())
    }

    /// Lists and counts agree, ghosts are not resident, each ghost list within capacity.
    pub fn check(
        &self,
        resident_key: &dyn Fn(u32) -> Option<u64>,
        evictable: &dyn Fn(u32) -> bool,
    ) -> Result<(), String> {
        let (mut n1, mut n2) = (0, 0);
        for (c, s) in self.slots.iter().enumerate() {
            let c = c as u32;
            let key = resident_key(c);
            if (s.list != List::None) != key.is_some() {
                return Err(format!("arc: slot {c} residency differs"));
            }
            if s.evictable != evictable(c) {
                return Err(format!(
                    "arc: slot {c} evictable {} in the policy",
                    s.evictable
                ));
            }
            match s.list {
                List::T1 => n1 += 1,
                List::T2 => n2 += 1,
                List::None => continue,
            }
            if let Some(k) = key {
                if self.ghosts.contains_key(&k) {
                    return Err(format!("arc: resident key {k:#x} is also a ghost"));
                }
            }
            let map = if s.list == List::T1 {
                &self.t1_evictable
            } else {
                &self.t2_evictable
            };
            if s.evictable != (map.get(&s.seq) == Some(&c)) {
                return Err(format!("arc: slot {c} misfiled among the evictable"));
            }
        }
        if (n1, n2) != (self.t1_len, self.t2_len) {
            return Err(format!(
                "arc: |T1|,|T2| = {n1},{n2}, counted {},{}",
                self.t1_len, self.t2_len
            ));
        }
        if self.b1.len() + self.b2.len() != self.ghosts.len() {
            return Err("arc: ghost index and ghost lists disagree".into());
        }
        if self.b1.len() as u64 > self.capacity || self.b2.len() as u64 > self.capacity {
            return Err("arc: a ghost list exceeds the capacity".into());
        }
        if !(0.0..=self.capacity as f64).contains(&self.target_t1) {
            return Err(format!(
                "arc: target {} outside [0, capacity]",
                self.target_t1
            ));
        }
        Ok(())
    }
}
