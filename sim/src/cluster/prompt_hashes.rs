//! A request's prompt as block hashes, the way the `vllm-0.33` engine hashes it (vLLM's request
//! block hasher, no extra keys), so that a router can look its prefix up in the cache index
//! its engines' KV events build. A test checks the hashes against those the engine stores.

use gpumem_core::kv::hash::{hash_request_block, hash_request_consecutive_block, ExtraKeys};
use gpumem_core::kv::BlockHash;
use gpumem_traces::serving::Prompt;

/// Most tokens made at once for hashing (bounds the scratch buffer, as the engine does).
const HASH_BATCH_TOKENS: u64 = 8192;

/// Hashes of the first `blocks` full blocks of `prompt` into `out` (cleared first). A block of
/// consecutive tokens (the Mooncake form) is hashed from its first token; others from their
/// tokens, made in `tokens` in batches.
pub fn prompt_block_hashes(
    prompt: &Prompt,
    block_size: u32,
    blocks: u64,
    tokens: &mut Vec<u32>,
    out: &mut Vec<BlockHash>,
) {
    let bs = block_size as u64;
    let blocks = blocks.min(prompt.len() / bs);
    let per_batch = (HASH_BATCH_TOKENS / bs).max(1);
    out.clear();
    out.reserve(blocks as usize);
    while (out.len() as u64) < blocks {
        let first = out.len() as u64;
        if let Some(t) = prompt.consecutive_from(first * bs, bs) {
            let parent = out.last().copied();
            out.push(hash_request_consecutive_block(
                parent,
                first as usize,
                t,
                bs as usize,
                &ExtraKeys::NONE,
            ));
            continue;
        }
        let last = blocks.min(first + per_batch);
        tokens.clear();
        prompt.fill(first * bs, last * bs, tokens);
        for block in tokens.chunks_exact(bs as usize) {
            let parent = out.last().copied();
            out.push(hash_request_block(
                parent,
                out.len(),
                block,
                &ExtraKeys::NONE,
            ));
        }
    }
}
