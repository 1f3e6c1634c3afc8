//! A plain replay of a torch snapshot through `caching` (no `--compare-segments`) starts from the
//! state before the recording's first event, as the comparison does; the other strategies, and
//! traces that are no snapshot, start empty as before. On the real snapshots of
//! `../shared/traces/torch-snapshots` (read in place, never copied; `GPUMEM_SHARED_TRACES` moves
//! the directory). Missing data FAILS these tests.

mod common;
use common::snapshot;

use gpumem_core::alloc::{AllocConfig, Strategy, GIB};
use gpumem_sim::alloc_replay::{simulate_all, ReplayConfig, StrategyResult};
use gpumem_sim::recorded::OTHER_STRATEGY_STARTS_EMPTY;
use gpumem_traces::{load_alloc_trace, AllocTrace};

/// The snapshots whose trace changes the allocator (alloc or free events): a recorded start.
const TRACED: [&str; 4] = [
    "cs336_magma27_memory_snapshot.pickle",
    "cs336_bcrafton_memory_snapshot.pickle",
    "sketchkv2_my_snapshot.pickle",
    "yiyi_1.3b_snapshot.pickle",
];

fn config(trace: &AllocTrace, capacity_bytes: u64) -> ReplayConfig {
    let mut config = ReplayConfig::new(AllocConfig {
        capacity_bytes,
        ..AllocConfig::default()
    });
    config.caching = trace.caching_settings.unwrap_or_default();
    config
}

fn run(trace: &AllocTrace, strategies: &[Strategy], capacity_bytes: u64) -> Vec<StrategyResult> {
    simulate_all(
        trace,
        strategies,
        &config(trace, capacity_bytes),
        &|_, _| {},
    )
    .unwrap()
    .results
}

/// Bytes of the final segments the snapshot recorded.
fn recorded_total(trace: &AllocTrace) -> u64 {
    let segments = trace.recorded_segments.as_ref().expect("a snapshot");
    segments.iter().map(|s| s.total_bytes).sum()
}

#[test]
fn caching_starts_from_the_recorded_state_of_every_traced_snapshot() {
    for name in TRACED {
        let trace = load_alloc_trace(&snapshot(name)).unwrap();
        let r = &run(&trace, &[Strategy::Caching], 80 * GIB)[0];
        let start = r
            .start
            .as_ref()
            .expect("a snapshot's replay says its start");
        assert_eq!(start.start, "recorded", "{name}: {start:?}");
        assert_eq!(start.start_reason, None, "{name}");
        assert!(
            start.start_notes.is_empty(),
            "{name}: {:?}",
            start.start_notes
        );
        // Every recorded segment is held at some point of the recorded run (none is released
        // in these traces), so its peak is at least their total; an empty start reaches far
        // less on each of these snapshots.
        let total = recorded_total(&trace);
        assert!(
            r.bytes_reserved_peak >= total,
            "{name}: peak reserved {} below the recorded segments' {total}",
            r.bytes_reserved_peak
        );
        assert!(
            start.start_reserved_bytes <= r.bytes_reserved_peak,
            "{name}"
        );
        // Frees of allocations made before the recording free restored blocks.
        assert_eq!(r.unknown_frees, 0, "{name}");
        let m = r.segments_match.as_ref().expect("caching is compared");
        assert!(m.matches, "{name}: final segments {m:?}");
    }
}

#[test]
fn without_the_recording_caching_starts_empty_and_peaks_lower() {
    // What the replay did before it restored the recorded state: the same trace, its
    // recording taken away. The figures are those measured when the start was added.
    let cases = [
        (
            "cs336_bcrafton_memory_snapshot.pickle",
            2_151_677_952,
            4_238_344_192,
        ),
        (
            "cs336_magma27_memory_snapshot.pickle",
            12_935_233_536,
            14_180_941_824,
        ),
        (
            "sketchkv2_my_snapshot.pickle",
            16_475_226_112,
            17_133_731_840,
        ),
        ("yiyi_1.3b_snapshot.pickle", 6_111_100_928, 7_608_467_456),
    ];
    for (name, empty_peak, recorded_peak) in cases {
        let mut trace = load_alloc_trace(&snapshot(name)).unwrap();
        let recorded = &run(&trace, &[Strategy::Caching], 80 * GIB)[0];
        assert_eq!(recorded.bytes_reserved_peak, recorded_peak, "{name}");
        trace.recording = None;
        let empty = &run(&trace, &[Strategy::Caching], 80 * GIB)[0];
        assert_eq!(empty.start, None, "{name}: a trace without its recording");
        assert_eq!(empty.bytes_reserved_peak, empty_peak, "{name}");
        assert!(empty_peak < recorded_peak, "{name}");
    }
}

#[test]
fn the_other_strategies_replay_as_before_and_say_why_they_start_empty() {
    let others = [
        Strategy::FirstFit,
        Strategy::BestFit,
        Strategy::Buddy,
        Strategy::Tlsf,
        Strategy::SizeClass,
    ];
    let name = "cs336_bcrafton_memory_snapshot.pickle";
    let mut trace = load_alloc_trace(&snapshot(name)).unwrap();
    let with = run(&trace, &others, 80 * GIB);
    trace.recording = None;
    let without = run(&trace, &others, 80 * GIB);
    for (mut w, o) in with.into_iter().zip(without) {
        let start = w.start.take().expect("a snapshot's replay says its start");
        assert_eq!(start.start, "empty");
        assert_eq!(
            start.start_reason.as_deref(),
            Some(OTHER_STRATEGY_STARTS_EMPTY)
        );
        assert_eq!(w, o, "{}: the recording changed its replay", o.strategy);
    }
}

#[test]
fn a_state_that_cannot_be_restored_starts_empty_with_the_reason() {
    let name = "cs336_bcrafton_memory_snapshot.pickle";
    let trace = load_alloc_trace(&snapshot(name)).unwrap();
    // The state before the first event holds 4,238,344,192 bytes, above 3 GiB.
    let r = &run(&trace, &[Strategy::Caching], 3 * GIB)[0];
    let start = r.start.as_ref().unwrap();
    assert_eq!(start.start, "empty");
    let reason = start.start_reason.as_deref().unwrap();
    assert!(
        reason.contains("cannot be restored") && reason.contains("capacity"),
        "{reason}"
    );
    assert_eq!(
        r.unknown_frees, 222,
        "an empty start counts frees of older blocks"
    );

    // A recording of plain segments is no start for expandable segments.
    let r = &run(&trace, &[Strategy::CachingExpandable], 80 * GIB)[0];
    let start = r.start.as_ref().unwrap();
    assert_eq!(start.start, "empty");
    assert!(
        start
            .start_reason
            .as_deref()
            .unwrap()
            .contains("not expandable"),
        "{start:?}"
    );
}

#[test]
fn a_state_only_snapshot_still_allocates_its_live_blocks_from_nothing() {
    // yiyi_oom records no event that changes the allocator: its trace is its final state.
    let trace = load_alloc_trace(&snapshot("yiyi_oom_snapshot.pickle")).unwrap();
    let r = &run(&trace, &[Strategy::Caching], 80 * GIB)[0];
    let start = r.start.as_ref().unwrap();
    assert_eq!(start.start, "empty");
    assert!(start.start_reason.as_deref().unwrap().contains("no event"));
    assert_eq!(r.allocs, trace.ops.len() as u64);
    assert!(r.segments_match.as_ref().unwrap().matches);
}

#[test]
fn a_snapshot_with_only_frees_replays_them_from_the_recorded_state() {
    // sketchkv2 and yiyi_1.3b record one free_completed and no alloc: the replay restores the
    // state before it (the freed block still live) and replays the free, instead of
    // allocating the final live blocks from nothing.
    for name in ["sketchkv2_my_snapshot.pickle", "yiyi_1.3b_snapshot.pickle"] {
        let trace = load_alloc_trace(&snapshot(name)).unwrap();
        let r = &run(&trace, &[Strategy::Caching], 80 * GIB)[0];
        assert_eq!(r.start.as_ref().unwrap().start, "recorded", "{name}");
        assert_eq!((r.allocs, r.frees, r.ops), (0, 1, 1), "{name}");
        // A replay of a trace that frees only ends with what it started with, less the block.
        assert_eq!(r.bytes_reserved_end, recorded_total(&trace), "{name}");
    }
}
