//! gpumem's trace formats, importers and seeded generators.
//!
//! - [`alloc_trace`]: the allocation workload ([`AllocTrace`]) every source turns into;
//! - [`pickle`]: a minimal, safe reader of Python pickles of plain values;
//! - [`torch`]: `torch.cuda.memory._dump_snapshot` pickles → [`AllocTrace`];
//! - [`jsonl`]: gpumem's own JSON Lines allocation trace, read and written;
//! - [`kv_events`]: vLLM KV-cache event streams (msgpack batches, JSON Lines) → a router's cache index;
//! - [`read`]: the bounded line reader every line-oriented format reads through;
//! - [`generate`]: seeded generators of allocation traces (LLM serving, fixed occupancy);
//! - [`serving`]: serving workloads (requests for a serving engine): the conformance workload,
//!   Mooncake, Qwen-Bailian, Azure LLM 2023 and BurstGPT importers, seeded generators.
//!
//! Importers never panic on malformed input: they answer a [`TraceError`] with file, location
//! and reason, and bound what they allocate (sizes above [`MAX_BYTES`] are errors).

pub mod alloc_trace;
pub mod error;
pub mod generate;
pub mod jsonl;
pub mod kv_events;
pub mod pickle;
pub mod read;
pub mod serving;
pub mod torch;

pub use alloc_trace::*;
pub use error::{Location, TraceError};

use std::path::Path;

/// True when `bytes` look like a pickle: protocol 2+ starts with PROTO (0x80); protocols 0 and
/// 1 of a container start with MARK, EMPTY_DICT, EMPTY_LIST or EMPTY_TUPLE, which no JSON
/// Lines trace does.
pub fn looks_like_pickle(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x80 | b'(' | b'}' | b']' | b')'))
}

/// Loads an allocation trace by content: a pickle (first byte 0x80, or a protocol-0/1 pickle)
/// is read as a torch memory snapshot; anything else as gpumem's JSON Lines trace.
pub fn load_alloc_trace(path: &Path) -> Result<AllocTrace, TraceError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TraceError::in_file(path, format!("cannot read the file: {e}")))?;
    if looks_like_pickle(&bytes) {
        torch::parse_bytes(path, &bytes)
    } else {
        jsonl::parse_bytes(path, &bytes)
    }
}
