//! The subset of CBOR (RFC 8949) that vLLM's `sha256_cbor` block hashes serialise, written as
//! Python's `cbor2.dumps(obj, canonical=True)` writes these types: every head in its shortest
//! form; `int` as major type 0 (non-negative) or 1 (negative); `bytes` as a byte string;
//! `str` as a UTF-8 text string; `tuple` / `list` as a definite-length array; `None` as
//! `0xf6`; `bool` as `0xf4` / `0xf5`. (Canonical mode only changes maps, floats and sets,
//! which block hashes never contain; integers beyond 64 bits, which would be bignums, do not
//! occur either.)
//!
//! The encoder writes into any [`Sink`], so a hash can be fed without building the bytes.

use super::sha256::Sha256;

/// Where encoded bytes go.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Sha256 {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

pub const MAJOR_UINT: u8 = 0;
pub const MAJOR_NINT: u8 = 1;
pub const MAJOR_BYTES: u8 = 2;
pub const MAJOR_TEXT: u8 = 3;
pub const MAJOR_ARRAY: u8 = 4;
pub const NULL: u8 = 0xf6;

/// A head: major type and argument, shortest form.
#[inline]
pub fn write_head(out: &mut impl Sink, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.put(&[m | n as u8]);
    } else if n <= 0xff {
        out.put(&[m | 24, n as u8]);
    } else if n <= 0xffff {
        let b = (n as u16).to_be_bytes();
        out.put(&[m | 25, b[0], b[1]]);
    } else if n <= 0xffff_ffff {
        let b = (n as u32).to_be_bytes();
        out.put(&[m | 26, b[0], b[1], b[2], b[3]]);
    } else {
        let b = n.to_be_bytes();
        out.put(&[m | 27, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
}

#[inline]
pub fn write_uint(out: &mut impl Sink, n: u64) {
    write_head(out, MAJOR_UINT, n);
}

#[inline]
pub fn write_int(out: &mut impl Sink, n: i64) {
    if n >= 0 {
        write_head(out, MAJOR_UINT, n as u64);
    } else {
        write_head(out, MAJOR_NINT, !(n as u64));
    }
}

pub fn write_bytes(out: &mut impl Sink, b: &[u8]) {
    write_head(out, MAJOR_BYTES, b.len() as u64);
    out.put(b);
}

pub fn write_text(out: &mut impl Sink, s: &str) {
    write_head(out, MAJOR_TEXT, s.len() as u64);
    out.put(s.as_bytes());
}

#[inline]
pub fn write_array_head(out: &mut impl Sink, len: usize) {
    write_head(out, MAJOR_ARRAY, len as u64);
}

#[inline]
pub fn write_null(out: &mut impl Sink) {
    out.put(&[NULL]);
}

/// A Python value of the kinds block hashes are made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i64),
    UInt(u64),
    Bytes(&'a [u8]),
    Text(&'a str),
    /// A tuple or a list.
    Array(Vec<Value<'a>>),
    Bool(bool),
    None,
}

impl Value<'_> {
    pub fn encode(&self, out: &mut impl Sink) {
        match self {
            Value::Int(n) => write_int(out, *n),
            Value::UInt(n) => write_uint(out, *n),
            Value::Bytes(b) => write_bytes(out, b),
            Value::Text(s) => write_text(out, s),
            Value::Array(items) => {
                write_array_head(out, items.len());
                for v in items {
                    v.encode(out);
                }
            }
            Value::Bool(b) => out.put(&[if *b { 0xf5 } else { 0xf4 }]),
            Value::None => write_null(out),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8949 Appendix A examples (and cbor2's output for the same Python values).
    #[test]
    fn rfc_examples() {
        let cases: Vec<(Value, &[u8])> = vec![
            (Value::Int(0), &[0x00]),
            (Value::Int(23), &[0x17]),
            (Value::Int(24), &[0x18, 0x18]),
            (Value::Int(255), &[0x18, 0xff]),
            (Value::Int(256), &[0x19, 0x01, 0x00]),
            (Value::Int(65535), &[0x19, 0xff, 0xff]),
            (Value::Int(65536), &[0x1a, 0x00, 0x01, 0x00, 0x00]),
            (Value::Int(1_000_000), &[0x1a, 0x00, 0x0f, 0x42, 0x40]),
            (
                Value::UInt(1_000_000_000_000),
                &[0x1b, 0x00, 0x00, 0x00, 0xe8, 0xd4, 0xa5, 0x10, 0x00],
            ),
            (
                Value::UInt(u64::MAX),
                &[0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (Value::Int(-1), &[0x20]),
            (Value::Int(-100), &[0x38, 0x63]),
            (Value::Int(-1000), &[0x39, 0x03, 0xe7]),
            (
                Value::Int(i64::MIN),
                &[0x3b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (Value::Bool(false), &[0xf4]),
            (Value::Bool(true), &[0xf5]),
            (Value::None, &[0xf6]),
            (Value::Bytes(&[]), &[0x40]),
            (Value::Bytes(&[1, 2, 3, 4]), &[0x44, 1, 2, 3, 4]),
            (Value::Text(""), &[0x60]),
            (Value::Text("a"), &[0x61, 0x61]),
            (Value::Text("\u{fc}"), &[0x62, 0xc3, 0xbc]),
            (Value::Array(vec![]), &[0x80]),
            (
                Value::Array(vec![
                    Value::Int(1),
                    Value::Array(vec![Value::Int(2), Value::Int(3)]),
                ]),
                &[0x82, 0x01, 0x82, 0x02, 0x03],
            ),
        ];
        for (v, want) in cases {
            assert_eq!(v.to_vec(), want, "{v:?}");
        }
        let long: Vec<Value> = (1..=25).map(Value::Int).collect();
        let enc = Value::Array(long).to_vec();
        assert_eq!(&enc[..3], &[0x98, 0x19, 0x01]);
        assert_eq!(&enc[enc.len() - 2..], &[0x18, 0x19]);
    }
}
