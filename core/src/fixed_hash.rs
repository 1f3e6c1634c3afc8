//! One fixed hash for maps keyed by a `u64` (an id, an offset, a prefix hash): no per-process
//! random keys as `std`'s default has (SipHash, which also cost a tenth of a simulated replay),
//! and both halves of the key folded in and spread, so that small counters and aligned offsets
//! (low bits all zero) still fill the buckets evenly. Nothing that iterates such a map may let
//! its order reach a result.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Clone, Copy, Debug, Default)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, v: u64) {
        let x = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ b as u64);
        }
    }
}

/// A `HashMap` keyed by `u64` with [`U64Hasher`].
pub type U64Map<V> = std::collections::HashMap<u64, V, BuildHasherDefault<U64Hasher>>;
