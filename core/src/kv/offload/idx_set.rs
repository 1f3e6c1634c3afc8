//! A set of small indices that answers "the largest member below x" in a few word operations:
//! a bitset with summary levels (bit `j` of word `i` at level `k + 1` says word `64 i + j` of
//! level `k` is not empty), the top level one word. Insert, remove and the queries cost one
//! word per level; levels grow with the largest index (six levels reach 2^36).

/// See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdxSet {
    /// `levels[0]` holds the members; the last level is a single word.
    levels: Vec<Vec<u64>>,
    len: u32,
}

impl IdxSet {
    pub fn new() -> Self {
        IdxSet::default()
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Indices the levels can hold now.
    fn capacity(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64 * 64)
    }

    /// Makes room for index `i`: the bottom level doubles until it reaches `i`, and the summary
    /// levels are rebuilt from it (amortised over the doublings).
    fn grow(&mut self, i: u32) {
        let mut words = self.levels.first().map_or(1, |l| l.len()).max(1);
        while (words as u64) * 64 <= i as u64 {
            words *= 2;
        }
        let mut bottom = std::mem::take(&mut self.levels)
            .into_iter()
            .next()
            .unwrap_or_default();
        bottom.resize(words, 0);
        self.levels.push(bottom);
        while self.levels.last().map_or(0, Vec::len) > 1 {
            let below = self.levels.last().expect("a level");
            let mut up = vec![0u64; below.len().div_ceil(64)];
            for (w, &word) in below.iter().enumerate() {
                if word != 0 {
                    up[w >> 6] |= 1 << (w & 63);
                }
            }
            self.levels.push(up);
        }
    }

    pub fn contains(&self, i: u32) -> bool {
        let w = (i >> 6) as usize;
        self.levels
            .first()
            .and_then(|l| l.get(w))
            .is_some_and(|word| word >> (i & 63) & 1 == 1)
    }

    /// Adds `i`; false if it was there.
    pub fn insert(&mut self, i: u32) -> bool {
        if self.contains(i) {
            return false;
        }
        if i as u64 >= self.capacity() {
            self.grow(i);
        }
        let mut at = i as usize;
        for level in &mut self.levels {
            let w = at >> 6;
            let was = level[w];
            level[w] |= 1u64 << (at & 63);
            // A word that held something is already marked in the level above.
            if was != 0 {
                break;
            }
            at = w;
        }
        self.len += 1;
        true
    }

    /// Removes `i`; false if it was not there.
    pub fn remove(&mut self, i: u32) -> bool {
        if !self.contains(i) {
            return false;
        }
        let mut at = i as usize;
        for level in &mut self.levels {
            let w = at >> 6;
            level[w] &= !(1u64 << (at & 63));
            if level[w] != 0 {
                break;
            }
            at = w;
        }
        self.len -= 1;
        true
    }

    /// The largest member.
    pub fn max(&self) -> Option<u32> {
        self.max_below(u32::MAX)
            .or_else(|| self.contains(u32::MAX).then_some(u32::MAX))
    }

    /// The largest member smaller than `x`.
    pub fn max_below(&self, x: u32) -> Option<u32> {
        if self.len == 0 || x == 0 {
            return None;
        }
        let bound = (x as u64).min(self.capacity());
        if bound == 0 {
            return None;
        }
        // Climb while the word at this level holds nothing below the position.
        let mut pos = bound; // exclusive bound at the current level
        let mut level = 0;
        loop {
            let words = &self.levels[level];
            let last = pos - 1;
            let (w, b) = ((last >> 6) as usize, last & 63);
            let mask = if b == 63 {
                u64::MAX
            } else {
                (1u64 << (b + 1)) - 1
            };
            let word = words[w] & mask;
            if word != 0 {
                let mut at = (w as u64) << 6 | (63 - word.leading_zeros()) as u64;
                // Descend taking the largest member under this summary bit.
                while level > 0 {
                    level -= 1;
                    let word = self.levels[level][at as usize];
                    at = at << 6 | (63 - word.leading_zeros()) as u64;
                }
                return Some(at as u32);
            }
            if w == 0 || level + 1 == self.levels.len() {
                return None;
            }
            pos = w as u64;
            level += 1;
        }
    }

    /// Members in decreasing order (tests and invariant walks).
    pub fn iter_desc(&self) -> impl Iterator<Item = u32> + '_ {
        let mut next = self.max();
        std::iter::from_fn(move || {
            let cur = next?;
            next = self.max_below(cur);
            Some(cur)
        })
    }

    pub fn clear(&mut self) {
        self.levels.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn agrees_with_a_btreeset() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for range in [10u64, 200, 5000, 300_000] {
            let mut s = IdxSet::new();
            let mut b = BTreeSet::new();
            for _ in 0..3000 {
                let i = rnd(range) as u32;
                match rnd(3) {
                    0 | 1 => assert_eq!(s.insert(i), b.insert(i)),
                    _ => assert_eq!(s.remove(i), b.remove(&i)),
                }
                assert_eq!(s.len() as usize, b.len());
                let q = rnd(range + 2) as u32;
                assert_eq!(
                    s.max_below(q),
                    b.range(..q).next_back().copied(),
                    "below {q}"
                );
                assert_eq!(s.max(), b.iter().next_back().copied());
            }
            let all: Vec<u32> = s.iter_desc().collect();
            let want: Vec<u32> = b.iter().rev().copied().collect();
            assert_eq!(all, want);
        }
    }

    #[test]
    fn edges() {
        let mut s = IdxSet::new();
        assert_eq!(s.max(), None);
        assert!(s.insert(0));
        assert!(!s.insert(0));
        assert_eq!(s.max(), Some(0));
        assert_eq!(s.max_below(0), None);
        assert_eq!(s.max_below(1), Some(0));
        assert!(s.insert(4095));
        assert!(s.insert(4096));
        assert_eq!(s.max_below(4096), Some(4095));
        assert!(s.remove(4095));
        assert_eq!(s.max_below(4096), Some(0));
        assert!(!s.remove(7));
        assert_eq!(s.len(), 2);
    }
}
