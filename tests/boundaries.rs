//! The crate boundaries of ARCHITECTURE.md ("Boundaries"), as far as a test can see them: which
//! workspace crate may depend on which, what `core` depends on, and that `core` stays pure (no file, clock, thread,
//! environment, process, network or randomness of its own).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The names under `[dependencies]` of a Cargo.toml (not dev- or build-dependencies).
fn dependencies(manifest: &Path) -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    let mut in_dependencies = false;
    let mut names = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
            continue;
        }
        if !in_dependencies || line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name = ...` or `name.workspace = true`.
        let name = line.split(['=', '.']).next().unwrap_or("").trim();
        names.insert(name.to_owned());
    }
    names
}

fn workspace_dependencies(krate: &str) -> BTreeSet<String> {
    dependencies(&root().join(krate).join("Cargo.toml"))
        .into_iter()
        .filter(|name| name.starts_with("gpumem"))
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn workspace_crates_depend_only_downward() {
    assert_eq!(
        workspace_dependencies("core"),
        set(&[]),
        "core depends on no workspace crate"
    );
    assert_eq!(workspace_dependencies("traces"), set(&["gpumem-core"]));
    assert_eq!(
        workspace_dependencies("sim"),
        set(&["gpumem-core", "gpumem-traces"])
    );
    assert_eq!(
        workspace_dependencies("gpu"),
        set(&["gpumem-core"]),
        "the executor knows the contract, not the drivers or the formats"
    );
}

/// Pure libraries only: a new dependency of core is a decision, taken here and in
/// ARCHITECTURE.md, never by the way.
#[test]
fn core_depends_on_pure_libraries_only() {
    assert_eq!(
        dependencies(&root().join("core/Cargo.toml")),
        set(&["ciborium", "hashbrown", "serde", "sha2"]),
        "serde; sha2 and ciborium for vLLM's sha256_cbor block hashes; hashbrown for the CPU \
         tier's key index (a HashTable of entries without their keys)"
    );
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn core_names_no_file_clock_thread_or_outside_world() {
    const FORBIDDEN: [&str; 10] = [
        "std::fs",
        "std::time",
        "std::thread",
        "std::env",
        "std::process",
        "std::net",
        "Instant::",
        "SystemTime",
        "thread_rng",
        "rayon",
    ];
    let mut files = Vec::new();
    rust_files(&root().join("core/src"), &mut files);
    files.sort();
    assert!(files.len() > 10, "core/src holds the policies");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable source");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN.iter().filter(|w| code.contains(*w)) {
                found.push(format!("{}:{}: {word}", file.display(), i + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "core must stay pure:\n{}",
        found.join("\n")
    );
}
