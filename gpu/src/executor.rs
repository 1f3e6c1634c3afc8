//! [`DeviceExecutor`]: carries out a policy's decisions on a real [`Device`] and checks
//! independently that the policy's picture of memory is true.
//!
//! It keeps the same [`Ledger`] (books and digest) as the simulator, so the two digests agree
//! whenever the device did what the simulator assumed. On top of that it
//! - fills every placed block with the pattern of [`crate::pattern`] seeded by its allocation id,
//!   and checks the pattern where a decision says the block is when it is freed or moved, and
//!   for every live block at checkpoints and at the end: a block that is not where the books say,
//!   or that another block's write disturbed, shows up as mismatched bytes;
//! - writes every content block (`WriteKv`) with the pattern of its content, checks it when a
//!   prefix hit reads it (`ReadKv`), and re-checks all of them at checkpoints;
//! - copies every `Transfer` for real, between tiers and devices, after checking that the source
//!   holds the content and before checking that the destination does; a transfer whose bytes
//!   are wrong on either side is refused (`Refusal::Mismatch`) and never counts;
//! - reports a device that refuses memory the books had room for as [`Refusal::Device`] (which
//!   changes the digest) and counts it;
//! - refuses to release or unmap memory under a live block (a policy bug: it panics);
//! - measures the time of every decision by kind (measurement only; it never decides anything);
//! - takes seeded fault injection ([`Inject`]) so that tests prove the checks can fail.
//!
//! Only `Reserve`, `ReserveVa` and `Map` can be refused for want of memory (and `ReadKv`/`Transfer` for
//! wrong bytes). Any other device failure, and any decision the books reject, is a policy bug
//! or a broken device: it panics with a message saying which.

use std::collections::BTreeMap;
use std::time::Instant;

use gpumem_core::books::Books;
use gpumem_core::decision::{AllocId, Decision, Loc, Refusal, SegmentId};
use gpumem_core::digest::Digest;
use gpumem_core::executor::{Executor, Ledger};
use gpumem_core::place::{Owner, Tier};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceError, DeviceErrorKind};
use crate::inject::{Candidate, Faults, Inject};

/// How many mismatches and device errors a report lists in full.
pub const REPORT_FIRST: usize = 16;

/// A block whose bytes were not what they should be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Number of decisions carried out before the check (the failing decision's index when a
    /// `Free` or `Move` found it).
    pub decision: u64,
    /// Which check: `free`, `move-from`, `move-to`, `prefix-hit`, `transfer-from`,
    /// `transfer-to`, `checkpoint` or `checkpoint-content`.
    pub check: String,
    /// The allocation id, or the content, whose pattern was expected.
    pub id: u64,
    /// The segment, as `owner#index` (and `@device N tier` off device 0's GPU memory).
    pub segment: String,
    /// The block's offset in its segment.
    pub offset: u64,
    pub bytes: u64,
    pub mismatched_bytes: u64,
    /// Offset of the first wrong byte within the block.
    pub first_mismatch: Option<u64>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} check after decision {} found {} of the {} bytes of block {} at {}+{} wrong",
            self.check,
            self.decision,
            self.mismatched_bytes,
            self.bytes,
            self.id,
            self.segment,
            self.offset
        )?;
        if let Some(first) = self.first_mismatch {
            write!(f, ", the first at byte {first}")?;
        }
        Ok(())
    }
}

/// Measured time of one decision kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindTiming {
    pub kind: String,
    pub count: u64,
    pub measured_ns_total: u64,
}

/// What a run on a device observed. Everything but the timings (and resident bytes) is
/// deterministic for a given decision stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReport {
    pub device: String,
    pub granularity_bytes: u64,
    /// Hex digest of the decision stream and its outcomes ([`Digest`]).
    pub digest: String,
    pub decisions: u64,
    /// Bytes filled with a pattern (by `Place`).
    pub bytes_written: u64,
    /// Bytes copied (by `Move`).
    pub bytes_copied: u64,
    /// Transfers carried out, and their bytes (each verified at both ends).
    pub transfers: u64,
    pub bytes_transferred: u64,
    /// Transfers refused because the source or the copy held other bytes.
    pub transfers_refused: u64,
    /// Bytes checked at the source and at the copy of transfers (part of `bytes_verified`):
    /// twice `bytes_transferred` when every transfer's source held its content.
    pub transfer_bytes_verified: u64,
    /// Bytes checked against their pattern (free, move, checkpoints).
    pub bytes_verified: u64,
    /// Block checks made.
    pub verifications: u64,
    /// Bytes that did not hold their pattern, summed over all checks.
    pub mismatches: u64,
    /// Checks that found at least one wrong byte.
    pub mismatched_verifications: u64,
    /// The first [`REPORT_FIRST`] checks that found wrong bytes.
    pub first_mismatches: Vec<Mismatch>,
    /// `Reserve`/`Map` refused because the capacity would be exceeded.
    pub capacity_refusals: u64,
    /// `Reserve`/`Map` the device refused although the books had room.
    pub device_refusals: u64,
    /// The first [`REPORT_FIRST`] device refusals, with the device's reason.
    pub device_errors: Vec<String>,
    pub injected_refusals: u64,
    pub injected_corruptions: u64,
    pub injected_transfer_corruptions: u64,
    /// Copies in the KV offload tier corrupted after they were stored (`corrupt-offload`).
    pub injected_offload_corruptions: u64,
    /// Sleep backups in host memory corrupted after they were stored (`corrupt-backup`).
    pub injected_backup_corruptions: u64,
    /// Corruptions of content blocks written again before anything read them: each moved on
    /// to the next block written (or copy stored), so that a check can see it.
    pub injections_moved_on: u64,
    /// The injections as resolved for this run, e.g. `corrupt-block:17`.
    pub injections: Vec<String>,
    pub reserved_bytes_peak: u64,
    pub allocated_bytes_peak: u64,
    /// Device-reported memory in use before the first decision.
    pub resident_bytes_start: Option<u64>,
    /// Highest device-reported memory in use, sampled after each reserve and map, before each
    /// release and unmap, and at the end.
    pub resident_bytes_peak: Option<u64>,
    /// Largest difference, over those samples, between the growth of device-reported memory
    /// since the start and the books' reserved bytes. On a GPU this stays within the
    /// allocation granularity per segment; host memory is committed lazily, when written, so
    /// there it mostly shows memory reserved but not yet touched.
    pub resident_gap_max_bytes: Option<u64>,
    pub checkpoints: u64,
    pub checkpoint_ns_total: u64,
    /// Per decision kind, in [`Decision::KIND_NAMES`] order.
    pub timings: Vec<KindTiming>,
}

/// Segment handle on the device, and whether it is a virtual range.
#[derive(Clone, Copy, Debug)]
struct Base {
    base: u64,
    is_virtual: bool,
}

#[derive(Clone, Debug, Default)]
struct Stats {
    decisions: u64,
    bytes_written: u64,
    bytes_copied: u64,
    transfers: u64,
    bytes_transferred: u64,
    transfers_refused: u64,
    transfer_bytes_verified: u64,
    bytes_verified: u64,
    verifications: u64,
    mismatches: u64,
    mismatched_verifications: u64,
    first_mismatches: Vec<Mismatch>,
    capacity_refusals: u64,
    device_refusals: u64,
    device_errors: Vec<String>,
    injected_refusals: u64,
    injected_corruptions: u64,
    injected_transfer_corruptions: u64,
    injected_offload_corruptions: u64,
    injected_backup_corruptions: u64,
    injections_moved_on: u64,
    resident_start: Option<u64>,
    resident_peak: Option<u64>,
    resident_gap_max: Option<u64>,
    checkpoints: u64,
    checkpoint_ns: u64,
    timings: [(u64, u64); Decision::KIND_NAMES.len()],
}

/// Carries out decisions on a [`Device`]; see the module documentation.
pub struct DeviceExecutor<D: Device> {
    ledger: Ledger,
    device: D,
    bases: BTreeMap<SegmentId, Base>,
    /// Live blocks by place: (segment, offset, id) → bytes.
    placed: BTreeMap<(SegmentId, u64, AllocId), u64>,
    /// Content blocks (written by `WriteKv`, or the destination of a `Transfer`): (segment,
    /// offset) → (bytes, content), never overlapping; re-checked at checkpoints.
    contents: BTreeMap<(SegmentId, u64), (u64, u64)>,
    /// A content block corrupted by injection that no check has read yet, and the kind of
    /// fault: if it is written again first, the corruption is gone unseen and moves on to the
    /// next candidate of that kind.
    unread_corruption: Option<((SegmentId, u64), Candidate)>,
    faults: Faults,
    stats: Stats,
}

impl<D: Device> DeviceExecutor<D> {
    /// An executor over `device` with `capacity_bytes` of device 0's GPU memory in its books,
    /// injecting `faults`; `seed` chooses the injections given without `:N` and the corrupted
    /// byte.
    pub fn new(device: D, capacity_bytes: u64, faults: &[Inject], seed: u64) -> Self {
        Self::with_books(device, Books::new(capacity_bytes), faults, seed)
    }

    /// An executor over `device` whose books hold the capacities of every place it may use.
    pub fn with_books(device: D, books: Books, faults: &[Inject], seed: u64) -> Self {
        let mut ex = DeviceExecutor {
            ledger: Ledger::new(books),
            device,
            bases: BTreeMap::new(),
            placed: BTreeMap::new(),
            contents: BTreeMap::new(),
            unread_corruption: None,
            faults: Faults::new(faults, seed),
            stats: Stats::default(),
        };
        let start = ex.device.resident_bytes();
        ex.stats.resident_start = start;
        ex.stats.resident_peak = start;
        ex
    }

    pub fn books(&self) -> &Books {
        &self.ledger.books
    }

    pub fn digest_hex(&self) -> String {
        self.ledger.digest.hex()
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Bytes that failed their checks so far.
    pub fn mismatches(&self) -> u64 {
        self.stats.mismatches
    }

    /// Re-checks the pattern of every live block; returns the wrong bytes found.
    pub fn checkpoint(&mut self) -> u64 {
        let started = Instant::now();
        let live: Vec<(AllocId, Loc, u64)> = self.ledger.books.live().collect();
        let mut found = 0;
        for (id, at, bytes) in live {
            found += self.check_block(id, at, bytes, "checkpoint");
        }
        let contents: Vec<((SegmentId, u64), (u64, u64))> =
            self.contents.iter().map(|(&k, &v)| (k, v)).collect();
        for ((segment, offset), (bytes, content)) in contents {
            let at = Loc { segment, offset };
            found += self.check_block(AllocId(content), at, bytes, "checkpoint-content");
        }
        self.stats.checkpoints += 1;
        self.stats.checkpoint_ns += started.elapsed().as_nanos() as u64;
        found
    }

    /// What was observed so far (no final checkpoint).
    pub fn report(&self) -> ExecReport {
        let s = &self.stats;
        ExecReport {
            device: self.device.name(),
            granularity_bytes: self.device.granularity_bytes(),
            digest: self.ledger.digest.hex(),
            decisions: s.decisions,
            bytes_written: s.bytes_written,
            bytes_copied: s.bytes_copied,
            transfers: s.transfers,
            bytes_transferred: s.bytes_transferred,
            transfers_refused: s.transfers_refused,
            transfer_bytes_verified: s.transfer_bytes_verified,
            bytes_verified: s.bytes_verified,
            verifications: s.verifications,
            mismatches: s.mismatches,
            mismatched_verifications: s.mismatched_verifications,
            first_mismatches: s.first_mismatches.clone(),
            capacity_refusals: s.capacity_refusals,
            device_refusals: s.device_refusals,
            device_errors: s.device_errors.clone(),
            injected_refusals: s.injected_refusals,
            injected_corruptions: s.injected_corruptions,
            injected_transfer_corruptions: s.injected_transfer_corruptions,
            injected_offload_corruptions: s.injected_offload_corruptions,
            injected_backup_corruptions: s.injected_backup_corruptions,
            injections_moved_on: s.injections_moved_on,
            injections: self.faults.plan.clone(),
            reserved_bytes_peak: self.ledger.books.reserved_bytes_peak(),
            allocated_bytes_peak: self.ledger.books.allocated_bytes_peak,
            resident_bytes_start: s.resident_start,
            resident_bytes_peak: s.resident_peak,
            resident_gap_max_bytes: s.resident_gap_max,
            checkpoints: s.checkpoints,
            checkpoint_ns_total: s.checkpoint_ns,
            timings: Decision::KIND_NAMES
                .iter()
                .zip(s.timings)
                .map(|(kind, (count, ns))| KindTiming {
                    kind: kind.to_string(),
                    count,
                    measured_ns_total: ns,
                })
                .collect(),
        }
    }

    /// Checks every live block a last time and reports. The device is dropped afterwards,
    /// returning all its memory.
    pub fn finish(mut self) -> ExecReport {
        self.checkpoint();
        self.sample_resident();
        self.report()
    }

    fn base(&self, segment: SegmentId) -> u64 {
        match self.bases.get(&segment) {
            Some(b) => b.base,
            None => panic!("{segment:?} has no memory on {}", self.device.name()),
        }
    }

    fn fail(&self, d: &Decision, e: DeviceError) -> ! {
        panic!(
            "{}: {d:?} failed: {e} (a decision that cannot be refused; the books accepted it)",
            self.device.name()
        )
    }

    /// Verifies the pattern of `seed` (an allocation's id, or a KV block's content) at `at`.
    fn check_block(&mut self, id: AllocId, at: Loc, bytes: u64, check: &str) -> u64 {
        let base = self.base(at.segment);
        let result = self
            .device
            .verify(base, at.offset, bytes, id.0)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {check} check of {id:?} at {at:?}+{bytes} failed: {e}",
                    self.device.name()
                )
            });
        if result.mismatched_bytes > 0
            && self.unread_corruption.map(|(k, _)| k) == Some((at.segment, at.offset))
        {
            self.unread_corruption = None;
        }
        let s = &mut self.stats;
        s.verifications += 1;
        s.bytes_verified += bytes;
        if result.mismatched_bytes > 0 {
            s.mismatches += result.mismatched_bytes;
            s.mismatched_verifications += 1;
            if s.first_mismatches.len() < REPORT_FIRST {
                s.first_mismatches.push(Mismatch {
                    decision: s.decisions,
                    check: check.to_string(),
                    id: id.0,
                    segment: format!("{:?}", at.segment),
                    offset: at.offset,
                    bytes,
                    mismatched_bytes: result.mismatched_bytes,
                    first_mismatch: result.first_mismatch,
                });
            }
        }
        result.mismatched_bytes
    }

    /// Panics if a live block lies in `[offset, end)` of `segment` (the whole segment for
    /// `None`): memory under a live block must not be released.
    fn assert_no_live_block(&self, d: &Decision, segment: SegmentId, range: Option<(u64, u64)>) {
        let first = (segment, 0, AllocId(0));
        let found = match range {
            // Even an empty block names its segment, which must outlive it.
            None => self
                .placed
                .range(first..=(segment, u64::MAX, AllocId(u64::MAX)))
                .next(),
            Some((offset, end)) => {
                let lo = (segment, offset, AllocId(0));
                let inside = self
                    .placed
                    .range(lo..(segment, end, AllocId(0)))
                    .find(|(_, &bytes)| bytes > 0);
                let before = self
                    .placed
                    .range(first..lo)
                    .next_back()
                    .filter(|(&(_, o, _), &bytes)| o + bytes > offset);
                inside.or(before)
            }
        };
        if let Some((&(_, o, id), &bytes)) = found {
            panic!("policy bug: {d:?} while {id:?} is live at {segment:?}+{o} ({bytes} bytes)");
        }
    }

    /// Capacity, then injection, then the device: the checks before a `Reserve` or `Map`.
    fn admit(&mut self, d: &Decision) -> Result<(), Refusal> {
        if let Err(r) = self.ledger.books.admits(d) {
            self.stats.capacity_refusals += 1;
            return Err(r);
        }
        if self.faults.next(Candidate::Alloc) {
            self.stats.injected_refusals += 1;
            return Err(Refusal::Injected);
        }
        Ok(())
    }

    /// A `Reserve` or `Map` the device failed: a refusal, unless the device says the call
    /// itself was wrong (then the books and the device disagree, which is a bug).
    fn refused(&mut self, d: &Decision, e: DeviceError) -> Refusal {
        if e.kind == DeviceErrorKind::Invalid {
            self.fail(d, e);
        }
        self.stats.device_refusals += 1;
        if self.stats.device_errors.len() < REPORT_FIRST {
            self.stats.device_errors.push(format!("{d}: {e}"));
        }
        Refusal::Device
    }

    fn books_apply(&mut self, d: Decision) {
        if let Err(r) = self.ledger.books.apply(d) {
            panic!("books refused {d:?} ({r:?}) after admitting it");
        }
    }

    fn carry_out(&mut self, d: Decision) -> Result<(), Refusal> {
        match d {
            Decision::Reserve { segment, bytes } => {
                assert!(!self.bases.contains_key(&segment), "{segment:?} reused");
                self.admit(&d)?;
                self.served(&d, segment)?;
                let base = self
                    .device
                    .reserve(segment.place.tier, bytes)
                    .map_err(|e| self.refused(&d, e))?;
                self.books_apply(d);
                let is_virtual = false;
                self.bases.insert(segment, Base { base, is_virtual });
            }
            Decision::ReserveVa { segment, bytes } => {
                assert!(!self.bases.contains_key(&segment), "{segment:?} reused");
                self.served(&d, segment)?;
                // Address space is not capacity, but a device may still have too little of it.
                let base = self
                    .device
                    .reserve_va(segment.place.tier, bytes)
                    .map_err(|e| self.refused(&d, e))?;
                self.books_apply(d);
                let is_virtual = true;
                self.bases.insert(segment, Base { base, is_virtual });
            }
            Decision::Release { segment } | Decision::ReleaseVa { segment } => {
                self.books_apply(d);
                self.assert_no_live_block(&d, segment, None);
                self.forget_contents(segment, 0, u64::MAX);
                let b = self.bases.remove(&segment).expect("books knew the segment");
                let done = if b.is_virtual {
                    self.device.release_va(b.base)
                } else {
                    self.device.release(b.base)
                };
                done.unwrap_or_else(|e| self.fail(&d, e));
            }
            Decision::Map {
                segment,
                offset,
                bytes,
            } => {
                match self.bases.get(&segment) {
                    Some(b) if b.is_virtual => {}
                    _ => panic!("{d:?}: {segment:?} is not a virtual range"),
                }
                self.admit(&d)?;
                let base = self.base(segment);
                self.device
                    .map(base, offset, bytes)
                    .map_err(|e| self.refused(&d, e))?;
                self.books_apply(d);
            }
            Decision::Unmap {
                segment,
                offset,
                bytes,
            } => {
                self.books_apply(d);
                self.assert_no_live_block(&d, segment, Some((offset, offset + bytes)));
                self.forget_contents(segment, offset, offset + bytes);
                let base = self.base(segment);
                self.device
                    .unmap(base, offset, bytes)
                    .unwrap_or_else(|e| self.fail(&d, e));
            }
            Decision::Place { id, at, bytes } => {
                self.books_apply(d);
                self.placed.insert((at.segment, at.offset, id), bytes);
                let base = self.base(at.segment);
                self.device
                    .fill(base, at.offset, bytes, id.0)
                    .unwrap_or_else(|e| self.fail(&d, e));
                self.stats.bytes_written += bytes;
                self.maybe_corrupt(&d, base, at.offset, bytes);
            }
            Decision::Free { id, at, bytes } => {
                // The books assert that the block lived exactly there.
                self.books_apply(d);
                self.placed.remove(&(at.segment, at.offset, id));
                self.check_block(id, at, bytes, "free");
            }
            Decision::Move {
                id,
                from,
                to,
                bytes,
            } => {
                self.books_apply(d);
                self.placed.remove(&(from.segment, from.offset, id));
                self.placed.insert((to.segment, to.offset, id), bytes);
                self.check_block(id, from, bytes, "move-from");
                let src = (self.base(from.segment), from.offset);
                let dst = (self.base(to.segment), to.offset);
                self.device
                    .copy(src, dst, bytes)
                    .unwrap_or_else(|e| self.fail(&d, e));
                self.stats.bytes_copied += bytes;
                self.check_block(id, to, bytes, "move-to");
            }
            Decision::WriteKv { at, bytes, content } => {
                self.books_apply(d);
                self.set_content(at, bytes, content);
                let base = self.base(at.segment);
                self.device
                    .fill(base, at.offset, bytes, content)
                    .unwrap_or_else(|e| self.fail(&d, e));
                self.stats.bytes_written += bytes;
                self.maybe_corrupt(&d, base, at.offset, bytes);
            }
            Decision::ReadKv { at, bytes, content } => {
                self.books_apply(d);
                // A hit is served only from bytes that hold exactly the expected content.
                if self.check_block(AllocId(content), at, bytes, "prefix-hit") > 0 {
                    return Err(Refusal::Mismatch);
                }
            }
            Decision::Transfer {
                from,
                to,
                bytes,
                content,
            } => {
                self.books_apply(d);
                self.transfer(&d, from, to, bytes, content)?;
            }
        }
        Ok(())
    }

    /// A real copy between two places, checked at both ends; see the module documentation.
    fn transfer(
        &mut self,
        d: &Decision,
        from: Loc,
        to: Loc,
        bytes: u64,
        content: u64,
    ) -> Result<(), Refusal> {
        for segment in [from.segment, to.segment] {
            if !self.device.serves(segment.place.device) {
                panic!("{d:?}: {segment:?} has no memory on {}", self.device.name());
            }
        }
        let source_wrong = self.check_block(AllocId(content), from, bytes, "transfer-from");
        self.stats.transfer_bytes_verified += bytes;
        if source_wrong > 0 {
            self.stats.transfers_refused += 1;
            return Err(Refusal::Mismatch);
        }
        let src = (self.base(from.segment), from.offset);
        let dst = (self.base(to.segment), to.offset);
        self.device
            .copy(src, dst, bytes)
            .unwrap_or_else(|e| self.fail(d, e));
        if bytes > 0 && self.faults.next(Candidate::Transfer) {
            let byte = self.faults.rng.gen_range(0..bytes);
            self.device
                .corrupt(dst.0, dst.1 + byte)
                .unwrap_or_else(|e| self.fail(d, e));
            self.stats.injected_transfer_corruptions += 1;
        }
        self.stats.transfers += 1;
        self.stats.bytes_transferred += bytes;
        let copy_wrong = self.check_block(AllocId(content), to, bytes, "transfer-to");
        self.stats.transfer_bytes_verified += bytes;
        if copy_wrong > 0 {
            // The copy is garbage: nothing may read it as `content`.
            self.forget_contents(to.segment, to.offset, to.offset + bytes);
            self.stats.transfers_refused += 1;
            return Err(Refusal::Mismatch);
        }
        self.set_content(to, bytes, content);
        if bytes > 0 && to.segment.owner == Owner::KvOffload && self.faults.next(Candidate::Offload)
        {
            let byte = self.faults.rng.gen_range(0..bytes);
            self.device
                .corrupt(dst.0, dst.1 + byte)
                .unwrap_or_else(|e| self.fail(d, e));
            self.stats.injected_offload_corruptions += 1;
            self.unread_corruption = Some(((to.segment, to.offset), Candidate::Offload));
        }
        let backup = from.segment.place.tier == Tier::Gpu
            && matches!(to.segment.place.tier, Tier::PinnedHost | Tier::PageableHost)
            && to.segment.owner != Owner::KvOffload;
        if bytes > 0 && backup && self.faults.next(Candidate::Backup) {
            let byte = self.faults.rng.gen_range(0..bytes);
            self.device
                .corrupt(dst.0, dst.1 + byte)
                .unwrap_or_else(|e| self.fail(d, e));
            self.stats.injected_backup_corruptions += 1;
            self.unread_corruption = Some(((to.segment, to.offset), Candidate::Backup));
        }
        Ok(())
    }

    /// A `Reserve` on a device this executor does not drive is refused as the device would.
    fn served(&mut self, d: &Decision, segment: SegmentId) -> Result<(), Refusal> {
        if self.device.serves(segment.place.device) {
            return Ok(());
        }
        let e = DeviceError::new(
            DeviceErrorKind::Unsupported,
            format!(
                "{} does not drive device {}",
                self.device.name(),
                segment.place.device.0
            ),
        );
        Err(self.refused(d, e))
    }

    /// `at` now holds `content` over `bytes`: replaces whatever content blocks it overlaps.
    fn set_content(&mut self, at: Loc, bytes: u64, content: u64) {
        self.forget_contents(at.segment, at.offset, at.offset.saturating_add(bytes));
        if bytes > 0 {
            self.contents
                .insert((at.segment, at.offset), (bytes, content));
        }
    }

    /// Drops the content blocks of `segment` that overlap `[start, end)`.
    fn forget_contents(&mut self, segment: SegmentId, start: u64, end: u64) {
        let lo = (segment, 0);
        let hi = (segment, end);
        let gone: Vec<(SegmentId, u64)> = self
            .contents
            .range(lo..hi)
            .filter(|(&(_, o), &(b, _))| o.saturating_add(b) > start)
            .map(|(&k, _)| k)
            .collect();
        for k in gone {
            self.contents.remove(&k);
            if let Some((_, kind)) = self.unread_corruption.filter(|&(at, _)| at == k) {
                // Overwritten before anything read it: no check could ever see it.
                self.unread_corruption = None;
                match kind {
                    Candidate::Offload => self.stats.injected_offload_corruptions -= 1,
                    Candidate::Backup => self.stats.injected_backup_corruptions -= 1,
                    _ => self.stats.injected_corruptions -= 1,
                }
                self.stats.injections_moved_on += 1;
                self.faults.rearm(kind);
            }
        }
    }

    /// Fault injection: flips one byte of the N-th block written (placed, or a KV block).
    fn maybe_corrupt(&mut self, d: &Decision, base: u64, offset: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if self.faults.next(Candidate::Write) {
            let byte = self.faults.rng.gen_range(0..bytes);
            self.device
                .corrupt(base, offset + byte)
                .unwrap_or_else(|e| self.fail(d, e));
            self.stats.injected_corruptions += 1;
            if let Decision::WriteKv { at, .. } = *d {
                self.unread_corruption = Some(((at.segment, at.offset), Candidate::Write));
            }
        }
    }

    fn sample_resident(&mut self) {
        let Some(now) = self.device.resident_bytes() else {
            return;
        };
        let s = &mut self.stats;
        s.resident_peak = Some(s.resident_peak.map_or(now, |p| p.max(now)));
        if let Some(start) = s.resident_start {
            let grown = now.saturating_sub(start);
            let counted: u64 = self
                .ledger
                .books
                .accounts()
                .filter(|(p, _)| {
                    self.device.serves(p.device) && self.device.resident_includes(p.tier)
                })
                .map(|(_, a)| a.reserved_bytes)
                .sum();
            let gap = grown.abs_diff(counted);
            s.resident_gap_max = Some(s.resident_gap_max.map_or(gap, |g| g.max(gap)));
        }
    }
}

impl<D: Device> Executor for DeviceExecutor<D> {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        // Memory in use peaks right before it is given back, and grows as it is obtained (or,
        // on the host, touched): sample before every release and after every reservation.
        let gives_back = matches!(
            d,
            Decision::Release { .. } | Decision::ReleaseVa { .. } | Decision::Unmap { .. }
        );
        if gives_back {
            self.sample_resident();
        }
        let started = Instant::now();
        let outcome = self.carry_out(d);
        let ns = started.elapsed().as_nanos() as u64;
        let t = &mut self.stats.timings[d.kind_index()];
        t.0 += 1;
        t.1 += ns;
        self.stats.decisions += 1;
        self.ledger.digest.decision(&d, outcome);
        if matches!(
            d,
            Decision::Reserve { .. } | Decision::ReserveVa { .. } | Decision::Map { .. }
        ) {
            self.sample_resident();
        }
        outcome
    }

    fn books(&self) -> &Books {
        &self.ledger.books
    }

    fn digest(&self) -> &Digest {
        &self.ledger.digest
    }

    fn checkpoint(&mut self) -> u64 {
        DeviceExecutor::checkpoint(self)
    }

    fn segment_base(&self, segment: SegmentId) -> Option<u64> {
        self.bases.get(&segment).map(|b| b.base)
    }

    fn resident_bytes_now(&mut self) -> Option<u64> {
        self.device.resident_bytes_measured()
    }
}
