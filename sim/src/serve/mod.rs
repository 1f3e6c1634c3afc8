//! The serving simulator: engine personalities that schedule requests over the paged KV cache
//! of `gpumem_core::kv`, the driver that owns the clock and streams requests in, cost models,
//! what a run measures and reports, and the conformance step log.
//!
//! - [`vllm`]: personality `vllm-0.33` ([`VllmEngine`]), vLLM 0.33.0's synchronous scheduler,
//!   one function per phase of its step;
//! - [`driver`]: the clock loop ([`drive`]): requests added as the clock reaches their
//!   arrival, one engine step at a time; [`arrivals`]: a trace read lazily on its way in;
//!   [`step`]: what a step is given and what it did;
//! - [`simulate`](mod@simulate): `gpumem kv`'s run (driver + measurements + step log);
//!   [`metrics`]: latencies, the bounded time series and the memory-pressure monitor's feed;
//!   [`cudagraph`]: each step's batch padded to a CUDA-graph size; [`report`]: the report and
//!   its text;
//! - [`conformance`]: the contract's config and runner; [`step_log`]: its step log;
//! - [`profile`]: GPU and model profiles and KV sizing; [`cost`]: the cost models;
//!   [`error`]: why a run did not complete; [`workload`]: the workload types and limits.

pub mod arrivals;
pub mod conformance;
pub mod cost;
pub mod cudagraph;
pub mod driver;
pub mod error;
pub mod metrics;
pub mod profile;
pub mod report;
pub mod simulate;
pub mod step;
pub mod step_log;
pub mod vllm;
pub mod workload;

pub use arrivals::{Arrivals, TooLongPrompt};
pub use conformance::{
    run_conformance, run_conformance_files, ConformanceConfig, ConformanceOffload,
};
pub use cost::{CostModel, Roofline, StepWork};
pub use cudagraph::{CudagraphReport, GraphPadding};
pub use driver::{drive, DriveOptions, OffloadSummary, RunSummary};
pub use error::ServeError;
pub use gpumem_traces::TraceError;
pub use profile::{kv_sizing, GpuProfile, KvSizing, ModelProfile};
pub use report::{KvReport, OffloadInfo, OffloadReport, Percentiles, RunInfo, TimelinePoint};
pub use simulate::{simulate, simulate_on};
pub use step::{Now, StepRecord};
pub use step_log::StepLogWriter;
pub use vllm::{
    EngineConfig, OffloadEngineConfig, RequestOutcome, SchedulingPolicy, TransferTiming, VllmEngine,
};
pub use workload::{Prompt, RequestStream, Workload, WorkloadFormat, WorkloadRequest};

/// The KV block eviction policy of a run (`--eviction`): `lru` (vLLM's), `arc`, `leaf-lru`.
pub use gpumem_core::kv::eviction::EvictionKind;
