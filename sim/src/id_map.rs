//! Trace id → value, for the allocation replay: a trace names its allocations by id, and the
//! replay looks one up on every operation.
//!
//! Most traces number their allocations in order (generated traces, and any recorder that
//! counts), so the ids live at once sit in a window `[base, base + len)` not much larger than
//! the live set: those are kept in a deque by `id − base`, found with one subtraction. Ids
//! outside the window (a torch snapshot's ids are addresses; a very old allocation still live)
//! go to a hash map. An id is in one of the two, never both: the window takes in the map's ids
//! of every range it grows over.
//!
//! Memory follows the live count, never the number of operations: the window drops vacant
//! slots at its front, and when it grows past [`WINDOW_SLACK`] times its live entries (plus
//! [`WINDOW_MIN`]), its front entries move to the hash map until it is back within that bound.

use std::collections::VecDeque;

use gpumem_core::fixed_hash::U64Map;

/// A window slot holding nothing.
const VACANT: u64 = u64::MAX;
/// How many vacant ids a new id may skip past the window's end and still extend it.
const GAP_MAX: u64 = 64;
/// The window may hold this many slots per live entry before its front moves to the map...
const WINDOW_SLACK: usize = 4;
/// ... plus this many.
const WINDOW_MIN: usize = 1024;

#[derive(Clone, Debug, Default)]
pub struct IdMap {
    base: u64,
    window: VecDeque<u64>,
    /// Slots of the window that are not [`VACANT`].
    window_live: usize,
    spill: U64Map<u64>,
    /// The largest id ever put in `spill`: no id it holds is larger, so a window growing over
    /// ids above it has nothing to take in from it.
    spill_max: u64,
}

impl IdMap {
    /// Entries held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.window_live + self.spill.len()
    }

    #[inline]
    fn slot(&self, id: u64) -> Option<usize> {
        let offset = id.wrapping_sub(self.base);
        (offset < self.window.len() as u64).then_some(offset as usize)
    }

    #[cfg(test)]
    fn get(&self, id: u64) -> Option<u64> {
        match self.slot(id) {
            Some(i) if self.window[i] != VACANT => Some(self.window[i]),
            _ if self.spill.is_empty() => None,
            _ => self.spill.get(&id).copied(),
        }
    }

    /// Sets `id`'s value (`value` is never `u64::MAX`), returning the one it replaces.
    pub fn insert(&mut self, id: u64, value: u64) -> Option<u64> {
        let (slot, had) = self.value_mut(id, value);
        let old = std::mem::replace(slot, value);
        had.then_some(old)
    }

    /// `id`'s value to read and write, set to `fresh` first if `id` has none (`fresh` is never
    /// `u64::MAX`); and whether it had one. One lookup where reading then inserting take two.
    pub fn value_mut(&mut self, id: u64, fresh: u64) -> (&mut u64, bool) {
        assert_ne!(fresh, VACANT, "u64::MAX is the id map's vacant mark");
        if let Some(i) = self.slot(id) {
            let had = self.window[i] != VACANT;
            if !had {
                self.window[i] = fresh;
                self.window_live += 1;
            }
            return (&mut self.window[i], had);
        }
        if self.window.is_empty() {
            self.base = id;
        }
        if self.extends_window(id) {
            let end = self.base.wrapping_add(self.window.len() as u64);
            // Ids in order skip the hash map altogether: it can hold none of `end..=id` unless
            // its largest id reaches `end`.
            let old = if !self.spill.is_empty() && self.spill_max >= end {
                self.extend_to(id)
            } else {
                for _ in end..id {
                    self.window.push_back(VACANT);
                }
                None
            };
            self.window.push_back(old.unwrap_or(fresh));
            self.window_live += 1;
            // The new entry is live and last: bounding the window never drops it.
            self.bound_window();
            let i = self.window.len() - 1;
            return (&mut self.window[i], old.is_some());
        }
        match self.spill.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => (e.into_mut(), true),
            std::collections::hash_map::Entry::Vacant(e) => {
                self.spill_max = self.spill_max.max(id);
                (e.insert(fresh), false)
            }
        }
    }

    /// Whether `id`, outside the window, is close enough past its end to extend it.
    #[inline]
    fn extends_window(&self, id: u64) -> bool {
        let end = self.base.wrapping_add(self.window.len() as u64);
        id >= self.base && id.wrapping_sub(end) <= GAP_MAX
    }

    /// Grows the window by vacant slots up to (not including) `id`, bringing in any id of that
    /// range the hash map held; returns `id`'s own value from the map, if it had one.
    fn extend_to(&mut self, id: u64) -> Option<u64> {
        let mut next = self.base.wrapping_add(self.window.len() as u64);
        while next < id {
            match self.spill.remove(&next) {
                Some(v) => {
                    self.window.push_back(v);
                    self.window_live += 1;
                }
                None => self.window.push_back(VACANT),
            }
            next += 1;
        }
        self.spill.remove(&id)
    }

    /// Removes `id`, returning its value.
    pub fn remove(&mut self, id: u64) -> Option<u64> {
        if let Some(i) = self.slot(id) {
            let old = std::mem::replace(&mut self.window[i], VACANT);
            if old != VACANT {
                self.window_live -= 1;
                self.drop_vacant_front();
                self.bound_window();
                return Some(old);
            }
        }
        if self.spill.is_empty() {
            None
        } else {
            self.spill.remove(&id)
        }
    }

    fn drop_vacant_front(&mut self) {
        while self.window.front() == Some(&VACANT) {
            self.window.pop_front();
            self.base = self.base.wrapping_add(1);
        }
    }

    /// Keeps the window within [`WINDOW_SLACK`] × live + [`WINDOW_MIN`] slots: its oldest
    /// entries, long-lived allocations that pin its front, move to the hash map.
    fn bound_window(&mut self) {
        while self.window.len() > WINDOW_SLACK * self.window_live + WINDOW_MIN {
            if let Some(v) = self.window.pop_front() {
                if v != VACANT {
                    self.window_live -= 1;
                    self.spill.insert(self.base, v);
                    self.spill_max = self.spill_max.max(self.base);
                }
                self.base = self.base.wrapping_add(1);
            }
            self.drop_vacant_front();
        }
    }

    /// Checks the structure: the live count, the vacant-free front, the bound, and no id in
    /// both halves.
    pub fn check(&self) -> Result<(), String> {
        let live = self.window.iter().filter(|&&v| v != VACANT).count();
        if live != self.window_live {
            return Err(format!(
                "window counts {} live, holds {live}",
                self.window_live
            ));
        }
        if self.window.front() == Some(&VACANT) {
            return Err("window starts with a vacant slot".into());
        }
        if self.window.len() > WINDOW_SLACK * self.window_live + WINDOW_MIN {
            return Err(format!(
                "window of {} slots for {} live",
                self.window.len(),
                self.window_live
            ));
        }
        if let Some(id) = self.spill.keys().find(|&&id| id > self.spill_max) {
            return Err(format!(
                "id {id} in the map is above its largest {}",
                self.spill_max
            ));
        }
        if let Some(id) = self
            .spill
            .keys()
            .find(|&&id| self.slot(id).is_some_and(|i| self.window[i] != VACANT))
        {
            return Err(format!("id {id} is in the window and the map"));
        }
        Ok(())
    }

    /// Slots the window holds (for tests of the memory bound).
    #[cfg(test)]
    fn window_slots(&self) -> usize {
        self.window.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        /// `value_mut(id, fresh)`, then the value it gives set to `then`.
        ValueMut(u64, u64, u64),
    }

    /// Ids near a moving counter (most traces), a few far away (addresses).
    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..200, 0u64..1000).prop_map(|(id, v)| Op::Insert(id, v)),
            1 => (any::<u64>(), 0u64..1000).prop_map(|(id, v)| Op::Insert(id, v)),
            4 => (0u64..200).prop_map(Op::Remove),
            1 => any::<u64>().prop_map(Op::Remove),
            2 => (0u64..200, 0u64..1000, 0u64..1000).prop_map(|(id, f, t)| Op::ValueMut(id, f, t)),
            1 => (any::<u64>(), 0u64..1000, 0u64..1000).prop_map(|(id, f, t)| Op::ValueMut(id, f, t)),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 1..400)) {
            let mut map = IdMap::default();
            let mut model: HashMap<u64, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(id, v) => prop_assert_eq!(map.insert(id, v), model.insert(id, v)),
                    Op::Remove(id) => prop_assert_eq!(map.remove(id), model.remove(&id)),
                    Op::ValueMut(id, fresh, then) => {
                        let had = model.contains_key(&id);
                        let expected = *model.entry(id).or_insert(fresh);
                        let (value, was) = map.value_mut(id, fresh);
                        prop_assert_eq!((*value, was), (expected, had));
                        *value = then;
                        model.insert(id, then);
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                map.check().map_err(TestCaseError::fail)?;
            }
            for (&id, &v) in &model {
                prop_assert_eq!(map.get(id), Some(v));
            }
        }
    }

    #[test]
    fn a_long_lived_id_does_not_make_the_window_grow_with_the_ops() {
        let mut map = IdMap::default();
        map.insert(0, 7);
        for id in 1..200_000u64 {
            map.insert(id, id);
            assert_eq!(map.remove(id), Some(id));
        }
        map.check().unwrap();
        assert!(
            map.window_slots() <= WINDOW_MIN + 1,
            "{}",
            map.window_slots()
        );
        assert_eq!(map.get(0), Some(7));
        assert_eq!(map.len(), 1);
    }

    /// An id taken by the map while far past the window's end is found again, not duplicated,
    /// when the window grows onto it: onto it exactly, and past it over a gap.
    #[test]
    fn the_window_takes_in_the_map_ids_it_grows_over() {
        for (far, last) in [(1_000u64, 1_000u64), (1_000, 1_010)] {
            let mut map = IdMap::default();
            map.insert(0, 0);
            map.insert(far, 77);
            for id in 1..far {
                map.insert(id, id);
            }
            map.check().unwrap();
            if last == far {
                assert_eq!(map.value_mut(far, 5), (&mut 77, true));
            } else {
                map.insert(last, 9);
                assert_eq!(map.get(far), Some(77));
            }
            map.check().unwrap();
            assert_eq!(map.remove(far), Some(77));
            assert_eq!(map.get(far), None);
            assert_eq!(map.len(), far as usize + usize::from(last != far));
        }
    }

    #[test]
    fn ids_in_order_stay_in_the_window() {
        let mut map = IdMap::default();
        for id in 100..5_000u64 {
            map.insert(id, id * 2);
            if id % 3 == 0 {
                map.remove(id - 50);
            }
        }
        map.check().unwrap();
        assert!(map.spill.is_empty());
        assert_eq!(map.get(4_999), Some(9_998));
    }
}
