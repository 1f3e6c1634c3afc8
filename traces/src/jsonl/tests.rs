use super::*;
use proptest::prelude::*;

fn err(text: &str) -> String {
    parse_str("t.jsonl", text).unwrap_err().to_string()
}

#[test]
fn reads_the_documented_forms() {
    let t = parse_str(
        "t.jsonl",
        "# header\n\
         {\"t_ns\": 1200, \"op\": \"alloc\", \"id\": 7, \"bytes\": 4096, \"stream\": 0}\n\
         \n\
         {\"t_ns\": 1300, \"op\": \"alloc\", \"id\": 8, \"bytes\": 1, \"pinned\": true, \"stream\": 3}\r\n\
         {\"t_ns\": 1900, \"op\": \"free\", \"id\": 7}\n\
         {\"op\": \"empty_cache\", \"t_ns\": 1900}\n\
         {\"t_ns\": 2000, \"op\": \"alloc\", \"id\": 7, \"bytes\": 0}\n",
    )
    .unwrap();
    assert_eq!(t.name, "t.jsonl");
    assert_eq!(t.source, TraceSource::Jsonl);
    let lines: Vec<u64> = t.ops.iter().map(|o| o.line).collect();
    assert_eq!(lines, [2, 4, 5, 6, 7]);
    assert_eq!(
        t.ops[0].kind,
        OpKind::Alloc {
            id: 7,
            bytes: 4096,
            stream: 0,
            pinned: false
        }
    );
    assert_eq!(
        t.ops[1].kind,
        OpKind::Alloc {
            id: 8,
            bytes: 1,
            stream: 3,
            pinned: true
        }
    );
    assert_eq!(t.ops[2].kind, OpKind::Free { id: 7 });
    assert_eq!(t.ops[3].kind, OpKind::EmptyCache);
    assert_eq!(t.ops[4].t_ns, 2000);
}

#[test]
fn free_of_unknown_id_is_legal() {
    let t = parse_str("t.jsonl", r#"{"t_ns": 1, "op": "free", "id": 99}"#).unwrap();
    assert_eq!(t.summary().unknown_frees, 1);
}

#[test]
fn errors_name_file_line_and_reason() {
    let ok = r#"{"t_ns": 1, "op": "alloc", "id": 1, "bytes": 4}"#;
    let cases = [
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": 18446744073709551616}"#,
            "t.jsonl:2: bytes 18446744073709551616 exceeds the limit of 2^50",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": 1125899906842625}"#,
            "t.jsonl:2: bytes 1125899906842625 exceeds the limit of 2^50",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": -5}"#,
            "t.jsonl:2: bytes -5 is negative",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": 1.5}"#,
            "t.jsonl:2: bytes 1.5 is not an integer",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": 1e3}"#,
            "t.jsonl:2: bytes 1e3 is not an integer",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": "4"}"#,
            "t.jsonl:2: bytes must be a non-negative integer, found a string",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2}"#,
            "t.jsonl:2: missing field 'bytes'",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "bytes": 2}"#,
            "t.jsonl:2: missing field 'id'",
        ),
        (
            r#"{"op": "free", "id": 1}"#,
            "t.jsonl:2: missing field 't_ns'",
        ),
        (r#"{"t_ns": 2, "id": 1}"#, "t.jsonl:2: missing field 'op'"),
        (
            r#"{"t_ns": 2, "op": "realloc", "id": 1}"#,
            "t.jsonl:2: unknown op 'realloc' (expected alloc, free or empty_cache)",
        ),
        (
            r#"{"t_ns": 2, "op": "free", "id": 1, "color": 3}"#,
            "t.jsonl:2: unknown field 'color'",
        ),
        (
            r#"{"t_ns": 2, "op": "free", "id": 1, "bytes": 3}"#,
            "t.jsonl:2: field 'bytes' does not apply to op 'free'",
        ),
        (
            r#"{"t_ns": 2, "op": "free", "id": 1, "id": 2}"#,
            "t.jsonl:2: duplicate field 'id'",
        ),
        (
            r#"{"t_ns": 0, "op": "free", "id": 1}"#,
            "t.jsonl:2: t_ns 0 is earlier than t_ns 1 on line 1",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 1, "bytes": 4}"#,
            "t.jsonl:2: id 1 is allocated again while live (allocated on line 1)",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": 4, "stream": 4294967296}"#,
            "t.jsonl:2: stream 4294967296 does not fit in 32 bits",
        ),
        (
            r#"{"t_ns": 2, "op": "alloc", "id": 2, "bytes": 4, "pinned": 1}"#,
            "t.jsonl:2: pinned must be true or false, found a number",
        ),
        (
            r#"{"t_ns": 2, "op": "free", "id": 18446744073709551616}"#,
            "t.jsonl:2: id 18446744073709551616 does not fit in 64 bits",
        ),
        (
            r#"[1, 2]"#,
            "t.jsonl:2: expected a JSON object, found an array",
        ),
        (
            r#"{"t_ns": 2, "op": "free" "id": 1}"#,
            "t.jsonl:2: column 26: malformed JSON: expected `,` or `}`",
        ),
        (
            r#"{"t_ns": 2, "op": "free", "id": 1"#,
            "t.jsonl:2: column 33: malformed JSON: EOF while parsing an object",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(err(&format!("{ok}\n{line}\n")), want, "{line}");
    }
    let e = parse_bytes(
        Path::new("dir/x.jsonl"),
        b"{\"t_ns\": 1, \"op\": \"free\", \"id\": \xff}",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "dir/x.jsonl:1: not valid UTF-8 (byte 33 of the line)"
    );
    assert_eq!(e.location, crate::Location::Line(1));
}

#[test]
fn nested_values_of_unknown_fields_are_reported_by_name() {
    assert_eq!(
        err(r#"{"t_ns": 2, "meta": {"a": [1, "}"]}, "op": "free", "id": 1}"#),
        "t.jsonl:1: unknown field 'meta'"
    );
    assert_eq!(
        err(r#"{"t_ns": 2, "op": "free", "i\u0064": 1, "id": 2}"#),
        "t.jsonl:1: duplicate field 'id'"
    );
}

#[test]
fn write_form_is_the_documented_one() {
    let mut t = AllocTrace::new("x", TraceSource::Generated);
    t.ops = vec![
        AllocOp {
            t_ns: 1200,
            line: 1,
            kind: OpKind::Alloc {
                id: 7,
                bytes: 4096,
                stream: 0,
                pinned: false,
            },
        },
        AllocOp {
            t_ns: 1300,
            line: 2,
            kind: OpKind::Alloc {
                id: 8,
                bytes: 1,
                stream: 2,
                pinned: true,
            },
        },
        AllocOp {
            t_ns: 1900,
            line: 3,
            kind: OpKind::Free { id: 7 },
        },
        AllocOp {
            t_ns: 1900,
            line: 4,
            kind: OpKind::EmptyCache,
        },
    ];
    let mut out = Vec::new();
    write(&t, &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        "{\"t_ns\": 1200, \"op\": \"alloc\", \"id\": 7, \"bytes\": 4096, \"stream\": 0}\n\
         {\"t_ns\": 1300, \"op\": \"alloc\", \"id\": 8, \"bytes\": 1, \"stream\": 2, \"pinned\": true}\n\
         {\"t_ns\": 1900, \"op\": \"free\", \"id\": 7}\n\
         {\"t_ns\": 1900, \"op\": \"empty_cache\"}\n"
    );
    let back = parse_str("x", std::str::from_utf8(&out).unwrap()).unwrap();
    assert_eq!(back.ops, t.ops);
}

/// Ops that form a valid trace: t_ns non-decreasing, no alloc of a live id.
fn arb_ops() -> impl Strategy<Value = Vec<AllocOp>> {
    proptest::collection::vec(
        (
            0u64..1_000_000,
            0u8..8,
            0u64..20,
            0..=MAX_BYTES,
            any::<u32>(),
            any::<bool>(),
        ),
        0..200,
    )
    .prop_map(|raw| {
        let mut live = std::collections::BTreeSet::new();
        let mut t = 0u64;
        let mut ops = Vec::new();
        for (dt, kind, id, bytes, stream, pinned) in raw {
            t = t.saturating_add(dt % 3 * dt);
            let kind = match kind {
                0 => OpKind::EmptyCache,
                1..=3 => OpKind::Free { id },
                _ if live.contains(&id) => OpKind::Free { id },
                _ => OpKind::Alloc {
                    id,
                    bytes,
                    stream,
                    pinned,
                },
            };
            match kind {
                OpKind::Alloc { id, .. } => {
                    live.insert(id);
                }
                OpKind::Free { id } => {
                    live.remove(&id);
                }
                OpKind::EmptyCache => {}
            }
            let line = ops.len() as u64 + 1;
            ops.push(AllocOp {
                t_ns: t,
                line,
                kind,
            });
        }
        // Extreme values survive too.
        ops.push(AllocOp {
            t_ns: u64::MAX,
            line: ops.len() as u64 + 1,
            kind: OpKind::Free { id: u64::MAX },
        });
        ops
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn write_then_read_round_trips(ops in arb_ops()) {
        let mut t = AllocTrace::new("rt.jsonl", TraceSource::Jsonl);
        t.ops = ops;
        let mut out = Vec::new();
        write(&t, &mut out).unwrap();
        let back = parse_str("rt.jsonl", std::str::from_utf8(&out).unwrap()).unwrap();
        prop_assert_eq!(back, t);
    }

    #[test]
    fn arbitrary_lines_never_panic(s in "[{}\\[\\]\":,0-9a-z_ .e\\-\n#]{0,200}") {
        let _ = parse_str("fuzz.jsonl", &s);
    }
}

#[test]
fn input_in_errors_is_escaped_and_cut() {
    let hostile =
        "{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 1, \"\\u001b]0;x\\u0007\": 1}";
    assert_eq!(err(hostile), "t.jsonl:1: unknown field '\\u{1b}]0;x\\u{7}'");
    let long_key = format!(
        "{{\"t_ns\": 0, \"op\": \"free\", \"{}\": 1}}",
        "k".repeat(1 << 20)
    );
    let e = err(&long_key);
    assert!(e.len() < 200 && e.ends_with("… (1048576 bytes)'"), "{e}");
    let digits = format!(
        "{{\"t_ns\": 0, \"op\": \"free\", \"id\": 1{}.5}}",
        "0".repeat(1 << 20)
    );
    let e = err(&digits);
    assert!(e.len() < 200 && e.contains("is not an integer"), "{e}");
    let op = "{\"t_ns\": 0, \"op\": \"\\u0000\\u001b[2J\"}";
    assert!(
        err(op).starts_with("t.jsonl:1: unknown op '\\0\\u{1b}[2J'"),
        "{}",
        err(op)
    );
}
