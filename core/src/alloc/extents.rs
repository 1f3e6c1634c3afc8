//! The free extents of an arena range, kept twice, by address and by (size, address), and always
//! maximal: two free extents never touch. The free space of `first-fit` and `best-fit`, and the
//! heap under `pool`'s slabs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::arena::{tile, Arena};
use super::layout::LiveBlock;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeExtents {
    /// end → length of every free extent. Keyed by the end, so that carving the front of an
    /// extent (every allocation) updates it in place; disjoint extents sort the same by end as
    /// by start.
    by_end: BTreeMap<u64, u64>,
    /// (length, offset) of every free extent.
    by_size: BTreeSet<(u64, u64)>,
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

    pub fn len(&self) -> usize {
        self.by_end.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_end.is_empty()
    }

    /// (offset, length) of every extent, by address.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.by_end.iter().map(|(&end, &len)| (end - len, len))
    }

    /// The lowest extent.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.by_end
            .first_key_value()
            .map(|(&end, &len)| (end - len, len))
    }

    /// The highest extent.
    pub fn last(&self) -> Option<(u64, u64)> {
        self.by_end
            .last_key_value()
            .map(|(&end, &len)| (end - len, len))
    }

    /// Start of the extent that runs to `end` (the top of the heap), else `end`.
    pub fn top(&self, end: u64) -> u64 {
        match self.last() {
            Some((offset, len)) if offset + len == end => offset,
            _ => end,
        }
    }

    /// Best fit: the smallest extent holding `bytes`, lowest address on ties.
    pub fn best_fit(&self, bytes: u64) -> Option<(u64, u64)> {
        self.by_size
            .range((bytes, 0)..)
            .next()
            .map(|&(len, offset)| (offset, len))
    }

    /// First fit: the lowest-address extent holding `bytes`.
    pub fn first_fit(&self, bytes: u64) -> Option<(u64, u64)> {
        self.iter().find(|&(_, len)| len >= bytes)
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
            .find(|&&(_, offset)| offset != top)
            .map_or(0, |&(len, _)| len);
        hole.max(tail)
    }

    /// Frees `[offset, offset + len)`, coalescing with the extents that touch it.
    pub fn insert(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        // One descent finds both neighbours: the first extent ending at or after `offset` is
        // the one before if it ends exactly there, and the one after it may start at `end`.
        let mut around = self.by_end.range(offset..).map(|(&e, &l)| (e - l, l));
        let (prev, after) = match around.next() {
            Some((p_off, p_len)) if p_off + p_len == offset => {
                (Some((p_off, p_len)), around.next())
            }
            first => (None, first),
        };
        let next = after.filter(|&(start, _)| start == end);
        let start = prev.map_or(offset, |(p_off, _)| p_off);
        if let Some((p_off, p_len)) = prev {
            self.remove(p_off, p_len);
        }
        match next {
            // Growing the extent after keeps its key (its end): update it in place.
            Some((n_off, n_len)) => {
                let total = n_off + n_len - start;
                self.by_size.remove(&(n_len, n_off));
                self.by_size.insert((total, start));
                *self.by_end.get_mut(&(n_off + n_len)).expect("extent after") = total;
            }
            None => self.put(start, end - start),
        }
    }

    /// Takes `bytes` from the front of the extent `(offset, len)`.
    pub fn take(&mut self, offset: u64, len: u64, bytes: u64) {
        debug_assert!(bytes <= len);
        if len == bytes {
            self.remove(offset, len);
            return;
        }
        self.by_size.remove(&(len, offset));
        self.by_size.insert((len - bytes, offset + bytes));
        *self
            .by_end
            .get_mut(&(offset + len))
            .expect("extent taken from") = len - bytes;
    }

    /// Indexes agree, and no extent is empty or touches or overlaps the next.
    pub fn check(&self) -> Result<(), String> {
        if self.by_end.len() != self.by_size.len() {
            return Err("free extent indexes differ in length".into());
        }
        for &(len, offset) in &self.by_size {
            if self.by_end.get(&(offset + len)) != Some(&len) {
                return Err(format!("free extent {offset}+{len} missing by end"));
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
        self.by_end.insert(offset + len, len);
        self.by_size.insert((len, offset));
    }

    fn remove(&mut self, offset: u64, len: u64) {
        let removed = self.by_end.remove(&(offset + len));
        debug_assert_eq!(removed, Some(len));
        self.by_size.remove(&(len, offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_coalesces_and_take_carves_the_front() {
        let mut f = FreeExtents::between(&[], 100);
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
        assert_eq!(
            (f.first(), f.last(), f.len()),
            (Some((0, 100)), Some((0, 100)), 1)
        );
        f.check().unwrap();
    }
}
