//! The device executor on host memory: hand-written decision streams, fault injection, refusals,
//! and real allocation strategies cross-checked against the books-only executor the simulator
//! uses.

use gpumem_core::alloc::{self, AllocConfig, AllocRequest, Strategy, MIB};
use gpumem_core::decision::{AllocId, Decision, Loc, Refusal, SegmentId};
use gpumem_core::digest::Digest;
use gpumem_core::executor::{Executor, Ledger};
use gpumem_core::place::{DeviceId, Tier};
use gpumem_gpu::{Check, Device, DeviceError, DeviceExecutor, HostDevice, Inject};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What the simulator does: books and digest, nothing else.
struct BooksOnly;

impl BooksOnly {
    #[allow(clippy::new_ret_no_self)]
    fn new(capacity: u64) -> Ledger {
        Ledger::new(gpumem_core::books::Books::new(capacity))
    }
}

fn loc(segment: u32, offset: u64) -> Loc {
    Loc {
        segment: SegmentId::arena(segment),
        offset,
    }
}

const CAPACITY: u64 = 64 * MIB;

/// Virtual range with maps, places (one spanning two maps), moves (one overlapping its
/// source), frees and unmaps; a physical segment reserved, used and released; one block left
/// live for the final checkpoint.
fn stream() -> Vec<Decision> {
    let s0 = SegmentId::arena(0);
    let s1 = SegmentId::arena(1);
    let a = 3_000_001;
    let b = 4099;
    let c = MIB + 5;
    let d = 1234;
    vec![
        Decision::ReserveVa {
            segment: s0,
            bytes: 32 * MIB,
        },
        Decision::Map {
            segment: s0,
            offset: 0,
            bytes: 2 * MIB,
        },
        Decision::Map {
            segment: s0,
            offset: 2 * MIB,
            bytes: 2 * MIB,
        },
        Decision::Place {
            id: AllocId(0),
            at: loc(0, 0),
            bytes: a,
        },
        Decision::Place {
            id: AllocId(1),
            at: loc(0, 3 * MIB + 512),
            bytes: b,
        },
        Decision::Map {
            segment: s0,
            offset: 4 * MIB,
            bytes: 2 * MIB,
        },
        Decision::Move {
            id: AllocId(1),
            from: loc(0, 3 * MIB + 512),
            to: loc(0, 4 * MIB + 7),
            bytes: b,
        },
        // Overlaps its own source: up by 1000 bytes.
        Decision::Move {
            id: AllocId(0),
            from: loc(0, 0),
            to: loc(0, 1000),
            bytes: a,
        },
        Decision::Reserve {
            segment: s1,
            bytes: c,
        },
        Decision::Place {
            id: AllocId(2),
            at: loc(1, 0),
            bytes: c,
        },
        Decision::Free {
            id: AllocId(2),
            at: loc(1, 0),
            bytes: c,
        },
        Decision::Release { segment: s1 },
        Decision::Free {
            id: AllocId(0),
            at: loc(0, 1000),
            bytes: a,
        },
        Decision::Free {
            id: AllocId(1),
            at: loc(0, 4 * MIB + 7),
            bytes: b,
        },
        Decision::Unmap {
            segment: s0,
            offset: 2 * MIB,
            bytes: 2 * MIB,
        },
        Decision::Unmap {
            segment: s0,
            offset: 0,
            bytes: 2 * MIB,
        },
        Decision::Place {
            id: AllocId(3),
            at: loc(0, 4 * MIB),
            bytes: d,
        },
    ]
}

fn run_stream<D: Device>(device: D) {
    let decisions = stream();
    let mut ex = DeviceExecutor::new(device, CAPACITY, &[], 1);
    let mut sim = BooksOnly::new(CAPACITY);
    for &d in &decisions {
        assert_eq!(ex.apply(d), Ok(()), "{d:?}");
        sim.apply(d).unwrap();
    }
    assert_eq!(ex.digest_hex(), sim.digest.hex());
    assert_eq!(ex.books().reserved_bytes(), sim.books.reserved_bytes());
    let report = ex.finish();

    let mut digest = Digest::new();
    for d in &decisions {
        digest.decision(d, Ok(()));
    }
    assert_eq!(report.digest, digest.hex());
    assert_eq!(report.mismatches, 0, "{:?}", report.first_mismatches);
    assert!(report.first_mismatches.is_empty());
    assert_eq!(report.decisions, decisions.len() as u64);
    let (a, b, c, d) = (3_000_001, 4099, MIB + 5, 1234);
    assert_eq!(report.bytes_written, a + b + c + d);
    assert_eq!(report.bytes_copied, a + b);
    // Moves check both ends; frees check a, b and c; the final checkpoint checks d.
    assert_eq!(report.bytes_verified, 2 * (a + b) + (a + b + c) + d);
    assert_eq!(report.verifications, 4 + 3 + 1);
    assert_eq!(report.reserved_bytes_peak, 6 * MIB + c);
    assert_eq!(report.checkpoints, 1);
    assert_eq!(report.device_refusals + report.capacity_refusals, 0);
    let counts: Vec<u64> = report.timings.iter().map(|t| t.count).collect();
    let mut want = [0u64; Decision::KIND_NAMES.len()];
    for d in &decisions {
        want[d.kind_index()] += 1;
    }
    assert_eq!(counts, want);
    assert_eq!(report.timings[6].kind, "place");
    assert!(report.timings[6].measured_ns_total > 0);
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"bytes_verified\""));
}

#[test]
fn hand_written_stream_checks_clean_and_digests_like_the_books() {
    run_stream(HostDevice::new());
}

#[test]
fn boxed_devices_work_too() {
    run_stream(Box::new(HostDevice::new()) as Box<dyn Device>);
}

/// Where a GPU is present, the same stream on CUDA memory (skipped, loudly, elsewhere).
#[test]
fn cuda_device_runs_the_same_stream_where_present() {
    match gpumem_gpu::CudaDevice::open(0) {
        Ok(device) => run_stream(device),
        Err(e) => eprintln!("skipped: no CUDA device here: {e}"),
    }
}

fn place_many(ex: &mut DeviceExecutor<HostDevice>, blocks: u64, bytes: u64) {
    ex.apply(Decision::Reserve {
        segment: SegmentId::arena(0),
        bytes: blocks * bytes,
    })
    .unwrap();
    for i in 0..blocks {
        let d = Decision::Place {
            id: AllocId(i),
            at: loc(0, i * bytes),
            bytes,
        };
        ex.apply(d).unwrap();
    }
}

#[test]
fn injected_corruption_is_found_where_the_block_is_checked() {
    let faults = [Inject::parse("corrupt-block:2").unwrap()];
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &faults, 5);
    place_many(&mut ex, 3, 4096);
    assert_eq!(ex.checkpoint(), 1, "exactly the one flipped byte");
    for i in 0..3 {
        let at = loc(0, i * 4096);
        ex.apply(Decision::Free {
            id: AllocId(i),
            at,
            bytes: 4096,
        })
        .unwrap();
    }
    let report = ex.finish();
    assert_eq!(report.injected_corruptions, 1);
    assert_eq!(report.injections, vec!["corrupt-block:2".to_string()]);
    assert_eq!(report.mismatches, 2, "at the checkpoint and at the free");
    assert_eq!(report.mismatched_verifications, 2);
    let first = &report.first_mismatches;
    assert_eq!((first[0].id, first[0].check.as_str()), (1, "checkpoint"));
    assert_eq!((first[1].id, first[1].check.as_str()), (1, "free"));
    assert_eq!(first[0].first_mismatch, first[1].first_mismatch);
    assert!(first[0].first_mismatch.unwrap() < 4096);
}

#[test]
fn seeded_corruption_hits_one_of_the_first_64_blocks() {
    for seed in 0..4 {
        let faults = [Inject::parse("corrupt-block").unwrap()];
        let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &faults, seed);
        place_many(&mut ex, 64, 512);
        let report = ex.finish();
        assert_eq!(report.injected_corruptions, 1);
        assert_eq!(report.mismatches, 1, "seed {seed}");
        let n: u64 = report.injections[0]["corrupt-block:".len()..]
            .parse()
            .unwrap();
        assert_eq!(report.first_mismatches[0].id, n - 1);
    }
}

#[test]
fn injected_refusal_is_reported_to_the_policy_and_changes_the_digest() {
    let faults = [Inject::RefuseAlloc { nth: Some(2) }];
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &faults, 0);
    let mut clean = BooksOnly::new(CAPACITY);
    let reserve = |s: u32| Decision::Reserve {
        segment: SegmentId::arena(s),
        bytes: MIB,
    };
    assert_eq!(ex.apply(reserve(0)), Ok(()));
    assert_eq!(ex.apply(reserve(1)), Err(Refusal::Injected));
    assert_eq!(ex.apply(reserve(2)), Ok(()));
    for s in 0..3 {
        clean.apply(reserve(s)).unwrap();
    }
    assert_ne!(ex.digest_hex(), clean.digest.hex());
    // The refused reservation left no trace in the books or on the device.
    assert_eq!(ex.books().segment_count(), 2);
    assert_eq!(ex.books().reserved_bytes(), 2 * MIB);
    assert_eq!(ex.device().region_count(), 2);
    let mut digest = Digest::new();
    digest.decision(&reserve(0), Ok(()));
    digest.decision(&reserve(1), Err(Refusal::Injected));
    digest.decision(&reserve(2), Ok(()));
    let report = ex.finish();
    assert_eq!(report.digest, digest.hex());
    assert_eq!(report.injected_refusals, 1);
    assert_eq!(report.device_refusals, 0);
}

#[test]
fn a_refused_map_is_counted_among_reserves() {
    let faults = [Inject::RefuseAlloc { nth: Some(2) }];
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &faults, 0);
    let s = SegmentId::arena(0);
    ex.apply(Decision::ReserveVa {
        segment: s,
        bytes: 8 * MIB,
    })
    .unwrap();
    ex.apply(Decision::Map {
        segment: s,
        offset: 0,
        bytes: 2 * MIB,
    })
    .unwrap();
    let map = Decision::Map {
        segment: s,
        offset: 2 * MIB,
        bytes: 2 * MIB,
    };
    assert_eq!(ex.apply(map), Err(Refusal::Injected));
    assert_eq!(ex.apply(map), Ok(()), "the policy may ask again");
    assert_eq!(ex.books().reserved_bytes(), 4 * MIB);
}

/// A host device that counts the calls that reach it.
struct Counting {
    inner: HostDevice,
    calls: u64,
}

impl Device for Counting {
    fn name(&self) -> String {
        "counting host".into()
    }
    fn granularity_bytes(&self) -> u64 {
        self.inner.granularity_bytes()
    }
    fn serves(&self, device: DeviceId) -> bool {
        self.inner.serves(device)
    }
    fn resident_includes(&self, tier: Tier) -> bool {
        self.inner.resident_includes(tier)
    }
    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.calls += 1;
        self.inner.reserve(tier, bytes)
    }
    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.release(base)
    }
    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.calls += 1;
        self.inner.reserve_va(tier, bytes)
    }
    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.map(base, offset, bytes)
    }
    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.unmap(base, offset, bytes)
    }
    fn release_va(&mut self, base: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.release_va(base)
    }
    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.fill(base, offset, bytes, seed)
    }
    fn verify(&mut self, b: u64, o: u64, n: u64, seed: u64) -> Result<Check, DeviceError> {
        self.calls += 1;
        self.inner.verify(b, o, n, seed)
    }
    fn copy(&mut self, from: (u64, u64), to: (u64, u64), n: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.copy(from, to, n)
    }
    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError> {
        self.calls += 1;
        self.inner.corrupt(base, offset)
    }
    fn resident_bytes(&mut self) -> Option<u64> {
        None
    }
}

#[test]
fn capacity_refusal_never_reaches_the_device() {
    let device = Counting {
        inner: HostDevice::new(),
        calls: 0,
    };
    let capacity = 4 * MIB;
    let mut ex = DeviceExecutor::new(device, capacity, &[], 0);
    let mut sim = BooksOnly::new(capacity);
    let s = SegmentId::arena(0);
    let stream = [
        Decision::Reserve {
            segment: SegmentId::arena(9),
            bytes: 8 * MIB,
        },
        Decision::ReserveVa {
            segment: s,
            bytes: 64 * MIB,
        },
        Decision::Map {
            segment: s,
            offset: 0,
            bytes: 4 * MIB,
        },
        Decision::Map {
            segment: s,
            offset: 4 * MIB,
            bytes: 2 * MIB,
        },
        Decision::Reserve {
            segment: SegmentId::arena(9),
            bytes: 1,
        },
    ];
    let want = [
        Err(Refusal::Capacity),
        Ok(()),
        Ok(()),
        Err(Refusal::Capacity),
        Err(Refusal::Capacity),
    ];
    let mut calls = Vec::new();
    for (d, want) in stream.into_iter().zip(want) {
        assert_eq!(ex.apply(d), want, "{d:?}");
        assert_eq!(sim.apply(d), want);
        calls.push(ex.device().calls);
    }
    assert_eq!(calls, vec![0, 1, 2, 2, 2]);
    assert_eq!(
        ex.digest_hex(),
        sim.digest.hex(),
        "capacity refusals digest alike"
    );
    let report = ex.finish();
    assert_eq!(report.capacity_refusals, 3);
    assert_eq!(report.device_refusals, 0);
    assert_eq!(report.resident_bytes_peak, None);
}

#[test]
fn a_device_refusal_is_reported_and_changes_the_digest() {
    let mut ex = DeviceExecutor::new(HostDevice::new(), u64::MAX, &[], 0);
    let mut sim = BooksOnly::new(u64::MAX);
    let huge = Decision::Reserve {
        segment: SegmentId::arena(0),
        bytes: 1 << 62,
    };
    assert_eq!(ex.apply(huge), Err(Refusal::Device));
    assert_eq!(sim.apply(huge), Ok(()), "the books had room");
    assert_ne!(ex.digest_hex(), sim.digest.hex());
    assert_eq!(ex.books().reserved_bytes(), 0);
    let report = ex.finish();
    assert_eq!(report.device_refusals, 1);
    assert!(
        report.device_errors[0].contains("mmap"),
        "{:?}",
        report.device_errors
    );
}

#[test]
fn overlapping_placements_are_caught_by_the_patterns() {
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &[], 0);
    ex.apply(Decision::Reserve {
        segment: SegmentId::arena(0),
        bytes: MIB,
    })
    .unwrap();
    ex.apply(Decision::Place {
        id: AllocId(0),
        at: loc(0, 0),
        bytes: 8192,
    })
    .unwrap();
    // A policy bug: the second block overwrites the second half of the first.
    ex.apply(Decision::Place {
        id: AllocId(1),
        at: loc(0, 4096),
        bytes: 8192,
    })
    .unwrap();
    let found = ex.checkpoint();
    assert!(found > 4000, "{found}");
    let report = ex.finish();
    assert_eq!(report.first_mismatches[0].id, 0);
    assert_eq!(report.first_mismatches[0].first_mismatch, Some(4096));
}

#[test]
#[should_panic(expected = "free of AllocId(0)")]
fn a_free_at_the_wrong_place_is_a_policy_bug() {
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &[], 0);
    ex.apply(Decision::Reserve {
        segment: SegmentId::arena(0),
        bytes: MIB,
    })
    .unwrap();
    ex.apply(Decision::Place {
        id: AllocId(0),
        at: loc(0, 0),
        bytes: 512,
    })
    .unwrap();
    let _ = ex.apply(Decision::Free {
        id: AllocId(0),
        at: loc(0, 512),
        bytes: 512,
    });
}

#[test]
#[should_panic(expected = "policy bug")]
fn unmapping_under_a_live_block_is_a_policy_bug() {
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &[], 0);
    let s = SegmentId::arena(0);
    ex.apply(Decision::ReserveVa {
        segment: s,
        bytes: 8 * MIB,
    })
    .unwrap();
    ex.apply(Decision::Map {
        segment: s,
        offset: 0,
        bytes: 4 * MIB,
    })
    .unwrap();
    let at = loc(0, 2 * MIB - 100);
    ex.apply(Decision::Place {
        id: AllocId(0),
        at,
        bytes: 200,
    })
    .unwrap();
    let _ = ex.apply(Decision::Unmap {
        segment: s,
        offset: 2 * MIB,
        bytes: 2 * MIB,
    });
}

#[test]
#[should_panic(expected = "policy bug")]
fn releasing_under_a_live_block_is_a_policy_bug() {
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &[], 0);
    ex.apply(Decision::Reserve {
        segment: SegmentId::arena(0),
        bytes: MIB,
    })
    .unwrap();
    ex.apply(Decision::Place {
        id: AllocId(0),
        at: loc(0, 0),
        bytes: 0,
    })
    .unwrap();
    let _ = ex.apply(Decision::Release {
        segment: SegmentId::arena(0),
    });
}

/// Random allocations, frees and compactions through a real strategy: once against the device,
/// once against the books alone. Same digest, no wrong byte.
fn replay<M: Executor>(strategy: Strategy, seed: u64, mem: &mut M) {
    let config = AllocConfig {
        capacity_bytes: 96 * MIB,
        alignment_bytes: 512,
        page_bytes: 2 * MIB,
    };
    let mut a = alloc::build(strategy, &config);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut live: Vec<AllocId> = Vec::new();
    for i in 0..600u64 {
        if live.is_empty() || rng.gen_bool(0.55) {
            let bytes = if rng.gen_bool(0.1) {
                rng.gen_range(1..6 * MIB)
            } else {
                rng.gen_range(1..64 * 1024)
            };
            let req = AllocRequest {
                id: AllocId(i),
                bytes,
                stream: 0,
                pinned: rng.gen_bool(0.1),
            };
            if a.alloc(req, mem).is_ok() {
                live.push(req.id);
            }
        } else {
            let id = live.swap_remove(rng.gen_range(0..live.len()));
            a.free(id, mem);
        }
        if i % 97 == 96 {
            a.compact(mem);
        }
        if i % 211 == 210 {
            a.empty_cache(mem);
        }
    }
    a.check_invariants().unwrap();
}

#[test]
fn real_strategies_run_clean_on_host_memory() {
    for strategy in [Strategy::FirstFit, Strategy::BestFit] {
        let mut ex = DeviceExecutor::new(HostDevice::new(), 96 * MIB, &[], 0);
        let mut sim = BooksOnly::new(96 * MIB);
        replay(strategy, 11, &mut ex);
        replay(strategy, 11, &mut sim);
        assert_eq!(ex.digest_hex(), sim.digest.hex(), "{strategy:?}");
        assert_eq!(ex.books().reserved_bytes(), sim.books.reserved_bytes());
        let report = ex.finish();
        assert_eq!(
            report.mismatches, 0,
            "{strategy:?}: {:?}",
            report.first_mismatches
        );
        assert!(
            report.bytes_copied > 0,
            "{strategy:?}: compaction moved something"
        );
        assert!(report.timings[8].count > 0);
    }
}
