//! The decision vocabulary: plain values a policy answers with, which an executor carries out.
//!
//! Every executor (simulated or on real memory) consumes the same stream of decisions. A
//! decision names everything an executor needs to act and to check independently: a `Free`
//! repeats where the block lives, so an executor that disagrees notices.

use serde::{Deserialize, Serialize};

use crate::place::{pack, Owner, Place};

/// One allocation, named by the caller. The driver assigns ids densely from 0, in request order,
/// so policies may index tables by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocId(pub u64);

/// A reserved region of memory: a physical segment (`Reserve`) or a virtual range
/// (`ReserveVa`) whose pages are mapped on demand. It names where it lives (device and tier)
/// and which policy owns it; each owner numbers its segments from 0 and never reuses an index
/// within one run.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentId {
    pub place: Place,
    pub owner: Owner,
    pub index: u32,
}

impl SegmentId {
    pub const fn new(place: Place, owner: Owner, index: u32) -> SegmentId {
        SegmentId {
            place,
            owner,
            index,
        }
    }

    /// Segment `index` of an allocation strategy, in device 0's GPU memory.
    pub const fn arena(index: u32) -> SegmentId {
        SegmentId::new(Place::GPU0, Owner::Arena, index)
    }

    /// One word naming the segment (for digests); distinct segments pack differently.
    pub fn packed(self) -> u64 {
        pack(self.place, self.owner, self.index)
    }
}

impl std::fmt::Debug for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.owner.name(), self.index)?;
        if self.place != Place::GPU0 {
            write!(f, "@{}", self.place)?;
        }
        Ok(())
    }
}

/// A place in memory: an offset inside a segment (which names the device and tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Loc {
    pub segment: SegmentId,
    pub offset: u64,
}

impl Loc {
    /// The start of `segment`.
    pub const fn at(segment: SegmentId) -> Loc {
        Loc { segment, offset: 0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Obtain `bytes` of physical memory as a new segment (cudaMalloc). May be refused.
    Reserve { segment: SegmentId, bytes: u64 },
    /// Return a whole segment (cudaFree). It holds no live block.
    Release { segment: SegmentId },
    /// Reserve a virtual address range; no memory is committed until `Map`. May be refused
    /// (a device with less address space).
    ReserveVa { segment: SegmentId, bytes: u64 },
    /// Free a virtual range; all its pages are unmapped.
    ReleaseVa { segment: SegmentId },
    /// Back `[offset, offset + bytes)` of a virtual range with physical memory. May be refused.
    Map {
        segment: SegmentId,
        offset: u64,
        bytes: u64,
    },
    /// Return the physical memory behind `[offset, offset + bytes)`; no live block lies there.
    Unmap {
        segment: SegmentId,
        offset: u64,
        bytes: u64,
    },
    /// Allocation `id` now lives at `at`, occupying `bytes` (the rounded block size).
    Place { id: AllocId, at: Loc, bytes: u64 },
    /// Allocation `id`, which lived at `at` with `bytes`, is dead; its memory may be reused.
    Free { id: AllocId, at: Loc, bytes: u64 },
    /// Move the live allocation `id` from `from` to `to` (copy its bytes, then forget `from`).
    Move {
        id: AllocId,
        from: Loc,
        to: Loc,
        bytes: u64,
    },
    /// A KV block at `at` now holds the keys and values of `content` (its chained prefix hash
    /// when full, a per-request value while it fills).
    WriteKv { at: Loc, bytes: u64, content: u64 },
    /// The policy is about to serve the block at `at` as a prefix hit, expecting `content`. An
    /// executor that finds other bytes there refuses with `Refusal::Mismatch`: the hit must not
    /// count.
    ReadKv { at: Loc, bytes: u64, content: u64 },
    /// Copy `bytes` that hold `content` from `from` to `to`: tier to tier or device to device.
    /// The source keeps its bytes; the destination holds `content` afterwards. An executor
    /// that finds other bytes at the source, or in the copy, refuses with
    /// `Refusal::Mismatch`: the copy must not be used.
    Transfer {
        from: Loc,
        to: Loc,
        bytes: u64,
        content: u64,
    },
}

/// Why an executor could not carry out a `Reserve` or `Map` (or, for `ReadKv` and
/// `Transfer`, why their bytes cannot be used).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The configured capacity would be exceeded (the simulator's books say no).
    Capacity,
    /// The device itself refused although the books had room.
    Device,
    /// A seeded fault injection refused it.
    Injected,
    /// A `ReadKv` or `Transfer` found bytes other than the content the policy expected.
    Mismatch,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}+{}", self.segment, self.offset)
    }
}

/// A decision as a sentence for people: `map of 2097152 bytes at arena#0+0`.
impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind();
        match *self {
            Decision::Reserve { segment, bytes } | Decision::ReserveVa { segment, bytes } => {
                write!(f, "{kind} of {bytes} bytes as {segment:?}")
            }
            Decision::Release { segment } | Decision::ReleaseVa { segment } => {
                write!(f, "{kind} of {segment:?}")
            }
            Decision::Map {
                segment,
                offset,
                bytes,
            }
            | Decision::Unmap {
                segment,
                offset,
                bytes,
            } => write!(f, "{kind} of {bytes} bytes at {segment:?}+{offset}"),
            Decision::Place { id, at, bytes } | Decision::Free { id, at, bytes } => {
                write!(f, "{kind} of allocation {} ({bytes} bytes) at {at}", id.0)
            }
            Decision::Move {
                id,
                from,
                to,
                bytes,
            } => write!(
                f,
                "move of allocation {} ({bytes} bytes) from {from} to {to}",
                id.0
            ),
            Decision::WriteKv { at, bytes, content } | Decision::ReadKv { at, bytes, content } => {
                write!(f, "{kind} of content {content:#x} ({bytes} bytes) at {at}")
            }
            Decision::Transfer {
                from,
                to,
                bytes,
                content,
            } => write!(
                f,
                "transfer of content {content:#x} ({bytes} bytes) from {from} to {to}"
            ),
        }
    }
}

impl Decision {
    /// A short name per kind, for per-kind timing tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Reserve { .. } => "reserve",
            Decision::Release { .. } => "release",
            Decision::ReserveVa { .. } => "reserve_va",
            Decision::ReleaseVa { .. } => "release_va",
            Decision::Map { .. } => "map",
            Decision::Unmap { .. } => "unmap",
            Decision::Place { .. } => "place",
            Decision::Free { .. } => "free",
            Decision::Move { .. } => "move",
            Decision::WriteKv { .. } => "write_kv",
            Decision::ReadKv { .. } => "read_kv",
            Decision::Transfer { .. } => "transfer",
        }
    }

    /// Stable index per kind (digest tag and table position).
    pub fn kind_index(&self) -> usize {
        match self {
            Decision::Reserve { .. } => 0,
            Decision::Release { .. } => 1,
            Decision::ReserveVa { .. } => 2,
            Decision::ReleaseVa { .. } => 3,
            Decision::Map { .. } => 4,
            Decision::Unmap { .. } => 5,
            Decision::Place { .. } => 6,
            Decision::Free { .. } => 7,
            Decision::Move { .. } => 8,
            Decision::WriteKv { .. } => 9,
            Decision::ReadKv { .. } => 10,
            Decision::Transfer { .. } => 11,
        }
    }

    pub const KIND_NAMES: [&'static str; 12] = [
        "reserve",
        "release",
        "reserve_va",
        "release_va",
        "map",
        "unmap",
        "place",
        "free",
        "move",
        "write_kv",
        "read_kv",
        "transfer",
    ];
}
