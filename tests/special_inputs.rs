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
        (&["alloc", "--trace", "/dev/urandom"], &["/dev/urandom:1"]),
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
