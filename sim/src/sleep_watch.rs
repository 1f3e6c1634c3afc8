//! What an executor observes of vLLM's sleep and wake ([`CuMemPool`]) on real memory: whether
//! every wake found each range at the address it had when it was allocated (the executor's own
//! bases, [`Executor::segment_base`]), and how much resident memory each sleep gave back
//! ([`Executor::resident_bytes_now`]). It only watches: no decision depends on what it sees,
//! so a run on the simulator (which observes nothing) and on a device make the same decisions.

use std::collections::BTreeMap;

use serde::Serialize;

use gpumem_core::decision::SegmentId;
use gpumem_core::executor::Executor;
use gpumem_core::sleep::CuMemPool;

/// What the watch saw over a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SleepObservations {
    pub sleeps: u64,
    pub wakes: u64,
    /// Ranges whose base was compared after a wake, summed over the wakes.
    pub ranges_checked: u64,
    /// Ranges found at another base than at allocation (or with none) after a wake.
    pub ranges_moved: u64,
    /// True when every wake found every range at its first base (`None`: the executor has no
    /// addresses, e.g. the simulator).
    pub addresses_preserved: Option<bool>,
    /// Resident memory given back by the sleeps, as the device measured it right before and
    /// right after each (summed; a sleep after which more was resident counts 0). At
    /// `--weight-bytes-scale 1/K` this is real memory, about 1/K of what the decisions name.
    /// `None`: the executor measures nothing.
    pub rss_drop_bytes: Option<u64>,
    /// Wakes whose host backup was refused as corrupted (the weights were reloaded instead).
    pub restores_refused: u64,
}

/// Watches the sleeps and wakes of any number of pools; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct SleepWatch {
    first_bases: BTreeMap<SegmentId, Option<u64>>,
    resident_before: Option<u64>,
    obs: SleepObservations,
}

impl SleepWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records where `pool`'s ranges are now (call once, after its allocations).
    pub fn allocated(&mut self, pool: &CuMemPool, exec: &dyn Executor) {
        for h in pool.handles() {
            let segment = pool.segment(h);
            self.first_bases
                .entry(segment)
                .or_insert_with(|| exec.segment_base(segment));
        }
    }

    pub fn before_sleep(&mut self, exec: &mut dyn Executor) {
        self.resident_before = exec.resident_bytes_now();
    }

    pub fn after_sleep(&mut self, exec: &mut dyn Executor) {
        self.obs.sleeps += 1;
        let after = exec.resident_bytes_now();
        if let (Some(before), Some(after)) = (self.resident_before.take(), after) {
            let drop = before.saturating_sub(after);
            self.obs.rss_drop_bytes = Some(self.obs.rss_drop_bytes.unwrap_or(0) + drop);
        }
    }

    /// Compares the base of each of `pool`'s ranges with the one it had at allocation.
    pub fn after_wake(&mut self, pool: &CuMemPool, exec: &dyn Executor) {
        self.obs.wakes += 1;
        for h in pool.handles() {
            let segment = pool.segment(h);
            let now = exec.segment_base(segment);
            let first = self.first_bases.get(&segment).copied().flatten();
            if first.is_none() && now.is_none() {
                continue; // no addresses to compare (the simulator)
            }
            self.obs.ranges_checked += 1;
            if first != now {
                self.obs.ranges_moved += 1;
            }
        }
    }

    pub fn restore_refused(&mut self) {
        self.obs.restores_refused += 1;
    }

    pub fn observations(&self) -> SleepObservations {
        let mut obs = self.obs.clone();
        let seen = self.first_bases.values().any(Option::is_some);
        obs.addresses_preserved = seen.then_some(obs.ranges_moved == 0);
        obs
    }
}
