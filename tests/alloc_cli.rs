//! `gpumem alloc` end to end: reports on real snapshots, determinism, bad input.

mod common;

use common::*;
use serde_json::Value;

fn json_report(args: &[&str]) -> Value {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

#[test]
fn the_default_run_needs_no_data_and_answers_for_every_strategy() {
    let out = gpumem(&["alloc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for name in [
        "first-fit",
        "best-fit",
        "buddy",
        "tlsf",
        "pool",
        "caching",
        "caching-expandable",
    ] {
        assert!(text.contains(name), "table lacks {name}:\n{text}");
    }
}

#[test]
fn two_runs_give_byte_identical_json() {
    let trace = snapshot("cs336_bcrafton_memory_snapshot.pickle");
    let args = ["alloc", "--trace", trace.to_str().unwrap(), "--json"];
    let a = gpumem(&args);
    let b = gpumem(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
    let generated = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "20000",
        "--capacity",
        "256MiB",
        "--json",
        "--seed",
        "7",
    ];
    assert_eq!(gpumem(&generated).stdout, gpumem(&generated).stdout);
    let other_seed = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "20000",
        "--capacity",
        "256MiB",
        "--json",
        "--seed",
        "8",
    ];
    assert_ne!(gpumem(&generated).stdout, gpumem(&other_seed).stdout);
}

#[test]
fn the_json_carries_the_fields_programs_rely_on() {
    let trace = snapshot("cs336_bcrafton_memory_snapshot.pickle");
    let report = json_report(&["alloc", "--trace", trace.to_str().unwrap(), "--json"]);
    assert!(report["trace"].is_string());
    assert_eq!(report["capacity_bytes"], 80u64 << 30);
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 7);
    for r in results {
        for key in ["strategy", "digest"] {
            assert!(r[key].is_string(), "{key} in {r}");
        }
        for key in [
            "ops",
            "bytes_allocated_peak",
            "bytes_reserved_peak",
            "fragmentation_failures",
            "ooms",
            "unknown_frees",
        ] {
            assert!(r[key].is_u64(), "{key} in {r}");
        }
        for key in ["fragmentation_max", "fragmentation_mean"] {
            let f = r[key].as_f64().expect(key);
            assert!((0.0..=1.0).contains(&f), "{key} = {f}");
        }
        assert!(r["bytes_reserved_peak"].as_u64() >= r["bytes_allocated_peak"].as_u64());
    }
}

#[test]
fn reports_on_the_real_snapshots() {
    for name in SNAPSHOTS {
        let trace = snapshot(name);
        let report = json_report(&["alloc", "--trace", trace.to_str().unwrap(), "--json"]);
        insta::assert_json_snapshot!(name, report);
    }
}

#[test]
fn defragmentation_moves_bytes_when_requests_fail() {
    let base = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "30000",
        "--occupancy",
        "92",
        "--capacity",
        "64MiB",
        "--strategy",
        "best-fit",
        "--json",
    ];
    let off = json_report(&base);
    let mut with = base.to_vec();
    with.extend(["--defrag", "on-failure"]);
    let on = json_report(&with);
    let failures_off = off["results"][0]["fragmentation_failures"]
        .as_u64()
        .unwrap();
    let failures_on = on["results"][0]["fragmentation_failures"].as_u64().unwrap();
    assert!(failures_off > 0, "the workload must fragment: {off}");
    assert!(on["results"][0]["bytes_moved"].as_u64().unwrap() > 0);
    assert!(
        failures_on < failures_off,
        "defrag did not help: {failures_on} vs {failures_off}"
    );
}

#[test]
fn plot_and_export_are_written() {
    let dir = scratch_dir();
    let svg = dir.join("mem.svg");
    let jsonl = dir.join("trace.jsonl");
    let out = gpumem(&[
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "5000",
        "--capacity",
        "128MiB",
        "--plot",
        svg.to_str().unwrap(),
        "--export-trace",
        jsonl.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg_text.starts_with("<svg") && svg_text.contains("polyline") && svg_text.contains("tlsf")
    );
    // The exported trace replays to the same digests as the generated one.
    let a = json_report(&[
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "5000",
        "--capacity",
        "128MiB",
        "--json",
    ]);
    let b = json_report(&[
        "alloc",
        "--trace",
        jsonl.to_str().unwrap(),
        "--capacity",
        "128MiB",
        "--json",
    ]);
    let digests = |v: &Value| -> Vec<String> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["digest"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(digests(&a), digests(&b));
}

#[test]
fn bad_input_is_a_clear_error_naming_file_and_line() {
    let dir = scratch_dir();
    let cases: [(&str, &str, &[&str]); 5] = [
        ("malformed.jsonl", "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 512}\n{\"t_ns\": 1, \"op\":\n", &["malformed.jsonl", ":2"]),
        ("negative.jsonl", "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": -4096}\n", &["negative.jsonl", ":1"]),
        ("huge.jsonl", "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 512}\n{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 2, \"bytes\": 18446744073709551616}\n", &["huge.jsonl", ":2"]),
        ("max.jsonl", "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 18446744073709551615}\n", &["max.jsonl", ":1"]),
        ("twice.jsonl", "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 512}\n{\"t_ns\": 5, \"op\": \"alloc\", \"id\": 1, \"bytes\": 512}\n", &["twice.jsonl", "2", "again"]),
    ];
    for (name, text, mentions) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = gpumem(&["alloc", "--trace", path.to_str().unwrap()]);
        assert_clean_error(&out, mentions);
    }
}

#[test]
fn bad_pickles_are_refused_with_the_offset() {
    let dir = scratch_dir();
    let real = std::fs::read(snapshot("cs336_bcrafton_memory_snapshot.pickle")).unwrap();
    let truncated = dir.join("truncated.pickle");
    std::fs::write(&truncated, &real[..real.len() / 3]).unwrap();
    assert_clean_error(
        &gpumem(&["alloc", "--trace", truncated.to_str().unwrap()]),
        &["truncated.pickle", "truncated"],
    );
    // protocol 2, GLOBAL 'os system', ... : a pickle that asks to import something.
    let evil = dir.join("evil.pickle");
    std::fs::write(
        &evil,
        b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    assert_clean_error(
        &gpumem(&["alloc", "--trace", evil.to_str().unwrap()]),
        &["evil.pickle", "GLOBAL"],
    );
}

#[test]
fn impossible_configs_are_refused() {
    assert_clean_error(&gpumem(&["alloc", "--capacity", "1KiB"]), &["capacity"]);
    assert_clean_error(&gpumem(&["alloc", "--alignment", "3"]), &["power of two"]);
    assert_clean_error(
        &gpumem(&["alloc", "--strategy", "worst-fit"]),
        &["unknown strategy", "tlsf"],
    );
    let missing = gpumem(&["alloc", "--trace", "/nonexistent/trace.jsonl"]);
    assert_clean_error(&missing, &["/nonexistent/trace.jsonl"]);
    // clap's own errors (a size of 2^64) exit 2 as well.
    let out = gpumem(&["alloc", "--capacity", "18446744073709551616"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("64 bits"));
    // Generators are capped at parse time, never run until killed.
    let endless = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "18446744073709551615",
    ];
    assert_clean_error(&gpumem(&endless), &["MAX_GENERATED_OPS"]);
    assert_clean_error(
        &gpumem(&["alloc", "--ops", "4000000000"]),
        &["MAX_GENERATED_STEPS"],
    );
    assert_clean_error(&gpumem(&["alloc", "--ops", "0"]), &["1 to"]);
}
