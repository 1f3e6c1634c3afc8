//! Recorded vLLM KV-cache event streams, decoded into the events a KV-aware router's cache index
//! takes.
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
//! [`decode`] reads a stream into events; the index they build is a policy of `gpumem-core`
//! ([`CacheIndex`], re-exported here with the event types it takes); [`import_bytes`] and
//! [`import_file`] feed a decoded stream into a fresh index and report both.
//!
//! Errors name the file and the byte offset (msgpack) or line (JSON Lines), never panic, and
//! bound what they allocate (see [`msgpack`]).

pub mod decode;
mod import;
pub mod msgpack;

pub use decode::{
    detect_format, for_each_event, for_each_event_as, looks_like_msgpack_events, read_events,
    EventMeta, StreamFormat, StreamInfo, TimedEvent, MAX_HASH_BYTES, MAX_VALUES_PER_BATCH,
};
pub use gpumem_core::kv::index::{CacheIndex, EventHash, KvCacheEvent, MediumSummary, MAX_MEDIA};
pub use import::{
    import_bytes, import_bytes_as, import_file, read_stream, KvEventsReport, MAX_EVENT_STREAM_BYTES,
};
