//! The workload an engine serves (its types live in `gpumem_traces::serving`, re-exported
//! here) and gpumem's limits on what a workload and config may ask of the engine.

pub use gpumem_traces::serving::{
    Prompt, RequestStream, Workload, WorkloadFormat, WorkloadRequest, DEFAULT_HASH_BLOCK, GEN_BASE,
    GEN_STRIDE, MAX_ARRIVAL_US, MAX_PROMPT_TOKENS, PROMPT_MOD,
};

/// Limits on the config, far above any real deployment, that bound the simulator's memory
/// (block arrays, token buffers, per-request hash lists) and keep the clock from overflowing.
pub const MAX_GPU_BLOCKS: u64 = 1 << 24;
pub const MAX_BLOCK_SIZE: u64 = 1 << 16;
pub const MAX_MODEL_LEN: u64 = 1 << 26;
pub const MAX_STEP_US: u64 = 1 << 40;
