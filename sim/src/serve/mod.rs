//! The serving simulator: engine personalities that schedule requests over the paged KV cache
//! of `gpumem_core::kv`, a cost model, and the conformance step log.
//!
//! Personality `vllm-0.33` ([`vllm::VllmEngine`]) reproduces vLLM 0.33.0's synchronous
//! scheduler; with the `fixed:STEP_US` cost model it writes exactly the step log of
//! `../shared/conformance/README.md`. [`report::simulate`] runs a workload through it and
//! measures what `gpumem kv` reports; [`profile`] sizes the KV pool from GPU and model
//! profiles; [`cost`] holds the cost models.

pub mod cost;
pub mod profile;
pub mod report;
pub mod vllm;
pub mod workload;

use std::fmt::{self, Write as _};
use std::path::Path;

pub use cost::{CostModel, Roofline, StepWork};
pub use gpumem_traces::TraceError;
pub use profile::{kv_sizing, GpuProfile, KvSizing, ModelProfile};
pub use report::{simulate, KvReport, Percentiles, RunInfo, TimelinePoint};
pub use vllm::{EngineConfig, RequestOutcome, RunSummary, SchedulingPolicy, VllmEngine};
pub use workload::{ConformanceConfig, Prompt, Workload, WorkloadRequest};

/// The KV block eviction policy of a run (`--eviction`): `lru` (vLLM's), `arc`, `leaf-lru`.
pub use gpumem_core::kv::eviction::EvictionKind;

/// Why a run did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeError {
    /// Bad workload or config (vLLM would refuse it); nothing was simulated.
    Input(String),
    /// Nothing can be scheduled yet requests remain (vLLM would wait forever).
    Stall(String),
    /// Writing the step log failed.
    Io(String),
    /// An internal invariant broke (a gpumem bug).
    Internal(String),
}

impl ServeError {
    /// The oracle's exit codes: 2 bad input, 3 stall; 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Input(_) => 2,
            ServeError::Stall(_) => 3,
            ServeError::Io(_) | ServeError::Internal(_) => 1,
        }
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Input(m) => write!(f, "{m}"),
            ServeError::Stall(m) => write!(f, "stalled: {m}"),
            ServeError::Io(m) => write!(f, "i/o: {m}"),
            ServeError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<TraceError> for ServeError {
    fn from(e: TraceError) -> Self {
        ServeError::Input(e.to_string())
    }
}

/// One engine step, by request index into the workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepRecord {
    pub step: u64,
    /// (request, tokens) in the order the scheduler scheduled them.
    pub scheduled: Vec<(usize, u64)>,
    /// Victims in the order they were picked.
    pub preempted: Vec<usize>,
    /// (request, prefix-cache hit tokens) for each admission.
    pub admitted: Vec<(usize, u64)>,
    /// Finished by this step's output, in output order.
    pub finished: Vec<usize>,
    /// Free blocks after the step's output was applied.
    pub free_blocks: u32,
    /// Hashes stored / removed during the step.
    pub stored: u64,
    pub removed: u64,
    /// When the step started and ended (ns of simulated time).
    pub start_ns: u64,
    pub end_ns: u64,
    /// Requests running and waiting after the step.
    pub running: u64,
    pub waiting: u64,
    /// Prompt (and recomputed) tokens of the requests admitted in this step.
    pub admitted_tokens: u64,
}

impl StepRecord {
    pub fn clear(&mut self) {
        self.scheduled.clear();
        self.preempted.clear();
        self.admitted.clear();
        self.finished.clear();
        self.free_blocks = 0;
        self.stored = 0;
        self.removed = 0;
        self.start_ns = 0;
        self.end_ns = 0;
        self.running = 0;
        self.waiting = 0;
        self.admitted_tokens = 0;
    }
}

/// Writes step-log lines: compact JSON, keys in the contract's order, ids escaped as Python's
/// `json.dumps(..., ensure_ascii=False)` escapes them.
pub struct StepLogWriter {
    ids: Vec<String>,
    line: String,
}

impl StepLogWriter {
    pub fn new(workload: &Workload) -> Self {
        StepLogWriter {
            ids: workload
                .requests
                .iter()
                .map(|r| serde_json::to_string(&r.id).expect("string serializes"))
                .collect(),
            line: String::new(),
        }
    }

    /// The line for `rec`, newline included.
    pub fn line(&mut self, rec: &StepRecord) -> &str {
        let l = &mut self.line;
        l.clear();
        let ids = &self.ids;
        let _ = write!(l, "{{\"step\":{},\"scheduled\":[", rec.step);
        for (i, &(r, n)) in rec.scheduled.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(l, "{sep}[{},{n}]", ids[r]);
        }
        l.push_str("],\"preempted\":[");
        for (i, &r) in rec.preempted.iter().enumerate() {
            if i > 0 {
                l.push(',');
            }
            l.push_str(&ids[r]);
        }
        l.push_str("],\"admitted\":[");
        for (i, &(r, h)) in rec.admitted.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(l, "{sep}[{},{h}]", ids[r]);
        }
        l.push_str("],\"finished\":[");
        for (i, &r) in rec.finished.iter().enumerate() {
            if i > 0 {
                l.push(',');
            }
            l.push_str(&ids[r]);
        }
        let _ = writeln!(
            l,
            "],\"free_blocks\":{},\"stored\":{},\"removed\":{}}}",
            rec.free_blocks, rec.stored, rec.removed
        );
        l
    }
}

/// Reads a conformance workload and config, runs `vllm-0.33` over them and writes the step log
/// to `log`. Warnings about ignored fields go to `warn`.
pub fn run_conformance_files(
    workload: &Path,
    config: &Path,
    log: &mut dyn std::io::Write,
    warn: &mut dyn FnMut(&str),
) -> Result<RunSummary, ServeError> {
    let (cfg, cw) = ConformanceConfig::read_file(config)?;
    cw.iter().for_each(|w| warn(w));
    let w = Workload::read_file(workload)?;
    w.warnings.iter().for_each(|m| warn(m));
    run_conformance(&w, &cfg, log)
}

/// Runs `vllm-0.33` over a parsed workload and config, writing the step log to `log`.
pub fn run_conformance(
    w: &Workload,
    cfg: &ConformanceConfig,
    log: &mut dyn std::io::Write,
) -> Result<RunSummary, ServeError> {
    // The oracle's order: input errors in the workload, then start-up errors of the config.
    w.validate(cfg.max_model_len)?;
    let ecfg = EngineConfig::from_conformance(cfg)?;
    let mut engine = VllmEngine::new(w, ecfg)?;
    let mut writer = StepLogWriter::new(w);
    engine.run(|rec| {
        log.write_all(writer.line(rec).as_bytes())
            .map_err(|e| ServeError::Io(e.to_string()))
    })
}
