//! The cache index a KV-aware router holds: which blocks each medium (GPU, CPU, …) of an
//! engine holds, rebuilt from the KV-cache events the engine publishes (vLLM's `BlockStored`,
//! `BlockRemoved`, `AllBlocksCleared`), with each block's parent and token count.
//!
//! Blocks are keyed by (medium, KV-cache group, hash) and copies are counted, because vLLM
//! stores the same hash in several blocks (a recomputed block-aligned prompt) and then removes
//! each copy: a hash leaves the index when its last copy is removed.
//!
//! Decoding the events from a recording is `gpumem-traces`' part (`kv_events`); this module
//! only applies them.

use std::collections::HashMap;

use serde::Serialize;

use super::pool::KvEvent;

/// Distinct media (`"GPU"`, `"CPU"`, …) an index tracks.
pub const MAX_MEDIA: usize = 64;

/// Most distinct blocks (medium, group, hash) the index holds at once: about 1 GB of index,
/// and far more than one engine's pool (a router over many replicas may need to raise it).
pub const MAX_INDEX_BLOCKS: usize = 1 << 22;

/// A block hash as vLLM publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum EventHash {
    /// The default: the digest's last 8 bytes, big-endian.
    Int(u64),
    /// The raw digest.
    Bytes(Vec<u8>),
}

/// One KV-cache event (the fields gpumem reads; others are ignored).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum KvCacheEvent {
    BlockStored {
        block_hashes: Vec<EventHash>,
        parent_block_hash: Option<EventHash>,
        token_ids: Vec<u64>,
        block_size: u64,
        lora_id: Option<i64>,
        medium: Option<String>,
        lora_name: Option<String>,
        group_idx: Option<u64>,
    },
    BlockRemoved {
        block_hashes: Vec<EventHash>,
        medium: Option<String>,
        group_idx: Option<u64>,
    },
    AllBlocksCleared,
}

/// The medium gpumem's engines publish their GPU pool's events under (vLLM's name for it).
pub const POOL_MEDIUM: &str = "GPU";

/// No KV-cache group given (vLLM before group indices, or a stream without them).
const NO_GROUP: u64 = u64::MAX;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    medium: u16,
    group: u64,
    hash: EventHash,
}

#[derive(Clone, Debug)]
struct Entry {
    parent: Option<EventHash>,
    tokens: u64,
    copies: u64,
}

#[derive(Clone, Debug, Default)]
struct MediumCounts {
    stored: u64,
    removed: u64,
    live: u64,
}

/// The cache index a KV-aware router rebuilds from the events: which blocks each medium
/// holds, with each block's parent and token count.
#[derive(Clone, Debug, Default)]
pub struct CacheIndex {
    /// Interned media; index 0 is "no medium given".
    media: Vec<Option<String>>,
    by_medium: Vec<MediumCounts>,
    entries: HashMap<Key, Entry>,
    /// Most distinct blocks held ([`MAX_INDEX_BLOCKS`] unless told otherwise).
    max_blocks: usize,
    live: u64,
    max_live: u64,
    counts: Counts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    block_stored_events: u64,
    blocks_stored: u64,
    tokens_stored: u64,
    duplicate_stores: u64,
    token_count_mismatches: u64,
    block_removed_events: u64,
    blocks_removed: u64,
    removed_unknown: u64,
    all_blocks_cleared: u64,
}

impl CacheIndex {
    pub fn new() -> Self {
        CacheIndex {
            media: vec![None],
            by_medium: vec![MediumCounts::default()],
            max_blocks: MAX_INDEX_BLOCKS,
            ..Default::default()
        }
    }

    /// An index that holds at most `max_blocks` distinct blocks.
    pub fn with_max_blocks(max_blocks: usize) -> Self {
        CacheIndex {
            max_blocks,
            ..Self::new()
        }
    }

    fn medium(&mut self, m: &Option<String>) -> Result<u16, String> {
        if let Some(i) = self.media.iter().position(|x| x == m) {
            return Ok(i as u16);
        }
        if self.media.len() >= MAX_MEDIA {
            return Err(format!("more than {MAX_MEDIA} distinct media"));
        }
        self.media.push(m.clone());
        self.by_medium.push(MediumCounts::default());
        Ok((self.media.len() - 1) as u16)
    }

    /// Applies one event. Errors when the stream names too many distinct media, or would make
    /// the index hold more than [`MAX_INDEX_BLOCKS`] distinct blocks.
    pub fn apply(&mut self, ev: &KvCacheEvent) -> Result<(), String> {
        match ev {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                medium,
                group_idx,
                ..
            } => {
                let m = self.medium(medium)?;
                if (block_hashes.len() as u64).checked_mul(*block_size)
                    != Some(token_ids.len() as u64)
                {
                    self.counts.token_count_mismatches += 1;
                }
                self.counts.tokens_stored += token_ids.len() as u64;
                let group = group_idx.unwrap_or(NO_GROUP);
                self.store(
                    m,
                    group,
                    parent_block_hash.clone(),
                    block_hashes,
                    *block_size,
                )
            }
            KvCacheEvent::BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            } => {
                let m = self.medium(medium)?;
                self.remove(
                    m,
                    group_idx.unwrap_or(NO_GROUP),
                    block_hashes.iter().cloned(),
                );
                Ok(())
            }
            KvCacheEvent::AllBlocksCleared => {
                self.clear();
                Ok(())
            }
        }
    }

    /// Applies an event of gpumem's own block pool, as the engine would publish it: medium
    /// `"GPU"`, no KV-cache group, `block_size` tokens a block. (The pool's events carry no
    /// token ids: the hashes already name the tokens.)
    pub fn apply_pool_event(&mut self, ev: &KvEvent, block_size: u64) -> Result<(), String> {
        let m = self.medium(&Some(POOL_MEDIUM.to_string()))?;
        match ev {
            KvEvent::Stored { parent, hashes } => {
                let hashes: Vec<EventHash> = hashes.iter().map(|h| EventHash::Int(h.0)).collect();
                self.counts.tokens_stored += hashes.len() as u64 * block_size;
                let parent = parent.map(|h| EventHash::Int(h.0));
                self.store(m, NO_GROUP, parent, &hashes, block_size)
            }
            KvEvent::Removed { hash } => {
                self.remove(m, NO_GROUP, std::iter::once(EventHash::Int(hash.0)));
                Ok(())
            }
            KvEvent::AllCleared => {
                self.clear();
                Ok(())
            }
        }
    }

    /// A `BlockStored` of `hashes` (each child of the one before, the first of `parent`).
    fn store(
        &mut self,
        m: u16,
        group: u64,
        mut parent: Option<EventHash>,
        hashes: &[EventHash],
        block_size: u64,
    ) -> Result<(), String> {
        let c = &mut self.counts;
        c.block_stored_events += 1;
        c.blocks_stored += hashes.len() as u64;
        self.by_medium[m as usize].stored += hashes.len() as u64;
        for h in hashes {
            let key = Key {
                medium: m,
                group,
                hash: h.clone(),
            };
            if self.entries.len() >= self.max_blocks && !self.entries.contains_key(&key) {
                return Err(format!(
                    "the stream keeps more than {} distinct blocks live at once (the index's limit, MAX_INDEX_BLOCKS)",
                    self.max_blocks
                ));
            }
            let e = self.entries.entry(key).or_insert_with(|| Entry {
                parent: parent.clone(),
                tokens: block_size,
                copies: 0,
            });
            if e.copies > 0 {
                self.counts.duplicate_stores += 1;
            }
            e.copies += 1;
            self.live += 1;
            self.by_medium[m as usize].live += 1;
            parent = Some(h.clone());
        }
        self.max_live = self.max_live.max(self.live);
        Ok(())
    }

    /// A `BlockRemoved`: one copy of each hash leaves.
    fn remove(&mut self, m: u16, group: u64, hashes: impl ExactSizeIterator<Item = EventHash>) {
        self.counts.block_removed_events += 1;
        self.counts.blocks_removed += hashes.len() as u64;
        self.by_medium[m as usize].removed += hashes.len() as u64;
        for hash in hashes {
            let key = Key {
                medium: m,
                group,
                hash,
            };
            match self.entries.get_mut(&key) {
                Some(e) => {
                    e.copies -= 1;
                    if e.copies == 0 {
                        self.entries.remove(&key);
                    }
                    self.live -= 1;
                    self.by_medium[m as usize].live -= 1;
                }
                None => self.counts.removed_unknown += 1,
            }
        }
    }

    /// vLLM's `reset_prefix_cache`: the index forgets every block, on every medium.
    fn clear(&mut self) {
        self.counts.all_blocks_cleared += 1;
        self.entries.clear();
        self.live = 0;
        for c in &mut self.by_medium {
            c.live = 0;
        }
    }

    /// How many of a request's block hashes, from its first, the index holds on `medium` in
    /// `group`: the prefix a KV-aware router expects the engine to serve from its cache.
    pub fn prefix_blocks(
        &self,
        medium: Option<&str>,
        group: Option<u64>,
        hashes: impl IntoIterator<Item = EventHash>,
    ) -> u64 {
        let Some(m) = self.media.iter().position(|x| x.as_deref() == medium) else {
            return 0;
        };
        let mut key = Key {
            medium: m as u16,
            group: group.unwrap_or(NO_GROUP),
            hash: EventHash::Int(0),
        };
        let mut held = 0;
        for hash in hashes {
            key.hash = hash;
            if !self.entries.contains_key(&key) {
                break;
            }
            held += 1;
        }
        held
    }

    /// Physical blocks holding a hash now (copies counted).
    pub fn blocks_live(&self) -> u64 {
        self.live
    }

    /// Distinct (medium, group, hash) entries now.
    pub fn hashes_live(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Copies of `hash` held on `medium` (None: no medium given) in `group`.
    pub fn copies(&self, medium: Option<&str>, group: Option<u64>, hash: &EventHash) -> u64 {
        let Some(m) = self.media.iter().position(|x| x.as_deref() == medium) else {
            return 0;
        };
        let key = Key {
            medium: m as u16,
            group: group.unwrap_or(NO_GROUP),
            hash: hash.clone(),
        };
        self.entries.get(&key).map_or(0, |e| e.copies)
    }

    /// (depth in blocks, prefix tokens) of the longest chain of live blocks, following parent
    /// links within one medium and group. Deterministic: keys are walked in sorted order, and
    /// a malformed stream's cycle ends a chain.
    pub fn longest_chain(&self) -> (u64, u64) {
        let mut keys: Vec<&Key> = self.entries.keys().collect();
        keys.sort_unstable();
        // (depth, tokens); depth 0 marks a walk in progress.
        let mut memo: HashMap<&Key, (u64, u64)> = HashMap::with_capacity(keys.len());
        let mut best = (0u64, 0u64);
        let mut stack: Vec<(&Key, &Entry)> = Vec::new();
        for &k in &keys {
            if memo.contains_key(k) {
                continue;
            }
            // Walk up to a known ancestor, a root, or a cycle.
            let mut cur = self.entries.get_key_value(k);
            let mut base = (0u64, 0u64);
            while let Some((key, e)) = cur {
                if let Some(&d) = memo.get(key) {
                    base = d; // (0, 0) for a node of this walk: a cycle, cut here
                    break;
                }
                memo.insert(key, (0, 0));
                stack.push((key, e));
                cur = e.parent.as_ref().and_then(|p| {
                    self.entries.get_key_value(&Key {
                        medium: key.medium,
                        group: key.group,
                        hash: p.clone(),
                    })
                });
            }
            while let Some((key, e)) = stack.pop() {
                base = (base.0 + 1, base.1.saturating_add(e.tokens));
                memo.insert(key, base);
                best = best.max(base);
            }
        }
        let tokens = memo.values().map(|d| d.1).max().unwrap_or(0);
        (best.0, tokens)
    }

    /// What the index holds now, and what it has been through.
    pub fn summary(&self) -> IndexSummary {
        let (longest_chain_blocks, longest_chain_tokens) = self.longest_chain();
        let tokens_live = self.entries.values().fold(0u64, |acc, e| {
            acc.saturating_add(e.tokens.saturating_mul(e.copies))
        });
        let c = self.counts;
        IndexSummary {
            block_stored_events: c.block_stored_events,
            blocks_stored: c.blocks_stored,
            tokens_stored: c.tokens_stored,
            duplicate_stores: c.duplicate_stores,
            token_count_mismatches: c.token_count_mismatches,
            block_removed_events: c.block_removed_events,
            blocks_removed: c.blocks_removed,
            removed_unknown: c.removed_unknown,
            all_blocks_cleared: c.all_blocks_cleared,
            blocks_live: self.live,
            hashes_live: self.entries.len() as u64,
            tokens_live,
            max_blocks_live: self.max_live,
            longest_chain_blocks,
            longest_chain_tokens,
            media: self.media_summaries(),
        }
    }

    /// Media that saw a store or a removal, sorted by name ("no medium given" first).
    fn media_summaries(&self) -> Vec<MediumSummary> {
        let mut media: Vec<MediumSummary> = self
            .media
            .iter()
            .zip(&self.by_medium)
            .filter(|(_, c)| c.stored + c.removed > 0)
            .map(|(m, c)| MediumSummary {
                medium: m.clone(),
                blocks_stored: c.stored,
                blocks_removed: c.removed,
                blocks_live: c.live,
            })
            .collect();
        media.sort_by(|a, b| a.medium.cmp(&b.medium));
        media
    }
}

/// What a [`CacheIndex`] holds at one moment, and what it has been through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IndexSummary {
    pub block_stored_events: u64,
    /// Hashes in `BlockStored` events.
    pub blocks_stored: u64,
    /// Token ids in `BlockStored` events.
    pub tokens_stored: u64,
    /// Stored hashes the index already held on that medium (another physical copy).
    pub duplicate_stores: u64,
    /// `BlockStored` events whose token count is not blocks × block_size.
    pub token_count_mismatches: u64,
    pub block_removed_events: u64,
    /// Hashes in `BlockRemoved` events.
    pub blocks_removed: u64,
    /// Removed hashes the index did not hold (recording started late, or a cleared cache).
    pub removed_unknown: u64,
    pub all_blocks_cleared: u64,
    /// Physical blocks holding a hash now (copies counted).
    pub blocks_live: u64,
    /// Distinct (medium, group, hash) now.
    pub hashes_live: u64,
    pub tokens_live: u64,
    /// Most blocks live at any point.
    pub max_blocks_live: u64,
    /// Longest chain of live blocks linked by parent hashes, in blocks, and the most prefix
    /// tokens any live block's chain covers.
    pub longest_chain_blocks: u64,
    pub longest_chain_tokens: u64,
    pub media: Vec<MediumSummary>,
}

/// Blocks of one medium.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MediumSummary {
    /// `"GPU"`, `"CPU"`, … (null when the events gave none).
    pub medium: Option<String>,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub blocks_live: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: std::ops::Range<u64>) -> KvCacheEvent {
        let n = hashes.end - hashes.start;
        KvCacheEvent::BlockStored {
            block_hashes: hashes.map(EventHash::Int).collect(),
            parent_block_hash: None,
            token_ids: vec![1; n as usize * 4],
            block_size: 4,
            lora_id: None,
            medium: Some("GPU".into()),
            lora_name: None,
            group_idx: None,
        }
    }

    #[test]
    fn the_index_refuses_more_distinct_blocks_than_its_limit() {
        let mut index = CacheIndex::with_max_blocks(8);
        index.apply(&stored(0..8)).unwrap();
        // Another copy of a block it holds takes no room.
        index.apply(&stored(3..4)).unwrap();
        let e = index.apply(&stored(8..9)).unwrap_err();
        assert!(e.contains("more than 8 distinct blocks"), "{e}");
        // Removing makes room again.
        let removed = KvCacheEvent::BlockRemoved {
            block_hashes: vec![EventHash::Int(0)],
            medium: Some("GPU".into()),
            group_idx: None,
        };
        index.apply(&removed).unwrap();
        index.apply(&stored(8..9)).unwrap();
        assert_eq!(index.hashes_live(), 8);
    }

    #[test]
    fn a_pool_event_stream_answers_the_prefix_a_request_would_hit() {
        use crate::kv::BlockHash;
        let h = |x: u64| BlockHash(x);
        let mut index = CacheIndex::new();
        let stored = KvEvent::Stored {
            parent: None,
            hashes: vec![h(10), h(11), h(12)],
        };
        index.apply_pool_event(&stored, 16).unwrap();
        let child = KvEvent::Stored {
            parent: Some(h(12)),
            hashes: vec![h(13)],
        };
        index.apply_pool_event(&child, 16).unwrap();
        let ask = |index: &CacheIndex, hs: &[u64]| {
            index.prefix_blocks(
                Some(POOL_MEDIUM),
                None,
                hs.iter().map(|&x| EventHash::Int(x)),
            )
        };
        assert_eq!(ask(&index, &[10, 11, 12, 13, 14]), 4);
        assert_eq!(
            ask(&index, &[10, 99, 12]),
            1,
            "the prefix ends at the first miss"
        );
        assert_eq!(ask(&index, &[11]), 1);
        assert_eq!(
            index.prefix_blocks(Some("CPU"), None, [EventHash::Int(10)]),
            0
        );
        index
            .apply_pool_event(&KvEvent::Removed { hash: h(11) }, 16)
            .unwrap();
        assert_eq!(ask(&index, &[10, 11, 12]), 1);
        let s = index.summary();
        assert_eq!(
            (s.blocks_stored, s.tokens_stored, s.token_count_mismatches),
            (4, 64, 0)
        );
        assert_eq!(s.longest_chain_blocks, 2, "12 → 13 after 11 left");
        index.apply_pool_event(&KvEvent::AllCleared, 16).unwrap();
        assert_eq!(index.blocks_live(), 0);
    }
}
