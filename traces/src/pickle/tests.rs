use super::*;
use proptest::prelude::*;

#[path = "fixtures.rs"]
mod fixtures;

pub(crate) fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn s(x: &str) -> Value {
    Value::Str(x.to_owned())
}

fn i(x: i64) -> Value {
    Value::Int(x)
}

/// The value the fixtures of `fixtures::PROTOCOLS` hold.
fn sample(p: usize) -> Value {
    let mut pairs = vec![
        (
            s("a"),
            Value::List(vec![
                i(1),
                i(-2),
                Value::Float(3.5),
                Value::None,
                Value::Bool(true),
                Value::Bool(false),
                s("é\u{1234}"),
                Value::Tuple(vec![i(1), i(2)]),
                Value::BigInt(1 << 63),
                Value::BigInt(-(1 << 70)),
                i(300),
                i(70000),
                i(-1),
                i(1 << 31),
                s(""),
            ]),
        ),
        (s("b"), Value::Dict(vec![])),
        (s("c"), Value::Tuple(vec![])),
        (
            s("d"),
            Value::List(vec![
                Value::List(vec![]),
                Value::List(vec![Value::List(vec![])]),
            ]),
        ),
        (s("long"), s(&"x".repeat(300))),
        (
            s("tup3"),
            Value::Tuple(vec![
                i(1),
                Value::Tuple(vec![i(2)]),
                Value::Tuple(vec![i(3), i(4), i(5)]),
            ]),
        ),
    ];
    if p >= 3 {
        pairs.push((s("bytes"), Value::Bytes(b"xy\0".to_vec())));
    }
    if p >= 4 {
        pairs.push((s("set"), Value::List(vec![i(7)])));
        pairs.push((s("fs"), Value::List(vec![i(8)])));
    }
    if p >= 5 {
        pairs.push((s("ba"), Value::Bytes(b"z".to_vec())));
    }
    Value::Dict(pairs)
}

#[test]
fn all_protocols_parse() {
    for (p, hex) in fixtures::PROTOCOLS.iter().enumerate() {
        let v = parse(&unhex(hex)).unwrap_or_else(|e| panic!("protocol {p}: {e}"));
        assert_eq!(v, sample(p), "protocol {p}");
    }
}

#[test]
fn shared_references_resolve() {
    for hex in [
        fixtures::SHARED_P0,
        fixtures::SHARED_P2,
        fixtures::SHARED_P4,
    ] {
        let v = parse(&unhex(hex)).unwrap();
        let x = Value::List(vec![i(1)]);
        assert_eq!(v, Value::Dict(vec![(s("k"), x.clone()), (s("j"), x)]));
    }
}

#[test]
fn memoized_container_mutated_later_is_seen_by_references() {
    // EMPTY_LIST MEMOIZE, then GET 0 into a tuple *before* the APPEND: the tuple must see the
    // appended item, as in Python.
    let data = [
        0x80, 4, b']', 0x94, // x = []   (memo 0)
        0x85, // t = (x,)
        b'h', 0, // push x again
        b'K', 9, b'a', // x.append(9)
        b'0', // pop x, leaving t
        b'.',
    ];
    assert_eq!(
        parse(&data).unwrap(),
        Value::Tuple(vec![Value::List(vec![i(9)])])
    );
}

#[test]
fn recursive_structure_is_refused() {
    let e = parse(&unhex(fixtures::RECURSIVE)).unwrap_err();
    assert!(e.reason.contains("recursive"), "{e}");
}

#[test]
fn exponential_memo_expansion_is_refused() {
    // l0 = [1]; l1 = [l0, l0]; l2 = [l1, l1] ... 2^60 values once expanded.
    let mut data = vec![0x80, 4, b']', b'K', 1, b'a', 0x94];
    for k in 0..60u8 {
        data.extend_from_slice(&[b']', b'(', b'h', k, b'h', k, b'e', 0x94]);
    }
    data.push(b'.');
    let limits = Limits {
        max_memory_bytes: 64 << 20,
        ..Limits::default()
    };
    let e = parse_with_limits(&data, &limits).unwrap_err();
    assert!(e.reason.contains("memory budget of 67108864 bytes"), "{e}");
}

#[test]
fn a_flood_of_dups_is_refused_by_the_absolute_budget() {
    // [x] then DUP DUP DUP ... under one APPENDS: every DUP is one more list entry and value.
    let dups = 1_000_000;
    let mut data = vec![0x80, 4, b']', b'(', b'K', 7];
    data.resize(data.len() + dups, b'2');
    data.extend_from_slice(b"e.");
    let small = Limits {
        max_memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let e = parse_with_limits(&data, &small).unwrap_err();
    assert!(e.reason.contains("memory budget"), "{e}");
    // Within the default budget the same file parses: the budget is absolute, not a refusal of
    // large inputs.
    match parse(&data).unwrap() {
        Value::List(items) => assert_eq!(items.len(), dups + 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowing() {
    let mut data = vec![0x80, 4];
    data.resize(data.len() + 100_000, b']');
    data.resize(data.len() + 99_999, b'a');
    data.push(b'.');
    let e = parse(&data).unwrap_err();
    assert!(e.reason.contains("deeper than"), "{e}");
}

#[test]
fn global_is_refused_with_opcode_and_offset() {
    let e = parse(b"\x80\x02cos\nsystem\n.").unwrap_err();
    assert_eq!(e.offset, 2);
    assert_eq!(
        e.to_string(),
        "byte 2: pickle asks to import a global (GLOBAL 'os system'): refused, snapshots are plain values"
    );
    let e = parse(&unhex(fixtures::BYTEARRAY_P2)).unwrap_err();
    assert!(e.reason.contains("GLOBAL '__builtin__ bytearray'"), "{e}");
}

#[test]
fn stack_global_is_refused() {
    let e = parse(&unhex(fixtures::STACK_GLOBAL)).unwrap_err();
    assert!(e.reason.contains("STACK_GLOBAL 'posix system'"), "{e}");
    assert!(e.reason.contains("refused"), "{e}");
    assert_eq!(e.offset, 28);
}

#[test]
fn every_refused_opcode_is_named() {
    for (code, name) in [
        (b'R', "REDUCE"),
        (b'b', "BUILD"),
        (b'o', "OBJ"),
        (0x81, "NEWOBJ"),
        (0x92, "NEWOBJ_EX"),
        (0x82, "EXT1"),
        (0x83, "EXT2"),
        (0x84, "EXT4"),
        (b'Q', "BINPERSID"),
        (b'P', "PERSID"),
        (0x97, "NEXT_BUFFER"),
        (0x98, "READONLY_BUFFER"),
    ] {
        let e = parse(&[0x80, 2, b'N', b')', code, b'.']).unwrap_err();
        assert_eq!(e.offset, 4, "{name}");
        assert!(e.reason.contains(&format!("({name})")), "{name}: {e}");
        assert!(e.reason.contains("refused"), "{name}: {e}");
    }
    let e = parse(b"(iposix\nsystem\n.").unwrap_err();
    assert!(e.reason.contains("INST 'posix system'"), "{e}");
    let e = parse(&[0x80, 2, 0xff]).unwrap_err();
    assert_eq!(e.to_string(), "byte 2: unknown opcode 0xff");
    assert!(!e.is_truncation());
}

#[test]
fn every_prefix_of_a_valid_pickle_is_an_error() {
    for hex in fixtures::PROTOCOLS {
        let data = unhex(hex);
        for n in 0..data.len() {
            let e = parse(&data[..n]).unwrap_err();
            assert!(e.reason.contains("truncated at byte"), "prefix {n}: {e}");
            assert!(e.is_truncation(), "prefix {n}: {e}");
            assert!(
                e.reason.contains(&format!("at byte {n}")),
                "prefix {n}: {e}"
            );
        }
    }
}

#[test]
fn length_fields_beyond_the_input_do_not_allocate() {
    // BINUNICODE8 / BINBYTES8 / BYTEARRAY8 with a 2^63 length, BINUNICODE with 4 GiB.
    for op in [0x8du8, 0x8e, 0x96] {
        let mut data = vec![0x80, 5, op];
        data.extend_from_slice(&(1u64 << 63).to_le_bytes());
        let e = parse(&data).unwrap_err();
        assert!(e.reason.contains("truncated at byte 11"), "{e}");
    }
    let e = parse(&[0x80, 4, b'X', 0xff, 0xff, 0xff, 0xff, b'.']).unwrap_err();
    assert!(
        e.reason.contains("BINUNICODE needs 4294967295 more bytes"),
        "{e}"
    );
    let mut data = vec![0x80, 4, 0x8b];
    data.extend_from_slice(&(-5i32).to_le_bytes());
    assert!(parse(&data).unwrap_err().reason.contains("negative length"));
}

#[test]
fn wide_integers() {
    // 2^64 (LONG1, 9 bytes) fits i128; 2^200 does not.
    let mut d = vec![0x80, 2, 0x8a, 9];
    d.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
    d.push(b'.');
    assert_eq!(parse(&d).unwrap(), Value::BigInt(1 << 64));
    let mut d = vec![0x80, 2, 0x8a, 26];
    d.extend_from_slice(&[0; 25]);
    d.push(1);
    d.push(b'.');
    assert!(parse(&d)
        .unwrap_err()
        .reason
        .contains("does not fit in 128 bits"));
    // Sign-extended wide encoding of -1 is accepted.
    let mut d = vec![0x80, 2, 0x8a, 20];
    d.extend_from_slice(&[0xff; 20]);
    d.push(b'.');
    assert_eq!(parse(&d).unwrap(), Value::Int(-1));
    assert_eq!(parse(b"L-12L\n.").unwrap(), Value::Int(-12));
    assert_eq!(
        parse(b"I18446744073709551616\n.").unwrap(),
        Value::BigInt(1 << 64)
    );
    assert!(parse(&format!("I{}\n.", "9".repeat(60)).into_bytes())
        .unwrap_err()
        .reason
        .contains("128 bits"));
    assert!(parse(b"Iabc\n.").unwrap_err().reason.contains("malformed"));
}

#[test]
fn protocol_zero_strings_and_floats() {
    assert_eq!(parse(b"S'a\\nb\\x41'\n.").unwrap(), s("a\nbA"));
    assert_eq!(parse(b"Vx\\u00e9\\U0001f600\n.").unwrap(), s("xé😀"));
    assert_eq!(parse(b"F-2.5\n.").unwrap(), Value::Float(-2.5));
    assert_eq!(parse(b"U\x02ab.").unwrap(), s("ab"));
    assert_eq!(parse(b"U\x01\xff.").unwrap(), Value::Bytes(vec![0xff]));
    assert_eq!(
        parse(b"(I1\nI2\n1N.").unwrap(),
        Value::None,
        "POP_MARK drops the mark's content"
    );
    assert_eq!(parse(b"N2t.").unwrap_err().reason, "TUPLE without a MARK");
    assert_eq!(parse(b"(N2t.").unwrap(), Value::Tuple(vec![Value::None; 2]));
}

#[test]
fn stack_rules() {
    assert!(parse(b".").unwrap_err().reason.contains("stack empty"));
    // APPEND past a MARK is an underflow, as in Python 3.
    assert!(parse(b"](a.").unwrap_err().reason.contains("stack empty"));
    assert!(parse(b"Na.").unwrap_err().reason.contains("APPEND"));
    assert!(parse(b"}(Nu.").unwrap_err().reason.contains("odd number"));
    assert!(parse(b"h\x05.").unwrap_err().reason.contains("memo key 5"));
    // Trailing bytes after STOP are ignored, as in Python.
    assert_eq!(parse(b"N.garbage").unwrap(), Value::None);
}

#[test]
fn writer_output_reads_back() {
    for p in 0..6 {
        let v = sample(p);
        assert_eq!(parse(&to_bytes(&v)).unwrap(), v);
    }
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<i128>().prop_map(Value::int),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".{0,300}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Tuple),
            proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Dict),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip(v in arb_value()) {
        prop_assert_eq!(parse(&to_bytes(&v)).unwrap(), v);
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&data);
    }

    #[test]
    fn random_opcode_soup_never_panics(
        data in proptest::collection::vec(
            prop_oneof![
                Just(b'('), Just(b']'), Just(b'}'), Just(b')'), Just(b'a'), Just(b'e'),
                Just(b's'), Just(b'u'), Just(b'd'), Just(b'l'), Just(b't'), Just(0x85u8),
                Just(0x86), Just(0x87), Just(0x94), Just(b'h'), Just(0), Just(1), Just(b'N'),
                Just(b'0'), Just(b'1'), Just(b'2'), Just(0x8f), Just(0x90), Just(0x91),
                Just(b'K'), Just(b'.'), any::<u8>(),
            ],
            0..256,
        )
    ) {
        let _ = parse(&data);
    }

    #[test]
    fn mutated_and_truncated_fixtures_never_panic(
        which in 0usize..6,
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut data = unhex(fixtures::PROTOCOLS[which]);
        for (at, b) in flips {
            let k = at.index(data.len());
            data[k] = b;
        }
        let n = cut.index(data.len() + 1);
        let _ = parse(&data[..n]);
    }
}
