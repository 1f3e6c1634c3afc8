//! What every arena strategy promises alike, and what the strategies' own tests share.

use super::*;
use crate::books::Books;
use crate::decision::{AllocId, Decision, Refusal};
use crate::digest::Digest;
use crate::executor::{Executor, Ledger};

/// An executor that refuses every `Map`.
struct RefuseMaps(Ledger);

impl Executor for RefuseMaps {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        if matches!(d, Decision::Map { .. }) {
            return Err(Refusal::Injected);
        }
        self.0.apply(d)
    }
    fn books(&self) -> &Books {
        &self.0.books
    }
    fn digest(&self) -> &Digest {
        &self.0.digest
    }
}

/// A request on stream 0, not pinned.
pub(super) fn request(id: u64, bytes: u64) -> AllocRequest {
    AllocRequest {
        id: AllocId(id),
        bytes,
        stream: 0,
        pinned: false,
    }
}

#[test]
fn a_refused_map_changes_nothing() {
    let config = AllocConfig {
        capacity_bytes: 128 * MIB,
        ..AllocConfig::default()
    };
    for strategy in Strategy::ALL.into_iter().filter(|s| !s.is_caching()) {
        let mut allocator = build(strategy, &config);
        let before = serde_json::to_string(&allocator.snapshot()).unwrap();
        let mut mem = RefuseMaps(Ledger::new(Books::new(config.capacity_bytes)));
        assert!(allocator.alloc(request(0, 4096), &mut mem).is_err());
        assert!(allocator.alloc(request(1, 65 * MIB), &mut mem).is_err());
        allocator.check_invariants().unwrap();
        assert_eq!(mem.0.books.reserved_bytes(), 0, "{}", strategy.name());
        // Only the arena's address-space reservation may have happened.
        let after = serde_json::to_string(&allocator.snapshot()).unwrap();
        assert_eq!(
            before.replace("\"va_reserved\":false", "\"va_reserved\":true"),
            after,
            "{}",
            strategy.name()
        );
    }
}
