//! The report's reader may go away: a closed pipe ends the run quietly (exit 0, nothing on
//! stderr), a full disk is a clear error (exit 2) — never a panic.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn kv_events_fixture() -> String {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kv_events/default.msgpack");
    p.to_str().unwrap().to_string()
}

/// Runs gpumem with a stdout pipe whose reading end is closed before anything is read.
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gpumem starts");
    drop(child.stdout.take());
    child.wait_with_output().expect("gpumem ends")
}

fn commands() -> Vec<Vec<String>> {
    let small = [
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "2000",
        "--capacity",
        "64MiB",
    ];
    let small: Vec<String> = small.iter().map(|s| s.to_string()).collect();
    let mut json = small.clone();
    json.push("--json".into());
    vec![
        small,
        json,
        vec!["kv-events".into(), kv_events_fixture()],
        vec!["kv-events".into(), kv_events_fixture(), "--json".into()],
        vec!["alloc".into(), "--print-spec".into()],
        vec!["kv".into(), "--limit".into(), "50".into()],
        vec!["kv".into(), "--limit".into(), "50".into(), "--json".into()],
    ]
}

#[test]
fn a_closed_pipe_is_a_quiet_exit() {
    for args in commands() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = with_closed_stdout(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{args:?}");
    }
}

#[test]
fn a_full_disk_is_a_clear_error() {
    for args in commands() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let full = std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full exists on Linux");
        let out = Command::new(env!("CARGO_BIN_EXE_gpumem"))
            .args(&args)
            .stdout(full)
            .output()
            .expect("gpumem runs");
        assert_clean_error(
            &out,
            &["cannot write the report to stdout", "No space left"],
        );
    }
}
