//! The byte pattern a block is filled with: a pure function of (seed, byte offset within the
//! block), so that any part of a block can be written or checked on its own, on the host or
//! through a staging buffer in chunks, and a block that was moved still holds the same bytes.
//!
//! Word `i` of a block (bytes `8i .. 8i + 8`, little endian) is `f(key ^ i)`, where `key` is
//! the seed passed through the splitmix64 finalizer and `f` is a one-multiply bijection
//! (multiply by an odd constant, then xor-shift). Distinct indexes give distinct words, distinct
//! seeds distinct keys, so neighbouring seeds (the executor seeds by allocation id) give
//! unrelated streams, and a block shifted by any number of bytes no longer matches itself. One
//! multiply per word keeps it fast (a splitmix64 output per word ran at less than half the
//! speed); detecting a wrong byte needs no more mixing than that. Slices may start at any byte offset and have any length.

/// Size of the host staging buffer devices that cannot address memory directly work through.
pub const STAGING_BYTES: usize = 8 << 20;

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const ONES: u64 = 0x0101_0101_0101_0101;

#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stream's starting state for `seed`.
#[inline(always)]
fn key(seed: u64) -> u64 {
    mix(seed ^ 0x5851_f42d_4c95_7f2d)
}

#[inline(always)]
fn word_at(key: u64, index: u64) -> u64 {
    let x = (key ^ index).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 29)
}

/// Number of bytes of `v` that are not zero.
#[inline(always)]
fn nonzero_bytes(v: u64) -> u64 {
    // The high bit of every byte of `t` is set iff that byte of `v` is not zero; the addition
    // cannot carry across bytes because each byte sum is at most 0x7f + 0x7f.
    let t = ((v & LOW7).wrapping_add(LOW7)) | v;
    (((t & !LOW7) >> 7).wrapping_mul(ONES)) >> 56
}

/// The pattern's 8-byte word number `index` (bytes `8 * index ..`), as little-endian bytes.
pub fn word(seed: u64, index: u64) -> [u8; 8] {
    word_at(key(seed), index).to_le_bytes()
}

/// The pattern byte at `offset` of a block seeded with `seed` (the reference definition).
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8)[(offset % 8) as usize]
}

/// Writes the pattern for bytes `start .. start + buf.len()` of a block into `buf`.
pub fn fill(buf: &mut [u8], seed: u64, start: u64) {
    let k = key(seed);
    let lead = (start % 8) as usize;
    let head = if lead == 0 {
        0
    } else {
        (8 - lead).min(buf.len())
    };
    if head > 0 {
        let w = word_at(k, start / 8).to_le_bytes();
        buf[..head].copy_from_slice(&w[lead..lead + head]);
    }
    // `start + head` is a multiple of 8 unless the whole slice fit in the head.
    let mut index = (start + head as u64).div_ceil(8);
    let mut chunks = buf[head..].chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word_at(k, index).to_le_bytes());
        index = index.wrapping_add(1);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let w = word_at(k, index).to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&w[..n]);
    }
}

/// Number of bytes of `buf` that differ from the pattern for bytes `start .. start + buf.len()`.
pub fn count_mismatches(buf: &[u8], seed: u64, start: u64) -> u64 {
    let k = key(seed);
    let lead = (start % 8) as usize;
    let head = if lead == 0 {
        0
    } else {
        (8 - lead).min(buf.len())
    };
    let mut mismatches = 0u64;
    if head > 0 {
        let w = word_at(k, start / 8).to_le_bytes();
        mismatches += buf[..head]
            .iter()
            .zip(&w[lead..lead + head])
            .filter(|(a, b)| a != b)
            .count() as u64;
    }
    let mut index = (start + head as u64).div_ceil(8);
    let mut chunks = buf[head..].chunks_exact(8);
    for chunk in &mut chunks {
        let got = u64::from_le_bytes(chunk.try_into().expect("chunk of 8"));
        let want = word_at(k, index);
        // Nearly always equal: the branch is cheaper than counting every word.
        if got != want {
            mismatches += nonzero_bytes(got ^ want);
        }
        index = index.wrapping_add(1);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let w = word_at(k, index).to_le_bytes();
        mismatches += tail.iter().zip(&w).filter(|(a, b)| a != b).count() as u64;
    }
    mismatches
}

/// Position in `buf` of the first byte that differs from the pattern, if any. Slower than
/// [`count_mismatches`]; meant for reporting after a mismatch was counted.
pub fn first_mismatch(buf: &[u8], seed: u64, start: u64) -> Option<usize> {
    let mut expected = [0u8; 4096];
    let mut pos = 0usize;
    for chunk in buf.chunks(expected.len()) {
        let want = &mut expected[..chunk.len()];
        fill(want, seed, start + pos as u64);
        if let Some(i) = chunk.iter().zip(want.iter()).position(|(a, b)| a != b) {
            return Some(pos + i);
        }
        pos += chunk.len();
    }
    None
}

/// Checks a whole block (its first byte at offset 0 of the pattern) against the pattern of
/// `seed`: wrong bytes and where the first one is.
pub fn check(block: &[u8], seed: u64) -> crate::device::Check {
    let mismatched_bytes = count_mismatches(block, seed, 0);
    let first_mismatch = if mismatched_bytes > 0 {
        first_mismatch(block, seed, 0).map(|i| i as u64)
    } else {
        None
    };
    crate::device::Check {
        mismatched_bytes,
        first_mismatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fill_matches_the_reference_at_every_alignment() {
        for start in 0..20u64 {
            for len in 0..40usize {
                let mut buf = vec![0u8; len];
                fill(&mut buf, 7, start);
                for (i, &b) in buf.iter().enumerate() {
                    assert_eq!(
                        b,
                        byte_at(7, start + i as u64),
                        "start {start} len {len} i {i}"
                    );
                }
                assert_eq!(count_mismatches(&buf, 7, start), 0);
                assert_eq!(first_mismatch(&buf, 7, start), None);
            }
        }
    }

    #[test]
    fn pieces_written_separately_equal_one_fill() {
        let mut whole = vec![0u8; 1000];
        fill(&mut whole, 42, 0);
        let mut pieces = vec![0u8; 1000];
        let cuts = [0usize, 3, 11, 12, 500, 507, 999, 1000];
        for w in cuts.windows(2) {
            fill(&mut pieces[w[0]..w[1]], 42, w[0] as u64);
        }
        assert_eq!(whole, pieces);
        // And checks can likewise start anywhere.
        assert_eq!(count_mismatches(&whole[13..777], 42, 13), 0);
    }

    #[test]
    fn other_seeds_and_shifts_do_not_match() {
        let mut a = vec![0u8; 4096];
        fill(&mut a, 1, 0);
        // Neighbouring seed: nearly every byte differs.
        assert!(count_mismatches(&a, 2, 0) > 4000);
        // The same block read one byte or one word off.
        assert!(count_mismatches(&a[1..], 1, 0) > 4000);
        assert!(count_mismatches(&a[8..], 1, 0) > 4000);
        // Zeroed memory does not pass.
        assert!(count_mismatches(&[0u8; 4096], 1, 0) > 4000);
    }

    #[test]
    fn nonzero_bytes_counts_each_byte() {
        assert_eq!(nonzero_bytes(0), 0);
        assert_eq!(nonzero_bytes(u64::MAX), 8);
        assert_eq!(nonzero_bytes(0x80), 1);
        assert_eq!(nonzero_bytes(0x0100_0000_0000_0001), 2);
        for shift in 0..64 {
            assert_eq!(nonzero_bytes(1 << shift), 1);
        }
    }

    proptest! {
        #[test]
        fn a_single_flipped_byte_is_counted_exactly_once(
            seed in any::<u64>(),
            start in 0u64..1 << 40,
            len in 1usize..3000,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut buf = vec![0u8; len];
            fill(&mut buf, seed, start);
            prop_assert_eq!(count_mismatches(&buf, seed, start), 0);
            let i = at.index(len);
            buf[i] ^= flip;
            prop_assert_eq!(count_mismatches(&buf, seed, start), 1);
            prop_assert_eq!(first_mismatch(&buf, seed, start), Some(i));
        }
    }
}
