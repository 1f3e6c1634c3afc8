//! `gpumem kv --execute host`: the KV pool in real memory, every prefix hit read back before it
//! counts.

mod common;

use common::*;
use serde_json::Value;

fn mooncake_args() -> Vec<String> {
    let trace = shared_traces().join("mooncake/conversation_trace.jsonl");
    [
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "200",
        "--kv-blocks",
        "3000",
        "--max-model-len",
        "40000",
        "--bytes-per-block",
        "4KiB",
        "--execute",
        "host",
        "--json",
    ]
    .map(String::from)
    .to_vec()
}

fn run(extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = mooncake_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = gpumem(&args);
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", stderr(&out)));
    (out.status.code(), v)
}

#[test]
fn the_host_executor_agrees_with_the_simulation_on_a_mooncake_slice() {
    let (code, r) = run(&[]);
    assert_eq!(code, Some(0));
    assert_eq!(r["digest"], r["digest_simulated"]);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(r["prefix_hits_refused"], 0);
    assert!(
        r["prefix_hit_tokens"].as_u64().unwrap() > 0,
        "the slice must hit"
    );
    assert!(
        r["blocks_evicted"].as_u64().unwrap() > 0,
        "the pool must evict"
    );
    assert!(r["bytes_verified"].as_u64().unwrap() > 0);
}

#[test]
fn a_hit_on_corrupted_bytes_is_caught_and_not_counted() {
    let (_, clean) = run(&[]);
    let (code, r) = run(&["--inject", "corrupt-block:1"]);
    assert_eq!(code, Some(1), "a mismatch must fail the run");
    assert!(r["mismatches"].as_u64().unwrap() > 0);
    assert_eq!(r["prefix_hits_refused"], 1);
    assert!(r["prefix_hit_tokens"].as_u64() < clean["prefix_hit_tokens"].as_u64());
    assert_ne!(
        r["digest"], r["digest_simulated"],
        "a refused hit changes the decisions"
    );
}

#[test]
fn an_injected_corruption_is_never_lost_to_a_rewrite() {
    // Blocks fill token by token and are written again as they do: a corruption of a block
    // that is rewritten before anything reads it moves on to the next block written, so every
    // N is caught by a read or by the final check.
    for n in ["2", "7", "20"] {
        let (code, r) = run(&["--inject", &format!("corrupt-block:{n}")]);
        assert_eq!(code, Some(1), "corrupt-block:{n} must be caught");
        let e = &r["execution"];
        assert_eq!(e["injected_corruptions"], 1, "{e}");
        assert!(
            r["mismatches"].as_u64().unwrap() > 0,
            "corrupt-block:{n}: {e}"
        );
    }
}
