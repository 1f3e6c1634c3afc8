//! Links between places: how long a transfer of some bytes takes. Plain integer arithmetic,
//! so that a simulated transfer costs the same on every machine.

use serde::{Deserialize, Serialize};

use crate::place::{Place, Tier};

/// A one-way link: a fixed latency per transfer, then bytes at a sustained bandwidth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Sustained bandwidth, bytes per second (> 0).
    pub bytes_per_s: u64,
    /// Fixed cost of one transfer (launch, DMA setup), nanoseconds.
    pub latency_ns: u64,
}

impl Link {
    /// Nanoseconds to move `bytes`: latency + bytes / bandwidth, rounded up, saturating.
    pub fn transfer_ns(&self, bytes: u64) -> u64 {
        let wire = (bytes as u128 * 1_000_000_000).div_ceil(self.bytes_per_s.max(1) as u128);
        self.latency_ns
            .saturating_add(u64::try_from(wire).unwrap_or(u64::MAX))
    }

    /// PCIe of generation `gen` (3 to 6) with `lanes` lanes, at the usual ~80% of the raw rate
    /// that DMA copies sustain; `None` for an unknown generation or a lane count that is not
    /// 1, 2, 4, 8 or 16.
    pub fn pcie(gen: u32, lanes: u32, latency_ns: u64) -> Option<Link> {
        // Raw payload rate of one lane after line coding, bytes per second.
        let lane_bytes_per_s: u64 = match gen {
            3 => 984_615_384,
            4 => 1_969_230_769,
            5 => 3_938_461_538,
            6 => 7_563_000_000,
            _ => return None,
        };
        if ![1, 2, 4, 8, 16].contains(&lanes) {
            return None;
        }
        Some(Link {
            bytes_per_s: lane_bytes_per_s * lanes as u64 / 5 * 4,
            latency_ns,
        })
    }
}

/// Every link a transfer can take, for one node of identical GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Links {
    /// A copy within one GPU's memory (it reads and writes the same HBM).
    pub device_local: Link,
    /// GPU memory to or from pinned host memory: the host link (PCIe, or a C2C link).
    pub host_pinned: Link,
    /// GPU memory to or from pageable host memory: the host link through a staging buffer.
    pub host_pageable: Link,
    /// One GPU's memory to another's: NVLink, or PCIe peer to peer.
    pub peer: Link,
    /// Host memory to host memory (memcpy).
    pub host_memory: Link,
    /// Storage to or from anything.
    pub disk: Link,
}

impl Links {
    /// The link a transfer from `from` to `to` takes.
    pub fn between(&self, from: Place, to: Place) -> Link {
        use Tier::*;
        match (from.tier, to.tier) {
            (Disk, _) | (_, Disk) => self.disk,
            (Gpu, Gpu) if from.device == to.device => self.device_local,
            (Gpu, Gpu) => self.peer,
            (Gpu, PinnedHost) | (PinnedHost, Gpu) => self.host_pinned,
            (Gpu, PageableHost) | (PageableHost, Gpu) => self.host_pageable,
            _ => self.host_memory,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_time_is_latency_plus_wire_time_rounded_up() {
        let l = Link {
            bytes_per_s: 1_000_000_000,
            latency_ns: 10,
        };
        assert_eq!(l.transfer_ns(0), 10);
        assert_eq!(l.transfer_ns(1), 11);
        assert_eq!(l.transfer_ns(1000), 1010);
        assert_eq!(l.transfer_ns(u64::MAX), u64::MAX);
        let pcie5 = Link::pcie(5, 16, 0).unwrap();
        // About 50 GB/s: 1 GiB in about 21 ms.
        let ms = pcie5.transfer_ns(1 << 30) / 1_000_000;
        assert!((20..=23).contains(&ms), "{ms} ms");
        assert!(Link::pcie(2, 16, 0).is_none());
        assert!(Link::pcie(4, 3, 0).is_none());
        assert!(Link::pcie(4, 16, 0).unwrap().bytes_per_s < pcie5.bytes_per_s);
    }

    #[test]
    fn each_pair_of_places_takes_its_link() {
        let link = |n| Link {
            bytes_per_s: n,
            latency_ns: 0,
        };
        let links = Links {
            device_local: link(1),
            host_pinned: link(2),
            host_pageable: link(3),
            peer: link(4),
            host_memory: link(5),
            disk: link(6),
        };
        let g0 = Place::gpu(0);
        let g1 = Place::gpu(1);
        let pinned = Place::new(0, Tier::PinnedHost);
        let pageable = Place::new(1, Tier::PageableHost);
        let disk = Place::new(0, Tier::Disk);
        let by = |a, b| links.between(a, b).bytes_per_s;
        assert_eq!(by(g0, g0), 1);
        assert_eq!(by(g0, pinned), 2);
        assert_eq!(by(pinned, g1), 2);
        assert_eq!(by(pageable, g0), 3);
        assert_eq!(by(g1, g0), 4);
        assert_eq!(by(pinned, pageable), 5);
        assert_eq!(by(disk, g0), 6);
        assert_eq!(by(pinned, disk), 6);
    }
}
