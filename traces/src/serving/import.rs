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
//! Requests are put in arrival order (stable: ties keep file order). Numbers are read without
//! floats deciding anything: a decimal `timestamp` is parsed digit by digit. Errors name the
//! file and line; lengths above [`MAX_PROMPT_TOKENS`] and more than [`MAX_REQUESTS`] requests
//! are refused.

use std::io::BufRead;

use serde_json::{Map, Value};

use super::{
    Prompt, Workload, WorkloadRequest, DEFAULT_HASH_BLOCK, MAX_ARRIVAL_US, MAX_PROMPT_TOKENS,
};
use crate::error::TraceError;

/// Most requests one workload may hold (bounds what a hostile file can make gpumem allocate).
pub const MAX_REQUESTS: u64 = 1 << 26;
/// Qwen-Bailian's hash block.
pub const QWEN_HASH_BLOCK: u64 = 16;

/// `text` (digits, an optional fraction, an optional exponent; no sign) times `10^scale`,
/// truncated. None when it is not such a number or does not fit in 64 bits.
pub fn parse_decimal(text: &str, scale: u32) -> Option<u64> {
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.strip_prefix('+').unwrap_or(e).parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // value = digits * 10^(shift)
    let digits = format!("{whole}{frac}");
    let digits = digits.trim_start_matches('0');
    let shift = exp as i64 + scale as i64 - frac.len() as i64;
    let mut v: u128 = 0;
    let keep = if shift < 0 {
        digits.len().saturating_sub((-shift) as usize)
    } else {
        digits.len()
    };
    for b in digits[..keep].bytes() {
        v = v.checked_mul(10)?.checked_add((b - b'0') as u128)?;
        if v > u64::MAX as u128 {
            return None;
        }
    }
    for _ in 0..shift.max(0) {
        v = v.checked_mul(10)?;
        if v > u64::MAX as u128 {
            return None;
        }
    }
    u64::try_from(v).ok()
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
        Some(v) => Err(format!("'{key}' must be a non-negative integer, got {v}")),
    }
}

/// A non-negative JSON number (integer or decimal) times `10^scale`, truncated: `scale` 3
/// turns milliseconds into microseconds, 6 seconds into microseconds.
fn json_time(r: &Map<String, Value>, key: &str, scale: u32) -> Result<u64, String> {
    let v = r.get(key).ok_or_else(|| format!("missing '{key}'"))?;
    let Value::Number(n) = v else {
        return Err(format!("'{key}' must be a number, got {v}"));
    };
    let text = n.to_string();
    if text.starts_with('-') {
        return Err(format!("'{key}' is negative ({text})"));
    }
    parse_decimal(&text, scale).ok_or_else(|| format!("'{key}' {text} is out of range"))
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
                .ok_or_else(|| format!("hash id {h} is not a 64-bit signed integer"))
        })
        .collect()
}

/// Builds requests record by record, then sorts them by arrival.
struct Builder<'a> {
    source: &'a str,
    w: Workload,
    limit: Option<u64>,
    /// (arrival in the source's unit, request) — rebased and converted at the end.
    records: Vec<(u64, WorkloadRequest)>,
}

impl<'a> Builder<'a> {
    fn new(source: &'a str, limit: Option<u64>) -> Self {
        Builder {
            source,
            w: Workload {
                source: source.to_string(),
                ..Workload::default()
            },
            limit,
            records: Vec::new(),
        }
    }

    fn full(&self) -> bool {
        self.limit.is_some_and(|n| self.records.len() as u64 >= n)
    }

    fn err(&self, line: u64, reason: impl Into<String>) -> TraceError {
        TraceError::at_line(self.source, line, reason)
    }

    fn push(
        &mut self,
        line: u64,
        time: u64,
        id: String,
        prompt: Prompt,
        output_tokens: u64,
    ) -> Result<(), TraceError> {
        if prompt.is_empty() {
            return Err(self.err(line, "empty prompt (vLLM rejects it)"));
        }
        if self.records.len() as u64 >= MAX_REQUESTS {
            return Err(self.err(
                line,
                format!("more than gpumem's limit of {MAX_REQUESTS} requests"),
            ));
        }
        self.records.push((
            time,
            WorkloadRequest {
                priority: 0,
                id,
                arrival_us: 0,
                prompt,
                max_tokens: output_tokens.max(1),
                line,
            },
        ));
        Ok(())
    }

    /// Arrival in µs = (time − first time if `rebase`) / `per_us`, in arrival order.
    fn finish(mut self, rebase: bool, per_us: u64) -> Result<Workload, TraceError> {
        let t0 = if rebase {
            self.records.iter().map(|r| r.0).min().unwrap_or(0)
        } else {
            0
        };
        self.records.sort_by_key(|r| r.0);
        for (t, mut r) in self.records {
            r.arrival_us = (t - t0) / per_us;
            if r.arrival_us > MAX_ARRIVAL_US {
                return Err(TraceError::at_line(
                    self.source,
                    r.line,
                    format!(
                        "arrival {} us exceeds gpumem's limit of {MAX_ARRIVAL_US}",
                        r.arrival_us
                    ),
                ));
            }
            self.w.requests.push(r);
        }
        Ok(self.w)
    }
}

/// Non-blank lines of `input` with their 1-based numbers, `\r` stripped; I/O errors name the line.
fn lines<'s>(
    input: impl BufRead + 's,
    source: &'s str,
) -> impl Iterator<Item = Result<(u64, String), TraceError>> + 's {
    input.lines().enumerate().filter_map(move |(i, l)| {
        let n = i as u64 + 1;
        match l {
            Err(e) => Some(Err(TraceError::at_line(source, n, e.to_string()))),
            Ok(s) if s.trim().is_empty() => None,
            Ok(s) => Some(Ok((n, s.trim_end_matches('\r').to_string()))),
        }
    })
}

fn json_object(source: &str, line: u64, text: &str) -> Result<Map<String, Value>, TraceError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(TraceError::at_line(
            source,
            line,
            "each line must be a JSON object",
        )),
        Err(e) => Err(TraceError::at_line(source, line, format!("bad JSON: {e}"))),
    }
}

/// Mooncake JSON Lines (`timestamp` ms, `input_length`, `output_length`, `hash_ids` over
/// 512-token blocks).
pub fn mooncake(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    const KNOWN: [&str; 6] = [
        "timestamp",
        "input_length",
        "output_length",
        "hash_ids",
        "session_id",
        "delay",
    ];
    let mut b = Builder::new(source, limit);
    let mut warned = std::collections::BTreeSet::new();
    for item in lines(input, source) {
        if b.full() {
            break;
        }
        let (n, text) = item?;
        let r = json_object(source, n, &text)?;
        for k in r.keys() {
            if !KNOWN.contains(&k.as_str()) && warned.insert(k.clone()) {
                b.w.warnings
                    .push(format!("ignoring unknown Mooncake field {k:?}"));
            }
        }
        let parsed = (|| {
            let t_us = json_time(&r, "timestamp", 3)?;
            let input_length = json_len(&r, "input_length")?;
            let output = json_len(&r, "output_length")?;
            let hash_ids = json_hash_ids(&r)?;
            let need = input_length.div_ceil(DEFAULT_HASH_BLOCK);
            if (hash_ids.len() as u64) < need {
                return Err(format!(
                    "input_length {input_length} needs {need} hash_ids of {DEFAULT_HASH_BLOCK} tokens, got {}",
                    hash_ids.len()
                ));
            }
            Ok((t_us, input_length, output, hash_ids))
        })();
        let (t_us, input_length, output, hash_ids) = parsed.map_err(|m| b.err(n, m))?;
        let id = format!("r{}", b.records.len());
        let prompt = Prompt::HashIds {
            hash_ids,
            input_length,
            hash_block: DEFAULT_HASH_BLOCK,
        };
        b.push(n, t_us, id, prompt, output)?;
    }
    b.finish(false, 1)
}

/// Qwen-Bailian JSON Lines (`chat_id`, `parent_chat_id`, `timestamp` s, `input_length`,
/// `output_length`, `hash_ids` over 16-token blocks, `type`, `turn`).
pub fn qwen_bailian(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    let mut b = Builder::new(source, limit);
    for item in lines(input, source) {
        if b.full() {
            break;
        }
        let (n, text) = item?;
        let r = json_object(source, n, &text)?;
        let parsed = (|| {
            let id = match r.get("chat_id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(v @ Value::Number(_)) if v.is_i64() || v.is_u64() => v.to_string(),
                Some(v) => {
                    return Err(format!("'chat_id' must be an integer or a string, got {v}"))
                }
                None => return Err("missing 'chat_id'".to_string()),
            };
            match r.get("parent_chat_id") {
                None | Some(Value::String(_)) => {}
                Some(v) if v.is_i64() || v.is_u64() => {}
                Some(v) => {
                    return Err(format!(
                        "'parent_chat_id' must be an integer or a string, got {v}"
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
        let (id, t_us, input_length, output, hash_ids) = parsed.map_err(|m| b.err(n, m))?;
        let prompt = Prompt::HashIds {
            hash_ids,
            input_length,
            hash_block: QWEN_HASH_BLOCK,
        };
        b.push(n, t_us, id, prompt, output)?;
    }
    b.finish(true, 1)
}

/// A CSV file's header (first non-blank line): the column of each name in `wanted`.
struct Csv<'s> {
    source: &'s str,
    columns: Vec<usize>,
    width: usize,
}

impl<'s> Csv<'s> {
    fn new(source: &'s str, line: u64, header: &str, wanted: &[&str]) -> Result<Self, TraceError> {
        let names: Vec<&str> = header
            .split(',')
            .map(|c| c.trim().trim_matches('"'))
            .collect();
        let mut columns = Vec::new();
        for w in wanted {
            match names.iter().position(|n| n == w) {
                Some(i) => columns.push(i),
                None => {
                    return Err(TraceError::at_line(
                        source,
                        line,
                        format!("the header lacks the column '{w}' (header: {header})"),
                    ))
                }
            }
        }
        Ok(Csv {
            source,
            columns,
            width: names.len(),
        })
    }

    /// The wanted fields of a row, trimmed and unquoted.
    fn row<'l>(&self, line: u64, text: &'l str) -> Result<Vec<&'l str>, TraceError> {
        let fields: Vec<&str> = text
            .split(',')
            .map(|c| c.trim().trim_matches('"'))
            .collect();
        if fields.len() != self.width {
            return Err(TraceError::at_line(
                self.source,
                line,
                format!("expected {} fields, got {}", self.width, fields.len()),
            ));
        }
        Ok(self.columns.iter().map(|&i| fields[i]).collect())
    }

    fn count(&self, line: u64, name: &str, text: &str) -> Result<u64, TraceError> {
        let err = |m: String| TraceError::at_line(self.source, line, m);
        if text.starts_with('-') {
            return Err(err(format!("{name} is negative ({text})")));
        }
        let n: u64 = text.parse().map_err(|_| {
            err(format!(
                "{name} must be a non-negative integer, got {text:?}"
            ))
        })?;
        if n > MAX_PROMPT_TOKENS {
            return Err(err(format!(
                "{name} {n} exceeds gpumem's limit of {MAX_PROMPT_TOKENS}"
            )));
        }
        Ok(n)
    }
}

/// Reads a CSV workload: `row` turns the wanted fields of each data row into (time, prompt
/// length, output length), or None to skip the row.
fn read_csv<'s>(
    input: impl BufRead + 's,
    source: &'s str,
    limit: Option<u64>,
    wanted: &[&str],
    mut row: impl FnMut(&Csv<'_>, u64, &[&str]) -> Result<Option<(u64, u64, u64)>, TraceError>,
) -> Result<(Builder<'s>, u64), TraceError> {
    let mut b = Builder::new(source, limit);
    let mut csv: Option<Csv<'_>> = None;
    let mut next_id: i64 = 0;
    let mut skipped = 0u64;
    for item in lines(input, source) {
        if b.full() {
            break;
        }
        let (n, text) = item?;
        let Some(c) = &csv else {
            csv = Some(Csv::new(source, n, &text, wanted)?);
            continue;
        };
        let fields = c.row(n, &text)?;
        let Some((t, input_length, output)) = row(c, n, &fields)? else {
            skipped += 1;
            continue;
        };
        let prompt = Prompt::Unique {
            first_hash_id: next_id,
            input_length,
        };
        next_id += input_length.div_ceil(DEFAULT_HASH_BLOCK) as i64;
        let id = format!("r{}", b.records.len() as u64 + skipped);
        b.push(n, t, id, prompt, output)?;
    }
    if csv.is_none() {
        return Err(TraceError::in_file(
            source,
            "the file is empty (no CSV header)",
        ));
    }
    Ok((b, skipped))
}

/// Azure LLM inference 2023 CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).
pub fn azure(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    let wanted = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];
    // Nanoseconds since 1970 do not fit the builder's u64 times relative to 0 for dates before
    // 1970; times are kept relative to 2^62 ns before the first row instead, and rebased to the
    // earliest row at the end.
    let mut first: Option<i128> = None;
    let (b, _) = read_csv(input, source, limit, &wanted, |c, n, f| {
        let t = parse_datetime_ns(f[0]).ok_or_else(|| {
            TraceError::at_line(
                source,
                n,
                format!(
                    "TIMESTAMP {:?} is not a date and time like 2023-11-16 18:17:03.9799600",
                    f[0]
                ),
            )
        })?;
        let t0 = *first.get_or_insert(t - (1i128 << 62));
        let rel = u64::try_from(t - t0).map_err(|_| {
            TraceError::at_line(source, n, format!("TIMESTAMP {:?} is out of range", f[0]))
        })?;
        Ok(Some((
            rel,
            c.count(n, "ContextTokens", f[1])?,
            c.count(n, "GeneratedTokens", f[2])?,
        )))
    })?;
    b.finish(true, 1000)
}

/// BurstGPT CSV (`Timestamp` s, `Model`, `Request tokens`, `Response tokens`, `Total tokens`,
/// `Log Type`). Failed requests (zero request or response tokens) are skipped.
pub fn burstgpt(
    input: impl BufRead,
    source: &str,
    limit: Option<u64>,
) -> Result<Workload, TraceError> {
    let wanted = ["Timestamp", "Request tokens", "Response tokens"];
    let (mut b, skipped) = read_csv(input, source, limit, &wanted, |c, n, f| {
        let t = if f[0].starts_with('-') {
            None
        } else {
            parse_decimal(f[0], 6)
        };
        let t = t.ok_or_else(|| {
            TraceError::at_line(
                source,
                n,
                format!(
                    "Timestamp {:?} must be a non-negative number of seconds",
                    f[0]
                ),
            )
        })?;
        let input = c.count(n, "Request tokens", f[1])?;
        let output = c.count(n, "Response tokens", f[2])?;
        Ok((input > 0 && output > 0).then_some((t, input, output)))
    })?;
    if skipped > 0 {
        b.w.warnings.push(format!(
            "skipped {skipped} failed requests (zero request or response tokens)"
        ));
    }
    b.finish(true, 1)
}
