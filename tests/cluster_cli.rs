//! `gpumem kv --replicas N --router …` end to end on a slice of the Mooncake conversation
//! trace: the per-replica and router report, determinism, one replica as the single-engine
//! run, the spec round trip and bad flags.

mod common;

use common::*;
use serde_json::Value;

/// The first `limit` Mooncake conversation requests through `replicas` replicas, each pool
/// sized for an H100 (a smaller one holds little more than the shared system prompt, and
/// every router then hits the same).
fn cluster_args(limit: &str, replicas: &str, router: &str) -> Vec<String> {
    let trace = mooncake_conversation();
    [
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        limit,
        "--replicas",
        replicas,
        "--router",
        router,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_json(args: &[String]) -> (Vec<u8>, Value) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = gpumem(&args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    let v = serde_json::from_str(&stdout(&out)).expect("one JSON object");
    (out.stdout, v)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn each_replica_reports_its_device_requests_hits_and_latency() {
    let (bytes, r) = run_json(&cluster_args("300", "4", "least-loaded"));
    let replicas = r["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 4);
    let mut requests = 0;
    let mut hits = 0;
    for (i, p) in replicas.iter().enumerate() {
        assert_eq!(u(p, "replica"), i as u64);
        assert_eq!(u(p, "device"), i as u64, "replica {i} runs on GPU {i}");
        for key in ["preemptions", "kv_blocks_used_peak", "prefix_query_tokens"] {
            u(p, key);
        }
        assert!(p["prefix_hit_rate"].is_f64());
        assert!(u(&p["ttft_us"], "p50") <= u(&p["ttft_us"], "p99"));
        assert!(u(p, "kv_blocks_used_peak") <= u(&r, "kv_blocks_used_peak"));
        requests += u(p, "requests");
        hits += u(p, "prefix_hit_tokens");
    }
    assert_eq!(requests, 300);
    assert_eq!(u(&r, "requests"), 300);
    assert_eq!(u(&r, "requests_rejected"), 0);
    assert_eq!(hits, u(&r, "prefix_hit_tokens"));
    assert_eq!(r["router"]["policy"], "least-loaded");
    assert_eq!(u(&r["router"], "requests_routed"), 300);
    // Least-loaded spreads a burst: no replica idles.
    assert!(replicas.iter().all(|p| u(p, "requests") > 0));
    let (again, _) = run_json(&cluster_args("300", "4", "least-loaded"));
    assert!(bytes == again, "two runs differ");
}

#[test]
fn kv_aware_routing_beats_round_robin_on_prefix_hits() {
    let hit_rate = |router: &str| {
        let (_, r) = run_json(&cluster_args("1000", "4", router));
        r["prefix_hit_rate"].as_f64().unwrap()
    };
    let (rr, kv) = (hit_rate("round-robin"), hit_rate("kv-aware"));
    assert!(kv > rr, "kv-aware {kv} <= round-robin {rr}");
    let (_, r) = run_json(&cluster_args("600", "4", "kv-aware:0.5"));
    assert_eq!(r["router"]["policy"], "kv-aware:0.5");
    assert!(u(&r["router"], "kv_events_applied") > 0);
    assert!(u(&r["router"], "expected_hit_blocks") > 0);
}

#[test]
fn late_kv_events_change_what_the_router_sees() {
    let mut args = cluster_args("600", "4", "kv-aware");
    let (_, prompt) = run_json(&args);
    args.extend(["--router-lag-us".into(), "60000000".into()]);
    let (_, late) = run_json(&args);
    assert_eq!(u(&late["router"], "lag_us"), 60_000_000);
    assert_ne!(late["router"]["digest"], prompt["router"]["digest"]);
    // A minute behind, the router still sees blocks the replicas have evicted since: it
    // expects more hits than it gets, and gets fewer than a router told at once.
    let rate = |v: &Value| v["prefix_hit_rate"].as_f64().unwrap();
    assert!(
        rate(&late) < rate(&prompt),
        "{} >= {}",
        rate(&late),
        rate(&prompt)
    );
    assert!(late["router"]["expected_hit_rate"].as_f64().unwrap() > rate(&late));
}

#[test]
fn one_replica_is_the_single_engine_run() {
    let mut args = cluster_args("300", "1", "kv-aware");
    let (_, cluster) = run_json(&args);
    let at = args.iter().position(|a| a == "--replicas").unwrap();
    args.drain(at..at + 4);
    let (_, single) = run_json(&args);
    let mut fleet = cluster.as_object().unwrap().clone();
    fleet.remove("replicas");
    fleet.remove("router");
    assert_eq!(Value::Object(fleet), single);
}

#[test]
fn a_cluster_spec_runs_as_its_flags() {
    let dir = scratch_dir();
    let mut args = cluster_args("200", "3", "kv-aware:2");
    args.extend(["--router-lag-us".into(), "5000".into()]);
    let flags: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec = gpumem(&[&flags[..], &["--print-spec"]].concat());
    assert!(spec.status.success(), "{}", stderr(&spec));
    let text = stdout(&spec);
    for field in [
        "replicas: Some(3)",
        "router: Some(\"kv-aware:2\")",
        "router_lag_us: Some(5000)",
    ] {
        assert!(text.contains(field), "spec lacks {field}:\n{text}");
    }
    let file = dir.join("cluster.ron");
    std::fs::write(&file, &spec.stdout).unwrap();
    let by_spec = gpumem(&["run", file.to_str().unwrap(), "--json"]);
    assert!(by_spec.status.success(), "{}", stderr(&by_spec));
    assert!(by_spec.stdout == gpumem(&flags).stdout);
}

#[test]
fn cluster_flags_are_checked() {
    let trace = mooncake_conversation();
    let t = trace.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 6] = [
        (&["--router", "kv-aware"], &["--replicas"]),
        (&["--router-lag-us", "10"], &["--replicas"]),
        (&["--replicas", "0"], &["replicas 0"]),
        (&["--replicas", "5000"], &["MAX_REPLICAS"]),
        (
            &["--replicas", "2", "--router", "nearest"],
            &["unknown router"],
        ),
        (
            &["--replicas", "2", "--router", "kv-aware:1001"],
            &["unknown router", "0 to 1000"],
        ),
    ];
    for (extra, needles) in cases {
        let out = gpumem(&[&["kv", "--trace", t, "--limit", "5"], extra].concat());
        assert_clean_error(&out, needles);
    }
    let dir = scratch_dir();
    let log = dir.join("steps.jsonl");
    let out = gpumem(&[
        "kv",
        "--limit",
        "5",
        "--replicas",
        "2",
        "--step-log",
        log.to_str().unwrap(),
    ]);
    assert_clean_error(&out, &["--step-log"]);
    assert!(!log.exists());
    let out = gpumem(&["kv", "--limit", "5", "--replicas", "2", "--execute", "host"]);
    assert_clean_error(&out, &["--execute", "simulated only"]);
}

#[test]
fn the_text_report_has_a_row_per_replica() {
    let mut args = cluster_args("100", "2", "round-robin");
    args.pop();
    let flags: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = gpumem(&flags);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "2 replicas of vllm-0.33",
        "devices 0-1",
        "router        round-robin",
    ] {
        assert!(text.contains(needle), "report lacks {needle:?}:\n{text}");
    }
}
