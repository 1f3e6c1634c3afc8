//! `gpumem plan` end to end on a slice of the Mooncake conversation trace: the answer meets
//! the SLO and one replica fewer does not (both checked by separate `gpumem kv` runs), an
//! SLO no fleet meets, prices and the cheapest plan, bad flags.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn json(args: &[&str]) -> Value {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

/// `gpumem kv` on the same slice with `replicas` H100s behind kv-aware.
fn fleet_run(trace: &Path, gpu: &str, replicas: u64) -> Value {
    json(&[
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "300",
        "--gpu",
        gpu,
        "--replicas",
        &replicas.to_string(),
        "--router",
        "kv-aware",
        "--json",
    ])
}

fn p(v: &Value, latency: &str, pct: &str) -> u64 {
    v[latency][pct].as_u64().unwrap()
}

#[test]
fn the_answer_meets_the_slo_and_one_fewer_does_not() {
    let trace = mooncake_conversation();
    let plan = json(&[
        "plan",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "300",
        "--gpu",
        "h100",
        "--model",
        "llama-3.1-8b",
        "--slo",
        "ttft-p90=1s,tpot-p99=100ms",
        "--max-replicas",
        "16",
        "--json",
    ]);
    assert_eq!(plan["router"], "kv-aware:1", "kv-aware is plan's default");
    let h100 = &plan["plans"][0];
    assert_eq!(h100["gpu"], "h100");
    let n = h100["replicas"].as_u64().expect("a fleet meets the SLO");
    assert!(n > 1, "this SLO needs more than one H100");
    assert_eq!(h100["metrics"]["missed"], Value::Array(vec![]));
    assert_eq!(h100["one_fewer"]["replicas"], n - 1);
    assert!(!h100["one_fewer"]["missed"].as_array().unwrap().is_empty());
    let tried: Vec<u64> = serde_json::from_value(h100["tried"].clone()).unwrap();
    assert!(tried.contains(&n) && tried.contains(&(n - 1)));
    // The same fleets, run on their own: n meets both bounds, n - 1 misses one.
    let meets =
        |r: &Value| p(r, "ttft_us", "p90") <= 1_000_000 && p(r, "tpot_us", "p99") <= 100_000;
    let answer = fleet_run(&trace, "h100", n);
    assert!(meets(&answer), "{n} replicas: {answer}");
    assert_eq!(
        p(&answer, "ttft_us", "p90"),
        p(&h100["metrics"], "ttft_us", "p90")
    );
    let fewer = fleet_run(&trace, "h100", n - 1);
    assert!(!meets(&fewer), "{} replicas meet it too", n - 1);
    assert_eq!(
        plan["cheapest"],
        Value::Null,
        "built-in GPUs carry no price"
    );
}

#[test]
fn an_slo_no_fleet_meets_is_said_plainly() {
    let trace = mooncake_conversation();
    let args = [
        "plan",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "50",
        "--slo",
        "ttft-p50=1us",
        "--max-replicas",
        "5",
    ];
    let plan = json(&[&args[..], &["--json"]].concat());
    let h100 = &plan["plans"][0];
    assert_eq!(h100["replicas"], Value::Null);
    assert_eq!(h100["tried"], serde_json::json!([1, 2, 4, 5]));
    let out = gpumem(&args);
    assert!(stdout(&out).contains("no count up to 5 meets the SLO"));
}

/// The H100's figures with a price.
fn priced_gpu(dir: &Path, name: &str, bandwidth: u64, cents: u64) -> String {
    let file = dir.join(format!("{name}.ron"));
    std::fs::write(
        &file,
        format!(
            "(name: \"{name}\", memory_bytes: 85520809984, flops_per_s: 989400000000000, \
             mem_bytes_per_s: {bandwidth}, default_max_num_seqs: 1024, \
             default_max_num_batched_tokens: 8192, price_per_hour_usd_cents: Some({cents}))"
        ),
    )
    .unwrap();
    file.to_str().unwrap().to_string()
}

#[test]
fn priced_profiles_give_the_fleets_cost_and_the_cheapest() {
    let dir = scratch_dir();
    let trace = mooncake_conversation();
    let slow = priced_gpu(&dir, "slow", 3_350_000_000_000, 200);
    let fast = priced_gpu(&dir, "fast", 6_700_000_000_000, 450);
    let gpus = format!("{slow},{fast}");
    let plan = json(&[
        "plan",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "300",
        "--gpu",
        &gpus,
        "--slo",
        "ttft-p90=1s,tpot-p99=100ms",
        "--max-replicas",
        "16",
        "--json",
    ]);
    let mut costs = Vec::new();
    for (plan, cents) in plan["plans"].as_array().unwrap().iter().zip([200.0, 450.0]) {
        let n = plan["replicas"].as_u64().unwrap() as f64;
        let cost = plan["cost_per_hour_usd"].as_f64().unwrap();
        assert_eq!(cost, n * cents / 100.0);
        costs.push((cost, plan["gpu"].as_str().unwrap().to_string()));
    }
    let cheapest = if costs[0].0 <= costs[1].0 {
        &costs[0].1
    } else {
        &costs[1].1
    };
    assert_eq!(plan["cheapest"], cheapest.as_str());
}

#[test]
fn bad_plans_are_refused() {
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--slo", "ttft-p95=1s"], &["--slo", "unknown percentile"]),
        (
            &["--slo", "ttft-p99=1s", "--max-replicas", "0"],
            &["--max-replicas 0"],
        ),
        (&["--slo", "ttft-p99=1s", "--gpu", "b200"], &["b200"]),
        (
            &["--slo", "ttft-p99=1s", "--router", "random"],
            &["unknown router"],
        ),
    ];
    for (extra, needles) in cases {
        assert_clean_error(
            &gpumem(&[&["plan", "--limit", "5"], extra].concat()),
            needles,
        );
    }
    assert_clean_error(&gpumem(&["plan", "--limit", "5"]), &["--slo"]);
}
