//! Chained block hashes over token ids, as vLLM chains them: the hash of block `i` covers the
//! hash of block `i - 1`, the block's tokens and its extra keys, so one hash names the whole
//! prefix through that block. Only full blocks are hashed.
//!
//! The hash function itself is gpumem's own (fast, deterministic, 64-bit, wyhash-style
//! multiply-fold), not vLLM's SHA-256 over pickle/CBOR: equal prefixes give equal hashes on
//! any machine, but the values differ from the ones in vLLM's KV events. (vLLM's
//! `sha256_cbor` byte format is not reproduced here.)

use serde::{Deserialize, Serialize};

/// The hash of a full block and, through chaining, of the whole prefix it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockHash(pub u64);

/// Extra keys that enter a block's hash besides its tokens, as vLLM 0.33 orders them
/// (LoRA first, then the cache salt). Multimodal and prompt-embedding keys are not modelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraKeys {
    /// The LoRA adapter (name and path hashed by the caller, e.g. with [`hash_bytes`]); enters
    /// every block of the request.
    pub lora: Option<u64>,
    /// The request's cache salt (hashed by the caller); enters only the first block.
    pub cache_salt: Option<u64>,
}

impl ExtraKeys {
    pub const NONE: ExtraKeys = ExtraKeys {
        lora: None,
        cache_salt: None,
    };

    /// The word mixed into block `block_index`'s hash (0 when no key applies).
    #[inline]
    fn word(&self, block_index: usize) -> u64 {
        let mut w = 0u64;
        if let Some(l) = self.lora {
            w = mum(l ^ P0, TAG_LORA);
        }
        if block_index == 0 {
            if let Some(s) = self.cache_salt {
                w = mum(w ^ s ^ P1, TAG_SALT);
            }
        }
        w
    }
}

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;
const P3: u64 = 0x5899_65cc_7537_4cc3;
const TAG_LORA: u64 = 0x1d8e_4e27_c47d_124f;
const TAG_SALT: u64 = 0x2f1c_8d4e_7a59_63b1;
/// The parent of the first block (vLLM's `NONE_HASH` plays this role).
pub const NONE_HASH: BlockHash = BlockHash(0x6b1e_89d7_1198_066b);

#[inline]
fn mum(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Hash of one full block given its parent's hash (`None` for the first block).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32], extra: u64) -> BlockHash {
    let mut seed = parent.unwrap_or(NONE_HASH).0 ^ P0;
    let mut chunks = tokens.chunks_exact(4);
    for c in &mut chunks {
        let a = c[0] as u64 | (c[1] as u64) << 32;
        let b = c[2] as u64 | (c[3] as u64) << 32;
        seed = mum(a ^ P1, b ^ seed);
    }
    let rest = chunks.remainder();
    let mut a = 0u64;
    let mut b = 0u64;
    for (i, &t) in rest.iter().enumerate() {
        match i {
            0 => a = t as u64,
            1 => a |= (t as u64) << 32,
            _ => b = t as u64,
        }
    }
    seed = mum(a ^ P2, b ^ seed ^ rest.len() as u64);
    BlockHash(mum(seed ^ extra ^ P3, (tokens.len() as u64) ^ P1))
}

/// Hash of arbitrary bytes (for LoRA names and cache salts), deterministic on every machine.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut seed = P3 ^ bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(16);
    for c in &mut chunks {
        let a = u64::from_le_bytes(c[..8].try_into().unwrap());
        let b = u64::from_le_bytes(c[8..].try_into().unwrap());
        seed = mum(a ^ P1, b ^ seed);
    }
    let mut tail = [0u8; 16];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    let a = u64::from_le_bytes(tail[..8].try_into().unwrap());
    let b = u64::from_le_bytes(tail[8..].try_into().unwrap());
    mum(mum(a ^ P2, b ^ seed) ^ P0, P3)
}

/// Appends the hashes of the full blocks of `tokens` that `hashes` does not cover yet (vLLM's
/// request block hasher: append-only, full blocks only). `tokens` are all the request's tokens
/// so far (prompt and output).
pub fn extend_block_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    block_size: usize,
    extra: &ExtraKeys,
) {
    let mut start = hashes.len() * block_size;
    while start + block_size <= tokens.len() {
        let i = hashes.len();
        let parent = hashes.last().copied();
        hashes.push(hash_block(
            parent,
            &tokens[start..start + block_size],
            extra.word(i),
        ));
        start += block_size;
    }
}

/// Hash of block `block_index` of a request, for callers that produce tokens block by block.
pub fn hash_request_block(
    parent: Option<BlockHash>,
    block_index: usize,
    tokens: &[u32],
    extra: &ExtraKeys,
) -> BlockHash {
    hash_block(parent, tokens, extra.word(block_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_and_deterministic() {
        let toks: Vec<u32> = (1..=12).collect();
        let mut a = Vec::new();
        extend_block_hashes(&mut a, &toks, 4, &ExtraKeys::NONE);
        assert_eq!(a.len(), 3);
        let mut b = Vec::new();
        extend_block_hashes(&mut b, &toks[..9], 4, &ExtraKeys::NONE);
        assert_eq!(b.len(), 2);
        extend_block_hashes(&mut b, &toks, 4, &ExtraKeys::NONE);
        assert_eq!(a, b);
        // Same block content after a different prefix hashes differently.
        let other: Vec<u32> = [9, 9, 9, 9].iter().chain(&toks[4..8]).copied().collect();
        let mut c = Vec::new();
        extend_block_hashes(&mut c, &other, 4, &ExtraKeys::NONE);
        assert_ne!(c[1], a[1]);
        // Pinned value: the hash must not change across machines or releases silently.
        assert_eq!(a[0], hash_block(None, &[1, 2, 3, 4], 0));
        assert_eq!(a[0], BlockHash(0xe947_2443_bd88_52f9));
        assert_ne!(
            hash_block(None, &[1, 2, 3], 0),
            hash_block(None, &[1, 2, 3, 0], 0)
        );
    }

    #[test]
    fn extra_keys() {
        let toks: Vec<u32> = (1..=8).collect();
        let mut plain = Vec::new();
        extend_block_hashes(&mut plain, &toks, 4, &ExtraKeys::NONE);
        let salt = ExtraKeys {
            lora: None,
            cache_salt: Some(hash_bytes(b"tenant-a")),
        };
        let mut salted = Vec::new();
        extend_block_hashes(&mut salted, &toks, 4, &salt);
        assert_ne!(plain[0], salted[0]);
        // Block 1 differs only through its parent.
        assert_eq!(
            salted[1],
            hash_block(Some(salted[0]), &toks[4..], 0),
            "the salt enters only the first block"
        );
        let lora = ExtraKeys {
            lora: Some(hash_bytes(b"adapter")),
            cache_salt: None,
        };
        let mut l = Vec::new();
        extend_block_hashes(&mut l, &toks, 4, &lora);
        assert_ne!(l[1], hash_block(Some(l[0]), &toks[4..], 0));
        assert_ne!(hash_bytes(b"a"), hash_bytes(b"b"));
    }
}
