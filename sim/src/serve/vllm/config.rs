//! The scheduler and cache knobs of `vllm-0.33`, checked as vLLM checks them at start-up.

use serde::{Deserialize, Serialize};

use super::super::conformance::ConformanceConfig;
use super::super::cost::CostModel;
use super::super::workload::{MAX_BLOCK_SIZE, MAX_GPU_BLOCKS, MAX_MODEL_LEN, MAX_STEP_US};
use super::super::{EvictionKind, ServeError};
use super::offload::{OffloadEngineConfig, TransferTiming};

/// The scheduler and cache knobs of the personality.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// vLLM's `num_gpu_blocks`, the null block included.
    pub num_gpu_blocks: u32,
    pub block_size: u32,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    pub max_model_len: u64,
    pub enable_prefix_caching: bool,
    /// Time per engine step.
    pub cost: CostModel,
    /// Which free block is handed out next.
    pub eviction: EvictionKind,
    /// vLLM's `watermark` as blocks (`int(watermark * num_gpu_blocks)`); 0 in the contract.
    pub watermark_blocks: u32,
    pub policy: SchedulingPolicy,
    /// A CPU tier below the KV pool (vLLM's OffloadingConnector); None: no tier, and nothing
    /// of it runs.
    pub offload: Option<OffloadEngineConfig>,
}

/// vLLM's scheduling policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come, first served; the most recently admitted running request is preempted.
    Fcfs,
    /// Lowest (priority, arrival, id) first; the highest one running is preempted.
    Priority,
}

impl SchedulingPolicy {
    pub fn parse(name: &str) -> Result<SchedulingPolicy, String> {
        match name {
            "fcfs" => Ok(SchedulingPolicy::Fcfs),
            "priority" => Ok(SchedulingPolicy::Priority),
            other => Err(format!(
                "unknown scheduling policy '{other}'; known: fcfs, priority"
            )),
        }
    }
}

impl EngineConfig {
    /// The contract's config, checked as vLLM checks it at start-up.
    /// Fails on configs vLLM refuses at start-up and on values beyond gpumem's limits.
    pub fn from_conformance(c: &ConformanceConfig) -> Result<EngineConfig, ServeError> {
        let errors = c.startup_errors();
        if !errors.is_empty() {
            return Err(ServeError::Input(errors.join("; ")));
        }
        Ok(EngineConfig {
            num_gpu_blocks: c.num_gpu_blocks as u32,
            block_size: c.block_size as u32,
            max_num_seqs: c.max_num_seqs,
            max_num_batched_tokens: c.max_num_batched_tokens,
            max_model_len: c.max_model_len,
            enable_prefix_caching: c.enable_prefix_caching,
            cost: CostModel::Fixed { step_us: c.step_us },
            eviction: EvictionKind::Lru,
            watermark_blocks: 0,
            policy: if c.priority_policy {
                SchedulingPolicy::Priority
            } else {
                SchedulingPolicy::Fcfs
            },
            offload: c.offload.map(|o| OffloadEngineConfig {
                cpu_blocks: o.cpu_blocks as u32,
                block_size: o.block_size as u32,
                policy: o.policy,
                prompt_only: o.prompt_only,
                timing: TransferTiming::Steps {
                    latency: o.latency_steps,
                },
            }),
        })
    }

    /// vLLM's start-up checks and gpumem's limits.
    pub fn check(&self) -> Result<(), ServeError> {
        let step_us = match self.cost {
            CostModel::Fixed { step_us } => step_us,
            CostModel::Roofline(_) => 1,
        };
        if self.num_gpu_blocks < 2 || self.block_size == 0 || step_us == 0 {
            return Err(ServeError::Input(
                "num_gpu_blocks >= 2, block_size >= 1 and step_us >= 1 are required".into(),
            ));
        }
        if self.num_gpu_blocks as u64 > MAX_GPU_BLOCKS
            || self.block_size as u64 > MAX_BLOCK_SIZE
            || self.max_model_len > MAX_MODEL_LEN
            || step_us > MAX_STEP_US
        {
            return Err(ServeError::Input(format!(
                "config beyond gpumem's limits (num_gpu_blocks <= {MAX_GPU_BLOCKS}, block_size <= {MAX_BLOCK_SIZE}, max_model_len <= {MAX_MODEL_LEN}, step_us <= {MAX_STEP_US})"
            )));
        }
        if self.max_model_len > (self.num_gpu_blocks as u64 - 1) * self.block_size as u64 {
            return Err(ServeError::Input(format!(
                "max_model_len {} exceeds the KV pool ({} usable blocks x {} tokens)",
                self.max_model_len,
                self.num_gpu_blocks - 1,
                self.block_size
            )));
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens < self.max_num_seqs {
            return Err(ServeError::Input(
                "max_num_seqs must be >= 1 and max_num_batched_tokens >= max_num_seqs".into(),
            ));
        }
        if let Some(o) = &self.offload {
            o.check(self.block_size)?;
        }
        Ok(())
    }
}
