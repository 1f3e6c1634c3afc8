//! The address space of the arena strategies: one virtual range of the configured capacity,
//! mapped page by page from offset 0 as the strategy's top grows, trimmed on `empty_cache`.

use serde::{Deserialize, Serialize};

use super::{align_up, AllocConfig};
use crate::decision::{Decision, Loc, Refusal, SegmentId};
use crate::memory::Memory;

pub const ARENA_SEGMENT: SegmentId = SegmentId(0);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arena {
    /// Length of the virtual range: the capacity, rounded down to whole pages.
    pub range_bytes: u64,
    pub page_bytes: u64,
    /// `[0, mapped_bytes)` is backed by memory; always a multiple of `page_bytes`.
    pub mapped_bytes: u64,
    va_reserved: bool,
}

impl Arena {
    pub fn new(config: &AllocConfig) -> Self {
        let range_bytes = config.capacity_bytes & !(config.page_bytes - 1);
        assert!(range_bytes > 0, "capacity below one page");
        Arena {
            range_bytes,
            page_bytes: config.page_bytes,
            mapped_bytes: 0,
            va_reserved: false,
        }
    }

    pub fn loc(offset: u64) -> Loc {
        Loc {
            segment: ARENA_SEGMENT,
            offset,
        }
    }

    /// Makes `[0, end)` mapped. On refusal nothing is mapped.
    pub fn ensure_mapped(&mut self, end: u64, mem: &mut dyn Memory) -> Result<(), Refusal> {
        if end <= self.mapped_bytes {
            return Ok(());
        }
        if end > self.range_bytes {
            return Err(Refusal::Capacity);
        }
        if !self.va_reserved {
            let reserve = Decision::ReserveVa {
                segment: ARENA_SEGMENT,
                bytes: self.range_bytes,
            };
            mem.apply(reserve)
                .expect("reserving address space is never refused");
            self.va_reserved = true;
        }
        let new_end = align_up(end, self.page_bytes).expect("end below range");
        mem.apply(Decision::Map {
            segment: ARENA_SEGMENT,
            offset: self.mapped_bytes,
            bytes: new_end - self.mapped_bytes,
        })?;
        self.mapped_bytes = new_end;
        Ok(())
    }

    /// Unmaps every whole page at or above `top` (the end of the highest live block).
    pub fn trim(&mut self, top: u64, mem: &mut dyn Memory) {
        let keep = align_up(top, self.page_bytes).expect("top below range");
        if keep < self.mapped_bytes {
            mem.apply(Decision::Unmap {
                segment: ARENA_SEGMENT,
                offset: keep,
                bytes: self.mapped_bytes - keep,
            })
            .expect("unmap is never refused");
            self.mapped_bytes = keep;
        }
    }

    /// The mapped part of the free extent `[start, start + len)`.
    pub fn mapped_part(&self, start: u64, len: u64) -> u64 {
        (start + len).min(self.mapped_bytes).saturating_sub(start)
    }
}
