//! What replaying a recording needs of the allocator: pending frees, private pools, recorded
//! addresses and segment events, a restored state, and the settings beyond the defaults.

use super::*;
use crate::alloc::strategy::{AllocConfig, AllocRequest};
use crate::books::Books;
use crate::executor::Ledger;

const GB: u64 = 1024 * MIB;

struct T {
    a: Caching,
    mem: Ledger,
    next_id: u64,
}

impl T {
    fn with(capacity_bytes: u64, settings: CachingSettings) -> T {
        let config = AllocConfig {
            capacity_bytes,
            ..AllocConfig::default()
        };
        let mut a = Caching::with_settings(&config, settings);
        a.record_segment_events(true);
        T {
            a,
            mem: Ledger::new(Books::new(capacity_bytes)),
            next_id: 0,
        }
    }

    fn new(capacity_bytes: u64) -> T {
        T::with(capacity_bytes, CachingSettings::default())
    }

    fn request(&mut self, bytes: u64, stream: u32) -> AllocRequest {
        let id = AllocId(self.next_id);
        self.next_id += 1;
        AllocRequest {
            id,
            bytes,
            stream,
            pinned: false,
        }
    }

    fn alloc_in(
        &mut self,
        bytes: u64,
        stream: u32,
        pool: PoolId,
    ) -> Result<(AllocId, u64), AllocError> {
        let req = self.request(bytes, stream);
        let at = self.a.alloc_in(req, pool, &mut self.mem);
        self.check();
        at.map(|at| (req.id, self.address(at)))
    }

    fn alloc(&mut self, bytes: u64) -> (AllocId, u64) {
        self.alloc_in(bytes, 0, DEFAULT_POOL).expect("fits")
    }

    fn address(&self, at: Loc) -> u64 {
        self.a.seg(at.segment.index).address + at.offset
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
    }

    fn events(&mut self) -> Vec<(SegmentEventKind, u64, u64)> {
        self.a
            .take_segment_events()
            .into_iter()
            .map(|e| (e.kind, e.address, e.bytes))
            .collect()
    }
}

use SegmentEventKind::{Alloc as SegAlloc, Free as SegFree, Map, Unmap};

const BASE: u64 = SYNTHETIC_ADDRESS_BASE;

#[test]
fn a_pending_free_is_not_reused_until_it_completes() {
    let mut t = T::new(GB);
    let (a, at_a) = t.alloc(5 * MIB);
    t.a.free_requested(a);
    assert!(t.a.holds(a));
    let (_, at_b) = t.alloc(5 * MIB);
    assert_eq!(at_b, at_a + 5 * MIB, "the pending block is skipped");
    t.free(a);
    assert!(!t.a.holds(a));
    let (_, at_c) = t.alloc(5 * MIB);
    assert_eq!(at_c, at_a, "once completed, the block serves again");
}

#[test]
fn empty_cache_completes_pending_frees_before_releasing() {
    let mut t = T::new(GB);
    let (a, at) = t.alloc(30 * MIB);
    t.a.free_requested(a);
    t.events();
    t.empty_cache();
    assert!(!t.a.holds(a));
    assert_eq!(t.events(), vec![(SegFree, at, 30 * MIB)]);
    assert_eq!(t.mem.books.reserved_bytes(), 0);
}

#[test]
fn a_private_pool_keeps_its_blocks_until_it_is_freeable() {
    let mut t = T::new(GB);
    let (g, _) = t.alloc_in(30 * MIB, 0, 1).unwrap();
    t.free(g);
    // The default pool never takes the private pool's cached block.
    let (d, at_d) = t.alloc(30 * MIB);
    assert_eq!(at_d, BASE + 30 * MIB);
    t.free(d);
    t.events();
    t.empty_cache();
    assert_eq!(
        t.events(),
        vec![(SegFree, at_d, 30 * MIB)],
        "only the default pool"
    );
    t.a.mark_pool_freeable(1);
    t.empty_cache();
    assert_eq!(t.events(), vec![(SegFree, BASE, 30 * MIB)]);
    assert_eq!(t.a.segments.len(), 0);
}

#[test]
fn a_private_pool_request_never_releases_the_cache() {
    let mut t = T::new(60 * MIB);
    let (a, _) = t.alloc(40 * MIB);
    t.free(a);
    // No room for 40 MiB more, and the default pool's cached segment is not the graph's to free.
    let err = t.alloc_in(40 * MIB, 0, 1).unwrap_err();
    assert_eq!(
        err,
        AllocError::OutOfMemory {
            rounded_bytes: 40 * MIB
        }
    );
    assert_eq!(t.a.stats().segments, 1);
    // A default-pool request on another stream does release it.
    assert!(t.alloc_in(40 * MIB, 1, DEFAULT_POOL).is_ok());
    assert_eq!(t.a.stats().num_alloc_retries, 1);
}

#[test]
fn new_segments_take_the_recorded_addresses_and_best_fit_follows_them() {
    let mut t = T::new(GB);
    let hint = |address, bytes| AddressHint {
        kind: SegAlloc,
        address,
        bytes,
        stream: 0,
        pool: DEFAULT_POOL,
    };
    t.a.set_address_hints(vec![hint(0x7f00_0000_0000, 30 * MIB)]);
    let (a, at_a) = t.alloc(30 * MIB);
    assert_eq!(at_a, 0x7f00_0000_0000);
    // A hint of another size does not fit: the segment gets a synthetic address.
    t.a.set_address_hints(vec![hint(0x1000_0000, 20 * MIB)]);
    let (b, at_b) = t.alloc(30 * MIB);
    assert!(at_b >= BASE);
    // A lower recorded address wins the tie between equal free blocks.
    t.a.set_address_hints(vec![hint(0x7e00_0000_0000, 30 * MIB)]);
    let (c, at_c) = t.alloc(30 * MIB);
    assert_eq!(at_c, 0x7e00_0000_0000);
    for id in [a, b, c] {
        t.free(id);
    }
    assert_eq!(t.alloc(30 * MIB).1, 0x7e00_0000_0000);
    assert_eq!(t.alloc(30 * MIB).1, 0x7f00_0000_0000);
    assert_eq!(t.alloc(30 * MIB).1, at_b);
    // A hint that would overlap a segment held is ignored.
    t.a.set_address_hints(vec![hint(0x7f00_0000_0000 + MIB, 30 * MIB)]);
    let (_, at_e) = t.alloc(30 * MIB);
    assert!(at_e > at_b, "{at_e:#x}");
    assert_eq!(
        t.events(),
        vec![
            (SegAlloc, 0x7f00_0000_0000, 30 * MIB),
            (SegAlloc, at_b, 30 * MIB),
            (SegAlloc, 0x7e00_0000_0000, 30 * MIB),
            (SegAlloc, at_e, 30 * MIB),
        ]
    );
}

#[test]
fn expandable_ranges_take_the_recorded_address_and_trace_maps_and_unmaps() {
    let settings = CachingSettings {
        expandable_segments: true,
        ..CachingSettings::default()
    };
    let mut t = T::with(GB, settings);
    let base = 0x7f00_0000_0000;
    t.a.set_address_hints(vec![AddressHint {
        kind: Map,
        address: base,
        bytes: 40 * MIB,
        stream: 0,
        pool: DEFAULT_POOL,
    }]);
    let (a, at_a) = t.alloc(30 * MIB);
    let (b, at_b) = t.alloc(30 * MIB);
    assert_eq!((at_a, at_b), (base, base + 30 * MIB));
    t.free(a);
    t.empty_cache();
    assert_eq!(
        t.events(),
        vec![
            (Map, base, 40 * MIB),
            (Map, base + 40 * MIB, 20 * MIB),
            (Unmap, base, 20 * MIB),
        ]
    );
    let layout = t.a.recorded_layout();
    assert_eq!(layout.len(), 1);
    assert_eq!(
        (layout[0].address, layout[0].bytes),
        (base + 20 * MIB, 40 * MIB)
    );
    assert_eq!(layout[0].blocks, vec![(10 * MIB, false), (30 * MIB, true)]);
    t.free(b);
}

#[test]
fn a_restored_state_is_served_from_as_if_it_had_been_built() {
    let mut t = T::new(GB);
    let live = |id, bytes| RestoredBlock::Live {
        bytes,
        id: AllocId(id),
        requested_bytes: bytes - 100,
    };
    let segments = vec![
        RestoredSegment {
            address: 0x7000_0000,
            bytes: 20 * MIB,
            stream: 0,
            pool: DEFAULT_POOL,
            size_pool: SizePool::Large,
            expandable: false,
            blocks: vec![
                live(0, 4 * MIB),
                RestoredBlock::Free { bytes: 6 * MIB },
                live(1, 10 * MIB),
            ],
        },
        RestoredSegment {
            address: 0x6000_0000,
            bytes: 2 * MIB,
            stream: 0,
            pool: DEFAULT_POOL,
            size_pool: SizePool::Small,
            expandable: false,
            blocks: vec![RestoredBlock::Free { bytes: 2 * MIB }],
        },
    ];
    t.a.restore(&segments, &mut t.mem).unwrap();
    t.check();
    t.next_id = 2;
    assert_eq!(t.mem.books.reserved_bytes(), 22 * MIB);
    assert_eq!(t.mem.books.allocated_bytes, 14 * MIB);
    // The 6 MiB hole serves a 5 MiB request (the 1 MiB remainder stays with it, unsplit).
    let (c, at_c) = t.alloc(5 * MIB);
    assert_eq!(at_c, 0x7000_0000 + 4 * MIB);
    t.free(AllocId(0));
    t.free(c);
    let (_, small) = t.alloc(1000);
    assert_eq!(small, 0x6000_0000);
    assert!(t.events().is_empty(), "nothing was reserved");
    let layout = t.a.recorded_layout();
    assert_eq!(layout[1].blocks, vec![(10 * MIB, false), (10 * MIB, true)]);
}

#[test]
fn a_restored_state_that_does_not_tile_is_an_error() {
    let mut t = T::new(GB);
    let bad = RestoredSegment {
        address: 0x7000_0000,
        bytes: 20 * MIB,
        stream: 0,
        pool: DEFAULT_POOL,
        size_pool: SizePool::Large,
        expandable: false,
        blocks: vec![RestoredBlock::Free { bytes: 10 * MIB }],
    };
    let e = t.a.restore(&[bad], &mut t.mem).unwrap_err();
    assert!(e.contains("0x70000000") && e.contains("cover"), "{e}");
}

#[test]
fn max_split_size_keeps_small_requests_off_oversize_blocks() {
    let settings = CachingSettings {
        max_split_bytes: Some(40 * MIB),
        ..CachingSettings::default()
    };
    let mut t = T::with(GB, settings);
    let (a, at_a) = t.alloc(60 * MIB);
    t.free(a);
    // 10 MiB < max_split: the cached 60 MiB block is oversize, a new segment is made.
    let (b, at_b) = t.alloc(10 * MIB);
    assert_ne!(at_b, at_a);
    t.free(b);
    // 50 MiB ≥ max_split may take it: 60 < 50 + 20, and it is not split.
    let (c, at_c) = t.alloc(50 * MIB);
    assert_eq!(at_c, at_a);
    let layout = t.a.recorded_layout();
    assert!(layout.iter().any(|s| s.blocks == vec![(60 * MIB, true)]));
    t.free(c);
    // 35 MiB may not: 60 ≥ 35 + 20.
    let (_, at_d) = t.alloc(35 * MIB);
    assert_ne!(at_d, at_a);
}

#[test]
fn a_refused_reservation_releases_oversize_blocks_before_everything() {
    let settings = CachingSettings {
        max_split_bytes: Some(40 * MIB),
        ..CachingSettings::default()
    };
    let mut t = T::with(200 * MIB, settings);
    let (small, at_small) = t.alloc(30 * MIB);
    let (big, at_big) = t.alloc(100 * MIB);
    t.free(small);
    t.free(big);
    t.events();
    // 80 MiB does not fit beside 130 MiB: the one cached block ≥ max(80, 40) goes, the 30 MiB
    // segment stays cached.
    let (_, at) = t.alloc(80 * MIB);
    assert_eq!(
        t.events(),
        vec![(SegFree, at_big, 100 * MIB), (SegAlloc, at, 80 * MIB)]
    );
    assert!(t.a.recorded_layout().iter().any(|s| s.address == at_small));
    assert_eq!(t.a.stats().num_alloc_retries, 0);
}

#[test]
fn garbage_collection_releases_old_cached_segments_above_the_threshold() {
    let gc = CachingSettings {
        garbage_collection_threshold: 0.5,
        memory_fraction: Some(1.0),
        ..CachingSettings::default()
    };
    let mut t = T::with(100 * MIB, gc);
    let (a, at_a) = t.alloc(30 * MIB);
    let (b, at_b) = t.alloc(30 * MIB);
    t.free(a);
    t.free(b);
    t.events();
    // 60 MiB reserved > 50: a miss (another stream) collects both (same age) first.
    let (_, at) = t.alloc_in(20 * MIB, 1, DEFAULT_POOL).unwrap();
    assert_eq!(
        t.events(),
        vec![
            (SegFree, at_a, 30 * MIB),
            (SegFree, at_b, 30 * MIB),
            (SegAlloc, at, 20 * MIB)
        ]
    );
    // Without a memory fraction the threshold does nothing.
    let mut t = T::with(
        100 * MIB,
        CachingSettings {
            memory_fraction: None,
            ..gc
        },
    );
    let (a, _) = t.alloc(30 * MIB);
    t.free(a);
    t.alloc_in(20 * MIB, 1, DEFAULT_POOL).unwrap();
    assert_eq!(t.a.stats().segments, 2);
}

#[test]
fn the_memory_fraction_refuses_beyond_its_share() {
    let half = CachingSettings {
        memory_fraction: Some(0.5),
        ..CachingSettings::default()
    };
    let mut t = T::with(100 * MIB, half);
    t.alloc(40 * MIB);
    let err = t.alloc_in(20 * MIB, 0, DEFAULT_POOL).unwrap_err();
    assert_eq!(
        err,
        AllocError::OutOfMemory {
            rounded_bytes: 20 * MIB
        }
    );
    assert_eq!(
        t.mem.books.reserved_bytes(),
        40 * MIB,
        "the device was never asked"
    );
}

#[test]
fn power_of_two_divisions_make_larger_blocks() {
    let settings = CachingSettings {
        roundup_power2_divisions: [4; settings::ROUNDUP_INTERVALS],
        ..CachingSettings::default()
    };
    let mut t = T::with(GB, settings);
    t.alloc(5 * MIB + 1);
    assert_eq!(
        t.a.recorded_layout()[0].blocks,
        vec![(6 * MIB, true), (14 * MIB, false)]
    );
}
