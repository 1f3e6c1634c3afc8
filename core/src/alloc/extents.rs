//! The free extents of an arena range, always maximal: two free extents never touch. The free
//! space of `first-fit` and `best-fit`, and the heap under `pool`'s slabs.
//!
//! Indexed by (size, address) in a B-tree, for best fit, and by start and by end in hash maps,
//! for coalescing: freeing a block asks only whether an extent ends exactly where it starts or
//! starts exactly where it ends, which a hash answers in O(1) where a second B-tree cost a
//! descent per lookup. Address order is kept only where first fit scans it
//! ([`FreeExtents::with_address_order`]); elsewhere the few walks that want it (checks,
//! layouts) sort.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::arena::{tile, Arena};
use super::layout::LiveBlock;

type OffsetMap = crate::fixed_hash::U64Map<u64>;

/// (length, offset) as one integer, ordered as the pair.
#[inline]
fn size_key(len: u64, offset: u64) -> u128 {
    (len as u128) << 64 | offset as u128
}

/// The (length, offset) of a [`size_key`].
#[inline]
fn unkey(k: u128) -> (u64, u64) {
    ((k >> 64) as u64, k as u64)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeExtents {
    /// start → length of every free extent.
    by_start: OffsetMap,
    /// end → length of every free extent.
    by_end: OffsetMap,
    /// (length, offset) of every free extent, as [`size_key`]: one integer compares faster
    /// than a pair, in the same order.
    by_size: BTreeSet<u128>,
    /// end → length again, in address order, for first fit only. Keyed by the end, so that
    /// carving the front of an extent (every allocation) updates it in place; disjoint
    /// extents sort the same by end as by start.
    by_address: Option<BTreeMap<u64, u64>>,
}

impl FreeExtents {
    /// The gaps of `[0, end)` between `blocks` (address order): with no blocks, the whole range.
    pub fn between(blocks: &[LiveBlock], end: u64) -> Self {
        let mut free = FreeExtents::default();
        tile(blocks, end, |offset, len, live| {
            if live.is_none() {
                free.put(offset, len);
            }
        });
        free
    }

    /// The same extents, also kept in address order (for [`first_fit`](Self::first_fit)).
    pub fn with_address_order(mut self) -> Self {
        self.by_address = Some(self.by_end.iter().map(|(&e, &l)| (e, l)).collect());
        self
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// (offset, length) of every extent, by address.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let sorted: Vec<(u64, u64)> = match &self.by_address {
            Some(_) => Vec::new(),
            None => {
                let mut v: Vec<(u64, u64)> = self.by_start.iter().map(|(&o, &l)| (o, l)).collect();
                v.sort_unstable();
                v
            }
        };
        let ordered = self
            .by_address
            .iter()
            .flat_map(|m| m.iter().map(|(&end, &len)| (end - len, len)));
        ordered.chain(sorted)
    }

    /// The lowest extent.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.iter().next()
    }

    /// Start of the extent that runs to `end` (the top of the heap), else `end`.
    pub fn top(&self, end: u64) -> u64 {
        self.by_end.get(&end).map_or(end, |&len| end - len)
    }

    /// Best fit: the smallest extent holding `bytes`, lowest address on ties.
    pub fn best_fit(&self, bytes: u64) -> Option<(u64, u64)> {
        self.by_size.range(size_key(bytes, 0)..).next().map(|&k| {
            let (len, offset) = unkey(k);
            (offset, len)
        })
    }

    /// First fit: the lowest-address extent holding `bytes`. Panics on extents built without
    /// [`with_address_order`](Self::with_address_order).
    pub fn first_fit(&self, bytes: u64) -> Option<(u64, u64)> {
        self.by_address
            .as_ref()
            .expect("first fit needs the extents in address order")
            .iter()
            .map(|(&end, &len)| (end - len, len))
            .find(|&(_, len)| len >= bytes)
    }

    /// The largest extent inside the arena's mapped memory: every extent but the top lies below
    /// a live block, so is mapped; the top counts for its mapped part only.
    pub fn largest_mapped(&self, arena: &Arena) -> u64 {
        let top = self.top(arena.range_bytes);
        let tail = arena.mapped_part(top, arena.range_bytes - top);
        let hole = self
            .by_size
            .iter()
            .rev()
            .map(|&k| unkey(k))
            .find(|&(_, offset)| offset != top)
            .map_or(0, |(len, _)| len);
        hole.max(tail)
    }

    /// Frees `[offset, offset + len)`, coalescing with the extents that touch it.
    pub fn insert(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut start = offset;
        let mut total = len;
        if let Some(p_len) = self.by_end.remove(&offset) {
            start = offset - p_len;
            total += p_len;
            self.by_start.remove(&start);
            self.by_size.remove(&size_key(p_len, start));
            if let Some(m) = &mut self.by_address {
                m.remove(&offset);
            }
        }
        match self.by_start.remove(&end) {
            // Growing the extent after keeps its end: update it in place.
            Some(n_len) => {
                total += n_len;
                let n_end = end + n_len;
                self.by_size.remove(&size_key(n_len, end));
                self.by_size.insert(size_key(total, start));
                self.by_start.insert(start, total);
                *self.by_end.get_mut(&n_end).expect("extent after") = total;
                if let Some(m) = &mut self.by_address {
                    *m.get_mut(&n_end).expect("extent after") = total;
                }
            }
            None => self.put(start, total),
        }
    }

    /// Takes `bytes` from the front of the extent `(offset, len)`.
    pub fn take(&mut self, offset: u64, len: u64, bytes: u64) {
        debug_assert!(bytes <= len);
        if len == bytes {
            self.remove(offset, len);
            return;
        }
        let rest = len - bytes;
        self.by_size.remove(&size_key(len, offset));
        self.by_size.insert(size_key(rest, offset + bytes));
        self.by_start.remove(&offset);
        self.by_start.insert(offset + bytes, rest);
        *self
            .by_end
            .get_mut(&(offset + len))
            .expect("extent taken from") = rest;
        if let Some(m) = &mut self.by_address {
            *m.get_mut(&(offset + len)).expect("extent taken from") = rest;
        }
    }

    /// Indexes agree, and no extent is empty or touches or overlaps the next.
    pub fn check(&self) -> Result<(), String> {
        let n = self.by_size.len();
        if self.by_start.len() != n
            || self.by_end.len() != n
            || self.by_address.as_ref().is_some_and(|m| m.len() != n)
        {
            return Err("free extent indexes differ in length".into());
        }
        for (len, offset) in self.by_size.iter().map(|&k| unkey(k)) {
            if self.by_end.get(&(offset + len)) != Some(&len) {
                return Err(format!("free extent {offset}+{len} missing by end"));
            }
            if self.by_start.get(&offset) != Some(&len) {
                return Err(format!("free extent {offset}+{len} missing by start"));
            }
            if let Some(m) = &self.by_address {
                if m.get(&(offset + len)) != Some(&len) {
                    return Err(format!("free extent {offset}+{len} missing by address"));
                }
            }
        }
        let mut end = None;
        for (offset, len) in self.iter() {
            if len == 0 {
                return Err(format!("empty free extent at {offset}"));
            }
            if end.is_some_and(|e| e >= offset) {
                return Err(format!("free extents touch at {offset}: not coalesced"));
            }
            end = Some(offset + len);
        }
        Ok(())
    }

    /// Files an extent that touches no other.
    fn put(&mut self, offset: u64, len: u64) {
        debug_assert!(len > 0);
        self.by_start.insert(offset, len);
        self.by_end.insert(offset + len, len);
        self.by_size.insert(size_key(len, offset));
        if let Some(m) = &mut self.by_address {
            m.insert(offset + len, len);
        }
    }

    fn remove(&mut self, offset: u64, len: u64) {
        let removed = self.by_end.remove(&(offset + len));
        debug_assert_eq!(removed, Some(len));
        self.by_start.remove(&offset);
        self.by_size.remove(&size_key(len, offset));
        if let Some(m) = &mut self.by_address {
            m.remove(&(offset + len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_coalesces_and_take_carves_the_front() {
        let mut f = FreeExtents::between(&[], 100).with_address_order();
        f.take(0, 100, 30);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(30, 70)]);
        f.take(30, 70, 20);
        f.insert(10, 10);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(10, 10), (50, 50)]);
        assert_eq!(f.best_fit(5), Some((10, 10)));
        assert_eq!(f.best_fit(11), Some((50, 50)));
        assert_eq!(f.first_fit(5), Some((10, 10)));
        assert_eq!(f.top(100), 50);
        // Touches both neighbours: one extent again.
        f.insert(0, 10);
        f.insert(20, 30);
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![(0, 100)]);
        assert_eq!((f.first(), f.len()), (Some((0, 100)), 1));
        f.check().unwrap();
    }

    /// Without the address order, the same answers (by address through a sort).
    #[test]
    fn hashed_and_ordered_extents_agree() {
        let mut a = FreeExtents::between(&[], 1000);
        let mut b = FreeExtents::between(&[], 1000).with_address_order();
        let mut x = 7u64;
        let mut live: Vec<(u64, u64)> = Vec::new();
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if x >> 63 == 0 || live.is_empty() {
                let bytes = 1 + (x >> 33) % 40;
                assert_eq!(a.best_fit(bytes), b.best_fit(bytes));
                if let Some((o, l)) = a.best_fit(bytes) {
                    a.take(o, l, bytes);
                    b.take(o, l, bytes);
                    live.push((o, bytes));
                }
            } else {
                let (o, l) = live.swap_remove((x >> 20) as usize % live.len());
                a.insert(o, l);
                b.insert(o, l);
            }
            a.check().unwrap();
            b.check().unwrap();
            assert_eq!(a.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
            assert_eq!(a.top(1000), b.top(1000));
        }
    }
}
