//! The defragmentation planner: slides live, unpinned blocks of a segment towards its start, in
//! address order, so that free space gathers in one extent at the end. Pinned blocks stay where
//! they are and are never jumped over, so relative order is kept and every move goes down.

use serde::{Deserialize, Serialize};

use super::layout::LiveBlock;
use super::units::align_up;
use crate::decision::{Decision, Loc};
use crate::executor::Executor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMove {
    pub block: LiveBlock,
    pub to: Loc,
}

impl PlannedMove {
    /// Tells `mem` to carry the move out.
    pub fn apply(&self, mem: &mut dyn Executor) {
        mem.apply(Decision::Move {
            id: self.block.id,
            from: self.block.at,
            to: self.to,
            bytes: self.block.bytes,
        })
        .expect("move is never refused");
    }
}

/// What one compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compaction {
    pub moves: u64,
    pub bytes_moved: u64,
    pub largest_free_bytes_before: u64,
    pub largest_free_bytes_after: u64,
}

/// Plans the moves for one segment. `blocks` are that segment's live blocks in address order,
/// starting at `base`. Moves must be carried out in the returned order: each destination is
/// free once the moves before it are done (a destination may overlap its own source).
pub fn plan_segment(blocks: &[LiveBlock], base: u64, alignment_bytes: u64) -> Vec<PlannedMove> {
    let mut moves = Vec::new();
    let mut cursor = base;
    for (i, block) in blocks.iter().enumerate() {
        if i > 0 {
            let prev = &blocks[i - 1];
            assert_eq!(prev.at.segment, block.at.segment, "one segment at a time");
            assert!(
                prev.at.offset + prev.bytes <= block.at.offset,
                "blocks overlap or unsorted"
            );
        }
        let target = align_up(cursor, alignment_bytes).expect("offset overflow");
        if block.pinned || target >= block.at.offset {
            cursor = block.at.offset + block.bytes;
            continue;
        }
        let to = Loc {
            segment: block.at.segment,
            offset: target,
        };
        moves.push(PlannedMove { block: *block, to });
        cursor = target + block.bytes;
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{AllocId, SegmentId};

    fn block(id: u64, offset: u64, bytes: u64, pinned: bool) -> LiveBlock {
        LiveBlock {
            id: AllocId(id),
            at: Loc {
                segment: SegmentId::arena(0),
                offset,
            },
            bytes,
            requested_bytes: bytes,
            pinned,
        }
    }

    #[test]
    fn slides_down_and_keeps_pinned_blocks_in_place() {
        let blocks = [
            block(0, 512, 512, false),
            block(1, 2048, 1024, true),
            block(2, 4096, 512, false),
            block(3, 4608, 512, false),
        ];
        let moves = plan_segment(&blocks, 0, 512);
        let summary: Vec<(u64, u64)> = moves.iter().map(|m| (m.block.id.0, m.to.offset)).collect();
        // Block 0 slides to 0; pinned block 1 stays; 2 slides right after it; 3 follows 2.
        assert_eq!(summary, vec![(0, 0), (2, 3072), (3, 3584)]);
    }

    #[test]
    fn compact_layout_plans_nothing() {
        let blocks = [block(0, 0, 512, false), block(1, 512, 1024, false)];
        assert!(plan_segment(&blocks, 0, 512).is_empty());
    }
}
