//! A decoded KV-event stream fed into a fresh [`CacheIndex`], and the report of both: what the
//! stream looked like and what the index holds at its end.

use std::path::Path;

use serde::Serialize;

use super::decode::{detect_format, for_each_event_as, EventMeta, StreamFormat, StreamInfo};
use crate::error::TraceError;
use gpumem_core::kv::index::{CacheIndex, IndexSummary, MediumSummary};

/// Data-parallel ranks a report lists at most.
const MAX_RANKS: usize = 1024;

/// What importing a KV-event stream found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvEventsReport {
    pub format: StreamFormat,
    /// `map` (vLLM ≥ 0.24), `array` (older), `mixed` or `none`.
    pub event_encoding: &'static str,
    /// `int` (vLLM's default), `bytes`, `mixed` or `none`.
    pub hash_encoding: &'static str,
    /// Batches (msgpack) or event lines (JSON Lines).
    pub batches: u64,
    pub events: u64,
    /// Events of a type gpumem does not know (skipped).
    pub unknown_events: u64,
    pub block_stored_events: u64,
    /// Hashes in `BlockStored` events.
    pub blocks_stored: u64,
    /// Token ids in `BlockStored` events.
    pub tokens_stored: u64,
    /// Stored hashes the index already held on that medium (another physical copy).
    pub duplicate_stores: u64,
    /// `BlockStored` events whose token count is not blocks × block_size.
    pub token_count_mismatches: u64,
    pub block_removed_events: u64,
    /// Hashes in `BlockRemoved` events.
    pub blocks_removed: u64,
    /// Removed hashes the index did not hold (recording started late, or a cleared cache).
    pub removed_unknown: u64,
    pub all_blocks_cleared: u64,
    /// Physical blocks holding a hash at the end (copies counted).
    pub blocks_live: u64,
    /// Distinct (medium, group, hash) at the end.
    pub hashes_live: u64,
    pub tokens_live: u64,
    /// Most blocks live at any point.
    pub max_blocks_live: u64,
    /// Longest chain of live blocks linked by parent hashes, in blocks, and the most prefix
    /// tokens any live block's chain covers.
    pub longest_chain_blocks: u64,
    pub longest_chain_tokens: u64,
    pub first_ts: Option<f64>,
    pub last_ts: Option<f64>,
    /// Data-parallel ranks seen, sorted.
    pub data_parallel_ranks: Vec<i64>,
    pub media: Vec<MediumSummary>,
}

/// What the stream told besides its events: timestamps, ranks, event types gpumem skips.
#[derive(Default)]
struct StreamExtras {
    first_ts: Option<f64>,
    last_ts: Option<f64>,
    /// Sorted, at most [`MAX_RANKS`].
    ranks: Vec<i64>,
    unknown_events: u64,
}

impl StreamExtras {
    fn note(&mut self, meta: &EventMeta) {
        if let Some(ts) = meta.ts {
            self.first_ts.get_or_insert(ts);
            self.last_ts = Some(ts);
        }
        if let Some(r) = meta.data_parallel_rank {
            if let Err(i) = self.ranks.binary_search(&r) {
                if self.ranks.len() < MAX_RANKS {
                    self.ranks.insert(i, r);
                }
            }
        }
    }
}

/// Imports a stream (either encoding, detected) into a fresh index and reports it.
pub fn import_bytes(path: &Path, bytes: &[u8]) -> Result<(CacheIndex, KvEventsReport), TraceError> {
    import_bytes_as(path, bytes, detect_format(bytes))
}

/// [`import_bytes`] with the encoding given rather than detected.
pub fn import_bytes_as(
    path: &Path,
    bytes: &[u8],
    format: StreamFormat,
) -> Result<(CacheIndex, KvEventsReport), TraceError> {
    let mut index = CacheIndex::new();
    let mut extras = StreamExtras::default();
    let mut err: Option<TraceError> = None;
    let info = for_each_event_as(path, bytes, format, |meta, ev| {
        if err.is_some() {
            return;
        }
        extras.note(meta);
        match ev {
            Some(ev) => {
                if let Err(e) = index.apply(&ev) {
                    err = Some(TraceError::new(path, meta.location, e));
                }
            }
            None => extras.unknown_events += 1,
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let report = KvEventsReport::new(&info, extras, index.summary());
    Ok((index, report))
}

/// Largest event stream read (it is decoded from memory): recordings of hours of a busy
/// engine are a few hundred MB (10 M events take about 100 MB of msgpack).
pub const MAX_EVENT_STREAM_BYTES: u64 = 1 << 30;

/// Reads a KV-event recording, at most [`MAX_EVENT_STREAM_BYTES`] (named in the error).
pub fn read_stream(path: &Path) -> Result<Vec<u8>, TraceError> {
    let mut input = crate::read::open(path)?;
    crate::read::read_capped(
        &mut *input,
        path,
        MAX_EVENT_STREAM_BYTES,
        "MAX_EVENT_STREAM_BYTES",
    )
}

/// Reads and imports a KV-event recording.
pub fn import_file(path: &Path) -> Result<KvEventsReport, TraceError> {
    let bytes = read_stream(path)?;
    import_bytes(path, &bytes).map(|(_, r)| r)
}

impl KvEventsReport {
    fn new(info: &StreamInfo, extras: StreamExtras, index: IndexSummary) -> Self {
        KvEventsReport {
            format: info.format,
            event_encoding: encoding(info.map_events, info.array_events, "map", "array"),
            hash_encoding: encoding(info.int_hashes, info.bytes_hashes, "int", "bytes"),
            batches: info.batches,
            events: info.map_events + info.array_events,
            unknown_events: extras.unknown_events,
            block_stored_events: index.block_stored_events,
            blocks_stored: index.blocks_stored,
            tokens_stored: index.tokens_stored,
            duplicate_stores: index.duplicate_stores,
            token_count_mismatches: index.token_count_mismatches,
            block_removed_events: index.block_removed_events,
            blocks_removed: index.blocks_removed,
            removed_unknown: index.removed_unknown,
            all_blocks_cleared: index.all_blocks_cleared,
            blocks_live: index.blocks_live,
            hashes_live: index.hashes_live,
            tokens_live: index.tokens_live,
            max_blocks_live: index.max_blocks_live,
            longest_chain_blocks: index.longest_chain_blocks,
            longest_chain_tokens: index.longest_chain_tokens,
            first_ts: extras.first_ts,
            last_ts: extras.last_ts,
            data_parallel_ranks: extras.ranks,
            media: index.media,
        }
    }
}

/// `a`, `b`, `mixed` or `none`, from how many of each form the stream used.
fn encoding(a_count: u64, b_count: u64, a: &'static str, b: &'static str) -> &'static str {
    match (a_count > 0, b_count > 0) {
        (true, false) => a,
        (false, true) => b,
        (true, true) => "mixed",
        (false, false) => "none",
    }
}
