//! Why a serving run did not complete, with the conformance oracle's exit codes.

use std::fmt;

use gpumem_traces::TraceError;

/// Why a run did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeError {
    /// Bad workload or config (vLLM would refuse it); nothing more was simulated.
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
