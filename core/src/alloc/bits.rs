//! [`OrderedBits`]: a set of integers below a bound with its smallest member found in a few
//! word operations: one bit per possible member, and above them one bit per non-zero word,
//! level on level, up to a single word. Insert, remove, contains and `first` touch one word per
//! level (⌈log64 bound⌉ levels: 5 for 2^30 members), never a node allocation: what a buddy
//! allocator's free lists need, in address order, at a fraction of an ordered tree's cost.
//!
//! Memory is one bit per possible member plus 1/63 more for the levels above, reserved zeroed
//! (untouched pages cost nothing). It serialises as its bound and its members only.

use serde::{Deserialize, Serialize};

/// Largest bound accepted: 2^40 members (128 GiB of bits; a buddy's order 0 over 2^49 bytes
/// at 512 B).
pub const MAX_BOUND: u64 = 1 << 40;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "SparseBits", try_from = "SparseBits")]
pub struct OrderedBits {
    bound: u64,
    /// `levels[0]` holds the members; bit `i` of `levels[l + 1]` is set iff word `i` of
    /// `levels[l]` is not zero. The last level is one word.
    levels: Vec<Vec<u64>>,
    len: u64,
}

impl OrderedBits {
    /// An empty set of integers in `0..bound`.
    pub fn new(bound: u64) -> Self {
        assert!(bound <= MAX_BOUND, "bound {bound} above {MAX_BOUND}");
        let mut levels = Vec::new();
        let mut n = bound.max(1);
        loop {
            let words = n.div_ceil(64);
            levels.push(vec![0u64; words as usize]);
            if words == 1 {
                break;
            }
            n = words;
        }
        OrderedBits {
            bound,
            levels,
            len: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn contains(&self, i: u64) -> bool {
        i < self.bound && self.levels[0][(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds `i` (below the bound); false if it was there.
    #[inline]
    pub fn insert(&mut self, i: u64) -> bool {
        assert!(i < self.bound, "{i} outside 0..{}", self.bound);
        if self.contains(i) {
            return false;
        }
        self.len += 1;
        let mut i = i;
        for level in &mut self.levels {
            let word = &mut level[(i / 64) as usize];
            let was_empty = *word == 0;
            *word |= 1 << (i % 64);
            if !was_empty {
                break;
            }
            i /= 64;
        }
        true
    }

    /// Removes `i`; false if it was not there.
    #[inline]
    pub fn remove(&mut self, i: u64) -> bool {
        if !self.contains(i) {
            return false;
        }
        self.len -= 1;
        let mut i = i;
        for level in &mut self.levels {
            let word = &mut level[(i / 64) as usize];
            *word &= !(1 << (i % 64));
            if *word != 0 {
                break;
            }
            i /= 64;
        }
        true
    }

    /// The smallest member.
    #[inline]
    pub fn first(&self) -> Option<u64> {
        let top = self.levels.last().expect("at least one level")[0];
        if top == 0 {
            return None;
        }
        let mut i = u64::from(top.trailing_zeros());
        for level in self.levels.iter().rev().skip(1) {
            i = i * 64 + u64::from(level[i as usize].trailing_zeros());
        }
        Some(i)
    }

    /// The members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.levels[0]
            .iter()
            .enumerate()
            .filter(|(_, &w)| w != 0)
            .flat_map(|(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    (bits != 0).then(|| {
                        let b = bits.trailing_zeros();
                        bits &= bits - 1;
                        w as u64 * 64 + u64::from(b)
                    })
                })
            })
    }
}

/// Largest bound an [`IndexSet`] keeps as bits (32 MiB of them); above, a B-tree holds only
/// the members, so that any capacity the configuration accepts (up to 2^60 bytes) works.
pub const MAX_BITS_BOUND: u64 = 1 << 28;

/// An ordered set of integers below a bound: [`OrderedBits`] when the bound is at most
/// [`MAX_BITS_BOUND`], an ordered tree beyond.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexSet {
    Bits(OrderedBits),
    Tree(std::collections::BTreeSet<u64>),
}

impl IndexSet {
    pub fn new(bound: u64) -> Self {
        if bound <= MAX_BITS_BOUND {
            IndexSet::Bits(OrderedBits::new(bound))
        } else {
            IndexSet::Tree(Default::default())
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            IndexSet::Bits(b) => b.is_empty(),
            IndexSet::Tree(t) => t.is_empty(),
        }
    }

    #[inline]
    pub fn contains(&self, i: u64) -> bool {
        match self {
            IndexSet::Bits(b) => b.contains(i),
            IndexSet::Tree(t) => t.contains(&i),
        }
    }

    #[inline]
    pub fn insert(&mut self, i: u64) -> bool {
        match self {
            IndexSet::Bits(b) => b.insert(i),
            IndexSet::Tree(t) => t.insert(i),
        }
    }

    #[inline]
    pub fn remove(&mut self, i: u64) -> bool {
        match self {
            IndexSet::Bits(b) => b.remove(i),
            IndexSet::Tree(t) => t.remove(&i),
        }
    }

    #[inline]
    pub fn first(&self) -> Option<u64> {
        match self {
            IndexSet::Bits(b) => b.first(),
            IndexSet::Tree(t) => t.first().copied(),
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            IndexSet::Bits(b) => Box::new(b.iter()),
            IndexSet::Tree(t) => Box::new(t.iter().copied()),
        }
    }
}

/// What an [`OrderedBits`] serialises as.
#[derive(Serialize, Deserialize)]
struct SparseBits {
    bound: u64,
    members: Vec<u64>,
}

impl From<OrderedBits> for SparseBits {
    fn from(b: OrderedBits) -> Self {
        SparseBits {
            bound: b.bound,
            members: b.iter().collect(),
        }
    }
}

impl TryFrom<SparseBits> for OrderedBits {
    type Error = String;
    fn try_from(s: SparseBits) -> Result<Self, String> {
        if s.bound > MAX_BOUND {
            return Err(format!("bound {} above {MAX_BOUND}", s.bound));
        }
        let mut b = OrderedBits::new(s.bound);
        for i in s.members {
            if i >= s.bound {
                return Err(format!("member {i} outside 0..{}", s.bound));
            }
            b.insert(i);
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Any sequence of inserts and removes agrees with an ordered tree.
        #[test]
        fn agrees_with_a_btreeset(
            bound in 1u64..300_000,
            ops in proptest::collection::vec((any::<bool>(), any::<u64>()), 0..400),
        ) {
            let mut bits = OrderedBits::new(bound);
            let mut tree = BTreeSet::new();
            for (add, x) in ops {
                // Half the ops near the ends, where the words and levels change.
                let i = if x % 2 == 0 { x % bound } else { bound - 1 - (x / 2) % bound.min(70) };
                if add {
                    prop_assert_eq!(bits.insert(i), tree.insert(i));
                } else {
                    prop_assert_eq!(bits.remove(i), tree.remove(&i));
                }
                prop_assert_eq!(bits.first(), tree.first().copied());
                prop_assert_eq!(bits.len(), tree.len() as u64);
                prop_assert!(bits.contains(i) == tree.contains(&i));
            }
            prop_assert_eq!(bits.iter().collect::<Vec<_>>(), tree.iter().copied().collect::<Vec<_>>());
            let json = serde_json::to_string(&bits).unwrap();
            let back: OrderedBits = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, bits);
        }
    }

    #[test]
    fn a_huge_bound_is_a_tree_that_behaves_alike() {
        let mut huge = IndexSet::new(1 << 60);
        let mut small = IndexSet::new(1 << 20);
        assert!(matches!(huge, IndexSet::Tree(_)) && matches!(small, IndexSet::Bits(_)));
        for set in [&mut huge, &mut small] {
            assert!(set.insert(700) && set.insert(5) && !set.insert(5));
            assert_eq!(set.first(), Some(5));
            assert!(set.remove(5) && !set.remove(5) && set.contains(700));
            assert_eq!(set.iter().collect::<Vec<_>>(), vec![700]);
        }
    }

    #[test]
    fn out_of_bound_members_are_refused_when_read() {
        let e = serde_json::from_str::<OrderedBits>(r#"{"bound":10,"members":[3,10]}"#);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("member 10 outside 0..10"));
        assert!(!OrderedBits::new(10).contains(10));
    }
}
