//! A small, safe MessagePack decoder: one value at a time from a byte slice, every value with
//! the byte offset it starts at (for error messages).
//!
//! Safe on hostile input: never panics; nesting is limited to [`MAX_DEPTH`]; a length field is
//! never trusted for an allocation beyond what the remaining bytes can hold (every element
//! takes at least one byte); and one top-level value may hold at most `max_nodes` values, so a
//! huge batch is an error, not an allocation of many gigabytes. Strings must be UTF-8.
//!
//! Written here rather than taken from `rmpv`: errors need each value's byte offset, and a
//! decoder for hostile files must bound what length fields make it allocate.

use std::fmt;

/// Deepest nesting of arrays and maps accepted.
pub const MAX_DEPTH: usize = 64;

/// A decoded value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    /// Any integer (msgpack's range is −2^63 .. 2^64 − 1).
    Int(i128),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// Extension type and data.
    Ext(i8, Vec<u8>),
}

/// A value and the byte offset of its first byte.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub offset: u64,
    pub value: Value,
}

impl Value {
    /// The msgpack family name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bin(_) => "binary",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
            Value::Ext(..) => "extension",
        }
    }
}

/// Why decoding stopped, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: u64,
    pub reason: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// Decodes values one after another from `bytes` (a concatenation of msgpack documents).
pub struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Values left for the current top-level value.
    budget: usize,
    max_nodes: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder over `bytes`; each top-level value may hold at most `max_nodes` values.
    pub fn new(bytes: &'a [u8], max_nodes: usize) -> Self {
        Decoder {
            bytes,
            pos: 0,
            budget: 0,
            max_nodes,
        }
    }

    /// Offset of the next byte to decode.
    pub fn position(&self) -> u64 {
        self.pos as u64
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// The next top-level value, or None at the end of the input.
    pub fn next_value(&mut self) -> Option<Result<Node, DecodeError>> {
        if self.at_end() {
            return None;
        }
        self.budget = self.max_nodes;
        let start = self.pos;
        let r = self.value(0);
        if r.is_err() {
            // Nothing after a malformed value can be trusted: stop here.
            self.pos = self.bytes.len();
        }
        debug_assert!(r.is_err() || self.pos > start);
        Some(r)
    }

    fn err<T>(&self, offset: usize, reason: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            offset: offset as u64,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        match start.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                self.pos = end;
                Ok(&self.bytes[start..end])
            }
            _ => self.err(
                start,
                format!(
                    "truncated: {what} needs {n} bytes, {} left",
                    self.bytes.len() - start.min(self.bytes.len())
                ),
            ),
        }
    }

    fn uint(&mut self, n: usize, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(n, what)?;
        Ok(b.iter().fold(0u64, |acc, &x| acc << 8 | x as u64))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn value(&mut self, depth: usize) -> Result<Node, DecodeError> {
        let offset = self.pos;
        if self.budget == 0 {
            return self.err(
                offset,
                format!("more than {} values in one top-level value", self.max_nodes),
            );
        }
        self.budget -= 1;
        let tag = self.take(1, "a value")?[0];
        let value = match tag {
            0x00..=0x7f => Value::Int(tag as i128),
            0x80..=0x8f => self.map((tag & 0x0f) as usize, depth, offset)?,
            0x90..=0x9f => self.array((tag & 0x0f) as usize, depth, offset)?,
            0xa0..=0xbf => self.str((tag & 0x1f) as usize, offset)?,
            0xc0 => Value::Nil,
            0xc1 => return self.err(offset, "byte 0xc1 is never used in msgpack"),
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.uint(1 << (tag - 0xc4), "a binary length")? as usize;
                Value::Bin(self.take(n, "binary data")?.to_vec())
            }
            0xc7..=0xc9 => {
                let n = self.uint(1 << (tag - 0xc7), "an extension length")? as usize;
                let t = self.take(1, "an extension type")?[0] as i8;
                Value::Ext(t, self.take(n, "extension data")?.to_vec())
            }
            0xca => Value::Float(f32::from_bits(self.uint(4, "a float32")? as u32) as f64),
            0xcb => Value::Float(f64::from_bits(self.uint(8, "a float64")?)),
            0xcc..=0xcf => Value::Int(self.uint(1 << (tag - 0xcc), "an unsigned integer")? as i128),
            0xd0..=0xd3 => {
                let n = 1usize << (tag - 0xd0);
                let u = self.uint(n, "a signed integer")?;
                let shift = 64 - 8 * n as u32;
                Value::Int(((u << shift) as i64 >> shift) as i128)
            }
            0xd4..=0xd8 => {
                let n = 1usize << (tag - 0xd4);
                let t = self.take(1, "an extension type")?[0] as i8;
                Value::Ext(t, self.take(n, "extension data")?.to_vec())
            }
            0xd9..=0xdb => {
                let n = self.uint(1 << (tag - 0xd9), "a string length")? as usize;
                self.str(n, offset)?
            }
            0xdc | 0xdd => {
                let n = self.uint(if tag == 0xdc { 2 } else { 4 }, "an array length")? as usize;
                self.array(n, depth, offset)?
            }
            0xde | 0xdf => {
                let n = self.uint(if tag == 0xde { 2 } else { 4 }, "a map length")? as usize;
                self.map(n, depth, offset)?
            }
            0xe0..=0xff => Value::Int((tag as i8) as i128),
        };
        Ok(Node {
            offset: offset as u64,
            value,
        })
    }

    fn str(&mut self, n: usize, offset: usize) -> Result<Value, DecodeError> {
        let b = self.take(n, "string data")?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.to_owned())),
            Err(e) => self.err(
                offset,
                format!("string is not UTF-8 (at byte {} of it)", e.valid_up_to()),
            ),
        }
    }

    fn check_len(
        &self,
        n: usize,
        min_bytes: usize,
        offset: usize,
        what: &str,
    ) -> Result<(), DecodeError> {
        if n.saturating_mul(min_bytes) > self.remaining() {
            return self.err(
                offset,
                format!(
                    "truncated: {what} of {n} entries, only {} bytes left",
                    self.remaining()
                ),
            );
        }
        Ok(())
    }

    fn array(&mut self, n: usize, depth: usize, offset: usize) -> Result<Value, DecodeError> {
        if depth >= MAX_DEPTH {
            return self.err(offset, format!("nested deeper than {MAX_DEPTH}"));
        }
        self.check_len(n, 1, offset, "an array")?;
        let mut items = Vec::with_capacity(n.min(self.budget));
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize, offset: usize) -> Result<Value, DecodeError> {
        if depth >= MAX_DEPTH {
            return self.err(offset, format!("nested deeper than {MAX_DEPTH}"));
        }
        self.check_len(n, 2, offset, "a map")?;
        let mut items = Vec::with_capacity(n.min(self.budget / 2));
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            items.push((k, v));
        }
        Ok(Value::Map(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Result<Value, DecodeError> {
        let mut d = Decoder::new(bytes, 1000);
        let v = d.next_value().expect("a value")?;
        assert!(d.at_end(), "trailing bytes");
        Ok(v.value)
    }

    #[test]
    fn scalars() {
        assert_eq!(one(&[0x00]).unwrap(), Value::Int(0));
        assert_eq!(one(&[0x7f]).unwrap(), Value::Int(127));
        assert_eq!(one(&[0xff]).unwrap(), Value::Int(-1));
        assert_eq!(one(&[0xe0]).unwrap(), Value::Int(-32));
        assert_eq!(one(&[0xcc, 0xff]).unwrap(), Value::Int(255));
        assert_eq!(one(&[0xcd, 0x01, 0x00]).unwrap(), Value::Int(256));
        assert_eq!(
            one(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap(),
            Value::Int(u64::MAX as i128)
        );
        assert_eq!(one(&[0xd0, 0x80]).unwrap(), Value::Int(-128));
        assert_eq!(one(&[0xd1, 0xff, 0x7f]).unwrap(), Value::Int(-129));
        assert_eq!(
            one(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            Value::Int(i64::MIN as i128)
        );
        assert_eq!(one(&[0xc0]).unwrap(), Value::Nil);
        assert_eq!(one(&[0xc3]).unwrap(), Value::Bool(true));
        assert_eq!(
            one(&[0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]).unwrap(),
            Value::Float(1.5)
        );
        assert_eq!(one(&[0xca, 0x3f, 0xc0, 0, 0]).unwrap(), Value::Float(1.5));
        assert_eq!(
            one(&[0xa3, b'G', b'P', b'U']).unwrap(),
            Value::Str("GPU".into())
        );
        assert_eq!(
            one(&[0xd9, 0x02, b'h', b'i']).unwrap(),
            Value::Str("hi".into())
        );
        assert_eq!(one(&[0xc4, 0x02, 1, 2]).unwrap(), Value::Bin(vec![1, 2]));
        assert_eq!(one(&[0xd4, 0x05, 9]).unwrap(), Value::Ext(5, vec![9]));
        assert_eq!(one(&[0xc7, 0x01, 0x05, 9]).unwrap(), Value::Ext(5, vec![9]));
    }

    #[test]
    fn containers_and_offsets() {
        // [1, {"a": nil}] then a second document "x".
        let bytes = [0x92, 0x01, 0x81, 0xa1, b'a', 0xc0, 0xa1, b'x'];
        let mut d = Decoder::new(&bytes, 100);
        let v = d.next_value().unwrap().unwrap();
        let Value::Array(items) = v.value else {
            panic!()
        };
        assert_eq!(items[0].offset, 1);
        assert_eq!(items[1].offset, 2);
        let Value::Map(m) = &items[1].value else {
            panic!()
        };
        assert_eq!(m[0].0.value, Value::Str("a".into()));
        assert_eq!(m[0].1.offset, 5);
        let x = d.next_value().unwrap().unwrap();
        assert_eq!((x.offset, x.value), (6, Value::Str("x".into())));
        assert!(d.next_value().is_none());
        // array16 and map16
        assert_eq!(
            one(&[0xdc, 0x00, 0x02, 0x01, 0x02]).unwrap(),
            Value::Array(vec![
                Node {
                    offset: 3,
                    value: Value::Int(1)
                },
                Node {
                    offset: 4,
                    value: Value::Int(2)
                }
            ])
        );
        assert!(matches!(one(&[0xde, 0x00, 0x00]).unwrap(), Value::Map(m) if m.is_empty()));
    }

    #[test]
    fn malformed() {
        let cases: Vec<(&[u8], u64, &str)> = vec![
            (
                &[0xcb, 0x3f],
                1,
                "truncated: a float64 needs 8 bytes, 1 left",
            ),
            (
                &[0x93, 0x01],
                0,
                "truncated: an array of 3 entries, only 1 bytes left",
            ),
            (
                &[0xdd, 0xff, 0xff, 0xff, 0xff],
                0,
                "truncated: an array of 4294967295",
            ),
            (
                &[0xdf, 0xff, 0xff, 0xff, 0xff],
                0,
                "truncated: a map of 4294967295",
            ),
            (
                &[0xc6, 0xff, 0xff, 0xff, 0xff],
                5,
                "truncated: binary data needs 4294967295",
            ),
            (&[0xc1], 0, "0xc1 is never used"),
            (&[0xa2, 0xff, 0xfe], 0, "not UTF-8"),
            (
                &[0x92, 0x01, 0xcd, 0x01],
                3,
                "truncated: an unsigned integer needs 2 bytes",
            ),
        ];
        for (bytes, offset, reason) in cases {
            let e = one(bytes).unwrap_err();
            assert_eq!(e.offset, offset, "{bytes:02x?}: {e}");
            assert!(e.reason.contains(reason), "{bytes:02x?}: {e}");
        }
        // Nesting and size limits.
        let deep = vec![0x91u8; 200];
        assert!(one(&deep).unwrap_err().reason.contains("nested deeper"));
        let wide: Vec<u8> = [0xdc, 0x07, 0xd0]
            .into_iter()
            .chain(std::iter::repeat_n(0x00, 2000))
            .collect();
        let e = one(&wide).unwrap_err();
        assert!(e.reason.contains("more than 1000 values"), "{e}");
        // After an error the decoder stops.
        let mut d = Decoder::new(&[0xc1, 0x01], 10);
        assert!(d.next_value().unwrap().is_err());
        assert!(d.next_value().is_none());
    }
}
