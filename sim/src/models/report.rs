//! What `gpumem models` reports: the run's totals, each model's and each GPU's share.

use serde::Serialize;

use super::driver::gib;
use crate::serve::report::human_us;
use crate::serve::Percentiles;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelsReport {
    pub policy: String,
    pub gpu: String,
    pub placement: String,
    pub requests: u64,
    pub requests_finished: u64,
    /// When the last step or transfer ended.
    pub sim_time_us: u64,
    /// Output tokens per second of simulated time.
    pub throughput_tokens_per_s: f64,
    pub ttft_us: Percentiles,
    pub tpot_us: Percentiles,
    /// Loads after the start (models resident from the start are not counted).
    pub weight_loads: u64,
    /// Bytes copied host → GPU (weights loaded, backups restored) and GPU → host (backups).
    pub bytes_h2d: u64,
    pub bytes_d2h: u64,
    /// Modelled time of every sleep and wake (`sleep` policy).
    pub sleep_wake_us: u64,
    /// What the models may use: the utilization's share of every GPU.
    pub gpu_bytes: u64,
    /// The GPUs' peaks of reserved bytes, summed.
    pub peak_gpu_bytes: u64,
    pub models: Vec<ModelReport>,
    pub gpus: Vec<GpuReport>,
    /// Digest of every memory decision, in order.
    pub digest: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelReport {
    /// As given: `NAME` or `NAME@TAG`.
    pub model: String,
    /// The GPU it is homed on.
    pub device: u16,
    pub weight_bytes: u64,
    pub kv_blocks: u64,
    pub requests: u64,
    pub requests_finished: u64,
    pub ttft_us: Percentiles,
    pub tpot_us: Percentiles,
    pub weight_loads: u64,
    pub bytes_loaded: u64,
    pub offloads: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuReport {
    pub device: u16,
    pub models: Vec<String>,
    pub capacity_bytes: u64,
    pub peak_bytes: u64,
}

/// The report as text.
pub fn render_models_text(r: &ModelsReport) -> String {
    let mut out = format!(
        "models: {} on {} x {} ({} placement), policy {}\n",
        r.models.len(),
        r.gpus.len(),
        r.gpu,
        r.placement,
        r.policy
    );
    out += &format!(
        "requests: {} finished of {}, {:.0} tokens/s over {}\n",
        r.requests_finished,
        r.requests,
        r.throughput_tokens_per_s,
        human_us(r.sim_time_us)
    );
    out += &format!(
        "latency: TTFT p50 {} p99 {}, TPOT p50 {} p99 {}\n",
        human_us(r.ttft_us.p50),
        human_us(r.ttft_us.p99),
        human_us(r.tpot_us.p50),
        human_us(r.tpot_us.p99)
    );
    out += &format!(
        "memory: peak {} of {}; {} weight loads, {} host -> GPU, {} GPU -> host",
        gib(r.peak_gpu_bytes),
        gib(r.gpu_bytes),
        r.weight_loads,
        gib(r.bytes_h2d),
        gib(r.bytes_d2h)
    );
    if r.policy == "sleep" {
        out += &format!(", {} in sleep and wake", human_us(r.sleep_wake_us));
    }
    out += "\n\n";
    let width = r
        .models
        .iter()
        .map(|m| m.model.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out += &format!(
        "  {:<width$}  gpu  requests  loads  offloads  TTFT p50    TTFT p99    TPOT p50\n",
        "model"
    );
    for m in &r.models {
        out += &format!(
            "  {:<width$}  {:>3}  {:>8}  {:>5}  {:>8}  {:<10}  {:<10}  {}\n",
            m.model,
            m.device,
            m.requests,
            m.weight_loads,
            m.offloads,
            human_us(m.ttft_us.p50),
            human_us(m.ttft_us.p99),
            human_us(m.tpot_us.p50)
        );
    }
    out += "\n";
    for g in &r.gpus {
        out += &format!(
            "gpu {}: {} (peak {} of {})\n",
            g.device,
            g.models.join(", "),
            gib(g.peak_bytes),
            gib(g.capacity_bytes)
        );
    }
    out += &format!("digest: {}\n", r.digest);
    out
}
