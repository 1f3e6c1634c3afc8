//! The one line reader of every line-oriented trace (JSON Lines, CSV): bounded, streaming, and
//! exact about where it is.
//!
//! [`LineReader`] hands out the lines of any [`BufRead`] (a file, a pipe, bytes in memory) one
//! at a time, each with its 1-based number and without its line ending (`\n`, or `\r\n`). It
//! never holds more than one line: a line longer than [`Limits::max_line_bytes`] is refused
//! once that many bytes have been seen, before the rest of it is read, and input longer than
//! [`Limits::max_input_bytes`] is refused where it crosses the limit (an endless pipe ends).
//! Every error names the file and the line, and the limit it crossed.
//!
//! ```
//! # use gpumem_traces::read::LineReader;
//! let mut lines = LineReader::new("a\r\n\nb".as_bytes(), "t.jsonl");
//! let mut seen = Vec::new();
//! while let Some(line) = lines.next_line() {
//!     let line = line.unwrap();
//!     seen.push((line.number, line.text.to_owned()));
//! }
//! assert_eq!(seen, [(1, "a".into()), (2, "".into()), (3, "b".into())]);
//! ```

use std::io::{BufRead, ErrorKind};
use std::path::{Path, PathBuf};

use crate::error::TraceError;

/// Longest line accepted, in bytes (its `\n` excluded). A line is held whole while it is
/// parsed, so this bounds what one line can make a reader allocate; the longest real lines
/// (a prompt of explicit token ids, one vLLM event batch) are a few MiB.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Most bytes read from one input. Bounds the work a reader does on input that never ends (a
/// pipe from `yes`); the largest real traces are a few GiB.
pub const MAX_INPUT_BYTES: u64 = 1 << 40;

/// The UTF-8 byte-order mark, dropped from the start of the first line.
const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

/// Opens `path` for reading: `-` is stdin; a folder, or a file that cannot be opened, is an
/// error naming it (with no line: nothing was read).
pub fn open(path: &Path) -> Result<Box<dyn BufRead>, TraceError> {
    const BUFFER_BYTES: usize = 1 << 16;
    if path == Path::new("-") {
        return Ok(Box::new(std::io::BufReader::with_capacity(
            BUFFER_BYTES,
            std::io::stdin(),
        )));
    }
    if path.is_dir() {
        return Err(TraceError::in_file(path, "is a folder, not a trace file"));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| TraceError::in_file(path, format!("cannot read the file: {e}")))?;
    Ok(Box::new(std::io::BufReader::with_capacity(
        BUFFER_BYTES,
        file,
    )))
}

/// The first bytes of `input` without consuming them (at least one, unless it is empty): what
/// format detection looks at, so that a pipe is read once.
pub fn peek(input: &mut dyn BufRead, path: &Path) -> Result<Vec<u8>, TraceError> {
    loop {
        match input.fill_buf() {
            Ok(bytes) => return Ok(bytes.to_vec()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(TraceError::in_file(
                    path,
                    format!("cannot read the input: {e}"),
                ))
            }
        }
    }
}

/// All of `input`, refused past `max_bytes` (named `limit_name` in the error) without reading
/// further: for binary formats that are parsed whole (pickles).
pub fn read_capped(
    input: &mut dyn BufRead,
    path: &Path,
    max_bytes: u64,
    limit_name: &str,
) -> Result<Vec<u8>, TraceError> {
    let mut bytes = Vec::new();
    let read = std::io::Read::read_to_end(
        &mut std::io::Read::take(input, max_bytes.saturating_add(1)),
        &mut bytes,
    )
    .map_err(|e| TraceError::in_file(path, format!("cannot read the input: {e}")))?;
    if read as u64 > max_bytes {
        return Err(TraceError::in_file(
            path,
            format!(
                "larger than gpumem's limit of {max_bytes} bytes for this format ({limit_name})"
            ),
        ));
    }
    Ok(bytes)
}

/// What a [`LineReader`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_line_bytes: usize,
    pub max_input_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: MAX_LINE_BYTES,
            max_input_bytes: MAX_INPUT_BYTES,
        }
    }
}

/// One line of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// 1-based.
    pub number: u64,
    /// The line without its ending; valid UTF-8, not trimmed.
    pub text: &'a str,
    /// The input's name, for errors.
    pub path: &'a Path,
}

impl Line<'_> {
    /// An error at this line of this file.
    pub fn error(&self, reason: impl Into<String>) -> TraceError {
        TraceError::at_line(self.path, self.number, reason)
    }

    /// True for a line with nothing but white space.
    pub fn is_blank(&self) -> bool {
        self.text.trim().is_empty()
    }

    /// True for a blank line or one whose first non-blank character is `#` (the comments that
    /// gpumem's own JSON Lines formats allow).
    pub fn is_blank_or_comment(&self) -> bool {
        let text = self.text.trim_start();
        text.is_empty() || text.starts_with('#')
    }
}

/// The lines of a [`BufRead`], one at a time (see the module documentation).
///
/// Not an [`Iterator`]: each [`Line`] borrows the reader's one buffer, so it must be dropped
/// before the next is read (`while let Some(line) = reader.next_line()`).
pub struct LineReader<R> {
    input: R,
    path: PathBuf,
    limits: Limits,
    buffer: Vec<u8>,
    /// Number of the line last handed out.
    number: u64,
    input_bytes: u64,
    finished: bool,
}

impl<R: BufRead> LineReader<R> {
    /// Reads `input`; `path` names it in errors.
    pub fn new(input: R, path: impl Into<PathBuf>) -> Self {
        LineReader {
            input,
            path: path.into(),
            limits: Limits::default(),
            buffer: Vec::new(),
            number: 0,
            input_bytes: 0,
            finished: false,
        }
    }

    /// The same reader with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next line, or `None` after the last one (a final line ending adds no empty line).
    /// After an error the reader is finished: every later call answers `None`.
    pub fn next_line(&mut self) -> Option<Result<Line<'_>, TraceError>> {
        if self.finished {
            return None;
        }
        self.number += 1;
        self.buffer.clear();
        match self.fill_line() {
            Ok(false) => {
                self.finished = true;
                None
            }
            Ok(true) => Some(self.decode()),
            Err(reason) => {
                self.finished = true;
                Some(Err(TraceError::at_line(&self.path, self.number, reason)))
            }
        }
    }

    /// Reads the bytes of one line into `buffer`, its ending consumed and dropped. False at the
    /// end of the input with no byte read.
    fn fill_line(&mut self) -> Result<bool, String> {
        let mut read_any = false;
        loop {
            let available = match self.input.fill_buf() {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("cannot read the input: {e}")),
            };
            if available.is_empty() {
                return Ok(read_any);
            }
            read_any = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let taken = newline.map_or(available.len(), |i| i + 1);
            let content = newline.unwrap_or(available.len());
            let room = self.limits.max_line_bytes.saturating_sub(self.buffer.len());
            // One byte past the limit proves the line too long; the rest is never read.
            self.buffer
                .extend_from_slice(&available[..content.min(room.saturating_add(1))]);
            self.input.consume(taken);
            self.count_input(taken)?;
            if self.buffer.len() > self.limits.max_line_bytes {
                return Err(format!(
                    "the line is longer than gpumem's limit of {} bytes",
                    self.limits.max_line_bytes
                ));
            }
            if newline.is_some() {
                return Ok(true);
            }
        }
    }

    fn count_input(&mut self, bytes: usize) -> Result<(), String> {
        self.input_bytes = self.input_bytes.saturating_add(bytes as u64);
        if self.input_bytes > self.limits.max_input_bytes {
            return Err(format!(
                "the input is longer than gpumem's limit of {} bytes",
                self.limits.max_input_bytes
            ));
        }
        Ok(())
    }

    fn decode(&mut self) -> Result<Line<'_>, TraceError> {
        if self.buffer.last() == Some(&b'\r') {
            self.buffer.pop();
        }
        // Editors on Windows start UTF-8 files with a byte-order mark: it is not content.
        if self.number == 1 && self.buffer.starts_with(UTF8_BOM) {
            self.buffer.drain(..UTF8_BOM.len());
        }
        match std::str::from_utf8(&self.buffer) {
            Ok(text) => Ok(Line {
                number: self.number,
                text,
                path: &self.path,
            }),
            Err(e) => {
                self.finished = true;
                Err(TraceError::at_line(
                    &self.path,
                    self.number,
                    format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests;
