//! PLACEHOLDER: replaced by the real strategy before this lands.
use super::*;
use crate::decision::{AllocId, Loc};
use crate::defrag::Compaction;
use crate::memory::Memory;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tlsf {}

impl Tlsf {
    pub fn new(_config: &AllocConfig) -> Self {
        unimplemented!()
    }
}

impl Allocator for Tlsf {
    fn strategy(&self) -> Strategy {
        unimplemented!()
    }
    fn alloc(&mut self, _req: AllocRequest, _mem: &mut dyn Memory) -> Result<Loc, AllocError> {
        unimplemented!()
    }
    fn free(&mut self, _id: AllocId, _mem: &mut dyn Memory) {
        unimplemented!()
    }
    fn empty_cache(&mut self, _mem: &mut dyn Memory) {
        unimplemented!()
    }
    fn free_summary(&self) -> FreeSummary {
        unimplemented!()
    }
    fn live_blocks(&self) -> Vec<LiveBlock> {
        unimplemented!()
    }
    fn reserved_bytes(&self) -> u64 {
        unimplemented!()
    }
    fn layout(&self) -> Vec<SegmentLayout> {
        unimplemented!()
    }
    fn check_invariants(&self) -> Result<(), String> {
        unimplemented!()
    }
    fn snapshot(&self) -> AllocatorState {
        unimplemented!()
    }
    fn compact(&mut self, _mem: &mut dyn Memory) -> Option<Compaction> {
        unimplemented!()
    }
}
