//! The prefix cache's map from a block hash to the blocks holding it (vLLM's
//! `cached_block_hash_to_block`): the first block inserted first, which is the one a lookup
//! serves.
//!
//! It is on the hot path of every block cached, evicted and looked up, so it is built for that:
//! open addressing with linear probing over 4-byte slots that hold only the first block holding
//! a hash, a quarter full at most as the pool sizes it (a hash is held by at least one block;
//! never more than half), deletion by backward shift (no tombstones). The hash
//! is not kept twice: the pool knows each block's hash (`hash_of`), and a slot is compared and
//! its home found through its block. So the table takes 32 bytes a block at eight slots a
//! block, small enough to share the processor's cache with the blocks, and one operation
//! touches one cache line most of the time. An eviction finds its slot by the block itself,
//! without reading the hash of another. The other blocks holding the same hash (rare: two
//! requests computed the same block) are chained through a per-block array, in insertion
//! order.

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

/// No block: the end of a chain.
const NONE: BlockId = BlockId::MAX;
/// Most blocks the map serves: block ids below 2^31 − 1 (the top bit of a slot marks a chain,
/// and the all-ones slot is empty).
pub const MAX_BLOCKS: u32 = (1 << 31) - 1;
const CHAINED: u32 = 1 << 31;

/// The first block holding a hash, with [`CHAINED`] when other blocks hold it too (`next[first]`
/// starts their chain); all ones when empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot(u32);

impl Slot {
    #[inline]
    fn is_empty(self) -> bool {
        self == EMPTY
    }

    #[inline]
    fn block(self) -> BlockId {
        self.0 & !CHAINED
    }

    #[inline]
    fn chained(self) -> bool {
        self.0 & CHAINED != 0
    }
}

const EMPTY: Slot = Slot(u32::MAX);

/// Mixes a hash (Fibonacci hashing: any keys spread, mixed or not); its top bits pick the
/// home slot.
#[inline]
fn mixed(hash: u64) -> u32 {
    (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

/// Largest table given more than four slots a block.
const ROOMY_TABLE_BYTES: usize = 2 << 20;

/// Slots for `num_blocks` blocks: a power of two, at least four a block (at most a quarter
/// full: short probes, short backward shifts), eight a block while the table stays within
/// [`ROOMY_TABLE_BYTES`] (a core's L2 cache on the machines measured; up to 65,536 blocks). On
/// the whole Mooncake conversation trace with 20,000 blocks, eight a block ran 4% faster than
/// four and sixteen ran 2% slower; with 200,000 blocks, eight (an 8 MiB table) ran 7% slower
/// than four.
fn slots_for(num_blocks: u32) -> usize {
    let n = num_blocks as usize;
    let roomy = (8 * n).next_power_of_two();
    let slots = if roomy * std::mem::size_of::<Slot>() <= ROOMY_TABLE_BYTES {
        roomy
    } else {
        (4 * n).next_power_of_two()
    };
    slots.max(16)
}

/// Hash → blocks holding it, for a pool of `num_blocks` blocks (see the module documentation).
/// The operations that compare hashes take `hash_of(block)`: the hash `block` holds (or, for
/// a block being evicted, held until now).
#[derive(Clone, Debug)]
pub struct PrefixMap {
    slots: Vec<Slot>,
    /// `32 - log2(slots.len())`: the mixed hash's top bits pick the home slot.
    shift: u32,
    /// Distinct hashes held.
    len: usize,
    /// Per block of a chain: the next block holding the same hash ([`NONE`] at the end).
    next: Vec<BlockId>,
}

impl PrefixMap {
    /// A map for hashes held by blocks `0..num_blocks`.
    pub fn new(num_blocks: u32) -> Self {
        Self::with_slots(num_blocks, slots_for(num_blocks))
    }

    /// A map with `capacity` slots (a power of two, at least twice the hashes it will hold).
    fn with_slots(num_blocks: u32, capacity: usize) -> Self {
        assert!(
            num_blocks <= MAX_BLOCKS,
            "too many blocks for the prefix map"
        );
        assert!(capacity.is_power_of_two() && (2..=1 << 31).contains(&capacity));
        PrefixMap {
            slots: vec![EMPTY; capacity],
            shift: 32 - capacity.trailing_zeros(),
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

    /// The slot where `hash` is looked for first.
    #[inline]
    fn home(&self, hash: u64) -> usize {
        (mixed(hash) >> self.shift) as usize
    }

    /// The slot holding `hash`, or the empty slot where it would go. `known` is a block that,
    /// if it is a slot's first, holds `hash` (an eviction's block): such a slot is taken
    /// without asking `hash_of`.
    #[inline]
    fn find(&self, hash: u64, known: BlockId, hash_of: impl Fn(BlockId) -> u64) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let s = self.slots[i];
            if s.is_empty() {
                return (i, false);
            }
            if s.block() == known || hash_of(s.block()) == hash {
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
    pub fn first(&self, hash: BlockHash, hash_of: impl Fn(BlockId) -> u64) -> Option<BlockId> {
        let (i, found) = self.find(hash.0, NONE, hash_of);
        found.then(|| self.slots[i].block())
    }

    /// Block `block` (which `hash_of` already answers with `hash`) now holds `hash`, after
    /// any other holder.
    #[inline]
    pub fn insert(&mut self, hash: BlockHash, block: BlockId, hash_of: impl Fn(BlockId) -> u64) {
        debug_assert!(block < MAX_BLOCKS);
        let (i, found) = self.find(hash.0, NONE, &hash_of);
        if !found {
            assert!(
                2 * (self.len + 1) <= self.slots.len(),
                "prefix map over half full"
            );
            self.slots[i] = Slot(block);
            self.len += 1;
            return;
        }
        let slot = self.slots[i];
        let mut last = slot.block();
        if slot.chained() {
            while self.next[last as usize] != NONE {
                last = self.next[last as usize];
            }
        }
        self.slots[i].0 |= CHAINED;
        self.next[last as usize] = block;
        self.next[block as usize] = NONE;
    }

    /// `block` no longer holds `hash`, which `hash_of(block)` answers (the hash it held until
    /// now). False (nothing changes) if it was not among its holders.
    #[inline]
    pub fn remove(
        &mut self,
        hash: BlockHash,
        block: BlockId,
        hash_of: impl Fn(BlockId) -> u64,
    ) -> bool {
        debug_assert_eq!(
            hash_of(block),
            hash.0,
            "block {block} did not hold the hash"
        );
        let (i, found) = self.find(hash.0, block, &hash_of);
        if !found {
            return false;
        }
        let slot = self.slots[i];
        let first = slot.block();
        if first == block {
            if slot.chained() {
                let second = self.next[block as usize];
                let more = self.next[second as usize] != NONE;
                self.slots[i] = Slot(second | if more { CHAINED } else { 0 });
            } else {
                self.delete_slot(i, hash_of);
            }
            return true;
        }
        if !slot.chained() {
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
                    self.slots[i] = Slot(first);
                }
                return true;
            }
            prev = b;
        }
    }

    /// Empties slot `i` and shifts back the slots after it that probed past it.
    fn delete_slot(&mut self, mut i: usize, hash_of: impl Fn(BlockId) -> u64) {
        let mask = self.slots.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.is_empty() {
                break;
            }
            let home = self.home(hash_of(s.block()));
            // Slot j stays when its home is in the cyclic range (i, j], else it moves to i.
            // Cyclic distances from i + 1 compare without a branch; whether a slot moves is as
            // good as random, so the move is a select too (a slot that stays rewrites slot i
            // unchanged).
            let stays = (home.wrapping_sub(i + 1) & mask) < (j.wrapping_sub(i) & mask);
            let kept = self.slots[i];
            self.slots[i] = if stays { kept } else { s };
            i = if stays { i } else { j };
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
    pub fn holders(
        &self,
        hash: BlockHash,
        hash_of: impl Fn(BlockId) -> u64,
    ) -> impl Iterator<Item = BlockId> + '_ {
        let (i, found) = self.find(hash.0, NONE, hash_of);
        let slot = if found { self.slots[i] } else { EMPTY };
        let mut b = if found { slot.block() } else { NONE };
        let mut chained = slot.chained();
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

    /// Full walk of the table: the count of hashes held, and no empty slot between a slot and
    /// its home (found through `hash_of`), which a lookup would stop at.
    pub fn check(&self, hash_of: impl Fn(BlockId) -> u64) -> Result<(), String> {
        let mask = self.slots.len() - 1;
        let mut held = 0usize;
        for (j, &s) in self.slots.iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            held += 1;
            let home = self.home(hash_of(s.block()));
            let past = j.wrapping_sub(home) & mask;
            if let Some(k) = (0..past).find(|k| self.slots[(home + k) & mask].is_empty()) {
                return Err(format!(
                    "slot {j} (block {}) lies past empty slot {}, after its home {home}",
                    s.block(),
                    (home + k) & mask
                ));
            }
        }
        if held != self.len {
            return Err(format!("{held} slots held, {} counted", self.len));
        }
        Ok(())
    }

    /// The first block of every hash held (in slot order: for checks, never for decisions).
    pub fn first_blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.slots
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.block())
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
        /// The block gives up the hash it holds, or held last (0 if none yet).
        Remove(u32),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct hashes (collisions and chains), some of them neighbours in the table.
        let hash = prop_oneof![0u64..24, any::<u64>()];
        prop_oneof![
            6 => (hash.clone(), 0u32..32).prop_map(|(h, b)| Op::Insert(h, b)),
            5 => (0u32..32).prop_map(Op::Remove),
            1 => Just(Op::Clear),
        ]
    }

    /// Applies `ops` (blocks below `num_blocks` only) to a map of `slots` slots and to a
    /// BTreeMap of insertion-ordered holder lists: same answers after every op.
    fn check_against_model(ops: &[Op], num_blocks: u32, slots: usize) -> Result<(), TestCaseError> {
        let mut map = PrefixMap::with_slots(num_blocks, slots);
        let mut model: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let mut held: BTreeMap<u32, u64> = BTreeMap::new();
        // What the pool answers: the hash a block holds, or last held.
        let mut hash_of_block = vec![0u64; num_blocks as usize];
        for op in ops {
            match *op {
                Op::Insert(h, b) => {
                    if b >= num_blocks || held.contains_key(&b) {
                        continue;
                    }
                    held.insert(b, h);
                    hash_of_block[b as usize] = h;
                    model.entry(h).or_default().push(b);
                    map.insert(BlockHash(h), b, |x| hash_of_block[x as usize]);
                }
                Op::Remove(b) => {
                    if b >= num_blocks {
                        continue;
                    }
                    let h = hash_of_block[b as usize];
                    let want = model.get(&h).is_some_and(|v| v.contains(&b));
                    let hash_of = |x: u32| hash_of_block[x as usize];
                    prop_assert_eq!(map.remove(BlockHash(h), b, hash_of), want);
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
            let hash_of = |x: u32| hash_of_block[x as usize];
            for (&h, v) in &model {
                prop_assert_eq!(map.first(BlockHash(h), hash_of), Some(v[0]));
                prop_assert_eq!(
                    map.holders(BlockHash(h), hash_of).collect::<Vec<_>>(),
                    v.clone()
                );
            }
            map.check(hash_of).map_err(TestCaseError::fail)?;
            let mut hashes: Vec<u64> = map.first_blocks().map(hash_of).collect();
            hashes.sort_unstable();
            prop_assert_eq!(hashes, model.keys().copied().collect::<Vec<_>>());
        }
        Ok(())
    }

    /// A hash whose home slot in `map` is `slot` (the smallest, searching upwards from `from`).
    fn hash_at(map: &PrefixMap, slot: usize, from: u64) -> u64 {
        (from..).find(|&h| map.home(h) == slot).unwrap()
    }

    #[test]
    fn small_pools_get_a_roomier_table_within_the_cache_bound() {
        assert_eq!(slots_for(20_000), 1 << 18);
        assert_eq!(slots_for(200_000), 1 << 20);
        for n in (0..300_000u32).step_by(997) {
            let slots = slots_for(n);
            assert!(slots.is_power_of_two() && slots >= 4 * n as usize && slots >= 16);
            let bytes = slots * std::mem::size_of::<Slot>();
            assert!(
                slots < 8 * n as usize || bytes <= ROOMY_TABLE_BYTES || slots == 16,
                "{n}"
            );
        }
    }

    /// Deleting at the table's end shifts back across the wrap, and an entry at its home just
    /// past the wrap stays where it is.
    #[test]
    fn deletion_shifts_across_the_end_of_the_table() {
        let mut map = PrefixMap::with_slots(8, 16);
        let a = hash_at(&map, 15, 0);
        let b = hash_at(&map, 15, a + 1);
        let c = hash_at(&map, 0, 0);
        let hash_of = |x: u32| [0, a, b, c][x as usize];
        for (block, h) in [(1, a), (2, b), (3, c)] {
            map.insert(BlockHash(h), block, hash_of);
        }
        // a at 15 (home), b at 0 (home 15, wrapped), c at 1 (home 0).
        assert!(map.remove(BlockHash(a), 1, hash_of));
        assert_eq!(map.first(BlockHash(b), hash_of), Some(2));
        assert_eq!(map.first(BlockHash(c), hash_of), Some(3));
        assert_eq!(map.slots[15].block(), 2, "b shifted back to its home");
        assert_eq!(map.slots[0].block(), 3, "c shifted back to its home");
        // c at its home 0, just past the end: removing b (at 15) must leave c alone.
        assert!(map.remove(BlockHash(b), 2, hash_of));
        assert_eq!(map.first(BlockHash(c), hash_of), Some(3));
        assert_eq!(map.len(), 1);
    }

    /// Two hashes with the same home (the same 32 mixed bits) are told apart by the hash their
    /// block holds.
    #[test]
    fn hashes_sharing_a_home_stay_apart() {
        // y * K = x * K + 1 (mod 2^64), K the Fibonacci multiplier: the same top 32 bits.
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let inverse = (0..6).fold(K, |i, _| {
            i.wrapping_mul(2u64.wrapping_sub(K.wrapping_mul(i)))
        });
        let x = 12345u64;
        let y = x.wrapping_add(inverse);
        assert_ne!(x, y);
        assert_eq!(mixed(x), mixed(y));
        let mut map = PrefixMap::with_slots(8, 16);
        let hash_of = |b: u32| [0, x, y, x, y][b as usize];
        map.insert(BlockHash(x), 1, hash_of);
        map.insert(BlockHash(y), 2, hash_of);
        map.insert(BlockHash(x), 3, hash_of);
        assert_eq!(map.len(), 2);
        assert_eq!(map.first(BlockHash(y), hash_of), Some(2));
        assert_eq!(
            map.holders(BlockHash(x), hash_of).collect::<Vec<_>>(),
            [1, 3]
        );
        assert!(
            !map.remove(BlockHash(y), 4, hash_of),
            "block 4 holds y but was never inserted"
        );
        assert!(map.remove(BlockHash(x), 1, hash_of));
        assert_eq!(map.first(BlockHash(x), hash_of), Some(3));
        assert!(map.remove(BlockHash(y), 2, hash_of));
        assert_eq!(map.first(BlockHash(y), hash_of), None);
        assert_eq!(map.first(BlockHash(x), hash_of), Some(3));
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
