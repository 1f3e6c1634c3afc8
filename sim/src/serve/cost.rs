//! Cost models: how long one engine step takes, in integer nanoseconds.
//!
//! - `fixed:STEP_US`: every step the same (the conformance clock).
//! - `roofline`: `max(compute, memory)` of the step's batch on the GPU, from its FLOP/s and
//!   memory bandwidth and the model's parameters and KV bytes per token. Compute is
//!   `2 × params` FLOPs per scheduled token plus attention, `4 × layers × heads × head_dim`
//!   FLOPs per (query token, context token) pair; memory is the weights read once per step
//!   plus the KV of every scheduled request's context read and its new tokens written. Prefill
//!   chunks and decode tokens of one step share the batch. An optimistic bound: no kernel
//!   efficiency, no launch or scheduling overhead.

use serde::{Deserialize, Serialize};

use super::profile::{GpuProfile, ModelProfile};

/// What one engine step computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepWork {
    /// Tokens scheduled (prefill chunks and decode tokens).
    pub tokens: u64,
    /// Over the scheduled tokens, the context each attends to (itself included).
    pub attention_pairs: u128,
    /// Over the scheduled requests, their context after the step (KV read or written).
    pub kv_tokens: u128,
}

impl StepWork {
    /// A request with `computed` tokens of context schedules `n` more.
    #[inline]
    pub fn add(&mut self, computed: u64, n: u64) {
        let (c, n128) = (computed as u128, n as u128);
        self.tokens += n;
        self.attention_pairs += n128 * c + n128 * (n128 + 1) / 2;
        self.kv_tokens += c + n128;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roofline {
    pub flops_per_s: u64,
    pub mem_bytes_per_s: u64,
    pub weight_bytes: u64,
    /// `2 × params`.
    pub flops_per_token: u64,
    /// `4 × layers × attention_heads × head_dim`.
    pub flops_per_attention_pair: u64,
    pub kv_bytes_per_token: u64,
}

impl Roofline {
    pub fn new(gpu: &GpuProfile, model: &ModelProfile) -> Roofline {
        Roofline {
            flops_per_s: gpu.flops_per_s.max(1),
            mem_bytes_per_s: gpu.mem_bytes_per_s.max(1),
            weight_bytes: model.weight_bytes(),
            flops_per_token: model.params.saturating_mul(2),
            flops_per_attention_pair: 4u64
                .saturating_mul(model.layers)
                .saturating_mul(model.attention_heads)
                .saturating_mul(model.head_dim),
            kv_bytes_per_token: model.kv_bytes_per_token(),
        }
    }

    /// Step time in ns: 0 for a step that scheduled nothing (the GPU does not run), else at
    /// least 1.
    pub fn step_ns(&self, w: &StepWork) -> u64 {
        if w.tokens == 0 {
            return 0;
        }
        let flops = w.tokens as u128 * self.flops_per_token as u128
            + w.attention_pairs * self.flops_per_attention_pair as u128;
        let bytes = self.weight_bytes as u128 + w.kv_tokens * self.kv_bytes_per_token as u128;
        let compute = (flops * 1_000_000_000).div_ceil(self.flops_per_s as u128);
        let memory = (bytes * 1_000_000_000).div_ceil(self.mem_bytes_per_s as u128);
        compute.max(memory).clamp(1, u64::MAX as u128) as u64
    }
}

/// Time per engine step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CostModel {
    /// Every step takes the same time (`fixed:STEP_US`); the conformance clock.
    Fixed { step_us: u64 },
    /// `max(compute, memory)` per step (`roofline`).
    Roofline(Roofline),
}

impl CostModel {
    /// Parses `fixed:STEP_US` or `roofline` (which uses `roofline`, built from the run's GPU
    /// and model).
    pub fn parse(s: &str, roofline: Roofline) -> Result<CostModel, String> {
        if s == "roofline" {
            return Ok(CostModel::Roofline(roofline));
        }
        match s.split_once(':') {
            Some(("fixed", us)) => match us.parse::<u64>() {
                Ok(step_us) if step_us > 0 => Ok(CostModel::Fixed { step_us }),
                _ => Err(format!(
                    "cost model {s:?}: STEP_US must be a positive integer"
                )),
            },
            _ => Err(format!(
                "unknown cost model {s:?} (expected fixed:STEP_US or roofline)"
            )),
        }
    }

    pub fn name(&self) -> String {
        match self {
            CostModel::Fixed { step_us } => format!("fixed:{step_us}"),
            CostModel::Roofline(_) => "roofline".into(),
        }
    }

    /// Duration of a step that did `w`, in ns.
    #[inline]
    pub fn step_ns(&self, w: &StepWork) -> u64 {
        match self {
            CostModel::Fixed { step_us } => step_us.saturating_mul(1000),
            CostModel::Roofline(r) => r.step_ns(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roofline_is_memory_bound_in_decode_and_compute_bound_in_prefill() {
        let gpu = GpuProfile::resolve("h100").unwrap();
        let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
        let r = Roofline::new(&gpu, &model);
        // One decode token at 1000 tokens of context: the weights dominate, 16.06 GB / 3.35 TB/s.
        let mut w = StepWork::default();
        w.add(1000, 1);
        let ns = r.step_ns(&w);
        let weights_ns = (16_060_522_496u128 * 1_000_000_000).div_ceil(3_350_000_000_000) as u64;
        assert!(ns > weights_ns && ns < weights_ns + 100_000, "{ns}");
        // An 8192-token prefill chunk: 2 x 8.03e9 x 8192 FLOPs for the weights (133 ms at
        // 989.4 TFLOP/s) and 4 x 32 x 32 x 128 x 8192 x 8193 / 2 for attention (18 ms).
        let mut w = StepWork::default();
        w.add(0, 8192);
        let ns = r.step_ns(&w);
        assert!((150_000_000..152_000_000).contains(&ns), "{ns}");
        assert_eq!(
            CostModel::parse("fixed:20000", r).unwrap().step_ns(&w),
            20_000_000
        );
        assert_eq!(r.step_ns(&StepWork::default()), 0);
        assert!(CostModel::parse("fixed:0", r).is_err());
        assert!(CostModel::parse("magic", r).is_err());
        assert_eq!(CostModel::parse("roofline", r).unwrap().name(), "roofline");
    }
}
