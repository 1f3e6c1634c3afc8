//! Blocks of the paged KV cache: their ids and how many a number of tokens needs.

/// Index of a KV block in the pool. Block 0 is the null block.
pub type BlockId = u32;

/// vLLM's placeholder block: always block 0, never free, its reference count not maintained.
pub const NULL_BLOCK: BlockId = 0;

/// Tokens (rounded up) to blocks.
#[inline]
pub fn cdiv(tokens: u64, block_size: u64) -> u64 {
    full_blocks(tokens, block_size) + u64::from(!ends_block(tokens, block_size))
}

/// Tokens to full blocks (rounded down).
///
/// The scheduler asks this (and [`cdiv`], [`ends_block`]) of every running request at every
/// step, and a 64-bit division's latency stalled those checks: block sizes are powers of two
/// in practice, so they take a shift and a mask, and only other sizes divide.
#[inline]
pub fn full_blocks(tokens: u64, block_size: u64) -> u64 {
    if block_size.is_power_of_two() {
        tokens >> block_size.trailing_zeros()
    } else {
        tokens / block_size
    }
}

/// Whether `tokens` fill whole blocks exactly (0 does).
#[inline]
pub fn ends_block(tokens: u64, block_size: u64) -> bool {
    if block_size.is_power_of_two() {
        tokens & (block_size - 1) == 0
    } else {
        tokens.is_multiple_of(block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Powers of two take the shift, every other size divides: both must agree with division.
    fn block_size() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u32..64).prop_map(|s| 1u64 << s),
            1u64..=1 << 20,
            1u64..=u64::MAX
        ]
    }

    proptest! {
        #[test]
        fn block_counts_agree_with_division(tokens in any::<u64>(), bs in block_size()) {
            prop_assert_eq!(full_blocks(tokens, bs), tokens / bs);
            prop_assert_eq!(cdiv(tokens, bs), tokens.div_ceil(bs));
            prop_assert_eq!(ends_block(tokens, bs), tokens % bs == 0);
        }
    }

    #[test]
    fn block_counts_at_the_edges() {
        assert_eq!(
            (cdiv(0, 16), cdiv(1, 16), cdiv(16, 16), cdiv(17, 16)),
            (0, 1, 1, 2)
        );
        assert_eq!(
            (cdiv(u64::MAX, 16), cdiv(u64::MAX, 6)),
            (1 << 60, u64::MAX / 6 + 1)
        );
        assert_eq!((full_blocks(11, 6), full_blocks(12, 6)), (1, 2));
        assert!(ends_block(0, 6) && ends_block(12, 6) && !ends_block(13, 6));
    }
}
