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
//! A chunk only ever joins a list at its recent end and leaves from anywhere, and so does a
//! ghost: T1 and T2 are linked lists through the chunk slots, B1 and B2 linked lists over one
//! slab of ghosts indexed by key ([`KeyIndex`]). Every operation is O(1) and allocates nothing
//! once grown, save eviction, which walks T1 and T2 from their oldest ends past the chunks it
//! may not take (in flight, or of the offer being stored), as vLLM's own walk does. Those sit
//! mostly at T1's recent end (stores in flight), where the walk seldom reaches: on the whole
//! Mooncake trace this ran 2× faster than keeping the evictable chunks by sequence number in
//! `BTreeMap`s.

use super::key_index::KeyIndex;
use super::queue::{Link, Linked, Queue};

/// A ghost's links in its list, and which list.
#[derive(Clone, Copy, Debug, Default)]
struct GhostLink {
    link: Link,
    in_b1: bool,
}

impl Linked for GhostLink {
    fn link(&self) -> &Link {
        &self.link
    }

    fn link_mut(&mut self) -> &mut Link {
        &mut self.link
    }
}

/// B1 and B2 over one slab: a ghost's key, its links, the free entries, the index by key.
#[derive(Clone, Debug, Default)]
struct Ghosts {
    keys: Vec<u64>,
    links: Vec<GhostLink>,
    free: Vec<u32>,
    index: KeyIndex,
    b1: Queue,
    b2: Queue,
}

impl Ghosts {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn list(&self, in_b1: bool) -> &Queue {
        if in_b1 {
            &self.b1
        } else {
            &self.b2
        }
    }

    /// The ghost of `key`: (entry, in B1).
    fn find(&self, key: u64) -> Option<(u32, bool)> {
        let g = self.index.get(key, &self.keys)?;
        Some((g, self.links[g as usize].in_b1))
    }

    fn contains(&self, key: u64) -> bool {
        self.index.get(key, &self.keys).is_some()
    }

    fn link_at_end(&mut self, g: u32, in_b1: bool) {
        self.links[g as usize].in_b1 = in_b1;
        let list = if in_b1 { &mut self.b1 } else { &mut self.b2 };
        list.push_back(&mut self.links, g);
    }

    fn unlink(&mut self, g: u32) {
        let list = if self.links[g as usize].in_b1 {
            &mut self.b1
        } else {
            &mut self.b2
        };
        list.unlink(&mut self.links, g);
    }

    /// `key`, not a ghost, joins the recent end of B1 or B2.
    fn push(&mut self, key: u64, in_b1: bool) {
        let g = self.free.pop().unwrap_or_else(|| {
            self.keys.push(0);
            self.links.push(GhostLink::default());
            self.keys.len() as u32 - 1
        });
        self.keys[g as usize] = key;
        self.index.insert(key, g, &self.keys);
        self.link_at_end(g, in_b1);
    }

    /// The ghost entry `g` goes.
    fn remove(&mut self, g: u32) {
        self.unlink(g);
        let removed = self.index.remove(self.keys[g as usize], g);
        debug_assert!(removed, "ghost {g} was not in the index");
        self.free.push(g);
    }

    /// The ghost entry `g` moves to the recent end of its list.
    fn renew(&mut self, g: u32) {
        let in_b1 = self.links[g as usize].in_b1;
        self.unlink(g);
        self.link_at_end(g, in_b1);
    }

    /// The oldest ghost of B1 or B2 goes.
    fn pop_oldest(&mut self, in_b1: bool) {
        let g = self.list(in_b1).front().expect("a ghost to drop");
        self.remove(g);
    }

    /// The ghosts of one list, oldest first (checks).
    fn walk(&self, in_b1: bool) -> impl Iterator<Item = u32> + '_ {
        self.list(in_b1).iter(&self.links)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum List {
    #[default]
    None,
    T1,
    T2,
}

/// Per chunk slot: its list, and its links there (T1 and T2 hold every resident chunk).
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    list: List,
    evictable: bool,
    link: Link,
}

impl Linked for Slot {
    fn link(&self) -> &Link {
        &self.link
    }

    fn link_mut(&mut self) -> &mut Link {
        &mut self.link
    }
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct OffloadArc {
    capacity: u64,
    target_t1: f64,
    slots: Vec<Slot>,
    t1: Queue,
    t2: Queue,
    ghosts: Ghosts,
}

impl OffloadArc {
    pub fn new(num_chunks: u32) -> Self {
        OffloadArc {
            capacity: num_chunks as u64,
            slots: vec![Slot::default(); num_chunks as usize],
            ..OffloadArc::default()
        }
    }

    /// `list`'s queue, beside the slots its links run through.
    fn queue_and_slots(&mut self, list: List) -> (&mut Queue, &mut [Slot]) {
        let queue = match list {
            List::T1 => &mut self.t1,
            List::T2 => &mut self.t2,
            List::None => unreachable!("a resident chunk is in T1 or T2"),
        };
        (queue, &mut self.slots)
    }

    /// Moves `chunk` to the recent end of `list` (taking it from where it is); `List::None`
    /// only takes it out.
    fn move_to_end(&mut self, chunk: u32, list: List) {
        let from = self.slots[chunk as usize].list;
        if from != List::None {
            let (queue, slots) = self.queue_and_slots(from);
            queue.unlink(slots, chunk);
        }
        self.slots[chunk as usize].list = list;
        if list != List::None {
            let (queue, slots) = self.queue_and_slots(list);
            queue.push_back(slots, chunk);
        }
    }

    fn drop_ghost(&mut self, key: u64) {
        if let Some((g, _)) = self.ghosts.find(key) {
            self.ghosts.remove(g);
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
        let Some((g, in_b1)) = self.ghosts.find(key) else {
            return;
        };
        let (b1, b2) = (self.ghosts.b1.len() as f64, self.ghosts.b2.len() as f64);
        if in_b1 {
            let delta = f64::max(1.0, b2 / b1);
            self.target_t1 = f64::min(self.target_t1 + delta, self.capacity as f64);
        } else {
            let delta = f64::max(1.0, b1 / b2);
            self.target_t1 = f64::max(self.target_t1 - delta, 0.0);
        }
        self.ghosts.renew(g);
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
        let s = &mut self.slots[chunk as usize];
        debug_assert!(s.list != List::None && !s.evictable);
        s.evictable = true;
    }

    pub fn mark_non_evictable(&mut self, chunk: u32) {
        let s = &mut self.slots[chunk as usize];
        debug_assert!(s.evictable);
        s.evictable = false;
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
            debug_assert!(!self.ghosts.contains(key), "a resident key is no ghost");
            self.ghosts.push(key, from_t1);
        }
        for in_b1 in [true, false] {
            while self.ghosts.list(in_b1).len() > self.capacity {
                self.ghosts.pop_oldest(in_b1);
            }
        }
        Some(taken.into_iter().map(|(c, _)| c).collect())
    }

    /// The chunks `evict` takes, (slot, from T1), without taking them; None if there are not
    /// `n`. The two walks only go forward, as vLLM's iterators do, and pass over the chunks
    /// that are not evictable as vLLM's do (in flight: stores at T1's recent end, loads).
    fn select(&self, n: u32, protected: &dyn Fn(u32) -> bool) -> Option<Vec<(u32, bool)>> {
        let mut taken: Vec<(u32, bool)> = Vec::with_capacity(n as usize);
        let mut virtual_t1 = self.t1.len();
        let target = self.target_t1 as u64; // Python's int(): toward zero, and it is >= 0
        let takeable = |&c: &u32| self.slots[c as usize].evictable && !protected(c);
        let mut t1 = self.t1.iter(&self.slots).filter(takeable);
        let mut t2 = self.t2.iter(&self.slots).filter(takeable);
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
        (
            self.t1.len(),
            self.t2.len(),
            self.ghosts.b1.len() as usize,
            self.ghosts.b2.len() as usize,
        )
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
                if self.ghosts.contains(k) {
                    return Err(format!("arc: resident key {k:#x} is also a ghost"));
                }
            }
        }
        if (n1, n2) != (self.t1.len(), self.t2.len()) {
            return Err(format!(
                "arc: |T1|,|T2| = {n1},{n2}, counted {},{}",
                self.t1.len(),
                self.t2.len()
            ));
        }
        for (list, q) in [(List::T1, self.t1), (List::T2, self.t2)] {
            q.check(&self.slots, |s| s.list == list)
                .map_err(|e| format!("arc: {list:?}: {e}"))?;
        }
        let g = &self.ghosts;
        for in_b1 in [true, false] {
            g.list(in_b1)
                .check(&g.links, |l| l.in_b1 == in_b1)
                .map_err(|e| format!("arc: B{}: {e}", 2 - in_b1 as u8))?;
            for e in g.walk(in_b1) {
                let key = g.keys[e as usize];
                if g.find(key).map(|f| f.0) != Some(e) {
                    return Err(format!("arc: ghost {e} (key {key:#x}) misfiled"));
                }
            }
        }
        if (g.b1.len() + g.b2.len()) as usize != g.len() {
            return Err(format!(
                "arc: ghost lists hold {}, the index {}",
                g.b1.len() + g.b2.len(),
                g.len()
            ));
        }
        if g.b1.len() > self.capacity || g.b2.len() > self.capacity {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn keys_of(g: &Ghosts, in_b1: bool) -> Vec<u64> {
        g.walk(in_b1).map(|e| g.keys[e as usize]).collect()
    }

    proptest! {
        /// B1 and B2 against two queues: a ghost joins at the recent end, leaves from
        /// anywhere, is renewed to the recent end; the oldest goes first; entries are reused.
        #[test]
        fn ghost_lists_agree_with_queues(ops in prop::collection::vec((0u8..4, 0u64..24, any::<bool>()), 1..300)) {
            let mut g = Ghosts::default();
            let mut model: [VecDeque<u64>; 2] = Default::default();
            for (op, k, in_b1) in ops {
                // Keys spread over the bits the index hashes, the tag and the bucket.
                let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let held = model.iter().position(|q| q.contains(&key));
                match (op, held) {
                    (0, None) => {
                        g.push(key, in_b1);
                        model[!in_b1 as usize].push_back(key);
                    }
                    (1, Some(m)) => {
                        let (e, b1) = g.find(key).expect("a ghost");
                        prop_assert_eq!(b1, m == 0);
                        g.remove(e);
                        model[m].retain(|&x| x != key);
                    }
                    (2, Some(m)) => {
                        let (e, _) = g.find(key).expect("a ghost");
                        g.renew(e);
                        model[m].retain(|&x| x != key);
                        model[m].push_back(key);
                    }
                    (3, _) if !model[!in_b1 as usize].is_empty() => {
                        g.pop_oldest(in_b1);
                        model[!in_b1 as usize].pop_front();
                    }
                    _ => prop_assert_eq!(g.find(key).is_some(), held.is_some()),
                }
                prop_assert_eq!(keys_of(&g, true), Vec::from(model[0].clone()));
                prop_assert_eq!(keys_of(&g, false), Vec::from(model[1].clone()));
                prop_assert_eq!((g.b1.len(), g.b2.len()), (model[0].len() as u64, model[1].len() as u64));
                prop_assert_eq!(g.len(), model[0].len() + model[1].len());
                prop_assert!(g.keys.len() <= 24, "freed entries are reused");
            }
        }
    }

    /// ARC as vLLM writes it, over plain vectors (oldest first), for the property test.
    #[derive(Default)]
    struct Naive {
        capacity: u64,
        target: f64,
        t1: Vec<u32>,
        t2: Vec<u32>,
        evictable: Vec<bool>,
        b1: Vec<u64>,
        b2: Vec<u64>,
    }

    impl Naive {
        fn take(v: &mut Vec<u32>, c: u32) -> bool {
            let before = v.len();
            v.retain(|&x| x != c);
            v.len() != before
        }

        fn insert(&mut self, c: u32, key: u64) {
            self.b1.retain(|&k| k != key);
            self.b2.retain(|&k| k != key);
            self.t1.push(c);
            self.evictable[c as usize] = false;
        }

        fn remove(&mut self, c: u32) {
            let _ = Self::take(&mut self.t1, c) || Self::take(&mut self.t2, c);
            self.evictable[c as usize] = false;
        }

        fn store_miss(&mut self, keys: &[u64]) {
            for &k in keys.iter().rev() {
                let (n1, n2) = (self.b1.len() as f64, self.b2.len() as f64);
                if self.b1.contains(&k) {
                    self.target =
                        f64::min(self.target + f64::max(1.0, n2 / n1), self.capacity as f64);
                    self.b1.retain(|&x| x != k);
                    self.b1.push(k);
                } else if self.b2.contains(&k) {
                    self.target = f64::max(self.target - f64::max(1.0, n1 / n2), 0.0);
                    self.b2.retain(|&x| x != k);
                    self.b2.push(k);
                }
            }
        }

        fn finished(&mut self, entries: &[(u32, bool, bool)]) {
            for &(c, insertion_only, reused) in entries {
                let in_t1 = self.t1.contains(&c);
                if insertion_only {
                    let v = if in_t1 { &mut self.t1 } else { &mut self.t2 };
                    Self::take(v, c);
                    v.push(c);
                } else if reused {
                    let _ = Self::take(&mut self.t1, c) || Self::take(&mut self.t2, c);
                    self.t2.push(c);
                }
            }
        }

        fn evict(
            &mut self,
            n: u32,
            protected: &dyn Fn(u32) -> bool,
            key_of: &dyn Fn(u32) -> u64,
        ) -> Option<Vec<u32>> {
            let ok = |c: &&u32| self.evictable[**c as usize] && !protected(**c);
            let mut t1 = self.t1.iter().filter(ok).copied();
            let mut t2 = self.t2.iter().filter(ok).copied();
            let (mut virtual_t1, target) = (self.t1.len() as u64, self.target as u64);
            let mut taken = Vec::new();
            for _ in 0..n {
                let mut pick = None;
                if virtual_t1 >= target {
                    pick = t1.next().map(|c| (c, true));
                }
                if pick.is_none() {
                    pick = t2.next().map(|c| (c, false));
                }
                if pick.is_none() {
                    pick = Some((t1.next()?, true));
                }
                if let Some((_, true)) = pick {
                    virtual_t1 = virtual_t1.saturating_sub(1);
                }
                taken.extend(pick);
            }
            for &(c, from_t1) in &taken {
                self.remove(c);
                if from_t1 {
                    self.b1.push(key_of(c))
                } else {
                    self.b2.push(key_of(c))
                }
            }
            for b in [&mut self.b1, &mut self.b2] {
                while b.len() as u64 > self.capacity {
                    b.remove(0);
                }
            }
            Some(taken.into_iter().map(|(c, _)| c).collect())
        }
    }

    proptest! {
        /// The whole policy against [`Naive`]: every eviction, size, target, list order and
        /// ghost order agree, and the invariant walk holds, through random inserts, failed
        /// stores, readiness changes, store misses (ghost hits), finished requests and
        /// evictions with protected chunks.
        #[test]
        fn agrees_with_a_naive_arc(ops in prop::collection::vec((0u8..7, any::<u32>(), any::<u32>(), any::<bool>()), 1..200)) {
            const SLOTS: u32 = 6;
            let mut arc = OffloadArc::new(SLOTS);
            let mut naive = Naive { capacity: SLOTS as u64, evictable: vec![false; SLOTS as usize], ..Naive::default() };
            let mut key = vec![None::<u64>; SLOTS as usize];
            let mut next_key = 0u64;
            let mut evicted: Vec<u64> = Vec::new();
            for (op, a, b, flag) in ops {
                let resident: Vec<u32> = (0..SLOTS).filter(|&c| key[c as usize].is_some()).collect();
                let pick = |v: &[u32], x: u32| (!v.is_empty()).then(|| v[x as usize % v.len()]);
                match op {
                    0 => {
                        let free: Vec<u32> = (0..SLOTS).filter(|&c| key[c as usize].is_none()).collect();
                        if let Some(c) = pick(&free, a) {
                            // A key evicted before (a ghost, maybe) or a new one.
                            let k = if flag && !evicted.is_empty() {
                                evicted[b as usize % evicted.len()]
                            } else {
                                next_key += 1;
                                next_key.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            };
                            if !key.contains(&Some(k)) {
                                key[c as usize] = Some(k);
                                arc.insert(c, k);
                                naive.insert(c, k);
                            }
                        }
                    }
                    1 => {
                        let v: Vec<u32> = resident.iter().copied().filter(|&c| !naive.evictable[c as usize]).collect();
                        if let Some(c) = pick(&v, a) {
                            arc.mark_evictable(c);
                            naive.evictable[c as usize] = true;
                        }
                    }
                    2 => {
                        let v: Vec<u32> = resident.iter().copied().filter(|&c| naive.evictable[c as usize]).collect();
                        if let Some(c) = pick(&v, a) {
                            arc.mark_non_evictable(c);
                            naive.evictable[c as usize] = false;
                        }
                    }
                    3 => {
                        let v: Vec<u32> = resident.iter().copied().filter(|&c| !naive.evictable[c as usize]).collect();
                        if let Some(c) = pick(&v, a) {
                            arc.remove(c);
                            naive.remove(c);
                            key[c as usize] = None;
                        }
                    }
                    4 if !evicted.is_empty() => {
                        // Mostly ghosts (hits that move the target), sometimes a key that is
                        // no longer one.
                        let ghosts: Vec<u64> = naive.b1.iter().chain(&naive.b2).copied().collect();
                        let from = if flag && !ghosts.is_empty() { &ghosts } else { &evicted };
                        let keys: Vec<u64> = (0..1 + a % 3)
                            .map(|i| from[(b as usize + i as usize * 7) % from.len()])
                            .filter(|k| !key.contains(&Some(*k)))
                            .collect();
                        arc.on_store_miss(&keys);
                        naive.store_miss(&keys);
                    }
                    5 => {
                        let entries: Vec<(u32, bool, bool)> = resident
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| (a >> (i % 32)) & 1 == 1)
                            .map(|(i, &c)| (c, (b >> (i % 32)) & 1 == 1, flag))
                            .collect();
                        arc.on_request_finished(&entries);
                        naive.finished(&entries);
                    }
                    _ => {
                        let n = 1 + a % SLOTS;
                        let protected = |c: u32| (b >> c) & 1 == 1;
                        let key_of = |c: u32| key[c as usize].expect("resident");
                        let got = arc.evict(n, &protected, &key_of);
                        let want = naive.evict(n, &protected, &key_of);
                        prop_assert_eq!(&got, &want);
                        for &c in got.iter().flatten() {
                            evicted.push(key[c as usize].take().expect("resident"));
                            naive.evictable[c as usize] = false;
                        }
                    }
                }
                prop_assert_eq!(arc.sizes(), (naive.t1.len() as u64, naive.t2.len() as u64, naive.b1.len(), naive.b2.len()));
                prop_assert_eq!(arc.target_t1().to_bits(), naive.target.to_bits());
                prop_assert_eq!(arc.t1.iter(&arc.slots).collect::<Vec<_>>(), naive.t1.clone());
                prop_assert_eq!(arc.t2.iter(&arc.slots).collect::<Vec<_>>(), naive.t2.clone());
                prop_assert_eq!(keys_of(&arc.ghosts, true), naive.b1.clone());
                prop_assert_eq!(keys_of(&arc.ghosts, false), naive.b2.clone());
                let check = arc.check(&|c| key[c as usize], &|c| naive.evictable[c as usize]);
                prop_assert!(check.is_ok(), "{:?}", check);
            }
        }
    }

    /// Evicting from T1 makes B1 ghosts; a store miss on one adapts the target up by
    /// max(1, |B2| / |B1|) and renews it; ghosts beyond the capacity go, oldest first.
    #[test]
    fn evictions_become_ghosts_and_a_ghost_hit_raises_the_target() {
        let mut arc = OffloadArc::new(2);
        let key_of = |c: u32| 100 + c as u64;
        for c in 0..2 {
            arc.insert(c, key_of(c));
            arc.mark_evictable(c);
        }
        let none = |_: u32| false;
        assert_eq!(arc.evict(1, &none, &key_of), Some(vec![0]));
        assert_eq!(arc.sizes(), (1, 0, 1, 0));
        arc.on_store_miss(&[100]);
        assert_eq!(arc.target_t1(), 1.0);
        // Slot 0 holds a new key; evict both: B1 holds 100, 101, 102 over a capacity of 2.
        arc.insert(0, 102);
        arc.mark_evictable(0);
        let key_of2 = |c: u32| if c == 0 { 102 } else { 101 };
        assert_eq!(arc.evict(2, &none, &key_of2).map(|v| v.len()), Some(2));
        assert_eq!(arc.sizes(), (0, 0, 2, 0));
        assert!(!arc.ghosts.contains(100), "the oldest ghost went");
        assert!(arc.ghosts.contains(101) && arc.ghosts.contains(102));
        arc.check(&|_| None, &|_| false).unwrap();
    }
}
