//! Serving workloads: the requests an LLM-serving engine replays. Every source becomes one
//! [`Workload`] (requests in arrival order, each a prompt and a number of tokens to generate):
//!
//! - the conformance workload (JSON Lines) of `../shared/conformance/README.md`, read by
//!   [`Workload::read`] with the same checks as vLLM's oracle;
//! - Mooncake JSONL, Qwen-Bailian JSONL, Azure LLM 2023 CSV and BurstGPT CSV ([`import`]);
//! - seeded generators ([`generate`]), the workload of a run without a trace.
//!
//! [`RequestStream`] reads a file (or a pipe) in a given [`WorkloadFormat`], or the one its
//! content shows, lazily: one request at a time, in arrival order ([`stream`]); [`load`] reads
//! one whole into memory. Every refusal names the file and line ([`TraceError`]), never
//! panics. Prompts are never expanded into memory: [`Prompt::fill`] produces any token range
//! on demand by the contract's rule.

mod conformance;
pub mod generate;
pub mod import;
pub mod stream;
#[cfg(test)]
mod tests;

use std::io::BufRead;
use std::path::Path;

use serde::de::IgnoredAny;

use crate::error::{echo, json_reason, TraceError};
pub use stream::{LineParser, RequestStream, MAX_LINE_BYTES, MAX_REQUESTS, REORDER_WINDOW};

/// The contract's token expansion constants.
pub const PROMPT_MOD: i128 = 1_000_000_007;
pub const GEN_BASE: u64 = 2_000_000_000;
pub const GEN_STRIDE: u64 = 10_000;
pub const DEFAULT_HASH_BLOCK: u64 = 512;
/// Longest prompt gpumem accepts (bounds what a hostile workload can make it allocate).
pub const MAX_PROMPT_TOKENS: u64 = 1 << 32;
/// Latest arrival time accepted (keeps the simulated clock far from overflow).
pub const MAX_ARRIVAL_US: u64 = 1 << 60;
/// Longest model name a request may carry, in bytes (what a hostile trace can make every
/// request hold).
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// A request's model name as a trace gives it (`what` names the field in errors): non-empty, at
/// most [`MAX_MODEL_NAME_BYTES`] bytes. Any other character is kept as it is; errors echo it
/// escaped.
pub(crate) fn model_name(what: &str, text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err(format!("{what} is empty: give the name of a model"));
    }
    if text.len() > MAX_MODEL_NAME_BYTES {
        return Err(format!(
            "{what} \"{}\" is {} bytes long, over gpumem's limit of {MAX_MODEL_NAME_BYTES} (MAX_MODEL_NAME_BYTES)",
            echo(text),
            text.len()
        ));
    }
    Ok(text.to_string())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Explicit token ids.
    Tokens(Vec<u32>),
    /// The Mooncake form: token `j` is `(hash_ids[j / hash_block] * hash_block + j % hash_block)
    /// mod 1_000_000_007`.
    HashIds {
        hash_ids: Vec<i64>,
        input_length: u64,
        hash_block: u64,
    },
    /// A prompt that shares nothing (traces without prefix information): the Mooncake form with
    /// `hash_ids = first_hash_id, first_hash_id + 1, …` over 512-token blocks, without storing
    /// them. Requests given disjoint id ranges share no token.
    Unique {
        first_hash_id: i64,
        input_length: u64,
    },
}

/// Appends tokens `start..end` of a prompt in the Mooncake form whose block `b` has id `id(b)`.
fn fill_hashed(id: impl Fn(u64) -> i64, hb: u64, start: u64, end: u64, out: &mut Vec<u32>) {
    const P: u64 = PROMPT_MOD as u64;
    // (id * hb + o) mod P, from residues: every factor below 2^30, so no product overflows
    // (and no 128-bit division runs per block).
    let hb_mod = hb % P;
    let mut j = start;
    while j < end {
        let b = j / hb;
        let o = j % hb;
        let run_end = end.min((b + 1).saturating_mul(hb));
        let id_mod = id(b).rem_euclid(P as i64) as u64;
        let base = (id_mod * hb_mod % P + o % P) % P;
        // Consecutive offsets in one hash block: no division per token.
        let n = (run_end - j) as usize;
        let at = out.len();
        out.resize(at + n, 0);
        let run = &mut out[at..];
        if base + n as u64 <= P {
            let base = base as u32;
            for (k, t) in run.iter_mut().enumerate() {
                *t = base + k as u32;
            }
        } else {
            for (k, t) in run.iter_mut().enumerate() {
                *t = ((base + k as u64) % P) as u32;
            }
        }
        j = run_end;
    }
}

impl Prompt {
    pub fn len(&self) -> u64 {
        match self {
            Prompt::Tokens(t) => t.len() as u64,
            Prompt::HashIds { input_length, .. } | Prompt::Unique { input_length, .. } => {
                *input_length
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first token of prompt tokens `start..start + len` when they are consecutive ids
    /// (`t, t + 1, …`: inside one hash block of the Mooncake form, short of the modulus), which
    /// lets a hasher skip making them; None otherwise.
    pub fn consecutive_from(&self, start: u64, len: u64) -> Option<u32> {
        const P: u64 = PROMPT_MOD as u64;
        let (id, hb) = match self {
            Prompt::Tokens(_) => return None,
            Prompt::HashIds {
                hash_ids,
                hash_block,
                ..
            } => (*hash_ids.get((start / hash_block) as usize)?, *hash_block),
            Prompt::Unique { first_hash_id, .. } => (
                first_hash_id.wrapping_add((start / DEFAULT_HASH_BLOCK) as i64),
                DEFAULT_HASH_BLOCK,
            ),
        };
        let o = start % hb;
        if len > hb - o || start + len > self.len() {
            return None;
        }
        let base = (id.rem_euclid(P as i64) as u64 * (hb % P) % P + o % P) % P;
        (base + len <= P).then_some(base as u32)
    }

    /// The longest run of consecutive token ids (`t, t + 1, …`) starting at prompt token
    /// `start`: its first token and length, within one hash block of the Mooncake form, the
    /// prompt and the modulus. One division per run, where [`consecutive_from`] of each block
    /// of the run would take several per block. None for explicit tokens or past the prompt.
    ///
    /// [`consecutive_from`]: Self::consecutive_from
    pub fn consecutive_run(&self, start: u64) -> Option<(u32, u64)> {
        const P: u64 = PROMPT_MOD as u64;
        let (id, hb) = match self {
            Prompt::Tokens(_) => return None,
            Prompt::HashIds {
                hash_ids,
                hash_block,
                ..
            } => (*hash_ids.get((start / hash_block) as usize)?, *hash_block),
            Prompt::Unique { first_hash_id, .. } => (
                first_hash_id.wrapping_add((start / DEFAULT_HASH_BLOCK) as i64),
                DEFAULT_HASH_BLOCK,
            ),
        };
        let len = self.len();
        if start >= len {
            return None;
        }
        let o = start % hb;
        let base = (id.rem_euclid(P as i64) as u64 * (hb % P) % P + o % P) % P;
        let run = (hb - o).min(len - start).min(P - base);
        Some((base as u32, run))
    }

    /// Appends prompt tokens `start..end` to `out`.
    pub fn fill(&self, start: u64, end: u64, out: &mut Vec<u32>) {
        debug_assert!(start <= end && end <= self.len());
        match self {
            Prompt::Tokens(t) => out.extend_from_slice(&t[start as usize..end as usize]),
            Prompt::HashIds {
                hash_ids,
                hash_block,
                ..
            } => fill_hashed(|b| hash_ids[b as usize], *hash_block, start, end, out),
            Prompt::Unique { first_hash_id, .. } => fill_hashed(
                |b| first_hash_id.wrapping_add(b as i64),
                DEFAULT_HASH_BLOCK,
                start,
                end,
                out,
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadRequest {
    pub id: String,
    pub arrival_us: u64,
    pub prompt: Prompt,
    pub max_tokens: u64,
    /// vLLM's request priority: lower is served first under `--scheduling-policy priority`.
    pub priority: i64,
    /// 1-based line in the workload file (for error messages).
    pub line: u64,
    /// The model the request names (the `model` field of the conformance and Mooncake JSON
    /// Lines, BurstGPT's `Model` column), at most [`MAX_MODEL_NAME_BYTES`] bytes. Read only by a
    /// stream asked for it ([`RequestStream::read_models`]: `gpumem models`); None otherwise,
    /// and for every request a format without model names gives.
    pub model: Option<String>,
}

impl WorkloadRequest {
    /// The `k`-th generated token of the request on 0-based line `index` of the workload.
    #[inline]
    pub fn generated_token(index: usize, k: u64) -> u32 {
        (GEN_BASE + index as u64 * GEN_STRIDE + k) as u32
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Where it was read from (for error messages).
    pub source: String,
    /// Requests in arrival order (the 0-based position is the request's index).
    pub requests: Vec<WorkloadRequest>,
    /// Unknown fields that were ignored and records that were skipped, one message each.
    pub warnings: Vec<String>,
}

impl Workload {
    /// Reads a conformance workload file.
    pub fn read_file(path: &Path) -> Result<Workload, TraceError> {
        Self::read_file_limited(path, None)
    }

    /// Reads at most `limit` requests of a conformance workload file.
    pub fn read_file_limited(path: &Path, limit: Option<u64>) -> Result<Workload, TraceError> {
        Workload::collect(RequestStream::open(
            path,
            Some(WorkloadFormat::Conformance),
            limit,
        )?)
    }

    /// Parses a conformance workload; `source` names it in errors.
    pub fn read(input: impl BufRead, source: &str) -> Result<Workload, TraceError> {
        Self::read_limited(input, source, None)
    }

    /// Parses the first `limit` requests of a conformance workload.
    pub fn read_limited(
        input: impl BufRead,
        source: &str,
        limit: Option<u64>,
    ) -> Result<Workload, TraceError> {
        Workload::collect(RequestStream::from_reader(
            input,
            source,
            Some(WorkloadFormat::Conformance),
            limit,
        )?)
    }

    /// Every request of `stream`, in memory.
    pub fn collect(mut stream: RequestStream<'_>) -> Result<Workload, TraceError> {
        let mut requests = Vec::new();
        for r in &mut stream {
            requests.push(r?);
        }
        Ok(Workload {
            source: stream.source().to_string(),
            requests,
            warnings: stream.warnings().to_vec(),
        })
    }

    /// vLLM's input-processor checks against a config: every prompt shorter than
    /// `max_model_len`. The first refusal names the request's file and line.
    pub fn validate(&self, max_model_len: u64) -> Result<(), TraceError> {
        match self.requests.iter().find(|r| r.prompt.len() >= max_model_len) {
            None => Ok(()),
            Some(r) => Err(TraceError::at_line(
                &self.source,
                r.line,
                format!(
                    "prompt length {} >= max_model_len {max_model_len} (vLLM's input processor rejects it)",
                    r.prompt.len()
                ),
            )),
        }
    }

    /// Takes out the requests vLLM's input processor would reject (prompt of `max_model_len`
    /// tokens or more), keeping the others in order, and returns them.
    pub fn take_too_long(&mut self, max_model_len: u64) -> Vec<WorkloadRequest> {
        if self.validate(max_model_len).is_ok() {
            return Vec::new();
        }
        let (keep, rejected) = std::mem::take(&mut self.requests)
            .into_iter()
            .partition(|r| r.prompt.len() < max_model_len);
        self.requests = keep;
        rejected
    }
}

/// The workload formats gpumem reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadFormat {
    /// `../shared/conformance/README.md`: `{"id", "arrival_us", "prompt" | "hash_ids" +
    /// "input_length", "max_tokens"}`, and gpumem's optional `"model"`.
    Conformance,
    /// Mooncake (FAST'25): `{"timestamp" (ms), "input_length", "output_length", "hash_ids"}`,
    /// and gpumem's optional `"model"`.
    Mooncake,
    /// Qwen-Bailian: `{"chat_id", "parent_chat_id", "timestamp" (s), "input_length",
    /// "output_length", "hash_ids" (16-token blocks), ...}`.
    QwenBailian,
    /// Azure LLM inference 2023: `TIMESTAMP,ContextTokens,GeneratedTokens`.
    Azure,
    /// BurstGPT: `Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`.
    BurstGpt,
}

impl WorkloadFormat {
    pub const ALL: [WorkloadFormat; 5] = [
        WorkloadFormat::Conformance,
        WorkloadFormat::Mooncake,
        WorkloadFormat::QwenBailian,
        WorkloadFormat::Azure,
        WorkloadFormat::BurstGpt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadFormat::Conformance => "conformance",
            WorkloadFormat::Mooncake => "mooncake",
            WorkloadFormat::QwenBailian => "qwen-bailian",
            WorkloadFormat::Azure => "azure",
            WorkloadFormat::BurstGpt => "burstgpt",
        }
    }

    pub fn parse(name: &str) -> Option<WorkloadFormat> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The line parser of the format; `source` names the input in errors.
    pub fn parser(self, source: &str) -> Box<dyn LineParser> {
        match self {
            WorkloadFormat::Conformance => Box::new(conformance::Conformance::new(source)),
            WorkloadFormat::Mooncake => Box::new(import::Mooncake::new(source)),
            WorkloadFormat::QwenBailian => Box::new(import::QwenBailian::new(source)),
            WorkloadFormat::Azure => Box::new(import::CsvTrace::azure(source)),
            WorkloadFormat::BurstGpt => Box::new(import::CsvTrace::burstgpt(source)),
        }
    }

    /// The format of a file whose first non-blank line is `first_line`: JSON Lines by their
    /// keys (values are skipped unread, so a huge or odd value never decides), CSV by their
    /// header.
    pub fn detect(path: &Path, line: u64, first_line: &str) -> Result<WorkloadFormat, TraceError> {
        let undecided = |why: &str| {
            let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
            TraceError::at_line(
                path,
                line,
                format!(
                    "cannot tell the workload format ({why}); pass --format {}",
                    names.join("|")
                ),
            )
        };
        let text = first_line.trim();
        if text.starts_with('{') {
            let keys: TopKeys = serde_json::from_str(text)
                .map_err(|e| undecided(&json_reason(&e, "the first line is not a JSON object")))?;
            let has = |k: &str| keys.has(k);
            return if has("t_ns") && has("op") {
                Err(TraceError::at_line(
                    path,
                    line,
                    "this is an allocation trace (gpumem JSON Lines), not a request trace: `gpumem alloc --trace` reads it",
                ))
            } else if has("chat_id") || has("parent_chat_id") {
                Ok(WorkloadFormat::QwenBailian)
            } else if has("arrival_us") || has("id") || has("prompt") {
                Ok(WorkloadFormat::Conformance)
            } else if has("timestamp") && has("hash_ids") {
                Ok(WorkloadFormat::Mooncake)
            } else {
                Err(undecided(&if keys.first.is_empty() {
                    "a JSON object with none of their keys".to_string()
                } else {
                    format!("unknown JSON keys: {}", keys.first)
                }))
            };
        }
        let mut header = csv::StringRecord::new();
        import::csv_fields(text, &mut header).map_err(|m| undecided(&m))?;
        if header.iter().any(|c| c == "ContextTokens") {
            Ok(WorkloadFormat::Azure)
        } else if header.iter().any(|c| c == "Request tokens") {
            Ok(WorkloadFormat::BurstGpt)
        } else {
            Err(undecided("neither JSON Lines nor a known CSV header"))
        }
    }
}

/// The top-level keys of a JSON object that format detection looks for, every value skipped
/// unparsed ([`IgnoredAny`]: a number of any size, a list of millions, all just read past).
#[derive(Default)]
struct TopKeys {
    /// Bit `i`: [`DETECTION_KEYS`]`[i]` is present.
    found: u32,
    /// The first few keys, echoed, for a line of unknown keys.
    first: String,
}

/// Every key [`WorkloadFormat::detect`] asks about.
const DETECTION_KEYS: [&str; 9] = [
    "chat_id",
    "parent_chat_id",
    "arrival_us",
    "id",
    "prompt",
    "timestamp",
    "hash_ids",
    "t_ns",
    "op",
];

impl TopKeys {
    fn has(&self, key: &str) -> bool {
        DETECTION_KEYS
            .iter()
            .position(|k| *k == key)
            .is_some_and(|i| self.found & (1 << i) != 0)
    }
}

impl<'de> serde::Deserialize<'de> for TopKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TopKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TopKeys, A::Error> {
                const SHOWN_KEYS: usize = 3;
                let mut keys = TopKeys::default();
                let mut shown = 0;
                while let Some(key) = map.next_key::<String>()? {
                    match DETECTION_KEYS.iter().position(|k| *k == key) {
                        Some(i) => keys.found |= 1 << i,
                        None if shown < SHOWN_KEYS => {
                            if shown > 0 {
                                keys.first.push_str(", ");
                            }
                            keys.first.push_str(&format!("\"{}\"", echo(&key)));
                            shown += 1;
                        }
                        None if shown == SHOWN_KEYS => {
                            keys.first.push_str(", …");
                            shown += 1;
                        }
                        None => {}
                    }
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(keys)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// The format of the trace at `path`, told from its first non-blank line (read once: a pipe
/// is read up to that line, and what it held is then gone).
pub fn detect_format(path: &Path) -> Result<WorkloadFormat, TraceError> {
    Ok(RequestStream::open(path, None, Some(0))?.format())
}

/// Reads a workload file in `format`, or in the format [`detect_format`] finds; at most
/// `limit` requests, into memory. Returns the workload and its format.
pub fn load(
    path: &Path,
    format: Option<WorkloadFormat>,
    limit: Option<u64>,
) -> Result<(Workload, WorkloadFormat), TraceError> {
    let stream = RequestStream::open(path, format, limit)?;
    let format = stream.format();
    Ok((Workload::collect(stream)?, format))
}
