//! A workload file read lazily: [`RequestStream`] hands out one request at a time, in arrival
//! order, and holds only what it has read ahead. Every format is one [`LineParser`] (a line in,
//! at most one request out); the stream owns the lines, the limits and the arrival order.
//!
//! Arrival order: the conformance workload must already be in order (its own check). The
//! imported traces are put in order as they are read, stably (ties keep file order), within a
//! window of [`REORDER_WINDOW`] requests: a request that arrives earlier than one the window
//! has already let go is refused, naming its line. Traces whose times are relative to their
//! first request (Qwen-Bailian, Azure, BurstGPT) are rebased to the earliest one.
//!
//! Limits, each named in its error: lines as the one line reader takes them ([`LineReader`]:
//! at most [`MAX_LINE_BYTES`] bytes, the rest of a longer line never read), at most
//! [`MAX_REQUESTS`] requests, arrivals up to [`MAX_ARRIVAL_US`]. The input may be a pipe: it is
//! read once, front to back.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::Path;

use super::{WorkloadFormat, WorkloadRequest, MAX_ARRIVAL_US};
use crate::error::TraceError;
use crate::read::LineReader;
pub use crate::read::MAX_LINE_BYTES;

/// Most requests one workload may hold (bounds the per-request integers a run keeps for its
/// percentiles, and what a hostile file can make gpumem do).
pub const MAX_REQUESTS: u64 = 1 << 26;

/// How far out of arrival order an imported request may be, in requests: the stream reads this
/// many ahead of the one it hands out.
pub const REORDER_WINDOW: usize = 1 << 14;

/// One request as a line gave it: its time in the format's own unit, not yet in arrival
/// order (`request.arrival_us` is filled in by the stream).
#[derive(Debug)]
pub struct Record {
    pub time: u64,
    pub request: WorkloadRequest,
}

/// How a format's record times become arrivals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Put in order within [`REORDER_WINDOW`] (else the parser has checked the order itself).
    pub reorder: bool,
    /// Times are relative to the earliest request.
    pub rebase: bool,
    /// Time units per µs.
    pub per_us: u64,
}

/// One format: lines in, requests out.
pub trait LineParser {
    /// Parses non-blank line `line` (its ending stripped). `Ok(None)` for a line that holds no
    /// request (a CSV header, a skipped row). Warnings go to `warnings`, each once.
    fn parse(
        &mut self,
        line: u64,
        text: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Record>, TraceError>;

    /// After the last line read (the input ended or the limit was reached).
    fn finish(&mut self, _warnings: &mut Vec<String>) -> Result<(), TraceError> {
        Ok(())
    }

    fn timing(&self) -> Timing;

    /// From now on, reads each request's model name into [`WorkloadRequest::model`]; false
    /// (and nothing changes) for a format that carries none.
    fn read_models(&mut self) -> bool {
        false
    }
}

/// A record waiting in the reorder window.
struct Pending {
    time: u64,
    request: WorkloadRequest,
}

/// The requests of one workload input, in arrival order (see the module documentation).
pub struct RequestStream<'a> {
    source: String,
    format: WorkloadFormat,
    lines: LineReader<Box<dyn BufRead + 'a>>,
    parser: Box<dyn LineParser + 'a>,
    timing: Timing,
    /// A line read ahead (format detection) and not parsed yet.
    first_line: Option<(u64, String)>,
    limit: Option<u64>,
    records: u64,
    /// Records read ahead, in arrival order (ties in file order).
    window: VecDeque<Pending>,
    /// Time of the last request handed out, and the rebase origin (the first one's time).
    last_time: Option<u64>,
    origin: u64,
    warnings: Vec<String>,
    input_done: bool,
    failed: bool,
}

impl<'a> RequestStream<'a> {
    /// Opens `path` (`-`: standard input) in `format`, or in the format its first non-blank
    /// line shows; at most `limit` requests (the first in the file).
    pub fn open(
        path: &Path,
        format: Option<WorkloadFormat>,
        limit: Option<u64>,
    ) -> Result<RequestStream<'static>, TraceError> {
        let input = crate::read::open(path)?;
        RequestStream::from_reader(input, &path.display().to_string(), format, limit)
    }

    /// Reads `input` (named `source` in errors), as [`open`](Self::open) reads a file. A
    /// file meant for another subcommand (an allocation snapshot, a KV-event stream) is refused
    /// with the subcommand that reads it.
    pub fn from_reader(
        input: impl BufRead + 'a,
        source: &str,
        format: Option<WorkloadFormat>,
        limit: Option<u64>,
    ) -> Result<Self, TraceError> {
        let mut input = input;
        // The first bytes, unconsumed (what the reader buffered): no line of any serving
        // format starts like these.
        let head = crate::read::peek(&mut input, Path::new(source))?;
        let pickle = match format {
            None => crate::looks_like_pickle(&head),
            // A named format's lines could start with '(' or ']'; only PROTO is sure.
            Some(_) => head.first() == Some(&0x80),
        };
        if pickle {
            return Err(TraceError::in_file(
                source,
                "this is an allocation snapshot (a pickle), not a request trace: `gpumem alloc --trace` reads it",
            ));
        }
        if crate::kv_events::looks_like_msgpack_events(&head) {
            return Err(TraceError::in_file(
                source,
                "this is a vLLM KV-event stream (msgpack), not a request trace: `gpumem kv-events` reads it",
            ));
        }
        let mut s = RequestStream {
            source: source.to_string(),
            format: format.unwrap_or(WorkloadFormat::Conformance),
            lines: LineReader::new(Box::new(input) as Box<dyn BufRead + 'a>, source),
            parser: WorkloadFormat::Conformance.parser(source),
            timing: WorkloadFormat::Conformance.parser(source).timing(),
            first_line: None,
            limit,
            records: 0,
            window: VecDeque::new(),
            last_time: None,
            origin: 0,
            warnings: Vec::new(),
            input_done: false,
            failed: false,
        };
        if format.is_none() {
            s.format = s.detect()?;
        }
        s.parser = s.format.parser(source);
        s.timing = s.parser.timing();
        Ok(s)
    }

    pub fn format(&self) -> WorkloadFormat {
        self.format
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Reads each request's model name too ([`WorkloadRequest::model`]: the `model` field of
    /// the conformance and Mooncake JSON Lines, BurstGPT's `Model` column, each checked against
    /// [`MAX_MODEL_NAME_BYTES`](super::MAX_MODEL_NAME_BYTES)); without this call a model
    /// field is ignored unread. Call it before the first request is taken. False for a format
    /// that carries no model names (Qwen-Bailian, Azure).
    pub fn read_models(&mut self) -> bool {
        self.parser.read_models()
    }

    /// Ignored fields and skipped records so far, one message each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Reads up to the first non-blank line and tells the format from it; the line is parsed
    /// later as the first one.
    fn detect(&mut self) -> Result<WorkloadFormat, TraceError> {
        while let Some(line) = self.lines.next_line() {
            let line = line?;
            if !line.is_blank() {
                let format = WorkloadFormat::detect(line.path, line.number, line.text)?;
                self.first_line = Some((line.number, line.text.to_string()));
                return Ok(format);
            }
        }
        Err(self.no_request())
    }

    /// The refusal of an input that ends before its first request, as `gpumem alloc` and
    /// `gpumem kv-events` refuse theirs.
    fn no_request(&self) -> TraceError {
        TraceError::in_file(&self.source, "the trace holds no request")
    }

    /// Parses lines until one gives a record, the limit is reached or the input ends.
    fn next_record(&mut self) -> Result<Option<Record>, TraceError> {
        loop {
            if self.limit.is_some_and(|n| self.records >= n) {
                return Ok(None);
            }
            let (n, parsed) = match self.first_line.take() {
                Some((n, text)) => (n, self.parser.parse(n, &text, &mut self.warnings)?),
                None => {
                    let Some(line) = self.lines.next_line() else {
                        return Ok(None);
                    };
                    let line = line?;
                    if line.is_blank() {
                        continue;
                    }
                    let n = line.number;
                    (n, self.parser.parse(n, line.text, &mut self.warnings)?)
                }
            };
            if let Some(r) = parsed {
                if self.records >= MAX_REQUESTS {
                    return Err(TraceError::at_line(
                        &self.source,
                        n,
                        format!("more than gpumem's limit of {MAX_REQUESTS} requests"),
                    ));
                }
                self.records += 1;
                return Ok(Some(r));
            }
        }
    }

    /// Fills the window (or takes the next record in file order) and hands out the earliest.
    fn next_request(&mut self) -> Result<Option<WorkloadRequest>, TraceError> {
        let room = if self.timing.reorder {
            REORDER_WINDOW
        } else {
            1
        };
        while !self.input_done && self.window.len() < room {
            match self.next_record()? {
                Some(r) => {
                    if self.last_time.is_some_and(|t| r.time < t) {
                        return Err(self.out_of_order(&r));
                    }
                    self.enter_window(Pending {
                        time: r.time,
                        request: r.request,
                    });
                }
                None => {
                    self.input_done = true;
                    self.parser.finish(&mut self.warnings)?;
                    let limited = self.limit.is_some_and(|n| self.records >= n);
                    if self.records == 0 && !limited {
                        return Err(self.no_request());
                    }
                }
            }
        }
        let Some(p) = self.window.pop_front() else {
            return Ok(None);
        };
        if self.last_time.is_none() && self.timing.rebase {
            self.origin = p.time;
        }
        self.last_time = Some(p.time);
        let mut r = p.request;
        r.arrival_us = (p.time - self.origin) / self.timing.per_us;
        if r.arrival_us > MAX_ARRIVAL_US {
            return Err(TraceError::at_line(
                &self.source,
                r.line,
                format!(
                    "arrival {} us exceeds gpumem's limit of {MAX_ARRIVAL_US}",
                    r.arrival_us
                ),
            ));
        }
        Ok(Some(r))
    }

    /// Puts `p` after every record that arrives no later (a trace in order: at the back).
    fn enter_window(&mut self, p: Pending) {
        if self.window.back().is_none_or(|last| last.time <= p.time) {
            self.window.push_back(p);
        } else {
            let at = self.window.partition_point(|q| q.time <= p.time);
            self.window.insert(at, p);
        }
    }

    fn out_of_order(&self, r: &Record) -> TraceError {
        TraceError::at_line(
            &self.source,
            r.request.line,
            format!(
                "the request arrives before one {REORDER_WINDOW} or more requests earlier in the file; gpumem puts requests in arrival order only within {REORDER_WINDOW} requests (sort the trace by time)"
            ),
        )
    }
}

impl Iterator for RequestStream<'_> {
    type Item = Result<WorkloadRequest, TraceError>;

    /// The next request in arrival order; after an error, None.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.next_request();
        self.failed = r.is_err();
        r.transpose()
    }
}
