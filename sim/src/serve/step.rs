//! What one engine step is given ([`Now`]) and what it did ([`StepRecord`]): the interface
//! between an engine and the driver that owns the clock.

use gpumem_core::kv::offload::OffloadStepCounts;

use super::vllm::RequestOutcome;

/// When an engine step runs: its number (the step log's `step`) and its start on the
/// simulated clock. The driver chooses both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    pub step: u64,
    pub ns: u64,
}

/// One engine step. Requests are named by their slot in the engine (valid until the next
/// step; the engine answers their ids).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepRecord {
    pub step: u64,
    /// (request, tokens) in the order the scheduler scheduled them.
    pub scheduled: Vec<(usize, u64)>,
    /// Victims in the order they were picked.
    pub preempted: Vec<usize>,
    /// (request, prefix-cache hit tokens) for each admission.
    pub admitted: Vec<(usize, u64)>,
    /// With a CPU tier: tokens each admission loads from it (in `admitted`'s order).
    pub admitted_cpu: Vec<u64>,
    /// Finished by this step's output, in output order.
    pub finished: Vec<usize>,
    /// What became of each request in `finished`, in the same order.
    pub outcomes: Vec<RequestOutcome>,
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
    /// With a CPU tier: its four step-log counters.
    pub offload: Option<OffloadStepCounts>,
    /// Transfers between the GPU and the CPU tier that completed in this step.
    pub transfers_done: u64,
}

impl StepRecord {
    pub fn clear(&mut self) {
        self.scheduled.clear();
        self.preempted.clear();
        self.admitted.clear();
        self.admitted_cpu.clear();
        self.finished.clear();
        self.outcomes.clear();
        self.free_blocks = 0;
        self.stored = 0;
        self.removed = 0;
        self.start_ns = 0;
        self.end_ns = 0;
        self.running = 0;
        self.waiting = 0;
        self.admitted_tokens = 0;
        self.offload = None;
        self.transfers_done = 0;
    }

    /// A step that scheduled or preempted something (with a CPU tier also: admitted a request,
    /// or moved chunks): one line of the step log.
    pub fn is_logged(&self) -> bool {
        !self.scheduled.is_empty()
            || !self.preempted.is_empty()
            || self
                .offload
                .is_some_and(|o| !self.admitted.is_empty() || o.any())
    }

    /// Tokens the step's admissions load from the CPU tier.
    pub fn admitted_cpu_tokens(&self) -> u64 {
        self.admitted_cpu.iter().sum()
    }

    /// Tokens scheduled in the step.
    pub fn scheduled_tokens(&self) -> u64 {
        self.scheduled.iter().map(|s| s.1).sum()
    }

    /// Prefix-cache hit tokens of the step's admissions.
    pub fn admitted_hit_tokens(&self) -> u64 {
        self.admitted.iter().map(|a| a.1).sum()
    }
}
