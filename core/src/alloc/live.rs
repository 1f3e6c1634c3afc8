//! Live allocations by `AllocId`: a dense id → slot index (4 bytes per id ever seen) in front of
//! a compact table of records, so that lookups stay in cache however many ids a run has used.

use serde::{Deserialize, Serialize};

use crate::decision::AllocId;

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTable<T> {
    slot_of: Vec<u32>,
    records: Vec<(AllocId, T)>,
}

impl<T> Default for LiveTable<T> {
    fn default() -> Self {
        LiveTable {
            slot_of: Vec::new(),
            records: Vec::new(),
        }
    }
}

impl<T> LiveTable<T> {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Panics if `id` is live already: the driver never reuses an id.
    pub fn insert(&mut self, id: AllocId, record: T) {
        let i = usize::try_from(id.0).expect("id fits in memory");
        if i >= self.slot_of.len() {
            self.slot_of.resize(i + 1, NONE);
        }
        assert_eq!(self.slot_of[i], NONE, "{id:?} allocated twice");
        self.slot_of[i] = u32::try_from(self.records.len()).expect("fewer than 2^32 live");
        self.records.push((id, record));
    }

    /// Panics if `id` is not live: the driver filters unknown frees.
    pub fn remove(&mut self, id: AllocId) -> T {
        let slot = self
            .slot(id)
            .unwrap_or_else(|| panic!("{id:?} is not live"));
        self.slot_of[id.0 as usize] = NONE;
        let (_, record) = self.records.swap_remove(slot);
        if let Some(&(moved, _)) = self.records.get(slot) {
            self.slot_of[moved.0 as usize] = slot as u32;
        }
        record
    }

    pub fn get(&self, id: AllocId) -> Option<&T> {
        self.slot(id).map(|s| &self.records[s].1)
    }

    pub fn get_mut(&mut self, id: AllocId) -> Option<&mut T> {
        self.slot(id).map(|s| &mut self.records[s].1)
    }

    /// Every live record, in no particular (but deterministic) order.
    pub fn iter(&self) -> impl Iterator<Item = (AllocId, &T)> + '_ {
        self.records.iter().map(|(id, r)| (*id, r))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (AllocId, &mut T)> + '_ {
        self.records.iter_mut().map(|(id, r)| (*id, r))
    }

    fn slot(&self, id: AllocId) -> Option<usize> {
        match self.slot_of.get(usize::try_from(id.0).ok()?) {
            Some(&s) if s != NONE => Some(s as usize),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_lookup_follow_moves() {
        let mut t = LiveTable::default();
        for i in 0..4 {
            t.insert(AllocId(i * 10), i);
        }
        assert_eq!(t.remove(AllocId(10)), 1);
        // The last record moved into the freed slot and is still found.
        assert_eq!(t.get(AllocId(30)), Some(&3));
        assert_eq!(t.get(AllocId(10)), None);
        assert_eq!(t.get(AllocId(1 << 40)), None);
        *t.get_mut(AllocId(0)).unwrap() = 7;
        let mut all: Vec<(u64, u64)> = t.iter().map(|(id, &r)| (id.0, r)).collect();
        all.sort();
        assert_eq!(all, vec![(0, 7), (20, 2), (30, 3)]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    #[should_panic(expected = "allocated twice")]
    fn an_id_cannot_be_live_twice() {
        let mut t = LiveTable::default();
        t.insert(AllocId(1), ());
        t.insert(AllocId(1), ());
    }
}
