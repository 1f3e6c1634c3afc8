//! Chained block hashes over token ids, as vLLM chains them: the hash of block `i` covers the
//! hash of block `i - 1`, the block's tokens and its extra keys, so one hash names the whole
//! prefix through that block. Only full blocks are hashed.
//!
//! Two algorithms ([`HashAlgo`], by name with [`parse_hash_algo`]):
//! - `fast` (the default): gpumem's own function (deterministic, 64-bit, wyhash-style
//!   multiply-fold; [`hash_block`], [`extend_block_hashes`]). Equal prefixes give equal
//!   hashes on any machine, but the values are not vLLM's.
//! - `sha256_cbor`: vLLM 0.33's `prefix_caching_hash_algo="sha256_cbor"` byte for byte
//!   ([`Sha256Cbor`]): SHA-256 over the canonical CBOR encoding of the tuple
//!   `(parent digest, tuple(token ids), extra keys)`, with `NONE_HASH = sha256(cbor(seed))`
//!   as the parent of the first block (seed `"vllm-none-hash"`, or `PYTHONHASHSEED` when set).
//!   [`BlockHash::from_digest`] gives the value vLLM publishes in its KV events (the digest's
//!   last 8 bytes as a big-endian u64). vLLM's default `sha256` pickles the tuple instead,
//!   which is not reproduced.
//!
//! [`BlockHasher`] and [`ChainHash`] let an engine hash with either algorithm through one API.
//!
//! SHA-256 is the `sha2` crate's; the CBOR is `ciborium`'s, which writes every head in its
//! shortest form, as Python's `cbor2.dumps(canonical=True)` does for these types (canonical mode
//! only changes maps, floats and sets, which block hashes never contain).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The hash of a full block and, through chaining, of the whole prefix it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockHash(pub u64);

/// Identity hasher for keys that are already well-mixed 64-bit hashes.
#[derive(Default, Clone, Copy)]
pub struct HashKeyHasher(u64);

impl Hasher for HashKeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A map keyed by block hashes that uses them as they are: they are well mixed already.
pub type BlockHashMap<V> = HashMap<BlockHash, V, BuildHasherDefault<HashKeyHasher>>;

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

/// [`hash_block`] of the tokens `first, first + 1, …, first + len - 1` (prompts in the Mooncake
/// form are runs of consecutive token ids), computed without the tokens in memory. The run
/// must not pass `u32::MAX`.
#[inline]
pub fn hash_consecutive_block(
    parent: Option<BlockHash>,
    first: u32,
    len: usize,
    extra: u64,
) -> BlockHash {
    // vLLM's default block size, unrolled by the compiler (the same function of `len`).
    if len == 16 {
        consecutive_block(parent, first, 16, extra)
    } else {
        consecutive_block(parent, first, len, extra)
    }
}

#[inline(always)]
fn consecutive_block(parent: Option<BlockHash>, first: u32, len: usize, extra: u64) -> BlockHash {
    debug_assert!(first as u64 + len as u64 <= 1 << 32, "token ids past 2^32");
    let mut seed = parent.unwrap_or(NONE_HASH).0 ^ P0;
    let mut t = first as u64;
    // The words of tokens t..t + 4: (t | (t + 1) << 32, t + 2 | (t + 3) << 32). No token
    // passes 2^32, so each half is a sum that never carries into the other, and the next four
    // tokens' words are these plus 4 in each half.
    const FOUR: u64 = 4 | 4 << 32;
    let mut a = t | (t + 1) << 32;
    let mut b = a.wrapping_add(2 | 2 << 32);
    for _ in 0..len / 4 {
        seed = mum(a ^ P1, b ^ seed);
        a = a.wrapping_add(FOUR);
        b = b.wrapping_add(FOUR);
        t += 4;
    }
    let rest = len % 4;
    let (a, b) = match rest {
        0 => (0, 0),
        1 => (t, 0),
        2 => (t | (t + 1) << 32, 0),
        _ => (t | (t + 1) << 32, t + 2),
    };
    seed = mum(a ^ P2, b ^ seed ^ rest as u64);
    BlockHash(mum(seed ^ extra ^ P3, (len as u64) ^ P1))
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

/// [`hash_request_block`] of a block whose tokens are `first, first + 1, …` (see
/// [`hash_consecutive_block`]).
#[inline]
pub fn hash_request_consecutive_block(
    parent: Option<BlockHash>,
    block_index: usize,
    first: u32,
    len: usize,
    extra: &ExtraKeys,
) -> BlockHash {
    hash_consecutive_block(parent, first, len, extra.word(block_index))
}

/// Appends the hashes of `n` full blocks of `block_size` consecutive tokens each, the first
/// starting at token `first` (block `k` at `first + k × block_size`), chained after the last
/// hash in `hashes`: [`hash_request_consecutive_block`] of each block in turn, in one loop.
pub fn extend_consecutive_block_hashes(
    hashes: &mut Vec<BlockHash>,
    first: u32,
    block_size: usize,
    n: usize,
    extra: &ExtraKeys,
) {
    debug_assert!(
        first as u64 + (n * block_size) as u64 <= 1 << 32,
        "token ids past 2^32"
    );
    hashes.reserve(n);
    let mut parent = hashes.last().copied();
    let mut t = first;
    for _ in 0..n {
        let i = hashes.len();
        let words = extra.word(i);
        let h = if block_size == 16 {
            consecutive_block(parent, t, 16, words)
        } else {
            consecutive_block(parent, t, block_size, words)
        };
        hashes.push(h);
        parent = Some(h);
        t = t.wrapping_add(block_size as u32);
    }
}

/// [`extend_consecutive_block_hashes`] of two independent runs of `n` blocks each, together:
/// a chain's blocks wait on each other's multiplications, two chains' overlap.
pub fn extend_consecutive_block_hashes_pair(
    (a, first_a): (&mut Vec<BlockHash>, u32),
    (b, first_b): (&mut Vec<BlockHash>, u32),
    block_size: usize,
    n: usize,
    extra: &ExtraKeys,
) {
    debug_assert!(
        first_a.max(first_b) as u64 + (n * block_size) as u64 <= 1 << 32,
        "token ids past 2^32"
    );
    a.reserve(n);
    b.reserve(n);
    let (mut pa, mut pb) = (a.last().copied(), b.last().copied());
    let (mut ta, mut tb) = (first_a, first_b);
    for _ in 0..n {
        let (wa, wb) = (extra.word(a.len()), extra.word(b.len()));
        let (ha, hb) = if block_size == 16 {
            (
                consecutive_block(pa, ta, 16, wa),
                consecutive_block(pb, tb, 16, wb),
            )
        } else {
            (
                consecutive_block(pa, ta, block_size, wa),
                consecutive_block(pb, tb, block_size, wb),
            )
        };
        a.push(ha);
        b.push(hb);
        (pa, pb) = (Some(ha), Some(hb));
        ta = ta.wrapping_add(block_size as u32);
        tb = tb.wrapping_add(block_size as u32);
    }
}

/// [`extend_consecutive_block_hashes`] of four independent runs of `n` blocks each,
/// together: a chain waits on its multiplications, four chains keep the multiplier busy
/// (two still left it idle half the time).
pub fn extend_consecutive_block_hashes_quad(
    chains: [(&mut Vec<BlockHash>, u32); 4],
    block_size: usize,
    n: usize,
    extra: &ExtraKeys,
) {
    let [(a, ta), (b, tb), (c, tc), (d, td)] = chains;
    debug_assert!(
        ta.max(tb).max(tc).max(td) as u64 + (n * block_size) as u64 <= 1 << 32,
        "token ids past 2^32"
    );
    let mut out = [a, b, c, d];
    let mut t = [ta, tb, tc, td];
    let mut parent = [None; 4];
    for (p, v) in parent.iter_mut().zip(out.iter_mut()) {
        v.reserve(n);
        *p = v.last().copied();
    }
    for _ in 0..n {
        let w: [u64; 4] = std::array::from_fn(|i| extra.word(out[i].len()));
        let h: [BlockHash; 4] = if block_size == 16 {
            std::array::from_fn(|i| consecutive_block(parent[i], t[i], 16, w[i]))
        } else {
            std::array::from_fn(|i| consecutive_block(parent[i], t[i], block_size, w[i]))
        };
        for i in 0..4 {
            out[i].push(h[i]);
            parent[i] = Some(h[i]);
            t[i] = t[i].wrapping_add(block_size as u32);
        }
    }
}

/// Which function chains block hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgo {
    /// gpumem's own 64-bit hash (not vLLM's values).
    #[default]
    Fast,
    /// vLLM's `sha256_cbor`, byte for byte.
    Sha256Cbor,
}

impl HashAlgo {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Fast => "fast",
            HashAlgo::Sha256Cbor => "sha256_cbor",
        }
    }
}

impl std::fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The hash algorithm named `name`: `fast` or `sha256_cbor` (also `sha256-cbor`).
pub fn parse_hash_algo(name: &str) -> Result<HashAlgo, String> {
    match name.trim().to_ascii_lowercase().as_str() {
        "fast" | "gpumem" => Ok(HashAlgo::Fast),
        "sha256_cbor" | "sha256-cbor" => Ok(HashAlgo::Sha256Cbor),
        "sha256" | "xxhash" | "xxhash_cbor" => Err(format!(
            "hash algorithm {name:?} (vLLM's, over Python pickles or xxh3) is not reproduced; \
             use sha256_cbor for vLLM's exact hash values, or fast"
        )),
        _ => Err(format!(
            "unknown hash algorithm {name:?} (expected fast or sha256_cbor)"
        )),
    }
}

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// vLLM's `DEFAULT_NONE_HASH_SEED`: the seed of `NONE_HASH` for its SHA-256 algorithms when
/// `PYTHONHASHSEED` is not set.
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

impl BlockHash {
    /// The hash vLLM publishes in KV events for a digest (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`,
    /// on by default): `int.from_bytes(digest, "big") & (2**64 - 1)`, i.e. its last 8 bytes.
    pub fn from_digest(digest: &[u8]) -> BlockHash {
        let tail = &digest[digest.len().saturating_sub(8)..];
        BlockHash(tail.iter().fold(0u64, |acc, &b| acc << 8 | b as u64))
    }
}

/// vLLM 0.33's extra keys of a request, as strings (what [`Sha256Cbor`] hashes): the LoRA
/// adapter enters every block as `("lora", name, path)`, a non-empty cache salt the first
/// block as `("cache_salt", salt)`; the block's extra keys are the tuple of those that apply,
/// or `None`. Multimodal and prompt-embedding keys are not modelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VllmExtraKeys<'a> {
    /// LoRA name and path.
    pub lora: Option<(&'a str, &'a str)>,
    pub cache_salt: Option<&'a str>,
}

impl<'a> VllmExtraKeys<'a> {
    pub const NONE: VllmExtraKeys<'static> = VllmExtraKeys {
        lora: None,
        cache_salt: None,
    };

    fn salt_applies(&self, block_index: usize) -> Option<&'a str> {
        self.cache_salt
            .filter(|s| block_index == 0 && !s.is_empty())
    }

    /// The same keys for the `fast` algorithm ([`ExtraKeys`]).
    pub fn fast(&self) -> ExtraKeys {
        ExtraKeys {
            lora: self.lora.map(|(name, path)| {
                let mut b = Vec::with_capacity(name.len() + path.len() + 1);
                b.extend_from_slice(name.as_bytes());
                b.push(0);
                b.extend_from_slice(path.as_bytes());
                hash_bytes(&b)
            }),
            cache_salt: self
                .cache_salt
                .filter(|s| !s.is_empty())
                .map(|s| hash_bytes(s.as_bytes())),
        }
    }
}

/// vLLM's `sha256_cbor` block hash, with its `NONE_HASH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sha256Cbor {
    none_hash: Digest,
}

impl Default for Sha256Cbor {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Cbor {
    /// vLLM's default: `NONE_HASH = sha256(cbor("vllm-none-hash"))` (`PYTHONHASHSEED` unset).
    pub fn new() -> Self {
        Self::with_seed(DEFAULT_NONE_HASH_SEED)
    }

    /// `NONE_HASH` from the seed string, as vLLM derives it when `PYTHONHASHSEED=seed`.
    pub fn with_seed(seed: &str) -> Self {
        Sha256Cbor {
            none_hash: sha256_of_cbor(&seed),
        }
    }

    /// The parent of every first block.
    pub fn none_hash(&self) -> &Digest {
        &self.none_hash
    }

    /// vLLM's `hash_block_tokens(sha256_cbor, parent, tokens, extra_keys)` for block
    /// `block_index` of a request (the index decides whether the cache salt applies).
    pub fn hash_block(
        &self,
        parent: Option<&Digest>,
        block_index: usize,
        tokens: &[u32],
        extra: &VllmExtraKeys<'_>,
    ) -> Digest {
        sha256_of_cbor(&self.hashed_tuple(parent, block_index, tokens, extra))
    }

    /// The value vLLM hashes for a block: `(parent digest, tuple(tokens), extra keys)`.
    fn hashed_tuple<'a>(
        &'a self,
        parent: Option<&'a Digest>,
        block_index: usize,
        tokens: &'a [u32],
        extra: &VllmExtraKeys<'a>,
    ) -> HashedBlock<'a> {
        HashedBlock {
            parent: parent.unwrap_or(&self.none_hash),
            tokens,
            lora: extra.lora,
            cache_salt: extra.salt_applies(block_index),
        }
    }

    /// Appends the digests of the full blocks of `tokens` that `digests` does not cover yet
    /// (vLLM's request block hasher: append-only, full blocks only).
    pub fn extend(
        &self,
        digests: &mut Vec<Digest>,
        tokens: &[u32],
        block_size: usize,
        extra: &VllmExtraKeys<'_>,
    ) {
        let mut start = digests.len() * block_size;
        while block_size > 0 && start + block_size <= tokens.len() {
            let i = digests.len();
            let d = self.hash_block(digests.last(), i, &tokens[start..start + block_size], extra);
            digests.push(d);
            start += block_size;
        }
    }
}

/// What vLLM's `sha256_cbor` hashes for one block, serialised as cbor2 serialises the Python
/// tuple: an array of the parent as a byte string, the tokens as an array of integers, and the
/// extra keys (`None`, or a tuple of `("lora", name, path)` and `("cache_salt", salt)`).
struct HashedBlock<'a> {
    parent: &'a [u8],
    tokens: &'a [u32],
    lora: Option<(&'a str, &'a str)>,
    cache_salt: Option<&'a str>,
}

/// A CBOR byte string (serde would write a `&[u8]` as an array of integers).
struct CborBytes<'a>(&'a [u8]);

impl Serialize for CborBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// vLLM's extra keys of one block: `None` or the tuple of those that apply.
struct CborExtraKeys<'a> {
    lora: Option<(&'a str, &'a str)>,
    cache_salt: Option<&'a str>,
}

impl Serialize for CborExtraKeys<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.lora.is_some() as usize + self.cache_salt.is_some() as usize;
        if n == 0 {
            return s.serialize_none();
        }
        let mut t = s.serialize_tuple(n)?;
        if let Some((name, path)) = self.lora {
            t.serialize_element(&("lora", name, path))?;
        }
        if let Some(salt) = self.cache_salt {
            t.serialize_element(&("cache_salt", salt))?;
        }
        t.end()
    }
}

impl Serialize for HashedBlock<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&CborBytes(self.parent))?;
        t.serialize_element(self.tokens)?;
        t.serialize_element(&CborExtraKeys {
            lora: self.lora,
            cache_salt: self.cache_salt,
        })?;
        t.end()
    }
}

/// Feeds the encoder's output straight into the hash, without building the bytes.
struct HashSink<'a>(&'a mut Sha256);

impl std::io::Write for HashSink<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of the canonical CBOR of `value`.
fn sha256_of_cbor(value: &impl Serialize) -> Digest {
    let mut h = Sha256::new();
    // Writing into a hash cannot fail, and these values always serialise.
    ciborium::into_writer(value, HashSink(&mut h)).expect("CBOR into a hash");
    h.finalize().into()
}

/// A block hash in full, as the chain needs it: the `fast` 64-bit value, or the SHA-256 digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainHash {
    Fast(BlockHash),
    Sha256(Digest),
}

impl ChainHash {
    /// The 64-bit key the pool and the events use.
    #[inline]
    pub fn block_hash(&self) -> BlockHash {
        match self {
            ChainHash::Fast(h) => *h,
            ChainHash::Sha256(d) => BlockHash::from_digest(d),
        }
    }
}

/// One block hasher for either algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockHasher {
    Fast,
    Sha256Cbor(Sha256Cbor),
}

impl BlockHasher {
    /// The algorithm with vLLM's default `NONE_HASH` seed.
    pub fn new(algo: HashAlgo) -> Self {
        match algo {
            HashAlgo::Fast => BlockHasher::Fast,
            HashAlgo::Sha256Cbor => BlockHasher::Sha256Cbor(Sha256Cbor::new()),
        }
    }

    pub fn algo(&self) -> HashAlgo {
        match self {
            BlockHasher::Fast => HashAlgo::Fast,
            BlockHasher::Sha256Cbor(_) => HashAlgo::Sha256Cbor,
        }
    }

    /// Hash of block `block_index` given its parent's full hash (None for the first block).
    /// Panics when the parent came from the other algorithm.
    pub fn hash_block(
        &self,
        parent: Option<&ChainHash>,
        block_index: usize,
        tokens: &[u32],
        extra: &VllmExtraKeys<'_>,
    ) -> ChainHash {
        match self {
            BlockHasher::Fast => {
                let p = parent.map(|p| match p {
                    ChainHash::Fast(h) => *h,
                    ChainHash::Sha256(_) => panic!("a sha256_cbor parent for the fast hasher"),
                });
                ChainHash::Fast(hash_request_block(p, block_index, tokens, &extra.fast()))
            }
            BlockHasher::Sha256Cbor(h) => {
                let p = parent.map(|p| match p {
                    ChainHash::Sha256(d) => d,
                    ChainHash::Fast(_) => panic!("a fast parent for the sha256_cbor hasher"),
                });
                ChainHash::Sha256(h.hash_block(p, block_index, tokens, extra))
            }
        }
    }
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

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Values computed with vLLM 0.33.0's own `vllm.utils.hashing.sha256_cbor` (cbor2 6.3,
    /// canonical=True) on the same Python values.
    #[test]
    fn sha256_cbor_matches_vllm() {
        let h = Sha256Cbor::new();
        assert_eq!(
            hex(h.none_hash()),
            "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
        );
        let b0 = h.hash_block(None, 0, &[1, 2, 3, 4], &VllmExtraKeys::NONE);
        assert_eq!(
            hex(&b0),
            "58d0879dff3800f65f8c5fd449d73048c0f7699dd238a03b84b146b151d55111"
        );
        assert_eq!(
            BlockHash::from_digest(&b0),
            BlockHash(0x84b1_46b1_51d5_5111)
        );
        let b1 = h.hash_block(Some(&b0), 1, &[5, 6, 7, 8], &VllmExtraKeys::NONE);
        assert_eq!(
            hex(&b1),
            "e1bc29393a2da9fd798f35ff04d215f846aee6df4b803ce3d43b57df56b58fb1"
        );
        let wide = h.hash_block(
            None,
            0,
            &[0, 23, 24, 255, 256, 65535, 65536, u32::MAX],
            &VllmExtraKeys::NONE,
        );
        assert_eq!(
            hex(&wide),
            "deaa46fcabbf6b126d28ad1292550fb894177c76c7b8e270e04824cbf674d83f"
        );
        let long: Vec<u32> = (100..124).collect();
        assert_eq!(
            hex(&h.hash_block(None, 0, &long, &VllmExtraKeys::NONE)),
            "4100327c81de908bc85378ee3ed53eb3a25961ff3cad70b6f45a8a2973426f63"
        );
        // Extra keys: LoRA on every block, the salt on the first only.
        let keys = VllmExtraKeys {
            lora: Some(("adapter-a", "/models/a")),
            cache_salt: Some("tenant-1"),
        };
        let l0 = h.hash_block(None, 0, &[1, 2, 3, 4], &keys);
        assert_eq!(
            hex(&l0),
            "1601aba86f5534d3e6e2d8f63a287170fb71c245c10070cb68a70bc8f93f6b34"
        );
        assert_eq!(
            hex(&h.hash_block(Some(&l0), 1, &[5, 6, 7, 8], &keys)),
            "47607f64aa620740eca389815566bc1b2c993fd5e0915a7b85cf52cd2e54de86"
        );
        let salt = VllmExtraKeys {
            lora: None,
            cache_salt: Some("tenant-1"),
        };
        assert_eq!(
            hex(&h.hash_block(None, 0, &[1, 2, 3, 4], &salt)),
            "661fd7e0daba8647d1ebef0b2b242e2db6c40bfc5520c31d046e0b71bef06cf3"
        );
        // PYTHONHASHSEED=42.
        assert_eq!(
            hex(Sha256Cbor::with_seed("42").none_hash()),
            "9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780"
        );
        // The encoding hashed is exactly cbor2's.
        let mut enc = Vec::new();
        let tuple = h.hashed_tuple(None, 0, &[1, 2, 3, 4], &VllmExtraKeys::NONE);
        ciborium::into_writer(&tuple, &mut enc).unwrap();
        assert_eq!(
            hex(&enc),
            "8358209bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef08401020304f6"
        );
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&enc)), b0);
        // Integer heads in their shortest form, at every width boundary.
        let mut wide_enc = Vec::new();
        ciborium::into_writer(
            &[0u32, 23, 24, 255, 256, 65535, 65536, u32::MAX],
            &mut wide_enc,
        )
        .unwrap();
        assert_eq!(
            hex(&wide_enc),
            "880017181818ff19010019ffff1a000100001affffffff"
        );
    }

    #[test]
    fn chain_hashers_and_names() {
        let toks: Vec<u32> = (1..=12).collect();
        let mut d = Vec::new();
        Sha256Cbor::new().extend(&mut d, &toks[..9], 4, &VllmExtraKeys::NONE);
        assert_eq!(d.len(), 2);
        Sha256Cbor::new().extend(&mut d, &toks, 4, &VllmExtraKeys::NONE);
        assert_eq!(d.len(), 3);
        for algo in [HashAlgo::Fast, HashAlgo::Sha256Cbor] {
            let hasher = BlockHasher::new(algo);
            assert_eq!(hasher.algo(), algo);
            assert_eq!(parse_hash_algo(algo.name()), Ok(algo));
            let mut parent = None;
            let mut got = Vec::new();
            for (i, c) in toks.chunks(4).enumerate() {
                let h = hasher.hash_block(parent.as_ref(), i, c, &VllmExtraKeys::NONE);
                got.push(h.block_hash());
                parent = Some(h);
            }
            let want: Vec<BlockHash> = match algo {
                HashAlgo::Fast => {
                    let mut v = Vec::new();
                    extend_block_hashes(&mut v, &toks, 4, &ExtraKeys::NONE);
                    v
                }
                HashAlgo::Sha256Cbor => d.iter().map(|x| BlockHash::from_digest(x)).collect(),
            };
            assert_eq!(got, want);
        }
        assert!(parse_hash_algo("sha256").is_err());
        assert!(parse_hash_algo("md5").is_err());
        assert_eq!(parse_hash_algo("SHA256-CBOR"), Ok(HashAlgo::Sha256Cbor));
        assert_eq!(BlockHash::from_digest(&[1, 2]), BlockHash(0x0102));
    }
}

#[cfg(test)]
mod consecutive_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A run of consecutive tokens hashes as the same tokens in memory.
        #[test]
        fn a_consecutive_run_hashes_as_its_tokens(
            parent in proptest::option::of(any::<u64>().prop_map(BlockHash)),
            first in prop_oneof![0u32..1000, (u32::MAX - 64)..(u32::MAX - 40)],
            len in prop_oneof![Just(16usize), 0usize..40],
            extra in any::<u64>(),
        ) {
            let tokens: Vec<u32> = (0..len as u32).map(|k| first + k).collect();
            prop_assert_eq!(
                hash_consecutive_block(parent, first, len, extra),
                hash_block(parent, &tokens, extra)
            );
        }

        /// Blocks of a consecutive run hash as the request's blocks one by one.
        #[test]
        fn consecutive_runs_extend_as_block_by_block(
            start in proptest::collection::vec(any::<u64>().prop_map(BlockHash), 0..3),
            first in 0u32..100_000,
            bs in prop_oneof![Just(16usize), 1usize..40],
            n in 0usize..6,
            lora in proptest::option::of(any::<u64>()),
            salt in proptest::option::of(any::<u64>()),
        ) {
            let extra = ExtraKeys { lora, cache_salt: salt };
            let mut got = start.clone();
            extend_consecutive_block_hashes(&mut got, first, bs, n, &extra);
            let mut want = start.clone();
            for k in 0..n {
                let i = want.len();
                let parent = want.last().copied();
                let t = first + (k * bs) as u32;
                want.push(hash_request_consecutive_block(parent, i, t, bs, &extra));
            }
            prop_assert_eq!(&got, &want);
            // Paired with another run, each comes out the same.
            let mut other = vec![BlockHash(7)];
            let mut other_want = other.clone();
            extend_consecutive_block_hashes(&mut other_want, first / 2, bs, n, &extra);
            let mut paired = start.clone();
            extend_consecutive_block_hashes_pair(
                (&mut paired, first),
                (&mut other, first / 2),
                bs,
                n,
                &extra,
            );
            prop_assert_eq!(&paired, &want);
            prop_assert_eq!(other, other_want);
            // Four together: each comes out the same.
            let starts = [first, first / 2, first / 3, first + 7];
            let mut four: [Vec<BlockHash>; 4] =
                [start.clone(), vec![BlockHash(7)], Vec::new(), vec![BlockHash(1), BlockHash(2)]];
            let wants: Vec<Vec<BlockHash>> = four
                .iter()
                .zip(starts)
                .map(|(v, t)| {
                    let mut w = v.clone();
                    extend_consecutive_block_hashes(&mut w, t, bs, n, &extra);
                    w
                })
                .collect();
            let [v0, v1, v2, v3] = &mut four;
            extend_consecutive_block_hashes_quad(
                [(v0, starts[0]), (v1, starts[1]), (v2, starts[2]), (v3, starts[3])],
                bs,
                n,
                &extra,
            );
            prop_assert_eq!(&four[0], &want);
            prop_assert_eq!(four.to_vec(), wants);
        }
    }
}
