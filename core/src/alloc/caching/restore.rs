//! Starting from a given state (a recording's segments and blocks before its first event)
//! instead of from nothing: the segments are reserved (ranges reserved and their runs mapped),
//! the live blocks placed, the free blocks cached, all through the executor.

use serde::{Deserialize, Serialize};

use super::{Block, Caching, Live, PoolId, Segment, SizePool, State, NIL};
use crate::decision::{AllocId, Decision, Loc, SegmentId};
use crate::executor::Executor;

/// One block of a restored segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestoredBlock {
    /// Cached free memory.
    Free { bytes: u64 },
    /// Unmapped space of an expandable range.
    Unmapped { bytes: u64 },
    /// A live allocation (or one whose free is still pending).
    Live {
        bytes: u64,
        id: AllocId,
        requested_bytes: u64,
    },
}

impl RestoredBlock {
    pub fn bytes(&self) -> u64 {
        match *self {
            RestoredBlock::Free { bytes }
            | RestoredBlock::Unmapped { bytes }
            | RestoredBlock::Live { bytes, .. } => bytes,
        }
    }

    fn state(&self) -> State {
        match *self {
            RestoredBlock::Free { .. } => State::Free,
            RestoredBlock::Unmapped { .. } => State::Unmapped,
            RestoredBlock::Live { id, .. } => State::Live(id),
        }
    }
}

/// A segment (or a whole expandable range) to start from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredSegment {
    pub address: u64,
    /// Physical bytes, or the length of the virtual range.
    pub bytes: u64,
    pub stream: u32,
    pub pool: PoolId,
    pub size_pool: SizePool,
    pub expandable: bool,
    /// Blocks in address order, tiling the segment exactly.
    pub blocks: Vec<RestoredBlock>,
}

impl Caching {
    /// Starts an allocator that holds nothing from `segments`. Errors name the segment and say
    /// what is wrong (overlap, a tiling gap, an unmapped block off a page boundary, memory the
    /// executor refuses); on error the allocator and executor must be dropped.
    pub fn restore(
        &mut self,
        segments: &[RestoredSegment],
        mem: &mut dyn Executor,
    ) -> Result<(), String> {
        if !self.segments.is_empty() || self.live.iter().any(Option::is_some) {
            return Err("restore needs an allocator that holds nothing".into());
        }
        let mut order: Vec<&RestoredSegment> = segments.iter().collect();
        order.sort_by_key(|s| s.address);
        for s in order {
            self.validate_restored(s)
                .map_err(|e| format!("segment at {:#x}: {e}", s.address))?;
            self.restore_segment(s, mem)
                .map_err(|e| format!("segment at {:#x}: {e}", s.address))?;
        }
        self.check()
    }

    fn validate_restored(&self, s: &RestoredSegment) -> Result<(), String> {
        if s.bytes == 0 || s.blocks.iter().any(|b| b.bytes() == 0) {
            return Err("a segment or block of 0 bytes".into());
        }
        if self.overlaps_a_segment(s.address, s.bytes) {
            return Err("overlaps another segment".into());
        }
        let tiled = s
            .blocks
            .iter()
            .try_fold(0u64, |sum, b| sum.checked_add(b.bytes()));
        if tiled != Some(s.bytes) {
            return Err(format!("blocks cover {tiled:?} bytes, not {}", s.bytes));
        }
        let page = s.size_pool.page_bytes();
        let mut offset: u64 = 0;
        for b in &s.blocks {
            match *b {
                RestoredBlock::Unmapped { bytes } if !s.expandable => {
                    return Err(format!(
                        "an unmapped block of {bytes} bytes in a physical segment"
                    ))
                }
                RestoredBlock::Unmapped { bytes }
                    if !offset.is_multiple_of(page) || !bytes.is_multiple_of(page) =>
                {
                    return Err(format!(
                        "unmapped block at +{offset} of {bytes} bytes is not on {page}-byte pages"
                    ))
                }
                RestoredBlock::Live { id, bytes, .. } => {
                    if self.holds(id) {
                        return Err(format!("{id:?} is live twice"));
                    }
                    let min = self.min_block_bytes;
                    if !offset.is_multiple_of(min) || !bytes.is_multiple_of(min) {
                        return Err(format!(
                            "live block at +{offset} of {bytes} bytes is not aligned to {min} bytes"
                        ));
                    }
                }
                _ => {}
            }
            offset += b.bytes();
        }
        if s.expandable {
            let mapped: u64 = s
                .blocks
                .iter()
                .filter(|b| !matches!(b, RestoredBlock::Unmapped { .. }))
                .map(RestoredBlock::bytes)
                .sum();
            if !mapped.is_multiple_of(page) {
                return Err(format!(
                    "{mapped} mapped bytes are not whole {page}-byte pages"
                ));
            }
        }
        Ok(())
    }

    fn restore_segment(
        &mut self,
        s: &RestoredSegment,
        mem: &mut dyn Executor,
    ) -> Result<(), String> {
        let id = self.take_segment_id().ok_or("too many segments")?;
        let segment = SegmentId::arena(id);
        let refused =
            |what: &str| format!("{what} refused: the state needs more memory than the capacity");
        if s.expandable {
            mem.apply(Decision::ReserveVa {
                segment,
                bytes: s.bytes,
            })
            .map_err(|_| refused("reserving its address range"))?;
        } else {
            mem.apply(Decision::Reserve {
                segment,
                bytes: s.bytes,
            })
            .map_err(|_| refused("reserving it"))?;
            self.charge(s.bytes);
        }
        self.add_segment(
            id,
            Segment {
                address: s.address,
                pool_id: s.pool,
                stream: s.stream,
                pool: s.size_pool,
                bytes: s.bytes,
                expandable: s.expandable,
                first: NIL,
                mapped_bytes: if s.expandable { 0 } else { s.bytes },
                live_count: 0,
                live_bytes: 0,
            },
        );
        if s.expandable {
            self.map_restored_runs(id, s, mem)?;
        }
        self.restore_blocks(id, s, mem);
        Ok(())
    }

    /// Maps every run of mapped blocks of an expandable segment.
    fn map_restored_runs(
        &mut self,
        id: u32,
        s: &RestoredSegment,
        mem: &mut dyn Executor,
    ) -> Result<(), String> {
        let mut offset = 0u64;
        let mut run_start: Option<u64> = None;
        for b in s
            .blocks
            .iter()
            .chain(std::iter::once(&RestoredBlock::Unmapped { bytes: 0 }))
        {
            match (b, run_start) {
                (RestoredBlock::Unmapped { .. }, Some(start)) => {
                    let bytes = offset - start;
                    mem.apply(Decision::Map {
                        segment: SegmentId::arena(id),
                        offset: start,
                        bytes,
                    })
                    .map_err(|_| format!("mapping {bytes} bytes at +{start} refused: the state needs more memory than the capacity"))?;
                    self.charge(bytes);
                    self.seg_mut(id).mapped_bytes += bytes;
                    run_start = None;
                }
                (RestoredBlock::Unmapped { .. }, None) => {}
                (_, None) => run_start = Some(offset),
                (_, Some(_)) => {}
            }
            offset += b.bytes();
        }
        Ok(())
    }

    /// Builds the block list (adjacent free blocks of the same mapped state merged), indexes the
    /// free ones and places the live ones.
    fn restore_blocks(&mut self, id: u32, s: &RestoredSegment, mem: &mut dyn Executor) {
        let mut prev = NIL;
        let mut offset = 0u64;
        let mut live = Vec::new();
        for b in &s.blocks {
            let state = b.state();
            if prev != NIL && state.is_free_space() && self.b(prev).state == state {
                self.bm(prev).size += b.bytes();
                offset += b.bytes();
                continue;
            }
            let i = self.new_block(Block {
                segment: id,
                pool_id: s.pool,
                stream: s.stream,
                pool: s.size_pool,
                offset,
                size: b.bytes(),
                prev: NIL,
                next: NIL,
                state,
                gc_base: 0,
            });
            self.link(id, prev, i);
            if let RestoredBlock::Live {
                id,
                requested_bytes,
                ..
            } = *b
            {
                live.push((i, id, requested_bytes));
            }
            prev = i;
            offset += b.bytes();
        }
        let mut i = self.seg(id).first;
        while i != NIL {
            match self.b(i).state {
                State::Free => self.insert_free(i),
                State::Unmapped => self.insert_unmapped(i),
                _ => {}
            }
            i = self.b(i).next;
        }
        for (i, aid, requested_bytes) in live {
            self.place_restored(i, aid, requested_bytes, mem);
        }
    }

    fn place_restored(
        &mut self,
        i: u32,
        id: AllocId,
        requested_bytes: u64,
        mem: &mut dyn Executor,
    ) {
        let b = *self.b(i);
        let slot = id.0 as usize;
        if slot >= self.live.len() {
            self.live.resize(slot + 1, None);
        }
        self.live[slot] = Some(Live {
            block: i,
            requested_bytes,
            pinned: false,
            pending: false,
        });
        self.allocated_bytes += b.size;
        self.change_live(b.segment, b.size, true);
        let at = Loc {
            segment: SegmentId::arena(b.segment),
            offset: b.offset,
        };
        mem.apply(Decision::Place {
            id,
            at,
            bytes: b.size,
        })
        .expect("place is never refused");
    }
}
