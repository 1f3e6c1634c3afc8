//! Replays an allocation trace through one strategy against an executor ([`replay`]), or
//! through several strategies in simulation ([`simulate_all`]).
//!
//! The driver owns the mapping from trace ids to allocation ids, classifies failures, samples
//! statistics after every operation, feeds the memory-pressure monitor the reserved bytes of
//! every place the books keep after every operation and, on request, defragments when an
//! allocation fails.

use gpumem_core::alloc::caching::CachingSettings;
use gpumem_core::alloc::{
    build_with, AllocConfig, AllocError, AllocRequest, Allocator, SegmentLayout, Strategy,
};
use gpumem_core::decision::AllocId;
use gpumem_traces::{AllocOp, AllocTrace, OpKind, RecordedSegment};
use rayon::prelude::*;
use serde::Serialize;

use crate::executor::{AllocCostModel, SimExecutor};
use crate::id_map::IdMap;
use crate::monitor::{periods, Monitor, Period, PressureReport, Thresholds, WatchId};
use crate::recorded::{plan_start, PlannedStart, StartReport};
use gpumem_core::executor::Executor;
use gpumem_core::place::Place;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefragMode {
    Off,
    /// When an allocation fails, compact and retry once.
    OnFailure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayConfig {
    pub alloc: AllocConfig,
    pub defrag: DefragMode,
    /// Report progress every this many operations (≥ 1): rarely when simulating, every
    /// operation when each one fills real memory.
    pub progress_every_ops: u64,
    /// Run the strategy's full invariant walk every this many operations (0: never).
    pub check_every_ops: u64,
    /// Ask the executor to re-check every live block every this many operations (0: never).
    pub checkpoint_every_ops: u64,
    /// The memory-pressure monitor's thresholds, fractions of each place's capacity.
    pub pressure: Thresholds,
    /// Settings of the caching strategies (PyTorch's `PYTORCH_CUDA_ALLOC_CONF`).
    pub caching: CachingSettings,
}

impl ReplayConfig {
    pub fn new(alloc: AllocConfig) -> Self {
        ReplayConfig {
            alloc,
            defrag: DefragMode::Off,
            check_every_ops: 0,
            checkpoint_every_ops: 0,
            progress_every_ops: PROGRESS_EVERY_OPS,
            pressure: Thresholds::default(),
            caching: CachingSettings::default(),
        }
    }
}

/// A point of the reserved/allocated curve, for plots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub t_ns: u64,
    pub bytes_reserved: u64,
    pub bytes_allocated: u64,
}

/// How the simulated segments compare with those a snapshot recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentMatch {
    pub recorded: usize,
    pub simulated: usize,
    /// Segments whose size and block layout appear on both sides (as a multiset).
    pub identical: usize,
    pub matches: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrategyResult {
    pub strategy: &'static str,
    pub ops: u64,
    pub allocs: u64,
    pub frees: u64,
    pub empty_cache_calls: u64,
    pub bytes_requested_peak: u64,
    pub bytes_allocated_peak: u64,
    pub bytes_reserved_peak: u64,
    pub bytes_reserved_end: u64,
    /// Largest allocated − requested seen (rounding waste).
    pub rounding_waste_bytes_peak: u64,
    pub inactive_split_bytes_peak: u64,
    pub fragmentation_max: f64,
    pub fragmentation_mean: f64,
    pub fragmentation_failures: u64,
    pub ooms: u64,
    pub unknown_frees: u64,
    pub frees_of_failed_allocs: u64,
    pub defrag_runs: u64,
    pub defrag_moves: u64,
    pub bytes_moved: u64,
    pub modelled_ns: u64,
    /// Per kind of decision: how many, and their modelled time.
    pub modelled: Vec<crate::executor::KindCost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments_match: Option<SegmentMatch>,
    /// `--compare-segments`: the recording replayed event by event, compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<crate::recorded::SegmentsComparison>,
    /// A torch snapshot's replay: whether it started from the recorded state or empty, and
    /// why (`start`, `start_reason`, …; absent for other traces).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartReport>,
    pub digest: String,
    /// What the memory-pressure monitor saw: reserved bytes of each place's capacity.
    pub pressure: PressureReport,
    #[serde(skip)]
    pub timeline: Vec<Sample>,
    /// Warning and critical periods of every place, bounded (for plots; not in the JSON).
    #[serde(skip)]
    pub pressure_periods: Vec<Period>,
}

/// Bad input met while replaying: the trace is well formed but inconsistent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayError {
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ReplayError {}

/// What the id map holds for a trace id whose allocation was refused (else the allocation id);
/// not `u64::MAX`, the id map's mark of an empty slot.
const FAILED: u64 = u64::MAX - 1;

const TIMELINE_POINTS: u64 = 2000;
/// How often a simulated replay reports progress.
pub const PROGRESS_EVERY_OPS: u64 = 1 << 16;

struct Driver<'a, E: Executor> {
    alloc: Box<dyn Allocator>,
    exec: &'a mut E,
    config: ReplayConfig,
    /// Trace id → allocation id, or [`FAILED`]; the bytes each requested are in `requested`,
    /// by allocation id.
    ids: IdMap,
    /// Bytes requested, by live allocation id (ids are recycled: as large as the live set).
    requested: Vec<u64>,
    /// Ids handed to the strategy are recycled, most recently freed first: the books, the
    /// strategy and an executor index their live blocks by id, so their memory follows the
    /// live count, not the number of operations replayed.
    ids_free: Vec<AllocId>,
    next_id: u64,
    bytes_requested: u64,
    result: StrategyResult,
    frag_area: f64,
    frag_ops_sum: f64,
    last: (u64, f64),
    pressure: Monitor,
    /// The places of the books, in their order, each with its watch.
    watched: Vec<(Place, WatchId)>,
}

/// Replays `trace` through `strategy`, carrying its decisions out on `exec`.
pub fn replay<E: Executor>(
    trace: &AllocTrace,
    strategy: Strategy,
    config: &ReplayConfig,
    exec: &mut E,
    progress: &mut dyn FnMut(u64),
) -> Result<StrategyResult, ReplayError> {
    config
        .alloc
        .validate()
        .map_err(|reason| ReplayError { line: 0, reason })?;
    let mut pressure = Monitor::new(config.pressure);
    let watched = exec
        .books()
        .accounts()
        .map(|(place, account)| (place, pressure.watch(place, account.capacity_bytes)))
        .collect();
    let mut alloc = build_with(strategy, &config.alloc, &config.caching);
    let planned = plan_start(
        trace,
        alloc.as_caching_mut().map(|c| &*c),
        config.alloc.capacity_bytes,
    );
    let ops: &[AllocOp] = planned.as_ref().and_then(|p| p.ops).unwrap_or(&trace.ops);
    let mut d = Driver {
        alloc,
        exec,
        config: *config,
        ids: Default::default(),
        requested: Vec::new(),
        ids_free: Vec::new(),
        next_id: 0,
        bytes_requested: 0,
        result: empty_result(strategy),
        frag_area: 0.0,
        frag_ops_sum: 0.0,
        last: (ops.first().map_or(0, |op| op.t_ns), 0.0),
        pressure,
        watched,
    };
    if let Some(planned) = planned {
        d.start(planned)?;
    }
    let sample_every = (ops.len() as u64 / TIMELINE_POINTS).max(1);
    let progress_every = d.config.progress_every_ops.max(1);
    // Countdowns to the next timeline sample and progress report: `n` a multiple of either,
    // without two 64-bit divisions per operation.
    let (mut to_sample, mut to_progress) = (sample_every, progress_every);
    for (i, op) in ops.iter().enumerate() {
        let n = i as u64 + 1;
        d.step(&op.kind).map_err(|reason| ReplayError {
            line: op.line,
            reason,
        })?;
        to_sample -= 1;
        let sample = to_sample == 0;
        if sample {
            to_sample = sample_every;
        }
        d.observe(op.t_ns, sample);
        if d.config.check_every_ops > 0 && n.is_multiple_of(d.config.check_every_ops) {
            d.alloc
                .check_invariants()
                .and_then(|()| d.ids.check().map_err(|e| format!("trace id map: {e}")))
                .map_err(|e| ReplayError {
                    line: op.line,
                    reason: format!("internal invariant broken in {}: {e}", strategy.name()),
                })?;
        }
        if d.config.checkpoint_every_ops > 0 && n.is_multiple_of(d.config.checkpoint_every_ops) {
            d.exec.checkpoint();
        }
        to_progress -= 1;
        if to_progress == 0 {
            to_progress = progress_every;
            progress(n);
        }
    }
    progress(ops.len() as u64);
    Ok(d.finish(trace, ops))
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AllocReport {
    pub trace: String,
    pub trace_ops: u64,
    pub capacity_bytes: u64,
    pub results: Vec<StrategyResult>,
}

/// Simulates every strategy in `strategies` on `trace`. Each run is single-threaded and
/// deterministic; runs go in parallel and come back in the order given.
pub fn simulate_all(
    trace: &AllocTrace,
    strategies: &[Strategy],
    config: &ReplayConfig,
    progress: &(dyn Fn(Strategy, u64) + Sync),
) -> Result<AllocReport, ReplayError> {
    let results: Result<Vec<StrategyResult>, ReplayError> = strategies
        .par_iter()
        .map(|&s| {
            let mut exec = SimExecutor::new(config.alloc.capacity_bytes, AllocCostModel::default());
            let mut result = replay(trace, s, config, &mut exec, &mut |n| progress(s, n))?;
            result.modelled_ns = exec.modelled_ns_total();
            result.modelled = exec.costs();
            Ok(result)
        })
        .collect();
    Ok(AllocReport {
        trace: trace.name.clone(),
        trace_ops: trace.ops.len() as u64,
        capacity_bytes: config.alloc.capacity_bytes,
        results: results?,
    })
}

pub(crate) fn empty_result(strategy: Strategy) -> StrategyResult {
    StrategyResult {
        strategy: strategy.name(),
        ops: 0,
        allocs: 0,
        frees: 0,
        empty_cache_calls: 0,
        bytes_requested_peak: 0,
        bytes_allocated_peak: 0,
        bytes_reserved_peak: 0,
        bytes_reserved_end: 0,
        rounding_waste_bytes_peak: 0,
        inactive_split_bytes_peak: 0,
        fragmentation_max: 0.0,
        fragmentation_mean: 0.0,
        fragmentation_failures: 0,
        ooms: 0,
        unknown_frees: 0,
        frees_of_failed_allocs: 0,
        defrag_runs: 0,
        defrag_moves: 0,
        bytes_moved: 0,
        modelled_ns: 0,
        modelled: Vec::new(),
        segments_match: None,
        segments: None,
        start: None,
        digest: String::new(),
        pressure: Monitor::new(Thresholds::default()).report("reserved-bytes"),
        timeline: Vec::new(),
        pressure_periods: Vec::new(),
    }
}

impl<E: Executor> Driver<'_, E> {
    /// Restores a recorded start on the executor: its live blocks become the live allocations
    /// of the trace ids their addresses are (torch ids are addresses), so frees of allocations
    /// made before the recording free them.
    fn start(&mut self, planned: PlannedStart) -> Result<(), ReplayError> {
        if let Some(state) = &planned.state {
            let caching = self
                .alloc
                .as_caching_mut()
                .expect("only a caching strategy starts from a recording");
            caching.set_address_floor(planned.address_floor);
            caching
                .restore(&state.segments, self.exec)
                .map_err(|e| ReplayError {
                    line: 0,
                    reason: format!(
                        "the executor refused the recorded state (which fits the capacity): {e}"
                    ),
                })?;
            for (address, id, requested) in state.live_blocks() {
                self.ids.insert(address, id.0);
                self.set_requested(id, requested);
                self.bytes_requested += requested;
                self.next_id = self.next_id.max(id.0 + 1);
            }
            self.result.bytes_requested_peak = self.bytes_requested;
        }
        self.result.start = Some(planned.report);
        Ok(())
    }

    fn step(&mut self, op: &OpKind) -> Result<(), String> {
        self.result.ops += 1;
        match *op {
            OpKind::Alloc {
                id,
                bytes,
                stream,
                pinned,
            } => self.alloc_op(id, bytes, stream, pinned),
            OpKind::Free { id } => {
                self.free_op(id);
                Ok(())
            }
            OpKind::EmptyCache => {
                self.result.empty_cache_calls += 1;
                self.alloc.empty_cache(self.exec);
                Ok(())
            }
        }
    }

    fn alloc_op(&mut self, id: u64, bytes: u64, stream: u32, pinned: bool) -> Result<(), String> {
        let req = AllocRequest {
            id: self.take_id(),
            bytes,
            stream,
            pinned,
        };
        // One lookup of the id map per allocation: its value is written once the outcome is
        // known (a new id reads as refused until then).
        let (tracked, known) = self.ids.value_mut(id, FAILED);
        if known && *tracked != FAILED {
            return Err(format!(
                "allocation id {id} is allocated again while still live"
            ));
        }
        self.result.allocs += 1;
        let mut outcome = self.alloc.alloc(req, self.exec);
        if outcome.is_err() && self.config.defrag == DefragMode::OnFailure {
            if let Some(c) = self.alloc.compact(self.exec) {
                self.result.defrag_runs += 1;
                self.result.defrag_moves += c.moves;
                self.result.bytes_moved += c.bytes_moved;
                outcome = self.alloc.alloc(req, self.exec);
            }
        }
        match outcome {
            Ok(_) => {
                *tracked = req.id.0;
                self.set_requested(req.id, bytes);
                self.bytes_requested += bytes;
                self.result.bytes_requested_peak =
                    self.result.bytes_requested_peak.max(self.bytes_requested);
            }
            Err(AllocError::OutOfMemory { rounded_bytes }) => {
                *tracked = FAILED;
                self.ids_free.push(req.id);
                let books = self.exec.books();
                let free = books.capacity_bytes() - books.allocated_bytes;
                if free >= rounded_bytes {
                    self.result.fragmentation_failures += 1;
                } else {
                    self.result.ooms += 1;
                }
            }
        }
        Ok(())
    }

    fn set_requested(&mut self, id: AllocId, bytes: u64) {
        let i = id.0 as usize;
        if i >= self.requested.len() {
            self.requested.resize(i + 1, 0);
        }
        self.requested[i] = bytes;
    }

    fn take_id(&mut self) -> AllocId {
        self.ids_free.pop().unwrap_or_else(|| {
            self.next_id += 1;
            AllocId(self.next_id - 1)
        })
    }

    fn free_op(&mut self, id: u64) {
        match self.ids.remove(id) {
            Some(FAILED) => self.result.frees_of_failed_allocs += 1,
            Some(alloc_id) => {
                let alloc_id = AllocId(alloc_id);
                let bytes = self.requested[alloc_id.0 as usize];
                self.result.frees += 1;
                self.bytes_requested -= bytes;
                self.alloc.free(alloc_id, self.exec);
                self.ids_free.push(alloc_id);
            }
            None => self.result.unknown_frees += 1,
        }
    }

    fn observe(&mut self, t_ns: u64, sample: bool) {
        let books = self.exec.books();
        // The books' places are fixed when they are made, and `watched` was taken from them in
        // their order: walk both together rather than look each place up after every op.
        for ((place, account), &(watched, watch)) in books.accounts().zip(&self.watched) {
            debug_assert_eq!(place, watched);
            self.pressure.observe(watch, t_ns, account.reserved_bytes);
        }
        let allocated = books.allocated_bytes;
        let free = self.alloc.free_summary();
        let frag = free.external_fragmentation();
        let r = &mut self.result;
        r.rounding_waste_bytes_peak = r
            .rounding_waste_bytes_peak
            .max(allocated.saturating_sub(self.bytes_requested));
        r.inactive_split_bytes_peak = r.inactive_split_bytes_peak.max(free.inactive_split_bytes);
        r.fragmentation_max = r.fragmentation_max.max(frag);
        // Fragmentation holds from this op until the next: weight the previous value by the time
        // it lasted, and also by op count for traces whose clock does not move.
        let (t_prev, frag_prev) = self.last;
        self.frag_area += frag_prev * t_ns.saturating_sub(t_prev) as f64;
        self.frag_ops_sum += frag;
        self.last = (t_ns.max(t_prev), frag);
        if sample {
            r.timeline.push(Sample {
                t_ns,
                bytes_reserved: books.reserved_bytes(),
                bytes_allocated: allocated,
            });
        }
    }

    fn finish(mut self, trace: &AllocTrace, ops: &[AllocOp]) -> StrategyResult {
        let first_t = ops.first().map_or(0, |op| op.t_ns);
        let span = self.last.0.saturating_sub(first_t);
        let r = &mut self.result;
        r.fragmentation_mean = if span > 0 {
            self.frag_area / span as f64
        } else if r.ops > 0 {
            self.frag_ops_sum / r.ops as f64
        } else {
            0.0
        };
        let books = self.exec.books();
        r.bytes_allocated_peak = books.allocated_bytes_peak;
        r.bytes_reserved_peak = books.reserved_bytes_peak();
        r.bytes_reserved_end = books.reserved_bytes();
        // A recording is compared with the strategy that models it: plain segments with
        // `caching`, expandable ones with `caching-expandable`.
        if let Some(recorded) = &trace.recorded_segments {
            let expandable = recorded.iter().any(|s| s.expandable);
            let models = match self.alloc.strategy() {
                Strategy::Caching => !expandable,
                Strategy::CachingExpandable => expandable,
                _ => false,
            };
            if models {
                r.segments_match = Some(compare_segments(recorded, &self.alloc.layout()));
            }
        }
        r.digest = self.exec.digest().hex();
        r.pressure = self.pressure.report("reserved-bytes");
        let end_ns = self.pressure.last_ns();
        let per_place: Vec<Vec<Period>> = self
            .watched
            .iter()
            .map(|&(place, _)| periods(self.pressure.history(place), end_ns))
            .collect();
        r.pressure_periods = crate::monitor::merge_periods(&per_place);
        self.result
    }
}

/// Compares layouts as multisets of (segment bytes, block layout): addresses differ between a
/// real device and the simulator, sizes and splits must not.
pub fn compare_segments(recorded: &[RecordedSegment], simulated: &[SegmentLayout]) -> SegmentMatch {
    let mut rec: Vec<(u64, &[(u64, bool)])> = recorded
        .iter()
        .map(|s| (s.total_bytes, s.blocks.as_slice()))
        .collect();
    let mut sim: Vec<(u64, &[(u64, bool)])> = simulated
        .iter()
        .map(|s| (s.bytes, s.blocks.as_slice()))
        .collect();
    rec.sort();
    sim.sort();
    let (mut i, mut j, mut identical) = (0, 0, 0);
    while i < rec.len() && j < sim.len() {
        match rec[i].cmp(&sim[j]) {
            std::cmp::Ordering::Equal => {
                identical += 1;
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
        }
    }
    SegmentMatch {
        recorded: rec.len(),
        simulated: sim.len(),
        identical,
        matches: identical == rec.len() && identical == sim.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumem_core::alloc::{AllocConfig, GIB, KIB, MIB};
    use gpumem_core::books::Books;
    use gpumem_core::decision::{Decision, Refusal};
    use gpumem_core::digest::Digest;
    use gpumem_traces::generate::{occupancy, OccupancyParams};

    /// Remembers the largest id placed and the most blocks live at once.
    struct IdWatch {
        inner: SimExecutor,
        id_max: u64,
        live_peak: u64,
    }

    impl Executor for IdWatch {
        fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
            if let Decision::Place { id, .. } = d {
                self.id_max = self.id_max.max(id.0);
            }
            let outcome = self.inner.apply(d);
            self.live_peak = self.live_peak.max(self.inner.books().live_count);
            outcome
        }
        fn books(&self) -> &Books {
            self.inner.books()
        }
        fn digest(&self) -> &Digest {
            self.inner.digest()
        }
    }

    #[test]
    fn ids_are_recycled_so_tables_follow_the_live_set_not_the_ops() {
        let capacity = GIB;
        let trace = occupancy(&OccupancyParams {
            seed: 7,
            ops: 40_000,
            capacity_bytes: capacity,
            target_occupancy_pct: 90,
            min_bytes: 4 * KIB,
            max_bytes: 16 * MIB,
        });
        let config = ReplayConfig::new(AllocConfig {
            capacity_bytes: capacity,
            ..AllocConfig::default()
        });
        for strategy in [Strategy::Tlsf, Strategy::Caching, Strategy::BestFit] {
            let mut exec = IdWatch {
                inner: SimExecutor::new(capacity, AllocCostModel::default()),
                id_max: 0,
                live_peak: 0,
            };
            let r = replay(&trace, strategy, &config, &mut exec, &mut |_| {}).unwrap();
            assert!(
                r.allocs > 10 * exec.live_peak,
                "{}: too few ops",
                strategy.name()
            );
            assert!(
                exec.id_max < exec.live_peak,
                "{}: id {} placed with at most {} live",
                strategy.name(),
                exec.id_max,
                exec.live_peak
            );
        }
    }
}
