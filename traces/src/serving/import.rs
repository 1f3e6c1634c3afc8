//! Importers of public request traces into a [`Workload`] (formats: `../shared/notes/trace-formats.md`).
//!
//! - Mooncake JSONL: `hash_ids` over 512-token blocks, expanded by the conformance contract's
//!   rule; arrival from `timestamp` (ms); ids `r<record index>`, `max_tokens = max(1,
//!   output_length)`, exactly as `vllm-oracle/mooncake_to_workload.py` converts it.
//! - Qwen-Bailian JSONL: `hash_ids` over 16-token blocks, id from `chat_id`, `timestamp` in
//!   seconds (rebased so that the first request arrives at 0).
//! - Azure LLM 2023 CSV and BurstGPT CSV: lengths only, no prefix information, so every prompt
//!   is unique ([`Prompt::Unique`]); timestamps rebased to the first request. BurstGPT rows with
//!   zero request or response tokens (failed requests) are skipped and counted in a warning.
//!
//! Each format is a [`LineParser`] that [`RequestStream`] drives, which also puts requests in
//! arrival order (stable: ties keep file order). Numbers are read without floats deciding
//! anything: a decimal `timestamp` is parsed digit by digit. Errors name the file and line;
//! lengths above [`MAX_PROMPT_TOKENS`] are refused. The functions named after the formats
//! read a whole workload into memory.

use std::io::BufRead;

use serde_json::{Map, Value};

use super::stream::{LineParser, Record, RequestStream, Timing};
use super::{
    model_name, Prompt, Workload, WorkloadFormat, WorkloadRequest, DEFAULT_HASH_BLOCK,
    MAX_PROMPT_TOKENS,
};
use crate::error::{echo, json_reason, TraceError};

pub use super::stream::MAX_REQUESTS;
/// Qwen-Bailian's hash block.
pub const QWEN_HASH_BLOCK: u64 = 16;

/// Largest exponent, in magnitude, that a decimal may carry: a 64-bit float never prints one
/// beyond ±324, and past ±40 a value is 0 or beyond 64 bits whatever its digits. A larger one
/// is refused rather than worked through (`0e2147483647` once took seconds a field).
pub const MAX_DECIMAL_EXPONENT: u32 = 400;

/// Why a text is not a decimal that [`decimal`] can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecimalError {
    /// Not digits with an optional fraction and exponent (a sign on the number included).
    NotANumber,
    /// An exponent beyond ±[`MAX_DECIMAL_EXPONENT`].
    ExponentTooLarge,
    /// The value does not fit in 64 bits.
    TooLarge,
}

impl std::fmt::Display for DecimalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecimalError::NotANumber => "is not a non-negative decimal number",
            DecimalError::ExponentTooLarge => {
                "has an exponent beyond ±400 (gpumem's limit, MAX_DECIMAL_EXPONENT)"
            }
            DecimalError::TooLarge => "does not fit in 64 bits",
        })
    }
}

/// `text` (digits, an optional fraction, an optional exponent; no sign) times `10^scale`,
/// truncated. None when it is not such a number or does not fit in 64 bits ([`decimal`] says
/// which).
pub fn parse_decimal(text: &str, scale: u32) -> Option<u64> {
    decimal(text, scale).ok()
}

/// [`parse_decimal`] with the reason of a refusal. Time is linear in the text's length,
/// whatever its exponent: an exponent beyond ±[`MAX_DECIMAL_EXPONENT`] is refused as read,
/// and at most 20 digits are ever multiplied out.
pub fn decimal(text: &str, scale: u32) -> Result<u64, DecimalError> {
    let (mantissa, exponent) = text.split_once(['e', 'E']).unwrap_or((text, "0"));
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !is_digits(whole) || !is_digits(frac) {
        return Err(DecimalError::NotANumber);
    }
    let exponent = decimal_exponent(exponent)?;
    // value = significant digits * 10^shift
    let significant: Vec<u8> = whole
        .bytes()
        .chain(frac.bytes())
        .skip_while(|&b| b == b'0')
        .collect();
    if significant.is_empty() {
        return Ok(0);
    }
    let shift = exponent + scale as i64 - frac.len() as i64;
    // Digits left of the point once shifted; the rest are truncated away.
    let kept = (significant.len() as i64).saturating_add(shift.min(0));
    if kept <= 0 {
        return Ok(0);
    }
    // The first significant digit is not 0: 21 digits or more are at least 10^20 > 2^64.
    if kept + shift.max(0) > 20 {
        return Err(DecimalError::TooLarge);
    }
    let mut v: u128 = 0;
    for &b in &significant[..kept as usize] {
        v = v * 10 + (b - b'0') as u128;
    }
    v *= 10u128.pow(shift.max(0) as u32);
    u64::try_from(v).map_err(|_| DecimalError::TooLarge)
}

/// An exponent's text (`+`/`-` and digits), refused beyond ±[`MAX_DECIMAL_EXPONENT`] without
/// reading more than its length.
fn decimal_exponent(text: &str) -> Result<i64, DecimalError> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecimalError::NotANumber);
    }
    let digits = digits.trim_start_matches('0');
    // Four digits already exceed the limit; parsing more could overflow.
    let magnitude: u32 = if digits.len() > 4 {
        u32::MAX
    } else {
        digits.parse().unwrap_or(0)
    };
    if magnitude > MAX_DECIMAL_EXPONENT {
        return Err(DecimalError::ExponentTooLarge);
    }
    Ok(if negative {
        -(magnitude as i64)
    } else {
        magnitude as i64
    })
}

/// Nanoseconds since 1970-01-01 of `YYYY-MM-DD[ T]HH:MM:SS[.fraction][Z|±HH:MM]`.
pub fn parse_datetime_ns(text: &str) -> Option<i128> {
    let t = text.trim().as_bytes();
    let num = |s: &[u8]| -> Option<i64> {
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    if t.len() < 19 || t[4] != b'-' || t[7] != b'-' || !matches!(t[10], b' ' | b'T') {
        return None;
    }
    if t[13] != b':' || t[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(&t[0..4])?, num(&t[5..7])?, num(&t[8..10])?);
    let (h, mi, s) = (num(&t[11..13])?, num(&t[14..16])?, num(&t[17..19])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut rest = &t[19..];
    let mut frac_ns: i128 = 0;
    if let Some(r) = rest.strip_prefix(b".") {
        let n = r.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for (i, &b) in r[..n].iter().enumerate().take(9) {
            frac_ns += (b - b'0') as i128 * 10i128.pow(8 - i as u32);
        }
        rest = &r[n..];
    }
    let offset_s: i64 = match rest {
        b"" | b"Z" => 0,
        [sign @ (b'+' | b'-'), hh @ ..] => {
            let hh: Vec<u8> = hh.iter().copied().filter(|&b| b != b':').collect();
            if hh.len() != 4 {
                return None;
            }
            let v = num(&hh[0..2])? * 3600 + num(&hh[2..4])? * 60;
            if *sign == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset_s;
    Some(secs as i128 * 1_000_000_000 + frac_ns)
}

/// A JSON value as a message shows it: a scalar echoed ([`echo`]: escaped and cut), a list
/// or an object by its kind (it may be megabytes long).
pub(super) fn shown(v: &Value) -> String {
    match v {
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        Value::String(s) => format!("\"{}\"", echo(s)),
        v => echo(&v.to_string()),
    }
}

/// A JSON length field: a non-negative integer up to [`MAX_PROMPT_TOKENS`].
fn json_len(r: &Map<String, Value>, key: &str) -> Result<u64, String> {
    match r.get(key) {
        None => Err(format!("missing '{key}'")),
        Some(v) if v.is_u64() => {
            let n = v.as_u64().unwrap_or(0);
            if n > MAX_PROMPT_TOKENS {
                Err(format!(
                    "'{key}' {n} exceeds gpumem's limit of {MAX_PROMPT_TOKENS}"
                ))
            } else {
                Ok(n)
            }
        }
        Some(v) if v.is_i64() => Err(format!("'{key}' is negative ({v})")),
        Some(v) => Err(format!(
            "'{key}' must be a non-negative integer, got {}",
            shown(v)
        )),
    }
}

/// A non-negative JSON number (integer or decimal) times `10^scale`, truncated: `scale` 3
/// turns milliseconds into microseconds, 6 seconds into microseconds.
fn json_time(r: &Map<String, Value>, key: &str, scale: u32) -> Result<u64, String> {
    let v = r.get(key).ok_or_else(|| format!("missing '{key}'"))?;
    let Value::Number(n) = v else {
        return Err(format!("'{key}' must be a number, got {}", shown(v)));
    };
    number_time(n, key, scale)
}

/// [`json_time`] of a number already read.
fn number_time(n: &serde_json::Number, key: &str, scale: u32) -> Result<u64, String> {
    let text = n.to_string();
    if text.starts_with('-') {
        return Err(format!("'{key}' is negative ({})", echo(&text)));
    }
    decimal(&text, scale).map_err(|e| format!("'{key}' {} {e}", echo(&text)))
}

/// The optional `"model"` of a JSON Lines request: a string (see [`model_name`]).
pub(super) fn json_model(r: &Map<String, Value>) -> Result<Option<String>, String> {
    match r.get("model") {
        None => Ok(None),
        Some(Value::String(s)) => model_name("'model'", s).map(Some),
        Some(v) => Err(format!(
            "'model' must be a string (a model's name), got {}",
            shown(v)
        )),
    }
}

fn json_hash_ids(r: &Map<String, Value>) -> Result<Vec<i64>, String> {
    let Some(Value::Array(items)) = r.get("hash_ids") else {
        return Err("'hash_ids' must be a list of integers".into());
    };
    items
        .iter()
        .map(|h| {
            h.as_i64()
                .filter(|_| h.is_i64() || h.is_u64())
                .ok_or_else(|| format!("hash id {} is not a 64-bit signed integer", shown(h)))
        })
        .collect()
}

fn json_object(source: &str, line: u64, text: &str) -> Result<Map<String, Value>, TraceError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(TraceError::at_line(
            source,
            line,
            "each line must be a JSON object",
        )),
        Err(e) => Err(TraceError::at_line(
            source,
            line,
            json_reason(&e, "bad JSON"),
        )),
    }
}

/// A request of an imported trace: `max_tokens = max(1, output tokens)`.
fn record(
    line: u64,
    time: u64,
    id: String,
    prompt: Prompt,
    output_tokens: u64,
    model: Option<String>,
) -> Record {
    Record {
        time,
        request: WorkloadRequest {
            priority: 0,
            id,
            arrival_us: 0,
            prompt,
            max_tokens: output_tokens.max(1),
            line,
            model,
        },
    }
}

/// Reads a whole workload in `format` from `input` into memory.
fn read_all(
    input: impl BufRead,
    source: &str,
    format: WorkloadFormat,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    Workload::collect(RequestStream::from_reader(
        input,
        source,
        Some(format),
        limit,
    )?)
}

/// Mooncake JSON Lines (`timestamp` ms, `input_length`, `output_length`, `hash_ids` over
/// 512-token blocks).
pub fn mooncake(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    read_all(input, source, WorkloadFormat::Mooncake, limit)
}

/// Qwen-Bailian JSON Lines (`chat_id`, `parent_chat_id`, `timestamp` s, `input_length`,
/// `output_length`, `hash_ids` over 16-token blocks, `type`, `turn`).
pub fn qwen_bailian(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    read_all(input, source, WorkloadFormat::QwenBailian, limit)
}

/// Azure LLM inference 2023 CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).
pub fn azure(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    read_all(input, source, WorkloadFormat::Azure, limit)
}

/// BurstGPT CSV (`Timestamp` s, `Model`, `Request tokens`, `Response tokens`, `Total tokens`,
/// `Log Type`). Failed requests (zero request or response tokens) are skipped.
pub fn burstgpt(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    read_all(input, source, WorkloadFormat::BurstGpt, limit)
}

/// Mooncake's parser: ids `r<record index>`.
pub(super) struct Mooncake {
    source: String,
    records: u64,
    unknown: UnknownFields,
    /// Read the `model` field (else it is ignored unread).
    models: bool,
}

impl Mooncake {
    pub(super) fn new(source: &str) -> Self {
        Mooncake {
            source: source.to_string(),
            records: 0,
            unknown: UnknownFields::new("Mooncake"),
            models: false,
        }
    }
}

/// Unknown field names warned about by name; any more are counted in one warning at the end.
const NAMED_UNKNOWN_FIELDS: usize = 8;

/// Distinct unknown field names counted beyond the named ones (each kept as a 64-bit
/// fingerprint: a hostile file's names cost no more than this many words).
const COUNTED_UNKNOWN_FIELDS: usize = 1 << 16;

/// The unknown fields of a JSON Lines trace: a warning for each of the first
/// [`NAMED_UNKNOWN_FIELDS`] names (echoed: escaped and cut), then one that counts the rest,
/// so that 200,000 stray keys make nine warnings, not 200,000.
pub(super) struct UnknownFields {
    /// The format, as warnings name it.
    what: &'static str,
    named: Vec<String>,
    others: std::collections::HashSet<u64>,
}

impl UnknownFields {
    pub(super) fn new(what: &'static str) -> Self {
        UnknownFields {
            what,
            named: Vec::new(),
            others: Default::default(),
        }
    }

    /// Warns about (or counts) each key of `r` that is not in `known`.
    pub(super) fn check(
        &mut self,
        r: &Map<String, Value>,
        known: &[&str],
        warnings: &mut Vec<String>,
    ) {
        for k in r.keys() {
            if known.contains(&k.as_str()) || self.named.contains(k) {
                continue;
            }
            if self.named.len() < NAMED_UNKNOWN_FIELDS {
                warnings.push(format!(
                    "ignoring unknown {} field \"{}\"",
                    self.what,
                    echo(k)
                ));
                self.named.push(k.clone());
            } else if self.others.len() < COUNTED_UNKNOWN_FIELDS {
                self.others.insert(fingerprint64(k));
            }
        }
    }

    /// The count of the unnamed ones, once the trace is read.
    pub(super) fn finish(&mut self, warnings: &mut Vec<String>) {
        let n = std::mem::take(&mut self.others).len();
        let what = self.what;
        if n >= COUNTED_UNKNOWN_FIELDS {
            warnings.push(format!(
                "ignoring {n} or more other unknown {what} fields (not listed)"
            ));
        } else if n > 0 {
            warnings.push(format!(
                "ignoring {n} more unknown {what} fields (not listed)"
            ));
        }
    }
}

/// FNV-1a, 64 bits: tells field names apart for counting.
fn fingerprint64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A Mooncake line as most are: every field known and well typed, no model read. Any other
/// line fails to deserialize into it and takes the general path, which names what is wrong.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainMooncakeLine {
    timestamp: serde_json::Number,
    input_length: u64,
    output_length: u64,
    hash_ids: Vec<i64>,
    #[serde(rename = "session_id")]
    _session_id: Option<serde::de::IgnoredAny>,
    #[serde(rename = "delay")]
    _delay: Option<serde::de::IgnoredAny>,
    #[serde(rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
}

impl Mooncake {
    /// The record of a line that [`PlainMooncakeLine`] reads and every check passes, straight
    /// from the text (building a JSON tree first cost 5% of a whole-trace run); `None`
    /// for any other line, which the general path then reads, refuses or warns about exactly
    /// as before.
    pub(super) fn parse_plain(&mut self, n: u64, text: &str) -> Option<Record> {
        let line: PlainMooncakeLine = serde_json::from_str(text).ok()?;
        let t_us = number_time(&line.timestamp, "timestamp", 3).ok()?;
        let fits = |len: u64| len <= MAX_PROMPT_TOKENS;
        if !fits(line.input_length) || !fits(line.output_length) {
            return None;
        }
        let prompt = mooncake_prompt(line.input_length, line.hash_ids).ok()?;
        self.next_record(n, t_us, prompt, line.output_length, None)
            .ok()
    }
}

impl LineParser for Mooncake {
    fn parse(
        &mut self,
        n: u64,
        text: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Record>, TraceError> {
        if !self.models {
            if let Some(record) = self.parse_plain(n, text) {
                return Ok(Some(record));
            }
        }
        self.parse_general(n, text, warnings)
    }

    fn finish(&mut self, warnings: &mut Vec<String>) -> Result<(), TraceError> {
        self.unknown.finish(warnings);
        Ok(())
    }

    fn read_models(&mut self) -> bool {
        self.models = true;
        true
    }

    fn timing(&self) -> Timing {
        Timing {
            reorder: true,
            rebase: false,
            per_us: 1,
        }
    }
}

impl Mooncake {
    /// Any line: through a JSON tree, each field checked by name.
    pub(super) fn parse_general(
        &mut self,
        n: u64,
        text: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Record>, TraceError> {
        const KNOWN: [&str; 7] = [
            "timestamp",
            "input_length",
            "output_length",
            "hash_ids",
            "session_id",
            "delay",
            "model",
        ];
        let r = json_object(&self.source, n, text)?;
        self.unknown.check(&r, &KNOWN, warnings);
        let parsed = (|| {
            let t_us = json_time(&r, "timestamp", 3)?;
            let input_length = json_len(&r, "input_length")?;
            let output = json_len(&r, "output_length")?;
            let prompt = mooncake_prompt(input_length, json_hash_ids(&r)?)?;
            let model = match self.models {
                true => json_model(&r)?,
                false => None,
            };
            Ok::<_, String>((t_us, prompt, output, model))
        })();
        let (t_us, prompt, output, model) =
            parsed.map_err(|m| TraceError::at_line(&self.source, n, m))?;
        self.next_record(n, t_us, prompt, output, model).map(Some)
    }

    /// The record of the next request (ids `r0`, `r1`, … in file order); an empty prompt is
    /// refused.
    fn next_record(
        &mut self,
        n: u64,
        t_us: u64,
        prompt: Prompt,
        output: u64,
        model: Option<String>,
    ) -> Result<Record, TraceError> {
        nonempty(&self.source, n, &prompt)?;
        let id = format!("r{}", self.records);
        self.records += 1;
        Ok(record(n, t_us, id, prompt, output, model))
    }
}

/// A Mooncake prompt: `hash_ids` over [`DEFAULT_HASH_BLOCK`]-token blocks, enough of them for
/// `input_length` tokens.
fn mooncake_prompt(input_length: u64, hash_ids: Vec<i64>) -> Result<Prompt, String> {
    let need = input_length.div_ceil(DEFAULT_HASH_BLOCK);
    if (hash_ids.len() as u64) < need {
        return Err(format!(
            "input_length {input_length} needs {need} hash_ids of {DEFAULT_HASH_BLOCK} tokens, got {}",
            hash_ids.len()
        ));
    }
    Ok(Prompt::HashIds {
        hash_ids,
        input_length,
        hash_block: DEFAULT_HASH_BLOCK,
    })
}

fn nonempty(source: &str, line: u64, prompt: &Prompt) -> Result<(), TraceError> {
    if prompt.is_empty() {
        return Err(TraceError::at_line(
            source,
            line,
            "empty prompt (vLLM rejects it)",
        ));
    }
    Ok(())
}

/// Qwen-Bailian's parser: ids from `chat_id`, seconds rebased to the first request.
pub(super) struct QwenBailian {
    source: String,
}

impl QwenBailian {
    pub(super) fn new(source: &str) -> Self {
        QwenBailian {
            source: source.to_string(),
        }
    }
}

impl LineParser for QwenBailian {
    fn parse(
        &mut self,
        n: u64,
        text: &str,
        _warnings: &mut Vec<String>,
    ) -> Result<Option<Record>, TraceError> {
        let r = json_object(&self.source, n, text)?;
        let parsed = (|| {
            let id = match r.get("chat_id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(v @ Value::Number(_)) if v.is_i64() || v.is_u64() => v.to_string(),
                Some(v) => {
                    return Err(format!(
                        "'chat_id' must be an integer or a string, got {}",
                        shown(v)
                    ))
                }
                None => return Err("missing 'chat_id'".to_string()),
            };
            match r.get("parent_chat_id") {
                None | Some(Value::String(_)) => {}
                Some(v) if v.is_i64() || v.is_u64() => {}
                Some(v) => {
                    return Err(format!(
                        "'parent_chat_id' must be an integer or a string, got {}",
                        shown(v)
                    ))
                }
            }
            let t_us = json_time(&r, "timestamp", 6)?;
            let input_length = json_len(&r, "input_length")?;
            let output = json_len(&r, "output_length")?;
            let hash_ids = json_hash_ids(&r)?;
            let need = input_length.div_ceil(QWEN_HASH_BLOCK);
            if (hash_ids.len() as u64) < need {
                return Err(format!(
                    "input_length {input_length} needs {need} hash_ids of {QWEN_HASH_BLOCK} tokens, got {}",
                    hash_ids.len()
                ));
            }
            Ok((id, t_us, input_length, output, hash_ids))
        })();
        let (id, t_us, input_length, output, hash_ids) =
            parsed.map_err(|m| TraceError::at_line(&self.source, n, m))?;
        let prompt = Prompt::HashIds {
            hash_ids,
            input_length,
            hash_block: QWEN_HASH_BLOCK,
        };
        nonempty(&self.source, n, &prompt)?;
        Ok(Some(record(n, t_us, id, prompt, output, None)))
    }

    fn timing(&self) -> Timing {
        Timing {
            reorder: true,
            rebase: true,
            per_us: 1,
        }
    }
}

/// Most fields a CSV record may have (the traces have 3 and 6): bounds what one line of commas
/// can make the reader hold.
pub const MAX_CSV_FIELDS: usize = 64;

/// The fields of one CSV line, by the `csv` crate's rules (quotes, `""` escapes), trimmed.
///
/// A record is one line: the line reader hands the lines out, so its limits apply, and a
/// quoted field that runs past the end of its line (a line break inside quotes, which the
/// traces never have) is refused there rather than read on: every error then names the line
/// the record is on.
pub(super) fn csv_fields(text: &str, record: &mut csv::StringRecord) -> Result<(), String> {
    // A closed quoted field has an even number of quotes ("" escapes one): an odd count
    // leaves one open at the end of the line.
    if text.bytes().filter(|&b| b == b'"').count() % 2 == 1 {
        return Err(
            "a quoted field is not closed on its line (gpumem reads one CSV record a line)".into(),
        );
    }
    // Commas bound the fields from above (a quoted comma counts too): checked before the
    // record is built.
    if text.bytes().filter(|&b| b == b',').count() >= MAX_CSV_FIELDS {
        return Err(format!(
            "more than {MAX_CSV_FIELDS} fields in a record (gpumem's limit, MAX_CSV_FIELDS)"
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    match reader.read_record(record) {
        Ok(true) => Ok(()),
        Ok(false) => {
            record.clear();
            Ok(())
        }
        Err(e) => Err(format!("not a CSV record: {}", echo(&e.to_string()))),
    }
}

/// A CSV file's header (first non-blank line): the column of each name in `wanted`.
struct Csv {
    columns: Vec<usize>,
    width: usize,
}

impl Csv {
    fn new(
        source: &str,
        line: u64,
        header: &str,
        wanted: &[&str],
        record: &mut csv::StringRecord,
    ) -> Result<Self, TraceError> {
        csv_fields(header, record).map_err(|m| TraceError::at_line(source, line, m))?;
        let mut columns = Vec::new();
        for w in wanted {
            match record.iter().position(|n| n == *w) {
                Some(i) => columns.push(i),
                None => {
                    return Err(TraceError::at_line(
                        source,
                        line,
                        format!(
                            "the header lacks the column '{w}' (header: {})",
                            echo(header)
                        ),
                    ))
                }
            }
        }
        Ok(Csv {
            columns,
            width: record.len(),
        })
    }

    /// The wanted fields of a row, trimmed and unquoted.
    fn row<'r>(
        &self,
        source: &str,
        line: u64,
        text: &str,
        record: &'r mut csv::StringRecord,
    ) -> Result<[&'r str; 3], TraceError> {
        csv_fields(text, record).map_err(|m| TraceError::at_line(source, line, m))?;
        if record.len() != self.width {
            return Err(TraceError::at_line(
                source,
                line,
                format!("expected {} fields, got {}", self.width, record.len()),
            ));
        }
        let record: &csv::StringRecord = record;
        Ok(std::array::from_fn(|k| &record[self.columns[k]]))
    }
}

fn csv_count(source: &str, line: u64, name: &str, text: &str) -> Result<u64, TraceError> {
    let err = |m: String| TraceError::at_line(source, line, m);
    if text.starts_with('-') {
        return Err(err(format!("{name} is negative ({})", echo(text))));
    }
    let n: u64 = text.parse().map_err(|_| {
        err(format!(
            "{name} must be a non-negative integer, got \"{}\"",
            echo(text)
        ))
    })?;
    if n > MAX_PROMPT_TOKENS {
        return Err(err(format!(
            "{name} {n} exceeds gpumem's limit of {MAX_PROMPT_TOKENS}"
        )));
    }
    Ok(n)
}

/// What a CSV format makes of a data row's wanted fields: (time, prompt length, output
/// length), or None to skip the row.
type CsvRow =
    fn(&str, u64, &[&str; 3], &mut CsvState) -> Result<Option<(u64, u64, u64)>, TraceError>;

/// Per-file state of a CSV row reader.
#[derive(Default)]
pub(super) struct CsvState {
    /// Azure: the first row's time, minus 2^62 ns.
    first_ns: Option<i128>,
}

/// The CSV formats' parser: a header, then one request per row, every prompt unique
/// ([`Prompt::Unique`]); ids `r<row index>` counting skipped rows.
pub(super) struct CsvTrace {
    source: String,
    wanted: &'static [&'static str; 3],
    row: CsvRow,
    state: CsvState,
    csv: Option<Csv>,
    /// One record's fields, reused line after line.
    record: csv::StringRecord,
    next_id: i64,
    rows: u64,
    skipped: u64,
    timing: Timing,
    /// The column that names each request's model (BurstGPT's `Model`), if the format has one.
    model_column: Option<&'static str>,
    /// Read models ([`LineParser::read_models`]); the model column's index once the header is
    /// read.
    models: bool,
    model_at: Option<usize>,
}

impl CsvTrace {
    /// Azure LLM inference 2023: `TIMESTAMP,ContextTokens,GeneratedTokens`, nanoseconds.
    pub(super) fn azure(source: &str) -> Self {
        Self::new(
            source,
            &["TIMESTAMP", "ContextTokens", "GeneratedTokens"],
            azure_row,
            1000,
        )
    }

    /// The column that names each request's model.
    pub(super) const BURSTGPT_MODEL: &'static str = "Model";

    /// BurstGPT: `Timestamp` s, `Request tokens`, `Response tokens`; failed requests skipped.
    /// With models read, `Model` too.
    pub(super) fn burstgpt(source: &str) -> Self {
        CsvTrace {
            model_column: Some(Self::BURSTGPT_MODEL),
            ..Self::new(
                source,
                &["Timestamp", "Request tokens", "Response tokens"],
                burstgpt_row,
                1,
            )
        }
    }

    fn new(source: &str, wanted: &'static [&'static str; 3], row: CsvRow, per_us: u64) -> Self {
        CsvTrace {
            source: source.to_string(),
            wanted,
            row,
            state: CsvState::default(),
            csv: None,
            record: csv::StringRecord::new(),
            next_id: 0,
            rows: 0,
            skipped: 0,
            timing: Timing {
                reorder: true,
                rebase: true,
                per_us,
            },
            model_column: None,
            models: false,
            model_at: None,
        }
    }
}

impl LineParser for CsvTrace {
    fn parse(
        &mut self,
        n: u64,
        text: &str,
        _warnings: &mut Vec<String>,
    ) -> Result<Option<Record>, TraceError> {
        let Some(c) = &self.csv else {
            self.csv = Some(Csv::new(
                &self.source,
                n,
                text,
                self.wanted,
                &mut self.record,
            )?);
            if let (true, Some(name)) = (self.models, self.model_column) {
                let at = self.record.iter().position(|c| c == name).ok_or_else(|| {
                    TraceError::at_line(
                        &self.source,
                        n,
                        format!(
                            "the header lacks the column '{name}', which names each request's model (header: {})",
                            echo(text)
                        ),
                    )
                })?;
                self.model_at = Some(at);
            }
            return Ok(None);
        };
        let fields = c.row(&self.source, n, text, &mut self.record)?;
        let Some((t, input_length, output)) =
            (self.row)(&self.source, n, &fields, &mut self.state)?
        else {
            self.skipped += 1;
            return Ok(None);
        };
        let model = match self.model_at {
            Some(at) => {
                let what = format!("'{}'", self.model_column.unwrap_or_default());
                let name = self.record.get(at).unwrap_or_default();
                Some(model_name(&what, name).map_err(|m| TraceError::at_line(&self.source, n, m))?)
            }
            None => None,
        };
        let prompt = Prompt::Unique {
            first_hash_id: self.next_id,
            input_length,
        };
        nonempty(&self.source, n, &prompt)?;
        self.next_id += input_length.div_ceil(DEFAULT_HASH_BLOCK) as i64;
        let id = format!("r{}", self.rows + self.skipped);
        self.rows += 1;
        Ok(Some(record(n, t, id, prompt, output, model)))
    }

    fn finish(&mut self, warnings: &mut Vec<String>) -> Result<(), TraceError> {
        if self.csv.is_none() {
            return Err(TraceError::in_file(
                &self.source,
                "the trace holds no request",
            ));
        }
        if self.rows == 0 && self.skipped > 0 {
            return Err(TraceError::in_file(
                &self.source,
                format!(
                    "the trace holds no request: its {} rows are all failed requests (zero request or response tokens)",
                    self.skipped
                ),
            ));
        }
        if self.skipped > 0 {
            warnings.push(format!(
                "skipped {} failed requests (zero request or response tokens)",
                self.skipped
            ));
        }
        Ok(())
    }

    fn timing(&self) -> Timing {
        self.timing
    }

    fn read_models(&mut self) -> bool {
        self.models = self.model_column.is_some();
        self.models
    }
}

/// Azure: nanoseconds since 1970 do not fit u64 times relative to 0 for dates before 1970;
/// times are kept relative to 2^62 ns before the first row instead, and rebased to the
/// earliest row by the stream.
fn azure_row(
    source: &str,
    n: u64,
    f: &[&str; 3],
    state: &mut CsvState,
) -> Result<Option<(u64, u64, u64)>, TraceError> {
    let t = parse_datetime_ns(f[0]).ok_or_else(|| {
        TraceError::at_line(
            source,
            n,
            format!(
                "TIMESTAMP \"{}\" is not a date and time like 2023-11-16 18:17:03.9799600",
                echo(f[0])
            ),
        )
    })?;
    let t0 = *state.first_ns.get_or_insert(t - (1i128 << 62));
    let rel = u64::try_from(t - t0).map_err(|_| {
        TraceError::at_line(
            source,
            n,
            format!("TIMESTAMP \"{}\" is out of range", echo(f[0])),
        )
    })?;
    Ok(Some((
        rel,
        csv_count(source, n, "ContextTokens", f[1])?,
        csv_count(source, n, "GeneratedTokens", f[2])?,
    )))
}

fn burstgpt_row(
    source: &str,
    n: u64,
    f: &[&str; 3],
    _state: &mut CsvState,
) -> Result<Option<(u64, u64, u64)>, TraceError> {
    let t = decimal(f[0], 6).map_err(|e| {
        let why = match e {
            DecimalError::NotANumber => "must be a non-negative number of seconds".to_string(),
            e => e.to_string(),
        };
        TraceError::at_line(source, n, format!("Timestamp \"{}\" {why}", echo(f[0])))
    })?;
    let input = csv_count(source, n, "Request tokens", f[1])?;
    let output = csv_count(source, n, "Response tokens", f[2])?;
    Ok((input > 0 && output > 0).then_some((t, input, output)))
}
