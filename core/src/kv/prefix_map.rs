//! The prefix cache's map from a block hash to the blocks holding it (vLLM's
//! `cached_block_hash_to_block`): the first block inserted first, which is the one a lookup
//! serves.
//!
//! It is on the hot path of every block cached, evicted and looked up, so it is built for that:
//! open addressing with linear probing over 16-byte slots (hash, first block), never more than
//! half full (the pool sizes it once: a hash is held by at least one block), deletion by
//! backward shift (no tombstones), so one operation touches one cache line most of the time.
//! The other blocks holding the same hash (rare: two requests computed the same block) are
//! chained through a per-block array, in insertion order.

use super::hash::BlockHash;
use super::BlockId;

/// Asks the CPU to bring `value`'s cache line in, without waiting for it: the prefix map's
/// slots are touched at random, and asking a few blocks ahead overlaps those cache misses.
#[inline]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address, and changes no
    // state the program can observe; `value` is a valid reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// No block: an empty slot, the end of a chain.
const NONE: BlockId = BlockId::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    hash: u64,
    first: BlockId,
    /// Other blocks hold the hash too (`next[first]` starts their chain): without them, the
    /// per-block array is never touched.
    chained: bool,
}

const EMPTY: Slot = Slot {
    hash: 0,
    first: NONE,
    chained: false,
};

/// Hash → blocks holding it, for a pool of `num_blocks` blocks (see the module documentation).
#[derive(Clone, Debug)]
pub struct PrefixMap {
    slots: Vec<Slot>,
    /// `64 - log2(slots.len())`: the top bits of the mixed hash pick the home slot.
    shift: u32,
    /// Distinct hashes held.
    len: usize,
    /// Per block of a chain: the next block holding the same hash ([`NONE`] at the end).
    next: Vec<BlockId>,
}

impl PrefixMap {
    /// A map for hashes held by blocks `0..num_blocks`.
    pub fn new(num_blocks: u32) -> Self {
        Self::with_slots(
            num_blocks,
            (2 * num_blocks as usize).next_power_of_two().max(16),
        )
    }

    /// A map with `capacity` slots (a power of two, at least twice the hashes it will hold).
    fn with_slots(num_blocks: u32, capacity: usize) -> Self {
        assert!(capacity.is_power_of_two() && capacity >= 2);
        PrefixMap {
            slots: vec![EMPTY; capacity],
            shift: 64 - capacity.trailing_zeros(),
            len: 0,
            next: vec![NONE; num_blocks as usize],
        }
    }

    /// Distinct hashes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The home slot of `hash` (Fibonacci hashing: any keys spread, mixed or not).
    #[inline]
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The slot holding `hash`, or the empty slot where it would go.
    #[inline]
    fn find(&self, hash: u64) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let s = self.slots[i];
            if s.first == NONE {
                return (i, false);
            }
            if s.hash == hash {
                return (i, true);
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading the slot where `hash` lives (or would go), so that an operation on it a
    /// little later finds it in cache. Changes nothing.
    #[inline]
    pub fn load_ahead(&self, hash: BlockHash) {
        prefetch(&self.slots[self.home(hash.0)]);
    }

    /// The first block inserted of those holding `hash`.
    #[inline]
    pub fn first(&self, hash: BlockHash) -> Option<BlockId> {
        let (i, found) = self.find(hash.0);
        found.then(|| self.slots[i].first)
    }

    /// Block `block` (holding no hash yet) now holds `hash`, after any other holder.
    pub fn insert(&mut self, hash: BlockHash, block: BlockId) {
        debug_assert!(block != NONE);
        let (i, found) = self.find(hash.0);
        if !found {
            assert!(
                2 * (self.len + 1) <= self.slots.len(),
                "prefix map over half full"
            );
            self.slots[i] = Slot {
                hash: hash.0,
                first: block,
                chained: false,
            };
            self.len += 1;
            return;
        }
        let mut last = self.slots[i].first;
        if self.slots[i].chained {
            while self.next[last as usize] != NONE {
                last = self.next[last as usize];
            }
        }
        self.slots[i].chained = true;
        self.next[last as usize] = block;
        self.next[block as usize] = NONE;
    }

    /// `block` no longer holds `hash`. False (nothing changes) if it was not among its holders.
    pub fn remove(&mut self, hash: BlockHash, block: BlockId) -> bool {
        let (i, found) = self.find(hash.0);
        if !found {
            return false;
        }
        let Slot { first, chained, .. } = self.slots[i];
        if first == block {
            if chained {
                let second = self.next[block as usize];
                self.slots[i].first = second;
                self.slots[i].chained = self.next[second as usize] != NONE;
            } else {
                self.delete_slot(i);
            }
            return true;
        }
        if !chained {
            return false;
        }
        let mut prev = first;
        loop {
            let b = self.next[prev as usize];
            if b == NONE {
                return false;
            }
            if b == block {
                let after = self.next[block as usize];
                self.next[prev as usize] = after;
                if prev == first && after == NONE {
                    self.slots[i].chained = false;
                }
                return true;
            }
            prev = b;
        }
    }

    /// Empties slot `i` and shifts back the slots after it that probed past it.
    fn delete_slot(&mut self, mut i: usize) {
        let mask = self.slots.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.first == NONE {
                break;
            }
            let home = self.home(s.hash);
            // Slot j may move to i when its home is not in the cyclic range (i, j].
            let stays = if i < j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.slots[i] = s;
                i = j;
            }
        }
        self.slots[i] = EMPTY;
        self.len -= 1;
    }

    /// Forgets every hash.
    pub fn clear(&mut self) {
        self.slots.fill(EMPTY);
        self.len = 0;
    }

    /// The blocks holding `hash`, first inserted first.
    pub fn holders(&self, hash: BlockHash) -> impl Iterator<Item = BlockId> + '_ {
        let (i, found) = self.find(hash.0);
        let slot = if found { self.slots[i] } else { EMPTY };
        let mut b = slot.first;
        let mut chained = slot.chained;
        std::iter::from_fn(move || {
            let cur = b;
            (cur != NONE).then(|| {
                b = if chained {
                    self.next[cur as usize]
                } else {
                    NONE
                };
                chained = true;
                cur
            })
        })
    }

    /// Every hash held (in slot order: for checks, never for decisions).
    pub fn hashes(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.slots
            .iter()
            .filter(|s| s.first != NONE)
            .map(|s| BlockHash(s.hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u32),
        Remove(u64, u32),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct hashes (collisions and chains), some of them neighbours in the table.
        let hash = prop_oneof![0u64..24, any::<u64>()];
        prop_oneof![
            6 => (hash.clone(), 0u32..32).prop_map(|(h, b)| Op::Insert(h, b)),
            5 => (hash, 0u32..32).prop_map(|(h, b)| Op::Remove(h, b)),
            1 => Just(Op::Clear),
        ]
    }

    /// Applies `ops` (blocks below `num_blocks` only) to a map of `slots` slots and to a
    /// BTreeMap of insertion-ordered holder lists: same answers after every op.
    fn check_against_model(ops: &[Op], num_blocks: u32, slots: usize) -> Result<(), TestCaseError> {
        let mut map = PrefixMap::with_slots(num_blocks, slots);
        let mut model: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let mut held: BTreeMap<u32, u64> = BTreeMap::new();
        for op in ops {
            match *op {
                Op::Insert(h, b) => {
                    if b >= num_blocks || held.contains_key(&b) {
                        continue;
                    }
                    held.insert(b, h);
                    model.entry(h).or_default().push(b);
                    map.insert(BlockHash(h), b);
                }
                Op::Remove(h, b) => {
                    let want = model.get(&h).is_some_and(|v| v.contains(&b));
                    prop_assert_eq!(map.remove(BlockHash(h), b), want);
                    if want {
                        held.remove(&b);
                        let v = model.get_mut(&h).unwrap();
                        v.retain(|&x| x != b);
                        if v.is_empty() {
                            model.remove(&h);
                        }
                    }
                }
                Op::Clear => {
                    map.clear();
                    model.clear();
                    held.clear();
                }
            }
            prop_assert_eq!(map.len(), model.len());
            for (&h, v) in &model {
                prop_assert_eq!(map.first(BlockHash(h)), Some(v[0]));
                prop_assert_eq!(map.holders(BlockHash(h)).collect::<Vec<_>>(), v.clone());
            }
            let mut hashes: Vec<u64> = map.hashes().map(|h| h.0).collect();
            hashes.sort_unstable();
            prop_assert_eq!(hashes, model.keys().copied().collect::<Vec<_>>());
        }
        Ok(())
    }

    /// A hash whose home slot in `map` is `slot` (the smallest, searching upwards from `from`).
    fn hash_at(map: &PrefixMap, slot: usize, from: u64) -> u64 {
        (from..).find(|&h| map.home(h) == slot).unwrap()
    }

    /// Deleting at the table's end shifts back across the wrap, and an entry at its home just
    /// past the wrap stays where it is.
    #[test]
    fn deletion_shifts_across_the_end_of_the_table() {
        let mut map = PrefixMap::with_slots(8, 16);
        let a = hash_at(&map, 15, 0);
        let b = hash_at(&map, 15, a + 1);
        let c = hash_at(&map, 0, 0);
        for (block, h) in [(1, a), (2, b), (3, c)] {
            map.insert(BlockHash(h), block);
        }
        // a at 15 (home), b at 0 (home 15, wrapped), c at 1 (home 0).
        assert!(map.remove(BlockHash(a), 1));
        assert_eq!(map.first(BlockHash(b)), Some(2));
        assert_eq!(map.first(BlockHash(c)), Some(3));
        assert_eq!(map.slots[15].first, 2, "b shifted back to its home");
        assert_eq!(map.slots[0].first, 3, "c shifted back to its home");
        // c at its home 0, just past the end: removing b (at 15) must leave c alone.
        assert!(map.remove(BlockHash(b), 2));
        assert_eq!(map.first(BlockHash(c)), Some(3));
        assert_eq!(map.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Half-full tables, so probe runs are long, wrap around the end, and deletions shift.
        #[test]
        fn behaves_like_a_map_of_holder_lists(ops in proptest::collection::vec(op(), 1..300)) {
            check_against_model(&ops, 32, 64)?;
            check_against_model(&ops, 8, 16)?;
        }
    }
}
