//! PyTorch CUDA memory snapshots (`torch.cuda.memory._dump_snapshot` pickles) → [`AllocTrace`].
//!
//! Layout (notes §1.12): top-level keys `segments`, `device_traces` (one list of entries per
//! device) and, in newer versions, `allocator_settings`; unknown keys are ignored.
//!
//! - **Device:** the device whose trace has the most `alloc` entries (ties: lowest index). When
//!   no trace has one, the device with the most segments (ties: lowest index). Segments whose
//!   `device` key names another device are left out; a segment without one is kept.
//! - **Trace replay** ([`TraceSource::TorchTrace`]): `alloc` → `Alloc { id: addr, bytes: size }`;
//!   `free_completed` → `Free { id: addr }`; a run of consecutive `segment_free` /
//!   `segment_unmap` entries that directly follows a non-segment entry (or starts the trace) →
//!   one `EmptyCache` (an external `empty_cache()`; notes §1.13); `oom` → `recorded_ooms`;
//!   every other entry (free_requested, segment_alloc, segment_map, snapshot, the rest of a
//!   segment-free run, unknown actions) → `skipped_events`. So
//!   `ops + recorded_ooms + skipped_events == entries`.
//!   `t_ns` is `(time_us − time_us of the first entry) × 1000`, or `index × 1000` without
//!   `time_us` (torch 2.0), never decreasing (clamped to the previous op).
//!   `line` is the entry's 1-based index in the device trace.
//! - **State synthesis** ([`TraceSource::TorchState`]): when the chosen trace has no `alloc`,
//!   the ops are one `Alloc` per live block (active_allocated, active_pending_free,
//!   active_awaiting_free), segments in address order then blocks in address order, of its
//!   `requested_size` (or `size` when absent), id = block address, at `t_ns` 0, `line` = op
//!   index. Trace entries are then all skipped (oom still counted).
//! - **Streams:** torch records `cudaStream_t` values (pointers). They become dense indices:
//!   0 stays 0, others get 1, 2, … in order of first appearance (trace entries, then segments).
//! - **Blocks:** listed in address order; the torch 2.0 layout has no block `address` (it has
//!   `history`), so the list order is kept and addresses are the segment address plus the sizes
//!   of the blocks before.
//! - **Validation:** sizes are integers in 0..=2^50, addresses and streams non-negative and
//!   within 64 bits; a missing required key is an error naming it.

use crate::alloc_trace::{
    AllocOp, AllocTrace, OpKind, RecordedSegment, TraceRecording, TraceSource, MAX_BYTES,
};
use crate::error::{echo, TraceError};
use crate::pickle::{self, Value};
use recording::DeviceRecording;
use std::collections::BTreeMap;
use std::path::Path;

/// Reads a snapshot pickle from a file, at most `MAX_SNAPSHOT_BYTES` (named in the error).
pub fn read(path: &Path) -> Result<AllocTrace, TraceError> {
    let mut input = crate::read::open(path)?;
    let bytes = read_snapshot_bytes(&mut *input, path)?;
    parse_bytes(path, &bytes)
}

/// Parses snapshot pickle bytes; `path` names the trace and its errors.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<AllocTrace, TraceError> {
    let v = pickle::parse(bytes).map_err(|e| TraceError::from_pickle(path, e))?;
    from_value(path, &v)
}

/// How much of a snapshot is parsed before the rest is read: enough to refuse a stream that is
/// no pickle (random bytes, a device) without reading `MAX_SNAPSHOT_BYTES` of it first.
const SNAPSHOT_PROBE_BYTES: u64 = 1 << 20;

/// The bytes of a snapshot pickle, at most `MAX_SNAPSHOT_BYTES` (named in the error). A prefix
/// is parsed first: an error there that is not the prefix's end is reported at once, and a
/// pickle that ends inside it is all that is read.
pub fn read_snapshot_bytes(
    input: &mut dyn std::io::BufRead,
    path: &Path,
) -> Result<Vec<u8>, TraceError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut *input, SNAPSHOT_PROBE_BYTES),
        &mut bytes,
    )
    .map_err(|e| TraceError::in_file(path, format!("cannot read the input: {e}")))?;
    if bytes.len() as u64 == SNAPSHOT_PROBE_BYTES {
        match pickle::parse(&bytes) {
            // The pickle stopped inside the probe: what follows is ignored, as Python does.
            Ok(_) => return Ok(bytes),
            Err(e) if !e.is_truncation() => return Err(TraceError::from_pickle(path, e)),
            Err(_) => {}
        }
        // The probe again, then the rest: the limit is counted (and named) over the whole.
        let mut whole = std::io::Read::chain(std::io::Cursor::new(bytes), input);
        return crate::read::read_capped(
            &mut whole,
            path,
            crate::MAX_SNAPSHOT_BYTES,
            "MAX_SNAPSHOT_BYTES",
        );
    }
    Ok(bytes)
}

/// Converts an unpickled snapshot; `path` names the trace and its errors.
pub fn from_value(path: &Path, root: &Value) -> Result<AllocTrace, TraceError> {
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
    let traces_v = require(root, "device_traces")
        .and_then(|v| list_of(v, "device_traces"))
        .map_err(file_err)?;
    let mut traces: Vec<&[Value]> = Vec::with_capacity(traces_v.len());
    for (d, t) in traces_v.iter().enumerate() {
        traces.push(list_of(t, &format!("device_traces[{d}]")).map_err(file_err)?);
    }

    let caching_settings = match root.get("allocator_settings") {
        None | Some(Value::None) => None,
        Some(v) => Some(alloc_conf::from_snapshot(v).map_err(file_err)?),
    };
    let device = choose_device(&traces, segments);
    let trace: &[Value] = traces.get(device).copied().unwrap_or(&[]);
    let has_alloc = trace.iter().any(|e| action(e) == Some("alloc"));

    let mut streams = Streams::default();
    let mut out = AllocTrace::named_after(
        path,
        if has_alloc {
            TraceSource::TorchTrace
        } else {
            TraceSource::TorchState
        },
    );
    if has_alloc {
        replay_trace(path, trace, &mut streams, &mut out)?;
    } else {
        for e in trace {
            if action(e) == Some("oom") {
                out.recorded_ooms += 1;
            } else {
                out.skipped_events += 1;
            }
        }
    }

    let segs = read_segments(segments, device as i128, &mut streams).map_err(file_err)?;
    if !has_alloc {
        for seg in &segs {
            for b in seg.blocks.iter().filter(|b| b.live) {
                let n = out.ops.len() as u64 + 1;
                out.ops.push(AllocOp {
                    t_ns: 0,
                    line: n,
                    kind: OpKind::Alloc {
                        id: b.address,
                        bytes: b.requested.unwrap_or(b.size),
                        stream: seg.rec.stream,
                        pinned: false,
                    },
                });
            }
        }
    }
    out.recorded_segments = Some(segs.into_iter().map(|s| s.rec).collect());
    out.caching_settings = caching_settings;
    let held = trace_recording(path, root, trace, device, has_alloc, &mut streams);
    out.recording = Some(std::sync::Arc::new(held));
    Ok(out)
}

/// The recording of the trace's device, read from the same snapshot, with its streams
/// renumbered as the trace's ops number them.
fn trace_recording(
    path: &Path,
    root: &Value,
    trace: &[Value],
    device: usize,
    has_alloc: bool,
    streams: &mut Streams,
) -> Result<TraceRecording, String> {
    let (recording, raw) = recording::from_value_with_streams(path, root)
        .map_err(|e| format!("the snapshot cannot be read as a recording: {e}"))?;
    let mut dev = recording
        .devices
        .into_iter()
        .find(|d| d.device as usize == device)
        .unwrap_or(DeviceRecording {
            device: device as u32,
            events: Vec::new(),
            segments: Vec::new(),
        });
    // Dense index in the recording → raw stream → dense index in the trace.
    let by_index: BTreeMap<u32, u64> = raw.0.iter().map(|(&r, &i)| (i, r)).collect();
    let mut renumber = |i: u32| match by_index.get(&i) {
        Some(&r) => streams.raw_index(r),
        None => i,
    };
    for e in &mut dev.events {
        e.stream = renumber(e.stream);
    }
    for s in &mut dev.segments {
        s.stream = renumber(s.stream);
    }
    let event_ops = if has_alloc {
        None
    } else {
        let mut ops = AllocTrace::named_after(path, TraceSource::TorchTrace);
        replay_trace(path, trace, &mut Streams::default(), &mut ops).map_err(|e| e.to_string())?;
        Some(ops.ops)
    };
    Ok(TraceRecording {
        device: dev,
        event_ops,
    })
}

fn action(e: &Value) -> Option<&str> {
    e.get("action").and_then(Value::as_str)
}

fn require<'v>(d: &'v Value, key: &str) -> Result<&'v Value, String> {
    d.get(key).ok_or_else(|| format!("missing key '{key}'"))
}

fn list_of<'v>(v: &'v Value, what: &str) -> Result<&'v [Value], String> {
    v.as_list()
        .ok_or_else(|| format!("'{what}' must be a list, found {}", v.type_name()))
}

/// A non-negative integer of at most 64 bits.
fn uint(v: &Value, key: &str) -> Result<u64, String> {
    let i = v
        .as_i128()
        .ok_or_else(|| format!("{key} must be an integer, found {}", v.type_name()))?;
    if i < 0 {
        return Err(format!("{key} {i} is negative"));
    }
    u64::try_from(i).map_err(|_| format!("{key} {i} does not fit in 64 bits"))
}

fn req_uint(d: &Value, key: &str) -> Result<u64, String> {
    uint(require(d, key)?, key)
}

/// A size in bytes: a non-negative integer at most 2^50.
fn byte_size(v: &Value, key: &str) -> Result<u64, String> {
    let i = v
        .as_i128()
        .ok_or_else(|| format!("{key} must be an integer, found {}", v.type_name()))?;
    if i < 0 {
        return Err(format!("{key} {i} is negative"));
    }
    if i > i128::from(MAX_BYTES) {
        return Err(format!("{key} {i} exceeds the limit of 2^50 bytes"));
    }
    Ok(i as u64)
}

fn req_size(d: &Value, key: &str) -> Result<u64, String> {
    byte_size(require(d, key)?, key)
}

/// Dense stream indices: 0 stays 0, others numbered by first appearance.
#[derive(Default)]
pub(crate) struct Streams(BTreeMap<u64, u32>);

impl Streams {
    fn index(&mut self, d: &Value) -> Result<u32, String> {
        let raw = match d.get("stream") {
            Some(v) => uint(v, "stream")?,
            None => 0,
        };
        Ok(self.raw_index(raw))
    }

    /// The dense index of a raw `cudaStream_t` value.
    fn raw_index(&mut self, raw: u64) -> u32 {
        if raw == 0 {
            return 0;
        }
        let next = self.0.len() as u32 + 1;
        *self.0.entry(raw).or_insert(next)
    }
}

fn choose_device(traces: &[&[Value]], segments: &[Value]) -> usize {
    let mut best: Option<(usize, usize)> = None; // (count, device)
    for (d, t) in traces.iter().enumerate() {
        let n = t.iter().filter(|e| action(e) == Some("alloc")).count();
        if n > 0 && !matches!(best, Some((bn, _)) if n <= bn) {
            best = Some((n, d));
        }
    }
    if let Some((_, d)) = best {
        return d;
    }
    let mut per_device: BTreeMap<i128, usize> = BTreeMap::new();
    for s in segments {
        let d = s.get("device").and_then(Value::as_i128).unwrap_or(0);
        *per_device.entry(d).or_default() += 1;
    }
    let mut best: Option<(usize, i128)> = None;
    for (&d, &n) in &per_device {
        if d >= 0 && !matches!(best, Some((bn, _)) if n <= bn) {
            best = Some((n, d));
        }
    }
    best.and_then(|(_, d)| usize::try_from(d).ok()).unwrap_or(0)
}

fn replay_trace(
    path: &Path,
    trace: &[Value],
    streams: &mut Streams,
    out: &mut AllocTrace,
) -> Result<(), TraceError> {
    let base_us = trace
        .iter()
        .find_map(|e| e.get("time_us").and_then(Value::as_i128));
    let mut last_t: u64 = 0;
    let mut prev_was_segment = false;
    for (i, e) in trace.iter().enumerate() {
        let ev = i as u64 + 1;
        let err = |r: String| TraceError::at_event(path, ev, r);
        if e.as_dict().is_none() {
            return Err(err(format!(
                "a trace entry must be a dict, found {}",
                e.type_name()
            )));
        }
        let act = require(e, "action")
            .and_then(|v| {
                v.as_str()
                    .ok_or_else(|| format!("action must be a string, found {}", v.type_name()))
            })
            .map_err(err)?;
        let t_ns = match e.get("time_us") {
            Some(v) => {
                let us = v.as_i128().ok_or_else(|| {
                    err(format!(
                        "time_us must be an integer, found {}",
                        v.type_name()
                    ))
                })?;
                let rel = us.saturating_sub(base_us.unwrap_or(us)).max(0);
                u64::try_from(rel.saturating_mul(1000)).unwrap_or(u64::MAX)
            }
            None => (i as u64).saturating_mul(1000),
        };
        let t_ns = t_ns.max(last_t);
        let is_segment = matches!(
            act,
            "segment_alloc" | "segment_free" | "segment_map" | "segment_unmap"
        );
        let kind = match act {
            "alloc" => {
                let id = req_uint(e, "addr").map_err(err)?;
                let bytes = req_size(e, "size").map_err(err)?;
                let stream = streams.index(e).map_err(err)?;
                Some(OpKind::Alloc {
                    id,
                    bytes,
                    stream,
                    pinned: false,
                })
            }
            "free_completed" => Some(OpKind::Free {
                id: req_uint(e, "addr").map_err(err)?,
            }),
            "segment_free" | "segment_unmap" if !prev_was_segment => Some(OpKind::EmptyCache),
            "oom" => {
                out.recorded_ooms += 1;
                None
            }
            _ => {
                out.skipped_events += 1;
                None
            }
        };
        if let Some(kind) = kind {
            out.ops.push(AllocOp {
                t_ns,
                line: ev,
                kind,
            });
            last_t = t_ns;
        }
        prev_was_segment = is_segment;
    }
    Ok(())
}

struct Block {
    address: u64,
    size: u64,
    requested: Option<u64>,
    live: bool,
}

struct Segment {
    rec: RecordedSegment,
    blocks: Vec<Block>,
}

fn read_segments(
    segments: &[Value],
    device: i128,
    streams: &mut Streams,
) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    for (si, s) in segments.iter().enumerate() {
        let at = |r: String| format!("segments[{si}]: {r}");
        if s.as_dict().is_none() {
            return Err(at(format!("must be a dict, found {}", s.type_name())));
        }
        if let Some(d) = s.get("device").and_then(Value::as_i128) {
            if d != device {
                continue;
            }
        }
        let address = req_uint(s, "address").map_err(at)?;
        let total_bytes = req_size(s, "total_size").map_err(at)?;
        let stream = streams.index(s).map_err(at)?;
        let small_pool = match s.get("segment_type") {
            Some(v) => {
                v.as_str().ok_or_else(|| {
                    at(format!(
                        "segment_type must be a string, found {}",
                        v.type_name()
                    ))
                })? == "small"
            }
            // Small-pool segments are exactly 2 MiB (kSmallBuffer).
            None => total_bytes == 2 << 20,
        };
        let expandable = match s.get("is_expandable") {
            Some(Value::Bool(b)) => *b,
            Some(Value::None) | None => false,
            Some(v) => {
                return Err(at(format!(
                    "is_expandable must be a bool, found {}",
                    v.type_name()
                )))
            }
        };
        let blocks_v = require(s, "blocks")
            .and_then(|v| list_of(v, "blocks"))
            .map_err(at)?;
        let all_addressed = blocks_v.iter().all(|b| b.get("address").is_some());
        let mut blocks = Vec::with_capacity(blocks_v.len());
        let mut offset: u64 = address;
        for (bi, b) in blocks_v.iter().enumerate() {
            let at = |r: String| format!("segments[{si}].blocks[{bi}]: {r}");
            if b.as_dict().is_none() {
                return Err(at(format!("must be a dict, found {}", b.type_name())));
            }
            let size = req_size(b, "size").map_err(at)?;
            let state = require(b, "state")
                .and_then(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("state must be a string, found {}", v.type_name()))
                })
                .map_err(at)?;
            let live = match state {
                "active_allocated" | "active_pending_free" | "active_awaiting_free" => true,
                "inactive" => false,
                other => return Err(at(format!("unknown block state '{}'", echo(other)))),
            };
            // Only a live block's requested size is used (inactive ones may hold stale values).
            let requested = match b.get("requested_size") {
                Some(v) if live => Some(byte_size(v, "requested_size").map_err(at)?),
                _ => None,
            };
            let block_address = if all_addressed {
                req_uint(b, "address").map_err(at)?
            } else {
                offset
            };
            offset = offset.saturating_add(size);
            blocks.push(Block {
                address: block_address,
                size,
                requested,
                live,
            });
        }
        if all_addressed {
            blocks.sort_by_key(|b| b.address);
        }
        out.push(Segment {
            rec: RecordedSegment {
                address,
                stream,
                total_bytes,
                small_pool,
                expandable,
                blocks: blocks.iter().map(|b| (b.size, b.live)).collect(),
            },
            blocks,
        });
    }
    out.sort_by_key(|s| s.rec.address);
    Ok(out)
}

pub mod alloc_conf;
pub mod recording;

#[cfg(test)]
mod tests;
