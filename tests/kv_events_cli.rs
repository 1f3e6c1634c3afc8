//! `gpumem kv-events` end to end, on the KV-event streams recorded from vLLM 0.33.0's own
//! scheduler and block pool (`tests/kv_events/`, made by its `record.sh` with the shared
//! oracle): the counts equal the oracle's step log, the JSON Lines form gives the same index,
//! and bad input is a clean error naming the file and byte offset or line (exit 2, no panic).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_error, gpumem, scratch_dir, stderr, stdout};
use gpumem_traces::kv_events::read_events;
use serde_json::Value;

const RECORDINGS: [&str; 2] = ["default.msgpack", "sha256_cbor.msgpack"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kv_events")
        .join(name)
}

fn json_report(args: &[&str]) -> Value {
    let out = gpumem(args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

/// What the oracle's step log says about the recording: blocks stored and removed, steps that
/// published events, and the most blocks holding a hash at the end of any step.
struct Oracle {
    stored: u64,
    removed: u64,
    steps_with_events: u64,
    max_live_at_step_end: u64,
    usable_blocks: u64,
}

fn oracle() -> Oracle {
    let log = std::fs::read_to_string(fixture("steps.jsonl")).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap();
    let mut o = Oracle {
        stored: 0,
        removed: 0,
        steps_with_events: 0,
        max_live_at_step_end: 0,
        // Block 0 is vLLM's null block: it never holds a hash.
        usable_blocks: config["num_gpu_blocks"].as_u64().unwrap() - 1,
    };
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let (s, r) = (
            v["stored"].as_u64().unwrap(),
            v["removed"].as_u64().unwrap(),
        );
        o.stored += s;
        o.removed += r;
        o.steps_with_events += (s + r > 0) as u64;
        o.max_live_at_step_end = o.max_live_at_step_end.max(o.stored - o.removed);
    }
    o
}

#[test]
fn recorded_streams_report_the_oracles_counts() {
    let o = oracle();
    assert_eq!((o.stored, o.removed), (22, 12), "the fixture changed");
    for name in RECORDINGS {
        let path = fixture(name);
        let p = path.to_str().unwrap();
        let r = json_report(&["kv-events", p, "--json"]);
        assert_eq!(r["file"], p);
        assert_eq!(r["format"], "msgpack");
        assert_eq!(r["event_encoding"], "map");
        assert_eq!(r["hash_encoding"], "int");
        assert_eq!(r["blocks_stored"], o.stored, "{name}");
        assert_eq!(r["blocks_removed"], o.removed, "{name}");
        assert_eq!(r["batches"], o.steps_with_events, "{name}");
        assert_eq!(r["blocks_live"], o.stored - o.removed, "{name}");
        assert_eq!(r["tokens_stored"], o.stored * 4);
        assert_eq!(r["tokens_live"], (o.stored - o.removed) * 4);
        let max_live = r["max_blocks_live"].as_u64().unwrap();
        // Within a step, vLLM may store before it removes: the peak is at least the peak at
        // step ends, and never more than the pool's usable blocks.
        assert!(
            (o.max_live_at_step_end..=o.usable_blocks).contains(&max_live),
            "{name}: max live {max_live}"
        );
        assert_eq!(
            max_live, 11,
            "{name}: the pool's 11 usable blocks all hold a hash once"
        );
        // r3's 21-token prompt plus its outputs: 6 full blocks of 4 tokens chained.
        assert_eq!(r["longest_chain_blocks"], 6, "{name}");
        assert_eq!(r["longest_chain_tokens"], 24, "{name}");
        // The one copy: a block-aligned prompt recomputed after preemption stores its hash again.
        assert_eq!(r["duplicate_stores"], 1, "{name}");
        assert_eq!(
            r["hashes_live"].as_u64().unwrap() + 1,
            r["blocks_live"].as_u64().unwrap()
        );
        for zero in [
            "removed_unknown",
            "unknown_events",
            "token_count_mismatches",
            "all_blocks_cleared",
        ] {
            assert_eq!(r[zero], 0, "{name}: {zero}");
        }
        assert_eq!(r["data_parallel_ranks"], serde_json::json!([0]));
        assert_eq!(r["first_ts"], 0.0);
        assert_eq!(r["media"].as_array().unwrap().len(), 1);
        assert_eq!(r["media"][0]["medium"], "GPU");
        assert_eq!(r["media"][0]["blocks_stored"], o.stored);
        assert_eq!(r["media"][0]["blocks_removed"], o.removed);
        assert_eq!(r["media"][0]["blocks_live"], o.stored - o.removed);

        // The format given is the format detected: the same report.
        assert_eq!(
            json_report(&["kv-events", p, "--format", "msgpack", "--json"]),
            r
        );
    }
}

#[test]
fn the_table_shows_the_index() {
    let path = fixture("default.msgpack");
    let out = gpumem(&["kv-events", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "msgpack, 8 batches, 22 events",
        "BlockStored             10        22        88",
        "BlockRemoved            12        12",
        "blocks live                   10  (9 hashes, 40 tokens)",
        "max blocks live               11",
        "longest chain                  6  blocks, 24 tokens",
        "GPU               22        12        10",
    ] {
        assert!(text.contains(needle), "lacks '{needle}':\n{text}");
    }
}

/// The recording rewritten as JSON Lines (one event a line, with its batch's ts and rank)
/// gives the same index, detected or with --format jsonl.
#[test]
fn json_lines_form_gives_the_same_index() {
    let path = fixture("default.msgpack");
    let bytes = std::fs::read(&path).unwrap();
    let (events, _) = read_events(&path, &bytes).unwrap();
    let mut text = String::from("# default.msgpack as JSON Lines\n");
    for e in &events {
        let mut v = serde_json::to_value(e.event.as_ref().unwrap()).unwrap();
        v["ts"] = e.meta.ts.unwrap().into();
        v["data_parallel_rank"] = e.meta.data_parallel_rank.unwrap().into();
        text.push_str(&serde_json::to_string(&v).unwrap());
        text.push('\n');
    }
    let dir = scratch_dir();
    let jsonl = dir.join("events.jsonl");
    std::fs::write(&jsonl, text).unwrap();

    let msgpack = json_report(&["kv-events", path.to_str().unwrap(), "--json"]);
    let j = jsonl.to_str().unwrap();
    for args in [
        vec!["kv-events", j, "--json"],
        vec!["kv-events", "--format", "jsonl", j, "--json"],
    ] {
        let r = json_report(&args);
        assert_eq!(r["format"], "jsonl");
        assert_eq!(r["batches"], events.len() as u64, "one event a line");
        for key in [
            "events",
            "blocks_stored",
            "blocks_removed",
            "blocks_live",
            "hashes_live",
            "tokens_live",
            "max_blocks_live",
            "longest_chain_blocks",
            "longest_chain_tokens",
            "duplicate_stores",
            "first_ts",
            "last_ts",
            "data_parallel_ranks",
            "media",
        ] {
            assert_eq!(r[key], msgpack[key], "{key}");
        }
    }
}

#[test]
fn a_truncated_recording_is_a_clean_error_with_the_byte_offset() {
    let bytes = std::fs::read(fixture("default.msgpack")).unwrap();
    let dir = scratch_dir();
    let path = dir.join("cut.msgpack");
    let p = path.to_str().unwrap();
    // Cuts inside the first batch's header, inside an event, and one byte short of the end.
    for cut in [1, 2, 5, 40, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let out = gpumem(&["kv-events", p]);
        assert_clean_error(&out, &[&format!("gpumem: error: {p}: byte "), "truncated"]);
        let err = stderr(&out);
        let at: usize = err
            .split("byte ")
            .nth(1)
            .and_then(|s| s.split(':').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no byte offset: {err}"));
        assert!(at <= cut, "cut at {cut}: {err}");
        assert!(stdout(&out).is_empty(), "no report on an error");
    }
}

#[test]
fn bad_input_is_a_clean_error() {
    let dir = scratch_dir();
    let recording = fixture("default.msgpack");
    let r = recording.to_str().unwrap();

    // The wrong --format: named, with what the file looks like.
    let out = gpumem(&["kv-events", "--format", "jsonl", r]);
    assert_clean_error(&out, &[&format!("{r}:1: "), "looks like msgpack"]);

    // A JSON Lines stream with a bad line: file and line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"type\": \"AllBlocksCleared\"}\n{\"type\": \"BlockRemoved\", \"block_hashes\": \"7\"}\n",
    )
    .unwrap();
    let b = bad.to_str().unwrap();
    let out = gpumem(&["kv-events", b]);
    assert_clean_error(&out, &[&format!("gpumem: error: {b}:2: "), "block_hashes"]);

    // Not JSON at all.
    std::fs::write(&bad, "{\"type\": \"BlockStored\",\n").unwrap();
    assert_clean_error(
        &gpumem(&["kv-events", b]),
        &[&format!("{b}:1: "), "bad JSON"],
    );

    // A msgpack batch of the wrong shape: the byte of the offending value.
    let shape = dir.join("shape.msgpack");
    std::fs::write(&shape, [0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]).unwrap();
    let s = shape.to_str().unwrap();
    assert_clean_error(
        &gpumem(&["kv-events", s]),
        &[&format!("{s}: byte 10: "), "events must be an array"],
    );

    // No such file.
    let missing = dir.join("missing.msgpack");
    let m = missing.to_str().unwrap();
    assert_clean_error(&gpumem(&["kv-events", m]), &[m, "cannot read"]);

    // An unknown --format is clap's usage error.
    let out = gpumem(&["kv-events", "--format", "pickle", r]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("msgpack"), "{}", stderr(&out));
}

#[test]
fn an_empty_stream_is_refused_as_alloc_and_kv_refuse_empty_traces() {
    let dir = scratch_dir();
    let empty = dir.join("empty.msgpack");
    std::fs::write(&empty, b"").unwrap();
    let out = gpumem(&["kv-events", empty.to_str().unwrap(), "--json"]);
    assert_clean_error(&out, &["empty.msgpack: the stream holds no event"]);
}

#[test]
fn help_teaches_the_formats_and_the_report() {
    let out = gpumem(&["kv-events", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for needle in [
        "[ts, [event, ...], data_parallel_rank]",
        "BlockStored",
        "AllBlocksCleared",
        "blocks live",
        "longest chain",
        "--format <FORMAT>",
        "--json",
        "byte offset",
    ] {
        assert!(help.contains(needle), "--help lacks '{needle}'");
    }
    let top = stdout(&gpumem(&["--help"]));
    assert!(top.contains("kv-events"), "{top}");
}
