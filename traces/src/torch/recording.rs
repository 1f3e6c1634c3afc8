//! A snapshot as a recording of PyTorch's caching allocator, for replaying it event by event and
//! comparing segment events ([`Recording`]): every device's trace with every action kept
//! (segment events, `free_requested`, `oom` included), its final segments with their blocks'
//! addresses, sizes, requested sizes and states, and the allocator settings.
//!
//! Streams are dense indices as in [`crate::torch`] (0 stays 0, others by first appearance over
//! the whole file); private pools (`segment_pool_id` other than `(0, 0)`) are numbered 1, 2, …
//! by first appearance.

use std::collections::BTreeMap;
use std::path::Path;

use gpumem_core::alloc::caching::{CachingSettings, PoolId, SegmentEventKind, SizePool};
use serde::{Deserialize, Serialize};

use super::{list_of, req_size, req_uint, require, uint, Streams};
use crate::error::TraceError;
use crate::pickle::{self, Value};

/// What one trace entry did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Alloc,
    FreeRequested,
    FreeCompleted,
    Segment(SegmentEventKind),
    /// A request the allocator refused (`size` is the rounded request).
    Oom,
    /// `snapshot` and actions gpumem does not know.
    Other,
}

/// One trace entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// 1-based index in the device's trace.
    pub index: u64,
    pub action: Action,
    /// 0 for an `oom` (which has no address).
    pub address: u64,
    pub bytes: u64,
    pub stream: u32,
}

/// A block's state in the final segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockState {
    Allocated,
    /// Freed by the program, still in use on another stream.
    PendingFree,
    Inactive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBlock {
    pub address: u64,
    pub bytes: u64,
    /// The request behind a live block (its size when the snapshot does not say).
    pub requested_bytes: u64,
    pub state: BlockState,
}

impl SnapshotBlock {
    pub fn live(&self) -> bool {
        self.state != BlockState::Inactive
    }
}

/// A segment as the snapshot lists it (for expandable segments: one mapped range).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSegment {
    pub address: u64,
    pub bytes: u64,
    pub stream: u32,
    pub pool: PoolId,
    pub size_pool: SizePool,
    pub expandable: bool,
    /// In address order.
    pub blocks: Vec<SnapshotBlock>,
}

/// One device's allocator: its trace and its segments at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecording {
    pub device: u32,
    pub events: Vec<RecordedEvent>,
    /// In address order.
    pub segments: Vec<SnapshotSegment>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    pub name: String,
    /// `allocator_settings`, when the snapshot holds them.
    pub settings: Option<CachingSettings>,
    /// Every device with a trace entry or a segment, in device order.
    pub devices: Vec<DeviceRecording>,
}

/// Reads a snapshot pickle as a recording.
pub fn read(path: &Path) -> Result<Recording, TraceError> {
    let mut input = crate::read::open(path)?;
    let bytes = super::read_snapshot_bytes(&mut *input, path)?;
    if !crate::looks_like_pickle(&bytes) {
        return Err(TraceError::in_file(
            path,
            "not a PyTorch memory snapshot (a pickle): only a snapshot records segment events",
        ));
    }
    let v = pickle::parse(&bytes).map_err(|e| TraceError::from_pickle(path, e))?;
    from_value(path, &v)
}

/// Converts an unpickled snapshot.
pub fn from_value(path: &Path, root: &Value) -> Result<Recording, TraceError> {
    from_value_with_streams(path, root).map(|(r, _)| r)
}

/// [`from_value`], and the raw stream values behind the dense indices.
pub(crate) fn from_value_with_streams(
    path: &Path,
    root: &Value,
) -> Result<(Recording, Streams), TraceError> {
    let file_err = |r: String| TraceError::in_file(path, r);
    if root.as_dict().is_none() {
        return Err(file_err(format!(
            "a snapshot must be a dict, found {}",
            root.type_name()
        )));
    }
    let segments = require(root, "segments")
        .and_then(|v| list_of(v, "segments"))
        .map_err(file_err)?;
    let traces = require(root, "device_traces")
        .and_then(|v| list_of(v, "device_traces"))
        .map_err(file_err)?;
    let settings = match root.get("allocator_settings") {
        None | Some(Value::None) => None,
        Some(v) => Some(super::alloc_conf::from_snapshot(v).map_err(file_err)?),
    };
    let mut streams = Streams::default();
    let mut pools = Pools::default();
    let mut devices: BTreeMap<u32, DeviceRecording> = BTreeMap::new();
    let device_of = |d: u32| DeviceRecording {
        device: d,
        events: Vec::new(),
        segments: Vec::new(),
    };
    for (d, t) in traces.iter().enumerate() {
        let entries = list_of(t, &format!("device_traces[{d}]")).map_err(file_err)?;
        if entries.is_empty() {
            continue;
        }
        let d = u32::try_from(d).map_err(|_| file_err("too many devices".into()))?;
        let dev = devices.entry(d).or_insert_with(|| device_of(d));
        for (i, e) in entries.iter().enumerate() {
            let index = i as u64 + 1;
            let ev = event(e, index, &mut streams)
                .map_err(|r| TraceError::at_event(path, index, format!("device {d}: {r}")))?;
            dev.events.push(ev);
        }
    }
    for (si, s) in segments.iter().enumerate() {
        let seg = segment(s, &mut streams, &mut pools)
            .map_err(|r| file_err(format!("segments[{si}]: {r}")))?;
        let d = match s.get("device") {
            None | Some(Value::None) => 0,
            Some(v) => uint(v, "device")
                .and_then(|d| u32::try_from(d).map_err(|_| format!("device {d} is too large")))
                .map_err(|r| file_err(format!("segments[{si}]: {r}")))?,
        };
        devices
            .entry(d)
            .or_insert_with(|| device_of(d))
            .segments
            .push(seg);
    }
    let mut devices: Vec<DeviceRecording> = devices.into_values().collect();
    for d in &mut devices {
        d.segments.sort_by_key(|s| s.address);
        for w in d.segments.windows(2) {
            if w[0].address.saturating_add(w[0].bytes) > w[1].address {
                return Err(file_err(format!(
                    "device {}: the segments at {:#x} and {:#x} overlap",
                    d.device, w[0].address, w[1].address
                )));
            }
        }
    }
    let recording = Recording {
        name: crate::AllocTrace::named_after(path, crate::TraceSource::TorchTrace).name,
        settings,
        devices,
    };
    Ok((recording, streams))
}

fn event(e: &Value, index: u64, streams: &mut Streams) -> Result<RecordedEvent, String> {
    if e.as_dict().is_none() {
        return Err(format!(
            "a trace entry must be a dict, found {}",
            e.type_name()
        ));
    }
    let act = require(e, "action")?;
    let act = act
        .as_str()
        .ok_or_else(|| format!("action must be a string, found {}", act.type_name()))?;
    let action = match act {
        "alloc" => Action::Alloc,
        "free_requested" => Action::FreeRequested,
        "free_completed" => Action::FreeCompleted,
        "oom" => Action::Oom,
        a => SegmentEventKind::from_action(a).map_or(Action::Other, Action::Segment),
    };
    let (address, bytes) = match action {
        Action::Other => (0, 0),
        Action::Oom => (
            0,
            e.get("size")
                .map_or(Ok(0), |v| super::byte_size(v, "size"))?,
        ),
        _ => (req_uint(e, "addr")?, req_size(e, "size")?),
    };
    Ok(RecordedEvent {
        index,
        action,
        address,
        bytes,
        stream: streams.index(e)?,
    })
}

/// Dense private-pool ids: (0, 0) is the default pool.
#[derive(Default)]
struct Pools(BTreeMap<(i128, i128), PoolId>);

impl Pools {
    fn id(&mut self, v: Option<&Value>) -> Result<PoolId, String> {
        let Some(v) = v.filter(|v| !matches!(v, Value::None)) else {
            return Ok(0);
        };
        let pair = v
            .as_list()
            .filter(|p| p.len() == 2)
            .and_then(|p| Some((p[0].as_i128()?, p[1].as_i128()?)))
            .ok_or_else(|| {
                format!(
                    "segment_pool_id must be a pair of integers, found {}",
                    v.type_name()
                )
            })?;
        if pair == (0, 0) {
            return Ok(0);
        }
        let next = self.0.len() as PoolId + 1;
        Ok(*self.0.entry(pair).or_insert(next))
    }
}

fn segment(s: &Value, streams: &mut Streams, pools: &mut Pools) -> Result<SnapshotSegment, String> {
    if s.as_dict().is_none() {
        return Err(format!("must be a dict, found {}", s.type_name()));
    }
    let address = req_uint(s, "address")?;
    let bytes = req_size(s, "total_size")?;
    let stream = streams.index(s)?;
    let small = match s.get("segment_type") {
        Some(v) => {
            v.as_str()
                .ok_or_else(|| format!("segment_type must be a string, found {}", v.type_name()))?
                == "small"
        }
        None => bytes == 2 << 20,
    };
    let expandable = match s.get("is_expandable") {
        Some(Value::Bool(b)) => *b,
        Some(Value::None) | None => false,
        Some(v) => {
            return Err(format!(
                "is_expandable must be a bool, found {}",
                v.type_name()
            ))
        }
    };
    let blocks_v = require(s, "blocks").and_then(|v| list_of(v, "blocks"))?;
    let addressed = blocks_v.iter().all(|b| b.get("address").is_some());
    let mut blocks = Vec::with_capacity(blocks_v.len());
    let mut next = address;
    for (bi, b) in blocks_v.iter().enumerate() {
        let at = |r: String| format!("blocks[{bi}]: {r}");
        if b.as_dict().is_none() {
            return Err(at(format!("must be a dict, found {}", b.type_name())));
        }
        let size = req_size(b, "size").map_err(at)?;
        let state = require(b, "state").map_err(at)?;
        let state = match state.as_str() {
            Some("active_allocated") => BlockState::Allocated,
            Some("active_pending_free" | "active_awaiting_free") => BlockState::PendingFree,
            Some("inactive") => BlockState::Inactive,
            Some(other) => return Err(at(format!("unknown block state '{}'", crate::echo(other)))),
            None => {
                return Err(at(format!(
                    "state must be a string, found {}",
                    state.type_name()
                )))
            }
        };
        let requested_bytes = match b.get("requested_size") {
            Some(v) if state != BlockState::Inactive => {
                super::byte_size(v, "requested_size").map_err(at)?
            }
            _ => size,
        };
        let block_address = if addressed {
            req_uint(b, "address").map_err(at)?
        } else {
            next
        };
        next = next.saturating_add(size);
        blocks.push(SnapshotBlock {
            address: block_address,
            bytes: size,
            requested_bytes,
            state,
        });
    }
    blocks.sort_by_key(|b| b.address);
    let mut at = address;
    for b in &blocks {
        if b.address != at {
            return Err(format!(
                "the blocks do not tile the segment: a block at {:#x}, expected {at:#x}",
                b.address
            ));
        }
        at = at.saturating_add(b.bytes);
    }
    if at != address.saturating_add(bytes) {
        return Err(format!(
            "the blocks cover {} bytes of a segment of {bytes}",
            at - address
        ));
    }
    Ok(SnapshotSegment {
        address,
        bytes,
        stream,
        pool: pools.id(s.get("segment_pool_id"))?,
        size_pool: if small {
            SizePool::Small
        } else {
            SizePool::Large
        },
        expandable,
        blocks,
    })
}
