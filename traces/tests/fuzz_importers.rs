//! A brief fuzz run of every file importer, in CI: arbitrary bytes and mutations of real files
//! (flipped, inserted, deleted bytes; truncations; spliced lines) must give a value or a clean
//! error — never a panic — and must stay within a bounded amount of memory.
//!
//! The serving traces go through their streaming reader ([`RequestStream`]), with the format
//! given and detected.

use std::path::{Path, PathBuf};

use gpumem_traces::serving::{RequestStream, WorkloadFormat};
use gpumem_traces::{jsonl, kv_events, torch};
use proptest::prelude::*;

/// Resident memory the whole test process may reach while fuzzing (every importer caps what it
/// builds far below this).
const RSS_LIMIT_BYTES: u64 = 2 << 30;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn assert_bounded() {
    let rss = resident_bytes();
    assert!(rss < RSS_LIMIT_BYTES, "resident memory {rss} bytes");
}

fn shared_traces() -> PathBuf {
    let dir = std::env::var_os("GPUMEM_SHARED_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"));
    assert!(
        dir.join("torch-snapshots").is_dir(),
        "shared traces not found at {} (set GPUMEM_SHARED_TRACES)",
        dir.display()
    );
    dir
}

fn real(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn snapshot(name: &str) -> Vec<u8> {
    real(&shared_traces().join("torch-snapshots").join(name))
}

fn kv_event_fixture(name: &str) -> Vec<u8> {
    real(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/kv_events")
            .join(name),
    )
}

/// One edit of a file.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Copies a run of the file over another place (splices records and lines).
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (at, proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at, 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, at, 1usize..256).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

fn mutate(original: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut b = original.to_vec();
    for m in edits {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match m {
            Mutation::Flip { at, xor } => b[at % n] ^= xor,
            Mutation::Insert { at, bytes } => {
                let at = at % (n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete { at, len } => {
                let at = at % n;
                b.drain(at..(at + len).min(n));
            }
            Mutation::Truncate { at } => b.truncate(at % n),
            Mutation::Splice { from, to, len } => {
                let (from, to) = (from % n, to % n);
                let len = (*len).min(n - from).min(n - to);
                let run = b[from..from + len].to_vec();
                b[to..to + len].copy_from_slice(&run);
            }
        }
    }
    b
}

/// A small gpumem allocation trace in JSON Lines, as the exporter writes it.
fn jsonl_sample() -> Vec<u8> {
    let trace = gpumem_traces::generate::occupancy(&gpumem_traces::generate::OccupancyParams {
        seed: 1,
        ops: 200,
        capacity_bytes: 1 << 24,
        target_occupancy_pct: 80,
        min_bytes: 512,
        max_bytes: 1 << 20,
    });
    let mut out = Vec::new();
    jsonl::write(&trace, &mut out).unwrap();
    out
}

/// The first `lines` lines of a real file.
fn head(path: &Path, lines: usize) -> Vec<u8> {
    let text = String::from_utf8(real(path)).expect("a text trace");
    text.lines()
        .take(lines)
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect()
}

/// Samples of every serving format, real where the project has them.
fn serving_samples() -> Vec<(&'static str, WorkloadFormat, Vec<u8>)> {
    let traces = shared_traces();
    let conformance = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/mooncake-500-small/workload.jsonl");
    vec![
        ("c.jsonl", WorkloadFormat::Conformance, head(&conformance, 20)),
        (
            "m.jsonl",
            WorkloadFormat::Mooncake,
            head(&traces.join("mooncake/conversation_trace.jsonl"), 20),
        ),
        (
            "q.jsonl",
            WorkloadFormat::QwenBailian,
            (0..20)
                .map(|i| format!("{{\"chat_id\": {i}, \"parent_chat_id\": -1, \"timestamp\": {}.5, \"input_length\": 40, \"output_length\": 3, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [1, 2, {i}]}}\n", i * 2))
                .collect::<String>()
                .into_bytes(),
        ),
        (
            "a.csv",
            WorkloadFormat::Azure,
            head(&traces.join("azure-llm-2023/AzureLLMInferenceTrace_code.csv"), 20),
        ),
        (
            "b.csv",
            WorkloadFormat::BurstGpt,
            format!(
                "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n{}",
                (0..20)
                    .map(|i| format!("{i}.25,ChatGPT,{},{},0,Conversation log\n", 100 + i, i % 3))
                    .collect::<String>()
            )
            .into_bytes(),
        ),
    ]
}

/// Reads every request of `bytes` as `name` (format given or detected); a refusal names the
/// file.
fn read_serving(name: &str, format: Option<WorkloadFormat>, bytes: &[u8]) -> Result<(), String> {
    let stream = match RequestStream::from_reader(bytes, name, format, None) {
        Ok(s) => s,
        Err(e) if e.to_string().contains(name) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    for r in stream {
        match r {
            Ok(_) => {}
            Err(e) if e.to_string().contains(name) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn serving_traces_never_panic(
        edits in proptest::collection::vec(mutation(), 1..6),
        which in 0usize..5,
        detect in any::<bool>(),
    ) {
        let (name, format, sample) = &serving_samples()[which];
        let bytes = mutate(sample, &edits);
        let format = (!detect).then_some(*format);
        read_serving(name, format, &bytes).map_err(TestCaseError::fail)?;
        assert_bounded();
    }

    #[test]
    fn serving_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for format in WorkloadFormat::ALL.into_iter().map(Some).chain([None]) {
            read_serving("x", format, &bytes).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn torch_snapshots_never_panic(
        edits in proptest::collection::vec(mutation(), 1..4),
        which in 0usize..2,
    ) {
        let name = ["sketchkv2_my_snapshot.pickle", "yiyi_1.3b_snapshot.pickle"][which];
        let bytes = mutate(&snapshot(name), &edits);
        let _ = torch::parse_bytes(Path::new(name), &bytes);
        assert_bounded();
    }

    #[test]
    fn torch_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut pickle = vec![0x80, 4];
        pickle.extend_from_slice(&bytes);
        let _ = torch::parse_bytes(Path::new("arbitrary.pickle"), &pickle);
        let _ = torch::parse_bytes(Path::new("arbitrary.pickle"), &bytes);
    }

    #[test]
    fn jsonl_alloc_traces_never_panic(edits in proptest::collection::vec(mutation(), 1..6)) {
        let bytes = mutate(&jsonl_sample(), &edits);
        if let Err(e) = jsonl::parse_bytes(Path::new("t.jsonl"), &bytes) {
            // Every refusal names the file.
            prop_assert!(e.to_string().contains("t.jsonl"), "{}", e);
        }
        assert_bounded();
    }

    #[test]
    fn kv_event_streams_never_panic(
        edits in proptest::collection::vec(mutation(), 1..4),
        which in 0usize..2,
    ) {
        let name = ["default.msgpack", "sha256_cbor.msgpack"][which];
        let bytes = mutate(&kv_event_fixture(name), &edits);
        if let Err(e) = kv_events::import_bytes(Path::new(name), &bytes) {
            prop_assert!(e.to_string().contains(name), "{}", e);
        }
        assert_bounded();
    }

    #[test]
    fn kv_event_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = kv_events::import_bytes(Path::new("arbitrary.msgpack"), &bytes);
    }
}
