//! Drives a [`TierCache`] with a seeded, skewed access stream, on any executor ([`drive`]), and
//! reports what the simulation models ([`simulate`]): hits, restores, offloads, drops, the
//! bytes each link carried and the time the GPU profile's links take for them.
//!
//! The stream is integer-only: a rank is drawn log-uniformly (an octave `b` uniformly, then a
//! rank uniformly inside `[2^b − 1, 2^(b+1) − 1)`), so rank `r` comes up about as often as
//! `1 / (r + 1)`: a few hot items, a long tail. Randomness comes only from a `ChaCha8Rng`
//! seeded with the workload's seed, and only `u64` ranges are sampled.

use gpumem_core::books::Books;
use gpumem_core::executor::Executor;
use gpumem_core::link::{Link, Links};
use gpumem_core::place::Place;
use gpumem_core::tiers::{TierCache, TierConfig, TierError, TierStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::executor::{AllocCostModel, SimExecutor};
use crate::serve::profile::GpuProfile;

/// Most distinct items and accesses a workload may ask for (bounds time, not memory).
pub const MAX_ITEMS: u64 = 1 << 32;
pub const MAX_ACCESSES: u64 = 1 << 32;

/// A seeded access stream over `items` distinct items.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TierWorkload {
    pub seed: u64,
    pub items: u64,
    pub accesses: u64,
}

impl TierWorkload {
    pub fn validate(&self) -> Result<(), String> {
        if self.items == 0 || self.items > MAX_ITEMS {
            return Err(format!("{} items: must be 1 to {MAX_ITEMS}", self.items));
        }
        if self.accesses > MAX_ACCESSES {
            return Err(format!(
                "{} accesses: at most {MAX_ACCESSES}",
                self.accesses
            ));
        }
        Ok(())
    }

    /// The item ids accessed, in order.
    pub fn stream(&self) -> impl Iterator<Item = u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let items = self.items.max(1);
        (0..self.accesses).map(move |_| item_id(skewed_rank(&mut rng, items)))
    }
}

/// A rank in `[0, items)`, log-uniformly: octave first, then a rank inside it.
fn skewed_rank(rng: &mut ChaCha8Rng, items: u64) -> u64 {
    let octaves = u64::from(u64::BITS - items.leading_zeros()); // floor(log2 items) + 1
    let b = rng.gen_range(0..octaves);
    let lo = (1u64 << b) - 1;
    let hi = (lo + (1u64 << b)).min(items);
    rng.gen_range(lo..hi)
}

/// The content id of rank `r`: a bijective mix, so that distinct ranks are distinct items and
/// ids do not look like small counters.
pub fn item_id(rank: u64) -> u64 {
    let mut x = rank ^ 0x7469_6572_7300_0000;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What one run of the stream did on an executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierRun {
    pub stats: TierStats,
    /// Wrong bytes the executor found at checkpoints (0 for the books alone).
    pub checkpoint_mismatched_bytes: u64,
    /// Digest of the executor's decision stream, the segments' release included.
    pub digest: String,
}

/// Runs `workload` through a fresh cache of `config` on `exec`: reserves the tiers, makes
/// every access, asks the executor to re-check everything every `checkpoint_every` accesses
/// (0: only at the end), walks the cache's invariants at the end and releases the tiers.
pub fn drive<E: Executor + ?Sized>(
    config: TierConfig,
    workload: &TierWorkload,
    checkpoint_every: u64,
    exec: &mut E,
) -> Result<TierRun, TierError> {
    workload.validate().map_err(TierError::Config)?;
    let mut cache = TierCache::new(config, exec)?;
    let mut checkpoint_mismatched_bytes = 0;
    for (i, item) in workload.stream().enumerate() {
        cache.access(item, exec);
        if checkpoint_every > 0 && (i as u64 + 1).is_multiple_of(checkpoint_every) {
            checkpoint_mismatched_bytes += exec.checkpoint();
        }
    }
    checkpoint_mismatched_bytes += exec.checkpoint();
    if let Err(e) = cache.check_invariants() {
        panic!("tier cache invariant broken: {e}");
    }
    let stats = *cache.stats();
    cache.release(exec);
    Ok(TierRun {
        stats,
        checkpoint_mismatched_bytes,
        digest: exec.digest().hex(),
    })
}

/// Transfers one way over one link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkUse {
    pub from: String,
    pub to: String,
    pub transfers: u64,
    pub bytes: u64,
    pub bytes_per_s: u64,
    pub latency_ns: u64,
    /// Modelled time of these transfers.
    pub transfer_ns: u64,
}

impl LinkUse {
    fn new(from: Place, to: Place, link: Link, transfers: u64, item_bytes: u64) -> LinkUse {
        LinkUse {
            from: from.tier.name().into(),
            to: to.tier.name().into(),
            transfers,
            bytes: transfers * item_bytes,
            bytes_per_s: link.bytes_per_s,
            latency_ns: link.latency_ns,
            transfer_ns: transfers.saturating_mul(link.transfer_ns(item_bytes)),
        }
    }
}

/// The simulated run: what the cache did and what it would cost on `gpu`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierReport {
    pub gpu: String,
    pub config: TierConfig,
    pub workload: TierWorkload,
    pub stats: TierStats,
    /// GPU → host (offloads), then host → GPU (restores).
    pub links: Vec<LinkUse>,
    pub transfer_ns_total: u64,
    /// Every decision's modelled time, transfers included.
    pub modelled_ns_total: u64,
    pub digest: String,
}

/// What the transfers of a run cost on `links`: GPU → host (offloads), then host → GPU
/// (restores).
pub fn link_uses(config: &TierConfig, stats: &TierStats, links: &Links) -> Vec<LinkUse> {
    let (g, h) = (config.gpu_place(), config.host_place());
    let item = config.item_bytes;
    vec![
        LinkUse::new(g, h, links.between(g, h), stats.offloads, item),
        LinkUse::new(h, g, links.between(h, g), stats.restores, item),
    ]
}

/// The simulated executor a tier run needs: books with both tiers' capacities, `gpu`'s links.
pub fn sim_executor(config: &TierConfig, gpu: &GpuProfile) -> Result<SimExecutor, String> {
    let books = Books::with_places(&config.capacities());
    Ok(SimExecutor::with_books(
        books,
        AllocCostModel::default(),
        gpu.links()?,
    ))
}

/// Runs `workload` on the simulated executor with `gpu`'s links.
pub fn simulate(
    config: TierConfig,
    workload: &TierWorkload,
    gpu: &GpuProfile,
) -> Result<TierReport, String> {
    let mut exec = sim_executor(&config, gpu)?;
    let run = drive(config, workload, 0, &mut exec).map_err(|e| e.to_string())?;
    let uses = link_uses(&config, &run.stats, &gpu.links()?);
    Ok(TierReport {
        gpu: gpu.name.clone(),
        config,
        workload: *workload,
        stats: run.stats,
        transfer_ns_total: uses.iter().map(|u| u.transfer_ns).sum(),
        links: uses,
        modelled_ns_total: exec.modelled_ns_total(),
        digest: run.digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumem_core::place::{DeviceId, Tier};

    fn config(host_tier: Tier) -> TierConfig {
        TierConfig {
            item_bytes: 64 << 10,
            gpu_slots: 16,
            host_slots: 32,
            host_tier,
            device: DeviceId(0),
        }
    }

    const WORKLOAD: TierWorkload = TierWorkload {
        seed: 7,
        items: 96,
        accesses: 3000,
    };

    fn run(gpu: &str, tier: Tier) -> TierReport {
        let gpu = GpuProfile::resolve(gpu).unwrap();
        simulate(config(tier), &WORKLOAD, &gpu).unwrap()
    }

    #[test]
    fn the_stream_is_seeded_and_skewed() {
        let a: Vec<u64> = WORKLOAD.stream().collect();
        assert_eq!(a, WORKLOAD.stream().collect::<Vec<_>>());
        let other = TierWorkload {
            seed: 8,
            ..WORKLOAD
        };
        assert_ne!(a, other.stream().collect::<Vec<_>>());
        let count = |rank| a.iter().filter(|&&x| x == item_id(rank)).count();
        // Rank 0 is an octave on its own (1/7 of the accesses); the top octave shares 1/7
        // among 33 ranks.
        assert!(count(0) > 300, "{}", count(0));
        assert!(count(0) > 10 * count(90), "{} vs {}", count(0), count(90));
        let distinct: std::collections::BTreeSet<u64> = a.iter().copied().collect();
        assert!(distinct.len() > 80 && distinct.len() <= 96);
        for items in [1, 2, 3, 7, 8, 1000] {
            let w = TierWorkload { items, ..WORKLOAD };
            let max = (0..items)
                .map(item_id)
                .collect::<std::collections::BTreeSet<_>>();
            assert!(w.stream().all(|x| max.contains(&x)));
        }
    }

    #[test]
    fn the_cache_offloads_restores_and_drops_on_the_skewed_stream() {
        let r = run("h100", Tier::PinnedHost);
        let s = r.stats;
        assert_eq!(s.accesses, 3000);
        assert!(s.hits > 1000, "{s:?}");
        assert!(
            s.restores > 100 && s.offloads > s.restores && s.drops > 10,
            "{s:?}"
        );
        assert_eq!(s.lost, 0);
        assert_eq!(r.links[0].transfers, s.offloads);
        assert_eq!(r.links[1].bytes, s.bytes_restored);
        assert_eq!(
            (r.links[0].from.as_str(), r.links[0].to.as_str()),
            ("gpu", "pinned-host")
        );
    }

    #[test]
    fn transfer_time_follows_the_profile_links() {
        let pinned = run("h100", Tier::PinnedHost);
        let pageable = run("h100", Tier::PageableHost);
        let l40s = run("l40s", Tier::PinnedHost);
        // The policy does not depend on the link: the same decisions, other costs.
        assert_eq!(pinned.stats, pageable.stats);
        assert_eq!(pinned.stats, l40s.stats);
        let transfers = pinned.stats.offloads + pinned.stats.restores;
        // H100: PCIe 5.0 x16 at 80% of its raw rate, 10 µs per transfer.
        let pcie5 = Link::pcie(5, 16, 10_000).unwrap();
        assert_eq!(
            pinned.transfer_ns_total,
            transfers * pcie5.transfer_ns(64 << 10)
        );
        // Pageable memory goes through a staging buffer at half the rate.
        let wire = pinned.transfer_ns_total - transfers * 10_000;
        let wire_pageable = pageable.transfer_ns_total - transfers * 10_000;
        assert!(
            wire_pageable.abs_diff(2 * wire) <= transfers,
            "{wire} {wire_pageable}"
        );
        // L40S: PCIe 4.0, half of PCIe 5.0.
        let wire_l40s = l40s.transfer_ns_total - transfers * 10_000;
        assert!(
            wire_l40s.abs_diff(2 * wire) <= transfers,
            "{wire} {wire_l40s}"
        );
        assert!(pinned.transfer_ns_total < l40s.transfer_ns_total);
    }

    #[test]
    fn the_links_account_for_every_transfer_the_executor_charged() {
        let gpu = GpuProfile::resolve("h100").unwrap();
        let c = config(Tier::PageableHost);
        let mut exec = sim_executor(&c, &gpu).unwrap();
        drive(c, &WORKLOAD, 0, &mut exec).unwrap();
        let charged = exec
            .costs()
            .into_iter()
            .find(|k| k.kind == "transfer")
            .unwrap();
        let r = simulate(c, &WORKLOAD, &gpu).unwrap();
        assert_eq!(charged.modelled_ns, r.transfer_ns_total);
        assert_eq!(charged.count, r.stats.offloads + r.stats.restores);
        assert!(r.modelled_ns_total > r.transfer_ns_total);
    }

    #[test]
    fn the_same_seed_gives_the_same_report_bytes() {
        let a = serde_json::to_string(&run("h100", Tier::PinnedHost)).unwrap();
        let b = serde_json::to_string(&run("h100", Tier::PinnedHost)).unwrap();
        assert_eq!(a, b);
        let gpu = GpuProfile::resolve("h100").unwrap();
        let other = TierWorkload {
            seed: 8,
            ..WORKLOAD
        };
        let c = simulate(config(Tier::PinnedHost), &other, &gpu).unwrap();
        assert_ne!(c.digest, run("h100", Tier::PinnedHost).digest);
    }

    #[test]
    fn bad_workloads_are_refused_with_a_reason() {
        let gpu = GpuProfile::resolve("h100").unwrap();
        let empty = TierWorkload {
            items: 0,
            ..WORKLOAD
        };
        let e = simulate(config(Tier::PinnedHost), &empty, &gpu).unwrap_err();
        assert!(e.contains("0 items"), "{e}");
        let huge = TierWorkload {
            accesses: u64::MAX,
            ..WORKLOAD
        };
        let e = simulate(config(Tier::PinnedHost), &huge, &gpu).unwrap_err();
        assert!(e.contains("accesses"), "{e}");
    }
}
