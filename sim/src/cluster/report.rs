//! What `gpumem kv --replicas N` reports: the fleet's metrics in the single-engine report's
//! form ([`KvReport`]), then each replica's and the router's ([`ClusterReport`]).
//!
//! The fleet: requests, tokens, prefix-cache counts, preemptions, evictions and steps are
//! summed over the replicas; latency percentiles are taken over every request; `sim_time_us`
//! is when the last replica's last step ended (throughput is over it); `kv_blocks` is one
//! replica's pool and `kv_blocks_used_peak` the fullest replica's peak; the running and waiting
//! peaks and the timeline are the fleet's sums. With one replica every fleet figure, the
//! digest included, is the single-engine run's.

use serde::Serialize;

use gpumem_core::digest::Digest;

use super::router::RouterStats;
use crate::serve::report::{grouped, human_us, pct, ratio, render_text};
use crate::serve::{KvReport, Percentiles, RunSummary};

/// The report of a cluster run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterReport {
    /// The fleet, as one engine's run is reported.
    #[serde(flatten)]
    pub fleet: KvReport,
    pub replicas: Vec<ReplicaReport>,
    pub router: RouterReport,
}

/// One replica's share of the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaReport {
    pub replica: u64,
    /// The GPU it ran on (`DeviceId`).
    pub device: u16,
    pub requests: u64,
    pub requests_finished: u64,
    /// vLLM's prefix-cache counters on this replica (requests never preempted).
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_rate: f64,
    pub preemptions: u64,
    pub kv_blocks_used_peak: u64,
    pub ttft_us: Percentiles,
    /// When its last step ended.
    pub sim_time_us: u64,
    pub digest: String,
}

/// What the router did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouterReport {
    /// As `--router` names it.
    pub policy: String,
    /// How late the KV events reached it.
    pub lag_us: u64,
    #[serde(flatten)]
    pub stats: RouterStats,
    /// expected_hit_blocks / prompt_blocks: the hit rate the router expected (kv-aware).
    pub expected_hit_rate: f64,
    /// Digest of its choices, in arrival order.
    pub digest: String,
}

impl RouterReport {
    pub fn new(policy: String, lag_us: u64, stats: RouterStats, digest: String) -> Self {
        RouterReport {
            policy,
            lag_us,
            stats,
            expected_hit_rate: ratio(stats.expected_hit_blocks, stats.prompt_blocks),
            digest,
        }
    }
}

impl ReplicaReport {
    pub fn new(replica: usize, device: u16, sum: &RunSummary, ttft_us: Percentiles) -> Self {
        let pc = &sum.prefix_cache;
        ReplicaReport {
            replica: replica as u64,
            device,
            requests: sum.requests,
            requests_finished: sum.requests_finished,
            prefix_hit_tokens: pc.hits,
            prefix_query_tokens: pc.queries,
            prefix_hit_rate: ratio(pc.hits, pc.queries),
            preemptions: sum.preemptions,
            kv_blocks_used_peak: sum.kv_blocks_used_peak as u64,
            ttft_us,
            sim_time_us: sum.sim_time_us,
            digest: sum.digest.clone(),
        }
    }
}

/// The fleet's totals from the replicas' (see the module documentation); `router_digest`
/// names the routing. One replica's totals are its own.
pub fn fleet_summary(replicas: &[RunSummary], router_digest: &str) -> RunSummary {
    if let [only] = replicas {
        return only.clone();
    }
    let mut fleet = RunSummary {
        kv_blocks: replicas.first().map_or(0, |r| r.kv_blocks),
        ..RunSummary::default()
    };
    let mut digest = Digest::new();
    for r in replicas {
        fleet.requests += r.requests;
        fleet.requests_finished += r.requests_finished;
        fleet.steps += r.steps;
        fleet.sim_time_us = fleet.sim_time_us.max(r.sim_time_us);
        fleet.scheduled_tokens += r.scheduled_tokens;
        fleet.prompt_tokens += r.prompt_tokens;
        fleet.output_tokens += r.output_tokens;
        fleet.preemptions += r.preemptions;
        fleet.admissions += r.admissions;
        fleet.admitted_hit_tokens += r.admitted_hit_tokens;
        let (f, p) = (&mut fleet.prefix_cache, &r.prefix_cache);
        f.requests += p.requests;
        f.queries += p.queries;
        f.hits += p.hits;
        f.preempted_requests += p.preempted_requests;
        f.preempted_queries += p.preempted_queries;
        f.preempted_hits += p.preempted_hits;
        fleet.blocks_evicted += r.blocks_evicted;
        fleet.blocks_stored += r.blocks_stored;
        fleet.kv_blocks_used_peak = fleet.kv_blocks_used_peak.max(r.kv_blocks_used_peak);
        digest_hex_words(&mut digest, &r.digest);
    }
    digest_hex_words(&mut digest, router_digest);
    fleet.digest = digest.hex();
    fleet
}

/// A hex digest into `d`, 16 digits a word.
fn digest_hex_words(d: &mut Digest, hex: &str) {
    d.word(hex.len() as u64);
    for chunk in hex.as_bytes().chunks(16) {
        let text = std::str::from_utf8(chunk).unwrap_or("");
        d.word(u64::from_str_radix(text, 16).unwrap_or(u64::MAX));
    }
}

/// The report as text: the fleet's, then the cluster's lines and a row per replica.
pub fn render_cluster_text(r: &ClusterReport) -> String {
    let mut out = render_text(&r.fleet);
    let n = r.replicas.len();
    let devices = match (r.replicas.first(), r.replicas.last()) {
        (Some(a), Some(b)) if n > 1 => format!("devices {}-{}", a.device, b.device),
        (Some(a), _) => format!("device {}", a.device),
        _ => "no device".into(),
    };
    let router = &r.router;
    out.push_str(&format!(
        "\n{:<13} {n} replicas of {}, each with the KV pool above on its own GPU ({devices})\n",
        "cluster", r.fleet.config.engine
    ));
    let expected = if router.policy.starts_with("kv-aware") {
        format!(
            "; expected {} of prompt blocks cached on the replica chosen, {} KV events applied",
            pct(router.expected_hit_rate),
            grouped(router.stats.kv_events_applied)
        )
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{:<13} {}, KV events {} late{expected}\n",
        "router",
        router.policy,
        human_us(router.lag_us)
    ));
    out.push_str(&format!(
        "\n{:>7} {:>6} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}\n",
        "replica",
        "device",
        "requests",
        "hit rate",
        "KV peak",
        "preemptions",
        "TTFT p50",
        "TTFT p99"
    ));
    for p in &r.replicas {
        out.push_str(&format!(
            "{:>7} {:>6} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}\n",
            p.replica,
            p.device,
            grouped(p.requests),
            pct(p.prefix_hit_rate),
            grouped(p.kv_blocks_used_peak),
            grouped(p.preemptions),
            human_us(p.ttft_us.p50),
            human_us(p.ttft_us.p99)
        ));
    }
    out
}
