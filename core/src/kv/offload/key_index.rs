//! The CPU tier's index from a chunk's key to the slot holding it, 8 bytes an entry.
//!
//! The manager keeps every occupied slot's key (`keys[slot]`), so the table need not keep it
//! again: an entry is the slot and 32 more bits of the key (a tag), half the 16 bytes of a
//! `HashMap<u64, u32>` entry. The tier can hold a hundred thousand chunks and more, and every
//! chunk offered, stored, evicted or loaded goes through the index at a random place: a table
//! half the size keeps more of it in the processor's cache. A lookup reads a slot's key only
//! when the table's own hash bits and the tag both match (a hit, nearly always), so a miss —
//! most offered chunks are new — costs the table alone.
//!
//! Keys are prefix hashes, well mixed already: the table hashes them as they are.

use hashbrown::HashTable;

#[derive(Clone, Copy, Debug)]
struct Entry {
    tag: u32,
    slot: u32,
}

/// Bits of the key that neither pick a bucket (the low bits, for tables up to 2^25 buckets)
/// nor fill the table's control byte (the top 7).
#[inline]
fn tag(key: u64) -> u32 {
    (key >> 25) as u32
}

#[derive(Clone, Debug, Default)]
pub struct KeyIndex {
    table: HashTable<Entry>,
}

impl KeyIndex {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The slot holding `key`; `keys` is every occupied slot's key.
    #[inline]
    pub fn get(&self, key: u64, keys: &[u64]) -> Option<u32> {
        let t = tag(key);
        self.table
            .find(key, |e| e.tag == t && keys[e.slot as usize] == key)
            .map(|e| e.slot)
    }

    /// Files `slot` under `key`, which no slot holds; `keys` is every occupied slot's key,
    /// `keys[slot] == key` included (a growing table re-files its entries by their keys).
    pub fn insert(&mut self, key: u64, slot: u32, keys: &[u64]) {
        debug_assert_eq!(keys[slot as usize], key);
        debug_assert_eq!(self.get(key, keys), None, "key {key:#x} filed twice");
        self.table.insert_unique(
            key,
            Entry {
                tag: tag(key),
                slot,
            },
            |e| keys[e.slot as usize],
        );
    }

    /// Takes out `slot`, which holds `key`: a slot is filed once, so the slot alone tells its
    /// entry among those the key's hash probes (the tag only spares comparing more). False if
    /// `slot` was not filed.
    pub fn remove(&mut self, key: u64, slot: u32) -> bool {
        let t = tag(key);
        match self.table.find_entry(key, |e| e.slot == slot && e.tag == t) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Every (slot) filed, in no particular order (checks).
    pub fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.table.iter().map(|e| e.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Against a `HashMap` as the model, over keys that share their tag or their low bits
        /// (so that probes meet entries they must not take), through growth and removals.
        #[test]
        fn agrees_with_a_map(ops in prop::collection::vec((0u8..3, 0u64..64, any::<bool>()), 1..400)) {
            let mut index = KeyIndex::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut keys: Vec<u64> = Vec::new();
            let mut free: Vec<u32> = Vec::new();
            for (op, k, same_tag) in ops {
                // Keys built to collide: the same tag with different low bits, or the same
                // low bits with different tags.
                let key = if same_tag { (7u64 << 25) | k } else { (k << 25) | 5 };
                match op {
                    0 | 1 if !model.contains_key(&key) => {
                        let slot = free.pop().unwrap_or_else(|| {
                            keys.push(0);
                            keys.len() as u32 - 1
                        });
                        keys[slot as usize] = key;
                        index.insert(key, slot, &keys);
                        model.insert(key, slot);
                    }
                    _ => {
                        let removed = model.remove(&key);
                        match removed {
                            Some(slot) => {
                                prop_assert!(index.remove(key, slot));
                                keys[slot as usize] = u64::MAX;
                                free.push(slot);
                            }
                            None => prop_assert_eq!(index.get(key, &keys), None),
                        }
                    }
                }
                prop_assert_eq!(index.len(), model.len());
                for (&key, &slot) in &model {
                    prop_assert_eq!(index.get(key, &keys), Some(slot));
                }
                prop_assert_eq!(index.get(key ^ (1 << 40), &keys), model.get(&(key ^ (1 << 40))).copied());
            }
        }
    }

    #[test]
    fn a_slot_whose_key_changed_is_not_found_under_the_old_key() {
        let mut index = KeyIndex::default();
        let mut keys = vec![0u64; 2];
        keys[1] = 0xabcd_0000_1234;
        index.insert(keys[1], 1, &keys);
        assert_eq!(index.get(0xabcd_0000_1234, &keys), Some(1));
        // Same tag and bucket bits would be needed to collide; a different key is a miss.
        assert_eq!(index.get(0xabcd_0000_1235, &keys), None);
        assert!(index.remove(0xabcd_0000_1234, 1));
        assert!(index.is_empty());
        assert!(!index.remove(0xabcd_0000_1234, 1));
    }
}
