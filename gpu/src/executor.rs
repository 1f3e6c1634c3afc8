//! [`DeviceExecutor`]: carries out a policy's decisions on a real [`Device`] and checks
//! independently that the policy's picture of memory is true.
//!
//! It keeps the same [`Books`] and [`Digest`] as the simulator, so the two digests agree
//! whenever the device did what the simulator assumed. On top of that it
//! - fills every placed block with the pattern of [`crate::pattern`] seeded by its allocation id,
//!   and checks the pattern where a decision says the block is when it is freed or moved, and
//!   for every live block at checkpoints and at the end: a block that is not where the books say,
//!   or that another block's write disturbed, shows up as mismatched bytes;
//! - reports a device that refuses memory the books had room for as [`Refusal::Device`] (which
//!   changes the digest) and counts it;
//! - refuses to release or unmap memory under a live block (a policy bug: it panics);
//! - measures the time of every decision by kind (measurement only; it never decides anything);
//! - takes seeded fault injection ([`Inject`]) so that tests prove the checks can fail.
//!
//! Only `Reserve` and `Map` can be refused. Any other device failure, and any decision the
//! books reject, is a policy bug or a broken device: it panics with a message saying which.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use gpumem_core::decision::{AllocId, Decision, Loc, Refusal, SegmentId};
use gpumem_core::digest::Digest;
use gpumem_core::memory::{Books, Memory};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceError, DeviceErrorKind};

/// How many mismatches and device errors a report lists in full.
pub const REPORT_FIRST: usize = 16;

/// Without an explicit `:N`, an injection hits one of this many first candidates, drawn from
/// the seed.
pub const INJECT_WINDOW: u64 = 64;

/// A seeded fault, as the CLI names it: `corrupt-block[:N]` or `refuse-alloc[:N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Inject {
    /// Flip one byte of the `nth` placed block (1-based, counting `Place`s of at least one
    /// byte) right after it was filled; its next check must report a mismatch.
    CorruptBlock { nth: Option<u64> },
    /// Refuse the `nth` `Reserve` or `Map` (1-based, counting those the capacity admits) as if
    /// the device had; it returns [`Refusal::Injected`].
    RefuseAlloc { nth: Option<u64> },
}

/// Why an `--inject` value could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseInjectError(pub String);

impl fmt::Display for ParseInjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseInjectError {}

impl Inject {
    /// Parses `corrupt-block`, `corrupt-block:N`, `refuse-alloc` or `refuse-alloc:N` (N ≥ 1).
    pub fn parse(s: &str) -> Result<Inject, ParseInjectError> {
        let expected = "expected corrupt-block, corrupt-block:N, refuse-alloc or refuse-alloc:N \
                        with N a whole number from 1";
        let (name, nth) = match s.split_once(':') {
            None => (s, None),
            Some((name, n)) => match n.parse::<u64>() {
                Ok(n) if n >= 1 => (name, Some(n)),
                _ => {
                    return Err(ParseInjectError(format!(
                        "fault injection `{s}`: `{n}` is not a count from 1; {expected}"
                    )))
                }
            },
        };
        match name {
            "corrupt-block" => Ok(Inject::CorruptBlock { nth }),
            "refuse-alloc" => Ok(Inject::RefuseAlloc { nth }),
            _ => Err(ParseInjectError(format!(
                "unknown fault injection `{s}`: {expected}"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Inject::CorruptBlock { .. } => "corrupt-block",
            Inject::RefuseAlloc { .. } => "refuse-alloc",
        }
    }

    fn nth(self) -> Option<u64> {
        match self {
            Inject::CorruptBlock { nth } | Inject::RefuseAlloc { nth } => nth,
        }
    }
}

impl FromStr for Inject {
    type Err = ParseInjectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Inject::parse(s)
    }
}

impl fmt::Display for Inject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.nth() {
            Some(n) => write!(f, "{}:{n}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// A block whose bytes were not what they should be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Number of decisions carried out before the check (the failing decision's index when a
    /// `Free` or `Move` found it).
    pub decision: u64,
    /// Which check: `free`, `move-from`, `move-to` or `checkpoint`.
    pub check: String,
    pub id: u64,
    pub segment: u32,
    /// The block's offset in its segment.
    pub offset: u64,
    pub bytes: u64,
    pub mismatched_bytes: u64,
    /// Offset of the first wrong byte within the block.
    pub first_mismatch: Option<u64>,
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
    resident_start: Option<u64>,
    resident_peak: Option<u64>,
    resident_gap_max: Option<u64>,
    checkpoints: u64,
    checkpoint_ns: u64,
    timings: [(u64, u64); Decision::KIND_NAMES.len()],
}

/// Resolved fault injections.
#[derive(Clone, Debug)]
struct Faults {
    rng: ChaCha8Rng,
    corrupt: BTreeSet<u64>,
    refuse: BTreeSet<u64>,
    places: u64,
    allocs: u64,
    plan: Vec<String>,
}

impl Faults {
    fn new(faults: &[Inject], seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut corrupt = BTreeSet::new();
        let mut refuse = BTreeSet::new();
        let mut plan = Vec::new();
        for &f in faults {
            let n = f.nth().unwrap_or_else(|| rng.gen_range(1..=INJECT_WINDOW));
            match f {
                Inject::CorruptBlock { .. } => corrupt.insert(n),
                Inject::RefuseAlloc { .. } => refuse.insert(n),
            };
            plan.push(format!("{}:{n}", f.name()));
        }
        Faults {
            rng,
            corrupt,
            refuse,
            places: 0,
            allocs: 0,
            plan,
        }
    }
}

/// Carries out decisions on a [`Device`]; see the module documentation.
pub struct DeviceExecutor<D: Device> {
    books: Books,
    digest: Digest,
    device: D,
    bases: BTreeMap<SegmentId, Base>,
    /// Live blocks by place: (segment, offset, id) → bytes.
    placed: BTreeMap<(SegmentId, u64, AllocId), u64>,
    /// KV blocks written: (segment, offset) → (bytes, content), re-checked at checkpoints.
    kv_written: BTreeMap<(SegmentId, u64), (u64, u64)>,
    faults: Faults,
    stats: Stats,
}

impl<D: Device> DeviceExecutor<D> {
    /// An executor over `device` with `capacity_bytes` of books, injecting `faults`; `seed`
    /// chooses the injections given without `:N` and the corrupted byte.
    pub fn new(device: D, capacity_bytes: u64, faults: &[Inject], seed: u64) -> Self {
        let mut ex = DeviceExecutor {
            books: Books::new(capacity_bytes),
            digest: Digest::new(),
            device,
            bases: BTreeMap::new(),
            placed: BTreeMap::new(),
            kv_written: BTreeMap::new(),
            faults: Faults::new(faults, seed),
            stats: Stats::default(),
        };
        let start = ex.device.resident_bytes();
        ex.stats.resident_start = start;
        ex.stats.resident_peak = start;
        ex
    }

    pub fn books(&self) -> &Books {
        &self.books
    }

    pub fn digest_hex(&self) -> String {
        self.digest.hex()
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
        let live: Vec<(AllocId, Loc, u64)> = self.books.live().collect();
        let mut found = 0;
        for (id, at, bytes) in live {
            found += self.check_block(id, at, bytes, "checkpoint");
        }
        let kv: Vec<((SegmentId, u64), (u64, u64))> =
            self.kv_written.iter().map(|(&k, &v)| (k, v)).collect();
        for ((segment, offset), (bytes, content)) in kv {
            let at = Loc { segment, offset };
            found += self.check_block(AllocId(content), at, bytes, "checkpoint-kv");
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
            digest: self.digest.hex(),
            decisions: s.decisions,
            bytes_written: s.bytes_written,
            bytes_copied: s.bytes_copied,
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
            injections: self.faults.plan.clone(),
            reserved_bytes_peak: self.books.reserved_bytes_peak,
            allocated_bytes_peak: self.books.allocated_bytes_peak,
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
                    segment: at.segment.0,
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
        if let Err(r) = self.books.admits(d) {
            self.stats.capacity_refusals += 1;
            return Err(r);
        }
        self.faults.allocs += 1;
        if self.faults.refuse.contains(&self.faults.allocs) {
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
            self.stats.device_errors.push(format!("{d:?}: {e}"));
        }
        Refusal::Device
    }

    fn books_apply(&mut self, d: Decision) {
        if let Err(r) = self.books.apply(d) {
            panic!("books refused {d:?} ({r:?}) after admitting it");
        }
    }

    fn carry_out(&mut self, d: Decision) -> Result<(), Refusal> {
        match d {
            Decision::Reserve { segment, bytes } => {
                assert!(!self.bases.contains_key(&segment), "{segment:?} reused");
                self.admit(&d)?;
                let base = self
                    .device
                    .reserve(bytes)
                    .map_err(|e| self.refused(&d, e))?;
                self.books_apply(d);
                let is_virtual = false;
                self.bases.insert(segment, Base { base, is_virtual });
            }
            Decision::ReserveVa { segment, bytes } => {
                assert!(!self.bases.contains_key(&segment), "{segment:?} reused");
                self.books_apply(d);
                let base = self
                    .device
                    .reserve_va(bytes)
                    .unwrap_or_else(|e| self.fail(&d, e));
                let is_virtual = true;
                self.bases.insert(segment, Base { base, is_virtual });
            }
            Decision::Release { segment } | Decision::ReleaseVa { segment } => {
                self.books_apply(d);
                self.assert_no_live_block(&d, segment, None);
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
                self.kv_written
                    .insert((at.segment, at.offset), (bytes, content));
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
        }
        Ok(())
    }

    /// Fault injection: flips one byte of the N-th block written (placed, or a KV block).
    fn maybe_corrupt(&mut self, d: &Decision, base: u64, offset: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.faults.places += 1;
        if self.faults.corrupt.contains(&self.faults.places) {
            let byte = self.faults.rng.gen_range(0..bytes);
            self.device
                .corrupt(base, offset + byte)
                .unwrap_or_else(|e| self.fail(d, e));
            self.stats.injected_corruptions += 1;
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
            let gap = grown.abs_diff(self.books.reserved_bytes);
            s.resident_gap_max = Some(s.resident_gap_max.map_or(gap, |g| g.max(gap)));
        }
    }
}

impl<D: Device> Memory for DeviceExecutor<D> {
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
        self.digest.decision(&d, outcome);
        if matches!(
            d,
            Decision::Reserve { .. } | Decision::ReserveVa { .. } | Decision::Map { .. }
        ) {
            self.sample_resident();
        }
        outcome
    }
}

impl<D: Device> gpumem_sim::Executor for DeviceExecutor<D> {
    fn books(&self) -> &Books {
        DeviceExecutor::books(self)
    }

    fn digest_hex(&self) -> String {
        DeviceExecutor::digest_hex(self)
    }

    fn checkpoint(&mut self) {
        DeviceExecutor::checkpoint(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_parses_the_cli_forms_and_round_trips() {
        let cases = [
            ("corrupt-block", Inject::CorruptBlock { nth: None }),
            ("corrupt-block:3", Inject::CorruptBlock { nth: Some(3) }),
            ("refuse-alloc", Inject::RefuseAlloc { nth: None }),
            ("refuse-alloc:1", Inject::RefuseAlloc { nth: Some(1) }),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Inject>(), Ok(want));
            assert_eq!(want.to_string(), text);
        }
        for bad in [
            "",
            "corrupt",
            "corrupt-block:",
            "corrupt-block:0",
            "corrupt-block:-1",
            "refuse-alloc:x",
            "refuse-alloc:1:2",
            "Refuse-Alloc",
        ] {
            let err = Inject::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("refuse-alloc:N"), "{err}");
        }
    }

    #[test]
    fn injections_without_n_are_drawn_from_the_seed() {
        let faults = [
            Inject::CorruptBlock { nth: None },
            Inject::RefuseAlloc { nth: None },
            Inject::RefuseAlloc { nth: Some(99) },
        ];
        let a = Faults::new(&faults, 7);
        let b = Faults::new(&faults, 7);
        assert_eq!(a.plan, b.plan);
        assert_eq!(a.plan[2], "refuse-alloc:99");
        for n in a.corrupt.iter().chain(&a.refuse).filter(|&&n| n != 99) {
            assert!((1..=INJECT_WINDOW).contains(n));
        }
        let differ = (0..20).any(|s| Faults::new(&faults, s).plan != a.plan);
        assert!(differ, "the seed chooses");
    }
}
