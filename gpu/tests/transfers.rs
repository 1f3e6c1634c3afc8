//! The device executor's transfers between tiers, on host memory: both ends verified, wrong
//! bytes refused and never trusted later, contents re-checked at checkpoints and forgotten on
//! release; per-place capacities and devices the executor does not drive refused cleanly. And
//! the tier cache of `gpumem_core::tiers` carried out for real, against the books alone.

use std::cell::RefCell;
use std::rc::Rc;

use gpumem_core::books::Books;
use gpumem_core::decision::{Decision, Loc, Refusal, SegmentId};
use gpumem_core::executor::{Executor, Ledger};
use gpumem_core::place::{DeviceId, Owner, Place, Tier};
use gpumem_core::tiers::{TierCache, TierConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use gpumem_gpu::{Check, Device, DeviceError, DeviceExecutor, HostDevice, Inject};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * KIB;

const PINNED: Place = Place::new(0, Tier::PinnedHost);
const PAGEABLE: Place = Place::new(0, Tier::PageableHost);

fn gpu_seg() -> SegmentId {
    SegmentId::new(Place::GPU0, Owner::Scratch, 0)
}

fn host_seg() -> SegmentId {
    SegmentId::new(PINNED, Owner::Scratch, 0)
}

fn at(segment: SegmentId, offset: u64) -> Loc {
    Loc { segment, offset }
}

fn books() -> Books {
    Books::with_places(&[(Place::GPU0, 4 * MIB), (PINNED, 4 * MIB)])
}

/// Host memory shared with the test, which can then corrupt bytes behind the executor's back;
/// it drives device 0 only, like one GPU, and records where each reservation landed.
#[derive(Clone)]
struct Tap {
    host: Rc<RefCell<HostDevice>>,
    bases: Rc<RefCell<Vec<(Tier, u64)>>>,
    calls: Rc<RefCell<u64>>,
}

impl Tap {
    fn new() -> Tap {
        Tap {
            host: Rc::new(RefCell::new(HostDevice::new())),
            bases: Rc::default(),
            calls: Rc::default(),
        }
    }

    fn base(&self, tier: Tier) -> u64 {
        let bases = self.bases.borrow();
        bases.iter().rev().find(|(t, _)| *t == tier).unwrap().1
    }

    fn flip(&self, tier: Tier, offset: u64) {
        let base = self.base(tier);
        self.host.borrow_mut().corrupt(base, offset).unwrap();
    }

    fn calls(&self) -> u64 {
        *self.calls.borrow()
    }

    fn call(&self) -> std::cell::RefMut<'_, HostDevice> {
        *self.calls.borrow_mut() += 1;
        self.host.borrow_mut()
    }
}

impl Device for Tap {
    fn name(&self) -> String {
        "tap".into()
    }
    fn granularity_bytes(&self) -> u64 {
        self.host.borrow().granularity_bytes()
    }
    fn serves(&self, device: DeviceId) -> bool {
        device == DeviceId(0)
    }
    fn resident_includes(&self, tier: Tier) -> bool {
        self.host.borrow().resident_includes(tier)
    }
    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        let base = self.call().reserve(tier, bytes)?;
        self.bases.borrow_mut().push((tier, base));
        Ok(base)
    }
    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        self.call().release(base)
    }
    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.call().reserve_va(tier, bytes)
    }
    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.call().map(base, offset, bytes)
    }
    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.call().unmap(base, offset, bytes)
    }
    fn release_va(&mut self, base: u64) -> Result<(), DeviceError> {
        self.call().release_va(base)
    }
    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError> {
        self.call().fill(base, offset, bytes, seed)
    }
    fn verify(&mut self, b: u64, o: u64, n: u64, seed: u64) -> Result<Check, DeviceError> {
        self.call().verify(b, o, n, seed)
    }
    fn copy(&mut self, from: (u64, u64), to: (u64, u64), n: u64) -> Result<(), DeviceError> {
        self.call().copy(from, to, n)
    }
    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError> {
        self.call().corrupt(base, offset)
    }
    fn resident_bytes(&mut self) -> Option<u64> {
        None
    }
}

/// Reserves one GPU and one pinned segment and writes `content` at GPU offset 0.
fn setup<E: Executor>(ex: &mut E, content: u64) {
    for segment in [gpu_seg(), host_seg()] {
        ex.apply(Decision::Reserve {
            segment,
            bytes: 4 * BLOCK,
        })
        .unwrap();
    }
    ex.apply(Decision::WriteKv {
        at: at(gpu_seg(), 0),
        bytes: BLOCK,
        content,
    })
    .unwrap();
}

fn offload(content: u64, host_offset: u64) -> Decision {
    Decision::Transfer {
        from: at(gpu_seg(), 0),
        to: at(host_seg(), host_offset),
        bytes: BLOCK,
        content,
    }
}

#[test]
fn a_clean_transfer_is_verified_at_both_ends_and_digests_like_the_books() {
    let mut ex = DeviceExecutor::with_books(HostDevice::new(), books(), &[], 0);
    let mut ledger = Ledger::new(books());
    setup(&mut ex, 11);
    setup(&mut ledger, 11);
    let back = Decision::Transfer {
        from: at(host_seg(), BLOCK),
        to: at(gpu_seg(), 2 * BLOCK),
        bytes: BLOCK,
        content: 11,
    };
    for d in [offload(11, BLOCK), back] {
        assert_eq!(ex.apply(d), Ok(()));
        assert_eq!(ledger.apply(d), Ok(()));
    }
    assert_eq!(ex.digest_hex(), ledger.digest.hex());
    let r = ex.report();
    assert_eq!((r.transfers, r.bytes_transferred), (2, 2 * BLOCK));
    assert_eq!(r.bytes_verified, 4 * BLOCK, "source and copy of each");
    assert_eq!(r.transfer_bytes_verified, 4 * BLOCK);
    assert_eq!((r.mismatches, r.transfers_refused), (0, 0));
}

#[test]
fn a_corrupted_source_refuses_the_transfer() {
    // The first block written is the source: one of its bytes flips right after the write.
    let faults = [Inject::CorruptBlock { nth: Some(1) }];
    let mut ex = DeviceExecutor::with_books(HostDevice::new(), books(), &faults, 3);
    let mut ledger = Ledger::new(books());
    setup(&mut ex, 5);
    setup(&mut ledger, 5);
    assert_eq!(ex.apply(offload(5, 0)), Err(Refusal::Mismatch));
    assert_eq!(ledger.apply(offload(5, 0)), Ok(()));
    assert_ne!(
        ex.digest_hex(),
        ledger.digest.hex(),
        "a refusal changes the digest"
    );
    let r = ex.report();
    assert_eq!(
        (r.transfers, r.transfers_refused),
        (0, 1),
        "nothing was copied"
    );
    assert_eq!(r.transfer_bytes_verified, BLOCK, "the source only");
    assert_eq!(r.first_mismatches[0].check, "transfer-from");
    // Nothing at the destination is taken for the content: reading it there is refused.
    let read = Decision::ReadKv {
        at: at(host_seg(), 0),
        bytes: BLOCK,
        content: 5,
    };
    assert_eq!(ex.apply(read), Err(Refusal::Mismatch));
}

#[test]
fn a_corrupted_copy_is_refused_and_never_checked_as_valid_later() {
    let faults = [Inject::CorruptTransfer { nth: Some(1) }];
    let mut ex = DeviceExecutor::with_books(HostDevice::new(), books(), &faults, 3);
    setup(&mut ex, 5);
    assert_eq!(ex.apply(offload(5, BLOCK)), Err(Refusal::Mismatch));
    let r = ex.report();
    assert_eq!(r.injected_transfer_corruptions, 1);
    assert_eq!((r.transfers, r.transfers_refused), (1, 1));
    assert_eq!(r.mismatches, 1);
    assert_eq!(r.transfer_bytes_verified, 2 * BLOCK);
    assert_eq!(r.first_mismatches[0].check, "transfer-to");
    assert_eq!(r.first_mismatches[0].offset, BLOCK);
    // The checkpoint re-checks the source only: the garbage copy is not a content any more.
    let before = ex.report();
    assert_eq!(ex.checkpoint(), 0);
    let after = ex.report();
    assert_eq!(after.verifications - before.verifications, 1);
    assert_eq!(after.bytes_verified - before.bytes_verified, BLOCK);
    // And a read of the copy as the content is refused, never served.
    let read = Decision::ReadKv {
        at: at(host_seg(), BLOCK),
        bytes: BLOCK,
        content: 5,
    };
    assert_eq!(ex.apply(read), Err(Refusal::Mismatch));
    // A second transfer of the same block is clean (the fault hit the first only).
    assert_eq!(ex.apply(offload(5, 2 * BLOCK)), Ok(()));
}

#[test]
fn checkpoints_re_verify_transferred_contents() {
    let tap = Tap::new();
    let mut ex = DeviceExecutor::with_books(tap.clone(), books(), &[], 0);
    setup(&mut ex, 9);
    assert_eq!(ex.apply(offload(9, 3 * BLOCK)), Ok(()));
    assert_eq!(ex.checkpoint(), 0);
    let clean = ex.report();
    // Flip a byte of the copy behind the executor's back: the next checkpoint finds it.
    tap.flip(Tier::PinnedHost, 3 * BLOCK + 17);
    assert_eq!(ex.checkpoint(), 1);
    let r = ex.report();
    assert_eq!(r.bytes_verified - clean.bytes_verified, 2 * BLOCK);
    let m = r.first_mismatches.last().unwrap();
    assert_eq!(m.check, "checkpoint-content");
    assert_eq!((m.id, m.offset, m.first_mismatch), (9, 3 * BLOCK, Some(17)));
    assert!(m.segment.contains("pinned-host"), "{}", m.segment);
}

#[test]
fn release_forgets_the_contents_of_its_segment() {
    let mut ex = DeviceExecutor::with_books(HostDevice::new(), books(), &[], 0);
    setup(&mut ex, 4);
    assert_eq!(ex.apply(offload(4, 0)), Ok(()));
    ex.apply(Decision::Release {
        segment: host_seg(),
    })
    .unwrap();
    let before = ex.report();
    assert_eq!(ex.checkpoint(), 0);
    let after = ex.report();
    assert_eq!(
        after.verifications - before.verifications,
        1,
        "only the GPU block is left to check"
    );
    // A new segment in the same place starts empty: nothing there holds content 4.
    let again = SegmentId::new(PINNED, Owner::Scratch, 1);
    ex.apply(Decision::Reserve {
        segment: again,
        bytes: BLOCK,
    })
    .unwrap();
    let read = Decision::ReadKv {
        at: at(again, 0),
        bytes: BLOCK,
        content: 4,
    };
    assert_eq!(ex.apply(read), Err(Refusal::Mismatch));
}

#[test]
fn a_reserve_on_a_device_not_driven_is_refused_not_a_panic() {
    let tap = Tap::new();
    let other = Place::gpu(1);
    let books = Books::with_places(&[(Place::GPU0, MIB), (other, MIB)]);
    let mut ex = DeviceExecutor::with_books(tap.clone(), books.clone(), &[], 0);
    let mut ledger = Ledger::new(books);
    let d = Decision::Reserve {
        segment: SegmentId::new(other, Owner::Scratch, 0),
        bytes: KIB,
    };
    assert_eq!(ex.apply(d), Err(Refusal::Device));
    assert_eq!(ledger.apply(d), Ok(()), "the books had room");
    assert_eq!(tap.calls(), 0, "the device was not asked");
    assert_eq!(ex.books().account(other).reserved_bytes, 0);
    let r = ex.report();
    assert_eq!(r.device_refusals, 1);
    assert!(
        r.device_errors[0].contains("does not drive device 1"),
        "{:?}",
        r.device_errors
    );
    assert_ne!(r.digest, ledger.digest.hex());
}

#[test]
fn each_place_refuses_beyond_its_own_capacity() {
    let tap = Tap::new();
    let books = Books::with_places(&[(Place::GPU0, MIB), (PINNED, 4 * MIB)]);
    let mut ex = DeviceExecutor::with_books(tap.clone(), books, &[], 0);
    let reserve = |place, index, bytes| Decision::Reserve {
        segment: SegmentId::new(place, Owner::Scratch, index),
        bytes,
    };
    assert_eq!(
        ex.apply(reserve(Place::GPU0, 0, 2 * MIB)),
        Err(Refusal::Capacity)
    );
    assert_eq!(ex.apply(reserve(PINNED, 0, 2 * MIB)), Ok(()));
    assert_eq!(ex.apply(reserve(PINNED, 1, 2 * MIB)), Ok(()));
    assert_eq!(ex.apply(reserve(PINNED, 2, 1)), Err(Refusal::Capacity));
    // A place the books were not given holds nothing.
    assert_eq!(ex.apply(reserve(PAGEABLE, 0, 1)), Err(Refusal::Capacity));
    assert_eq!(ex.apply(reserve(Place::GPU0, 1, MIB)), Ok(()));
    assert_eq!(tap.calls(), 3, "capacity refusals never reach the device");
    assert_eq!(ex.books().account(PINNED).reserved_bytes, 4 * MIB);
    assert_eq!(ex.books().account(Place::GPU0).reserved_bytes, MIB);
    assert_eq!(ex.report().capacity_refusals, 3);
}

fn tier_config(host_tier: Tier) -> TierConfig {
    TierConfig {
        item_bytes: 16 * KIB,
        gpu_slots: 4,
        host_slots: 6,
        host_tier,
        device: DeviceId(0),
    }
}

/// A seeded stream over 16 items, half of the accesses to 3 hot ones: it hits, offloads,
/// restores and drops.
fn tier_stream() -> impl Iterator<Item = u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    (0..400).map(move |_| match rng.gen_range(0..2u64) {
        0 => rng.gen_range(0..3u64),
        _ => rng.gen_range(0..16u64),
    })
}

fn run_tiers<E: Executor>(c: TierConfig, exec: &mut E) -> gpumem_core::tiers::TierStats {
    let mut cache = TierCache::new(c, exec).unwrap();
    for item in tier_stream() {
        cache.access(item, exec);
    }
    cache.check_invariants().unwrap();
    let stats = *cache.stats();
    cache.release(exec);
    stats
}

#[test]
fn the_tier_cache_moves_content_gpu_host_gpu_for_real() {
    for tier in [Tier::PinnedHost, Tier::PageableHost] {
        let c = tier_config(tier);
        let mut ex = DeviceExecutor::with_books(
            HostDevice::new(),
            Books::with_places(&c.capacities()),
            &[],
            0,
        );
        let mut ledger = Ledger::new(Books::with_places(&c.capacities()));
        let real = run_tiers(c, &mut ex);
        let books_only = run_tiers(c, &mut ledger);
        assert_eq!(real, books_only);
        assert!(real.restores > 100 && real.offloads > real.restores && real.drops > 10);
        assert_eq!(ex.digest_hex(), ledger.digest.hex(), "{tier:?}");
        let r = ex.finish();
        assert_eq!(r.transfers, real.offloads + real.restores);
        assert_eq!(r.bytes_transferred, real.bytes_moved());
        assert_eq!(r.mismatches, 0);
        assert_eq!(r.transfer_bytes_verified, 2 * r.bytes_transferred);
        // Each transfer checked its source and its copy, each hit its block.
        assert!(r.bytes_verified >= 2 * r.bytes_transferred + real.hits * c.item_bytes);
    }
}

#[test]
fn a_corrupted_transfer_costs_the_cache_its_item_and_shows() {
    let c = tier_config(Tier::PinnedHost);
    let faults = [Inject::CorruptTransfer { nth: Some(3) }];
    let mut ex = DeviceExecutor::with_books(
        HostDevice::new(),
        Books::with_places(&c.capacities()),
        &faults,
        0,
    );
    let mut ledger = Ledger::new(Books::with_places(&c.capacities()));
    let real = run_tiers(c, &mut ex);
    let books_only = run_tiers(c, &mut ledger);
    assert_eq!((real.lost, real.transfers_refused), (1, 1));
    assert_eq!(books_only.lost, 0);
    assert_ne!(ex.digest_hex(), ledger.digest.hex());
    let r = ex.finish();
    assert_eq!((r.transfers_refused, r.mismatches), (1, 1));
}

mod sleep_mode {
    use gpumem_core::books::Books;
    use gpumem_core::decision::{Decision, Loc, Refusal};
    use gpumem_core::executor::Executor;
    use gpumem_core::place::{DeviceId, Place, Tier};
    use gpumem_core::sleep::{CuMemPool, SleepError, SleepLevel, Tag};
    use gpumem_gpu::{DeviceExecutor, HostDevice, Inject};

    const MIB: u64 = 1 << 20;

    fn executor(faults: &[Inject]) -> DeviceExecutor<HostDevice> {
        let books = Books::with_places(&[
            (Place::GPU0, 64 * MIB),
            (Place::new(0, Tier::PinnedHost), 64 * MIB),
        ]);
        DeviceExecutor::with_books(HostDevice::new(), books, faults, 0)
    }

    #[test]
    fn a_wake_finds_the_same_addresses_and_the_discarded_kv_is_never_a_hit() {
        let mut exec = executor(&[]);
        let mut pool = CuMemPool::new(DeviceId(0));
        let w = pool.allocate(Tag::Weights, 4 * MIB, 11, &mut exec).unwrap();
        let kv = pool.allocate(Tag::KvCache, 4 * MIB, 22, &mut exec).unwrap();
        let (ws, ks) = (pool.segment(w), pool.segment(kv));
        let bases = (exec.segment_base(ws), exec.segment_base(ks));
        assert!(bases.0.is_some() && bases.1.is_some());
        let read = |segment, content| Decision::ReadKv {
            at: Loc::at(segment),
            bytes: 4 * MIB,
            content,
        };
        assert_eq!(
            exec.apply(read(ks, 22)),
            Ok(()),
            "awake, the KV holds its bytes"
        );
        let slept = pool.sleep(SleepLevel::One, &mut exec).unwrap();
        assert_eq!(
            slept.bytes_copied,
            4 * MIB,
            "only the weights are backed up"
        );
        let woke = pool.wake_up(None, &mut exec).unwrap();
        assert_eq!(woke.bytes_copied, 4 * MIB);
        assert_eq!((exec.segment_base(ws), exec.segment_base(ks)), bases);
        // The weights were restored at their address, checked at both ends; the KV cache was
        // discarded (MADV_DONTNEED): reading it as a hit is refused, never counted.
        assert_eq!(exec.apply(read(ws, 11)), Ok(()));
        assert_eq!(exec.apply(read(ks, 22)), Err(Refusal::Mismatch));
        let report = exec.finish();
        assert_eq!(
            report.mismatched_verifications, 1,
            "{:?}",
            report.first_mismatches
        );
    }

    #[test]
    fn a_corrupted_backup_is_refused_by_the_wake_that_would_restore_it() {
        let mut exec = executor(&[Inject::CorruptBackup { nth: Some(1) }]);
        let mut pool = CuMemPool::new(DeviceId(0));
        let w = pool.allocate(Tag::Weights, 4 * MIB, 11, &mut exec).unwrap();
        pool.sleep(SleepLevel::One, &mut exec).unwrap();
        let e = pool.wake_up(None, &mut exec).unwrap_err();
        let SleepError::Refused { refusal, .. } = e;
        assert_eq!(refusal, Refusal::Mismatch);
        assert_eq!(pool.content(w), None, "nothing known is in the weights");
        let report = exec.finish();
        assert_eq!(report.injected_backup_corruptions, 1);
        assert_eq!(report.first_mismatches[0].check, "transfer-from");
        assert!(report.mismatches > 0);
    }
}
