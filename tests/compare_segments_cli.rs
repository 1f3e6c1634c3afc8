//! `gpumem alloc --compare-segments` end to end: a snapshot pickle whose traces hold every kind
//! of entry (segment_alloc / segment_free, free_requested before a late free_completed,
//! empty_cache runs, OOM-retry releases, oom) on two devices, made by running `caching` itself,
//! replays to every event matched; a changed recording diverges where it was changed; the
//! shared snapshots; bad flags.

mod common;

use common::*;
use gpumem_core::alloc::caching::{Caching, CachingSettings};
use gpumem_core::alloc::{AllocConfig, AllocRequest, Allocate, MIB};
use gpumem_core::books::Books;
use gpumem_core::decision::AllocId;
use gpumem_core::executor::Ledger;
use gpumem_traces::pickle::{to_bytes, Value};
use std::path::Path;

/// A `cudaStream_t` value: streams are pointers in a recording.
const SIDE_STREAM: i128 = 0x5612_3400_0000;

fn s(x: &str) -> Value {
    Value::Str(x.to_owned())
}

fn d(pairs: Vec<(&str, Value)>) -> Value {
    Value::Dict(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

fn stream_value(stream: u32) -> Value {
    Value::int(if stream == 0 { 0 } else { SIDE_STREAM })
}

fn entry(action: &str, addr: u64, size: u64, stream: u32) -> Value {
    d(vec![
        ("action", s(action)),
        ("addr", Value::int(addr.into())),
        ("size", Value::int(size.into())),
        ("stream", stream_value(stream)),
    ])
}

/// Runs `caching` on a device of `capacity_bytes` through a fixed mix of requests (seeded by
/// `seed`) and records it as PyTorch would: its trace entries and its final segments.
fn record(seed: u64, capacity_bytes: u64) -> (Vec<Value>, Vec<Value>) {
    let config = AllocConfig {
        capacity_bytes,
        ..AllocConfig::default()
    };
    let mut a = Caching::with_settings(&config, CachingSettings::default());
    a.record_segment_events(true);
    let mut mem = Ledger::new(Books::new(capacity_bytes));
    let mut trace = Vec::new();
    let mut live: Vec<(AllocId, u64, u64)> = Vec::new();
    let mut pending: Vec<(AllocId, u64, u64)> = Vec::new();
    let mut x = seed | 1;
    let mut next = || {
        // xorshift64: a fixed, seeded mix of operations, no more.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let segment_entries = |a: &mut Caching, trace: &mut Vec<Value>| {
        for e in a.take_segment_events() {
            trace.push(entry(e.kind.action(), e.address, e.bytes, e.stream));
        }
    };
    for n in 0..600u64 {
        let r = next();
        match r % 10 {
            0..=4 => {
                let bytes = match (r >> 8) % 3 {
                    0 => 1 + (r >> 16) % MIB,
                    1 => MIB + (r >> 16) % (9 * MIB),
                    _ => 10 * MIB + (r >> 16) % (30 * MIB),
                };
                let stream = ((r >> 40) % 2) as u32;
                let id = AllocId(n);
                let req = AllocRequest {
                    id,
                    bytes,
                    stream,
                    pinned: false,
                };
                let at = a.alloc(req, &mut mem);
                for &(pid, addr, b) in pending.iter().filter(|p| !a.holds(p.0)) {
                    let _ = pid;
                    trace.push(entry("free_completed", addr, b, 0));
                }
                pending.retain(|p| a.holds(p.0));
                segment_entries(&mut a, &mut trace);
                match at {
                    Ok(at) => {
                        let addr = a.address_of(at).unwrap();
                        trace.push(entry("alloc", addr, bytes, stream));
                        live.push((id, addr, bytes));
                    }
                    Err(_) => {
                        let rounded = a.round_size(bytes).unwrap();
                        let mut oom = entry("oom", 0, rounded, stream);
                        if let Value::Dict(p) = &mut oom {
                            p.retain(|(k, _)| *k != s("addr"));
                            p.push((s("device_free"), Value::int(0)));
                        }
                        trace.push(oom);
                    }
                }
            }
            5..=8 if !live.is_empty() => {
                let (id, addr, bytes) = live.remove((r >> 8) as usize % live.len());
                trace.push(entry("free_requested", addr, bytes, 0));
                if r % 10 == 8 {
                    a.free_requested(id);
                    pending.push((id, addr, bytes));
                } else {
                    a.free(id, &mut mem);
                    trace.push(entry("free_completed", addr, bytes, 0));
                }
            }
            9 => {
                for (_, addr, bytes) in std::mem::take(&mut pending) {
                    trace.push(entry("free_completed", addr, bytes, 0));
                }
                a.empty_cache(&mut mem);
                segment_entries(&mut a, &mut trace);
            }
            _ => {}
        }
    }
    let segments = a
        .recorded_layout()
        .into_iter()
        .map(|seg| {
            let mut addr = seg.address;
            let blocks = seg
                .blocks
                .iter()
                .map(|&(bytes, used)| {
                    let state = match (used, pending.iter().any(|p| p.1 == addr)) {
                        (false, _) => "inactive",
                        (true, true) => "active_pending_free",
                        (true, false) => "active_allocated",
                    };
                    let b = d(vec![
                        ("address", Value::int(addr.into())),
                        ("size", Value::int(bytes.into())),
                        ("requested_size", Value::int(bytes.into())),
                        ("state", s(state)),
                    ]);
                    addr += bytes;
                    b
                })
                .collect();
            d(vec![
                ("address", Value::int(seg.address.into())),
                ("total_size", Value::int(seg.bytes.into())),
                ("stream", stream_value(seg.stream)),
                (
                    "segment_type",
                    s(
                        if seg.size_pool == gpumem_core::alloc::caching::SizePool::Small {
                            "small"
                        } else {
                            "large"
                        },
                    ),
                ),
                (
                    "segment_pool_id",
                    Value::Tuple(vec![Value::int(0), Value::int(0)]),
                ),
                ("is_expandable", Value::Bool(false)),
                ("blocks", Value::List(blocks)),
            ])
        })
        .collect();
    (trace, segments)
}

/// Two devices, each its own allocator; device 1's segments say so.
fn write_snapshot(edit: impl Fn(&mut Vec<Value>)) -> ScratchFile {
    let (mut t0, s0) = record(7, 256 * MIB);
    let (t1, s1) = record(99, 192 * MIB);
    edit(&mut t0);
    let with_device = |segs: Vec<Value>, device: i128| -> Vec<Value> {
        segs.into_iter()
            .map(|mut v| {
                if let Value::Dict(p) = &mut v {
                    p.push((s("device"), Value::int(device)));
                }
                v
            })
            .collect()
    };
    let mut segments = with_device(s0, 0);
    segments.extend(with_device(s1, 1));
    let root = d(vec![
        ("segments", Value::List(segments)),
        (
            "device_traces",
            Value::List(vec![Value::List(t0), Value::List(t1)]),
        ),
        (
            "allocator_settings",
            d(vec![
                ("max_split_size", Value::int(-1)),
                ("expandable_segments", Value::Bool(false)),
            ]),
        ),
    ]);
    let path = scratch_file("made.pickle");
    std::fs::write(&path, to_bytes(&root)).unwrap();
    path
}

fn compare_json(path: &Path) -> serde_json::Value {
    let out = gpumem(&[
        "alloc",
        "--trace",
        path.to_str().unwrap(),
        "--strategy",
        "caching",
        "--compare-segments",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["results"][0]["segments"].clone()
}

#[test]
fn a_recording_of_caching_on_two_devices_replays_to_every_event() {
    let path = write_snapshot(|_| {});
    let seg = compare_json(&path);
    let n = |k: &str| seg[k].as_u64().unwrap();
    assert!(n("events_recorded") > 50, "{seg}");
    assert_eq!(n("events_matched"), n("events_recorded"), "{seg}");
    assert_eq!(n("final_matched"), n("final_recorded"), "{seg}");
    assert!(seg["first_divergence"].is_null());
    let devices = seg["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for dev in devices {
        assert!(dev["releases_replayed"].as_u64().unwrap() > 0, "{dev}");
        assert_eq!(dev["allocs_at_recorded_address"], dev["allocs"], "{dev}");
        assert_eq!(dev["ooms_simulated"], dev["ooms_recorded"], "{dev}");
    }
    let ooms: u64 = devices
        .iter()
        .map(|d| d["ooms_recorded"].as_u64().unwrap())
        .sum();
    assert!(ooms > 0, "the devices are small enough to refuse: {seg}");
    // Text: the counts and 100%; twice, byte for byte.
    let args = [
        "alloc",
        "--trace",
        path.to_str().unwrap(),
        "--strategy",
        "caching",
        "--compare-segments",
    ];
    let (a, b) = (gpumem(&args), gpumem(&args));
    assert_eq!(a.stdout, b.stdout);
    let text = stdout(&a);
    assert!(text.contains("matched in order (100.0%)"), "{text}");
    assert!(text.contains("device 1: from the restored state"), "{text}");
}

#[test]
fn a_changed_recording_diverges_at_the_changed_event() {
    // The third segment_alloc of device 0 claims 2 MiB more than the allocator reserves.
    let path = write_snapshot(|trace| {
        let third = trace
            .iter_mut()
            .filter(|e| e.get("action").and_then(Value::as_str) == Some("segment_alloc"))
            .nth(2)
            .unwrap();
        if let Value::Dict(p) = third {
            for (k, v) in p.iter_mut() {
                if *k == s("size") {
                    *v = Value::int(v.as_i128().unwrap() + 2 * MIB as i128);
                }
            }
        }
    });
    let seg = compare_json(&path);
    let dev0 = &seg["devices"][0];
    let div = &dev0["first_divergence"];
    let at = div["event"].as_u64().unwrap();
    assert_eq!(dev0["events_matched"].as_u64().unwrap(), at - 1, "{seg}");
    assert!(at <= 3, "{div}");
    assert!(
        div["recorded"].as_str().unwrap().contains("segment_alloc"),
        "{div}"
    );
    assert!(div["cause"].as_str().unwrap().contains("alloc of"), "{div}");
    // Device 1 is untouched.
    let dev1 = &seg["devices"][1];
    assert_eq!(dev1["events_matched"], dev1["events_recorded"]);
}

#[test]
fn the_shared_snapshots_compare_in_full() {
    for (name, finals) in [
        ("cs336_magma27_memory_snapshot.pickle", 216),
        ("cs336_bcrafton_memory_snapshot.pickle", 96),
    ] {
        let seg = compare_json(&snapshot(name));
        assert_eq!(seg["final_recorded"], finals, "{name}");
        assert_eq!(seg["final_matched"], finals, "{name}");
        assert_eq!(
            seg["devices"][0]["allocs_at_recorded_address"],
            seg["devices"][0]["allocs"]
        );
    }
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let trace = snapshot("yiyi_oom_snapshot.pickle");
    let t = trace.to_str().unwrap();
    let out = gpumem(&[
        "alloc",
        "--trace",
        t,
        "--strategy",
        "tlsf",
        "--compare-segments",
    ]);
    assert_clean_error(&out, &["--compare-segments", "caching"]);
    let out = gpumem(&["alloc", "--strategy", "caching", "--compare-segments"]);
    assert_clean_error(&out, &["--trace"]);
    for (conf, says) in [
        ("max_split_size_mb:10", "must be > 20"),
        (
            "expandable_segment:True",
            "unknown key 'expandable_segment'",
        ),
        ("roundup_power2_divisions:3", "power of two"),
        ("garbage_collection_threshold:1.5", "(0, 1)"),
    ] {
        let out = gpumem(&["alloc", "--trace", t, "--pytorch-alloc-conf", conf]);
        assert_clean_error(&out, &["--pytorch-alloc-conf", says]);
    }
    // A JSON Lines trace records no segment: nothing to compare with.
    let dir = scratch_dir();
    let jsonl = dir.join("t.jsonl");
    std::fs::write(
        &jsonl,
        "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 4096}\n",
    )
    .unwrap();
    let out = gpumem(&[
        "alloc",
        "--trace",
        jsonl.to_str().unwrap(),
        "--strategy",
        "caching",
        "--compare-segments",
    ]);
    assert_clean_error(&out, &["snapshot"]);
}

#[test]
fn pytorch_alloc_conf_changes_what_caching_does() {
    let trace = snapshot("cs336_bcrafton_memory_snapshot.pickle");
    let t = trace.to_str().unwrap();
    let peak = |conf: Option<&str>| {
        let mut args = vec!["alloc", "--trace", t, "--strategy", "caching", "--json"];
        if let Some(c) = conf {
            args.extend(["--pytorch-alloc-conf", c]);
        }
        let out = gpumem(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        v["results"][0]["bytes_allocated_peak"].as_u64().unwrap()
    };
    // Power-of-two divisions round requests up: more bytes allocated at the peak.
    assert!(peak(Some("roundup_power2_divisions:2")) > peak(None));
    assert_eq!(peak(Some("backend:native")), peak(None));
}
