//! The real PyTorch memory snapshots of `../shared/traces/torch-snapshots` (licensed data, read
//! in place, never copied). The directory can be moved with `GPUMEM_SHARED_TRACES`; when it is
//! missing these tests FAIL, they do not skip.

use gpumem_traces::{load_alloc_trace, pickle, torch, AllocTrace, OpKind, TraceSource};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

fn shared_traces() -> PathBuf {
    let dir = match std::env::var_os("GPUMEM_SHARED_TRACES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"),
    };
    assert!(
        dir.join("torch-snapshots").is_dir(),
        "the shared traces are missing: {} has no torch-snapshots/ (set GPUMEM_SHARED_TRACES \
         to the directory that holds them)",
        dir.display()
    );
    dir
}

fn snapshot_path(name: &str) -> PathBuf {
    shared_traces().join("torch-snapshots").join(name)
}

const FILES: [&str; 5] = [
    "cs336_magma27_memory_snapshot.pickle",
    "cs336_bcrafton_memory_snapshot.pickle",
    "sketchkv2_my_snapshot.pickle",
    "yiyi_1.3b_snapshot.pickle",
    "yiyi_oom_snapshot.pickle",
];

/// Each file loaded once for all tests of this binary.
fn loaded(name: &str) -> &'static AllocTrace {
    static CACHE: OnceLock<BTreeMap<&'static str, AllocTrace>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        FILES
            .iter()
            .map(|&f| {
                let t = load_alloc_trace(&snapshot_path(f)).unwrap_or_else(|e| panic!("{e}"));
                (f, t)
            })
            .collect()
    });
    &all[name]
}

struct Expect {
    file: &'static str,
    source: TraceSource,
    events: u64,
    ops: usize,
    segments: usize,
    blocks: usize,
    live_blocks: usize,
    small_segments: usize,
    reserved: u64,
    unknown_frees: u64,
}

const EXPECT: [Expect; 5] = [
    Expect {
        file: FILES[0],
        source: TraceSource::TorchTrace,
        events: 5163,
        ops: 2 * 1721,
        segments: 216,
        blocks: 455,
        live_blocks: 229,
        small_segments: 8,
        reserved: 14_180_941_824,
        unknown_frees: 2,
    },
    Expect {
        file: FILES[1],
        source: TraceSource::TorchTrace,
        events: 6486,
        ops: 2 * 2162,
        segments: 96,
        blocks: 550,
        live_blocks: 447,
        small_segments: 29,
        reserved: 4_238_344_192,
        unknown_frees: 222,
    },
    Expect {
        file: FILES[2],
        source: TraceSource::TorchState,
        events: 1,
        ops: 839,
        segments: 259,
        blocks: 868,
        live_blocks: 839,
        small_segments: 16,
        reserved: 17_133_731_840,
        unknown_frees: 0,
    },
    Expect {
        file: FILES[3],
        source: TraceSource::TorchState,
        events: 1,
        ops: 785,
        segments: 257,
        blocks: 948,
        live_blocks: 785,
        small_segments: 3,
        reserved: 7_608_467_456,
        unknown_frees: 0,
    },
    Expect {
        file: FILES[4],
        source: TraceSource::TorchState,
        events: 1,
        ops: 460,
        segments: 176,
        blocks: 463,
        live_blocks: 460,
        small_segments: 2,
        reserved: 11_844_714_496,
        unknown_frees: 0,
    },
];

#[test]
fn all_five_snapshots_load_with_the_expected_shape() {
    for x in &EXPECT {
        let t = loaded(x.file);
        let f = x.file;
        assert_eq!(t.name, f);
        assert_eq!(t.source, x.source, "{f}");
        assert_eq!(t.ops.len(), x.ops, "{f}");
        // Trace replay: every entry is an op, an oom or skipped. State synthesis: the ops come
        // from the segments and every entry is skipped or an oom.
        let replayed = if x.source == TraceSource::TorchTrace {
            t.ops.len() as u64
        } else {
            0
        };
        assert_eq!(
            replayed + t.recorded_ooms + t.skipped_events,
            x.events,
            "{f}"
        );
        assert_eq!(t.recorded_ooms, 0, "{f}");
        let segs = t.recorded_segments.as_ref().expect("segments recorded");
        assert_eq!(segs.len(), x.segments, "{f}");
        assert_eq!(
            segs.iter().map(|s| s.blocks.len()).sum::<usize>(),
            x.blocks,
            "{f}"
        );
        let live = segs.iter().flat_map(|s| &s.blocks).filter(|b| b.1).count();
        assert_eq!(live, x.live_blocks, "{f}");
        assert_eq!(
            segs.iter().filter(|s| s.small_pool).count(),
            x.small_segments,
            "{f}"
        );
        assert_eq!(
            segs.iter().map(|s| s.total_bytes).sum::<u64>(),
            x.reserved,
            "{f}"
        );
        for s in segs {
            assert_eq!(
                s.blocks.iter().map(|b| b.0).sum::<u64>(),
                s.total_bytes,
                "{f}"
            );
            assert!(!s.expandable && s.stream == 0, "{f}");
        }
        assert!(segs.windows(2).all(|w| w[0].address < w[1].address), "{f}");
        let sum = t.summary();
        assert_eq!(sum.unknown_frees, x.unknown_frees, "{f}");
        assert_eq!(sum.duplicate_allocs, 0, "{f}");
        assert_eq!(
            sum.empty_caches, 0,
            "{f}: these recordings hold no segment events"
        );
        assert!(t.ops.windows(2).all(|w| w[0].t_ns <= w[1].t_ns), "{f}");
    }
}

/// Block addresses of the recorded segments (segment address + sizes of the blocks before)
/// → (block size, live).
fn block_map(t: &AllocTrace) -> BTreeMap<u64, (u64, bool)> {
    let mut m = BTreeMap::new();
    for s in t.recorded_segments.as_ref().unwrap() {
        let mut a = s.address;
        for &(size, live) in &s.blocks {
            m.insert(a, (size, live));
            a += size;
        }
    }
    m
}

#[test]
fn trace_replays_end_in_the_recorded_state() {
    // Every allocation still live at the end of the replayed trace is a live block of the final
    // snapshot at that address, at least as large as the request.
    for f in &FILES[..2] {
        let t = loaded(f);
        let blocks = block_map(t);
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        for op in &t.ops {
            match op.kind {
                OpKind::Alloc { id, bytes, .. } => {
                    live.insert(id, bytes);
                }
                OpKind::Free { id } => {
                    live.remove(&id);
                }
                OpKind::EmptyCache => {}
            }
        }
        assert!(!live.is_empty(), "{f}");
        for (addr, bytes) in live {
            let (size, is_live) = blocks[&addr];
            assert!(is_live && size >= bytes, "{f}: {addr:#x}");
        }
    }
}

#[test]
fn state_snapshots_synthesise_one_alloc_per_live_block() {
    for f in &FILES[2..] {
        let t = loaded(f);
        let blocks = block_map(t);
        let mut last = 0;
        for op in &t.ops {
            let OpKind::Alloc {
                id,
                bytes,
                stream,
                pinned,
            } = op.kind
            else {
                panic!("{f}: only allocs expected")
            };
            assert!(id > last, "{f}: address order");
            last = id;
            let (size, live) = blocks[&id];
            assert!(live && bytes <= size && bytes > 0, "{f}: {id:#x}");
            assert_eq!((stream, pinned, op.t_ns), (0, false, 0));
        }
    }
}

#[test]
fn magma27_trace_details() {
    let t = loaded(FILES[0]);
    // Alloc of the first entry; time is relative to the first entry.
    assert_eq!(t.ops[0].line, 1);
    assert_eq!(t.ops[0].t_ns, 0);
    assert_eq!(
        t.ops[0].kind,
        OpKind::Alloc {
            id: 47_294_971_904,
            bytes: 25_165_824,
            stream: 0,
            pinned: false
        }
    );
    // free_requested entries are skipped; the recording spans ~248 ms.
    assert_eq!(t.skipped_events, 1721);
    let span = t.ops.last().unwrap().t_ns;
    assert!((240_000_000..260_000_000).contains(&span), "{span}");
    let s = t.summary();
    assert_eq!(s.max_alloc_bytes, 327_680_000);
}

#[test]
fn truncated_real_snapshot_is_an_error_not_a_panic() {
    let data = std::fs::read(snapshot_path(FILES[0])).unwrap();
    let n = data.len();
    for k in 0..24 {
        let cut = n * k / 24 + k * 7919 % 1000;
        let cut = cut.min(n - 1);
        let e = pickle::parse(&data[..cut]).unwrap_err();
        assert!(e.reason.contains("truncated at byte"), "cut {cut}: {e}");
    }
    let path = snapshot_path(FILES[0]);
    let e = torch::parse_bytes(&path, &data[..n / 2]).unwrap_err();
    assert!(
        e.to_string()
            .contains("cs336_magma27_memory_snapshot.pickle: byte "),
        "{e}"
    );
}
