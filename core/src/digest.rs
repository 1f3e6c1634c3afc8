//! A deterministic 128-bit digest of a decision stream and its outcomes.
//!
//! Not cryptographic: it names a run, so that two executors (or two runs) that saw the same
//! stream print the same hex. Two independent 64-bit lanes keep accidental collisions far away.

use crate::decision::{Decision, Loc, Refusal};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    lane_a: u64,
    lane_b: u64,
    words: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    pub fn new() -> Self {
        Digest {
            lane_a: 0x243f_6a88_85a3_08d3,
            lane_b: 0x1319_8a2e_0370_7344,
            words: 0,
        }
    }

    /// Folds one word in: one multiply per lane, the lanes independent so that they run side
    /// by side (a full finaliser per word cost a tenth of a simulated replay); each step is a
    /// bijection of the lane, so no state is lost, and `hex` mixes both at the end.
    #[inline]
    pub fn word(&mut self, w: u64) {
        self.lane_a = (self.lane_a ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
        self.lane_b = self
            .lane_b
            .wrapping_add(w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(31);
        self.words += 1;
    }

    fn loc(&mut self, loc: Loc) {
        self.word(loc.segment.packed());
        self.word(loc.offset);
    }

    /// Records one decision and what became of it.
    pub fn decision(&mut self, d: &Decision, outcome: Result<(), Refusal>) {
        self.word(d.kind_index() as u64);
        match *d {
            Decision::Reserve { segment, bytes } | Decision::ReserveVa { segment, bytes } => {
                self.word(segment.packed());
                self.word(bytes);
            }
            Decision::Release { segment } | Decision::ReleaseVa { segment } => {
                self.word(segment.packed())
            }
            Decision::Map {
                segment,
                offset,
                bytes,
            }
            | Decision::Unmap {
                segment,
                offset,
                bytes,
            } => {
                self.word(segment.packed());
                self.word(offset);
                self.word(bytes);
            }
            Decision::Place { id, at, bytes } | Decision::Free { id, at, bytes } => {
                self.word(id.0);
                self.loc(at);
                self.word(bytes);
            }
            Decision::Move {
                id,
                from,
                to,
                bytes,
            } => {
                self.word(id.0);
                self.loc(from);
                self.loc(to);
                self.word(bytes);
            }
            Decision::WriteKv { at, bytes, content } | Decision::ReadKv { at, bytes, content } => {
                self.loc(at);
                self.word(bytes);
                self.word(content);
            }
            Decision::Transfer {
                from,
                to,
                bytes,
                content,
            } => {
                self.loc(from);
                self.loc(to);
                self.word(bytes);
                self.word(content);
            }
        }
        // Capacity refusals are part of the policy's world; a device refusal is an observation
        // that the simulator could not make, and it must change the digest.
        self.word(match outcome {
            Ok(()) => 0,
            Err(Refusal::Capacity) => 1,
            Err(Refusal::Device) => 2,
            Err(Refusal::Injected) => 3,
            Err(Refusal::Mismatch) => 4,
        });
    }

    pub fn hex(&self) -> String {
        format!(
            "{:016x}{:016x}",
            mix(self.lane_a ^ self.words),
            mix(self.lane_b)
        )
    }
}

#[inline]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{AllocId, SegmentId};

    fn place(offset: u64) -> Decision {
        Decision::Place {
            id: AllocId(1),
            at: Loc {
                segment: SegmentId::arena(0),
                offset,
            },
            bytes: 512,
        }
    }

    #[test]
    fn equal_streams_equal_digests_and_any_change_differs() {
        let mut a = Digest::new();
        let mut b = Digest::new();
        a.decision(&place(0), Ok(()));
        b.decision(&place(0), Ok(()));
        assert_eq!(a.hex(), b.hex());
        let mut c = Digest::new();
        c.decision(&place(512), Ok(()));
        assert_ne!(a.hex(), c.hex());
        let mut d = Digest::new();
        d.decision(&place(0), Err(Refusal::Device));
        assert_ne!(a.hex(), d.hex());
        assert_eq!(a.hex().len(), 32);
    }

    #[test]
    fn order_and_each_bit_of_a_word_reach_the_digest() {
        let of = |words: &[u64]| {
            let mut d = Digest::new();
            words.iter().for_each(|&w| d.word(w));
            d.hex()
        };
        assert_ne!(of(&[1, 2]), of(&[2, 1]));
        assert_ne!(of(&[0]), of(&[0, 0]));
        let base = of(&[7, 0, 9]);
        for bit in 0..64 {
            assert_ne!(base, of(&[7, 1 << bit, 9]), "bit {bit}");
        }
    }
}
