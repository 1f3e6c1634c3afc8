//! Defragmentation inside segments: gpumem's own, PyTorch has none. Each mapped run (a
//! physical segment, or a contiguous mapped range of an expandable one) is planned on its own
//! with [`plan_segment`]: live blocks slide down, pinned ones stay, and the run's block list is
//! rebuilt with the free gaps coalesced. Nothing crosses a segment or an unmapped page.

use super::{Block, Caching, SizePool, State, NIL};
use crate::alloc::defrag::{plan_segment, Compaction};
use crate::alloc::layout::LiveBlock;
use crate::executor::Executor;

/// A maximal sequence of mapped blocks of one segment.
pub(super) struct Run {
    /// The unmapped block before the run, or `NIL`.
    pub prev: u32,
    /// The unmapped block after the run, or `NIL`.
    pub next: u32,
    pub start: u64,
    pub end: u64,
    /// The run's blocks in address order.
    pub blocks: Vec<u32>,
}

impl Caching {
    /// The mapped runs of segment `id`, in address order.
    pub(super) fn mapped_runs(&self, id: u32) -> Vec<Run> {
        let mut runs = Vec::new();
        let mut current: Option<Run> = None;
        let mut prev = NIL;
        let mut i = self.seg(id).first;
        while i != NIL {
            let b = self.b(i);
            if b.state == State::Unmapped {
                if let Some(mut run) = current.take() {
                    run.next = i;
                    runs.push(run);
                }
            } else {
                let run = current.get_or_insert_with(|| Run {
                    prev,
                    next: NIL,
                    start: b.offset,
                    end: b.offset,
                    blocks: Vec::new(),
                });
                run.end = b.offset + b.size;
                run.blocks.push(i);
            }
            prev = i;
            i = b.next;
        }
        runs.extend(current);
        runs
    }

    pub(super) fn largest_free_overall(&self) -> u64 {
        let small = self.largest_free_bytes(SizePool::Small);
        small.max(self.largest_free_bytes(SizePool::Large))
    }

    pub(super) fn compact_segments(&mut self, mem: &mut dyn Executor) -> Compaction {
        let mut done = Compaction {
            largest_free_bytes_before: self.largest_free_overall(),
            ..Compaction::default()
        };
        let ids: Vec<u32> = self.segments.keys().copied().collect();
        for id in ids {
            for run in self.mapped_runs(id) {
                let live: Vec<LiveBlock> = run
                    .blocks
                    .iter()
                    .filter_map(|&i| match self.b(i).state {
                        State::Live(aid) => Some(self.live_block(aid, self.live_entry(aid))),
                        _ => None,
                    })
                    .collect();
                let plan = plan_segment(&live, run.start, self.min_block_bytes);
                if plan.is_empty() {
                    continue;
                }
                for m in &plan {
                    let i = self.live_entry(m.block.id).block;
                    self.bm(i).offset = m.to.offset;
                    done.moves += 1;
                    done.bytes_moved += m.block.bytes;
                    m.apply(mem);
                }
                self.rebuild_run(id, &run);
            }
        }
        done.largest_free_bytes_after = self.largest_free_overall();
        done
    }

    /// Rebuilds `run`'s list from its live blocks (at their new offsets, in the same order) and
    /// the free gaps between them.
    fn rebuild_run(&mut self, segment: u32, run: &Run) {
        let template = *self.b(run.blocks[0]);
        let live: Vec<u32> = run
            .blocks
            .iter()
            .copied()
            .filter(|&i| matches!(self.b(i).state, State::Live(_)))
            .collect();
        for &i in &run.blocks {
            if self.b(i).state == State::Free {
                self.remove_free(i);
                self.drop_block(i);
            }
        }
        let mut sequence = Vec::with_capacity(2 * live.len() + 1);
        let mut gaps = Vec::new();
        let mut cursor = run.start;
        let mut gap = |this: &mut Caching, offset: u64, end: u64, sequence: &mut Vec<u32>| {
            if end > offset {
                let i = this.new_block(Block {
                    offset,
                    size: end - offset,
                    prev: NIL,
                    next: NIL,
                    state: State::Free,
                    ..template
                });
                sequence.push(i);
                gaps.push(i);
            }
        };
        for &i in &live {
            let b = *self.b(i);
            gap(self, cursor, b.offset, &mut sequence);
            sequence.push(i);
            cursor = b.offset + b.size;
        }
        gap(self, cursor, run.end, &mut sequence);
        let mut prev = run.prev;
        for &i in &sequence {
            self.link(segment, prev, i);
            prev = i;
        }
        self.link(segment, prev, run.next);
        for i in gaps {
            self.insert_free(i);
        }
    }
}
