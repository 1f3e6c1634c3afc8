//! Decoding: a recorded stream, in either encoding, into [`KvCacheEvent`]s with where each came
//! from.

use std::path::Path;

use serde::Serialize;

use super::msgpack::{self, Decoder, Node, Value};
use crate::error::{json_reason, Location, TraceError};
use crate::read::LineReader;
use gpumem_core::kv::index::{EventHash, KvCacheEvent};

/// Values one msgpack batch (or one JSON line) may hold. vLLM's batches hold a step's events
/// (tens of thousands of values at most).
pub const MAX_VALUES_PER_BATCH: usize = 1 << 22;

/// Longest raw block hash accepted, in bytes (vLLM's digests are 32 or 16 bytes).
pub const MAX_HASH_BYTES: usize = 64;

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
    match format {
        StreamFormat::Msgpack => for_each_msgpack_event(path, bytes, &mut info, &mut f)?,
        StreamFormat::Jsonl => for_each_jsonl_event(path, bytes, &mut info, &mut f)?,
    }
    Ok(info)
}

/// Batches `[ts, [event, …], data_parallel_rank]`, concatenated.
fn for_each_msgpack_event(
    path: &Path,
    bytes: &[u8],
    info: &mut StreamInfo,
    f: &mut impl FnMut(&EventMeta, Option<KvCacheEvent>),
) -> Result<(), TraceError> {
    let mut dec = Decoder::new(bytes, MAX_VALUES_PER_BATCH);
    let mut batch = 0u64;
    while let Some(node) = dec.next_value() {
        let node =
            node.map_err(|e| TraceError::new(path, Location::ByteOffset(e.offset), e.reason))?;
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
            let parsed = decode_event(ev, info).map_err(|(n, r)| {
                fail(
                    Location::ByteOffset(n),
                    format!("batch {batch}, event {i}: {r}"),
                )
            })?;
            f(&meta, parsed);
        }
        batch += 1;
    }
    Ok(())
}

/// One event a line.
fn for_each_jsonl_event(
    path: &Path,
    bytes: &[u8],
    info: &mut StreamInfo,
    f: &mut impl FnMut(&EventMeta, Option<KvCacheEvent>),
) -> Result<(), TraceError> {
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
            serde_json::from_str(text).map_err(|e| fail(json_reason(&e, "bad JSON")))?;
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
                    Some(v) => return Err(fail(format!("ts must be a number, got {}", v.kind()))),
                },
                match field(m, "data_parallel_rank").map(|n| &n.value) {
                    None | Some(Value::Nil) => None,
                    Some(Value::Int(x)) => Some(
                        i64::try_from(*x)
                            .map_err(|_| fail(format!("data_parallel_rank {x} out of range")))?,
                    ),
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
        let parsed = decode_event(&node, info).map_err(|(_, r)| fail(r))?;
        info.batches += 1;
        f(&meta, parsed);
        index += 1;
    }
    Ok(())
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
