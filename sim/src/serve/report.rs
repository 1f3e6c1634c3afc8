//! What `gpumem kv` reports ([`KvReport`], JSON or text by [`render_text`]): per-request
//! latencies, prefix-cache hits, preemptions, evictions, and the KV usage and queue lengths
//! over time. [`simulate()`](super::simulate()) runs a workload and fills it in.
//!
//! Integers decide everything; the few floats (rates, throughput) are computed from integers
//! for the report only, so the same run prints the same bytes anywhere.

use serde::Serialize;

use gpumem_core::buffers::SizesChoice;
use gpumem_core::kv::offload::OffloadPolicyKind;

use super::cudagraph::CudagraphReport;
use super::driver::{OffloadSummary, RunSummary};
use super::metrics::Measured;
use super::profile::KvSizing;
use crate::monitor::{Period, PressureReport, Thresholds};
use crate::report::human_bytes;

/// Nearest-rank percentiles of integer samples (0 when there are none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
}

impl Percentiles {
    /// Sorts `v` and takes the nearest-rank p50, p90 and p99.
    pub fn of(v: &mut [u64]) -> Percentiles {
        v.sort_unstable();
        let rank = |p: usize| {
            if v.is_empty() {
                0
            } else {
                v[(p * v.len()).div_ceil(100).max(1) - 1]
            }
        };
        Percentiles {
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
        }
    }
}

/// The state after one logged engine step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TimelinePoint {
    /// End of the step, µs of simulated time.
    pub t_us: u64,
    pub kv_blocks_used: u64,
    pub running: u64,
    pub waiting: u64,
    /// Prefix-cache hit and looked-up tokens of all admissions so far (re-admissions of
    /// preempted requests included): their ratio is the hit rate up to then.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
}

/// What ran: inputs and configuration, echoed in the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunInfo {
    pub trace: String,
    pub format: String,
    pub engine: String,
    pub cost: String,
    pub gpu: String,
    pub model: String,
    pub eviction: String,
    pub prefix_caching: bool,
    pub block_size: u64,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    pub max_model_len: u64,
    /// vLLM's scheduling policy: `fcfs` or `priority`.
    pub scheduling_policy: String,
    /// How the pool was sized from the GPU and model (absent with --kv-blocks).
    pub kv_sizing: Option<KvSizing>,
    pub seed: Option<u64>,
    /// The memory-pressure monitor's thresholds (`--pressure-thresholds`).
    pub pressure_thresholds: Thresholds,
    /// The CUDA-graph capture sizes (`--cudagraph-sizes`).
    pub cudagraph_sizes: SizesChoice,
    /// The model profile's memory per captured graph (reported in `cudagraph.graph_bytes`).
    #[serde(skip)]
    pub cudagraph_bytes_per_graph: u64,
    /// The KV cache's CPU tier (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_offload: Option<OffloadInfo>,
}

/// The CPU tier a run had, echoed in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OffloadInfo {
    /// CPU blocks (vLLM's chunks) in the tier.
    pub cpu_blocks: u64,
    /// Tokens per CPU block.
    pub offload_block_size: u64,
    pub offload_policy: OffloadPolicyKind,
    /// The conformance clock's copy latency; None: each copy takes the host link's time.
    pub offload_latency_steps: Option<u64>,
    pub offload_all_tokens: bool,
    /// KV bytes of one GPU block, what each block's copy moves.
    pub kv_bytes_per_block: u64,
    /// The tier's host memory: CPU blocks of page-rounded size, as vLLM allocates it.
    pub cpu_bytes: u64,
}

/// What the CPU tier did (JSON: these fields at the report's top level).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OffloadReport {
    /// Prompt tokens admissions loaded from the CPU tier, and how many admissions did.
    pub cpu_hit_tokens: u64,
    pub cpu_hit_admissions: u64,
    /// CPU blocks in the store jobs issued; in the load jobs.
    pub offload_stored_blocks: u64,
    pub offload_loaded_blocks: u64,
    /// CPU blocks whose store completed; evicted from the tier to make room.
    pub cpu_stored_blocks: u64,
    pub cpu_evicted_blocks: u64,
    /// Offers the tier had no room for (vLLM's store allocation failures).
    pub store_failures: u64,
    /// KV bytes copied GPU → CPU and CPU → GPU.
    pub bytes_to_cpu: u64,
    pub bytes_from_cpu: u64,
    /// Copies an executor refused because the bytes were not what they should be (0 when
    /// simulated): a refused load is not a hit, a refused store is not stored.
    pub loads_refused: u64,
    pub stores_refused: u64,
}

impl OffloadReport {
    fn new(s: &OffloadSummary, kv_bytes_per_block: u64) -> OffloadReport {
        OffloadReport {
            cpu_hit_tokens: s.cpu_hit_tokens,
            cpu_hit_admissions: s.cpu_hit_admissions,
            offload_stored_blocks: s.offload_stored_blocks,
            offload_loaded_blocks: s.offload_loaded_blocks,
            cpu_stored_blocks: s.cpu_stored_blocks,
            cpu_evicted_blocks: s.cpu_evicted_blocks,
            store_failures: s.store_failures,
            bytes_to_cpu: s.gpu_blocks_to_cpu.saturating_mul(kv_bytes_per_block),
            bytes_from_cpu: s.gpu_blocks_from_cpu.saturating_mul(kv_bytes_per_block),
            loads_refused: s.loads_refused,
            stores_refused: s.stores_refused,
        }
    }
}

/// Points of the timeline in the JSON report.
pub const TIMELINE_POINTS: u64 = 48;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvReport {
    /// Requests in the workload, rejected ones included.
    pub requests: u64,
    pub requests_finished: u64,
    /// Prompt of `max_model_len` tokens or more: refused as vLLM's input processor refuses it.
    pub requests_rejected: u64,
    /// Prompt and generated tokens of the requests simulated.
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// vLLM's prefix-cache counters: hit and looked-up tokens at admission of requests never
    /// preempted, and their ratio.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_rate: f64,
    /// The same over every admission, re-admissions of preempted requests included.
    pub prefix_hit_tokens_with_preempted: u64,
    pub prefix_query_tokens_with_preempted: u64,
    pub prefix_hit_rate_with_preempted: f64,
    pub preemptions: u64,
    /// Cached blocks whose prefix was evicted when the block was handed out again.
    pub blocks_evicted: u64,
    /// Engine steps that scheduled or preempted something.
    pub steps: u64,
    pub sim_time_us: u64,
    /// Prompt and generated tokens per second of simulated time.
    pub throughput_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Time to first token: arrival to the end of the step that sampled it.
    pub ttft_us: Percentiles,
    /// Time per output token after the first: (finish − first token) / (outputs − 1), for
    /// requests with two outputs or more.
    pub tpot_us: Percentiles,
    /// Arrival to finish.
    pub e2e_us: Percentiles,
    /// vLLM's num_gpu_blocks (the null block included).
    pub kv_blocks: u64,
    pub kv_blocks_used_peak: u64,
    pub running_peak: u64,
    pub waiting_peak: u64,
    /// Digest of the engine's decision stream.
    pub digest: String,
    /// Prefix hits an executor refused because the block did not hold what it should (0 when
    /// simulated).
    pub prefix_hits_refused: u64,
    /// What the memory-pressure monitor saw of the KV pool (blocks used of the usable ones).
    pub pressure: PressureReport,
    /// Each step's batch padded to a CUDA-graph size; the static input buffers.
    pub cudagraph: CudagraphReport,
    /// The CPU tier's totals, when the run has one.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub cpu_offload: Option<OffloadReport>,
    pub config: RunInfo,
    /// The state at [`TIMELINE_POINTS`] evenly spaced times.
    pub timeline: Vec<TimelinePoint>,
    /// The state over time, bounded ([`Series`](super::metrics::Series)): after every logged step while the run fits
    /// (for plots; not in the JSON).
    #[serde(skip)]
    pub series: Vec<TimelinePoint>,
    /// The warning and critical periods of the KV pool, bounded (for plots; not in the JSON).
    #[serde(skip)]
    pub pressure_periods: Vec<Period>,
}

/// `num / den` in parts per million, as a float for the report.
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        (num as u128 * 1_000_000 / den as u128) as f64 / 1e6
    }
}

/// `tokens` per second over `us`, to a thousandth.
fn per_s(tokens: u64, us: u64) -> f64 {
    if us == 0 {
        0.0
    } else {
        (tokens as u128 * 1_000_000_000 / us as u128) as f64 / 1000.0
    }
}

/// The last sample at or before each of `points` evenly spaced times up to the end.
pub fn downsample(samples: &[TimelinePoint], points: u64) -> Vec<TimelinePoint> {
    let Some(end) = samples.last().map(|s| s.t_us) else {
        return Vec::new();
    };
    let mut out: Vec<TimelinePoint> = Vec::new();
    for i in 1..=points {
        let t = (end as u128 * i as u128 / points as u128) as u64;
        let k = samples.partition_point(|s| s.t_us <= t);
        if k > 0 && out.last() != Some(&samples[k - 1]) {
            out.push(samples[k - 1]);
        }
    }
    out
}

impl KvReport {
    /// The report of a run with totals `sum` and measurements `m`.
    pub fn new(sum: &RunSummary, mut m: Measured, info: RunInfo) -> KvReport {
        let [ttft, tpot, e2e] = m.latencies.percentiles();
        let pc = &sum.prefix_cache;
        let (hits_all, queries_all) = (
            pc.hits + pc.preempted_hits,
            pc.queries + pc.preempted_queries,
        );
        let series = m.series.points().to_vec();
        let pressure_periods = m.pressure_periods();
        KvReport {
            requests: sum.requests + m.rejected,
            requests_finished: sum.requests_finished,
            requests_rejected: m.rejected,
            prompt_tokens: sum.prompt_tokens,
            output_tokens: sum.output_tokens,
            prefix_hit_tokens: pc.hits,
            prefix_query_tokens: pc.queries,
            prefix_hit_rate: ratio(pc.hits, pc.queries),
            prefix_hit_tokens_with_preempted: hits_all,
            prefix_query_tokens_with_preempted: queries_all,
            prefix_hit_rate_with_preempted: ratio(hits_all, queries_all),
            preemptions: sum.preemptions,
            blocks_evicted: sum.blocks_evicted,
            steps: sum.steps,
            sim_time_us: sum.sim_time_us,
            throughput_tokens_per_s: per_s(sum.prompt_tokens + sum.output_tokens, sum.sim_time_us),
            output_tokens_per_s: per_s(sum.output_tokens, sum.sim_time_us),
            ttft_us: ttft,
            tpot_us: tpot,
            e2e_us: e2e,
            kv_blocks: sum.kv_blocks as u64,
            kv_blocks_used_peak: sum.kv_blocks_used_peak as u64,
            running_peak: m.running_peak,
            waiting_peak: m.waiting_peak,
            digest: sum.digest.clone(),
            prefix_hits_refused: m.prefix_hits_refused,
            pressure: m.pressure.report("kv-blocks"),
            cudagraph: m.cudagraph.report(),
            cpu_offload: match (&sum.offload, &info.cpu_offload) {
                (Some(s), Some(i)) => Some(OffloadReport::new(s, i.kv_bytes_per_block)),
                _ => None,
            },
            config: info,
            timeline: downsample(&series, TIMELINE_POINTS),
            series,
            pressure_periods,
        }
    }
}

/// µs as `812 us`, `12.3 ms` or `4.56 s`.
pub fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} us")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// `1234567` as `1,234,567`.
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The report as text.
pub fn render_text(r: &KvReport) -> String {
    let c = &r.config;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13} {v}\n"));
    line(
        "trace",
        format!(
            "{} ({}, {} requests)",
            c.trace,
            c.format,
            grouped(r.requests)
        ),
    );
    line(
        "engine",
        format!(
            "{}, cost {} ({} / {}), eviction {}, prefix caching {}",
            c.engine,
            c.cost,
            c.gpu,
            c.model,
            c.eviction,
            if c.prefix_caching { "on" } else { "off" }
        ),
    );
    let pool = match &c.kv_sizing {
        Some(s) => format!(
            "{} blocks of {} tokens ({} each): {} x {:.2} - {} weights - {} reserve = {}",
            grouped(r.kv_blocks),
            c.block_size,
            human_bytes(s.bytes_per_block),
            human_bytes(s.memory_bytes),
            s.budget_bytes as f64 / s.memory_bytes as f64,
            human_bytes(s.weight_bytes),
            human_bytes(s.activation_reserve_bytes),
            human_bytes(s.kv_cache_bytes)
        ),
        None => format!(
            "{} blocks of {} tokens (given)",
            grouped(r.kv_blocks),
            c.block_size
        ),
    };
    line("KV pool", pool);
    line(
        "scheduler",
        format!(
            "{}, max_num_seqs {}, max_num_batched_tokens {}, max_model_len {}",
            c.scheduling_policy, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len
        ),
    );
    if let Some(o) = &c.cpu_offload {
        line(
            "CPU tier",
            format!(
                "{} blocks of {} tokens ({}), {}, {} tokens offloaded, copies {}",
                grouped(o.cpu_blocks),
                o.offload_block_size,
                human_bytes(o.cpu_bytes),
                o.offload_policy.name(),
                if o.offload_all_tokens {
                    "all"
                } else {
                    "prompt"
                },
                match o.offload_latency_steps {
                    Some(k) => format!("{k} steps"),
                    None => "at the host link's speed".into(),
                }
            ),
        );
    }
    out.push('\n');
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13} {v}\n"));
    line(
        "requests",
        format!(
            "{} finished, {} rejected (prompt >= max_model_len)",
            grouped(r.requests_finished),
            grouped(r.requests_rejected)
        ),
    );
    line(
        "tokens",
        format!(
            "{} prompt, {} generated",
            grouped(r.prompt_tokens),
            grouped(r.output_tokens)
        ),
    );
    line(
        "prefix cache",
        format!(
            "hit rate {} ({} of {} tokens, vLLM's count); {} counting re-admissions after preemption",
            pct(r.prefix_hit_rate),
            grouped(r.prefix_hit_tokens),
            grouped(r.prefix_query_tokens),
            pct(r.prefix_hit_rate_with_preempted)
        ),
    );
    line(
        "preemptions",
        format!(
            "{}; blocks evicted {}",
            grouped(r.preemptions),
            grouped(r.blocks_evicted)
        ),
    );
    let usable = r.kv_blocks.saturating_sub(1).max(1);
    line(
        "KV usage",
        format!(
            "peak {} of {} blocks ({}); running peak {}, waiting peak {}",
            grouped(r.kv_blocks_used_peak),
            grouped(usable),
            pct(r.kv_blocks_used_peak as f64 / usable as f64),
            r.running_peak,
            r.waiting_peak
        ),
    );
    line(
        "pressure",
        format!(
            "{} (thresholds {} of usable blocks)",
            r.pressure.summary(),
            r.pressure.thresholds
        ),
    );
    line("CUDA graphs", r.cudagraph.summary());
    if let Some(o) = &r.cpu_offload {
        line(
            "CPU tier",
            format!(
                "{} tokens hit in {} admissions; CPU blocks stored {}, loaded {}, evicted {}; {} to CPU, {} back",
                grouped(o.cpu_hit_tokens),
                grouped(o.cpu_hit_admissions),
                grouped(o.cpu_stored_blocks),
                grouped(o.offload_loaded_blocks),
                grouped(o.cpu_evicted_blocks),
                human_bytes(o.bytes_to_cpu),
                human_bytes(o.bytes_from_cpu)
            ),
        );
    }
    line(
        "time",
        format!(
            "{} simulated in {} steps; {} tokens/s ({} generated/s)",
            human_us(r.sim_time_us),
            grouped(r.steps),
            grouped(r.throughput_tokens_per_s as u64),
            grouped(r.output_tokens_per_s as u64)
        ),
    );
    out.push_str(&format!(
        "\n{:<13} {:>10} {:>10} {:>10}\n",
        "latency", "p50", "p90", "p99"
    ));
    for (name, p) in [
        ("TTFT", r.ttft_us),
        ("TPOT", r.tpot_us),
        ("end to end", r.e2e_us),
    ] {
        out.push_str(&format!(
            "{name:<13} {:>10} {:>10} {:>10}\n",
            human_us(p.p50),
            human_us(p.p90),
            human_us(p.p99)
        ));
    }
    out.push_str(&format!("\ndigest        {}\n", r.digest));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(
            Percentiles::of(&mut v),
            Percentiles {
                p50: 50,
                p90: 90,
                p99: 99
            }
        );
        assert_eq!(Percentiles::of(&mut [7]).p99, 7);
        assert_eq!(Percentiles::of(&mut []).p50, 0);
        let mut v = vec![1, 2, 3];
        assert_eq!(Percentiles::of(&mut v).p50, 2);
    }

    #[test]
    fn downsampling_keeps_the_last_state_before_each_time() {
        let s: Vec<TimelinePoint> = (1..=10)
            .map(|i| TimelinePoint {
                t_us: i * 10,
                running: i,
                ..TimelinePoint::default()
            })
            .collect();
        let d = downsample(&s, 4);
        let t: Vec<u64> = d.iter().map(|p| p.t_us).collect();
        assert_eq!(t, [20, 50, 70, 100]);
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(human_us(1500), "1.5 ms");
    }
}
