//! `gpumem models --execute host`: vLLM's sleep mode on real host memory, the acceptance
//! "Sleep on host memory" of the many-models issue. Five models (three profiles, two
//! fine-tunes) at 1/512 of their size: about 200 MB of host memory, a second or two.

mod common;

use common::{assert_clean_error, gpumem, stderr, stdout};
use serde_json::Value;

const FIVE: &str = "llama-3.1-8b,qwen2.5-7b,mistral-7b,llama-3.1-8b@ft1,qwen2.5-7b@ft2";

fn models(extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec![
        "models",
        "--json",
        "--models",
        FIVE,
        "--policy",
        "sleep",
        "--requests",
        "100",
    ];
    args.extend_from_slice(extra);
    let out = gpumem(&args);
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("gpumem {args:?}: {e}; stderr: {}", stderr(&out)));
    (out.status.code(), v)
}

const HOST: [&str; 4] = ["--execute", "host", "--weight-bytes-scale", "1/512"];

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn sleep_on_host_memory_makes_the_simulations_run_at_the_same_addresses() {
    let (code, simulated) = models(&[]);
    assert_eq!(code, Some(0));
    let (code, r) = models(&HOST);
    assert_eq!(code, Some(0), "{r}");
    // The same decisions: the digest, and the whole report, are the simulation's.
    assert_eq!(r["digest"], simulated["digest"]);
    assert_eq!(r["digest_simulated"], simulated["digest"]);
    let mut report = r.clone();
    for k in [
        "digest_simulated",
        "addresses_preserved",
        "rss_drop_bytes",
        "bytes_verified",
        "mismatches",
        "execution",
    ] {
        report.as_object_mut().unwrap().remove(k);
    }
    assert_eq!(report, simulated, "executing changes no reported figure");
    let e = &r["execution"];
    assert_eq!(
        e["digest"], simulated["digest"],
        "the executor's own digest"
    );
    assert_eq!(e["weight_bytes_scale"], "1/512");
    // Five models do not fit: models slept and woke, each wake at the same addresses.
    assert!(u(e, "sleeps") > 0 && u(e, "wakes") > 0, "{e}");
    assert!(
        u(e, "ranges_checked") >= 2 * u(e, "wakes"),
        "weights and KV of each wake"
    );
    assert_eq!(u(e, "ranges_moved"), 0);
    assert_eq!(r["addresses_preserved"], true);
    // Every sleep unmapped (MADV_DONTNEED) the KV pool: the process gave memory back.
    assert!(u(&r, "rss_drop_bytes") > 0, "{r}");
    // Weights are written with their pattern and checked at both ends of every backup and
    // restore; nothing was wrong.
    assert_eq!(u(&r, "mismatches"), 0);
    assert!(u(&r, "bytes_verified") > 0);
    assert!(u(e, "transfers") >= 2 * u(e, "wakes"), "{e}");
    assert_eq!(u(e, "transfers_refused"), 0);
    assert_eq!(u(e, "restores_refused"), 0);
}

#[test]
fn a_corrupted_backup_is_caught_when_its_wake_restores_it() {
    let mut args = HOST.to_vec();
    args.extend(["--inject", "corrupt-backup:1"]);
    let (code, r) = models(&args);
    assert_eq!(code, Some(1), "a wrong byte fails the run: {r}");
    assert!(u(&r, "mismatches") > 0);
    let e = &r["execution"];
    assert_eq!(u(e, "injected_backup_corruptions"), 1);
    assert_eq!(u(e, "restores_refused"), 1, "{e}");
    // Seen by the checkpoint after the next load (every content re-checked, backups
    // included), and by the wake that would have restored it: refused, never used.
    let checks: Vec<&str> = e["first_mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["check"].as_str().unwrap())
        .collect();
    assert!(checks.contains(&"transfer-from"), "{checks:?}");
    // The refused restore is an outcome the simulation did not have.
    assert_ne!(r["digest"], r["digest_simulated"]);
    // The weights were reloaded instead: every request is still served.
    assert_eq!(u(&r, "requests_finished"), u(&r, "requests"));

    // In text, the run says so.
    let out = gpumem(&[
        "models",
        "--models",
        FIVE,
        "--policy",
        "sleep",
        "--requests",
        "100",
        "--execute",
        "host",
        "--weight-bytes-scale",
        "1/512",
        "--inject",
        "corrupt-backup:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("DIFFER from the simulation's"), "{text}");
    assert!(text.contains("1 restores refused"), "{text}");
}

#[test]
fn execution_flags_are_checked() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--gpus", "2", "--execute", "cuda"],
            "--execute cuda drives one GPU",
        ),
        (
            &["--weight-bytes-scale", "1/512"],
            "--weight-bytes-scale needs --execute host",
        ),
        (&["--inject", "corrupt-backup"], "--inject needs --execute"),
        (
            &["--execute", "host", "--weight-bytes-scale", "1/3"],
            "power of two",
        ),
        (
            &["--execute", "host", "--weight-bytes-scale", "1/1024"],
            "power of two",
        ),
        (
            &[
                "--execute",
                "host",
                "--weight-bytes-scale",
                "1/512",
                "--inject",
                "corrupt-nothing",
            ],
            "corrupt-backup",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["models", "--policy", "sleep", "--requests", "10"];
        args.extend_from_slice(extra);
        assert_clean_error(&gpumem(&args), &[needle]);
    }
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if gpumem::gpu::cuda::driver_present() {
        return; // tests/cuda_cli.rs runs the GPU paths where one is asked for.
    }
    let out = gpumem(&[
        "models",
        "--policy",
        "sleep",
        "--requests",
        "10",
        "--execute",
        "cuda",
    ]);
    assert_clean_error(&out, &["--execute cuda", "driver"]);
    assert!(stdout(&out).is_empty());
}

#[test]
fn a_trace_naming_its_models_executes_too_and_a_pipe_is_refused() {
    let names = [
        "llama-3.1-8b",
        "qwen2.5-7b",
        "mistral-7b",
        "llama-3.1-8b@ft1",
        "qwen2.5-7b@ft2",
    ];
    // Runs of requests per model, in turn: every model is needed again after others.
    let trace: String = (0..60)
        .map(|i| {
            format!(
                "{{\"id\": \"q{i}\", \"arrival_us\": {}, \"hash_ids\": [{}], \"input_length\": 400, \"max_tokens\": 8, \"model\": \"{}\"}}\n",
                i * 200_000,
                i % 4,
                names[(i / 4) % 5]
            )
        })
        .collect();
    let dir = common::scratch_dir();
    let path = dir.join("trace.jsonl");
    std::fs::write(&path, trace).unwrap();
    let p = path.to_str().unwrap();
    let base = [
        "models", "--json", "--models", FIVE, "--policy", "sleep", "--trace", p,
    ];
    let simulated: Value = serde_json::from_str(&stdout(&gpumem(&base))).unwrap();
    let mut args = base.to_vec();
    args.extend(HOST);
    let out = gpumem(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["digest"], simulated["digest"]);
    assert_eq!(u(&r, "requests_finished"), 60);
    assert!(u(&r["execution"], "wakes") > 0, "{r}");
    assert_eq!(r["addresses_preserved"], true);
    assert_eq!(u(&r, "mismatches"), 0);

    let mut piped = vec![
        "models", "--models", FIVE, "--policy", "sleep", "--trace", "-",
    ];
    piped.extend(HOST);
    assert_clean_error(&gpumem(&piped), &["--execute reads the trace twice"]);
}
