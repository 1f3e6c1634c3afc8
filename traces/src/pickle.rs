//! A minimal, safe reader for Python pickles of plain values (protocols 0 to 5).
//!
//! Only data is built: None, bool, int, float, str, bytes, list, tuple, dict, set (as a list).
//! Every opcode that would import, call or construct something (GLOBAL, STACK_GLOBAL, REDUCE,
//! BUILD, INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, PERSID, BINPERSID, NEXT_BUFFER,
//! READONLY_BUFFER) is refused with an error naming it and its byte offset.
//!
//! Safety against hostile input:
//! - no allocation is sized by a length field: a length larger than the remaining input is
//!   "truncated at byte N" before anything is reserved;
//! - the machine keeps containers in an arena and the memo holds arena handles, so shared and
//!   later-mutated containers behave as in Python; the final value is built from the arena with
//!   a depth limit (recursive structures are refused);
//! - one absolute memory budget ([`MAX_MEMORY_BYTES`], 1 GiB by default, whatever the size of
//!   the input) is charged for everything the machine and the result hold: arena objects,
//!   container entries, stack entries, result values and their strings, memo references
//!   expanded — so neither a file of repeated `DUP`s nor shared references expanding
//!   exponentially can take more;
//! - integers wider than 128 bits are refused; stack and MARK depth are capped;
//! - no input makes it panic (a property test feeds it random and truncated bytes).
//!
//! It exists for safety: Python's own unpickler runs arbitrary code, and no Rust crate reads
//! pickles without building the objects they name. [`to_bytes`] writes a [`Value`] as a
//! protocol-4 pickle (for tests and fixtures).

use std::collections::BTreeMap;
use std::fmt;

/// A plain Python value.
///
/// Ints that fit in `i64` are always `Int`; `BigInt` holds the others up to 128 bits (wider
/// integers are refused). Sets and frozensets become `List`. A `Dict` keeps its pairs in
/// insertion order, duplicates included; [`Value::get`] returns the last match, as Python would.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    BigInt(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

impl Value {
    /// An integer value, `Int` when it fits in i64.
    pub fn int(v: i128) -> Value {
        match i64::try_from(v) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::BigInt(v),
        }
    }

    /// The value under a string key of a dict (the last one if repeated).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(pairs) => pairs
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Items of a list or tuple.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(v) => Some(v),
            _ => None,
        }
    }

    /// An integer (not a bool).
    pub fn as_i128(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some(i128::from(*i)),
            Value::BigInt(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// "a string", "an integer", ... for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::BigInt(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
        }
    }
}

/// Why a pickle was not read, and where (byte offset of the opcode at fault, or of the end of
/// the input when it is truncated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    pub offset: u64,
    pub reason: String,
}

impl PickleError {
    /// Whether the input ended before the pickle did (every such reason starts "truncated at
    /// byte"): more input might parse, unlike any other error.
    pub fn is_truncation(&self) -> bool {
        self.reason.starts_with("truncated at byte")
    }
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for PickleError {}

/// The default memory budget of a parse: far above real snapshots (a 1.3 MB snapshot expands
/// to about 2.1 M values and 23 MB of strings, some 100 MB in all), whatever the input's size.
pub const MAX_MEMORY_BYTES: u64 = 1 << 30;

/// Bounds on what a parse may build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of containers in the result.
    pub max_depth: usize,
    /// Most bytes the machine and the result may hold together (estimated from the sizes of
    /// what they keep; see the module documentation).
    pub max_memory_bytes: u64,
    /// Most entries on the machine's stack.
    pub max_stack: usize,
    /// Most open MARKs.
    pub max_marks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 200,
            max_memory_bytes: MAX_MEMORY_BYTES,
            max_stack: 1 << 24,
            max_marks: 1000,
        }
    }
}

/// Parses a pickle of plain values with the default [`Limits`].
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    parse_with_limits(bytes, &Limits::default())
}

/// Parses a pickle of plain values within the given limits. Bytes after STOP are ignored, as
/// Python does.
pub fn parse_with_limits(bytes: &[u8], limits: &Limits) -> Result<Value, PickleError> {
    let mut vm = Vm {
        data: bytes,
        pos: 0,
        op_start: 0,
        op: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        limits: *limits,
        memory_left: limits.max_memory_bytes,
    };
    let root = vm.run()?;
    let mut budget = Budget {
        memory_left: vm.memory_left,
    };
    vm.build(root, 0, &mut budget)
}

/// Estimated bytes held per arena object, stack or container entry, and result value.
const OBJ_BYTES: u64 = std::mem::size_of::<Obj>() as u64;
const HANDLE_BYTES: u64 = std::mem::size_of::<usize>() as u64;
const VALUE_BYTES: u64 = std::mem::size_of::<Value>() as u64;

/// A container or scalar under construction.
enum Obj {
    Scalar(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    /// set / frozenset; becomes a `List`.
    Set(Vec<usize>),
}

/// What is left of the memory budget while the result is built.
struct Budget {
    memory_left: u64,
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed.
    op_start: usize,
    op: u8,
    arena: Vec<Obj>,
    stack: Vec<usize>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: BTreeMap<u64, usize>,
    limits: Limits,
    /// What is left of the memory budget (arena, stack, container entries).
    memory_left: u64,
}

const REFUSED_TAIL: &str = "refused, snapshots are plain values";

fn opname(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "an unknown opcode",
    }
}

/// Text taken from the input, as an error message shows it ([`crate::error::echo_bytes`]).
fn excerpt(b: &[u8]) -> String {
    crate::error::echo_bytes(b)
}

/// Decodes a little-endian two's-complement integer of any width, if it fits in 128 bits.
fn decode_le_int(b: &[u8]) -> Option<i128> {
    if b.is_empty() {
        return Some(0);
    }
    let n = b.len().min(16);
    let negative = b[n - 1] & 0x80 != 0;
    if b.len() > 16 {
        // Wider encodings are fine only if the extra bytes are pure sign extension.
        let fill = if negative { 0xff } else { 0x00 };
        if b[16..].iter().any(|&x| x != fill) {
            return None;
        }
    }
    let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
    buf[..n].copy_from_slice(&b[..n]);
    Some(i128::from_le_bytes(buf))
}

/// Parses the decimal text of INT / LONG (optional sign, surrounding blanks).
fn parse_decimal(s: &str) -> Result<i128, String> {
    let t = s.trim();
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("malformed integer '{}'", excerpt(t.as_bytes())));
    }
    t.parse::<i128>().map_err(|_| {
        format!(
            "integer {} does not fit in 128 bits: refused",
            excerpt(t.as_bytes())
        )
    })
}

/// Decodes Python's raw-unicode-escape (UNICODE opcode): latin-1 bytes with \uXXXX and
/// \UXXXXXXXX escapes.
fn decode_raw_unicode_escape(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && (b[i + 1] == b'u' || b[i + 1] == b'U') {
            let n = if b[i + 1] == b'u' { 4 } else { 8 };
            if i + 2 + n <= b.len() {
                if let Some(c) = std::str::from_utf8(&b[i + 2..i + 2 + n])
                    .ok()
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .and_then(char::from_u32)
                {
                    out.push(c);
                    i += 2 + n;
                    continue;
                }
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
}

/// Decodes the quoted repr of the STRING opcode ('...' or "..." with backslash escapes).
fn decode_string_repr(b: &[u8]) -> Option<Vec<u8>> {
    let b = b.trim_ascii();
    if b.len() < 2 || b[0] != b[b.len() - 1] || (b[0] != b'\'' && b[0] != b'"') {
        return None;
    }
    let b = &b[1..b.len() - 1];
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' || i + 1 == b.len() {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = b[i + 1];
        i += 2;
        match c {
            b'\\' => out.push(b'\\'),
            b'\'' => out.push(b'\''),
            b'"' => out.push(b'"'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\n' => {}
            b'x' if i + 2 <= b.len() => {
                let h = std::str::from_utf8(&b[i..i + 2]).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let mut v: u32 = u32::from(c - b'0');
                let mut k = 0;
                while k < 2 && i < b.len() && (b'0'..=b'7').contains(&b[i]) {
                    v = v * 8 + u32::from(b[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push((v & 0xff) as u8);
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Some(out)
}

/// Bytes that are valid UTF-8 become a string (Python 3 reads py2 `str` as text), others bytes.
fn str_or_bytes(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::Str(s.to_owned()),
        Err(_) => Value::Bytes(b.to_vec()),
    }
}

/// UTF-8 text; invalid sequences (Python's lone surrogates) become U+FFFD.
fn utf8_lossy(b: &[u8]) -> Value {
    Value::Str(String::from_utf8_lossy(b).into_owned())
}

impl<'a> Vm<'a> {
    fn err(&self, reason: impl Into<String>) -> PickleError {
        PickleError {
            offset: self.op_start as u64,
            reason: reason.into(),
        }
    }

    fn truncated(&self, need: u64) -> PickleError {
        let left = self.data.len() - self.pos;
        PickleError {
            offset: self.op_start as u64,
            reason: format!(
                "truncated at byte {}: {} needs {} more bytes, {} left",
                self.data.len(),
                opname(self.op),
                need,
                left
            ),
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.truncated(n));
        }
        let n = n as usize;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn read_u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take_array::<1>()?[0])
    }

    fn read_u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    fn read_i32(&mut self) -> Result<i32, PickleError> {
        Ok(i32::from_le_bytes(self.take_array()?))
    }

    fn read_u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take_array()?))
    }

    /// A text argument up to (not including) the next newline.
    fn read_line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&c| c == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => Err(PickleError {
                offset: self.op_start as u64,
                reason: format!(
                    "truncated at byte {}: {} needs a newline-terminated argument",
                    self.data.len(),
                    opname(self.op)
                ),
            }),
        }
    }

    fn over_budget(&self) -> PickleError {
        self.err(format!(
            "the pickle needs more than its memory budget of {} bytes (pickle::Limits::max_memory_bytes): refused",
            self.limits.max_memory_bytes
        ))
    }

    /// Takes `bytes` from the memory budget, or refuses the pickle.
    fn charge(&mut self, bytes: u64) -> Result<(), PickleError> {
        match self.memory_left.checked_sub(bytes) {
            Some(left) => {
                self.memory_left = left;
                Ok(())
            }
            None => Err(self.over_budget()),
        }
    }

    fn alloc(&mut self, obj: Obj) -> Result<usize, PickleError> {
        let payload = match &obj {
            Obj::Scalar(Value::Str(s)) => s.len() as u64,
            Obj::Scalar(Value::Bytes(b)) => b.len() as u64,
            _ => 0,
        };
        self.charge(OBJ_BYTES + payload)?;
        self.arena.push(obj);
        Ok(self.arena.len() - 1)
    }

    fn push(&mut self, h: usize) -> Result<(), PickleError> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(self.err(format!(
                "more than {} values on the stack: refused",
                self.limits.max_stack
            )));
        }
        self.charge(HANDLE_BYTES)?;
        self.stack.push(h);
        Ok(())
    }

    fn push_new(&mut self, obj: Obj) -> Result<(), PickleError> {
        let h = self.alloc(obj)?;
        self.push(h)
    }

    fn push_value(&mut self, v: Value) -> Result<(), PickleError> {
        self.push_new(Obj::Scalar(v))
    }

    /// Stack length below which the current MARK forbids popping.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<usize, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(format!("{} finds the stack empty", opname(self.op))));
        }
        Ok(self.stack.pop().unwrap_or_default())
    }

    fn top(&self) -> Result<usize, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(format!("{} finds the stack empty", opname(self.op))));
        }
        Ok(self.stack[self.stack.len() - 1])
    }

    fn pop_mark(&mut self) -> Result<Vec<usize>, PickleError> {
        match self.marks.pop() {
            Some(m) => Ok(self.stack.split_off(m)),
            None => Err(self.err(format!("{} without a MARK", opname(self.op)))),
        }
    }

    fn kind_name(&self, h: usize) -> &'static str {
        match &self.arena[h] {
            Obj::Scalar(v) => v.type_name(),
            Obj::List(_) => "a list",
            Obj::Tuple(_) => "a tuple",
            Obj::Dict(_) => "a dict",
            Obj::Set(_) => "a set",
        }
    }

    fn append_items(&mut self, target: usize, items: Vec<usize>) -> Result<(), PickleError> {
        self.charge(items.len() as u64 * HANDLE_BYTES)?;
        let kind = self.kind_name(target);
        match &mut self.arena[target] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(self.err(format!("{} to {kind}", opname(self.op)))),
        }
    }

    fn set_items(&mut self, target: usize, items: Vec<usize>) -> Result<(), PickleError> {
        if items.len() & 1 != 0 {
            return Err(self.err(format!("{} with an odd number of items", opname(self.op))));
        }
        self.charge(items.len() as u64 * HANDLE_BYTES)?;
        let kind = self.kind_name(target);
        match &mut self.arena[target] {
            Obj::Dict(v) => {
                v.extend(items.chunks_exact(2).map(|p| (p[0], p[1])));
                Ok(())
            }
            _ => Err(self.err(format!("{} on {kind}", opname(self.op)))),
        }
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&h) => self.push(h),
            None => Err(self.err(format!(
                "{} of memo key {key}, never stored",
                opname(self.op)
            ))),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let h = self.top()?;
        self.memo.insert(key, h);
        Ok(())
    }

    fn line_u64(&mut self) -> Result<u64, PickleError> {
        let l = self.read_line()?;
        std::str::from_utf8(l)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| self.err(format!("malformed memo key '{}'", excerpt(l))))
    }

    fn refuse(&mut self) -> PickleError {
        let name = opname(self.op);
        let what = match self.op {
            b'c' | b'i' => {
                // Two newline-terminated arguments: module and name.
                let detail = match (self.read_line(), self.read_line()) {
                    (Ok(m), Ok(n)) => format!(" '{} {}'", excerpt(m), excerpt(n)),
                    _ => String::new(),
                };
                let verb = if self.op == b'c' {
                    "import a global"
                } else {
                    "build an object"
                };
                return self.err(format!(
                    "pickle asks to {verb} ({name}{detail}): {REFUSED_TAIL}"
                ));
            }
            0x93 => {
                let n = self.stack.len();
                let names: Vec<&str> = self.stack[n.saturating_sub(2)..]
                    .iter()
                    .filter_map(|&h| match &self.arena[h] {
                        Obj::Scalar(Value::Str(s)) => Some(s.as_str()),
                        _ => None,
                    })
                    .collect();
                let detail = if names.len() == 2 {
                    format!(
                        " '{} {}'",
                        excerpt(names[0].as_bytes()),
                        excerpt(names[1].as_bytes())
                    )
                } else {
                    String::new()
                };
                return self.err(format!(
                    "pickle asks to import a global ({name}{detail}): {REFUSED_TAIL}"
                ));
            }
            b'R' => "call a function",
            b'b' => "set an object's state",
            b'o' | 0x81 | 0x92 => "build an object",
            0x82..=0x84 => "import a registered extension",
            b'P' | b'Q' => "load a persistent object",
            0x97 | 0x98 => "read an out-of-band buffer",
            _ => return self.err(format!("unknown opcode 0x{:02x}", self.op)),
        };
        self.err(format!("pickle asks to {what} ({name}): {REFUSED_TAIL}"))
    }

    /// Runs the machine to STOP; returns the handle of the result.
    fn run(&mut self) -> Result<usize, PickleError> {
        loop {
            if self.pos >= self.data.len() {
                return Err(PickleError {
                    offset: self.data.len() as u64,
                    reason: format!("truncated at byte {}: no STOP opcode", self.data.len()),
                });
            }
            self.op_start = self.pos;
            self.op = self.data[self.pos];
            self.pos += 1;
            match self.op {
                0x80 => {
                    let p = self.read_u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: only a hint for buffering; the content follows inline.
                    self.read_u64()?;
                }
                b'.' => return self.pop(),
                b'(' => {
                    if self.marks.len() >= self.limits.max_marks {
                        return Err(self.err(format!(
                            "more than {} nested MARKs: refused",
                            self.limits.max_marks
                        )));
                    }
                    self.marks.push(self.stack.len());
                }
                b'}' => self.push_new(Obj::Dict(Vec::new()))?,
                b']' => self.push_new(Obj::List(Vec::new()))?,
                b')' => self.push_new(Obj::Tuple(Vec::new()))?,
                0x8f => self.push_new(Obj::Set(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let h = self.alloc(Obj::Dict(Vec::new()))?;
                    self.set_items(h, items)?;
                    self.push(h)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::List(items))?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Tuple(items))?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Set(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(self.op - 0x84);
                    let mut items = vec![0; n];
                    for slot in items.iter_mut().rev() {
                        *slot = self.pop()?;
                    }
                    self.push_new(Obj::Tuple(items))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.append_items(target, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append_items(target, items)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.charge(items.len() as u64 * HANDLE_BYTES)?;
                    let target = self.top()?;
                    let kind = self.kind_name(target);
                    match &mut self.arena[target] {
                        Obj::Set(v) => v.extend(items),
                        _ => return Err(self.err(format!("ADDITEMS to {kind}"))),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.set_items(target, items)?;
                }
                b'J' => {
                    let v = self.read_i32()?;
                    self.push_value(Value::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.read_u8()?;
                    self.push_value(Value::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push_value(Value::Int(i64::from(v)))?;
                }
                0x8a | 0x8b => {
                    let n: u64 = if self.op == 0x8a {
                        u64::from(self.read_u8()?)
                    } else {
                        let n = self.read_i32()?;
                        u64::try_from(n)
                            .map_err(|_| self.err(format!("LONG4 with negative length {n}")))?
                    };
                    let b = self.take(n)?;
                    let v = decode_le_int(b).ok_or_else(|| {
                        self.err(format!(
                            "{} integer of {n} bytes does not fit in 128 bits: refused",
                            opname(self.op)
                        ))
                    })?;
                    self.push_value(Value::int(v))?;
                }
                b'I' | b'L' => {
                    let l = self.read_line()?;
                    let text = std::str::from_utf8(l)
                        .map_err(|_| self.err(format!("malformed integer '{}'", excerpt(l))))?;
                    let v = match (self.op, text.trim()) {
                        (b'I', "00") => Value::Bool(false),
                        (b'I', "01") => Value::Bool(true),
                        (_, t) => {
                            let t = if self.op == b'L' {
                                t.strip_suffix('L').unwrap_or(t)
                            } else {
                                t
                            };
                            Value::int(parse_decimal(t).map_err(|r| self.err(r))?)
                        }
                    };
                    self.push_value(v)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array()?);
                    self.push_value(Value::Float(v))?;
                }
                b'F' => {
                    let l = self.read_line()?;
                    let v = std::str::from_utf8(l)
                        .ok()
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .ok_or_else(|| self.err(format!("malformed float '{}'", excerpt(l))))?;
                    self.push_value(Value::Float(v))?;
                }
                b'N' => self.push_value(Value::None)?,
                0x88 => self.push_value(Value::Bool(true))?,
                0x89 => self.push_value(Value::Bool(false))?,
                b'X' | 0x8c | 0x8d => {
                    let n = match self.op {
                        b'X' => u64::from(self.read_u32()?),
                        0x8c => u64::from(self.read_u8()?),
                        _ => self.read_u64()?,
                    };
                    let b = self.take(n)?;
                    self.push_value(utf8_lossy(b))?;
                }
                b'V' => {
                    let l = self.read_line()?;
                    self.push_value(Value::Str(decode_raw_unicode_escape(l)))?;
                }
                b'T' | b'U' => {
                    let n = if self.op == b'T' {
                        let n = self.read_i32()?;
                        u64::try_from(n)
                            .map_err(|_| self.err(format!("BINSTRING with negative length {n}")))?
                    } else {
                        u64::from(self.read_u8()?)
                    };
                    let b = self.take(n)?;
                    self.push_value(str_or_bytes(b))?;
                }
                b'S' => {
                    let l = self.read_line()?;
                    let b = decode_string_repr(l).ok_or_else(|| {
                        self.err(format!("malformed STRING argument '{}'", excerpt(l)))
                    })?;
                    self.push_value(str_or_bytes(&b))?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match self.op {
                        b'B' => u64::from(self.read_u32()?),
                        b'C' => u64::from(self.read_u8()?),
                        _ => self.read_u64()?,
                    };
                    let b = self.take(n)?;
                    self.push_value(Value::Bytes(b.to_vec()))?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                b'p' => {
                    let key = self.line_u64()?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = u64::from(self.read_u8()?);
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = u64::from(self.read_u32()?);
                    self.memo_put(key)?;
                }
                b'g' => {
                    let key = self.line_u64()?;
                    self.memo_get(key)?;
                }
                b'h' => {
                    let key = u64::from(self.read_u8()?);
                    self.memo_get(key)?;
                }
                b'j' => {
                    let key = u64::from(self.read_u32()?);
                    self.memo_get(key)?;
                }
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else {
                        // Python pops the mark itself when the current stack is empty.
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let h = self.top()?;
                    self.push(h)?;
                }
                _ => return Err(self.refuse()),
            }
        }
    }

    /// Builds the value of handle `h` (offsets of errors: the STOP opcode).
    fn build(&self, h: usize, depth: usize, budget: &mut Budget) -> Result<Value, PickleError> {
        if depth > self.limits.max_depth {
            return Err(self.err(format!(
                "values nested deeper than {} levels (or a recursive structure): refused",
                self.limits.max_depth
            )));
        }
        let payload = match &self.arena[h] {
            Obj::Scalar(Value::Str(s)) => s.len() as u64,
            Obj::Scalar(Value::Bytes(b)) => b.len() as u64,
            _ => 0,
        };
        budget.memory_left = budget
            .memory_left
            .checked_sub(VALUE_BYTES + payload)
            .ok_or_else(|| self.over_budget())?;
        let items = |hs: &[usize], budget: &mut Budget| -> Result<Vec<Value>, PickleError> {
            hs.iter()
                .map(|&c| self.build(c, depth + 1, budget))
                .collect()
        };
        Ok(match &self.arena[h] {
            Obj::Scalar(v) => v.clone(),
            Obj::List(hs) | Obj::Set(hs) => Value::List(items(hs, budget)?),
            Obj::Tuple(hs) => Value::Tuple(items(hs, budget)?),
            Obj::Dict(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for &(k, v) in pairs {
                    let k = self.build(k, depth + 1, budget)?;
                    let v = self.build(v, depth + 1, budget)?;
                    out.push((k, v));
                }
                Value::Dict(out)
            }
        })
    }
}

/// Writes `v` as a protocol-4 pickle without memo or framing (Python's `pickle.loads` reads it).
/// Recursion follows the depth of `v`.
pub fn to_bytes(v: &Value) -> Vec<u8> {
    let mut out = vec![0x80, 4];
    write_value(v, &mut out);
    out.push(b'.');
    out
}

fn write_len_prefixed(out: &mut Vec<u8>, short: u8, long: u8, long8: u8, b: &[u8]) {
    if b.len() < 256 {
        out.push(short);
        out.push(b.len() as u8);
    } else if let Ok(n) = u32::try_from(b.len()) {
        out.push(long);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.push(long8);
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(b);
}

fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::None => out.push(b'N'),
        Value::Bool(true) => out.push(0x88),
        Value::Bool(false) => out.push(0x89),
        Value::Int(i) => write_int(i128::from(*i), out),
        Value::BigInt(i) => write_int(*i, out),
        Value::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => write_len_prefixed(out, 0x8c, b'X', 0x8d, s.as_bytes()),
        Value::Bytes(b) => write_len_prefixed(out, b'C', b'B', 0x8e, b),
        Value::List(items) => {
            out.push(b']');
            if !items.is_empty() {
                out.push(b'(');
                for x in items {
                    write_value(x, out);
                }
                out.push(b'e');
            }
        }
        Value::Tuple(items) => {
            if items.is_empty() {
                out.push(b')');
            } else {
                out.push(b'(');
                for x in items {
                    write_value(x, out);
                }
                out.push(b't');
            }
        }
        Value::Dict(pairs) => {
            out.push(b'}');
            if !pairs.is_empty() {
                out.push(b'(');
                for (k, x) in pairs {
                    write_value(k, out);
                    write_value(x, out);
                }
                out.push(b'u');
            }
        }
    }
}

fn write_int(i: i128, out: &mut Vec<u8>) {
    if let Ok(small) = i32::try_from(i) {
        out.push(b'J');
        out.extend_from_slice(&small.to_le_bytes());
        return;
    }
    // LONG1 with the shortest two's-complement encoding.
    let bytes = i.to_le_bytes();
    let mut n = 16;
    while n > 1 {
        let top = bytes[n - 1];
        let next_sign = bytes[n - 2] & 0x80;
        if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
            n -= 1;
        } else {
            break;
        }
    }
    out.push(0x8a);
    out.push(n as u8);
    out.extend_from_slice(&bytes[..n]);
}

#[cfg(test)]
mod tests;
