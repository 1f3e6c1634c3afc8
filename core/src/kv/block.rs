//! Blocks of the paged KV cache: their ids and how many a number of tokens needs.

/// Index of a KV block in the pool. Block 0 is the null block.
pub type BlockId = u32;

/// vLLM's placeholder block: always block 0, never free, its reference count not maintained.
pub const NULL_BLOCK: BlockId = 0;

/// Tokens (rounded up) to blocks.
#[inline]
pub fn cdiv(tokens: u64, block_size: u64) -> u64 {
    tokens.div_ceil(block_size)
}
