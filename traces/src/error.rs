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
    /// The file as a whole (cannot be read, a key of the snapshot is missing, ...).
    File,
}

/// An importer's error: never a panic, always the file, where, and why.
///
/// Displays as `path:12: reason` (line), `path: byte 1234: reason`, `path: event 17: reason`
/// or `path: reason`.
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
            Location::File => write!(f, "{p}: {}", self.reason),
        }
    }
}

impl std::error::Error for TraceError {}

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
    }
}
