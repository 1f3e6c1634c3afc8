//! The allocation workload: a sequence of alloc / free / empty-cache operations, whatever file
//! or generator it came from.

use gpumem_core::alloc::caching::CachingSettings;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Location, TraceError};
use crate::torch::recording::DeviceRecording;

/// Largest size (bytes) any importer accepts for one allocation, segment or block: 2^50 (1 PiB).
/// Anything larger is an error, never an attempt.
pub const MAX_BYTES: u64 = 1 << 50;

/// An allocation trace, ready to replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocTrace {
    pub name: String,
    pub source: TraceSource,
    pub ops: Vec<AllocOp>,
    /// Final segments recorded in a torch snapshot (None for other sources).
    pub recorded_segments: Option<Vec<RecordedSegment>>,
    /// `oom` trace entries seen (torch).
    pub recorded_ooms: u64,
    /// Events not replayed (segment_alloc, free_requested, snapshot, ...; torch).
    pub skipped_events: u64,
    /// The caching allocator's settings a torch snapshot recorded (`allocator_settings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caching_settings: Option<CachingSettings>,
    /// A torch snapshot's recording of the device the ops come from, which the caching
    /// strategies start from (the state before its first event); the error says why the
    /// snapshot could not be read as a recording. `None` for other sources. Not serialized: a
    /// trace written out (JSON Lines) is replayed from empty.
    #[serde(skip)]
    pub recording: Option<Arc<Result<TraceRecording, String>>>,
}

/// What a replay needs of a torch snapshot to start from the recorded state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRecording {
    /// The recording of the trace's device, its streams numbered as the trace's ops number
    /// them.
    pub device: DeviceRecording,
    /// For a trace synthesised from the final state ([`TraceSource::TorchState`]): the ops of
    /// its recorded events (`free_completed` → `Free`, a run of segment releases →
    /// `EmptyCache`), which a replay from the state before the first event runs instead.
    pub event_ops: Option<Vec<AllocOp>>,
}

/// Where a trace came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TraceSource {
    /// The alloc / free events of a torch snapshot's device trace.
    TorchTrace,
    /// Synthesised from the live blocks of a torch snapshot that recorded no alloc event.
    TorchState,
    /// gpumem's own JSON Lines allocation trace.
    Jsonl,
    /// A seeded generator of this crate.
    Generated,
}

/// One operation of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocOp {
    /// Nanoseconds from the trace start; never decreases along a trace.
    pub t_ns: u64,
    /// 1-based line (JSONL) or 1-based event index (torch) for error messages; 1-based op index
    /// for generated traces and for ops synthesised from a snapshot's state.
    pub line: u64,
    pub kind: OpKind,
}

/// What an operation does.
///
/// An `id` may be reused after it was freed (torch uses addresses as ids). A `Free` of an id that
/// is not live is legal in a trace (recording may have started after the allocation); the
/// consumer counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    Alloc {
        id: u64,
        bytes: u64,
        stream: u32,
        /// Must not be moved (weights, pinned buffers); gpumem extension, false for torch.
        pinned: bool,
    },
    Free {
        id: u64,
    },
    /// Return every cached, unused segment to the device (`torch.cuda.empty_cache()`).
    EmptyCache,
}

/// A segment as a torch snapshot recorded it at the end of recording.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedSegment {
    pub address: u64,
    /// Dense stream index (see [`crate::torch`]): 0 is the default stream.
    pub stream: u32,
    pub total_bytes: u64,
    /// `segment_type == "small"` (the pool of blocks ≤ 1 MiB).
    pub small_pool: bool,
    pub expandable: bool,
    /// (block size, live) in address order; live = state active_allocated or
    /// active_pending_free / active_awaiting_free.
    pub blocks: Vec<(u64, bool)>,
}

/// Counts over a trace, computed by replaying ids (not bytes placement).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    pub allocs: u64,
    pub frees: u64,
    pub empty_caches: u64,
    /// Frees of an id that was not live at that point.
    pub unknown_frees: u64,
    /// Allocs of an id that was still live (the earlier allocation is forgotten).
    pub duplicate_allocs: u64,
    /// Highest sum of live requested bytes.
    pub peak_live_bytes: u64,
    /// Live requested bytes after the last op.
    pub final_live_bytes: u64,
    /// Allocations still live after the last op.
    pub final_live_allocs: u64,
    /// Largest single allocation.
    pub max_alloc_bytes: u64,
    /// Sum of all allocated bytes.
    pub total_alloc_bytes: u64,
    /// Number of distinct streams seen in allocs.
    pub streams: u32,
    /// Allocations marked pinned.
    pub pinned_allocs: u64,
}

impl AllocTrace {
    /// Where an operation is in the trace's source, from its [`AllocOp::line`]: a line of a
    /// JSON Lines file, an event of a torch snapshot's device trace (never shown as a line),
    /// an op of a generated or synthesised trace; 0 is the trace as a whole.
    pub fn locate(&self, line: u64) -> Location {
        match (line, self.source) {
            (0, _) => Location::File,
            (n, TraceSource::Jsonl) => Location::Line(n),
            (n, TraceSource::TorchTrace) => Location::Event(n),
            (n, TraceSource::TorchState | TraceSource::Generated) => Location::Op(n),
        }
    }

    /// An error at operation `line` of the trace (see [`locate`](Self::locate)).
    pub fn error_at(&self, line: u64, reason: impl Into<String>) -> TraceError {
        TraceError::new(&self.name, self.locate(line), reason)
    }

    /// An empty trace of the given name and source.
    pub fn new(name: impl Into<String>, source: TraceSource) -> Self {
        AllocTrace {
            name: name.into(),
            source,
            ops: Vec::new(),
            recorded_segments: None,
            recorded_ooms: 0,
            skipped_events: 0,
            caching_settings: None,
            recording: None,
        }
    }

    /// An empty trace named after the file it is read from (its last path component).
    pub fn named_after(path: &Path, source: TraceSource) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Self::new(name, source)
    }

    /// Replays the ids of the trace and counts (deterministic; the hash map is only looked up).
    pub fn summary(&self) -> TraceSummary {
        let mut s = TraceSummary::default();
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut live_bytes: u64 = 0;
        let mut streams: Vec<u32> = Vec::new();
        for op in &self.ops {
            match op.kind {
                OpKind::Alloc {
                    id,
                    bytes,
                    stream,
                    pinned,
                } => {
                    s.allocs += 1;
                    s.pinned_allocs += u64::from(pinned);
                    s.total_alloc_bytes = s.total_alloc_bytes.saturating_add(bytes);
                    s.max_alloc_bytes = s.max_alloc_bytes.max(bytes);
                    if let Err(pos) = streams.binary_search(&stream) {
                        streams.insert(pos, stream);
                    }
                    if let Some(old) = live.insert(id, bytes) {
                        s.duplicate_allocs += 1;
                        live_bytes -= old;
                    }
                    live_bytes += bytes;
                    s.peak_live_bytes = s.peak_live_bytes.max(live_bytes);
                }
                OpKind::Free { id } => {
                    s.frees += 1;
                    match live.remove(&id) {
                        Some(b) => live_bytes -= b,
                        None => s.unknown_frees += 1,
                    }
                }
                OpKind::EmptyCache => s.empty_caches += 1,
            }
        }
        s.final_live_bytes = live_bytes;
        s.final_live_allocs = live.len() as u64;
        s.streams = streams.len() as u32;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(t: u64, kind: OpKind) -> AllocOp {
        AllocOp {
            t_ns: t,
            line: t,
            kind,
        }
    }

    #[test]
    fn an_event_of_a_snapshot_never_reads_as_a_line() {
        let at = |source, line| {
            AllocTrace::new("f", source)
                .error_at(line, "id 3 is already live")
                .to_string()
        };
        assert_eq!(at(TraceSource::Jsonl, 21), "f:21: id 3 is already live");
        assert_eq!(
            at(TraceSource::TorchTrace, 21),
            "f: event 21: id 3 is already live"
        );
        assert_eq!(
            at(TraceSource::TorchState, 21),
            "f: op 21: id 3 is already live"
        );
        assert_eq!(
            at(TraceSource::Generated, 2),
            "f: op 2: id 3 is already live"
        );
        assert_eq!(at(TraceSource::Jsonl, 0), "f: id 3 is already live");
    }

    #[test]
    fn summary_counts() {
        let mut t = AllocTrace::new("x", TraceSource::Generated);
        t.ops = vec![
            op(
                1,
                OpKind::Alloc {
                    id: 1,
                    bytes: 100,
                    stream: 0,
                    pinned: false,
                },
            ),
            op(
                2,
                OpKind::Alloc {
                    id: 2,
                    bytes: 50,
                    stream: 1,
                    pinned: true,
                },
            ),
            op(3, OpKind::Free { id: 1 }),
            op(4, OpKind::Free { id: 9 }),
            op(5, OpKind::EmptyCache),
        ];
        let s = t.summary();
        assert_eq!(s.allocs, 2);
        assert_eq!(s.frees, 2);
        assert_eq!(s.unknown_frees, 1);
        assert_eq!(s.empty_caches, 1);
        assert_eq!(s.peak_live_bytes, 150);
        assert_eq!(s.final_live_bytes, 50);
        assert_eq!(s.final_live_allocs, 1);
        assert_eq!(s.streams, 2);
        assert_eq!(s.pinned_allocs, 1);
        assert_eq!(s.max_alloc_bytes, 100);
    }
}
