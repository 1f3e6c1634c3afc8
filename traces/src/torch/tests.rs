use super::*;
use crate::error::Location;
use crate::pickle::to_bytes;

fn s(x: &str) -> Value {
    Value::Str(x.to_owned())
}

fn d(pairs: &[(&str, Value)]) -> Value {
    Value::Dict(pairs.iter().map(|(k, v)| (s(k), v.clone())).collect())
}

fn i(x: i128) -> Value {
    Value::int(x)
}

fn ev(action: &str, addr: i128, size: i128, stream: i128, time_us: i128) -> Value {
    d(&[
        ("action", s(action)),
        ("addr", i(addr)),
        ("size", i(size)),
        ("stream", i(stream)),
        ("time_us", i(time_us)),
        ("frames", Value::List(vec![])),
    ])
}

fn block(addr: Option<i128>, size: i128, requested: Option<i128>, state: &str) -> Value {
    let mut p = vec![("size", i(size)), ("state", s(state))];
    if let Some(a) = addr {
        p.push(("address", i(a)));
    }
    if let Some(r) = requested {
        p.push(("requested_size", i(r)));
    }
    d(&p)
}

fn segment(device: i128, addr: i128, total: i128, kind: &str, blocks: Vec<Value>) -> Value {
    d(&[
        ("device", i(device)),
        ("address", i(addr)),
        ("total_size", i(total)),
        ("stream", i(0)),
        ("segment_type", s(kind)),
        ("is_expandable", Value::Bool(false)),
        ("blocks", Value::List(blocks)),
    ])
}

fn snapshot(segments: Vec<Value>, traces: Vec<Vec<Value>>) -> Value {
    d(&[
        ("segments", Value::List(segments)),
        (
            "device_traces",
            Value::List(traces.into_iter().map(Value::List).collect()),
        ),
        (
            "allocator_settings",
            d(&[("expandable_segments", Value::Bool(false))]),
        ),
        ("unknown_future_key", i(1)),
    ])
}

fn convert(v: &Value) -> Result<AllocTrace, TraceError> {
    parse_bytes(Path::new("snap.pickle"), &to_bytes(v))
}

fn alloc(id: u64, bytes: u64, stream: u32) -> OpKind {
    OpKind::Alloc {
        id,
        bytes,
        stream,
        pinned: false,
    }
}

#[test]
fn trace_replay() {
    let t0 = 1_700_000_000_000_000i128;
    let trace = vec![
        ev("alloc", 0x1000, 100, 0, t0),                    // 1
        ev("alloc", 0x2000, 200, 0x7f00_dead_0000, t0 + 2), // 2
        ev("free_requested", 0x1000, 100, 0, t0 + 3),       // 3 skipped
        ev("free_completed", 0x1000, 100, 0, t0 + 4),       // 4
        ev("segment_free", 0x1000, 2 << 20, 0, t0 + 5),     // 5 EmptyCache
        ev("segment_unmap", 0x9000, 2 << 20, 0, t0 + 5),    // 6 same run: skipped
        d(&[
            ("action", s("oom")),
            ("device_free", i(5)),
            ("size", i(1 << 30)),
        ]), // 7
        ev("segment_alloc", 0x3000, 2 << 20, 0, t0 + 8),    // 8 skipped
        ev("segment_free", 0x3000, 2 << 20, 0, t0 + 9),     // 9 follows a segment entry: skipped
        ev("snapshot", 0, 300, 0, t0 + 10),                 // 10 skipped
        ev("free_completed", 0x5000, 8, 0, t0 + 11),        // 11 unknown id: still a Free
        ev("alloc", 0x6000, 8, 0x7f00_beef_0000, t0 + 12),  // 12
        ev("alloc", 0x7000, 8, 0x7f00_dead_0000, t0 + 13),  // 13
        d(&[("action", s("some_future_action"))]),          // 14 skipped
    ];
    let n = trace.len() as u64;
    let seg = segment(
        0,
        0x2000,
        2 << 20,
        "small",
        vec![
            block(Some(0x2000 + 512), (2 << 20) - 512, Some(0), "inactive"),
            block(Some(0x2000), 512, Some(200), "active_allocated"),
        ],
    );
    let t = convert(&snapshot(vec![seg], vec![trace])).unwrap();
    assert_eq!(t.name, "snap.pickle");
    assert_eq!(t.source, TraceSource::TorchTrace);
    let got: Vec<(u64, u64, OpKind)> = t.ops.iter().map(|o| (o.line, o.t_ns, o.kind)).collect();
    assert_eq!(
        got,
        vec![
            (1, 0, alloc(0x1000, 100, 0)),
            (2, 2000, alloc(0x2000, 200, 1)),
            (4, 4000, OpKind::Free { id: 0x1000 }),
            (5, 5000, OpKind::EmptyCache),
            (11, 11_000, OpKind::Free { id: 0x5000 }),
            (12, 12_000, alloc(0x6000, 8, 2)),
            (13, 13_000, alloc(0x7000, 8, 1)),
        ]
    );
    assert_eq!(t.recorded_ooms, 1);
    assert_eq!(t.skipped_events, 6);
    assert_eq!(t.ops.len() as u64 + t.recorded_ooms + t.skipped_events, n);
    assert_eq!(
        t.recorded_segments,
        Some(vec![RecordedSegment {
            address: 0x2000,
            stream: 0,
            total_bytes: 2 << 20,
            small_pool: true,
            expandable: false,
            blocks: vec![(512, true), ((2 << 20) - 512, false)],
        }])
    );
}

#[test]
fn segment_free_at_the_start_is_an_empty_cache_and_time_us_may_be_missing() {
    let strip = |e: Value| match e {
        Value::Dict(p) => Value::Dict(
            p.into_iter()
                .filter(|(k, _)| k.as_str() != Some("time_us"))
                .collect(),
        ),
        v => v,
    };
    let trace = vec![
        strip(ev("segment_free", 1, 2, 0, 0)),
        strip(ev("alloc", 1, 2, 0, 0)),
        strip(ev("segment_map", 1, 2, 0, 0)),
        strip(ev("alloc", 3, 2, 0, 0)),
    ];
    let t = convert(&snapshot(vec![], vec![trace])).unwrap();
    let got: Vec<(u64, OpKind)> = t.ops.iter().map(|o| (o.t_ns, o.kind)).collect();
    assert_eq!(
        got,
        vec![
            (0, OpKind::EmptyCache),
            (1000, alloc(1, 2, 0)),
            (3000, alloc(3, 2, 0)),
        ]
    );
    assert_eq!(t.skipped_events, 1);
    assert_eq!(t.recorded_segments, Some(vec![]));
}

#[test]
fn device_with_most_allocs_is_chosen() {
    let a = |addr| ev("alloc", addr, 8, 0, 0);
    let traces = vec![
        vec![ev("free_completed", 1, 8, 0, 0)],
        vec![a(1), a(2)],
        vec![a(3), a(4)],
    ];
    let segs = vec![
        segment(
            0,
            0x100,
            64,
            "large",
            vec![block(Some(0x100), 64, None, "inactive")],
        ),
        segment(
            1,
            0x200,
            64,
            "large",
            vec![block(Some(0x200), 64, None, "inactive")],
        ),
        segment(
            2,
            0x300,
            64,
            "large",
            vec![block(Some(0x300), 64, None, "inactive")],
        ),
    ];
    let t = convert(&snapshot(segs, traces)).unwrap();
    assert_eq!(t.ops.len(), 2);
    assert_eq!(t.ops[0].kind, alloc(1, 8, 0));
    let rs = t.recorded_segments.unwrap();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].address, 0x200);
}

#[test]
fn the_trace_carries_its_devices_recording_with_the_ops_stream_numbers() {
    // Device 0's trace names stream 0x77 first, so the recording (streams numbered over the
    // whole file) calls device 1's 0x99 stream 2; the trace of device 1 (chosen: most allocs)
    // calls it 1, and so must the recording it carries.
    let traces = vec![
        vec![ev("alloc", 0x10, 512, 0x77, 0)],
        vec![
            ev("segment_alloc", 0x200, 2 << 20, 0x99, 1),
            ev("alloc", 0x200, 512, 0x99, 1),
            ev("free_completed", 0x400, 512, 0x99, 2),
            ev("alloc", 0x400, 512, 0x99, 3),
        ],
    ];
    let mut seg = segment(
        1,
        0x200,
        2 << 20,
        "small",
        vec![
            block(Some(0x200), 512, Some(512), "active_allocated"),
            block(Some(0x400), 512, Some(512), "active_allocated"),
            block(Some(0x600), (2 << 20) - 1024, None, "inactive"),
        ],
    );
    if let Value::Dict(pairs) = &mut seg {
        for (k, v) in pairs.iter_mut() {
            if *k == s("stream") {
                *v = i(0x99);
            }
        }
    }
    let t = convert(&snapshot(vec![seg], traces)).unwrap();
    assert_eq!(t.ops[0].kind, alloc(0x200, 512, 1));
    let held = t
        .recording
        .as_deref()
        .expect("a snapshot carries its recording");
    let rec = held.as_ref().expect("readable as a recording");
    assert_eq!(rec.device.device, 1);
    assert_eq!(
        rec.event_ops, None,
        "the trace has allocs: its own ops are the events'"
    );
    assert!(rec.device.events.iter().all(|e| e.stream == 1));
    assert_eq!(rec.device.events.len(), 4);
    assert!(rec.device.segments.iter().all(|s| s.stream == 1));
    // Written out and read back (JSON Lines), a trace has no recording.
    let json = serde_json::to_string(&t).unwrap();
    let back: AllocTrace = serde_json::from_str(&json).unwrap();
    assert_eq!(back.recording, None);
}

#[test]
fn a_snapshot_without_allocs_carries_the_ops_of_its_events() {
    // One free and no alloc: the ops allocate the final live block; the recording keeps the
    // free as the op a replay from the state before it runs.
    let traces = vec![vec![ev("free_completed", 0x400, 512, 0, 5)]];
    let seg = segment(
        0,
        0x200,
        2 << 20,
        "small",
        vec![
            block(Some(0x200), 512, Some(512), "active_allocated"),
            block(Some(0x400), (2 << 20) - 512, None, "inactive"),
        ],
    );
    let t = convert(&snapshot(vec![seg], traces)).unwrap();
    assert_eq!(t.source, TraceSource::TorchState);
    assert_eq!(t.ops.len(), 1);
    let held = t.recording.as_deref().unwrap().as_ref().unwrap();
    let ops = held.event_ops.as_ref().expect("the events as ops");
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].kind, OpKind::Free { id: 0x400 });
    assert_eq!(ops[0].line, 1);
}

#[test]
fn state_only_snapshot_synthesises_live_blocks() {
    // torch 2.0 layout: no block address (history instead), no time_us; segments unsorted;
    // most segments on device 1 and no alloc anywhere.
    let hist = |a: i128| {
        Value::List(vec![d(&[
            ("addr", i(a)),
            ("real_size", i(1)),
            ("frames", Value::List(vec![])),
        ])])
    };
    let old_block = |size: i128, req: Option<i128>, state: &str, a: i128| {
        let mut p = vec![("size", i(size)), ("state", s(state)), ("history", hist(a))];
        if let Some(r) = req {
            p.push(("requested_size", i(r)));
        }
        d(&p)
    };
    let segs = vec![
        segment(
            1,
            0x9000,
            0x300,
            "large",
            vec![
                old_block(0x100, Some(0xf0), "active_pending_free", 0x9000),
                old_block(0x100, None, "inactive", 0x9100),
                old_block(0x100, None, "active_awaiting_free", 0x9200),
            ],
        ),
        segment(
            1,
            0x1000,
            0x200,
            "large",
            vec![
                old_block(0x80, Some(0x7f), "active_allocated", 0x1000),
                old_block(0x180, Some(0x17f), "active_allocated", 0x1080),
            ],
        ),
        segment(
            0,
            0x50000,
            0x100,
            "large",
            vec![old_block(0x100, Some(1), "active_allocated", 0)],
        ),
    ];
    let traces = vec![
        vec![d(&[
            ("action", s("snapshot")),
            ("addr", i(0)),
            ("size", i(5)),
        ])],
        vec![d(&[
            ("action", s("oom")),
            ("device_free", i(0)),
            ("size", i(5)),
        ])],
    ];
    let t = convert(&snapshot(segs, traces)).unwrap();
    assert_eq!(t.source, TraceSource::TorchState);
    let got: Vec<OpKind> = t.ops.iter().map(|o| o.kind).collect();
    assert_eq!(
        got,
        vec![
            alloc(0x1000, 0x7f, 0),
            alloc(0x1080, 0x17f, 0),
            alloc(0x9000, 0xf0, 0),
            alloc(0x9200, 0x100, 0),
        ]
    );
    assert!(t.ops.iter().all(|o| o.t_ns == 0));
    assert_eq!(
        t.ops.iter().map(|o| o.line).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(t.recorded_ooms, 1);
    assert_eq!(t.skipped_events, 0);
    let rs = t.recorded_segments.unwrap();
    assert_eq!(
        rs.iter().map(|s| s.address).collect::<Vec<_>>(),
        [0x1000, 0x9000]
    );
    assert_eq!(
        rs[1].blocks,
        vec![(0x100, true), (0x100, false), (0x100, true)]
    );
}

fn err_of(v: &Value) -> TraceError {
    convert(v).unwrap_err()
}

#[test]
fn validation_errors() {
    let one = |e: Value| snapshot(vec![], vec![vec![ev("alloc", 1, 1, 0, 0), e]]);
    let e = err_of(&one(ev("alloc", 2, -5, 0, 0)));
    assert_eq!(e.location, Location::Event(2));
    assert_eq!(e.to_string(), "snap.pickle: event 2: size -5 is negative");
    let e = err_of(&one(ev("alloc", 2, 1 << 64, 0, 0)));
    assert_eq!(
        e.to_string(),
        "snap.pickle: event 2: size 18446744073709551616 exceeds the limit of 2^50 bytes"
    );
    let e = err_of(&one(ev("alloc", -2, 5, 0, 0)));
    assert_eq!(e.to_string(), "snap.pickle: event 2: addr -2 is negative");
    let e = err_of(&one(ev("alloc", 2, 5, -1, 0)));
    assert_eq!(e.to_string(), "snap.pickle: event 2: stream -1 is negative");
    let e = err_of(&one(d(&[("action", s("alloc")), ("size", i(4))])));
    assert_eq!(e.to_string(), "snap.pickle: event 2: missing key 'addr'");
    let e = err_of(&one(d(&[("action", s("free_completed"))])));
    assert_eq!(e.to_string(), "snap.pickle: event 2: missing key 'addr'");
    let e = err_of(&one(d(&[("addr", i(4))])));
    assert_eq!(e.to_string(), "snap.pickle: event 2: missing key 'action'");
    let e = err_of(&one(d(&[
        ("action", s("alloc")),
        ("addr", i(4)),
        ("size", s("4")),
    ])));
    assert_eq!(
        e.to_string(),
        "snap.pickle: event 2: size must be an integer, found a string"
    );
    let e = err_of(&one(i(3)));
    assert_eq!(
        e.to_string(),
        "snap.pickle: event 2: a trace entry must be a dict, found an integer"
    );

    let e = err_of(&d(&[("device_traces", Value::List(vec![]))]));
    assert_eq!(e.location, Location::File);
    assert_eq!(e.to_string(), "snap.pickle: missing key 'segments'");
    let e = err_of(&d(&[("segments", Value::List(vec![]))]));
    assert_eq!(e.to_string(), "snap.pickle: missing key 'device_traces'");
    let e = err_of(&Value::List(vec![]));
    assert_eq!(
        e.to_string(),
        "snap.pickle: a snapshot must be a dict, found a list"
    );
    let e = err_of(&d(&[
        ("segments", i(1)),
        ("device_traces", Value::List(vec![])),
    ]));
    assert_eq!(
        e.to_string(),
        "snap.pickle: 'segments' must be a list, found an integer"
    );

    let seg = |b: Value| {
        snapshot(
            vec![segment(
                0,
                0,
                64,
                "large",
                vec![block(Some(0), 64, None, "inactive"), b],
            )],
            vec![],
        )
    };
    let e = err_of(&seg(block(Some(64), -1, None, "inactive")));
    assert_eq!(
        e.to_string(),
        "snap.pickle: segments[0].blocks[1]: size -1 is negative"
    );
    let e = err_of(&seg(block(Some(64), 1, None, "frozen")));
    assert_eq!(
        e.to_string(),
        "snap.pickle: segments[0].blocks[1]: unknown block state 'frozen'"
    );
    let e = err_of(&seg(block(Some(64), 1, Some(1 << 51), "active_allocated")));
    assert_eq!(
        e.to_string(),
        "snap.pickle: segments[0].blocks[1]: requested_size 2251799813685248 exceeds the limit of 2^50 bytes"
    );
    let e = err_of(&snapshot(
        vec![d(&[("address", i(0)), ("blocks", Value::List(vec![]))])],
        vec![],
    ));
    assert_eq!(
        e.to_string(),
        "snap.pickle: segments[0]: missing key 'total_size'"
    );
}

#[test]
fn pickle_errors_carry_the_byte_offset() {
    let e = parse_bytes(Path::new("x.pickle"), b"\x80\x02cos\nsystem\n.").unwrap_err();
    assert_eq!(e.location, Location::ByteOffset(2));
    assert_eq!(
        e.to_string(),
        "x.pickle: byte 2: pickle asks to import a global (GLOBAL 'os system'): refused, snapshots are plain values"
    );
    let e = parse_bytes(Path::new("x.pickle"), b"\x80\x04}").unwrap_err();
    assert_eq!(
        e.to_string(),
        "x.pickle: byte 3: truncated at byte 3: no STOP opcode"
    );
}

#[test]
fn load_alloc_trace_sniffs_the_format() {
    let dir = std::env::temp_dir().join(format!("gpumem-traces-sniff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = snapshot(vec![], vec![vec![ev("alloc", 1, 1, 0, 0)]]);
    let p4 = dir.join("a.bin");
    std::fs::write(&p4, to_bytes(&snap)).unwrap();
    assert_eq!(
        crate::load_alloc_trace(&p4).unwrap().source,
        TraceSource::TorchTrace
    );
    // A protocol-0 pickle (starts with MARK) is a pickle too, even if it is not a snapshot.
    let p0 = dir.join("b.bin");
    std::fs::write(&p0, b"(dp0\nVsegments\np1\n(lp2\ns.").unwrap();
    let e = crate::load_alloc_trace(&p0).unwrap_err();
    assert!(
        e.to_string().ends_with("missing key 'device_traces'"),
        "{e}"
    );
    let pj = dir.join("c.jsonl");
    std::fs::write(
        &pj,
        "{\"t_ns\": 1, \"op\": \"alloc\", \"id\": 1, \"bytes\": 8}\n",
    )
    .unwrap();
    let t = crate::load_alloc_trace(&pj).unwrap();
    assert_eq!((t.source, t.name.as_str()), (TraceSource::Jsonl, "c.jsonl"));
    let e = crate::load_alloc_trace(&dir.join("missing")).unwrap_err();
    assert!(e.to_string().contains("cannot read the file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
