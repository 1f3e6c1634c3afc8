//! vLLM KV-event import, on streams recorded from vLLM 0.33.0's own scheduler and block pool
//! (`tests/kv_events/`, made by `record.sh` with the shared oracle) and on hand-made streams:
//! the counts equal the oracle's step log; gpumem's `sha256_cbor` reproduces every block hash
//! vLLM published; pre-0.24 array events, raw-digest hashes, JSON Lines; malformed input gives
//! an error with byte offset or line, never a panic.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use gpumem_core::kv::hash::{Digest, Sha256Cbor, VllmExtraKeys};
use gpumem_core::kv::BlockHash;
use gpumem_traces::kv_events::{
    detect_format, import_bytes, import_file, looks_like_msgpack_events, read_events, EventHash,
    KvCacheEvent, StreamFormat,
};
use gpumem_traces::Location;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/kv_events")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// (stored, removed, steps with events) summed over the oracle's step log.
fn oracle_counts() -> (u64, u64, u64) {
    let log = std::fs::read_to_string(fixture("steps.jsonl")).unwrap();
    let (mut s, mut r, mut n) = (0, 0, 0);
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (ls, lr) = (
            v["stored"].as_u64().unwrap(),
            v["removed"].as_u64().unwrap(),
        );
        s += ls;
        r += lr;
        n += (ls + lr > 0) as u64;
    }
    (s, r, n)
}

#[test]
fn recorded_streams_match_the_oracles_counts() {
    let (stored, removed, steps_with_events) = oracle_counts();
    assert_eq!((stored, removed), (22, 12), "the fixture changed");
    for name in ["default.msgpack", "sha256_cbor.msgpack"] {
        let bytes = read(name);
        assert_eq!(detect_format(&bytes), StreamFormat::Msgpack);
        assert!(looks_like_msgpack_events(&bytes), "{name}");
        let r = import_file(&fixture(name)).unwrap();
        assert_eq!(r.format, StreamFormat::Msgpack);
        assert_eq!(r.event_encoding, "map");
        assert_eq!(r.hash_encoding, "int");
        assert_eq!(r.blocks_stored, stored, "{name}");
        assert_eq!(r.blocks_removed, removed, "{name}");
        assert_eq!(r.batches, steps_with_events, "{name}");
        assert_eq!(r.removed_unknown, 0);
        assert_eq!(r.unknown_events, 0);
        assert_eq!(r.token_count_mismatches, 0);
        assert_eq!(r.tokens_stored, stored * 4);
        assert_eq!(r.blocks_live, stored - removed);
        assert_eq!(r.tokens_live, (stored - removed) * 4);
        assert_eq!(r.all_blocks_cleared, 0);
        assert_eq!(r.data_parallel_ranks, vec![0]);
        assert_eq!(r.media.len(), 1);
        assert_eq!(r.media[0].medium.as_deref(), Some("GPU"));
        assert_eq!(r.media[0].blocks_live, stored - removed);
        // At most the pool's 11 usable blocks hold a hash at once.
        assert!(r.max_blocks_live <= 11 && r.max_blocks_live >= r.blocks_live);
        // r3's 21-token prompt and 5 outputs: 6 full blocks chained, the longest prefix.
        assert!(r.longest_chain_blocks >= 1 && r.longest_chain_blocks <= 6);
        assert_eq!(r.longest_chain_tokens, r.longest_chain_blocks * 4);
        assert_eq!(r.first_ts, Some(0.0));
        assert!(r.last_ts.unwrap() > 0.0);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["format"], "msgpack");
        assert_eq!(json["blocks_stored"], stored);
    }
}

/// The block hashes in the sha256_cbor recording are exactly gpumem's: each BlockStored's
/// blocks are hashed from its parent's full digest (found by the published 64-bit value), its
/// token ids and no extra keys, and compared with the published values.
#[test]
fn sha256_cbor_reproduces_vllms_published_hashes() {
    let bytes = read("sha256_cbor.msgpack");
    let (events, _) = read_events(&fixture("sha256_cbor.msgpack"), &bytes).unwrap();
    let hasher = Sha256Cbor::new();
    let mut full: HashMap<u64, Digest> = HashMap::new();
    let mut checked = 0;
    for e in &events {
        let Some(KvCacheEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            ..
        }) = &e.event
        else {
            continue;
        };
        let mut parent: Option<Digest> = parent_block_hash.as_ref().map(|p| {
            let EventHash::Int(p) = p else {
                panic!("int hashes")
            };
            *full.get(p).expect("the parent was stored before")
        });
        let bs = *block_size as usize;
        assert_eq!(token_ids.len(), bs * block_hashes.len());
        for (i, h) in block_hashes.iter().enumerate() {
            let toks: Vec<u32> = token_ids[i * bs..(i + 1) * bs]
                .iter()
                .map(|&t| u32::try_from(t).unwrap())
                .collect();
            // The block's index only matters for a cache salt, which this workload has none of.
            let d = hasher.hash_block(parent.as_ref(), 1, &toks, &VllmExtraKeys::NONE);
            assert_eq!(
                EventHash::Int(BlockHash::from_digest(&d).0),
                *h,
                "block {checked} of the stream"
            );
            full.insert(BlockHash::from_digest(&d).0, d);
            parent = Some(d);
            checked += 1;
        }
    }
    assert_eq!(checked, 22);
}

/// Every stored hash is one of the block hashes gpumem computes for the workload's requests
/// (prompt, then the contract's generated tokens): hashing and token expansion both agree.
#[test]
fn recorded_hashes_are_the_workloads_blocks() {
    let hasher = Sha256Cbor::new();
    let mut ours = HashSet::new();
    let workload = std::fs::read_to_string(fixture("workload.jsonl")).unwrap();
    for (i, line) in workload.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut toks: Vec<u32> = v["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        for k in 0..v["max_tokens"].as_u64().unwrap() {
            toks.push((2_000_000_000 + i as u64 * 10_000 + k) as u32);
        }
        let mut digests = Vec::new();
        hasher.extend(&mut digests, &toks, 4, &VllmExtraKeys::NONE);
        ours.extend(digests.iter().map(|d| BlockHash::from_digest(d).0));
    }
    let bytes = read("sha256_cbor.msgpack");
    let (events, _) = read_events(&fixture("sha256_cbor.msgpack"), &bytes).unwrap();
    let mut n = 0;
    for e in events {
        if let Some(KvCacheEvent::BlockStored { block_hashes, .. }) = e.event {
            for h in block_hashes {
                let EventHash::Int(h) = h else { panic!() };
                assert!(ours.contains(&h), "{h:#x} is not a block of the workload");
                n += 1;
            }
        }
    }
    assert_eq!(n, 22);
}

/// vLLM's default (pickle) recording makes the same decisions: its events equal the
/// sha256_cbor recording's up to a one-to-one renaming of hashes, and no value is shared.
#[test]
fn default_hash_stream_is_the_same_stream_renamed() {
    let a = read_events(&fixture("default.msgpack"), &read("default.msgpack"))
        .unwrap()
        .0;
    let b = read_events(
        &fixture("sha256_cbor.msgpack"),
        &read("sha256_cbor.msgpack"),
    )
    .unwrap()
    .0;
    assert_eq!(a.len(), b.len());
    let mut fwd: HashMap<EventHash, EventHash> = HashMap::new();
    let mut back: HashMap<EventHash, EventHash> = HashMap::new();
    let mut map = |x: &EventHash, y: &EventHash| {
        assert_ne!(x, y, "pickle and CBOR hashes coincide");
        assert_eq!(fwd.entry(x.clone()).or_insert_with(|| y.clone()), y);
        assert_eq!(back.entry(y.clone()).or_insert_with(|| x.clone()), x);
    };
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.meta.batch, y.meta.batch);
        assert_eq!(x.meta.ts, y.meta.ts);
        match (x.event.as_ref().unwrap(), y.event.as_ref().unwrap()) {
            (
                KvCacheEvent::BlockStored {
                    block_hashes: h1,
                    parent_block_hash: p1,
                    token_ids: t1,
                    ..
                },
                KvCacheEvent::BlockStored {
                    block_hashes: h2,
                    parent_block_hash: p2,
                    token_ids: t2,
                    ..
                },
            ) => {
                assert_eq!(t1, t2);
                assert_eq!(p1.is_some(), p2.is_some());
                if let (Some(p1), Some(p2)) = (p1, p2) {
                    map(p1, p2);
                }
                assert_eq!(h1.len(), h2.len());
                h1.iter().zip(h2).for_each(|(x, y)| map(x, y));
            }
            (
                KvCacheEvent::BlockRemoved {
                    block_hashes: h1, ..
                },
                KvCacheEvent::BlockRemoved {
                    block_hashes: h2, ..
                },
            ) => h1.iter().zip(h2).for_each(|(x, y)| map(x, y)),
            (x, y) => panic!("different events {x:?} / {y:?}"),
        }
    }
}

/// The same events as JSON Lines (one event a line, with ts and rank) import to the same index.
#[test]
fn json_lines_form_imports_the_same() {
    let bytes = read("sha256_cbor.msgpack");
    let (events, _) = read_events(&fixture("sha256_cbor.msgpack"), &bytes).unwrap();
    let mut text = String::from("# vLLM KV events, one a line\n\n");
    for e in &events {
        let mut v = serde_json::to_value(e.event.as_ref().unwrap()).unwrap();
        v["ts"] = serde_json::json!(e.meta.ts.unwrap());
        v["data_parallel_rank"] = serde_json::json!(0);
        v["a_future_field"] = serde_json::json!({"ignored": [1, 2]});
        text.push_str(&serde_json::to_string(&v).unwrap());
        text.push_str("\r\n");
    }
    assert_eq!(detect_format(text.as_bytes()), StreamFormat::Jsonl);
    let (_, j) = import_bytes(Path::new("events.jsonl"), text.as_bytes()).unwrap();
    let (_, m) = import_bytes(Path::new("x"), &bytes).unwrap();
    assert_eq!(j.format, StreamFormat::Jsonl);
    assert_eq!(j.batches, events.len() as u64);
    assert_eq!(
        (
            j.blocks_stored,
            j.blocks_removed,
            j.blocks_live,
            j.max_blocks_live
        ),
        (
            m.blocks_stored,
            m.blocks_removed,
            m.blocks_live,
            m.max_blocks_live
        )
    );
    assert_eq!(
        (j.longest_chain_blocks, j.hashes_live, j.media.clone()),
        (m.longest_chain_blocks, m.hashes_live, m.media.clone())
    );
    assert_eq!((j.first_ts, j.last_ts), (m.first_ts, m.last_ts));
    assert_eq!(j.data_parallel_ranks, vec![0]);
}

/// A minimal msgpack writer for hand-made streams.
#[derive(Clone, Debug)]
enum M {
    Nil,
    U(u64),
    I(i64),
    F(f64),
    S(&'static str),
    B(Vec<u8>),
    A(Vec<M>),
    Map(Vec<(&'static str, M)>),
}

fn enc(m: &M, out: &mut Vec<u8>) {
    match m {
        M::Nil => out.push(0xc0),
        M::U(u) => {
            out.push(0xcf);
            out.extend(u.to_be_bytes());
        }
        M::I(i) => {
            out.push(0xd3);
            out.extend(i.to_be_bytes());
        }
        M::F(f) => {
            out.push(0xcb);
            out.extend(f.to_bits().to_be_bytes());
        }
        M::S(s) => {
            out.push(0xd9);
            out.push(s.len() as u8);
            out.extend(s.as_bytes());
        }
        M::B(b) => {
            out.push(0xc4);
            out.push(b.len() as u8);
            out.extend(b);
        }
        M::A(a) => {
            out.push(0xdc);
            out.extend((a.len() as u16).to_be_bytes());
            a.iter().for_each(|x| enc(x, out));
        }
        M::Map(kv) => {
            out.push(0xde);
            out.extend((kv.len() as u16).to_be_bytes());
            for (k, v) in kv {
                enc(&M::S(k), out);
                enc(v, out);
            }
        }
    }
}

fn batch(ts: f64, events: Vec<M>) -> Vec<u8> {
    let mut out = Vec::new();
    enc(&M::A(vec![M::F(ts), M::A(events), M::U(0)]), &mut out);
    out
}

fn us(v: &[u64]) -> M {
    M::A(v.iter().map(|&x| M::U(x)).collect())
}

fn stored(hashes: &[u64], parent: Option<u64>, bs: u64, medium: &'static str) -> M {
    M::Map(vec![
        ("type", M::S("BlockStored")),
        ("block_hashes", us(hashes)),
        ("parent_block_hash", parent.map_or(M::Nil, M::U)),
        ("token_ids", us(&vec![7; hashes.len() * bs as usize])),
        ("block_size", M::U(bs)),
        ("lora_id", M::Nil),
        ("medium", M::S(medium)),
        ("lora_name", M::Nil),
    ])
}

fn removed(hashes: &[u64], medium: &'static str) -> M {
    M::Map(vec![
        ("type", M::S("BlockRemoved")),
        ("block_hashes", us(hashes)),
        ("medium", M::S(medium)),
    ])
}

#[test]
fn index_follows_copies_chains_media_and_clears() {
    let mut s = Vec::new();
    // A chain 1 → 2 → 3 on the GPU, then 4 under 2 (a branch), a copy of 2, and a CPU copy.
    s.extend(batch(1.0, vec![stored(&[1, 2, 3], None, 16, "GPU")]));
    s.extend(batch(
        2.0,
        vec![
            stored(&[4], Some(2), 16, "GPU"),
            stored(&[2], Some(1), 16, "GPU"),
            stored(&[1, 2], None, 16, "CPU"),
        ],
    ));
    // Remove one copy of 2, 3 and an unknown hash; an unknown event type is skipped.
    s.extend(batch(
        3.0,
        vec![
            removed(&[2, 3, 99], "GPU"),
            M::Map(vec![("type", M::S("SomethingNew")), ("x", M::U(1))]),
        ],
    ));
    let (index, r) = import_bytes(Path::new("s.msgpack"), &s).unwrap();
    assert_eq!(r.blocks_stored, 7);
    assert_eq!(r.duplicate_stores, 1);
    assert_eq!(r.blocks_removed, 3);
    assert_eq!(r.removed_unknown, 1);
    assert_eq!(r.unknown_events, 1);
    assert_eq!(r.max_blocks_live, 7);
    assert_eq!(r.blocks_live, 5); // GPU 1, 2, 4; CPU 1, 2
    assert_eq!(r.hashes_live, 5);
    assert_eq!(index.copies(Some("GPU"), None, &EventHash::Int(2)), 1);
    assert_eq!(index.copies(Some("GPU"), None, &EventHash::Int(3)), 0);
    assert_eq!(index.copies(Some("CPU"), None, &EventHash::Int(2)), 1);
    // 1 → 2 → 4 on the GPU.
    assert_eq!((r.longest_chain_blocks, r.longest_chain_tokens), (3, 48));
    assert_eq!(r.media.len(), 2);
    assert_eq!(r.media[0].medium.as_deref(), Some("CPU"));
    assert_eq!(
        (
            r.media[1].blocks_stored,
            r.media[1].blocks_removed,
            r.media[1].blocks_live
        ),
        (5, 3, 3)
    );
    assert_eq!((r.first_ts, r.last_ts), (Some(1.0), Some(3.0)));

    s.extend(batch(
        4.0,
        vec![M::Map(vec![("type", M::S("AllBlocksCleared"))])],
    ));
    let (_, r) = import_bytes(Path::new("s.msgpack"), &s).unwrap();
    assert_eq!(r.all_blocks_cleared, 1);
    assert_eq!((r.blocks_live, r.hashes_live, r.max_blocks_live), (0, 0, 7));
    assert_eq!(r.longest_chain_blocks, 0);
}

/// vLLM before 0.24: events are arrays led by the type name; raw digests as hashes; a batch
/// without the rank; trailing fields left out.
#[test]
fn pre_024_array_events_and_raw_digests() {
    let d = |x: u8| M::B(vec![x; 32]);
    let mut s = Vec::new();
    enc(
        &M::A(vec![
            M::F(0.5),
            M::A(vec![
                M::A(vec![
                    M::S("BlockStored"),
                    M::A(vec![d(1), d(2)]),
                    M::Nil,
                    us(&[1, 2, 3, 4, 5, 6, 7, 8]),
                    M::U(4),
                    M::Nil,
                ]),
                M::A(vec![M::S("BlockRemoved"), M::A(vec![d(2)]), M::S("GPU")]),
                M::A(vec![M::S("BlockRemoved"), M::A(vec![d(1)])]),
                M::A(vec![M::S("AllBlocksCleared")]),
            ]),
        ]),
        &mut s,
    );
    let (events, info) = read_events(Path::new("old.msgpack"), &s).unwrap();
    assert_eq!(
        (info.array_events, info.map_events, info.bytes_hashes),
        (4, 0, 4)
    );
    assert_eq!(events[0].meta.data_parallel_rank, None);
    let Some(KvCacheEvent::BlockStored {
        medium,
        block_hashes,
        ..
    }) = &events[0].event
    else {
        panic!()
    };
    assert_eq!((medium, block_hashes.len()), (&None, 2));
    let (_, r) = import_bytes(Path::new("old.msgpack"), &s).unwrap();
    assert_eq!(r.event_encoding, "array");
    assert_eq!(r.hash_encoding, "bytes");
    // The removal on "GPU" does not match the store without a medium; the other does.
    assert_eq!(
        (r.blocks_stored, r.blocks_removed, r.removed_unknown),
        (2, 2, 1)
    );
    assert_eq!(r.all_blocks_cleared, 1);

    // JSON Lines: a raw digest in hex, and an array-form event.
    let text = format!(
        "{{\"type\":\"BlockStored\",\"block_hashes\":[\"{}\"],\"parent_block_hash\":null,\"token_ids\":[1,2],\"block_size\":2,\"medium\":\"GPU\"}}\n[\"BlockRemoved\",[\"{}\"],\"GPU\"]\n",
        "ab".repeat(32),
        "ab".repeat(32)
    );
    let (_, r) = import_bytes(Path::new("e.jsonl"), text.as_bytes()).unwrap();
    assert_eq!(
        (r.blocks_stored, r.blocks_removed, r.blocks_live),
        (1, 1, 0)
    );
    assert_eq!(r.event_encoding, "mixed");
}

fn err_of(bytes: &[u8]) -> (Location, String) {
    match import_bytes(Path::new("bad"), bytes) {
        Ok(r) => panic!("accepted: {r:?}"),
        Err(e) => (e.location, e.to_string()),
    }
}

#[test]
fn malformed_msgpack_names_the_byte() {
    let good = batch(1.0, vec![stored(&[1], None, 2, "GPU")]);
    // Truncated anywhere: an error at or before the cut, never a panic.
    for cut in 1..good.len() {
        let (loc, msg) = err_of(&good[..cut]);
        let Location::ByteOffset(at) = loc else {
            panic!("{msg}")
        };
        assert!(at <= cut as u64, "{msg}");
        assert!(msg.starts_with("bad: byte "), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }
    // Wrong types, with the offset of the offending value.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            {
                let mut o = Vec::new();
                enc(&M::Map(vec![("ts", M::F(1.0))]), &mut o);
                o
            },
            "batch 0: expected [ts, [events...], data_parallel_rank], got map",
        ),
        (
            {
                let mut o = Vec::new();
                enc(&M::A(vec![M::S("x"), M::A(vec![])]), &mut o);
                o
            },
            "byte 3: batch 0: ts must be a number, got string",
        ),
        (
            {
                let mut o = Vec::new();
                enc(&M::A(vec![M::F(0.0), M::U(3)]), &mut o);
                o
            },
            "byte 12: batch 0: events must be an array, got integer",
        ),
        (
            batch(
                0.0,
                vec![M::Map(vec![
                    ("type", M::S("BlockStored")),
                    ("block_hashes", us(&[1])),
                    ("token_ids", us(&[1, 2])),
                    ("block_size", M::S("2")),
                ])],
            ),
            "batch 0, event 0: BlockStored: block_size must be an integer, got string",
        ),
        (
            batch(
                0.0,
                vec![M::Map(vec![
                    ("type", M::S("BlockStored")),
                    ("block_hashes", M::A(vec![M::I(-5)])),
                    ("token_ids", us(&[])),
                    ("block_size", M::U(2)),
                ])],
            ),
            "block hash -5 is not an unsigned 64-bit integer",
        ),
        (
            batch(
                0.0,
                vec![M::Map(vec![
                    ("type", M::S("BlockStored")),
                    ("block_hashes", M::A(vec![M::F(1.0)])),
                    ("token_ids", us(&[])),
                    ("block_size", M::U(2)),
                ])],
            ),
            "a block hash must be an integer or bytes, got float",
        ),
        (
            batch(
                0.0,
                vec![M::Map(vec![
                    ("type", M::S("BlockStored")),
                    ("block_hashes", us(&[1])),
                    ("block_size", M::U(2)),
                ])],
            ),
            "BlockStored: missing field \"token_ids\"",
        ),
        (
            batch(
                0.0,
                vec![M::Map(vec![
                    ("type", M::S("BlockRemoved")),
                    ("block_hashes", us(&[1])),
                    ("medium", M::U(1)),
                ])],
            ),
            "BlockRemoved: medium must be a string or nil, got integer",
        ),
        (
            batch(0.0, vec![M::Map(vec![("block_hashes", us(&[1]))])]),
            "this map has no \"type\"",
        ),
        (batch(0.0, vec![M::U(3)]), "got integer"),
        (batch(0.0, vec![M::A(vec![])]), "got an empty array"),
        (
            batch(0.0, vec![M::A(vec![M::S("BlockStored"), us(&[1])])]),
            "BlockStored: missing field 3 (token_ids)",
        ),
        (
            batch(
                0.0,
                vec![M::Map(vec![
                    ("type", M::S("BlockRemoved")),
                    ("block_hashes", M::A(vec![M::B(vec![0; 65])])),
                ])],
            ),
            "a block hash of 65 bytes",
        ),
        // A length that claims 4 billion events: refused before any allocation.
        (
            vec![
                0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff,
            ],
            "byte 10: truncated: an array of 4294967295 entries",
        ),
        (vec![0xc1], "byte 0: byte 0xc1 is never used"),
    ];
    for (bytes, want) in cases {
        let (loc, msg) = err_of(&bytes);
        assert!(matches!(loc, Location::ByteOffset(_)), "{msg}");
        assert!(msg.contains(want), "{msg}\n  wanted: {want}");
    }
    // The second batch's error names its own offset.
    let mut two = good.clone();
    let second = two.len();
    two.extend(batch(0.0, vec![M::U(1)]));
    let (loc, msg) = err_of(&two);
    assert_eq!(loc, Location::ByteOffset(second as u64 + 15), "{msg}");
    assert!(msg.contains("batch 1, event 0"), "{msg}");
}

#[test]
fn malformed_json_lines_name_the_line() {
    let ok = r#"{"type":"BlockStored","block_hashes":[1],"parent_block_hash":null,"token_ids":[1,2],"block_size":2}"#;
    let cases = [
        (format!("{ok}\n{{\"type\":"), 2, "bad JSON"),
        (
            format!("{ok}\n\n{{\"type\":\"BlockRemoved\",\"block_hashes\":\"1\"}}"),
            3,
            "block_hashes must be an array, got string",
        ),
        (
            "{\"type\":\"BlockStored\",\"block_hashes\":[1],\"token_ids\":[1,\"2\"],\"block_size\":2}".to_string(),
            1,
            "a token id must be an integer, got string",
        ),
        (
            format!("{ok}\n{{\"type\":7}}"),
            2,
            "\"type\" must be a string, got integer",
        ),
        (
            "{\"type\":\"AllBlocksCleared\",\"ts\":\"now\"}".to_string(),
            1,
            "ts must be a number, got string",
        ),
        (
            "{\"type\":\"BlockRemoved\",\"block_hashes\":[\"xyz\"]}".to_string(),
            1,
            "a string block hash must be hex",
        ),
        (
            "{\"type\":\"BlockRemoved\",\"block_hashes\":[18446744073709551616]}".to_string(),
            1,
            "a block hash must be an integer or bytes, got float",
        ),
        ("{\"type\":\"BlockRemoved\"}\n".to_string(), 1, "missing field \"block_hashes\""),
        ("[1, 2]\n".to_string(), 1, "the event's type must be a string, got integer"),
    ];
    for (text, line, want) in cases {
        let (loc, msg) = err_of(text.as_bytes());
        assert_eq!(loc, Location::Line(line), "{msg}");
        assert!(msg.starts_with(&format!("bad:{line}: ")), "{msg}");
        assert!(msg.contains(want), "{msg}\n  wanted: {want}");
    }
    let mut bad_utf8 = ok.as_bytes().to_vec();
    bad_utf8.extend(b"\n{\"type\":\"\xff\"}\n");
    assert_eq!(err_of(&bad_utf8).0, Location::Line(2));
    // Empty and comment-only files are empty streams.
    for text in ["", "\n\n", "# nothing yet\n"] {
        let (_, r) = import_bytes(Path::new("e"), text.as_bytes()).unwrap();
        assert_eq!((r.events, r.blocks_live), (0, 0));
    }
}

/// Random corruption of a real recording: an error or a report, never a panic.
#[test]
fn corrupted_recordings_never_panic() {
    let good = read("sha256_cbor.msgpack");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x6b76);
    let mut errors = 0;
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..b.len());
            b[i] = rng.gen();
        }
        if rng.gen_bool(0.2) {
            b.truncate(rng.gen_range(0..b.len()));
        }
        errors += import_bytes(Path::new("x"), &b).is_err() as u32;
    }
    assert!(errors > 100, "{errors}");
    assert!(import_file(Path::new("/nonexistent/kv.msgpack")).is_err());
}
