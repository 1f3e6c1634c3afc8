//! `gpumem colocate` end to end: training and rollouts taking turns on one GPU.

mod common;

use common::{assert_clean_error, gpumem, mooncake_conversation, snapshot, stdout};
use serde_json::Value;

fn run_json(level: &str) -> Value {
    let train = snapshot("yiyi_1.3b_snapshot.pickle");
    let serve = mooncake_conversation();
    let out = gpumem(&[
        "colocate",
        "--train",
        train.to_str().unwrap(),
        "--serve",
        serve.to_str().unwrap(),
        "--limit",
        "60",
        "--rounds",
        "3",
        "--sleep-level",
        level,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn sleeping_frees_the_gpu_for_training_and_stays_within_memory() {
    for level in ["1", "2"] {
        let r = run_json(level);
        assert!(u(&r, "peak_gpu_bytes") <= u(&r, "gpu_bytes"), "{r}");
        assert_eq!(
            u(&r, "serving_bytes_asleep"),
            0,
            "level {level} unmaps everything"
        );
        assert_eq!(u(&r, "requests_finished"), 60);
        assert!(u(&r, "sleep_wake_us") > 0);
        assert_eq!(
            r["phases"].as_array().unwrap().len(),
            6,
            "3 rollouts, 3 steps"
        );
        // The peak is a training phase's: the sleeping engine holds nothing.
        let train_peak = u(&r, "training_reserved_peak_bytes");
        assert!(u(&r, "peak_gpu_bytes") >= train_peak);
    }
    let one = run_json("1");
    assert!(u(&one, "bytes_d2h") > 0, "level 1 backs the weights up");
    assert_eq!(u(&run_json("2"), "bytes_d2h"), 0, "level 2 discards them");
}

#[test]
fn the_training_step_starts_from_the_snapshots_recorded_state() {
    // As `gpumem alloc --strategy caching` replays it: the 257 segments (7,608,467,456 bytes)
    // held before the recording's first event are there from the start; an empty start peaked
    // at 6,111,100,928 bytes.
    let r = run_json("1");
    assert_eq!(r["training_start"]["start"], "recorded", "{r}");
    assert_eq!(u(&r["training_start"], "start_segments"), 257);
    assert_eq!(
        u(&r["training_start"], "start_reserved_bytes"),
        7_608_467_456
    );
    assert!(
        u(&r, "training_reserved_peak_bytes") >= 7_608_467_456,
        "{r}"
    );
}

#[test]
fn a_paused_engine_keeps_its_memory_during_training() {
    let paused = run_json("0");
    let slept = run_json("1");
    assert_eq!(
        u(&paused, "serving_bytes_asleep"),
        u(&paused, "serving_bytes")
    );
    assert_eq!(u(&paused, "sleep_wake_us"), 0);
    assert!(u(&paused, "peak_gpu_bytes") >= u(&slept, "peak_gpu_bytes"));
}

#[test]
fn two_runs_are_byte_identical() {
    let a = run_json("1");
    let b = run_json("1");
    assert_eq!(a, b);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let train = snapshot("yiyi_1.3b_snapshot.pickle");
    let serve = mooncake_conversation();
    let (t, s) = (train.to_str().unwrap(), serve.to_str().unwrap());
    let out = gpumem(&["colocate", "--train", t, "--serve", s, "--sleep-level", "3"]);
    assert_clean_error(&out, &["--sleep-level 3"]);
    let out = gpumem(&["colocate", "--train", s, "--serve", s]);
    assert_clean_error(&out, &["conversation_trace.jsonl"]);
    let out = gpumem(&["colocate", "--train", t, "--serve", s, "--rounds", "0"]);
    assert_clean_error(&out, &["--rounds 0"]);
}

fn run_executed(level: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let train = snapshot("yiyi_1.3b_snapshot.pickle");
    let serve = mooncake_conversation();
    let mut args = vec![
        "colocate",
        "--train",
        train.to_str().unwrap(),
        "--serve",
        serve.to_str().unwrap(),
        "--limit",
        "60",
        "--rounds",
        "3",
        "--sleep-level",
        level,
        "--json",
        "--execute",
        "host",
        "--weight-bytes-scale",
        "1/512",
    ];
    args.extend_from_slice(extra);
    let out = gpumem(&args);
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

#[test]
fn the_engines_sleep_and_wake_run_on_host_memory_with_the_simulations_digest() {
    for level in ["1", "2"] {
        let (code, r) = run_executed(level, &[]);
        assert_eq!(code, Some(0), "level {level}: {r}");
        assert_eq!(r["digest"], run_json(level)["digest"], "level {level}");
        assert_eq!(r["digest"], r["digest_simulated"]);
        assert_eq!(r["addresses_preserved"], true, "level {level}");
        assert!(u(&r, "rss_drop_bytes") > 0, "level {level}: {r}");
        assert_eq!(u(&r, "mismatches"), 0);
        let e = &r["execution"];
        assert_eq!(u(e, "sleeps"), 3);
        assert_eq!(u(e, "wakes"), 2, "no wake after the last training step");
        assert_eq!(u(e, "ranges_moved"), 0);
    }
    let (code, r) = run_executed("1", &["--inject", "corrupt-backup:1"]);
    assert_eq!(code, Some(1), "{r}");
    assert!(u(&r, "mismatches") > 0);
    assert_eq!(u(&r["execution"], "restores_refused"), 1);
    assert_eq!(u(&r, "requests_finished"), 60, "the weights were reloaded");
}
