use super::*;
use crate::alloc::strategy::{AllocConfig, AllocRequest};
use crate::alloc::units::KIB;
use crate::alloc::{Allocator, AllocatorState};
use crate::books::Books;
use crate::decision::Refusal;
use crate::digest::Digest;
use crate::executor::Executor;

/// Books that remember every decision and whether it was carried out.
struct Rec {
    books: Books,
    digest: Digest,
    log: Vec<(Decision, bool)>,
}

impl Executor for Rec {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let outcome = self.books.apply(d);
        self.digest.decision(&d, outcome);
        self.log.push((d, outcome.is_ok()));
        outcome
    }
    fn books(&self) -> &Books {
        &self.books
    }
    fn digest(&self) -> &Digest {
        &self.digest
    }
}

struct T {
    a: Caching,
    mem: Rec,
    next_id: u64,
}

impl T {
    fn new(capacity_bytes: u64, expandable: bool) -> T {
        let config = AllocConfig {
            capacity_bytes,
            ..AllocConfig::default()
        };
        T {
            a: Caching::new(&config, expandable),
            mem: Rec {
                books: Books::new(capacity_bytes),
                digest: Digest::new(),
                log: Vec::new(),
            },
            next_id: 0,
        }
    }

    fn alloc_on(&mut self, bytes: u64, stream: u32) -> Result<(AllocId, Loc), AllocError> {
        let id = AllocId(self.next_id);
        self.next_id += 1;
        let req = AllocRequest {
            id,
            bytes,
            stream,
            pinned: false,
        };
        let at = self.a.alloc(req, &mut self.mem);
        self.check();
        at.map(|at| (id, at))
    }

    fn alloc(&mut self, bytes: u64) -> (AllocId, Loc) {
        self.alloc_on(bytes, 0).expect("fits")
    }

    fn free(&mut self, id: AllocId) {
        self.a.free(id, &mut self.mem);
        self.check();
    }

    fn empty_cache(&mut self) {
        self.a.empty_cache(&mut self.mem);
        self.check();
    }

    fn check(&self) {
        self.a.check_invariants().unwrap();
        assert_eq!(self.a.reserved_bytes(), self.mem.books.reserved_bytes());
        let free = self.a.free_summary().free_bytes();
        assert_eq!(
            self.mem.books.allocated_bytes + free,
            self.mem.books.reserved_bytes()
        );
    }

    /// Decisions since the last call, without `Place`/`Free`.
    fn take_log(&mut self) -> Vec<(Decision, bool)> {
        let log = std::mem::take(&mut self.mem.log);
        log.into_iter()
            .filter(|(d, _)| !matches!(d, Decision::Place { .. } | Decision::Free { .. }))
            .collect()
    }
}

fn loc(segment: u32, offset: u64) -> Loc {
    Loc {
        segment: SegmentId::arena(segment),
        offset,
    }
}

fn blocks(t: &T) -> Vec<Vec<(u64, bool)>> {
    t.a.layout().into_iter().map(|s| s.blocks).collect()
}

const GB: u64 = 1024 * MIB;

#[test]
fn rounding_pools_and_segment_sizes() {
    let a = Caching::new(&AllocConfig::default(), false);
    assert_eq!(a.round_size(0), Some(512));
    assert_eq!(a.round_size(1), Some(512));
    assert_eq!(a.round_size(512), Some(512));
    assert_eq!(a.round_size(513), Some(1024));
    assert_eq!(a.round_size(u64::MAX), None);
    assert_eq!(SizePool::of(MIB), SizePool::Small);
    assert_eq!(SizePool::of(MIB + 512), SizePool::Large);
    assert_eq!(Caching::allocation_size(512), Some(2 * MIB));
    assert_eq!(Caching::allocation_size(MIB), Some(2 * MIB));
    assert_eq!(Caching::allocation_size(MIB + 512), Some(20 * MIB));
    assert_eq!(Caching::allocation_size(10 * MIB - 512), Some(20 * MIB));
    assert_eq!(Caching::allocation_size(10 * MIB), Some(10 * MIB));
    assert_eq!(Caching::allocation_size(10 * MIB + 512), Some(12 * MIB));
    assert_eq!(Caching::allocation_size(u64::MAX - 511), None);
}

#[test]
fn a_10_5_mib_request_takes_a_12_mib_segment_and_leaves_1_5_mib() {
    let mut t = T::new(GB, false);
    let (_, at) = t.alloc(10 * MIB + MIB / 2);
    assert_eq!(at, loc(0, 0));
    let reserve = Decision::Reserve {
        segment: SegmentId::arena(0),
        bytes: 12 * MIB,
    };
    assert_eq!(t.take_log(), vec![(reserve, true)]);
    assert_eq!(
        blocks(&t),
        vec![vec![(10 * MIB + MIB / 2, true), (MIB + MIB / 2, false)]]
    );
    let free = t.a.free_summary();
    assert_eq!(
        free.size_pools[1],
        FreeSpace {
            free_bytes: 3 * MIB / 2,
            largest_free_bytes: 3 * MIB / 2
        }
    );
    assert_eq!(free.size_pools[0], FreeSpace::default());
    assert_eq!(free.inactive_split_bytes, 3 * MIB / 2);
}

#[test]
fn a_1_5_mib_request_takes_a_20_mib_segment_and_leaves_18_5_mib() {
    let mut t = T::new(GB, false);
    t.alloc(MIB + MIB / 2);
    assert_eq!(t.mem.books.reserved_bytes(), 20 * MIB);
    assert_eq!(
        blocks(&t),
        vec![vec![(3 * MIB / 2, true), (37 * MIB / 2, false)]]
    );
    assert_eq!(t.a.free_summary().size_pools[1].free_bytes, 37 * MIB / 2);
}

#[test]
fn a_1_mib_request_is_small_and_takes_a_2_mib_segment() {
    let mut t = T::new(GB, false);
    t.alloc(MIB);
    assert_eq!(t.mem.books.reserved_bytes(), 2 * MIB);
    let free = t.a.free_summary();
    assert_eq!(free.size_pools[0].free_bytes, MIB);
    assert_eq!(free.size_pools[1].free_bytes, 0);
    // The small pool splits any remainder of 512 B or more: 700 KiB stays apart.
    let (_, at) = t.alloc(MIB - 700 * KIB);
    assert_eq!(at, loc(0, MIB));
    assert_eq!(
        blocks(&t),
        vec![vec![(MIB, true), (324 * KIB, true), (700 * KIB, false)]]
    );
}

#[test]
fn a_700_kib_remainder_in_the_large_pool_is_not_split() {
    let mut t = T::new(GB, false);
    t.alloc(3 * MIB / 2);
    let (id, at) = t.alloc(37 * MIB / 2 - 700 * KIB);
    assert_eq!(at, loc(0, 3 * MIB / 2));
    // The whole 18.5 MiB block is handed out.
    assert_eq!(t.mem.books.location(id), Some((at, 37 * MIB / 2)));
    assert_eq!(
        blocks(&t),
        vec![vec![(3 * MIB / 2, true), (37 * MIB / 2, true)]]
    );
    assert_eq!(t.a.free_summary().free_bytes(), 0);
    // Just over 1 MiB of remainder does split.
    let mut t = T::new(GB, false);
    t.alloc(3 * MIB / 2);
    t.alloc(37 * MIB / 2 - MIB - 512);
    assert_eq!(t.a.free_summary().size_pools[1].free_bytes, MIB + 512);
}

#[test]
fn best_fit_takes_the_smallest_block_then_the_lowest_address() {
    let mut t = T::new(GB, false);
    let (a, _) = t.alloc(12 * MIB); // segment 0: 12 MiB, whole
    let (b, _) = t.alloc(16 * MIB); // segment 1: 16 MiB
    let (c, _) = t.alloc(12 * MIB); // segment 2: 12 MiB
    t.free(c);
    t.free(b);
    t.free(a);
    // 11 MiB fits all three; the 12 MiB ones are smaller, segment 0 is lower.
    let (_, at) = t.alloc(11 * MIB);
    assert_eq!(at, loc(0, 0));
    let (_, at) = t.alloc(11 * MIB);
    assert_eq!(at, loc(2, 0));
    assert_eq!(t.take_log().len(), 3, "no new segment");
}

#[test]
fn a_freed_block_is_not_reused_by_another_stream() {
    let mut t = T::new(GB, false);
    let (id, at) = t.alloc_on(4096, 0).unwrap();
    assert_eq!(at, loc(0, 0));
    t.free(id);
    let (_, at) = t.alloc_on(4096, 1).unwrap();
    assert_eq!(at, loc(1, 0), "stream 1 gets its own segment");
    let (_, at) = t.alloc_on(4096, 0).unwrap();
    assert_eq!(at, loc(0, 0), "stream 0 reuses its block");
    assert_eq!(t.mem.books.reserved_bytes(), 4 * MIB);
}

#[test]
fn free_coalesces_within_a_segment_and_empty_cache_releases_only_whole_segments() {
    let mut t = T::new(GB, false);
    let (a, _) = t.alloc(2 * MIB);
    let (b, _) = t.alloc(2 * MIB);
    let (c, _) = t.alloc(2 * MIB);
    let (d, at) = t.alloc(16 * MIB);
    assert_eq!(
        at,
        loc(1, 0),
        "16 MiB does not fit the 14 MiB left: a segment of its own"
    );
    t.free(b);
    t.free(a);
    assert_eq!(
        blocks(&t)[0],
        vec![(4 * MIB, false), (2 * MIB, true), (14 * MIB, false)]
    );
    assert_eq!(t.a.free_summary().inactive_split_bytes, 18 * MIB);
    t.free(d);
    t.take_log();
    t.empty_cache();
    let release = Decision::Release {
        segment: SegmentId::arena(1),
    };
    assert_eq!(
        t.take_log(),
        vec![(release, true)],
        "segment 0 still holds c"
    );
    t.free(c);
    assert_eq!(blocks(&t), vec![vec![(20 * MIB, false)]]);
    assert_eq!(t.a.free_summary().inactive_split_bytes, 0);
    t.empty_cache();
    assert_eq!(t.mem.books.reserved_bytes(), 0);
    assert_eq!(t.a.stats().segments, 0);
    assert_eq!(t.a.stats().num_device_free, 2);
}

#[test]
fn out_of_memory_releases_the_cache_and_retries_once() {
    let mut t = T::new(40 * MIB, false);
    let (a, _) = t.alloc_on(3 * MIB / 2, 0).unwrap();
    let _ = t.alloc_on(3 * MIB / 2, 1).unwrap();
    t.free(a);
    t.take_log();
    // Stream 2 cannot use either cached block and there is no room for a third segment.
    let (_, at) = t.alloc_on(3 * MIB / 2, 2).unwrap();
    let reserve = |segment, bytes| Decision::Reserve {
        segment: SegmentId::arena(segment),
        bytes,
    };
    let release = Decision::Release {
        segment: SegmentId::arena(0),
    };
    let expected = vec![
        (reserve(2, 20 * MIB), false),
        (release, true),
        (reserve(3, 20 * MIB), true),
    ];
    assert_eq!(t.take_log(), expected);
    assert_eq!(at, loc(3, 0));
    let stats = t.a.stats();
    assert_eq!(
        (stats.num_alloc_retries, stats.num_ooms, stats.segments),
        (1, 0, 2)
    );
}

#[test]
fn out_of_memory_after_the_retry_is_an_error() {
    let mut t = T::new(40 * MIB, false);
    t.alloc_on(3 * MIB / 2, 0).unwrap();
    t.alloc_on(3 * MIB / 2, 1).unwrap();
    t.take_log();
    // Both segments hold a live block: nothing to release.
    let err = t.alloc_on(3 * MIB / 2, 2).unwrap_err();
    assert_eq!(
        err,
        AllocError::OutOfMemory {
            rounded_bytes: 3 * MIB / 2
        }
    );
    let refused = |segment| {
        let d = Decision::Reserve {
            segment: SegmentId::arena(segment),
            bytes: 20 * MIB,
        };
        (d, false)
    };
    assert_eq!(t.take_log(), vec![refused(2), refused(3)]);
    let stats = t.a.stats();
    assert_eq!((stats.num_alloc_retries, stats.num_ooms), (1, 1));
}

#[test]
fn huge_requests_are_refused_not_a_panic() {
    for expandable in [false, true] {
        let mut t = T::new(GB, expandable);
        assert!(t.alloc_on(u64::MAX, 0).is_err());
        assert!(t.alloc_on(u64::MAX - 511, 0).is_err());
        assert!(t.take_log().is_empty(), "rounding overflows: nothing asked");
        assert!(t.alloc_on(1 << 62, 0).is_err());
        assert!(t.alloc_on(2 * GB, 0).is_err());
        assert_eq!(t.mem.books.reserved_bytes(), 0);
        assert_eq!(t.a.stats().num_ooms, 4);
    }
}

#[test]
fn expandable_ranges_are_one_and_one_eighth_of_the_capacity_in_whole_pages() {
    let a = Caching::new(
        &AllocConfig {
            capacity_bytes: 512 * MIB,
            ..AllocConfig::default()
        },
        true,
    );
    assert_eq!(a.va_range_bytes(SizePool::Small), 576 * MIB);
    assert_eq!(a.va_range_bytes(SizePool::Large), 580 * MIB);
}

#[test]
fn expandable_allocations_of_one_stream_grow_one_range_contiguously() {
    let mut t = T::new(512 * MIB, true);
    let (a, at) = t.alloc(30 * MIB);
    assert_eq!(at, loc(0, 0));
    let (b, at) = t.alloc(25 * MIB);
    assert_eq!(
        at,
        loc(0, 30 * MIB),
        "right after the first, in the same range"
    );
    let s = SegmentId::arena(0);
    let expected = vec![
        (
            Decision::ReserveVa {
                segment: s,
                bytes: 580 * MIB,
            },
            true,
        ),
        (
            Decision::Map {
                segment: s,
                offset: 0,
                bytes: 40 * MIB,
            },
            true,
        ),
        (
            Decision::Map {
                segment: s,
                offset: 40 * MIB,
                bytes: 20 * MIB,
            },
            true,
        ),
    ];
    assert_eq!(t.take_log(), expected);
    assert_eq!(
        blocks(&t),
        vec![vec![(30 * MIB, true), (25 * MIB, true), (5 * MIB, false)]]
    );
    // A small request goes to the small pool's own range, with 2 MiB pages.
    let (_, at) = t.alloc(4096);
    assert_eq!(at, loc(1, 0));
    let small = SegmentId::arena(1);
    let expected = vec![
        (
            Decision::ReserveVa {
                segment: small,
                bytes: 576 * MIB,
            },
            true,
        ),
        (
            Decision::Map {
                segment: small,
                offset: 0,
                bytes: 2 * MIB,
            },
            true,
        ),
    ];
    assert_eq!(t.take_log(), expected);

    // empty_cache unmaps exactly the whole free pages: [0, 20) of the freed [0, 30) block;
    // [20, 30) and the tail [55, 60) hold no whole page.
    t.free(a);
    t.take_log();
    t.empty_cache();
    let unmap = Decision::Unmap {
        segment: s,
        offset: 0,
        bytes: 20 * MIB,
    };
    assert_eq!(t.take_log(), vec![(unmap, true)]);
    assert_eq!(t.mem.books.reserved_bytes(), 40 * MIB + 2 * MIB);
    let layout = t.a.layout();
    assert_eq!(layout[0].bytes, 40 * MIB, "the mapped range [20, 60) MiB");
    assert_eq!(
        layout[0].blocks,
        vec![(10 * MIB, false), (25 * MIB, true), (5 * MIB, false)]
    );

    // Once all is free, the whole range is unmapped and its address space released.
    t.free(b);
    t.empty_cache();
    let unmap = Decision::Unmap {
        segment: s,
        offset: 20 * MIB,
        bytes: 40 * MIB,
    };
    let release = Decision::ReleaseVa { segment: s };
    // The small range's free tail [4 KiB, 2 MiB) holds no whole page: it stays.
    assert_eq!(t.take_log(), vec![(unmap, true), (release, true)]);
    assert_eq!(t.mem.books.reserved_bytes(), 2 * MIB);
    assert_eq!(t.a.stats().va_ranges, 1);
}

#[test]
fn expandable_refills_the_lowest_hole_left_by_an_unmap() {
    let mut t = T::new(512 * MIB, true);
    let (a, _) = t.alloc(40 * MIB);
    let (_b, at) = t.alloc(20 * MIB);
    assert_eq!(at, loc(0, 40 * MIB));
    t.free(a);
    t.empty_cache();
    t.take_log();
    // The hole [0, 40) is unmapped; the lowest run that fits 30 MiB starts there.
    let (_, at) = t.alloc(30 * MIB);
    assert_eq!(at, loc(0, 0));
    let map = Decision::Map {
        segment: SegmentId::arena(0),
        offset: 0,
        bytes: 40 * MIB,
    };
    assert_eq!(t.take_log(), vec![(map, true)]);
    assert_eq!(
        blocks(&t)[0],
        vec![(30 * MIB, true), (10 * MIB, false), (20 * MIB, true)]
    );
}

#[test]
fn expandable_best_fit_leaves_the_growable_tail_last() {
    let mut t = T::new(512 * MIB, true);
    let (a, _) = t.alloc(12 * MIB); // [0, 12)
    t.alloc(2 * MIB); // [12, 14); tail [14, 20) free, then unmapped
    t.free(a);
    // Free blocks: tail 6 MiB (expandable to 566 MiB) and hole 12 MiB: the hole wins.
    let (_, at) = t.alloc(5 * MIB);
    assert_eq!(at, loc(0, 0));
    // In a fixed segment the smaller tail wins.
    let mut t = T::new(512 * MIB, false);
    let (a, _) = t.alloc(16 * MIB); // segment 0, whole
    let (_, at) = t.alloc(5 * MIB); // segment 1: tail [5, 20) of 15 MiB
    assert_eq!(at, loc(1, 0));
    t.free(a);
    let (_, at) = t.alloc(5 * MIB);
    assert_eq!(at, loc(1, 5 * MIB));
}

#[test]
fn expandable_out_of_memory_unmaps_the_cache_and_retries() {
    // Capacity 60 MiB: ranges of ⌈67.5 / 20⌉ = 4 large pages.
    let mut t = T::new(60 * MIB, true);
    let (a, _) = t.alloc_on(40 * MIB, 0).unwrap();
    t.alloc_on(20 * MIB, 1).unwrap();
    t.free(a);
    t.take_log();
    let (_, at) = t.alloc_on(20 * MIB, 1).unwrap();
    assert_eq!(at, loc(1, 20 * MIB));
    let map = Decision::Map {
        segment: SegmentId::arena(1),
        offset: 20 * MIB,
        bytes: 20 * MIB,
    };
    let expected = vec![
        (map, false),
        (
            Decision::Unmap {
                segment: SegmentId::arena(0),
                offset: 0,
                bytes: 40 * MIB,
            },
            true,
        ),
        (
            Decision::ReleaseVa {
                segment: SegmentId::arena(0),
            },
            true,
        ),
        (map, true),
    ];
    assert_eq!(t.take_log(), expected);
    assert_eq!(t.a.stats().num_alloc_retries, 1);
}

#[test]
fn compact_slides_live_blocks_down_inside_each_segment() {
    let mut t = T::new(GB, false);
    // One 20 MiB segment: four 4 MiB blocks and a 4 MiB tail; free the first and the third.
    let ids: Vec<AllocId> = (0..4).map(|_| t.alloc(4 * MIB).0).collect();
    t.free(ids[0]);
    t.free(ids[2]);
    assert_eq!(t.a.free_summary().size_pools[1].largest_free_bytes, 4 * MIB);
    t.take_log();
    let c = t.a.compact(&mut t.mem).unwrap();
    t.check();
    assert_eq!((c.moves, c.bytes_moved), (2, 8 * MIB));
    assert_eq!(
        (c.largest_free_bytes_before, c.largest_free_bytes_after),
        (4 * MIB, 12 * MIB)
    );
    assert_eq!(
        blocks(&t),
        vec![vec![(4 * MIB, true), (4 * MIB, true), (12 * MIB, false)]]
    );
    assert_eq!(t.mem.books.location(ids[1]), Some((loc(0, 0), 4 * MIB)));
    assert_eq!(
        t.mem.books.location(ids[3]),
        Some((loc(0, 4 * MIB), 4 * MIB))
    );
}

#[test]
fn compact_in_an_expandable_range_stays_inside_each_mapped_range() {
    let mut t = T::new(512 * MIB, true);
    let (a, _) = t.alloc(20 * MIB); // page 0
    let (b, _) = t.alloc(10 * MIB); // page 1, first half
    let (c, _) = t.alloc(50 * MIB); // [30, 80): pages 1..4
    t.free(a);
    t.free(b);
    t.empty_cache(); // unmaps page 0; [20, 30) stays mapped and free
    assert_eq!(blocks(&t), vec![vec![(10 * MIB, false), (50 * MIB, true)]]);
    let moved = t.a.compact(&mut t.mem).unwrap();
    t.check();
    assert_eq!(moved.moves, 1);
    assert_eq!(t.mem.books.location(c), Some((loc(0, 20 * MIB), 50 * MIB)));
    assert_eq!(blocks(&t), vec![vec![(50 * MIB, true), (10 * MIB, false)]]);
}

#[test]
fn a_snapshot_round_trips_through_json() {
    let mut t = T::new(512 * MIB, true);
    let (a, _) = t.alloc(3 * MIB);
    t.alloc_on(100, 1).unwrap();
    t.free(a);
    let json = serde_json::to_string(&t.a.snapshot()).unwrap();
    let back: AllocatorState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, AllocatorState::Caching(Box::new(t.a.clone())));
}
