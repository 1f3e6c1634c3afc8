//! Where memory lives: a device, a tier on (or beside) it, and the policy that owns a segment.
//!
//! A segment's name carries all three ([`crate::decision::SegmentId`]), so several policies
//! share one device without id collisions, and every [`crate::decision::Loc`] says on which
//! device and in which tier its bytes are.

use serde::{Deserialize, Serialize};

/// One accelerator (and the host memory attached to it), numbered from 0.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct DeviceId(pub u16);

/// The devices a run spreads its work over, in the order work is given to them: replica `i`
/// of a cluster runs on the `i`-th; a balancer over several GPUs places its shares on the same
/// set. Numbered from device 0, one device per share (no two shares on one device).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceSet {
    devices: Vec<DeviceId>,
}

impl DeviceSet {
    /// Most devices in a set (one `DeviceId` each).
    pub const MAX_DEVICES: usize = u16::MAX as usize + 1;

    /// Devices `0..count`.
    pub fn first(count: usize) -> Result<DeviceSet, String> {
        if count == 0 || count > Self::MAX_DEVICES {
            return Err(format!(
                "a device set holds 1 to {} devices, not {count}",
                Self::MAX_DEVICES
            ));
        }
        Ok(DeviceSet {
            devices: (0..count).map(|i| DeviceId(i as u16)).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Never: a set holds at least one device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The device of share `i`.
    pub fn device(&self, i: usize) -> DeviceId {
        self.devices[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.devices.iter().copied()
    }
}

/// A kind of memory, fastest first. Host tiers belong to the device whose link reaches them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Device memory (HBM).
    #[default]
    Gpu,
    /// Page-locked host memory: the copy engine reaches it at the link's full bandwidth.
    PinnedHost,
    /// Ordinary host memory: copies go through a staging buffer.
    PageableHost,
    /// Local storage (reserved for model weights loaded from disk; no executor holds it yet).
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Gpu, Tier::PinnedHost, Tier::PageableHost, Tier::Disk];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::PinnedHost => "pinned-host",
            Tier::PageableHost => "pageable-host",
            Tier::Disk => "disk",
        }
    }

    /// Host memory of either kind.
    pub fn is_host(self) -> bool {
        matches!(self, Tier::PinnedHost | Tier::PageableHost)
    }

    fn index(self) -> u64 {
        self as u64
    }
}

/// A device and a tier: the unit the books keep capacity and usage for.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Place {
    pub device: DeviceId,
    pub tier: Tier,
}

impl Place {
    /// Device memory of device 0: where a single-GPU run keeps everything.
    pub const GPU0: Place = Place {
        device: DeviceId(0),
        tier: Tier::Gpu,
    };

    pub const fn new(device: u16, tier: Tier) -> Place {
        Place {
            device: DeviceId(device),
            tier,
        }
    }

    pub fn gpu(device: u16) -> Place {
        Place::new(device, Tier::Gpu)
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device {} {}", self.device.0, self.tier.name())
    }
}

/// The policy that reserved a segment. Each owner numbers its own segments from 0.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Owner {
    /// An allocation strategy's arena or segments (`gpumem alloc`).
    #[default]
    Arena,
    /// The paged KV cache's block pool.
    KvPool,
    /// A KV tier below the GPU pool (CPU offload).
    KvOffload,
    /// Model weights.
    Weights,
    /// CUDA-graph input buffers and other static buffers.
    GraphBuffers,
    /// Scratch memory of tests and the self-test.
    Scratch,
    /// The two tiers of a [`crate::tiers::TierCache`] (items swapped between GPU and host).
    TierCache,
    /// Runtime memory of a sleeping engine (vLLM's `runtime` tag: workspaces, activations).
    Runtime,
}

impl Owner {
    pub fn name(self) -> &'static str {
        match self {
            Owner::Arena => "arena",
            Owner::KvPool => "kv-pool",
            Owner::KvOffload => "kv-offload",
            Owner::Weights => "weights",
            Owner::GraphBuffers => "graph-buffers",
            Owner::Scratch => "scratch",
            Owner::TierCache => "tier-cache",
            Owner::Runtime => "runtime",
        }
    }

    fn index(self) -> u64 {
        self as u64
    }
}

/// Packs (device, tier, owner, index) into one word: `index | owner << 32 | tier << 40 |
/// device << 48`. An arena segment on device 0's GPU memory packs to its bare index, so
/// digests of single-device allocation runs read as they did before segments had places.
pub(crate) fn pack(place: Place, owner: Owner, index: u32) -> u64 {
    index as u64 | owner.index() << 32 | place.tier.index() << 40 | (place.device.0 as u64) << 48
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_set_numbers_its_devices_from_zero() {
        let set = DeviceSet::first(3).unwrap();
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [DeviceId(0), DeviceId(1), DeviceId(2)]
        );
        assert_eq!(set.device(2), DeviceId(2));
        assert!(DeviceSet::first(0).is_err());
        assert!(DeviceSet::first(DeviceSet::MAX_DEVICES + 1).is_err());
    }

    #[test]
    fn packing_is_injective_over_the_fields_and_arena_gpu0_is_the_bare_index() {
        assert_eq!(pack(Place::GPU0, Owner::Arena, 7), 7);
        let mut seen = std::collections::BTreeSet::new();
        for device in [0u16, 1, 65535] {
            for tier in Tier::ALL {
                for owner in [
                    Owner::Arena,
                    Owner::KvPool,
                    Owner::KvOffload,
                    Owner::Scratch,
                    Owner::TierCache,
                    Owner::Runtime,
                ] {
                    for index in [0u32, 1, u32::MAX] {
                        assert!(seen.insert(pack(Place::new(device, tier), owner, index)));
                    }
                }
            }
        }
    }
}
