//! `--execute cuda` end to end on a real GPU: an opt-in tier for machines that have one.
//!
//! `GPUMEM_CUDA=1 cargo test --release --test cuda_cli` runs it; with the variable set, a
//! machine without a usable GPU FAILS (never skips). Without it, every test returns at once.

mod common;

use common::*;
use serde_json::Value;

fn asked() -> bool {
    std::env::var_os("GPUMEM_CUDA").is_some()
}

fn json(args: &[&str]) -> (Option<i32>, Value) {
    let out = gpumem(args);
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("gpumem {args:?}: {e}; stderr: {}", stderr(&out)));
    (out.status.code(), v)
}

#[test]
fn every_real_snapshot_replays_on_the_gpu_with_the_simulations_digests() {
    if !asked() {
        return;
    }
    for name in SNAPSHOTS {
        let trace = snapshot(name);
        // Below an H100's free memory; the run refuses before it starts where a GPU has less.
        let (code, r) = json(&[
            "alloc",
            "--trace",
            trace.to_str().unwrap(),
            "--capacity",
            "40GiB",
            "--execute",
            "cuda",
            "--json",
        ]);
        for s in r["results"].as_array().unwrap() {
            assert_eq!(
                s["digest"], s["digest_executed"],
                "{name} {}",
                s["strategy"]
            );
            assert_eq!(s["mismatches"], 0, "{name} {}", s["strategy"]);
        }
        assert_eq!(code, Some(0), "{name}");
    }
}

#[test]
fn the_kv_pool_and_the_tiers_run_on_the_gpu() {
    if !asked() {
        return;
    }
    let conv = mooncake_conversation();
    let (code, r) = json(&[
        "kv",
        "--trace",
        conv.to_str().unwrap(),
        "--limit",
        "300",
        "--kv-blocks",
        "4000",
        "--bytes-per-block",
        "256KiB",
        "--execute",
        "cuda",
        "--json",
    ]);
    assert_eq!(r["digest"], r["digest_simulated"]);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(code, Some(0));
    let out = gpumem(&["selftest", "--execute", "cuda"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn models_sleep_and_wake_on_the_gpu_at_the_same_addresses() {
    if !asked() {
        return;
    }
    // Five models at full size: about 62 GiB of GPU memory at the peak, pinned host backups
    // of up to four models' weights (about 60 GiB); a few sleeps and wakes, each copy checked
    // at both ends.
    let (code, r) = json(&[
        "models",
        "--models",
        "llama-3.1-8b,qwen2.5-7b,mistral-7b,llama-3.1-8b@ft1,qwen2.5-7b@ft2",
        "--policy",
        "sleep",
        "--requests",
        "100",
        "--execute",
        "cuda",
        "--json",
    ]);
    assert_eq!(r["digest"], r["digest_simulated"], "{r}");
    assert_eq!(r["addresses_preserved"], true, "{r}");
    assert_eq!(r["mismatches"], 0, "{r}");
    assert!(r["execution"]["wakes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["rss_drop_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(code, Some(0));
}
