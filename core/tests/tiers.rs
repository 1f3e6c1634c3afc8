//! The tier cache against a plain reference model: two `Vec`-based LRU lists (least recently
//! used first), searched linearly. Over random access streams both must agree on every
//! outcome, on the order of both tiers, and on every counter; `check_invariants` must hold
//! after every access.

use gpumem_core::books::Books;
use gpumem_core::decision::{Decision, Refusal};
use gpumem_core::digest::Digest;
use gpumem_core::executor::{Executor, Ledger};
use gpumem_core::place::{DeviceId, Tier};
use gpumem_core::tiers::{Access, TierCache, TierConfig};
use proptest::prelude::*;

#[derive(Default)]
struct Model {
    gpu: Vec<u64>,
    host: Vec<u64>,
    gpu_slots: usize,
    host_slots: usize,
    hits: u64,
    restores: u64,
    writes: u64,
    offloads: u64,
    drops: u64,
}

impl Model {
    fn access(&mut self, item: u64) -> Access {
        if let Some(i) = self.gpu.iter().position(|&x| x == item) {
            self.gpu.remove(i);
            self.gpu.push(item);
            self.hits += 1;
            return Access::Hit;
        }
        let on_host = self.host.iter().position(|&x| x == item);
        if let Some(i) = on_host {
            self.host.remove(i);
        }
        if self.gpu.len() == self.gpu_slots {
            let victim = self.gpu.remove(0);
            if self.host.len() == self.host_slots {
                self.host.remove(0);
                self.drops += 1;
            }
            self.host.push(victim);
            self.offloads += 1;
        }
        self.gpu.push(item);
        if on_host.is_some() {
            self.restores += 1;
            Access::Restored
        } else {
            self.writes += 1;
            Access::Written
        }
    }
}

fn config(gpu_slots: u32, host_slots: u32, pinned: bool) -> TierConfig {
    TierConfig {
        item_bytes: 256,
        gpu_slots,
        host_slots,
        host_tier: if pinned {
            Tier::PinnedHost
        } else {
            Tier::PageableHost
        },
        device: DeviceId(0),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_cache_behaves_like_two_plain_lru_lists(
        gpu_slots in 1u32..6,
        host_slots in 1u32..6,
        pinned in any::<bool>(),
        stream in prop::collection::vec(0u64..14, 0..300),
    ) {
        let c = config(gpu_slots, host_slots, pinned);
        let mut ledger = Ledger::new(Books::with_places(&c.capacities()));
        let mut cache = TierCache::new(c, &mut ledger).unwrap();
        let mut model = Model {
            gpu_slots: gpu_slots as usize,
            host_slots: host_slots as usize,
            ..Model::default()
        };
        for &item in &stream {
            let got = cache.access(item, &mut ledger);
            prop_assert_eq!(got, model.access(item), "item {}", item);
            prop_assert_eq!(cache.gpu_items(), model.gpu.clone());
            prop_assert_eq!(cache.host_items(), model.host.clone());
            prop_assert!(cache.check_invariants().is_ok(), "{:?}", cache.check_invariants());
        }
        let s = *cache.stats();
        prop_assert_eq!(
            (s.hits, s.restores, s.writes, s.offloads, s.drops),
            (model.hits, model.restores, model.writes, model.offloads, model.drops)
        );
        prop_assert_eq!((s.lost, s.rewrites), (0, 0));
        prop_assert_eq!(s.bytes_offloaded, model.offloads * 256);
        prop_assert_eq!(s.bytes_restored, model.restores * 256);
        // The books saw both segments, sized for the items and the spare host slot.
        prop_assert_eq!(ledger.books.account(c.host_place()).reserved_bytes, (host_slots as u64 + 1) * 256);
        cache.release(&mut ledger);
        prop_assert_eq!(ledger.books.segment_count(), 0);
    }

    /// Whatever copies an executor refuses, the cache stays well formed, every access is
    /// accounted for, and a refused copy is never counted as an offload, restore or hit.
    #[test]
    fn refused_copies_keep_the_cache_consistent(
        gpu_slots in 1u32..5,
        host_slots in 1u32..5,
        stream in prop::collection::vec(0u64..10, 0..200),
        refuse in prop::collection::vec(any::<bool>(), 0..200),
    ) {
        let c = config(gpu_slots, host_slots, true);
        let mut ex = Refusing {
            ledger: Ledger::new(Books::with_places(&c.capacities())),
            refuse,
            seen: 0,
            refused: 0,
            restores_refused: 0,
            transfers_ok: 0,
            reads_ok: 0,
        };
        let mut cache = TierCache::new(c, &mut ex).unwrap();
        for &item in &stream {
            cache.access(item, &mut ex);
            prop_assert!(cache.check_invariants().is_ok(), "{:?}", cache.check_invariants());
            prop_assert_eq!(cache.tier_of(item), Some(Tier::Gpu));
        }
        let s = *cache.stats();
        prop_assert_eq!(s.transfers_refused + s.reads_refused, ex.refused);
        prop_assert_eq!(s.lost, ex.refused);
        prop_assert_eq!(s.offloads + s.restores, ex.transfers_ok);
        prop_assert_eq!(s.hits, ex.reads_ok);
        // A refused hit or restore is written anew; a refused offload just loses the victim.
        prop_assert_eq!(s.rewrites, s.reads_refused + ex.restores_refused);
    }
}

/// Refuses the n-th transfer or read when `refuse[n]` says so.
struct Refusing {
    ledger: Ledger,
    refuse: Vec<bool>,
    seen: usize,
    refused: u64,
    /// Refused transfers into the GPU tier.
    restores_refused: u64,
    transfers_ok: u64,
    reads_ok: u64,
}

impl Executor for Refusing {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let checked = matches!(d, Decision::Transfer { .. } | Decision::ReadKv { .. });
        if checked {
            let n = self.seen;
            self.seen += 1;
            if self.refuse.get(n).copied().unwrap_or(false) {
                self.refused += 1;
                if let Decision::Transfer { to, .. } = d {
                    self.restores_refused += u64::from(to.segment.place.tier == Tier::Gpu);
                }
                self.ledger.record(d, Err(Refusal::Mismatch));
                return Err(Refusal::Mismatch);
            }
            match d {
                Decision::Transfer { .. } => self.transfers_ok += 1,
                _ => self.reads_ok += 1,
            }
        }
        self.ledger.apply(d)
    }
    fn books(&self) -> &Books {
        &self.ledger.books
    }
    fn digest(&self) -> &Digest {
        &self.ledger.digest
    }
}
