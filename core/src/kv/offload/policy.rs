//! The CPU tier's eviction policy, chosen by name as vLLM's `eviction_policy` extra-config
//! key chooses it: `lru` ([`OffloadLru`], vLLM's default) or `arc` ([`OffloadArc`]). One enum,
//! dispatched by `match`; each hook is vLLM's `CachePolicy` hook of the same name, on chunk
//! slots instead of keys.

use serde::{Deserialize, Serialize};

use super::access::RequestAccess;
use super::arc::OffloadArc;
use super::lru::OffloadLru;

/// The policies by name.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OffloadPolicyKind {
    #[default]
    Lru,
    Arc,
}

impl OffloadPolicyKind {
    pub const ALL: [OffloadPolicyKind; 2] = [OffloadPolicyKind::Lru, OffloadPolicyKind::Arc];

    pub fn name(self) -> &'static str {
        match self {
            OffloadPolicyKind::Lru => "lru",
            OffloadPolicyKind::Arc => "arc",
        }
    }

    /// `lru` or `arc`, as vLLM spells them.
    pub fn parse(name: &str) -> Result<OffloadPolicyKind, String> {
        match name {
            "lru" => Ok(OffloadPolicyKind::Lru),
            "arc" => Ok(OffloadPolicyKind::Arc),
            _ => Err(format!(
                "unknown CPU offload policy '{name}'; known: lru, arc"
            )),
        }
    }

    pub fn build(self, num_chunks: u32) -> ChunkPolicy {
        match self {
            OffloadPolicyKind::Lru => ChunkPolicy::Lru(OffloadLru::new(num_chunks)),
            OffloadPolicyKind::Arc => ChunkPolicy::Arc(Box::new(OffloadArc::new(num_chunks))),
        }
    }
}

impl std::fmt::Display for OffloadPolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One finished request's resident chunk, as the policies' finish hook takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedChunk {
    pub chunk: u32,
    /// The request inserted it and did not reuse it.
    pub insertion_only: bool,
    /// The request reused it (offered while ready, or loaded), not having inserted it first.
    pub reused: bool,
}

/// Either policy.
#[derive(Clone, Debug)]
pub enum ChunkPolicy {
    Lru(OffloadLru),
    Arc(Box<OffloadArc>),
}

impl ChunkPolicy {
    pub fn kind(&self) -> OffloadPolicyKind {
        match self {
            ChunkPolicy::Lru(_) => OffloadPolicyKind::Lru,
            ChunkPolicy::Arc(_) => OffloadPolicyKind::Arc,
        }
    }

    /// A new chunk `chunk` (position `idx` of `req`, key `key`), pending its store.
    #[inline]
    pub fn insert(&mut self, chunk: u32, key: u64, idx: u32, req: &mut RequestAccess) {
        match self {
            ChunkPolicy::Lru(p) => p.insert(chunk, idx, req),
            ChunkPolicy::Arc(p) => p.insert(chunk, key),
        }
    }

    /// A chunk leaves without eviction (its store failed).
    pub fn remove(&mut self, chunk: u32) {
        match self {
            ChunkPolicy::Lru(p) => p.remove(chunk),
            ChunkPolicy::Arc(p) => p.remove(chunk),
        }
    }

    /// The store misses of one offer, in offer order, each reported once per request. (vLLM's
    /// LRU treats them as a touch of keys that are not resident: nothing.)
    #[inline]
    pub fn on_store_miss(&mut self, keys: &[u64]) {
        if let ChunkPolicy::Arc(p) = self {
            p.on_store_miss(keys);
        }
    }

    /// Chunks `req` observes for the first time: (position, slot if resident). (ARC: nothing.)
    #[inline]
    pub fn on_request_access(&mut self, new: &[(u32, Option<u32>)], req: &mut RequestAccess) {
        if let ChunkPolicy::Lru(p) = self {
            p.on_request_access(new, req);
        }
    }

    /// `req` finished; its resident observed chunks, tail to head.
    pub fn on_request_finished(&mut self, tail_to_head: &[FinishedChunk], req: &RequestAccess) {
        match self {
            ChunkPolicy::Lru(p) => {
                let chunks: Vec<u32> = tail_to_head.iter().map(|f| f.chunk).collect();
                p.on_request_finished(&chunks, req);
            }
            ChunkPolicy::Arc(p) => {
                let entries: Vec<(u32, bool, bool)> = tail_to_head
                    .iter()
                    .map(|f| (f.chunk, f.insertion_only, f.reused))
                    .collect();
                p.on_request_finished(&entries);
            }
        }
    }

    #[inline]
    pub fn mark_evictable(&mut self, chunk: u32) {
        match self {
            ChunkPolicy::Lru(p) => p.mark_evictable(chunk),
            ChunkPolicy::Arc(p) => p.mark_evictable(chunk),
        }
    }

    #[inline]
    pub fn mark_non_evictable(&mut self, chunk: u32) {
        match self {
            ChunkPolicy::Lru(p) => p.mark_non_evictable(chunk),
            ChunkPolicy::Arc(p) => p.mark_non_evictable(chunk),
        }
    }

    /// Exactly `n` evictable chunks not `protected`, or None (nothing changes). The caller
    /// has checked that `n` unprotected chunks are evictable.
    pub fn evict(
        &mut self,
        n: u32,
        protected: &dyn Fn(u32) -> bool,
        key_of: &dyn Fn(u32) -> u64,
    ) -> Option<Vec<u32>> {
        match self {
            ChunkPolicy::Lru(p) => Some(p.evict(n, protected)),
            ChunkPolicy::Arc(p) => p.evict(n, protected, key_of),
        }
    }

    pub fn check(
        &self,
        resident_key: &dyn Fn(u32) -> Option<u64>,
        evictable: &dyn Fn(u32) -> bool,
    ) -> Result<(), String> {
        match self {
            ChunkPolicy::Lru(p) => p.check(&|c| resident_key(c).is_some(), evictable),
            ChunkPolicy::Arc(p) => p.check(resident_key, evictable),
        }
    }
}
