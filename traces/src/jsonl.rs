//! gpumem's own allocation trace: JSON Lines, one operation a line.
//!
//! ```text
//! {"t_ns": 1200, "op": "alloc", "id": 7, "bytes": 4096, "stream": 0}
//! {"t_ns": 1900, "op": "free", "id": 7}
//! {"t_ns": 2000, "op": "alloc", "id": 8, "bytes": 512, "pinned": true}
//! {"t_ns": 2500, "op": "empty_cache"}
//! ```
//!
//! - `t_ns` (required, never decreasing) and `op` (`alloc`, `free`, `empty_cache`) on every line;
//!   `alloc` needs `id` and `bytes` and takes `stream` (default 0, at most 2^32 − 1) and
//!   `pinned` (default false); `free` needs `id`. Any other field, or a field the op does not
//!   take, is an error.
//! - Integers are JSON integers (no fraction, no exponent): `t_ns` and `id` within 64 bits,
//!   `bytes` at most 2^50.
//! - An `id` may be allocated again once freed, not while it is live (error). A `free` of an id
//!   that is not live is legal (recording may start late); the consumer counts it.
//! - Blank lines and lines starting with `#` are skipped; a trailing `\r` is ignored; lines and
//!   files are bounded as [`crate::read`] says.
//!
//! Errors name the file and 1-based line: `trace.jsonl:12: bytes 18446744073709551616 exceeds
//! the limit of 2^50`.

use crate::alloc_trace::{AllocOp, AllocTrace, OpKind, TraceSource, MAX_BYTES};
use crate::error::{echo, TraceError};
use crate::read::LineReader;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::path::Path;

/// Reads a JSON Lines allocation trace from a file, a line at a time.
pub fn read(path: &Path) -> Result<AllocTrace, TraceError> {
    let file = std::fs::File::open(path)
        .map_err(|e| TraceError::in_file(path, format!("cannot read the file: {e}")))?;
    parse_reader(path, io::BufReader::new(file))
}

/// Parses trace text; `name` names the trace and serves as the path in error messages.
pub fn parse_str(name: &str, text: &str) -> Result<AllocTrace, TraceError> {
    let mut t = parse_bytes(Path::new(name), text.as_bytes())?;
    t.name = name.to_owned();
    Ok(t)
}

/// Parses trace bytes; `path` names the trace and its errors.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<AllocTrace, TraceError> {
    parse_reader(path, bytes)
}

/// Parses a trace from any reader (UTF-8 is checked line by line, lines are bounded by
/// [`crate::read`]); `path` names the trace and its errors.
pub fn parse_reader(path: &Path, input: impl BufRead) -> Result<AllocTrace, TraceError> {
    let mut trace = AllocTrace::named_after(path, TraceSource::Jsonl);
    // Live id → line of its alloc (looked up only; never iterated).
    let mut live: HashMap<u64, u64> = HashMap::new();
    let mut last: Option<(u64, u64)> = None; // (t_ns, line)
    let mut lines = LineReader::new(input, path);
    while let Some(line) = lines.next_line() {
        let line = line?;
        if line.is_blank_or_comment() {
            continue;
        }
        let number = line.number;
        let (t_ns, kind) = parse_line(line.text.trim()).map_err(|r| line.error(r))?;
        if let Some((prev, prev_line)) = last {
            if t_ns < prev {
                return Err(line.error(format!(
                    "t_ns {t_ns} is earlier than t_ns {prev} on line {prev_line}"
                )));
            }
        }
        last = Some((t_ns, number));
        match kind {
            OpKind::Alloc { id, .. } => {
                if let Some(at) = live.insert(id, number) {
                    return Err(line.error(format!(
                        "id {id} is allocated again while live (allocated on line {at})"
                    )));
                }
            }
            OpKind::Free { id } => {
                live.remove(&id);
            }
            OpKind::EmptyCache => {}
        }
        trace.ops.push(AllocOp {
            t_ns,
            line: number,
            kind,
        });
    }
    Ok(trace)
}

/// Writes `trace`'s ops, one a line, in the form [`parse_str`] reads back to the same ops
/// (`t_ns` and `kind`; `line` becomes the op's 1-based index). A trace whose `t_ns` decreases,
/// or that allocates a live id again, is written but will not read back.
pub fn write(trace: &AllocTrace, w: impl Write) -> io::Result<()> {
    let mut w = io::BufWriter::new(w);
    for op in &trace.ops {
        let t = op.t_ns;
        match op.kind {
            OpKind::Alloc {
                id,
                bytes,
                stream,
                pinned,
            } => {
                write!(
                    w,
                    r#"{{"t_ns": {t}, "op": "alloc", "id": {id}, "bytes": {bytes}, "stream": {stream}"#
                )?;
                if pinned {
                    w.write_all(br#", "pinned": true"#)?;
                }
                w.write_all(b"}\n")?;
            }
            OpKind::Free { id } => writeln!(w, r#"{{"t_ns": {t}, "op": "free", "id": {id}}}"#)?,
            OpKind::EmptyCache => writeln!(w, r#"{{"t_ns": {t}, "op": "empty_cache"}}"#)?,
        }
    }
    w.flush()
}

const FIELDS: [&str; 6] = ["t_ns", "op", "id", "bytes", "stream", "pinned"];

/// One non-blank line → (t_ns, op).
fn parse_line(text: &str) -> Result<(u64, OpKind), String> {
    // Syntax check without building a value.
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| crate::error::json_reason(&e, "malformed JSON"))?;
    if !text.starts_with('{') {
        return Err(format!("expected a JSON object, found {}", json_type(text)));
    }
    let raw = raw_fields(text).ok_or_else(|| "malformed JSON object".to_owned())?;
    // Raw value text per known field, in FIELDS order.
    let mut vals: [Option<&str>; 6] = [None; 6];
    for (key, value) in raw {
        let Some(k) = FIELDS.iter().position(|f| *f == key) else {
            return Err(format!("unknown field '{}'", echo(&key)));
        };
        if vals[k].is_some() {
            return Err(format!("duplicate field '{}'", echo(&key)));
        }
        vals[k] = Some(value);
    }
    let [t_ns, op, id, bytes, stream, pinned] = vals;
    let op = match op {
        Some(raw) => json_string(raw)
            .ok_or_else(|| format!("op must be a string, found {}", json_type(raw)))?,
        None => return Err("missing field 'op'".to_owned()),
    };
    let allowed: &[&str] = match &*op {
        "alloc" => &["t_ns", "op", "id", "bytes", "stream", "pinned"],
        "free" => &["t_ns", "op", "id"],
        "empty_cache" => &["t_ns", "op"],
        other => {
            return Err(format!(
                "unknown op '{}' (expected alloc, free or empty_cache)",
                echo(other)
            ))
        }
    };
    for (k, f) in FIELDS.iter().enumerate() {
        if vals[k].is_some() && !allowed.contains(f) {
            return Err(format!("field '{f}' does not apply to op '{op}'"));
        }
    }
    let need = |v: Option<&str>, name: &str| -> Result<u64, String> {
        let raw = v.ok_or_else(|| format!("missing field '{name}'"))?;
        uint(raw, name)
    };
    let t_ns = need(t_ns, "t_ns")?;
    let kind = match &*op {
        "alloc" => {
            let id = need(id, "id")?;
            let bytes = need(bytes, "bytes")
                .map_err(|e| e.replace("does not fit in 64 bits", "exceeds the limit of 2^50"))?;
            if bytes > MAX_BYTES {
                return Err(format!(
                    "bytes {} exceeds the limit of 2^50",
                    vals[3].unwrap_or_default()
                ));
            }
            let stream = match stream {
                Some(raw) => {
                    let s = uint(raw, "stream")?;
                    u32::try_from(s)
                        .map_err(|_| format!("stream {} does not fit in 32 bits", echo(raw)))?
                }
                None => 0,
            };
            let pinned = match pinned {
                None | Some("false") => false,
                Some("true") => true,
                Some(raw) => {
                    return Err(format!(
                        "pinned must be true or false, found {}",
                        json_type(raw)
                    ))
                }
            };
            OpKind::Alloc {
                id,
                bytes,
                stream,
                pinned,
            }
        }
        "free" => OpKind::Free {
            id: need(id, "id")?,
        },
        _ => OpKind::EmptyCache,
    };
    Ok((t_ns, kind))
}

/// A non-negative JSON integer from its raw text.
fn uint(raw: &str, name: &str) -> Result<u64, String> {
    let first = raw.bytes().next().unwrap_or(b' ');
    if !(first == b'-' || first.is_ascii_digit()) {
        return Err(format!(
            "{name} must be a non-negative integer, found {}",
            json_type(raw)
        ));
    }
    if raw.contains(['.', 'e', 'E']) {
        return Err(format!("{name} {} is not an integer", echo(raw)));
    }
    if let Some(digits) = raw.strip_prefix('-') {
        if digits.bytes().all(|c| c == b'0') {
            return Ok(0);
        }
        return Err(format!("{name} {} is negative", echo(raw)));
    }
    raw.parse::<u64>()
        .map_err(|_| format!("{name} {} does not fit in 64 bits", echo(raw)))
}

/// "a string", "a number", ... from a JSON value's first character.
fn json_type(raw: &str) -> &'static str {
    match raw.bytes().next() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a bool",
        Some(b'n') => "null",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        _ => "a number",
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

/// The text of a raw JSON string token (borrowed when it has no escapes).
fn json_string(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// Index after the JSON string starting at `i` (which must be a quote).
fn end_of_string(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    loop {
        match b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Index after the JSON value starting at `i`.
fn end_of_value(b: &[u8], mut i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => end_of_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = end_of_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
            {
                i += 1;
            }
            Some(i)
        }
    }
}

/// The top-level (decoded key, raw value text) pairs of a JSON object already known to be
/// valid, in order (duplicates included).
fn raw_fields(s: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let k_end = end_of_string(b, i)?;
        let key = json_string(s.get(i..k_end)?)?;
        i = skip_ws(b, k_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let v_end = end_of_value(b, i)?;
        out.push((key, s.get(i..v_end)?));
        i = skip_ws(b, v_end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests;
