//! What the allocator tells the device, as PyTorch's memory history traces it: segment events,
//! and the addresses a recording gives new segments.

use serde::{Deserialize, Serialize};

use super::PoolId;

/// The four trace actions that change reserved memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SegmentEventKind {
    /// `segment_alloc`: `cudaMalloc` of a new segment.
    Alloc,
    /// `segment_free`: `cudaFree` of a whole segment.
    Free,
    /// `segment_map`: pages mapped into an expandable range.
    Map,
    /// `segment_unmap`: pages unmapped from an expandable range.
    Unmap,
}

impl SegmentEventKind {
    /// The trace action's name.
    pub fn action(self) -> &'static str {
        match self {
            SegmentEventKind::Alloc => "segment_alloc",
            SegmentEventKind::Free => "segment_free",
            SegmentEventKind::Map => "segment_map",
            SegmentEventKind::Unmap => "segment_unmap",
        }
    }

    /// The kind an action names, if it is a segment event.
    pub fn from_action(action: &str) -> Option<SegmentEventKind> {
        Some(match action {
            "segment_alloc" => SegmentEventKind::Alloc,
            "segment_free" => SegmentEventKind::Free,
            "segment_map" => SegmentEventKind::Map,
            "segment_unmap" => SegmentEventKind::Unmap,
            _ => return None,
        })
    }

    /// Whether the event gives memory back.
    pub fn releases(self) -> bool {
        matches!(self, SegmentEventKind::Free | SegmentEventKind::Unmap)
    }
}

/// One segment event: what, where, how many bytes, on which stream, in which pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentEvent {
    pub kind: SegmentEventKind,
    pub address: u64,
    pub bytes: u64,
    pub stream: u32,
    pub pool: PoolId,
}

/// The address a recording gives a segment the current request creates: a `segment_alloc` of
/// `bytes` (a physical segment), or a `segment_map` (the start of a new virtual range).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressHint {
    pub kind: SegmentEventKind,
    pub address: u64,
    pub bytes: u64,
    pub stream: u32,
    pub pool: PoolId,
}

impl From<SegmentEvent> for AddressHint {
    fn from(e: SegmentEvent) -> Self {
        AddressHint {
            kind: e.kind,
            address: e.address,
            bytes: e.bytes,
            stream: e.stream,
            pool: e.pool,
        }
    }
}
