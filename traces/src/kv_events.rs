//! Recorded vLLM KV-cache event streams, imported into the cache index a KV-aware router holds.
//!
//! Two encodings of the same events:
//! - **msgpack**, as vLLM 0.33's ZMQ publisher sends each batch's payload, concatenated (what
//!   `../shared/conformance/vllm-oracle --events-out` records): each batch is
//!   `[ts, [event, …], data_parallel_rank]` (the rank may be left out). An event is a map with a
//!   `"type"` key (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`; vLLM ≥ 0.24) or, before
//!   0.24, an array led by the type name with the fields in declaration order
//!   (`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
//!   medium, lora_name, …]`, `["BlockRemoved", block_hashes, medium, …]`,
//!   `["AllBlocksCleared"]`; trailing fields may be missing).
//! - **JSON Lines**: one event a line, as a JSON object with the same fields (`"type"`,
//!   `"block_hashes"`, …), optionally `"ts"` and `"data_parallel_rank"`; or a JSON array in
//!   the pre-0.24 form. Blank lines and lines starting with `#` are skipped.
//!
//! Block hashes are integers (vLLM's default: the digest's last 8 bytes as an unsigned 64-bit
//! integer) or raw digests (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`: msgpack binary; in JSON a
//! hex string). Unknown fields are ignored (vLLM adds optional ones); an unknown event type is
//! counted and skipped; a wrong type is an error.
//!
//! The index ([`CacheIndex`]) keys blocks by (medium, KV-cache group, hash) and counts copies,
//! because vLLM stores the same hash in several blocks (a recomputed block-aligned prompt) and
//! then removes each copy: a hash leaves the index when its last copy is removed.
//!
//! Errors name the file and the byte offset (msgpack) or line (JSON Lines), never panic, and
//! bound what they allocate (see [`msgpack`]).

pub mod msgpack;

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::error::{Location, TraceError};
use crate::read::LineReader;
use msgpack::{Decoder, Node, Value};

/// Values one msgpack batch (or one JSON line) may hold. vLLM's batches hold a step's events
/// (tens of thousands of values at most).
pub const MAX_VALUES_PER_BATCH: usize = 1 << 22;

/// Longest raw block hash accepted, in bytes (vLLM's digests are 32 or 16 bytes).
pub const MAX_HASH_BYTES: usize = 64;

/// Distinct media (`"GPU"`, `"CPU"`, …) an index tracks.
pub const MAX_MEDIA: usize = 64;

/// A block hash as vLLM publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum EventHash {
    /// The default: the digest's last 8 bytes, big-endian.
    Int(u64),
    /// The raw digest.
    Bytes(Vec<u8>),
}

/// One KV-cache event (the fields gpumem reads; others are ignored).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum KvCacheEvent {
    BlockStored {
        block_hashes: Vec<EventHash>,
        parent_block_hash: Option<EventHash>,
        token_ids: Vec<u64>,
        block_size: u64,
        lora_id: Option<i64>,
        medium: Option<String>,
        lora_name: Option<String>,
        group_idx: Option<u64>,
    },
    BlockRemoved {
        block_hashes: Vec<EventHash>,
        medium: Option<String>,
        group_idx: Option<u64>,
    },
    AllBlocksCleared,
}

/// Where an event came from.
#[derive(Clone, Debug, PartialEq)]
pub struct EventMeta {
    /// 0-based batch (msgpack) or event line (JSON Lines) index.
    pub batch: u64,
    /// The batch's timestamp (seconds), when given.
    pub ts: Option<f64>,
    pub data_parallel_rank: Option<i64>,
    /// Byte offset of the event (msgpack) or its line.
    pub location: Location,
}

/// The stream encodings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    #[default]
    Msgpack,
    Jsonl,
}

/// JSON Lines when the first non-blank byte opens a JSON object or array, or starts a comment
/// (no msgpack batch starts with `{`, `[` or `#`: those bytes are small positive integers);
/// msgpack otherwise.
pub fn detect_format(bytes: &[u8]) -> StreamFormat {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[' | b'#') => StreamFormat::Jsonl,
        Some(_) => StreamFormat::Msgpack,
        None => StreamFormat::Jsonl,
    }
}

/// True when `bytes` start like a vLLM msgpack event batch: a 2- or 3-element array whose
/// first element is a float or an integer timestamp and whose second is an array.
pub fn looks_like_msgpack_events(bytes: &[u8]) -> bool {
    let (Some(&first), Some(&ts)) = (bytes.first(), bytes.get(1)) else {
        return false;
    };
    if first != 0x92 && first != 0x93 {
        return false;
    }
    let ts_len = match ts {
        0xcb => 9,
        0xca => 5,
        0x00..=0x7f => 1,
        0xcc => 2,
        0xcd => 3,
        0xce => 5,
        0xcf => 9,
        _ => return false,
    };
    matches!(bytes.get(1 + ts_len), Some(0x90..=0x9f | 0xdc | 0xdd))
}

/// Reads every event of a stream (either encoding) and hands it to `f` in order. Returns the
/// encoding and whether events came as maps (vLLM ≥ 0.24) and/or arrays (older).
pub fn for_each_event(
    path: &Path,
    bytes: &[u8],
    f: impl FnMut(&EventMeta, Option<KvCacheEvent>),
) -> Result<StreamInfo, TraceError> {
    for_each_event_as(path, bytes, detect_format(bytes), f)
}

/// [`for_each_event`] with the encoding given rather than detected.
pub fn for_each_event_as(
    path: &Path,
    bytes: &[u8],
    format: StreamFormat,
    mut f: impl FnMut(&EventMeta, Option<KvCacheEvent>),
) -> Result<StreamInfo, TraceError> {
    let mut info = StreamInfo {
        format,
        ..Default::default()
    };
    match info.format {
        StreamFormat::Msgpack => {
            let mut dec = Decoder::new(bytes, MAX_VALUES_PER_BATCH);
            let mut batch = 0u64;
            while let Some(node) = dec.next_value() {
                let node = node
                    .map_err(|e| TraceError::new(path, Location::ByteOffset(e.offset), e.reason))?;
                let at = |n: &Node| Location::ByteOffset(n.offset);
                let fail = |loc: Location, r: String| TraceError::new(path, loc, r);
                let Value::Array(items) = node.value else {
                    return Err(fail(
                        at(&node),
                        format!(
                            "batch {batch}: expected [ts, [events...], data_parallel_rank], got {}",
                            node.value.kind()
                        ),
                    ));
                };
                if !(2..=3).contains(&items.len()) {
                    return Err(fail(
                        Location::ByteOffset(node.offset),
                        format!(
                            "batch {batch}: expected [ts, [events...], data_parallel_rank], got an array of {}",
                            items.len()
                        ),
                    ));
                }
                let ts = match &items[0].value {
                    Value::Float(x) => Some(*x),
                    Value::Int(i) => Some(*i as f64),
                    Value::Nil => None,
                    v => {
                        return Err(fail(
                            at(&items[0]),
                            format!("batch {batch}: ts must be a number, got {}", v.kind()),
                        ))
                    }
                };
                let rank = match items.get(2).map(|n| &n.value) {
                    None | Some(Value::Nil) => None,
                    Some(Value::Int(i)) => Some(i64::try_from(*i).map_err(|_| {
                        fail(
                            at(&items[2]),
                            format!("batch {batch}: data_parallel_rank {i} out of range"),
                        )
                    })?),
                    Some(v) => {
                        return Err(fail(
                            at(&items[2]),
                            format!(
                            "batch {batch}: data_parallel_rank must be an integer or nil, got {}",
                            v.kind()
                        ),
                        ))
                    }
                };
                let Value::Array(events) = &items[1].value else {
                    return Err(fail(
                        at(&items[1]),
                        format!(
                            "batch {batch}: events must be an array, got {}",
                            items[1].value.kind()
                        ),
                    ));
                };
                info.batches += 1;
                for (i, ev) in events.iter().enumerate() {
                    let meta = EventMeta {
                        batch,
                        ts,
                        data_parallel_rank: rank,
                        location: at(ev),
                    };
                    let parsed = decode_event(ev, &mut info).map_err(|(n, r)| {
                        fail(
                            Location::ByteOffset(n),
                            format!("batch {batch}, event {i}: {r}"),
                        )
                    })?;
                    f(&meta, parsed);
                }
                batch += 1;
            }
        }
        StreamFormat::Jsonl => {
            let mut index = 0u64;
            let mut lines = LineReader::new(bytes, path);
            while let Some(line) = lines.next_line() {
                let line = line?;
                if line.is_blank_or_comment() {
                    continue;
                }
                let fail = |r: String| line.error(r);
                let text = line.text.trim();
                let json: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| fail(format!("bad JSON: {e}")))?;
                let mut budget = MAX_VALUES_PER_BATCH;
                let node = from_json(json, &mut budget, 0).ok_or_else(|| {
                    fail(format!(
                        "more than {MAX_VALUES_PER_BATCH} values, or nested too deep"
                    ))
                })?;
                let (ts, rank) = match &node.value {
                    Value::Map(m) => (
                        match field(m, "ts").map(|n| &n.value) {
                            None | Some(Value::Nil) => None,
                            Some(Value::Float(x)) => Some(*x),
                            Some(Value::Int(x)) => Some(*x as f64),
                            Some(v) => {
                                return Err(fail(format!("ts must be a number, got {}", v.kind())))
                            }
                        },
                        match field(m, "data_parallel_rank").map(|n| &n.value) {
                            None | Some(Value::Nil) => None,
                            Some(Value::Int(x)) => Some(i64::try_from(*x).map_err(|_| {
                                fail(format!("data_parallel_rank {x} out of range"))
                            })?),
                            Some(v) => {
                                return Err(fail(format!(
                                    "data_parallel_rank must be an integer, got {}",
                                    v.kind()
                                )))
                            }
                        },
                    ),
                    _ => (None, None),
                };
                let meta = EventMeta {
                    batch: index,
                    ts,
                    data_parallel_rank: rank,
                    location: Location::Line(line.number),
                };
                let parsed = decode_event(&node, &mut info).map_err(|(_, r)| fail(r))?;
                info.batches += 1;
                f(&meta, parsed);
                index += 1;
            }
        }
    }
    Ok(info)
}

/// What the stream looked like.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StreamInfo {
    pub format: StreamFormat,
    /// Batches (msgpack) or event lines (JSON Lines).
    pub batches: u64,
    /// Events as maps with a "type" key (vLLM ≥ 0.24).
    pub map_events: u64,
    /// Events as arrays led by the type name (vLLM < 0.24).
    pub array_events: u64,
    pub int_hashes: u64,
    pub bytes_hashes: u64,
}

/// A decoded event with where it came from (for tests and tools).
#[derive(Clone, Debug, PartialEq)]
pub struct TimedEvent {
    pub meta: EventMeta,
    /// None for an event type gpumem does not know.
    pub event: Option<KvCacheEvent>,
}

/// Every event of a stream, in order.
pub fn read_events(path: &Path, bytes: &[u8]) -> Result<(Vec<TimedEvent>, StreamInfo), TraceError> {
    let mut out = Vec::new();
    let info = for_each_event(path, bytes, |m, e| {
        out.push(TimedEvent {
            meta: m.clone(),
            event: e,
        })
    })?;
    Ok((out, info))
}

type DecodeResult<T> = Result<T, (u64, String)>;

fn field<'a>(m: &'a [(Node, Node)], key: &str) -> Option<&'a Node> {
    m.iter()
        .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
        .map(|(_, v)| v)
}

fn decode_event(node: &Node, info: &mut StreamInfo) -> DecodeResult<Option<KvCacheEvent>> {
    let bad = |n: &Node, what: &str| -> (u64, String) {
        (
            n.offset,
            format!("an event must be a map with a \"type\" key or an array led by the type name, {what}"),
        )
    };
    match &node.value {
        Value::Map(m) => {
            info.map_events += 1;
            let Some(t) = field(m, "type") else {
                return Err(bad(node, "this map has no \"type\""));
            };
            let Value::Str(ty) = &t.value else {
                return Err((
                    t.offset,
                    format!("\"type\" must be a string, got {}", t.value.kind()),
                ));
            };
            let get = |k: &str| field(m, k);
            let req = |k: &str| -> DecodeResult<&Node> {
                get(k).ok_or_else(|| (node.offset, format!("{ty}: missing field \"{k}\"")))
            };
            Ok(Some(match ty.as_str() {
                "BlockStored" => KvCacheEvent::BlockStored {
                    block_hashes: hashes(req("block_hashes")?, ty, "block_hashes", info)?,
                    parent_block_hash: opt_hash(get("parent_block_hash"), ty, info)?,
                    token_ids: token_ids(req("token_ids")?, ty)?,
                    block_size: uint(req("block_size")?, ty, "block_size")?,
                    lora_id: opt_int(get("lora_id"), ty, "lora_id")?,
                    medium: opt_str(get("medium"), ty, "medium")?,
                    lora_name: opt_str(get("lora_name"), ty, "lora_name")?,
                    group_idx: opt_uint(get("group_idx"), ty, "group_idx")?,
                },
                "BlockRemoved" => KvCacheEvent::BlockRemoved {
                    block_hashes: hashes(req("block_hashes")?, ty, "block_hashes", info)?,
                    medium: opt_str(get("medium"), ty, "medium")?,
                    group_idx: opt_uint(get("group_idx"), ty, "group_idx")?,
                },
                "AllBlocksCleared" => KvCacheEvent::AllBlocksCleared,
                _ => return Ok(None),
            }))
        }
        Value::Array(a) => {
            info.array_events += 1;
            let Some(t) = a.first() else {
                return Err(bad(node, "got an empty array"));
            };
            let Value::Str(ty) = &t.value else {
                return Err((
                    t.offset,
                    format!("the event's type must be a string, got {}", t.value.kind()),
                ));
            };
            let get = |i: usize| a.get(i).filter(|n| n.value != Value::Nil);
            let req = |i: usize, k: &str| -> DecodeResult<&Node> {
                a.get(i)
                    .ok_or_else(|| (node.offset, format!("{ty}: missing field {i} ({k})")))
            };
            Ok(Some(match ty.as_str() {
                "BlockStored" => KvCacheEvent::BlockStored {
                    block_hashes: hashes(req(1, "block_hashes")?, ty, "block_hashes", info)?,
                    parent_block_hash: opt_hash(get(2), ty, info)?,
                    token_ids: token_ids(req(3, "token_ids")?, ty)?,
                    block_size: uint(req(4, "block_size")?, ty, "block_size")?,
                    lora_id: opt_int(get(5), ty, "lora_id")?,
                    medium: opt_str(get(6), ty, "medium")?,
                    lora_name: opt_str(get(7), ty, "lora_name")?,
                    group_idx: None,
                },
                "BlockRemoved" => KvCacheEvent::BlockRemoved {
                    block_hashes: hashes(req(1, "block_hashes")?, ty, "block_hashes", info)?,
                    medium: opt_str(get(2), ty, "medium")?,
                    group_idx: None,
                },
                "AllBlocksCleared" => KvCacheEvent::AllBlocksCleared,
                _ => return Ok(None),
            }))
        }
        v => Err(bad(node, &format!("got {}", v.kind()))),
    }
}

fn hash(n: &Node, ty: &str, what: &str, info: &mut StreamInfo) -> DecodeResult<EventHash> {
    let h = match &n.value {
        Value::Int(i) => u64::try_from(*i).map(EventHash::Int).map_err(|_| {
            (
                n.offset,
                format!("{ty}: {what}: block hash {i} is not an unsigned 64-bit integer"),
            )
        })?,
        Value::Bin(b) if b.len() <= MAX_HASH_BYTES => EventHash::Bytes(b.clone()),
        Value::Bin(b) => {
            return Err((
                n.offset,
                format!(
                    "{ty}: {what}: a block hash of {} bytes (at most {MAX_HASH_BYTES})",
                    b.len()
                ),
            ))
        }
        // JSON has no bytes: a raw digest is written in hex.
        Value::Str(s) => match parse_hex(s) {
            Some(b) if b.len() <= MAX_HASH_BYTES => EventHash::Bytes(b),
            _ => {
                return Err((
                    n.offset,
                    format!(
                    "{ty}: {what}: a string block hash must be hex, at most {MAX_HASH_BYTES} bytes"
                ),
                ))
            }
        },
        v => {
            return Err((
                n.offset,
                format!(
                    "{ty}: {what}: a block hash must be an integer or bytes, got {}",
                    v.kind()
                ),
            ))
        }
    };
    match h {
        EventHash::Int(_) => info.int_hashes += 1,
        EventHash::Bytes(_) => info.bytes_hashes += 1,
    }
    Ok(h)
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) || s.len() > 2 * MAX_HASH_BYTES {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hashes(n: &Node, ty: &str, what: &str, info: &mut StreamInfo) -> DecodeResult<Vec<EventHash>> {
    let Value::Array(items) = &n.value else {
        return Err((
            n.offset,
            format!("{ty}: {what} must be an array, got {}", n.value.kind()),
        ));
    };
    items.iter().map(|h| hash(h, ty, what, info)).collect()
}

fn opt_hash(n: Option<&Node>, ty: &str, info: &mut StreamInfo) -> DecodeResult<Option<EventHash>> {
    match n {
        None => Ok(None),
        Some(n) if n.value == Value::Nil => Ok(None),
        Some(n) => hash(n, ty, "parent_block_hash", info).map(Some),
    }
}

fn token_ids(n: &Node, ty: &str) -> DecodeResult<Vec<u64>> {
    let Value::Array(items) = &n.value else {
        return Err((
            n.offset,
            format!("{ty}: token_ids must be an array, got {}", n.value.kind()),
        ));
    };
    items
        .iter()
        .map(|t| match t.value {
            Value::Int(i) => u64::try_from(i).map_err(|_| {
                (
                    t.offset,
                    format!("{ty}: token id {i} is negative or too large"),
                )
            }),
            ref v => Err((
                t.offset,
                format!("{ty}: a token id must be an integer, got {}", v.kind()),
            )),
        })
        .collect()
}

fn uint(n: &Node, ty: &str, what: &str) -> DecodeResult<u64> {
    match n.value {
        Value::Int(i) => u64::try_from(i).map_err(|_| {
            (
                n.offset,
                format!("{ty}: {what} {i} is not a non-negative 64-bit integer"),
            )
        }),
        ref v => Err((
            n.offset,
            format!("{ty}: {what} must be an integer, got {}", v.kind()),
        )),
    }
}

fn opt_uint(n: Option<&Node>, ty: &str, what: &str) -> DecodeResult<Option<u64>> {
    match n {
        Some(n) if n.value != Value::Nil => uint(n, ty, what).map(Some),
        _ => Ok(None),
    }
}

fn opt_int(n: Option<&Node>, ty: &str, what: &str) -> DecodeResult<Option<i64>> {
    match n.map(|n| (n, &n.value)) {
        None | Some((_, Value::Nil)) => Ok(None),
        Some((n, Value::Int(i))) => i64::try_from(*i)
            .map(Some)
            .map_err(|_| (n.offset, format!("{ty}: {what} {i} out of range"))),
        Some((n, v)) => Err((
            n.offset,
            format!("{ty}: {what} must be an integer or nil, got {}", v.kind()),
        )),
    }
}

fn opt_str(n: Option<&Node>, ty: &str, what: &str) -> DecodeResult<Option<String>> {
    match n.map(|n| (n, &n.value)) {
        None | Some((_, Value::Nil)) => Ok(None),
        Some((_, Value::Str(s))) => Ok(Some(s.clone())),
        Some((n, v)) => Err((
            n.offset,
            format!("{ty}: {what} must be a string or nil, got {}", v.kind()),
        )),
    }
}

/// A JSON value as a msgpack [`Node`] (offset 0), within a value budget and nesting limit.
fn from_json(v: serde_json::Value, budget: &mut usize, depth: usize) -> Option<Node> {
    use serde_json::Value as J;
    if *budget == 0 || depth > msgpack::MAX_DEPTH {
        return None;
    }
    *budget -= 1;
    let value = match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::Int(u as i128)
            } else if let Some(i) = n.as_i64() {
                Value::Int(i as i128)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::Str(s),
        J::Array(a) => Value::Array(
            a.into_iter()
                .map(|x| from_json(x, budget, depth + 1))
                .collect::<Option<_>>()?,
        ),
        J::Object(o) => Value::Map(
            o.into_iter()
                .map(|(k, x)| {
                    Some((
                        Node {
                            offset: 0,
                            value: Value::Str(k),
                        },
                        from_json(x, budget, depth + 1)?,
                    ))
                })
                .collect::<Option<_>>()?,
        ),
    };
    Some(Node { offset: 0, value })
}

/// No KV-cache group given (vLLM before group indices, or a stream without them).
const NO_GROUP: u64 = u64::MAX;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    medium: u16,
    group: u64,
    hash: EventHash,
}

#[derive(Clone, Debug)]
struct Entry {
    parent: Option<EventHash>,
    tokens: u64,
    copies: u64,
}

#[derive(Clone, Debug, Default)]
struct MediumCounts {
    stored: u64,
    removed: u64,
    live: u64,
}

/// The cache index a KV-aware router rebuilds from the events: which blocks each medium
/// holds, with each block's parent and token count.
#[derive(Clone, Debug, Default)]
pub struct CacheIndex {
    /// Interned media; index 0 is "no medium given".
    media: Vec<Option<String>>,
    by_medium: Vec<MediumCounts>,
    entries: HashMap<Key, Entry>,
    live: u64,
    max_live: u64,
    counts: Counts,
    unknown_types: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Counts {
    block_stored_events: u64,
    blocks_stored: u64,
    tokens_stored: u64,
    duplicate_stores: u64,
    token_count_mismatches: u64,
    block_removed_events: u64,
    blocks_removed: u64,
    removed_unknown: u64,
    all_blocks_cleared: u64,
}

impl CacheIndex {
    pub fn new() -> Self {
        CacheIndex {
            media: vec![None],
            by_medium: vec![MediumCounts::default()],
            ..Default::default()
        }
    }

    fn medium(&mut self, m: &Option<String>) -> Result<u16, String> {
        if let Some(i) = self.media.iter().position(|x| x == m) {
            return Ok(i as u16);
        }
        if self.media.len() >= MAX_MEDIA {
            return Err(format!("more than {MAX_MEDIA} distinct media"));
        }
        self.media.push(m.clone());
        self.by_medium.push(MediumCounts::default());
        Ok((self.media.len() - 1) as u16)
    }

    /// Applies one event. Errors only when the stream names too many distinct media.
    pub fn apply(&mut self, ev: &KvCacheEvent) -> Result<(), String> {
        match ev {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                medium,
                group_idx,
                ..
            } => {
                let m = self.medium(medium)?;
                let group = group_idx.unwrap_or(NO_GROUP);
                let c = &mut self.counts;
                c.block_stored_events += 1;
                c.blocks_stored += block_hashes.len() as u64;
                c.tokens_stored += token_ids.len() as u64;
                if (block_hashes.len() as u64).checked_mul(*block_size)
                    != Some(token_ids.len() as u64)
                {
                    c.token_count_mismatches += 1;
                }
                self.by_medium[m as usize].stored += block_hashes.len() as u64;
                let mut parent = parent_block_hash.clone();
                for h in block_hashes {
                    let key = Key {
                        medium: m,
                        group,
                        hash: h.clone(),
                    };
                    let e = self.entries.entry(key).or_insert_with(|| Entry {
                        parent: parent.clone(),
                        tokens: *block_size,
                        copies: 0,
                    });
                    if e.copies > 0 {
                        self.counts.duplicate_stores += 1;
                    }
                    e.copies += 1;
                    self.live += 1;
                    self.by_medium[m as usize].live += 1;
                    parent = Some(h.clone());
                }
                self.max_live = self.max_live.max(self.live);
            }
            KvCacheEvent::BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            } => {
                let m = self.medium(medium)?;
                let group = group_idx.unwrap_or(NO_GROUP);
                self.counts.block_removed_events += 1;
                self.counts.blocks_removed += block_hashes.len() as u64;
                self.by_medium[m as usize].removed += block_hashes.len() as u64;
                for h in block_hashes {
                    let key = Key {
                        medium: m,
                        group,
                        hash: h.clone(),
                    };
                    match self.entries.get_mut(&key) {
                        Some(e) => {
                            e.copies -= 1;
                            if e.copies == 0 {
                                self.entries.remove(&key);
                            }
                            self.live -= 1;
                            self.by_medium[m as usize].live -= 1;
                        }
                        None => self.counts.removed_unknown += 1,
                    }
                }
            }
            // vLLM's `reset_prefix_cache`: the index forgets every block, on every medium.
            KvCacheEvent::AllBlocksCleared => {
                self.counts.all_blocks_cleared += 1;
                self.entries.clear();
                self.live = 0;
                for c in &mut self.by_medium {
                    c.live = 0;
                }
            }
        }
        Ok(())
    }

    /// Physical blocks holding a hash now (copies counted).
    pub fn blocks_live(&self) -> u64 {
        self.live
    }

    /// Distinct (medium, group, hash) entries now.
    pub fn hashes_live(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Copies of `hash` held on `medium` (None: no medium given) in `group`.
    pub fn copies(&self, medium: Option<&str>, group: Option<u64>, hash: &EventHash) -> u64 {
        let Some(m) = self.media.iter().position(|x| x.as_deref() == medium) else {
            return 0;
        };
        let key = Key {
            medium: m as u16,
            group: group.unwrap_or(NO_GROUP),
            hash: hash.clone(),
        };
        self.entries.get(&key).map_or(0, |e| e.copies)
    }

    /// (depth in blocks, prefix tokens) of the longest chain of live blocks, following parent
    /// links within one medium and group. Deterministic: keys are walked in sorted order, and
    /// a malformed stream's cycle ends a chain.
    pub fn longest_chain(&self) -> (u64, u64) {
        let mut keys: Vec<&Key> = self.entries.keys().collect();
        keys.sort_unstable();
        // (depth, tokens); depth 0 marks a walk in progress.
        let mut memo: HashMap<&Key, (u64, u64)> = HashMap::with_capacity(keys.len());
        let mut best = (0u64, 0u64);
        let mut stack: Vec<(&Key, &Entry)> = Vec::new();
        for &k in &keys {
            if memo.contains_key(k) {
                continue;
            }
            // Walk up to a known ancestor, a root, or a cycle.
            let mut cur = self.entries.get_key_value(k);
            let mut base = (0u64, 0u64);
            while let Some((key, e)) = cur {
                if let Some(&d) = memo.get(key) {
                    base = d; // (0, 0) for a node of this walk: a cycle, cut here
                    break;
                }
                memo.insert(key, (0, 0));
                stack.push((key, e));
                cur = e.parent.as_ref().and_then(|p| {
                    self.entries.get_key_value(&Key {
                        medium: key.medium,
                        group: key.group,
                        hash: p.clone(),
                    })
                });
            }
            while let Some((key, e)) = stack.pop() {
                base = (base.0 + 1, base.1.saturating_add(e.tokens));
                memo.insert(key, base);
                best = best.max(base);
            }
        }
        let tokens = memo.values().map(|d| d.1).max().unwrap_or(0);
        (best.0, tokens)
    }

    /// The report of the index as it is now.
    pub fn report(&self, info: &StreamInfo) -> KvEventsReport {
        let (chain_blocks, chain_tokens) = self.longest_chain();
        let tokens_live = self.entries.values().fold(0u64, |acc, e| {
            acc.saturating_add(e.tokens.saturating_mul(e.copies))
        });
        let mut media: Vec<MediumReport> = self
            .media
            .iter()
            .zip(&self.by_medium)
            .filter(|(_, c)| c.stored + c.removed > 0)
            .map(|(m, c)| MediumReport {
                medium: m.clone(),
                blocks_stored: c.stored,
                blocks_removed: c.removed,
                blocks_live: c.live,
            })
            .collect();
        media.sort_by(|a, b| a.medium.cmp(&b.medium));
        let c = self.counts;
        KvEventsReport {
            format: info.format,
            event_encoding: match (info.map_events > 0, info.array_events > 0) {
                (true, false) => "map",
                (false, true) => "array",
                (true, true) => "mixed",
                (false, false) => "none",
            },
            hash_encoding: match (info.int_hashes > 0, info.bytes_hashes > 0) {
                (true, false) => "int",
                (false, true) => "bytes",
                (true, true) => "mixed",
                (false, false) => "none",
            },
            batches: info.batches,
            events: info.map_events + info.array_events,
            unknown_events: self.unknown_types,
            block_stored_events: c.block_stored_events,
            blocks_stored: c.blocks_stored,
            tokens_stored: c.tokens_stored,
            duplicate_stores: c.duplicate_stores,
            token_count_mismatches: c.token_count_mismatches,
            block_removed_events: c.block_removed_events,
            blocks_removed: c.blocks_removed,
            removed_unknown: c.removed_unknown,
            all_blocks_cleared: c.all_blocks_cleared,
            blocks_live: self.live,
            hashes_live: self.entries.len() as u64,
            tokens_live,
            max_blocks_live: self.max_live,
            longest_chain_blocks: chain_blocks,
            longest_chain_tokens: chain_tokens,
            first_ts: None,
            last_ts: None,
            data_parallel_ranks: Vec::new(),
            media,
        }
    }
}

/// Blocks of one medium.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MediumReport {
    /// `"GPU"`, `"CPU"`, … (null when the events gave none).
    pub medium: Option<String>,
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub blocks_live: u64,
}

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
    pub media: Vec<MediumReport>,
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
    let mut err: Option<TraceError> = None;
    let (mut first_ts, mut last_ts) = (None, None);
    let mut ranks: Vec<i64> = Vec::new();
    let info = for_each_event_as(path, bytes, format, |meta, ev| {
        if err.is_some() {
            return;
        }
        if let Some(ts) = meta.ts {
            first_ts.get_or_insert(ts);
            last_ts = Some(ts);
        }
        if let Some(r) = meta.data_parallel_rank {
            if let Err(i) = ranks.binary_search(&r) {
                if ranks.len() < 1024 {
                    ranks.insert(i, r);
                }
            }
        }
        match ev {
            Some(ev) => {
                if let Err(e) = index.apply(&ev) {
                    err = Some(TraceError::new(path, meta.location, e));
                }
            }
            None => index.unknown_types += 1,
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let mut report = index.report(&info);
    report.first_ts = first_ts;
    report.last_ts = last_ts;
    report.data_parallel_ranks = ranks;
    Ok((index, report))
}

/// Reads and imports a KV-event recording.
pub fn import_file(path: &Path) -> Result<KvEventsReport, TraceError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TraceError::in_file(path, format!("cannot read the file: {e}")))?;
    import_bytes(path, &bytes).map(|(_, r)| r)
}
