//! `gpumem kv-events` on a stream recorded from vLLM's own code with the oracle.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kv_events")
        .join(name)
}

/// Stored and removed block hashes as the oracle's step log counts them.
fn oracle_totals() -> (u64, u64) {
    let log = std::fs::read_to_string(fixture("steps.jsonl")).unwrap();
    log.lines().fold((0, 0), |(s, r), line| {
        let v: Value = serde_json::from_str(line).unwrap();
        (
            s + v["stored"].as_u64().unwrap(),
            r + v["removed"].as_u64().unwrap(),
        )
    })
}

#[test]
fn the_index_matches_what_vllm_published() {
    let (stored, removed) = oracle_totals();
    assert!(
        stored > 0 && removed > 0,
        "the recording must exercise both"
    );
    for name in ["default.msgpack", "sha256_cbor.msgpack"] {
        let path = fixture(name);
        let out = gpumem(&["kv-events", path.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(r["blocks_stored"], stored, "{name}");
        assert_eq!(r["blocks_removed"], removed, "{name}");
        assert_eq!(r["removed_unknown"], 0, "{name}");
        let live = r["blocks_live"].as_u64().unwrap();
        assert_eq!(live, stored - removed, "{name}");
    }
    let text = gpumem(&["kv-events", fixture("default.msgpack").to_str().unwrap()]);
    assert!(stdout(&text).contains("longest chain"), "{}", stdout(&text));
}

#[test]
fn a_truncated_stream_is_a_clear_error() {
    let bytes = std::fs::read(fixture("default.msgpack")).unwrap();
    let dir = scratch_dir();
    let path = dir.join("cut.msgpack");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &gpumem(&["kv-events", path.to_str().unwrap()]),
        &["cut.msgpack", "byte"],
    );
}
