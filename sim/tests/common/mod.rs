//! What the sim crate's tests share.

use std::path::PathBuf;

/// A PyTorch snapshot of the shared traces (`../shared/traces/torch-snapshots/`, or under
/// `GPUMEM_SHARED_TRACES`); a missing one fails the test, naming where it was looked for.
pub fn snapshot(name: &str) -> PathBuf {
    let dir = match std::env::var_os("GPUMEM_SHARED_TRACES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"),
    };
    let path = dir.join("torch-snapshots").join(name);
    assert!(
        path.is_file(),
        "the shared snapshot {} is missing (set GPUMEM_SHARED_TRACES to the directory that holds torch-snapshots/)",
        path.display()
    );
    path
}
