//! Requests on their way into an engine: a trace read lazily (or a workload in memory),
//! checked against the engine's limits with the file and line of each refusal. What to do
//! with a prompt vLLM's input processor refuses (`max_model_len` tokens or more) is the
//! caller's choice: the conformance contract refuses the whole run, `gpumem kv` on other
//! formats rejects the request and counts it, as vLLM rejects it.

use gpumem_traces::TraceError;

use super::vllm::MAX_CLOCK_US;
use super::workload::{Workload, WorkloadRequest};
use super::ServeError;

/// What happens to a request whose prompt has `max_model_len` tokens or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooLongPrompt {
    /// The run is refused (the conformance contract, as vLLM's oracle refuses the workload).
    Refuse,
    /// The request is skipped and counted ([`Arrivals::rejected`]).
    Reject,
}

/// The requests of a trace in arrival order, checked one by one as they are taken.
pub struct Arrivals<'a> {
    requests: Box<dyn Iterator<Item = Result<WorkloadRequest, TraceError>> + 'a>,
    source: String,
    max_model_len: u64,
    too_long: TooLongPrompt,
    rejected: u64,
}

impl<'a> Arrivals<'a> {
    /// `requests` (from `source`) for an engine with `max_model_len`.
    pub fn new(
        requests: impl Iterator<Item = Result<WorkloadRequest, TraceError>> + 'a,
        source: &str,
        max_model_len: u64,
        too_long: TooLongPrompt,
    ) -> Self {
        Arrivals {
            requests: Box::new(requests),
            source: source.to_string(),
            max_model_len,
            too_long,
            rejected: 0,
        }
    }

    /// The requests of a workload in memory.
    pub fn from_workload(w: Workload, max_model_len: u64, too_long: TooLongPrompt) -> Self {
        let source = w.source.clone();
        Arrivals::new(
            w.requests.into_iter().map(Ok),
            &source,
            max_model_len,
            too_long,
        )
    }

    /// Requests skipped so far for a too-long prompt.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    fn check(&self, r: &WorkloadRequest) -> Result<(), TraceError> {
        if r.arrival_us > MAX_CLOCK_US {
            return Err(TraceError::at_line(
                &self.source,
                r.line,
                format!(
                    "arrival_us {} is beyond the simulated clock ({MAX_CLOCK_US} us)",
                    r.arrival_us
                ),
            ));
        }
        Ok(())
    }
}

impl Iterator for Arrivals<'_> {
    type Item = Result<WorkloadRequest, ServeError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let r = match self.requests.next()? {
                Ok(r) => r,
                Err(e) => return Some(Err(e.into())),
            };
            let len = r.prompt.len();
            if len >= self.max_model_len {
                match self.too_long {
                    TooLongPrompt::Reject => {
                        self.rejected += 1;
                        continue;
                    }
                    TooLongPrompt::Refuse => {
                        let e = TraceError::at_line(
                            &self.source,
                            r.line,
                            format!(
                                "prompt length {len} >= max_model_len {} (vLLM's input processor rejects it)",
                                self.max_model_len
                            ),
                        );
                        return Some(Err(e.into()));
                    }
                }
            }
            return Some(self.check(&r).map(|()| r).map_err(ServeError::from));
        }
    }
}
