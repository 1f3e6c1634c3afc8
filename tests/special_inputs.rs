//! Inputs a user can hand any subcommand that are not ordinary files: endless devices, folders,
//! empty files, stdin and pipes, a byte-order mark, a trace meant for another subcommand.
//! Each is a clear error or a normal run — never a hang, a panic or unbounded memory.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

/// Runs gpumem with `input` on stdin.
fn with_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gpumem starts");
    let mut stdin = child.stdin.take().unwrap();
    // The reader may stop early (an error): a closed pipe is then expected.
    let _ = stdin.write_all(input);
    drop(stdin);
    child.wait_with_output().expect("gpumem ends")
}

fn small_alloc_trace() -> Vec<u8> {
    let dir = scratch_dir();
    let path = dir.join("t.jsonl");
    let out = gpumem(&[
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "200",
        "--capacity",
        "64MiB",
        "--strategy",
        "tlsf",
        "--export-trace",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::read(&path).unwrap()
}

#[test]
fn endless_and_odd_files_are_clear_errors_for_alloc_and_kv_events() {
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["alloc", "--trace", "/dev/zero"],
            &["/dev/zero:1", "limit"],
        ),
        // Random bytes are read as JSON Lines (an error on line 1) or, when the first byte is
        // a pickle's, as a snapshot (an error at a byte offset of the first megabyte).
        (&["alloc", "--trace", "/dev/urandom"], &["/dev/urandom:"]),
        (
            &["alloc", "--trace", "/dev/null"],
            &["/dev/null: the trace holds no operation"],
        ),
        (&["alloc", "--trace", "/"], &["/: is a folder"]),
        (
            &["kv-events", "/dev/zero"],
            &["/dev/zero", "MAX_EVENT_STREAM_BYTES"],
        ),
        (
            &["kv-events", "/dev/null"],
            &["/dev/null: the stream holds no event"],
        ),
        (&["kv-events", "/"], &["/: is a folder"]),
    ];
    for (args, mentions) in cases {
        let out = gpumem(args);
        assert_clean_error(&out, mentions);
        // A folder's error has no line: nothing was read.
        assert!(!stderr(&out).contains("/:1:"), "{}", stderr(&out));
    }
}

#[test]
fn a_stream_that_starts_like_a_pickle_is_refused_without_reading_it_all() {
    // A pickle's first byte, then an unknown opcode, then more than the probe: refused at the
    // opcode, from the first megabyte (2 MiB written; the rest is never needed).
    let mut input = vec![0x80, 4, 0xff];
    input.resize(2 << 20, 0);
    for args in [
        &["alloc", "--trace", "-"][..],
        &[
            "alloc",
            "--trace",
            "-",
            "--strategy",
            "caching",
            "--compare-segments",
        ][..],
    ] {
        let out = with_stdin(args, &input);
        assert_clean_error(&out, &["byte 2", "unknown opcode 0xff"]);
    }
}

#[test]
fn a_pickle_that_stops_early_in_an_endless_stream_is_read_no_further() {
    // `None` then STOP, then zeros for as long as gpumem reads: the pickle is whole in the
    // probe, so the rest is never read (no size limit is reached) and the refusal is the
    // snapshot's own.
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(["alloc", "--trace", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gpumem starts");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&[0x80, 2, b'N', b'.']);
        let zeros = vec![0u8; 1 << 16];
        // Stops when gpumem closes the pipe; 4 GiB at most, should it never.
        for _ in 0..1 << 16 {
            if stdin.write_all(&zeros).is_err() {
                break;
            }
        }
    });
    let out = child.wait_with_output().expect("gpumem ends");
    writer.join().unwrap();
    assert_clean_error(&out, &["a snapshot must be a dict"]);
}

#[test]
fn an_allocation_trace_reads_from_stdin_once() {
    let trace = small_alloc_trace();
    let from_file = {
        let dir = scratch_dir();
        let path = dir.join("again.jsonl");
        std::fs::write(&path, &trace).unwrap();
        gpumem(&[
            "alloc",
            "--trace",
            path.to_str().unwrap(),
            "--strategy",
            "tlsf",
            "--json",
        ])
    };
    let from_pipe = with_stdin(
        &["alloc", "--trace", "-", "--strategy", "tlsf", "--json"],
        &trace,
    );
    assert_eq!(from_pipe.status.code(), Some(0), "{}", stderr(&from_pipe));
    let digest = |out: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_str(&stdout(out)).unwrap();
        (
            v["results"][0]["digest"].clone(),
            v["results"][0]["ops"].clone(),
        )
    };
    assert_eq!(digest(&from_pipe), digest(&from_file));
    // A byte-order mark in front changes nothing.
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(&trace);
    let with_bom = with_stdin(
        &["alloc", "--trace", "-", "--strategy", "tlsf", "--json"],
        &bom,
    );
    assert_eq!(digest(&with_bom), digest(&from_file));
}

#[test]
fn a_serving_trace_given_to_alloc_names_the_subcommand_that_reads_it() {
    let conv = mooncake_conversation();
    let out = gpumem(&["alloc", "--trace", conv.to_str().unwrap()]);
    assert_clean_error(&out, &["request trace", "gpumem kv --trace"]);
}

/// Runs gpumem, killed after `seconds` (a hang fails the test instead of stalling it).
fn within(seconds: u64, command: &mut Command) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gpumem starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while child.try_wait().expect("gpumem runs").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gpumem still running after {seconds} s: {command:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("gpumem ends")
}

#[test]
fn a_fifo_is_a_request_trace_read_once_its_format_told_from_it() {
    let dir = scratch_dir();
    let fifo = dir.join("trace.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let trace = mooncake_conversation();
    let args = ["--limit", "200", "--kv-blocks", "3000", "--json"];
    let from_file = gpumem(&[&["kv", "--trace", trace.to_str().unwrap()][..], &args].concat());
    assert_eq!(from_file.status.code(), Some(0), "{}", stderr(&from_file));
    let bytes = std::fs::read(&trace).unwrap();
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        // gpumem stops after 200 requests: the rest of the write may find the FIFO closed.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&writer_path) {
            let _ = f.write_all(&bytes);
        }
    });
    let out = within(
        120,
        Command::new(env!("CARGO_BIN_EXE_gpumem"))
            .args(["kv", "--trace", fifo.to_str().unwrap()])
            .args(args),
    );
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = |out: &std::process::Output| {
        let mut v: serde_json::Value = serde_json::from_str(&stdout(out)).unwrap();
        v["config"]["trace"] = serde_json::Value::Null;
        v
    };
    assert_eq!(report(&out), report(&from_file));
}

#[test]
fn odd_inputs_to_kv_are_clear_errors() {
    let dir = scratch_dir();
    let snapshot = common::snapshot("sketchkv2_my_snapshot.pickle");
    let protocol_0 = dir.join("p0.pickle");
    std::fs::write(&protocol_0, b"(dp0\nVsegments\np1\n(lp2\ns.").unwrap();
    let events = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kv_events/default.msgpack");
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["--trace", snapshot.to_str().unwrap()],
            vec![format!(
                "{}: this is an allocation snapshot (a pickle), not a request trace: `gpumem alloc --trace` reads it",
                snapshot.display()
            )],
        ),
        (
            vec!["--trace", protocol_0.to_str().unwrap()],
            vec!["`gpumem alloc --trace` reads it".into()],
        ),
        (
            vec!["--trace", events.to_str().unwrap()],
            vec!["`gpumem kv-events` reads it".into()],
        ),
        (
            vec!["--trace", "/dev/null"],
            vec!["gpumem: error: /dev/null: the trace holds no request".into()],
        ),
        (
            vec!["--trace", "/dev/null", "--format", "azure"],
            vec!["/dev/null: the trace holds no request".into()],
        ),
        (vec!["--trace", "/"], vec!["/: is a folder".into()]),
        (
            vec!["--trace", "/dev/zero"],
            vec!["/dev/zero:1: the line is longer than gpumem's limit".into()],
        ),
    ];
    for (args, mentions) in cases {
        let out = within(
            60,
            Command::new(env!("CARGO_BIN_EXE_gpumem"))
                .arg("kv")
                .args(&args),
        );
        let mentions: Vec<&str> = mentions.iter().map(String::as_str).collect();
        assert_clean_error(&out, &mentions);
        assert!(!stderr(&out).contains("/:1:"), "{}", stderr(&out));
    }
    // --execute runs the trace three times: a pipe is refused before it is read.
    let out = with_stdin(
        &["kv", "--trace", "-", "--execute", "host"],
        &std::fs::read(mooncake_conversation()).unwrap(),
    );
    assert_clean_error(
        &out,
        &["-: --execute reads the trace once per run", "not a pipe"],
    );
}

#[test]
fn hostile_trace_text_never_reaches_the_terminal_raw() {
    let dir = scratch_dir();
    let header = dir.join("hostile.csv");
    let mut text = b"TIMESTAMP,\x1b]0;owned\x07\x1b[31m\0,GeneratedTokens,".to_vec();
    text.extend(std::iter::repeat_n(b'x', 10 << 20));
    text.extend_from_slice(b"\n2023-11-16 18:17:03.97,4,10\n");
    std::fs::write(&header, &text).unwrap();
    let keys = dir.join("keys.jsonl");
    let many: String = (0..200_000).map(|i| format!(", \"k{i}\": 0")).collect();
    std::fs::write(
        &keys,
        format!("{{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0]{many}}}\n"),
    )
    .unwrap();
    let out = gpumem(&[
        "kv",
        "--trace",
        header.to_str().unwrap(),
        "--format",
        "azure",
    ]);
    assert_clean_error(
        &out,
        &["hostile.csv:1: the header lacks the column 'ContextTokens'"],
    );
    let err = stderr(&out);
    assert!(err.len() < 400, "{} bytes of error", err.len());
    assert!(!err.contains(['\x1b', '\x07', '\0']), "{err:?}");
    let out = gpumem(&[
        "kv",
        "--trace",
        keys.to_str().unwrap(),
        "--kv-blocks",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let warnings = stderr(&out)
        .lines()
        .filter(|l| l.contains("warning"))
        .count();
    assert_eq!(warnings, 9, "{}", stderr(&out));
}
