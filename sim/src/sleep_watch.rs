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

#[cfg(test)]
mod tests {
    use super::*;
    use gpumem_core::books::Books;
    use gpumem_core::decision::{Decision, Refusal};
    use gpumem_core::digest::Digest;
    use gpumem_core::executor::Ledger;
    use gpumem_core::place::{DeviceId, Place, Tier};
    use gpumem_core::sleep::{SleepLevel, Tag};

    /// Books plus made-up addresses (each range's base moves by `shift` at every map) and a
    /// resident figure that follows the mapped bytes.
    struct Addressed {
        ledger: Ledger,
        shift: u64,
        maps: u64,
    }

    impl Executor for Addressed {
        fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
            if matches!(d, Decision::Map { .. }) {
                self.maps += 1;
            }
            self.ledger.apply(d)
        }
        fn books(&self) -> &Books {
            &self.ledger.books
        }
        fn digest(&self) -> &Digest {
            &self.ledger.digest
        }
        fn segment_base(&self, segment: SegmentId) -> Option<u64> {
            Some(segment.packed() + self.shift * self.maps)
        }
        fn resident_bytes_now(&mut self) -> Option<u64> {
            Some(self.ledger.books.account(Place::GPU0).reserved_bytes)
        }
    }

    fn run(shift: u64) -> SleepObservations {
        let mut exec = Addressed {
            ledger: Ledger::new(Books::with_places(&[
                (Place::GPU0, 1 << 30),
                (Place::new(0, Tier::PinnedHost), 1 << 30),
            ])),
            shift,
            maps: 0,
        };
        let mut pool = CuMemPool::new(DeviceId(0));
        pool.allocate(Tag::Weights, 4 << 20, 1, &mut exec).unwrap();
        pool.allocate(Tag::KvCache, 8 << 20, 0, &mut exec).unwrap();
        let mut watch = SleepWatch::new();
        watch.allocated(&pool, &exec);
        for _ in 0..2 {
            watch.before_sleep(&mut exec);
            pool.sleep(SleepLevel::One, &mut exec).unwrap();
            watch.after_sleep(&mut exec);
            pool.wake_up(None, &mut exec).unwrap();
            watch.after_wake(&pool, &exec);
        }
        watch.observations()
    }

    #[test]
    fn wakes_at_the_first_addresses_are_preserved_and_a_moved_range_is_not() {
        let kept = run(0);
        assert_eq!((kept.sleeps, kept.wakes, kept.ranges_checked), (2, 2, 4));
        assert_eq!(kept.addresses_preserved, Some(true));
        assert_eq!(kept.rss_drop_bytes, Some(2 * (12 << 20)));
        let moved = run(4096);
        assert_eq!(moved.ranges_moved, 4);
        assert_eq!(moved.addresses_preserved, Some(false));
    }

    #[test]
    fn the_books_alone_observe_nothing() {
        let mut exec = Ledger::new(Books::new(1 << 30));
        let mut pool = CuMemPool::new(DeviceId(0));
        pool.allocate(Tag::KvCache, 2 << 20, 0, &mut exec).unwrap();
        let mut watch = SleepWatch::new();
        watch.allocated(&pool, &exec);
        watch.before_sleep(&mut exec);
        watch.after_sleep(&mut exec);
        watch.after_wake(&pool, &exec);
        let o = watch.observations();
        assert_eq!((o.addresses_preserved, o.rss_drop_bytes), (None, None));
        assert_eq!(o.ranges_checked, 0);
    }
}
