//! `gpumem models` end to end: the acceptance of the many-models issue on the simulator.

mod common;

use common::{assert_clean_error, gpumem, stdout};
use serde_json::Value;

const FIVE: &str = "llama-3.1-8b,qwen2.5-7b,mistral-7b,llama-3.1-8b@ft1,qwen2.5-7b@ft2";
const THREE: &str = "llama-3.1-8b,qwen2.5-7b,mistral-7b";

fn run_json(extra: &[&str]) -> Value {
    let mut args = vec!["models", "--json", "--requests", "150"];
    args.extend_from_slice(extra);
    let out = gpumem(&args);
    assert!(
        out.status.success(),
        "gpumem {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn five_models_on_one_h100_static_is_refused_naming_what_is_needed() {
    let out = gpumem(&["models", "--models", FIVE, "--policy", "static"]);
    assert_clean_error(
        &out,
        &[
            "static: the 5 models need",
            "GiB",
            "1 x h100 offers",
            "--policy lru",
        ],
    );
}

#[test]
fn five_models_on_one_h100_every_dynamic_policy_serves_every_request_within_memory() {
    for policy in ["lru", "offloader", "sleep"] {
        let r = run_json(&["--models", FIVE, "--policy", policy]);
        assert_eq!(u(&r, "requests"), 150, "{policy}");
        assert_eq!(
            u(&r, "requests_finished"),
            150,
            "{policy}: every request served"
        );
        assert!(
            u(&r, "peak_gpu_bytes") <= u(&r, "gpu_bytes"),
            "{policy}: {r}"
        );
        assert!(
            u(&r, "weight_loads") > 0,
            "{policy}: five models cannot all stay"
        );
        let models = r["models"].as_array().unwrap();
        assert_eq!(models.len(), 5);
        let loads: u64 = models.iter().map(|m| u(m, "weight_loads")).sum();
        assert_eq!(loads, u(&r, "weight_loads"));
        for m in models {
            if u(m, "requests_finished") > 0 {
                assert!(m["ttft_us"]["p50"].is_u64(), "{policy}: per-model latency");
            }
        }
        let moved_back = u(&r, "bytes_d2h");
        if policy == "sleep" {
            assert!(moved_back > 0, "level 1 backs the weights up");
            assert!(u(&r, "sleep_wake_us") > 0);
        } else {
            assert_eq!(moved_back, 0, "{policy}: weights keep a host copy");
        }
    }
}

#[test]
fn three_models_fit_and_static_serves_them_with_no_weight_load() {
    let r = run_json(&["--models", THREE, "--policy", "static"]);
    assert_eq!(u(&r, "weight_loads"), 0);
    assert_eq!(u(&r, "bytes_h2d"), 0);
    assert_eq!(u(&r, "requests_finished"), 150);
    assert!(u(&r, "peak_gpu_bytes") <= u(&r, "gpu_bytes"));
}

#[test]
fn two_runs_are_byte_identical_and_the_seed_matters() {
    let run = |seed: &str| {
        let out = gpumem(&["models", "--json", "--requests", "120", "--seed", seed]);
        assert!(out.status.success());
        out.stdout
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn two_gpus_balanced_report_both_and_what_each_holds() {
    let r = run_json(&["--models", FIVE, "--gpus", "2", "--placement", "balanced"]);
    let gpus = r["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    let held: usize = gpus
        .iter()
        .map(|g| g["models"].as_array().unwrap().len())
        .sum();
    assert_eq!(held, 5, "every model homed on one GPU");
    assert!(gpus
        .iter()
        .all(|g| !g["models"].as_array().unwrap().is_empty()));
    // Packed fills the first GPU before the second.
    let p = run_json(&["--models", THREE, "--gpus", "2", "--placement", "packed"]);
    let first = p["gpus"][0]["models"].as_array().unwrap().len();
    assert_eq!(first, 3, "{p}");
}

#[test]
fn level_two_sleep_reloads_weights_from_disk_and_copies_nothing_back() {
    let r = run_json(&["--models", FIVE, "--policy", "sleep", "--sleep-level", "2"]);
    assert_eq!(u(&r, "bytes_d2h"), 0, "level 2 discards the weights");
    assert_eq!(u(&r, "requests_finished"), 150);
    let one = run_json(&["--models", FIVE, "--policy", "sleep", "--sleep-level", "1"]);
    assert!(
        u(&r, "sleep_wake_us") > u(&one, "sleep_wake_us"),
        "disk is slower than PCIe"
    );
}

#[test]
fn impossible_configs_are_clear_errors() {
    let cases: [(&[&str], &str); 8] = [
        (&["--models", "llama-3.1-8b,llama-3.1-8b"], "given twice"),
        (&["--models", "nope-1b"], "--models"),
        (&["--models", "llama-3.1-8b@"], "empty tag"),
        (&["--models", "llama-3.1-70b"], "needs"),
        (&["--sleep-level", "3"], "--sleep-level"),
        (
            &["--offload-threshold", "0.5", "--restore-threshold", "0.7"],
            "below the offload threshold",
        ),
        (&["--gpus", "0"], "--gpus"),
        (&["--rate", "0"], "--rate"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["models"];
        args.extend_from_slice(extra);
        let out = gpumem(&args);
        assert_clean_error(&out, &[needle]);
    }
}
