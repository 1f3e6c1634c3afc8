//! The one error type of the importers: file, location and reason.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a file an error was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a text file.
    Line(u64),
    /// Byte offset in a binary file (a pickle).
    ByteOffset(u64),
    /// 1-based index of an entry in a torch snapshot's device trace.
    Event(u64),
    /// 1-based index of an operation that no file line holds (generated, or synthesised from
    /// a snapshot's state).
    Op(u64),
    /// The file as a whole (cannot be read, a key of the snapshot is missing, ...).
    File,
}

/// An importer's error: never a panic, always the file, where, and why.
///
/// Displays as `path:12: reason` (line), `path: byte 1234: reason`, `path: event 17: reason`,
/// `path: op 9: reason` or `path: reason`: only a line looks like a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    pub path: PathBuf,
    pub location: Location,
    pub reason: String,
}

impl TraceError {
    pub fn new(path: impl AsRef<Path>, location: Location, reason: impl Into<String>) -> Self {
        TraceError {
            path: path.as_ref().to_path_buf(),
            location,
            reason: reason.into(),
        }
    }

    pub fn at_line(path: impl AsRef<Path>, line: u64, reason: impl Into<String>) -> Self {
        Self::new(path, Location::Line(line), reason)
    }

    pub fn at_event(path: impl AsRef<Path>, event: u64, reason: impl Into<String>) -> Self {
        Self::new(path, Location::Event(event), reason)
    }

    pub fn in_file(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Self::new(path, Location::File, reason)
    }

    pub fn from_pickle(path: impl AsRef<Path>, e: crate::pickle::PickleError) -> Self {
        Self::new(path, Location::ByteOffset(e.offset), e.reason)
    }
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        match self.location {
            Location::Line(n) => write!(f, "{p}:{n}: {}", self.reason),
            Location::ByteOffset(n) => write!(f, "{p}: byte {n}: {}", self.reason),
            Location::Event(n) => write!(f, "{p}: event {n}: {}", self.reason),
            Location::Op(n) => write!(f, "{p}: op {n}: {}", self.reason),
            Location::File => write!(f, "{p}: {}", self.reason),
        }
    }
}

impl std::error::Error for TraceError {}

/// Most characters an error or warning shows of one piece of input, escapes included
/// ([`echo`]).
pub const ECHO_CHARS: usize = 80;

/// Input text as a message may repeat it: control characters (escape sequences that would
/// retitle or recolour a terminal, NUL, line breaks) and the marks that reorder text on screen
/// are written as Rust escapes (`\u{1b}`), and text past [`ECHO_CHARS`] characters is cut,
/// with `…` and the whole length in bytes. Every importer echoes input through this one
/// function, so no message can carry raw bytes or grow with its input.
pub fn echo(text: &str) -> String {
    echo_prefix(text, text.len(), false)
}

/// [`echo`] of bytes that may not be UTF-8 (a pickle's): invalid sequences shown as `�`, and
/// only as many bytes decoded as can be shown.
pub fn echo_bytes(bytes: &[u8]) -> String {
    // A character takes at most 4 bytes: this many always fill the echo.
    let prefix = &bytes[..bytes.len().min(4 * ECHO_CHARS)];
    echo_prefix(
        &String::from_utf8_lossy(prefix),
        bytes.len(),
        prefix.len() < bytes.len(),
    )
}

/// Echoes `text`, the start of `total_bytes` of input (`more`: there is more than `text`).
fn echo_prefix(text: &str, total_bytes: usize, more: bool) -> String {
    let mut out = String::new();
    let mut shown = 0;
    let mut cut = more;
    for c in text.chars() {
        let escaped = is_unsafe_on_a_terminal(c).then(|| c.escape_debug().to_string());
        let width = escaped.as_ref().map_or(1, |e| e.chars().count());
        if shown + width > ECHO_CHARS {
            cut = true;
            break;
        }
        shown += width;
        match escaped {
            Some(e) => out.push_str(&e),
            None => out.push(c),
        }
    }
    if cut {
        out.push_str(&format!("… ({total_bytes} bytes)"));
    }
    out
}

/// Control characters, and the bidirectional marks and overrides that make a terminal show
/// text in another order than it is.
fn is_unsafe_on_a_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A JSON error of one line as `column 55: what: reason` (`column 55: bad JSON: EOF while
/// parsing an object`): the position as the column alone, since the line is the file's, which
/// the error names already (serde_json counts lines within the text it was given).
pub fn json_reason(e: &serde_json::Error, what: &str) -> String {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&position) {
        Some(reason) if e.line() > 0 => format!("column {}: {what}: {reason}", e.column()),
        _ => format!("{what}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        let e = TraceError::at_line(
            "path/to/file.jsonl",
            12,
            "bytes 18446744073709551616 exceeds the limit of 2^50",
        );
        assert_eq!(
            e.to_string(),
            "path/to/file.jsonl:12: bytes 18446744073709551616 exceeds the limit of 2^50"
        );
        let e = TraceError::new("file.pickle", Location::ByteOffset(1234), "x");
        assert_eq!(e.to_string(), "file.pickle: byte 1234: x");
        let e = TraceError::at_event("file.pickle", 17, "size -5 is negative");
        assert_eq!(e.to_string(), "file.pickle: event 17: size -5 is negative");
        let e = TraceError::in_file("f", "missing key 'segments'");
        assert_eq!(e.to_string(), "f: missing key 'segments'");
        let e = TraceError::new("generated", Location::Op(9), "x");
        assert_eq!(e.to_string(), "generated: op 9: x");
    }

    #[test]
    fn echo_escapes_what_a_terminal_would_obey() {
        // A title change (OSC ... BEL), a colour (CSI), NUL, a line break, a right-to-left
        // override: each written as an escape, the printable text kept.
        let hostile = "a\u{1b}]0;pwned\u{7}b\u{1b}[31mc\0d\ne\u{202e}f";
        assert_eq!(
            echo(hostile),
            "a\\u{1b}]0;pwned\\u{7}b\\u{1b}[31mc\\0d\\ne\\u{202e}f"
        );
        assert!(!echo(hostile).chars().any(is_unsafe_on_a_terminal));
        assert_eq!(echo("TIMESTAMP,Tokens"), "TIMESTAMP,Tokens");
        assert_eq!(echo("é 日本"), "é 日本");
    }

    #[test]
    fn echo_cuts_long_input_and_says_how_long() {
        let exact = "x".repeat(ECHO_CHARS);
        assert_eq!(echo(&exact), exact);
        let long = "é".repeat(10 << 20);
        let shown = echo(&long);
        assert_eq!(
            shown,
            format!("{}… ({} bytes)", "é".repeat(ECHO_CHARS), long.len())
        );
        assert!(shown.chars().count() < 2 * ECHO_CHARS);
        assert_eq!(
            echo_bytes(&[b'a'; 1000]),
            format!("{}… (1000 bytes)", "a".repeat(ECHO_CHARS))
        );
        assert_eq!(echo_bytes(b"ok\xff\x1b"), "ok\u{fffd}\\u{1b}");
        // Escapes count as what they show.
        let escapes = echo(&"\u{1b}".repeat(1000));
        assert_eq!(
            escapes,
            format!("{}… (1000 bytes)", "\\u{1b}".repeat(ECHO_CHARS / 6))
        );
    }

    #[test]
    fn json_reasons_name_the_column_alone() {
        let e = serde_json::from_str::<serde_json::Value>("{\"a\": 1,").unwrap_err();
        assert_eq!(
            json_reason(&e, "bad JSON"),
            "column 8: bad JSON: EOF while parsing a value"
        );
        let e = serde_json::from_str::<serde_json::Value>("{\"a\": tru}").unwrap_err();
        assert_eq!(
            json_reason(&e, "bad JSON"),
            "column 10: bad JSON: expected ident"
        );
    }
}
