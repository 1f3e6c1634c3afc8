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
pub use error::{echo, Location, TraceError};

use std::path::Path;

/// True when `bytes` look like a pickle: protocol 2+ starts with PROTO (0x80); protocols 0 and
/// 1 of a container start with MARK, EMPTY_DICT, EMPTY_LIST or EMPTY_TUPLE, which no JSON
/// Lines trace does.
pub fn looks_like_pickle(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x80 | b'(' | b'}' | b']' | b')'))
}

/// Largest torch snapshot read (a pickle is parsed whole; the pickle reader's memory budget
/// refuses far smaller ones that expand a lot).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// Loads an allocation trace by content: a pickle (first byte 0x80, or a protocol-0/1 pickle)
/// is read as a torch memory snapshot; anything else as gpumem's JSON Lines trace. `-` reads
/// stdin; the input is read once, so a pipe or a FIFO works. A trace with no operation is
/// refused, and so is a serving trace (with a hint to `gpumem kv`).
pub fn load_alloc_trace(path: &Path) -> Result<AllocTrace, TraceError> {
    let mut input = read::open(path)?;
    let head = read::peek(&mut *input, path)?;
    let trace = if looks_like_pickle(&head) {
        let bytes = torch::read_snapshot_bytes(&mut *input, path)?;
        torch::parse_bytes(path, &bytes)?
    } else {
        if let Some(kind) = serving_trace_kind(&head) {
            return Err(TraceError::in_file(
                path,
                format!("this is a {kind} request trace, not an allocation trace: `gpumem kv --trace` reads it"),
            ));
        }
        jsonl::parse_reader(path, input)?
    };
    if trace.ops.is_empty() {
        return Err(TraceError::in_file(path, "the trace holds no operation"));
    }
    Ok(trace)
}

/// Whether the first bytes of a file name the fields of a serving trace (the formats `gpumem
/// kv` reads), and which.
fn serving_trace_kind(head: &[u8]) -> Option<&'static str> {
    let first_line = head.split(|&b| b == b'\n').next()?;
    let text = String::from_utf8_lossy(first_line);
    let has = |key: &str| text.contains(&format!("\"{key}\""));
    if has("input_length") || has("hash_ids") {
        Some("Mooncake or Qwen-Bailian")
    } else if has("arrival_us") && has("max_tokens") {
        Some("conformance")
    } else if text.contains("ContextTokens") || text.contains("Request tokens") {
        Some("CSV (Azure or BurstGPT)")
    } else {
        None
    }
}
