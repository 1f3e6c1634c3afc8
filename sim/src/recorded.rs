//! `--compare-segments`: a PyTorch recording replayed event by event through `caching`, and the
//! segment events and final segments it makes compared with the recorded ones.
//!
//! Each device's allocator is replayed on its own:
//! - **State before the first event.** When the trace has `alloc` events, the segments and live
//!   blocks at its first event are rebuilt from the final segments by undoing the events
//!   backwards (as PyTorch's MemoryViz does): an `alloc` is taken out, a `free_completed` puts
//!   its block back (pending when its `free_requested` came before the recording), a
//!   `segment_alloc` / `segment_map` takes memory out, a `segment_free` / `segment_unmap` puts it
//!   back. A block put back has its request rounded as the allocator rounds it, and keeps the
//!   space after it that the allocator would not have split off. The free blocks are the gaps.
//!   Mapped ranges of expandable segments are grouped into the virtual ranges they came from.
//!   When the trace changes nothing (a state-only snapshot), the replay starts empty and
//!   allocates every live block of the final segments, in address order, new segments at their
//!   final addresses; for a trace without `alloc` that does change something, that figure is
//!   reported beside the restored one (`final_matched_from_empty`).
//! - **Forward.** `alloc` → `malloc` on its stream (in the private pool of the segment holding
//!   its address at the end), the new segments taking the addresses of the segment events
//!   recorded just before it; `free_requested` → the block waits for its stream
//!   (`record_stream`); `free_completed` → the block returns to its pool. A run of
//!   `segment_free` / `segment_unmap` is a release: the OOM-retry release of the request it
//!   precedes when a reservation follows it in the run (or an `oom` follows), else an
//!   `empty_cache` (with `max_split_size` or expandable segments, releases and no reservation
//!   before a request may be a retry that then found room: the request's address tells). A
//!   `free_completed` after a retry's releases (or its partial map) is the retry's
//!   (`release_cached_blocks` completes pending frees) and belongs to its run. With expandable segments a request maps run by run, so the device
//!   may refuse a later run: a retry or an `oom` is also tried on a device that gives the
//!   request what the recording shows it mapped before the releases. A retry is replayed as
//!   that request with the
//!   device refusing its first reservation (two with `max_split_size` when more than oversize
//!   segments went); an `oom` is the request with every reservation refused, and the
//!   simulation must fail it too. Segment events are compared, never applied.
//! - **Comparison.** `events_matched` is the longest prefix of the recorded segment events the
//!   simulation repeats (action, address, bytes, stream); `final_matched` the recorded final
//!   segments the simulation holds too (address, bytes, stream, pool, size pool, expandable,
//!   blocks' sizes and states).
//!
//! The device's free memory is not in a snapshot: refusals are taken from the recording, never
//! modelled. Not reproduced: CUDA-graph capture boundaries (a private pool's requests are told
//! by the pool of the segment that holds their address at the end), garbage collection (it needs
//! a memory fraction, which a snapshot does not hold).

use std::collections::BTreeMap;

use gpumem_core::alloc::caching::{
    AddressHint, Caching, CachingSettings, PoolId, RestoredBlock, RestoredSegment, SegmentEvent,
    SegmentEventKind, SizePool, DEFAULT_POOL,
};
use gpumem_core::alloc::{AllocConfig, AllocRequest, Allocate};
use gpumem_core::books::Books;
use gpumem_core::decision::AllocId;
use gpumem_core::decision::{Decision, Refusal};
use gpumem_core::executor::{Executor, Ledger};
use gpumem_traces::torch::recording::{
    Action, BlockState, DeviceRecording, RecordedEvent, Recording, SnapshotSegment,
};
use gpumem_traces::{AllocOp, AllocTrace, TraceSource};
use serde::Serialize;

/// One device's comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceComparison {
    pub device: u32,
    pub events_recorded: u64,
    pub events_matched: u64,
    pub final_recorded: u64,
    pub final_matched: u64,
    pub first_divergence: Option<Divergence>,
    /// `restored` (rebuilt before the first event) or `synthesised` (a trace that changes
    /// nothing: the live blocks allocated from nothing).
    pub start: &'static str,
    /// A snapshot without `alloc` events: the final segments matched when its live blocks are
    /// allocated from nothing in address order (what its history cannot tell).
    pub final_matched_from_empty: Option<u64>,
    /// Segments (or virtual ranges) and live blocks the replay started from.
    pub restored_segments: u64,
    pub restored_blocks: u64,
    /// What the rebuilt state could not hold (inconsistent recordings); the replay went on.
    pub restore_notes: Vec<String>,
    pub allocs: u64,
    /// Allocations the simulation placed at the address the recording gives.
    pub allocs_at_recorded_address: u64,
    pub releases_replayed: u64,
    pub ooms_recorded: u64,
    pub ooms_simulated: u64,
    pub unknown_frees: u64,
}

/// Where the simulated segment events first differ from the recorded ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// 1-based index in the sequence of segment events.
    pub event: u64,
    /// The recorded event there (`None`: the recording ends), with its trace entry.
    pub recorded: Option<String>,
    /// The simulated event there (`None`: the simulation made no more).
    pub simulated: Option<String>,
    /// The trace entry whose replay made the simulated event (or would have made the recorded
    /// one): an allocation request or a release.
    pub cause: String,
}

/// Every device's comparison, and their sums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentsComparison {
    pub events_recorded: u64,
    pub events_matched: u64,
    pub final_recorded: u64,
    pub final_matched: u64,
    pub first_divergence: Option<Divergence>,
    pub devices: Vec<DeviceComparison>,
}

/// Replays every device of `recording` through `caching` with `settings` and compares.
pub fn compare(
    recording: &Recording,
    config: &AllocConfig,
    settings: &CachingSettings,
) -> SegmentsComparison {
    let devices: Vec<DeviceComparison> = recording
        .devices
        .iter()
        .map(|d| compare_device(d, config, settings))
        .collect();
    SegmentsComparison {
        events_recorded: devices.iter().map(|d| d.events_recorded).sum(),
        events_matched: devices.iter().map(|d| d.events_matched).sum(),
        final_recorded: devices.iter().map(|d| d.final_recorded).sum(),
        final_matched: devices.iter().map(|d| d.final_matched).sum(),
        first_divergence: devices.iter().find_map(|d| d.first_divergence.clone()),
        devices,
    }
}

/// A segment event with the trace entry behind it.
#[derive(Clone, Copy)]
struct Traced {
    event: SegmentEvent,
    /// 1-based trace index of the entry: the recorded event itself, or the simulated request.
    entry: u64,
}

struct Replay<'a> {
    device: &'a DeviceRecording,
    config: AllocConfig,
    caching: Caching,
    /// Restored blocks whose free was requested before the recording (`active_pending_free`).
    pending_at_start: Vec<AllocId>,
    /// Segment events taken out of the allocator before [`Replay::drain`] collects them.
    pending_events: Vec<SegmentEvent>,
    mem: Ledger,
    ids: BTreeMap<u64, AllocId>,
    next_id: u64,
    simulated: Vec<Traced>,
    out: DeviceComparison,
}

/// Whether a device's trace changes its allocator's state (else the final segments are the
/// state throughout).
fn changes_state(device: &DeviceRecording) -> bool {
    device.events.iter().any(|e| {
        matches!(
            e.action,
            Action::Alloc | Action::FreeRequested | Action::FreeCompleted | Action::Segment(_)
        )
    })
}

/// Where a replay of a torch snapshot started (JSON: flattened into the strategy's result).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StartReport {
    /// `recorded` (the state before the recording's first event) or `empty`.
    pub start: &'static str,
    /// Why an empty start: the strategy models no recording, or the recording cannot be
    /// restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_reason: Option<String>,
    /// Segments (virtual ranges of expandable segments) and live blocks restored.
    pub start_segments: u64,
    pub start_live_blocks: u64,
    /// Bytes the restored segments hold physically.
    pub start_reserved_bytes: u64,
    /// What the rebuilt state could not hold (inconsistent recordings); the replay went on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub start_notes: Vec<String>,
}

impl StartReport {
    fn empty(reason: String) -> Self {
        StartReport {
            start: "empty",
            start_reason: Some(reason),
            start_segments: 0,
            start_live_blocks: 0,
            start_reserved_bytes: 0,
            start_notes: Vec::new(),
        }
    }
}

/// How a replay of a torch snapshot starts: the report, and for a recorded start the state
/// to restore and the ops to replay from it.
pub struct PlannedStart<'t> {
    pub report: StartReport,
    pub state: Option<StartState>,
    /// The end of every address the recording names: new segments go above it.
    pub address_floor: u64,
    /// The ops to replay instead of the trace's (a state-only trace started from the state
    /// before its events replays those events).
    pub ops: Option<&'t [AllocOp]>,
}

/// Why only the caching strategies start from a recording.
pub const OTHER_STRATEGY_STARTS_EMPTY: &str =
    "only the caching strategies model the allocator whose state the snapshot recorded";

/// How a replay of `trace` starts, for an allocator `caching` (holding nothing; `None` for the
/// strategies that are not PyTorch's) with `capacity_bytes`: `None` for a trace that is no
/// torch snapshot (it starts empty, as always). `caching` and `caching-expandable` start from
/// the state before the recording's first event, rebuilt as `--compare-segments` rebuilds it,
/// when the recording's segments are of the allocator's kind (expandable or not) and the
/// state fits the capacity; every other case starts empty, with the reason.
pub fn plan_start<'t>(
    trace: &'t AllocTrace,
    caching: Option<&Caching>,
    capacity_bytes: u64,
) -> Option<PlannedStart<'t>> {
    let held = trace.recording.as_deref()?;
    let empty = |reason: String| PlannedStart {
        report: StartReport::empty(reason),
        state: None,
        address_floor: 0,
        ops: None,
    };
    let Some(caching) = caching else {
        return Some(empty(OTHER_STRATEGY_STARTS_EMPTY.into()));
    };
    let recording = match held {
        Ok(r) => r,
        Err(e) => return Some(empty(e.clone())),
    };
    let device = &recording.device;
    let ops =
        match (trace.source, recording.event_ops.as_deref()) {
            (TraceSource::TorchState, _) if !changes_state(device) => return Some(empty(
                "the snapshot records no event that changes the allocator: its live blocks are \
                 allocated from nothing, in address order"
                    .into(),
            )),
            (TraceSource::TorchState, Some(ops)) => Some(ops),
            _ => None,
        };
    let recorded_expandable = device.segments.iter().any(|s| s.expandable)
        || device.events.iter().any(|e| {
            matches!(
                e.action,
                Action::Segment(SegmentEventKind::Map | SegmentEventKind::Unmap)
            )
        });
    let expandable = caching.settings().expandable_segments;
    if recorded_expandable != expandable {
        let kind = |e: bool| if e { "expandable" } else { "not expandable" };
        return Some(empty(format!(
            "the recording's segments are {}, this replay's are {}",
            kind(recorded_expandable),
            kind(expandable)
        )));
    }
    let state = start_state(device, caching);
    // Tried on books of the capacity first: a state that does not fit starts empty, and the
    // executor never sees half of it.
    let mut trial = caching.clone();
    let mut books = Ledger::new(Books::new(capacity_bytes));
    if let Err(e) = trial.restore(&state.segments, &mut books) {
        return Some(empty(format!("the recorded state cannot be restored: {e}")));
    }
    let report = StartReport {
        start: "recorded",
        start_reason: None,
        start_segments: state.segments.len() as u64,
        start_live_blocks: state.ids.len() as u64,
        start_reserved_bytes: state.reserved_bytes(),
        start_notes: state.notes.clone(),
    };
    Some(PlannedStart {
        report,
        state: Some(state),
        address_floor: highest_address(device),
        ops,
    })
}

/// One device's replay and comparison.
pub fn compare_device(
    device: &DeviceRecording,
    config: &AllocConfig,
    settings: &CachingSettings,
) -> DeviceComparison {
    let changes_state = changes_state(device);
    let has_alloc = device.events.iter().any(|e| e.action == Action::Alloc);
    let from_empty = (!has_alloc).then(|| replay_device(device, config, settings, false));
    if !changes_state {
        if let Some(out) = from_empty {
            return out;
        }
    }
    let mut out = replay_device(device, config, settings, true);
    out.final_matched_from_empty = from_empty.map(|c| c.final_matched);
    out
}

fn replay_device(
    device: &DeviceRecording,
    config: &AllocConfig,
    settings: &CachingSettings,
    restored: bool,
) -> DeviceComparison {
    let mut caching = Caching::with_settings(config, *settings);
    caching.record_segment_events(true);
    caching.set_address_floor(highest_address(device));
    let mut r = Replay {
        device,
        config: *config,
        caching,
        pending_at_start: Vec::new(),
        pending_events: Vec::new(),
        mem: Ledger::new(Books::new(config.capacity_bytes)),
        ids: BTreeMap::new(),
        next_id: 0,
        simulated: Vec::new(),
        out: DeviceComparison {
            device: device.device,
            events_recorded: 0,
            events_matched: 0,
            final_recorded: device.segments.len() as u64,
            final_matched: 0,
            first_divergence: None,
            start: "restored",
            final_matched_from_empty: None,
            restored_segments: 0,
            restored_blocks: 0,
            restore_notes: Vec::new(),
            allocs: 0,
            allocs_at_recorded_address: 0,
            releases_replayed: 0,
            ooms_recorded: 0,
            ooms_simulated: 0,
            unknown_frees: 0,
        },
    };
    let recorded: Vec<Traced> = device
        .events
        .iter()
        .filter_map(|e| match e.action {
            Action::Segment(kind) => Some(Traced {
                event: SegmentEvent {
                    kind,
                    address: e.address,
                    bytes: e.bytes,
                    stream: e.stream,
                    pool: DEFAULT_POOL,
                },
                entry: e.index,
            }),
            _ => None,
        })
        .collect();
    if restored {
        r.restore();
        r.forward();
    } else {
        r.out.start = "synthesised";
        r.synthesise();
        // What built the state happened before the recording began: nothing to compare with.
        r.simulated.clear();
        for e in &device.events {
            r.settle(&[], Some(e));
        }
    }
    r.compare_events(&recorded);
    r.compare_final();
    r.out
}

/// Whether entry `k` is a `free_completed` that a request's retry made: PyTorch's
/// `release_cached_blocks` completes the pending frees (`synchronize_and_free_events`) after
/// `release_available_cached_blocks` released oversize blocks (or, with expandable segments,
/// after the request mapped part of what it needed) and before it releases the rest, so the
/// entry follows segment events of the request, and only segment events and such entries lie
/// between it and the request (`alloc` or `oom`). It belongs to the request's run: the retry
/// replayed completes it. `release_cached_blocks` may release nothing more after it (the
/// oversize release took every whole segment): the retry reserves at once. Such a completion
/// is never the next request's `process_events` after an `empty_cache`: a free pending
/// during an `empty_cache` completes before its releases (`synchronize_and_free_events`), and
/// one requested after it has its `free_requested` in between.
fn completed_by_a_retry(events: &[RecordedEvent], k: usize) -> bool {
    let segment_or_completion =
        |e: &&RecordedEvent| matches!(e.action, Action::Segment(_) | Action::FreeCompleted);
    events[k].action == Action::FreeCompleted
        && events[..k]
            .iter()
            .rev()
            .find(|e| e.action != Action::FreeCompleted)
            .is_some_and(|e| matches!(e.action, Action::Segment(_)))
        && events[k + 1..]
            .iter()
            .find(|e| !segment_or_completion(e))
            .is_some_and(|e| matches!(e.action, Action::Alloc | Action::Oom))
}

/// Whether entry `k` is a `free_completed` right before a request's releases (only such
/// entries between them), which reserve or fail (`alloc` or `oom` after segment events and
/// completions only). PyTorch traces it there either at the request's `process_events`, or
/// from its retry's `release_cached_blocks` when `release_available_cached_blocks` released
/// nothing; they differ (with `max_split_size`) when the block freed is oversize, and the
/// replay tries both (see [`Replay::retry_alloc`]). The entry joins the request's run.
fn completed_before_a_release(events: &[RecordedEvent], k: usize) -> bool {
    let segment_or_completion =
        |e: &&RecordedEvent| matches!(e.action, Action::Segment(_) | Action::FreeCompleted);
    events[k].action == Action::FreeCompleted
        && events[k + 1..]
            .iter()
            .find(|e| e.action != Action::FreeCompleted)
            .is_some_and(|e| matches!(e.action, Action::Segment(kind) if kind.releases()))
        && events[k + 1..]
            .iter()
            .find(|e| !segment_or_completion(e))
            .is_some_and(|e| matches!(e.action, Action::Alloc | Action::Oom))
}

/// Whether entry `k` completes a pending free (its `free_requested` is not the entry before)
/// right before a request (only such entries between them). With expandable segments it may be
/// the request's retry's: the map was refused, `release_cached_blocks` completed the pending
/// frees and unmapped nothing, and `alloc_block(retry)` found room in a free block before
/// unmapped pages without mapping. Only where the request lands tells it from the request's
/// `process_events` (see [`Replay::completed_by_the_retry`]).
fn completed_before_a_request(events: &[RecordedEvent], k: usize) -> bool {
    let e = &events[k];
    e.action == Action::FreeCompleted
        && !k.checked_sub(1).is_some_and(|p| {
            events[p].action == Action::FreeRequested && events[p].address == e.address
        })
        && events[k + 1..]
            .iter()
            .find(|e| e.action != Action::FreeCompleted)
            .is_some_and(|e| e.action == Action::Alloc)
}

/// The `free_completed` entries at the start of a run, before its first segment event.
fn leading_completions(run: &[RecordedEvent]) -> impl Iterator<Item = &RecordedEvent> {
    run.iter().take_while(|e| e.action == Action::FreeCompleted)
}

/// The device as a recording shows it during one request: it reserves or maps until the
/// reserved bytes would pass `limit` (what it gave the request before it refused), then
/// refuses; what the request's retry releases is free again.
struct Budget<'a> {
    inner: &'a mut Ledger,
    limit: u64,
    /// The first ask refused, in bytes.
    refused: Option<u64>,
}

impl Executor for Budget<'_> {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let asks = match d {
            Decision::Reserve { bytes, .. } | Decision::Map { bytes, .. } => bytes,
            _ => 0,
        };
        if asks > 0 && self.inner.books.reserved_bytes().saturating_add(asks) > self.limit {
            self.refused.get_or_insert(asks);
            self.inner.record(d, Err(Refusal::Device));
            return Err(Refusal::Device);
        }
        self.inner.apply(d)
    }

    fn books(&self) -> &Books {
        self.inner.books()
    }

    fn digest(&self) -> &gpumem_core::digest::Digest {
        self.inner.digest()
    }
}

/// What the device gave a request before it refused, as `run` shows it: the bytes reserved or
/// mapped before the first release; `None` when nothing was.
fn given_before_refusal(run: &[RecordedEvent]) -> Option<u64> {
    let given: u64 = run
        .iter()
        .take_while(|e| !matches!(e.action, Action::Segment(kind) if kind.releases()))
        .filter(|e| matches!(e.action, Action::Segment(kind) if !kind.releases()))
        .map(|e| e.bytes)
        .sum();
    (given > 0).then_some(given)
}

/// The end of every address the recording names: synthetic addresses start above it.
fn highest_address(device: &DeviceRecording) -> u64 {
    let events = device
        .events
        .iter()
        .map(|e| e.address.saturating_add(e.bytes));
    let segments = device
        .segments
        .iter()
        .map(|s| s.address.saturating_add(s.bytes));
    events.chain(segments).max().unwrap_or(0)
}

/// An address range held before the first event, with what it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    end: u64,
    stream: u32,
    pool: PoolId,
    size_pool: SizePool,
    expandable: bool,
}

/// A live block before the first event; `bytes` is `None` until inferred from its request.
#[derive(Clone, Copy, Debug)]
struct StartBlock {
    bytes: Option<u64>,
    requested_bytes: u64,
    pending: bool,
}

/// The state before a recording's first event, rebuilt from its final segments by undoing its
/// events; the live blocks have ids 0, 1, … in address order.
#[derive(Clone, Debug, Default)]
pub struct StartState {
    /// Segments (whole virtual ranges for expandable segments), for [`Caching::restore`].
    pub segments: Vec<RestoredSegment>,
    /// Every live block's address and id.
    pub ids: BTreeMap<u64, AllocId>,
    /// Live blocks whose free was requested before the recording (`active_pending_free`).
    pub pending: Vec<AllocId>,
    /// What the rebuilt state could not hold (inconsistent recordings).
    pub notes: Vec<String>,
}

impl StartState {
    /// Bytes the segments hold physically (mapped bytes of expandable ones).
    pub fn reserved_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| {
                s.blocks
                    .iter()
                    .filter(|b| !matches!(b, RestoredBlock::Unmapped { .. }))
                    .map(RestoredBlock::bytes)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Every live block: address, id and requested bytes, in address order.
    pub fn live_blocks(&self) -> Vec<(u64, AllocId, u64)> {
        let mut out = Vec::new();
        for s in &self.segments {
            let mut at = s.address;
            for b in &s.blocks {
                if let RestoredBlock::Live {
                    id,
                    requested_bytes,
                    ..
                } = *b
                {
                    out.push((at, id, requested_bytes));
                }
                at += b.bytes();
            }
        }
        out
    }
}

/// Rebuilds the state of `device`'s allocator before its first event; `caching` (holding
/// nothing, with the replay's settings) rounds the requests of blocks put back.
pub fn start_state(device: &DeviceRecording, caching: &Caching) -> StartState {
    let mut b = Rebuild {
        caching,
        ids: BTreeMap::new(),
        next_id: 0,
        pending: Vec::new(),
    };
    let mut notes = Notes::default();
    let segments = b.undo(device, &mut notes);
    StartState {
        segments,
        ids: b.ids,
        pending: b.pending,
        notes: notes.finish(),
    }
}

/// Live blocks get ids as the segments are tiled.
struct Rebuild<'a> {
    caching: &'a Caching,
    ids: BTreeMap<u64, AllocId>,
    next_id: u64,
    pending: Vec<AllocId>,
}

impl Rebuild<'_> {
    /// Undoes the trace against the final segments: the segments before its first event.
    fn undo(&mut self, device: &DeviceRecording, notes: &mut Notes) -> Vec<RestoredSegment> {
        let mut ranges: BTreeMap<u64, Range> = BTreeMap::new();
        let mut live: BTreeMap<u64, StartBlock> = BTreeMap::new();
        for s in &device.segments {
            add_range(&mut ranges, s.address, range_of(s), notes);
            for b in s.blocks.iter().filter(|b| b.live()) {
                live.insert(
                    b.address,
                    StartBlock {
                        bytes: Some(b.bytes),
                        requested_bytes: b.requested_bytes,
                        pending: b.state == BlockState::PendingFree,
                    },
                );
            }
        }
        for e in device.events.iter().rev() {
            match e.action {
                Action::Alloc => {
                    if live.remove(&e.address).is_none() {
                        notes.add(format!(
                            "event {}: alloc at {:#x} is not live at the end nor freed later",
                            e.index, e.address
                        ));
                    }
                }
                Action::FreeCompleted => {
                    live.insert(
                        e.address,
                        StartBlock {
                            bytes: None,
                            requested_bytes: e.bytes,
                            pending: true,
                        },
                    );
                }
                Action::FreeRequested => {
                    if let Some(b) = live.get_mut(&e.address) {
                        b.pending = false;
                    }
                }
                Action::Segment(kind) if kind.releases() => {
                    let expandable = kind == SegmentEventKind::Unmap;
                    let end = e.address.saturating_add(e.bytes);
                    // Unmapped pages belong with the mapped range they touch; alone, their size
                    // tells the page (20 MiB large, else 2 MiB small).
                    let before = ranges.range(..e.address).next_back().map(|(_, r)| *r);
                    let touching = before
                        .filter(|r| r.end == e.address)
                        .into_iter()
                        .chain(ranges.get(&end).copied())
                        .find(|r| r.expandable && r.stream == e.stream);
                    let size_pool = match touching {
                        Some(r) if expandable => r.size_pool,
                        _ if e.bytes == SizePool::Small.page_bytes() => SizePool::Small,
                        _ if expandable && e.bytes % SizePool::Large.page_bytes() != 0 => {
                            SizePool::Small
                        }
                        _ => SizePool::Large,
                    };
                    let range = Range {
                        end: e.address.saturating_add(e.bytes),
                        stream: e.stream,
                        pool: DEFAULT_POOL,
                        size_pool,
                        expandable,
                    };
                    add_range(&mut ranges, e.address, range, notes);
                }
                Action::Segment(_) => {
                    remove_range(&mut ranges, e.address, e.bytes, notes, e.index);
                }
                Action::Oom | Action::Other => {}
            }
        }
        self.start_segments(&ranges, &mut live, notes)
    }
}

impl Replay<'_> {
    /// Restores the state before the first event.
    fn restore(&mut self) {
        let start = start_state(self.device, &self.caching);
        let mut notes = Notes {
            kept: start.notes,
            more: 0,
        };
        self.ids = start.ids;
        self.next_id = self.ids.len() as u64;
        self.pending_at_start = start.pending;
        let segments = start.segments;
        self.out.restored_segments = segments.len() as u64;
        self.out.restored_blocks = self.ids.len() as u64;
        if let Err(e) = self.caching.restore(&segments, &mut self.mem) {
            // Start from nothing rather than not at all: the comparison still says how far
            // the replay gets.
            notes.add(format!(
                "the rebuilt state was refused ({e}); replayed from empty"
            ));
            let settings = *self.caching.settings();
            self.caching = Caching::with_settings(&self.config, settings);
            self.caching.record_segment_events(true);
            self.caching.set_address_floor(highest_address(self.device));
            self.mem = Ledger::new(Books::new(self.config.capacity_bytes));
            self.ids.clear();
            self.out.restored_segments = 0;
            self.out.restored_blocks = 0;
        } else {
            for &id in &self.pending_at_start {
                self.caching.free_requested(id);
            }
        }
        self.caching.take_segment_events();
        self.out.restore_notes = notes.finish();
    }
}

/// How a request's retry may have gone (the device's free memory is not recorded).
#[derive(Clone, Copy)]
enum Reading {
    /// The first `n` reservations refused.
    Refused(u32),
    /// An `empty_cache` before the request, which then had room.
    EmptyCache,
    /// The device gave the request this many bytes, then refused.
    Device(u64),
    /// The device had at most this many bytes for the request (all but a byte of what it
    /// refused): [`Reading::Device`] at its most.
    DeviceAtMost(u64),
}

/// At most this many notes are kept; the rest are counted.
const MAX_NOTES: usize = 8;

#[derive(Default)]
struct Notes {
    kept: Vec<String>,
    more: u64,
}

impl Notes {
    fn add(&mut self, note: String) {
        if self.kept.len() < MAX_NOTES {
            self.kept.push(note);
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.more > 0 {
            self.kept.push(format!("{} more like these", self.more));
        }
        self.kept
    }
}

fn range_of(s: &SnapshotSegment) -> Range {
    Range {
        end: s.address.saturating_add(s.bytes),
        stream: s.stream,
        pool: s.pool,
        size_pool: s.size_pool,
        expandable: s.expandable,
    }
}

/// Puts `[address, r.end)` back; mapped ranges of one expandable segment merge with their
/// neighbours.
fn add_range(ranges: &mut BTreeMap<u64, Range>, address: u64, r: Range, notes: &mut Notes) {
    let overlaps = ranges
        .range(..r.end)
        .next_back()
        .is_some_and(|(_, before)| before.end > address);
    if overlaps || r.end <= address {
        notes.add(format!(
            "memory at {address:#x}..{:#x} overlaps memory already held",
            r.end
        ));
        return;
    }
    let mut start = address;
    let mut merged = r;
    if r.expandable {
        let same = |o: &Range| {
            o.expandable && (o.stream, o.pool, o.size_pool) == (r.stream, r.pool, r.size_pool)
        };
        if let Some((&a, before)) = ranges.range(..address).next_back() {
            if before.end == address && same(before) {
                start = a;
            }
        }
        if let Some(after) = ranges.get(&r.end).copied() {
            if same(&after) {
                ranges.remove(&r.end);
                merged.end = after.end;
            }
        }
    }
    ranges.insert(start, merged);
}

/// Takes `[address, address + bytes)` out: a whole segment, or pages of a mapped range.
fn remove_range(
    ranges: &mut BTreeMap<u64, Range>,
    address: u64,
    bytes: u64,
    notes: &mut Notes,
    entry: u64,
) {
    let end = address.saturating_add(bytes);
    let holder = ranges.range(..=address).next_back().map(|(&a, r)| (a, *r));
    let holder = holder.map(|(a, r)| (a, take_misread_pages(ranges, a, r, end)));
    match holder {
        Some((a, r)) if r.end >= end && (r.expandable || (a == address && r.end == end)) => {
            ranges.remove(&a);
            if a < address {
                ranges.insert(a, Range { end: address, ..r });
            }
            if end < r.end {
                ranges.insert(end, r);
            }
        }
        _ => notes.add(format!(
            "event {entry}: {bytes} bytes at {address:#x} are not held at that point"
        )),
    }
}

/// A map out of the expandable range `r` at `a` that runs past its end into touching ranges of
/// the same stream and pool but the other size pool: pages unmapped later were read, undone,
/// as the touching range's (their size fits both pages). One map is one segment's, so those
/// ranges are the map's segment's: merged into `r` (returned with its new end) as far as they
/// reach `end`. Otherwise `r` unchanged.
fn take_misread_pages(ranges: &mut BTreeMap<u64, Range>, a: u64, r: Range, end: u64) -> Range {
    if !r.expandable || r.end >= end {
        return r;
    }
    let mut reach = r.end;
    let mut chain = Vec::new();
    while reach < end {
        match ranges.get(&reach) {
            Some(n) if n.expandable && (n.stream, n.pool) == (r.stream, r.pool) => {
                chain.push(reach);
                reach = n.end;
            }
            _ => return r,
        }
    }
    for k in chain {
        ranges.remove(&k);
    }
    let merged = Range { end: reach, ..r };
    ranges.insert(a, merged);
    merged
}

impl Rebuild<'_> {
    /// The segments to restore: every plain segment, and the mapped ranges of each expandable
    /// segment gathered into its virtual range; live blocks get allocation ids.
    fn start_segments(
        &mut self,
        ranges: &BTreeMap<u64, Range>,
        live: &mut BTreeMap<u64, StartBlock>,
        notes: &mut Notes,
    ) -> Vec<RestoredSegment> {
        let mut out = Vec::new();
        let list: Vec<(u64, Range)> = ranges.iter().map(|(&a, &r)| (a, r)).collect();
        let mut k = 0;
        while k < list.len() {
            let (base, r) = list[k];
            if !r.expandable {
                let blocks = self.tile(base, r, live, notes);
                out.push(RestoredSegment {
                    address: base,
                    bytes: r.end - base,
                    stream: r.stream,
                    pool: r.pool,
                    size_pool: r.size_pool,
                    expandable: false,
                    blocks,
                });
                k += 1;
                continue;
            }
            let page = r.size_pool.page_bytes();
            let va = self.caching.va_range_bytes(r.size_pool);
            let mut group = vec![(base, r)];
            let mut j = k + 1;
            while let Some(&(a, o)) = list.get(j) {
                let same = o.expandable
                    && (o.stream, o.pool, o.size_pool) == (r.stream, r.pool, r.size_pool);
                if !same || o.end > base.saturating_add(va) || (a - base) % page != 0 {
                    break;
                }
                group.push((a, o));
                j += 1;
            }
            let last_end = group.last().map_or(base, |g| g.1.end);
            let limit = list.get(j).map_or(u64::MAX, |g| g.0);
            let room = limit.min(base.saturating_add(va)) - base;
            let bytes = (room / page * page).max(last_end - base);
            let mut blocks = Vec::new();
            let mut cursor = base;
            for &(a, o) in &group {
                if a > cursor {
                    blocks.push(RestoredBlock::Unmapped { bytes: a - cursor });
                }
                blocks.extend(self.tile(a, o, live, notes));
                cursor = o.end;
            }
            if base + bytes > cursor {
                blocks.push(RestoredBlock::Unmapped {
                    bytes: base + bytes - cursor,
                });
            }
            out.push(RestoredSegment {
                address: base,
                bytes,
                stream: r.stream,
                pool: r.pool,
                size_pool: r.size_pool,
                expandable: true,
                blocks,
            });
            k = j;
        }
        for (&address, _) in live.iter() {
            if !self.ids.contains_key(&address) {
                notes.add(format!(
                    "the live block at {address:#x} lies in no segment held before the first event"
                ));
            }
        }
        out
    }

    /// The blocks of `[base, r.end)`: live blocks with ids, free gaps between them.
    fn tile(
        &mut self,
        base: u64,
        r: Range,
        live: &BTreeMap<u64, StartBlock>,
        notes: &mut Notes,
    ) -> Vec<RestoredBlock> {
        let inside: Vec<(u64, StartBlock)> =
            live.range(base..r.end).map(|(&a, &b)| (a, b)).collect();
        let mut blocks = Vec::new();
        let mut cursor = base;
        for (n, &(address, b)) in inside.iter().enumerate() {
            if address < cursor {
                notes.add(format!(
                    "the live block at {address:#x} overlaps the block before it"
                ));
                continue;
            }
            let space = inside.get(n + 1).map_or(r.end, |next| next.0) - address;
            let bytes = match b.bytes {
                Some(bytes) => bytes.min(space),
                None => self.block_bytes(r.size_pool, b.requested_bytes, space),
            };
            if address > cursor {
                blocks.push(RestoredBlock::Free {
                    bytes: address - cursor,
                });
            }
            let id = AllocId(self.next_id);
            self.next_id += 1;
            self.ids.insert(address, id);
            if b.pending {
                self.pending.push(id);
            }
            blocks.push(RestoredBlock::Live {
                bytes,
                id,
                requested_bytes: b.requested_bytes,
            });
            cursor = address + bytes;
        }
        if r.end > cursor {
            blocks.push(RestoredBlock::Free {
                bytes: r.end - cursor,
            });
        }
        blocks
    }

    /// The block a request of `requested` bytes got, with `space` bytes before the next block:
    /// the request rounded, plus what the allocator would not have split off.
    fn block_bytes(&self, pool: SizePool, requested: u64, space: u64) -> u64 {
        let rounded = self
            .caching
            .round_size(requested)
            .unwrap_or(space)
            .min(space);
        let remaining = space - rounded;
        if remaining > 0 && !self.caching.would_split(pool, rounded, remaining) {
            space
        } else {
            rounded
        }
    }
}

impl Replay<'_> {
    /// The private pool of the final segment holding `address` (the default pool if none).
    fn pool_at_end(&self, address: u64) -> PoolId {
        let segs = &self.device.segments;
        let at = segs.partition_point(|s| s.address <= address);
        at.checked_sub(1)
            .map(|i| &segs[i])
            .filter(|s| address < s.address.saturating_add(s.bytes))
            .map_or(DEFAULT_POOL, |s| s.pool)
    }

    /// Replays the trace forwards.
    fn forward(&mut self) {
        let events = &self.device.events;
        let expandable = self.caching.settings().expandable_segments;
        let mut run_start = 0;
        for (k, e) in events.iter().enumerate() {
            if matches!(e.action, Action::Segment(_))
                || completed_by_a_retry(events, k)
                || completed_before_a_release(events, k)
                || (expandable && completed_before_a_request(events, k))
            {
                continue;
            }
            self.settle(&events[run_start..k], Some(e));
            run_start = k + 1;
        }
        self.settle(&events[run_start..], None);
    }

    /// The run's leading `free_completed` entries completed in `caching` (a reading's copy):
    /// the request's `process_events`.
    fn complete_leading(&self, run: &[RecordedEvent], caching: &mut Caching, mem: &mut Ledger) {
        for e in leading_completions(run) {
            if let Some(&id) = self.ids.get(&e.address) {
                if caching.holds(id) {
                    caching.free(id, mem);
                }
            }
        }
    }

    /// The `free_completed` entries of a run (see [`completed_by_a_retry`]) the replay of its
    /// request did not complete itself: completed now.
    fn complete_the_rest(&mut self, owed: &[(u64, AllocId, u64)]) {
        for &(address, id, entry) in owed {
            if self.caching.holds(id) {
                if self.ids.get(&address) == Some(&id) {
                    self.ids.remove(&address);
                }
                self.caching.free(id, &mut self.mem);
                self.drain(entry);
            }
        }
    }

    /// Whether the completions `owed` right before request `e` were its retry's: completed
    /// first, the request lands elsewhere than recorded; left pending, with its first
    /// reservation refused, it lands where recorded and makes no segment event.
    fn completed_by_the_retry(&self, owed: &[(u64, AllocId, u64)], e: &RecordedEvent) -> bool {
        let pool = self.pool_at_end(e.address);
        let req = AllocRequest {
            id: AllocId(self.next_id),
            bytes: e.bytes,
            stream: e.stream,
            pinned: false,
        };
        let (mut caching, mut mem) = (self.caching.clone(), self.mem.clone());
        for &(_, id, _) in owed {
            if caching.holds(id) {
                caching.free(id, &mut mem);
            }
        }
        let plain = caching.alloc_in(req, pool, &mut mem);
        if plain.is_ok_and(|at| caching.address_of(at) == Some(e.address)) {
            return false;
        }
        let (mut caching, mut mem) = (self.caching.clone(), self.mem.clone());
        let at = caching.alloc_refused(req, pool, 1, &mut mem);
        caching.take_segment_events().is_empty()
            && at.is_ok_and(|at| caching.address_of(at) == Some(e.address))
    }

    /// The allocations the run's `free_completed` entries name, taken before its request (which
    /// may be placed at one of their addresses): (address, allocation, entry).
    fn owed(&self, run: &[RecordedEvent]) -> Vec<(u64, AllocId, u64)> {
        run.iter()
            .filter(|e| e.action == Action::FreeCompleted)
            .filter_map(|e| self.ids.get(&e.address).map(|&id| (e.address, id, e.index)))
            .collect()
    }

    /// Replays the run of segment events `run` (releases) and the entry after it.
    fn settle(&mut self, run: &[RecordedEvent], next: Option<&RecordedEvent>) {
        let releases: Vec<&RecordedEvent> = run
            .iter()
            .filter(|e| matches!(e.action, Action::Segment(kind) if kind.releases()))
            .collect();
        // A retry reserves after releasing (or fails: `oom`); releases with no reservation after
        // them and no `oom` were an `empty_cache`, whatever request follows.
        let reserves_after = run
            .iter()
            .skip_while(|e| !matches!(e.action, Action::Segment(kind) if kind.releases()))
            .any(|e| matches!(e.action, Action::Segment(kind) if !kind.releases()));
        // A retry may find room after its releases without reserving: with `max_split_size`
        // an expandable segment's free block just before the oversize pages it unmapped, with
        // expandable segments a free block (made by the frees the retry completed) before
        // unmapped pages. So with either, releases with no reservation after them are that
        // retry or an `empty_cache`, told apart by where the request landed.
        let settings = self.caching.settings();
        let released_only = !reserves_after
            && !releases.is_empty()
            && (settings.max_split_bytes.is_some() || settings.expandable_segments);
        let retry = match next {
            Some(n) if n.action == Action::Oom => true,
            Some(n) if n.action == Action::Alloc => reserves_after || released_only,
            _ => false,
        };
        let releases = if retry { releases } else { Vec::new() };
        if let (Some(first), false) = (
            run.iter()
                .find(|e| matches!(e.action, Action::Segment(kind) if kind.releases())),
            retry,
        ) {
            // No request behind the release: `empty_cache`.
            let owed = self.owed(run);
            self.complete_the_rest(&owed);
            self.caching.empty_cache(&mut self.mem);
            self.out.releases_replayed += 1;
            self.drain(first.index);
        }
        let Some(e) = next else { return };
        let owed = self.owed(run);
        match e.action {
            Action::Alloc
                if !run.is_empty() && run.iter().all(|r| r.action == Action::FreeCompleted) =>
            {
                // Completions right before the request (see `completed_before_a_request`).
                let retry = self.completed_by_the_retry(&owed, e);
                if !retry {
                    self.complete_the_rest(&owed);
                }
                self.alloc(run, e, retry);
                self.complete_the_rest(&owed);
            }
            Action::Alloc => {
                if retry {
                    self.out.releases_replayed += 1;
                }
                self.alloc(run, e, retry);
                self.complete_the_rest(&owed);
            }
            Action::Oom => {
                if !releases.is_empty() {
                    self.out.releases_replayed += 1;
                }
                self.oom(run, e, !releases.is_empty());
                self.complete_the_rest(&owed);
            }
            Action::FreeRequested => {
                if let Some(&id) = self.ids.get(&e.address) {
                    self.caching.free_requested(id);
                }
            }
            Action::FreeCompleted => match self.ids.remove(&e.address) {
                Some(id) => {
                    self.caching.free(id, &mut self.mem);
                    self.drain(e.index);
                }
                None => self.out.unknown_frees += 1,
            },
            Action::Segment(_) | Action::Other => {}
        }
    }

    /// A request whose retry released and reserved what `run` shows. How many reservations the
    /// device refused is not recorded: one (then everything is released), or with
    /// `max_split_size` one (only oversize blocks released) or two; and the releases may have been
    /// an `empty_cache` just before the request (tried first when nothing was reserved after
    /// them). The first reading whose segment events are the recorded ones and whose block is at
    /// the recorded `address` is kept, else the first whose events are, else the first.
    fn retry_alloc(
        &mut self,
        run: &[RecordedEvent],
        req: AllocRequest,
        pool: PoolId,
        address: u64,
    ) -> Result<gpumem_core::decision::Loc, gpumem_core::alloc::AllocError> {
        let reserves = run
            .iter()
            .any(|e| matches!(e.action, Action::Segment(kind) if !kind.releases()));
        let mut readings = vec![Reading::Refused(1)];
        if self.caching.settings().max_split_bytes.is_some() {
            readings.push(Reading::Refused(2));
        }
        if reserves {
            readings.push(Reading::EmptyCache);
        } else {
            readings.insert(0, Reading::EmptyCache);
        }
        // Expandable segments map a request's pages run by run: the device may have refused a
        // later run, not the first.
        if let Some(given) = given_before_refusal(run) {
            readings.push(Reading::Device(given));
        }
        let wanted: Vec<(SegmentEventKind, u64, u64)> = run
            .iter()
            .filter_map(|e| match e.action {
                Action::Segment(kind) => Some((kind, e.address, e.bytes)),
                _ => None,
            })
            .collect();
        // Completions before the releases: the request's `process_events` (tried first), or
        // its retry's.
        let pending_too = leading_completions(run).next().is_some();
        let mut tries: Vec<(Reading, bool)> = readings
            .iter()
            .map(|&r| (r, true))
            .chain(readings.iter().filter(|_| pending_too).map(|&r| (r, false)))
            .collect();
        let mut first = None;
        let mut same_events = None;
        let mut k = 0;
        while let Some(&(reading, complete_first)) = tries.get(k) {
            k += 1;
            let (mut caching, mut mem) = (self.caching.clone(), self.mem.clone());
            if complete_first {
                self.complete_leading(run, &mut caching, &mut mem);
            }
            let at = match reading {
                Reading::Refused(refusals) => caching.alloc_refused(req, pool, refusals, &mut mem),
                Reading::EmptyCache => {
                    caching.empty_cache(&mut mem);
                    caching.alloc_in(req, pool, &mut mem)
                }
                Reading::Device(given) | Reading::DeviceAtMost(given) => {
                    let limit = mem.books.reserved_bytes().saturating_add(given);
                    let mut device = Budget {
                        inner: &mut mem,
                        limit,
                        refused: None,
                    };
                    let at = caching.alloc_in(req, pool, &mut device);
                    // The device refused an ask of `r` bytes after giving `given`: it had
                    // less than `given + r` free, perhaps all but a byte of it. Tried next
                    // (the retry after the releases may need it).
                    if let (Reading::Device(_), Some(r)) = (reading, device.refused) {
                        tries.insert(
                            k,
                            (
                                Reading::DeviceAtMost(given.saturating_add(r - 1)),
                                complete_first,
                            ),
                        );
                    }
                    at
                }
            };
            let made: Vec<SegmentEvent> = caching.take_segment_events();
            let same = made.len() == wanted.len()
                && made
                    .iter()
                    .zip(&wanted)
                    .all(|(m, w)| (m.kind, m.address, m.bytes) == *w);
            let landed = at
                .as_ref()
                .is_ok_and(|&at| caching.address_of(at) == Some(address));
            let tried = (caching, mem, at, made);
            if same && landed {
                same_events = Some(tried);
                break;
            }
            if same {
                same_events.get_or_insert(tried);
            } else {
                first.get_or_insert(tried);
            }
        }
        let (caching, mem, at, made) = same_events.or(first).expect("at least one reading");
        self.caching = caching;
        self.mem = mem;
        self.pending_events = made;
        self.forget_completed();
        at
    }

    /// An `oom`: the request again, every reservation refused; the simulation must fail it
    /// too, after the same releases. An `oom` with no release before it may come from a
    /// private pool (a capture never releases the cache; the entry does not name its pool): it
    /// is replayed in a pool of its own, which releases nothing either. (A default-pool `oom`
    /// with nothing to release differs only by completing pending frees, whose
    /// `free_completed` entries come before it and are replayed already.)
    fn oom(&mut self, run: &[RecordedEvent], e: &RecordedEvent, released: bool) {
        self.out.ooms_recorded += 1;
        let (id, req) = self.request(e.bytes, e.stream);
        let pool = if released { DEFAULT_POOL } else { PoolId::MAX };
        let wanted: Vec<(SegmentEventKind, u64, u64)> = run
            .iter()
            .filter_map(|r| match r.action {
                Action::Segment(kind) => Some((kind, r.address, r.bytes)),
                _ => None,
            })
            .collect();
        // Expandable segments: the request may have mapped some runs of pages before the
        // device refused one; tried first, kept when it makes the recorded events and fails.
        // Completions before the releases: the request's `process_events` (tried first), or
        // its retry's. Failing all, every reservation refused after `process_events`.
        let given = released.then(|| given_before_refusal(run)).flatten();
        let pending_too = leading_completions(run).next().is_some();
        // The releases may also have been an `empty_cache` before the request, which then
        // released nothing more.
        let mut tries = Vec::new();
        for complete_first in [true, false] {
            if complete_first || pending_too {
                if let Some(given) = given {
                    tries.push((Some(given), complete_first, false));
                }
                tries.push((None, complete_first, false));
            }
        }
        if released {
            tries.push((None, true, true));
        }
        let mut fallback = None;
        let mut kept = None;
        for (given, complete_first, empty_cache) in tries {
            let (mut caching, mut mem) = (self.caching.clone(), self.mem.clone());
            if complete_first {
                self.complete_leading(run, &mut caching, &mut mem);
            }
            if empty_cache {
                caching.empty_cache(&mut mem);
            }
            let at = match given {
                Some(given) => {
                    let limit = mem.books.reserved_bytes().saturating_add(given);
                    let mut device = Budget {
                        inner: &mut mem,
                        limit,
                        refused: None,
                    };
                    caching.alloc_in(req, pool, &mut device)
                }
                None => caching.alloc_refused(req, pool, u32::MAX, &mut mem),
            };
            let made = caching.take_segment_events();
            let same = made.len() == wanted.len()
                && made
                    .iter()
                    .map(|m| (m.kind, m.address, m.bytes))
                    .eq(wanted.iter().copied());
            let tried = (caching, mem, at, made);
            if same && tried.2.is_err() {
                kept = Some(tried);
                break;
            }
            if given.is_none() && complete_first && !empty_cache {
                fallback = Some(tried);
            }
        }
        let (caching, mem, at, made) = kept.or(fallback).expect("every reservation refused");
        self.caching = caching;
        self.mem = mem;
        self.pending_events = made;
        match at {
            Ok(_) => self.caching.free(id, &mut self.mem),
            Err(_) => self.out.ooms_simulated += 1,
        }
        self.forget_completed();
        self.drain(e.index);
    }

    /// Frees `empty_cache` completed on the way (`synchronize_and_free_events`).
    fn forget_completed(&mut self) {
        let caching = &self.caching;
        self.ids.retain(|_, id| caching.holds(*id));
    }

    fn alloc(&mut self, run: &[RecordedEvent], e: &RecordedEvent, retry: bool) {
        let pool = self.pool_at_end(e.address);
        let hints = run
            .iter()
            .filter_map(|h| match h.action {
                Action::Segment(kind @ (SegmentEventKind::Alloc | SegmentEventKind::Map)) => {
                    Some(AddressHint {
                        kind,
                        address: h.address,
                        bytes: h.bytes,
                        stream: h.stream,
                        pool,
                    })
                }
                _ => None,
            })
            .collect();
        self.caching.set_address_hints(hints);
        // An address allocated again without a free in between: the earlier block was freed
        // where the recording does not show it; it stays live in the simulation. (Unless a
        // completion of the request's run frees it: its entry is read before the request.)
        let (id, req) = self.request(e.bytes, e.stream);
        self.out.allocs += 1;
        let at = if retry {
            self.retry_alloc(run, req, pool, e.address)
        } else {
            self.caching.alloc_in(req, pool, &mut self.mem)
        };
        match at {
            Ok(at) => {
                self.ids.insert(e.address, id);
                if self.caching.address_of(at) == Some(e.address) {
                    self.out.allocs_at_recorded_address += 1;
                }
            }
            Err(_) => {
                self.ids.remove(&e.address);
                self.out.ooms_simulated += 1;
            }
        }
        self.caching.set_address_hints(Vec::new());
        self.drain(e.index);
    }

    /// A snapshot without `alloc` events: every live block of the final segments allocated
    /// from nothing, segments and blocks in address order, new segments at their final
    /// addresses.
    fn synthesise(&mut self) {
        let hints: Vec<AddressHint> = self
            .device
            .segments
            .iter()
            .map(|s| AddressHint {
                kind: if s.expandable {
                    SegmentEventKind::Map
                } else {
                    SegmentEventKind::Alloc
                },
                address: s.address,
                bytes: s.bytes,
                stream: s.stream,
                pool: s.pool,
            })
            .collect();
        for s in &self.device.segments {
            for b in s.blocks.iter().filter(|b| b.live()) {
                self.caching.set_address_hints(hints.clone());
                let (id, req) = self.request(b.requested_bytes, s.stream);
                self.out.allocs += 1;
                match self.caching.alloc_in(req, s.pool, &mut self.mem) {
                    Ok(at) => {
                        if self.caching.address_of(at) == Some(b.address) {
                            self.out.allocs_at_recorded_address += 1;
                        }
                        if b.state == BlockState::PendingFree {
                            self.caching.free_requested(id);
                        }
                    }
                    Err(_) => self.out.ooms_simulated += 1,
                }
                self.drain(0);
            }
        }
        self.caching.set_address_hints(Vec::new());
    }

    /// Collects the segment events the simulation made for trace entry `entry`.
    /// The next allocation id, and a request of `bytes` on `stream` under it.
    fn request(&mut self, bytes: u64, stream: u32) -> (AllocId, AllocRequest) {
        let id = AllocId(self.next_id);
        self.next_id += 1;
        let req = AllocRequest {
            id,
            bytes,
            stream,
            pinned: false,
        };
        (id, req)
    }

    fn drain(&mut self, entry: u64) {
        let mut made = std::mem::take(&mut self.pending_events);
        made.extend(self.caching.take_segment_events());
        self.simulated
            .extend(made.into_iter().map(|event| Traced { event, entry }));
    }

    fn compare_events(&mut self, recorded: &[Traced]) {
        let same = |a: &SegmentEvent, b: &SegmentEvent| {
            (a.kind, a.address, a.bytes, a.stream) == (b.kind, b.address, b.bytes, b.stream)
        };
        let matched = recorded
            .iter()
            .zip(&self.simulated)
            .take_while(|(r, s)| same(&r.event, &s.event))
            .count();
        self.out.events_recorded = recorded.len() as u64;
        self.out.events_matched = matched as u64;
        let (r, s) = (recorded.get(matched), self.simulated.get(matched));
        if r.is_none() && s.is_none() {
            return;
        }
        // The simulated event's request made it; failing that, the request the recorded event
        // came before.
        let cause_entry = match (s, r) {
            (Some(s), _) => s.entry,
            (None, Some(r)) => self
                .device
                .events
                .iter()
                .skip(r.entry as usize)
                .find(|e| !matches!(e.action, Action::Segment(_)))
                .map_or(r.entry, |e| e.index),
            (None, None) => 0,
        };
        self.out.first_divergence = Some(Divergence {
            event: matched as u64 + 1,
            recorded: r.map(|r| format!("{} (trace event {})", describe(&r.event), r.entry)),
            simulated: s.map(|s| describe(&s.event)),
            cause: self.describe_entry(cause_entry),
        });
    }

    fn describe_entry(&self, entry: u64) -> String {
        let Some(e) = entry
            .checked_sub(1)
            .and_then(|i| self.device.events.get(i as usize))
        else {
            return "the allocation of a live block (state-only snapshot)".into();
        };
        match e.action {
            Action::Alloc => format!(
                "event {}: alloc of {} bytes on stream {} (recorded at {:#x})",
                e.index, e.bytes, e.stream, e.address
            ),
            Action::FreeCompleted => {
                format!("event {}: free_completed at {:#x}", e.index, e.address)
            }
            Action::Oom => format!(
                "event {}: oom of {} bytes on stream {}",
                e.index, e.bytes, e.stream
            ),
            Action::Segment(kind) => format!(
                "event {}: {} run, replayed as empty_cache",
                e.index,
                kind.action()
            ),
            _ => format!("event {}", e.index),
        }
    }

    fn compare_final(&mut self) {
        type Key = (u64, u64, u32, PoolId, SizePool, bool, Vec<(u64, bool)>);
        let mut recorded: Vec<Key> = self
            .device
            .segments
            .iter()
            .map(|s| {
                let blocks = s.blocks.iter().map(|b| (b.bytes, b.live())).collect();
                (
                    s.address,
                    s.bytes,
                    s.stream,
                    s.pool,
                    s.size_pool,
                    s.expandable,
                    blocks,
                )
            })
            .collect();
        let mut simulated: Vec<Key> = self
            .caching
            .recorded_layout()
            .into_iter()
            .map(|s| {
                (
                    s.address,
                    s.bytes,
                    s.stream,
                    s.pool,
                    s.size_pool,
                    s.expandable,
                    s.blocks,
                )
            })
            .collect();
        recorded.sort();
        simulated.sort();

        let (mut i, mut j, mut matched) = (0, 0, 0u64);
        while i < recorded.len() && j < simulated.len() {
            match recorded[i].cmp(&simulated[j]) {
                std::cmp::Ordering::Equal => {
                    matched += 1;
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
            }
        }
        self.out.final_matched = matched;
    }
}

fn describe(e: &SegmentEvent) -> String {
    format!(
        "{} {} bytes at {:#x} on stream {}",
        e.kind.action(),
        e.bytes,
        e.address,
        e.stream
    )
}
