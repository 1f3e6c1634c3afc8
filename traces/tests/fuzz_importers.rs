//! A brief fuzz run of every file importer, in CI: arbitrary bytes and mutations of real files
//! (flipped, inserted, deleted bytes; truncations; spliced lines) must give a value or a clean
//! error — never a panic — and must stay within a bounded amount of memory.
//!
//! The serving traces go through their streaming reader ([`RequestStream`]), with the format
//! given and detected: samples of every format, and any window of every real Mooncake and
//! Azure trace; besides what every importer must do, their messages must be safe to print
//! (the file named, no control character, at most [`MAX_MESSAGE_BYTES`]) and their warnings
//! few.

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
    /// Inserts a piece of text that importers have choked on, or that a terminal obeys.
    Hostile {
        at: usize,
        which: usize,
    },
    /// Repeats a run of the file many times over (long lines, many fields or keys).
    Repeat {
        from: usize,
        len: usize,
        times: usize,
    },
}

/// What [`Mutation::Hostile`] inserts.
const HOSTILE: [&[u8]; 18] = [
    b"\x1b]0;owned\x07",
    b"\x1b[31m",
    b"\0",
    b"0e2147483647",
    b"1e400",
    b"99999999999999999999999",
    b"4294967297",
    b"\xef\xbb\xbf",
    b"\"",
    b"\"\"",
    b",",
    b"\n",
    b"\r\n",
    b"{",
    b"]",
    b"\xff\xfe",
    b"\\u001b",
    b"\xe2\x80\xae",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (at, proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at, 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, at, 1usize..256).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        (at, 0..HOSTILE.len()).prop_map(|(at, which)| Mutation::Hostile { at, which }),
        (at, 1usize..64, 1usize..20_000).prop_map(|(from, len, times)| Mutation::Repeat {
            from,
            len,
            times
        }),
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
            Mutation::Hostile { at, which } => {
                let at = at % (n + 1);
                b.splice(at..at, HOSTILE[*which].iter().copied());
            }
            Mutation::Repeat { from, len, times } => {
                let from = from % n;
                let run = b[from..(from + len).min(n)].to_vec();
                let copies: Vec<u8> = run
                    .iter()
                    .copied()
                    .cycle()
                    .take(run.len() * times)
                    .collect();
                b.splice(from..from, copies);
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

/// Longest error or warning a serving trace may produce: input is echoed cut short.
const MAX_MESSAGE_BYTES: usize = 1024;

/// A message as a terminal may show it: naming the file when it is an error, no control
/// character, no bidirectional override, bounded.
fn check_message(name: &str, message: &str, is_error: bool) -> Result<(), String> {
    if is_error && !message.starts_with(name) {
        return Err(format!("does not name {name}: {message:?}"));
    }
    if message
        .chars()
        .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c))
    {
        return Err(format!("raw control text: {message:?}"));
    }
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(format!("{} bytes: {}…", message.len(), &message[..200]));
    }
    Ok(())
}

/// Reads every request of `bytes` as `name` (format given or detected): a refusal names the
/// file, and every message is safe to print (see [`check_message`]).
fn read_serving(name: &str, format: Option<WorkloadFormat>, bytes: &[u8]) -> Result<(), String> {
    let mut stream = match RequestStream::from_reader(bytes, name, format, None) {
        Ok(s) => s,
        Err(e) => return check_message(name, &e.to_string(), true),
    };
    for r in &mut stream {
        if let Err(e) = r {
            check_message(name, &e.to_string(), true)?;
            break;
        }
    }
    // Unknown fields: a few by name, then one count (plus the skipped rows' count).
    if stream.warnings().len() > 10 {
        return Err(format!("{} warnings", stream.warnings().len()));
    }
    for w in stream.warnings() {
        check_message(name, w, false)?;
    }
    Ok(())
}

/// The real request traces of the shared set: every Mooncake JSON Lines file and every Azure
/// CSV, each with its format and its lines.
fn real_serving_traces() -> &'static [(String, WorkloadFormat, Vec<String>)] {
    static TRACES: std::sync::OnceLock<Vec<(String, WorkloadFormat, Vec<String>)>> =
        std::sync::OnceLock::new();
    TRACES.get_or_init(|| {
        let mut traces = Vec::new();
        for (dir, ext, format) in [
            ("mooncake", "jsonl", WorkloadFormat::Mooncake),
            ("azure-llm-2023", "csv", WorkloadFormat::Azure),
        ] {
            let mut files: Vec<PathBuf> = std::fs::read_dir(shared_traces().join(dir))
                .unwrap_or_else(|e| panic!("{dir}: {e}"))
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect();
            files.sort();
            for path in files {
                let text = String::from_utf8(real(&path)).expect("a text trace");
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                traces.push((name, format, text.lines().map(str::to_owned).collect()));
            }
        }
        assert!(traces.len() >= 4, "{} real request traces", traces.len());
        traces
    })
}

/// `count` lines of a real trace from line `start` on (wrapping), after its header if it has
/// one: any part of the file, not only its head.
fn window(lines: &[String], format: WorkloadFormat, start: usize, count: usize) -> Vec<u8> {
    let csv = matches!(format, WorkloadFormat::Azure | WorkloadFormat::BurstGpt);
    let (header, body) = if csv {
        (&lines[..1], &lines[1..])
    } else {
        (&lines[..0], lines)
    };
    header
        .iter()
        .chain(body.iter().cycle().skip(start % body.len()).take(count))
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect()
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

    /// Any window of every real Mooncake and Azure trace, mutated, read with its format given
    /// or told from its content.
    #[test]
    fn real_request_traces_mutated_never_panic(
        edits in proptest::collection::vec(mutation(), 1..6),
        which in any::<usize>(),
        start in any::<usize>(),
        count in 1usize..40,
        detect in any::<bool>(),
    ) {
        let traces = real_serving_traces();
        let (name, format, lines) = &traces[which % traces.len()];
        let bytes = mutate(&window(lines, *format, start, count), &edits);
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
