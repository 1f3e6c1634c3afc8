//! `--compare-segments` on the real PyTorch snapshots of `../shared/traces/torch-snapshots`
//! (licensed data, read in place, never copied; `GPUMEM_SHARED_TRACES` moves the directory).
//! Missing data FAILS these tests. Each golden test asserts at least the ratio measured when it
//! was written, so a regression fails and an improvement passes.

mod common;
use common::snapshot;

use gpumem_core::alloc::{AllocConfig, GIB};
use gpumem_sim::recorded::{compare, SegmentsComparison};
use gpumem_traces::torch::recording;

fn run(name: &str) -> SegmentsComparison {
    let rec = recording::read(&snapshot(name)).unwrap();
    let config = AllocConfig {
        capacity_bytes: 80 * GIB,
        ..AllocConfig::default()
    };
    let settings = rec.settings.unwrap_or_default();
    compare(&rec, &config, &settings)
}

/// `matched / recorded ≥ floor_ppm / 1e6`, with the numbers in the message.
fn at_least(what: &str, matched: u64, recorded: u64, floor_ppm: u64) {
    assert!(
        matched * 1_000_000 >= recorded * floor_ppm,
        "{what}: {matched} of {recorded} matched, below {floor_ppm} ppm"
    );
}

/// The counts of one snapshot, every device together, and the run repeated gives the same.
fn golden(name: &str, final_recorded: u64, final_matched_floor: u64) -> SegmentsComparison {
    let c = run(name);
    assert_eq!(c, run(name), "{name}: two runs differ");
    assert_eq!(c.final_recorded, final_recorded, "{name}");
    at_least(name, c.final_matched, c.final_recorded, 970_000);
    assert!(
        c.final_matched >= final_matched_floor,
        "{name}: {} of {} final segments, fewer than the {final_matched_floor} measured",
        c.final_matched,
        c.final_recorded
    );
    at_least(name, c.events_matched, c.events_recorded, 970_000);
    c
}

/// These two recordings hold `alloc` / `free_*` events but no segment event (recorded with
/// segment actions skipped): every segment existed before the first event, so the replay
/// starts from the rebuilt state and every request must land at its recorded address.
#[test]
fn magma27_every_allocation_lands_at_its_recorded_address() {
    let c = golden("cs336_magma27_memory_snapshot.pickle", 216, 216);
    let d = &c.devices[0];
    assert_eq!((d.start, d.events_recorded), ("restored", 0));
    assert_eq!((d.allocs, d.allocs_at_recorded_address), (1721, 1721));
    assert_eq!((d.restored_segments, d.unknown_frees), (216, 0));
    assert!(d.restore_notes.is_empty(), "{:?}", d.restore_notes);
}

#[test]
fn bcrafton_every_allocation_lands_at_its_recorded_address() {
    let c = golden("cs336_bcrafton_memory_snapshot.pickle", 96, 96);
    let d = &c.devices[0];
    assert_eq!((d.start, d.events_recorded), ("restored", 0));
    assert_eq!((d.allocs, d.allocs_at_recorded_address), (2162, 2162));
    // 222 allocations were live before the recording and are freed during it.
    assert_eq!(d.unknown_frees, 0);
    assert!(d.restore_notes.is_empty(), "{:?}", d.restore_notes);
}

/// State-only snapshots (one `free_completed`): the restored state replays that free. Built
/// from nothing instead, address order cannot recover the history: reported beside it.
#[test]
fn sketchkv2_state_only() {
    let c = golden("sketchkv2_my_snapshot.pickle", 259, 259);
    let d = &c.devices[0];
    assert_eq!(d.start, "restored");
    assert!(d.final_matched_from_empty.unwrap() >= 232, "{d:?}");
}

#[test]
fn yiyi_1_3b_state_only() {
    let c = golden("yiyi_1.3b_snapshot.pickle", 257, 257);
    let d = &c.devices[0];
    assert_eq!(d.start, "restored");
    assert!(d.final_matched_from_empty.unwrap() >= 143, "{d:?}");
}

/// Only a `snapshot` entry: the live blocks allocated from nothing reproduce every segment.
#[test]
fn yiyi_oom_from_nothing() {
    let c = golden("yiyi_oom_snapshot.pickle", 176, 176);
    let d = &c.devices[0];
    assert_eq!(d.start, "synthesised");
    assert_eq!(d.allocs_at_recorded_address, d.allocs);
    assert!(c.first_divergence.is_none());
}
