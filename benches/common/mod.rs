//! What the allocation benchmarks share.

use gpumem_core::books::Books;
use gpumem_core::decision::{Decision, Refusal};
use gpumem_core::digest::Digest;
use gpumem_core::executor::Executor;

/// Only what a strategy needs to be told: whether a reservation fits. Its books see segments
/// and mappings only (no per-allocation bookkeeping) and it keeps no digest, so that the
/// strategy's own cost shows.
pub struct CapacityOnly {
    pub books: Books,
    pub digest: Digest,
}

impl Executor for CapacityOnly {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        match d {
            Decision::Place { .. } | Decision::Free { .. } | Decision::Move { .. } => Ok(()),
            _ => self.books.apply(d),
        }
    }
    fn books(&self) -> &Books {
        &self.books
    }
    fn digest(&self) -> &Digest {
        &self.digest
    }
}
