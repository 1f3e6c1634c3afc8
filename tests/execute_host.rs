//! The host executor carries out the very decisions the simulator made, on real memory.
//!
//! One test function on purpose for the real snapshots: they hold up to 15 GiB live. They run
//! at `--execute-scale 64` (every block at 1/64 of its size and offset: the same placement,
//! disjointness and pattern checks in 1/64 of the memory and time; unscaled they take 5 to 16
//! GB each). The generated workloads run at full size, where resident memory is observed too,
//! and the injection tests run both ways.

mod common;

use common::*;
use serde_json::Value;

fn execute(args: &[&str]) -> (Option<i32>, Value) {
    let out = gpumem(args);
    let report = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("gpumem {args:?}: {e}; stderr: {}", stderr(&out)));
    (out.status.code(), report)
}

fn assert_all_checked(name: &str, report: &Value) {
    for r in report["results"].as_array().unwrap() {
        let strategy = r["strategy"].as_str().unwrap();
        assert_eq!(
            r["digest"], r["digest_executed"],
            "{name} {strategy}: digests differ"
        );
        assert_eq!(
            r["mismatches"], 0,
            "{name} {strategy}: {}",
            r["execution"]["first_mismatches"]
        );
        // Every byte ever placed was verified at least once (freed, or at the end).
        let written = r["execution"]["bytes_written"].as_u64().unwrap();
        let verified = r["bytes_verified"].as_u64().unwrap();
        assert!(
            written > 0 && verified >= written,
            "{name} {strategy}: {verified} < {written}"
        );
        assert_eq!(r["execution"]["device_refusals"], 0);
    }
}

#[test]
fn the_host_executor_reproduces_every_real_snapshot_byte_for_byte() {
    for name in SNAPSHOTS {
        let strategies = "all";
        let trace = snapshot(name);
        let (code, report) = execute(&[
            "alloc",
            "--trace",
            trace.to_str().unwrap(),
            "--strategy",
            strategies,
            "--execute",
            "host",
            "--execute-scale",
            "64",
            "--json",
        ]);
        assert_all_checked(name, &report);
        assert_eq!(code, Some(0), "{name}");
    }
}

#[test]
fn checks_can_fail_an_injected_corruption_is_caught() {
    let base = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "4000",
        "--capacity",
        "64MiB",
        "--strategy",
        "tlsf,caching",
        "--execute",
        "host",
        "--json",
    ];
    let (code, clean) = execute(&base);
    assert_eq!(code, Some(0));
    assert_all_checked("clean", &clean);
    for r in clean["results"].as_array().unwrap() {
        assert!(r["execution"]["resident_bytes_peak"].as_u64().unwrap() > 0);
    }
    for scale in ["1", "64"] {
        let mut corrupt = base.to_vec();
        corrupt.extend([
            "--inject",
            "corrupt-block",
            "--seed",
            "3",
            "--execute-scale",
            scale,
        ]);
        let (code, report) = execute(&corrupt);
        assert_eq!(
            code,
            Some(1),
            "a mismatch must fail the run (scale {scale})"
        );
        for r in report["results"].as_array().unwrap() {
            assert!(
                r["mismatches"].as_u64().unwrap() > 0,
                "corruption not caught at scale {scale}: {r}"
            );
            assert_eq!(r["execution"]["injected_corruptions"], 1);
            // A corrupted byte is observed by the device executor, not by the policy.
            assert_eq!(r["digest"], r["digest_executed"]);
        }
    }
}

#[test]
fn scaling_needs_a_host_execution_and_a_power_of_two() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "alloc",
            "--generate",
            "occupancy",
            "--ops",
            "100",
            "--capacity",
            "64MiB",
        ];
        args.extend_from_slice(extra);
        gpumem(&args)
    };
    assert_clean_error(
        &run(&["--execute-scale", "64"]),
        &["--execute-scale needs --execute"],
    );
    assert_clean_error(
        &run(&["--execute", "host", "--execute-scale", "48"]),
        &["power of two"],
    );
    assert_clean_error(
        &run(&["--execute", "host", "--execute-scale", "1024"]),
        &["power of two"],
    );
    assert_clean_error(
        &run(&[
            "--execute",
            "host",
            "--execute-scale",
            "512",
            "--alignment",
            "256",
        ]),
        &["larger than the alignment"],
    );
    assert_clean_error(
        &run(&["--checkpoint-every", "5"]),
        &["--checkpoint-every needs --execute"],
    );
    // Pages a device cannot map are refused before the run, not as a run of refused maps.
    assert_clean_error(
        &run(&[
            "--execute",
            "host",
            "--execute-scale",
            "64",
            "--page",
            "64KiB",
        ]),
        &["--page 65536 is not a multiple", "granularity"],
    );
}

#[test]
fn checks_can_fail_a_refused_reservation_is_reported_and_changes_the_digest() {
    let args = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "4000",
        "--capacity",
        "64MiB",
        "--strategy",
        "best-fit,caching",
        "--execute",
        "host",
        "--json",
        "--inject",
        "refuse-alloc:1",
    ];
    let (code, report) = execute(&args);
    assert_eq!(
        code,
        Some(1),
        "a digest that differs from the simulation must fail the run"
    );
    for r in report["results"].as_array().unwrap() {
        assert_eq!(r["execution"]["injected_refusals"], 1, "{r}");
        assert_ne!(
            r["digest"], r["digest_executed"],
            "a refusal must change the digest"
        );
        assert_eq!(r["mismatches"], 0);
    }
    let text = gpumem(
        &args[..args.len() - 3]
            .iter()
            .copied()
            .filter(|a| *a != "--json")
            .chain(["--inject", "refuse-alloc:1"])
            .collect::<Vec<_>>(),
    );
    assert!(stdout(&text).contains("DIFFERS"), "{}", stdout(&text));
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if gpumem_gpu_driver_present() {
        return; // On a GPU machine `--execute cuda` is exercised by the gpu crate's own tests.
    }
    let out = gpumem(&[
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "100",
        "--capacity",
        "64MiB",
        "--execute",
        "cuda",
    ]);
    assert_clean_error(&out, &["--execute cuda", "driver"]);
}

fn gpumem_gpu_driver_present() -> bool {
    gpumem::gpu::cuda::driver_present()
}

#[test]
fn a_run_larger_than_the_host_is_refused_before_it_starts() {
    // Occupancy held at 85% of 64 TiB reserves terabytes, far more than any test machine has:
    // a clear error before the run, not a panic or a process the OS kills.
    let out = gpumem(&[
        "alloc",
        "--generate",
        "occupancy",
        "--capacity",
        "64TiB",
        "--ops",
        "100",
        "--strategy",
        "caching",
        "--execute",
        "host",
    ]);
    assert_clean_error(
        &out,
        &[
            "--execute of caching reaches",
            "available",
            "--execute-scale",
        ],
    );
}
