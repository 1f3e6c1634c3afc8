//! Placing models on several GPUs: a share of memory goes to the device with the most free
//! memory (`balanced`) or to the first device it fits on (`packed`), over the same
//! [`DeviceSet`] a cluster's replicas run on. Sleep and wake reach every device's
//! [`CuMemPool`] in device order.

use serde::{Deserialize, Serialize};

use crate::executor::Executor;
use crate::place::{DeviceId, DeviceSet};
use crate::sleep::{CuMemPool, SleepError, SleepLevel, SleepStats};

/// How shares are spread over the devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// The device with the most free bytes (ties: the lowest device).
    #[default]
    Balanced,
    /// The lowest device with room.
    Packed,
}

impl Placement {
    pub fn parse(s: &str) -> Result<Placement, String> {
        match s {
            "balanced" => Ok(Placement::Balanced),
            "packed" => Ok(Placement::Packed),
            other => Err(format!("placement '{other}': expected balanced or packed")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Placement::Balanced => "balanced",
            Placement::Packed => "packed",
        }
    }
}

/// Capacity and placed bytes per device.
#[derive(Clone, Debug)]
pub struct MultiGpuMemoryBalancer {
    devices: DeviceSet,
    capacity_bytes: Vec<u64>,
    used_bytes: Vec<u64>,
    placement: Placement,
}

/// Totals over every device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceTotals {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

impl MultiGpuMemoryBalancer {
    /// `capacity_bytes` on every device of `devices`.
    pub fn new(devices: DeviceSet, capacity_bytes: u64, placement: Placement) -> Self {
        let n = devices.len();
        MultiGpuMemoryBalancer {
            devices,
            capacity_bytes: vec![capacity_bytes; n],
            used_bytes: vec![0; n],
            placement,
        }
    }

    /// A device for `bytes` more, charged to it; `None` when no device has room.
    pub fn allocate(&mut self, bytes: u64) -> Option<DeviceId> {
        let fits = |i: &usize| self.free(*i) >= bytes;
        let i = match self.placement {
            Placement::Packed => (0..self.devices.len()).find(fits),
            Placement::Balanced => (0..self.devices.len())
                .filter(fits)
                .max_by_key(|&i| (self.free(i), std::cmp::Reverse(i))),
        }?;
        self.used_bytes[i] += bytes;
        Some(self.devices.device(i))
    }

    /// The device with the fewest placed bytes (ties: the lowest), charged `bytes` even past
    /// its capacity: for policies that hold more than fits at once and swap.
    pub fn oversubscribe(&mut self, bytes: u64) -> DeviceId {
        let i = (0..self.devices.len())
            .min_by_key(|&i| (self.used_bytes[i], i))
            .expect("a set holds a device");
        self.used_bytes[i] = self.used_bytes[i].saturating_add(bytes);
        self.devices.device(i)
    }

    /// Gives `bytes` charged to `device` back.
    pub fn release(&mut self, device: DeviceId, bytes: u64) {
        let i = self.index(device);
        assert!(self.used_bytes[i] >= bytes, "release of more than placed");
        self.used_bytes[i] -= bytes;
    }

    pub fn free_bytes(&self, device: DeviceId) -> u64 {
        self.free(self.index(device))
    }

    pub fn used_bytes(&self, device: DeviceId) -> u64 {
        self.used_bytes[self.index(device)]
    }

    pub fn totals(&self) -> BalanceTotals {
        let capacity_bytes = self.capacity_bytes.iter().sum();
        let used_bytes = self.used_bytes.iter().sum();
        BalanceTotals {
            capacity_bytes,
            used_bytes,
            free_bytes: capacity_bytes.saturating_sub(used_bytes),
        }
    }

    pub fn devices(&self) -> &DeviceSet {
        &self.devices
    }

    fn free(&self, i: usize) -> u64 {
        self.capacity_bytes[i].saturating_sub(self.used_bytes[i])
    }

    fn index(&self, device: DeviceId) -> usize {
        self.devices
            .iter()
            .position(|d| d == device)
            .expect("a device of the set")
    }
}

/// Puts every pool to sleep at `level`, in device order; stops at the first refusal.
pub fn sleep_all(
    pools: &mut [CuMemPool],
    level: SleepLevel,
    exec: &mut dyn Executor,
) -> Result<SleepStats, SleepError> {
    let mut total = SleepStats::default();
    for pool in pools {
        add(&mut total, pool.sleep(level, exec)?);
    }
    Ok(total)
}

/// Wakes every pool, in device order; stops at the first refusal.
pub fn wake_up_all(
    pools: &mut [CuMemPool],
    exec: &mut dyn Executor,
) -> Result<SleepStats, SleepError> {
    let mut total = SleepStats::default();
    for pool in pools {
        add(&mut total, pool.wake_up(None, exec)?);
    }
    Ok(total)
}

fn add(total: &mut SleepStats, s: SleepStats) {
    total.bytes_copied += s.bytes_copied;
    total.bytes_unmapped += s.bytes_unmapped;
    total.bytes_mapped += s.bytes_mapped;
    total.allocations_discarded += s.allocations_discarded;
    total.allocations_uninitialised += s.allocations_uninitialised;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::books::Books;
    use crate::decision::{Decision, Refusal};
    use crate::executor::Ledger;
    use crate::place::{Place, Tier};
    use crate::sleep::Tag;

    #[test]
    fn balanced_takes_the_most_free_device_and_packed_the_first_with_room() {
        let set = DeviceSet::first(3).unwrap();
        let mut b = MultiGpuMemoryBalancer::new(set.clone(), 100, Placement::Balanced);
        let got: Vec<_> = [40, 40, 40, 30, 30]
            .iter()
            .map(|&x| b.allocate(x))
            .collect();
        let d = |i| Some(DeviceId(i));
        assert_eq!(got, [d(0), d(1), d(2), d(0), d(1)]);
        assert_eq!(b.allocate(70), None, "no device has 70 free");
        assert_eq!(b.totals().used_bytes, 180);
        b.release(DeviceId(1), 70);
        assert_eq!(b.allocate(50), d(1));
        // Used 70, 50, 40: the least placed takes what fits nowhere.
        assert_eq!(b.oversubscribe(500), DeviceId(2));
        assert_eq!(b.free_bytes(DeviceId(2)), 0);
        assert_eq!(b.oversubscribe(1), DeviceId(1));

        let mut p = MultiGpuMemoryBalancer::new(set, 100, Placement::Packed);
        let got: Vec<_> = [40, 40, 40, 30].iter().map(|&x| p.allocate(x)).collect();
        assert_eq!(got, [d(0), d(0), d(1), d(1)]);
        assert_eq!(p.free_bytes(DeviceId(2)), 100);
    }

    #[test]
    fn sleep_all_and_wake_up_all_reach_every_device() {
        struct Exec(Ledger);
        impl Executor for Exec {
            fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
                let outcome = self.0.books.admits(&d);
                self.0.record(d, outcome);
                outcome
            }
            fn books(&self) -> &Books {
                &self.0.books
            }
            fn digest(&self) -> &crate::digest::Digest {
                &self.0.digest
            }
        }
        let mib = 1 << 20;
        let places: Vec<(Place, u64)> = (0..2)
            .flat_map(|d| {
                [
                    (Place::gpu(d), 64 * mib),
                    (Place::new(d, Tier::PinnedHost), 64 * mib),
                ]
            })
            .collect();
        let mut x = Exec(Ledger::new(Books::with_places(&places)));
        let mut pools = [CuMemPool::new(DeviceId(0)), CuMemPool::new(DeviceId(1))];
        for (i, pool) in pools.iter_mut().enumerate() {
            pool.allocate(Tag::Weights, 4 * mib, i as u64, &mut x)
                .unwrap();
        }
        let s = sleep_all(&mut pools, SleepLevel::One, &mut x).unwrap();
        assert_eq!(s.bytes_copied, 8 * mib);
        assert_eq!(
            x.books().reserved_bytes_on(DeviceId(1)),
            4 * mib,
            "the backup"
        );
        let s = wake_up_all(&mut pools, &mut x).unwrap();
        assert_eq!(s.bytes_mapped, 8 * mib);
        assert!(pools.iter().all(|p| p.mapped_bytes() == 4 * mib));
    }

    #[test]
    fn placement_names_parse_back() {
        for p in [Placement::Balanced, Placement::Packed] {
            assert_eq!(Placement::parse(p.name()), Ok(p));
        }
        assert!(Placement::parse("spread").is_err());
    }
}
