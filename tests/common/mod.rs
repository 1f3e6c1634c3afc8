//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// The shared real traces. Missing traces fail the test: they must run in CI, never be skipped.
pub fn shared_traces() -> PathBuf {
    let dir = std::env::var_os("GPUMEM_SHARED_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/traces"));
    assert!(
        dir.join("torch-snapshots").is_dir(),
        "shared traces not found at {} (set GPUMEM_SHARED_TRACES)",
        dir.display()
    );
    dir
}

pub fn snapshot(name: &str) -> PathBuf {
    shared_traces().join("torch-snapshots").join(name)
}

pub const SNAPSHOTS: [&str; 5] = [
    "cs336_magma27_memory_snapshot.pickle",
    "cs336_bcrafton_memory_snapshot.pickle",
    "sketchkv2_my_snapshot.pickle",
    "yiyi_oom_snapshot.pickle",
    "yiyi_1.3b_snapshot.pickle",
];

pub fn gpumem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(args)
        .output()
        .expect("gpumem runs")
}

/// A fresh, empty scratch directory under the system's temp dir, removed when the test that
/// made it passes (kept for a look when it fails).
pub fn scratch_dir() -> Scratch {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gpumem-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // Process ids are reused: a finished test process that had ours may have left this
    // directory, and a test that lists what it wrote must not find its files.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("a stale scratch dir is removed");
    }
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// See [`scratch_dir`]; it reads as the directory's path.
pub struct Scratch(PathBuf);

/// A path named `name` in a scratch directory of its own, removed with it: for a helper that
/// hands a file back.
pub fn scratch_file(name: &str) -> ScratchFile {
    let dir = scratch_dir();
    ScratchFile {
        path: dir.join(name),
        _dir: dir,
    }
}

/// See [`scratch_file`]; it reads as the file's path.
pub struct ScratchFile {
    path: PathBuf,
    _dir: Scratch,
}

impl std::ops::Deref for ScratchFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::path::Path> for ScratchFile {
    fn as_ref(&self) -> &std::path::Path {
        &self.path
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// The run failed cleanly: exit code 2 (bad input), an error message, no panic.
pub fn assert_clean_error(out: &Output, must_mention: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for needle in must_mention {
        assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
    }
}

/// The Mooncake FAST'25 conversation trace (12,031 requests).
pub fn mooncake_conversation() -> PathBuf {
    let p = shared_traces().join("mooncake/conversation_trace.jsonl");
    assert!(p.is_file(), "{} missing", p.display());
    p
}

/// An Azure LLM inference 2023 trace: `code` or `conv`.
pub fn azure_trace(kind: &str) -> PathBuf {
    let p = shared_traces().join(format!("azure-llm-2023/AzureLLMInferenceTrace_{kind}.csv"));
    assert!(p.is_file(), "{} missing", p.display());
    p
}
