//! The one contract between policies and executors: [`Executor::apply`] carries out a
//! [`Decision`] and answers whether it happened.
//!
//! Every policy (allocation strategies, the KV manager, tiers) and every driver (allocation
//! replay, the serving engine) talks to an executor only through this trait; the simulated
//! executor in `gpumem-sim` and the device executor in `gpumem-gpu` implement it. [`Ledger`]
//! is what every executor keeps in common: the [`Books`] and the [`Digest`] of the stream.
//!
//! Outcomes: only `Reserve`, `ReserveVa` and `Map` may be refused for want of memory (or of
//! address space); `ReadKv` and
//! `Transfer` may be refused with [`Refusal::Mismatch`] when the bytes are not what the policy
//! expects. A refused decision did not happen: the policy must act as if it was never made.

use crate::books::Books;
use crate::decision::{Decision, Refusal, SegmentId};
use crate::digest::Digest;

/// Carries out decisions; see the module documentation.
pub trait Executor {
    /// Carries out `d`, or refuses it (see the module documentation for which may be).
    fn apply(&mut self, d: Decision) -> Result<(), Refusal>;
    /// The accounts of what was carried out.
    fn books(&self) -> &Books;
    /// Digest of every decision applied and its outcome.
    fn digest(&self) -> &Digest;
    /// Re-checks whatever the executor can observe independently (a real executor re-verifies
    /// every live block's bytes); returns the wrong bytes found. The books alone have nothing
    /// to add.
    fn checkpoint(&mut self) -> u64 {
        0
    }
    /// Where the executor holds `segment` (a device's base address), when it holds real
    /// memory: observed, never decided on — a driver may compare bases across a sleep and a
    /// wake, no decision may depend on them. The books alone hold no address.
    fn segment_base(&self, _segment: SegmentId) -> Option<u64> {
        None
    }
    /// Memory in use as the device itself measures it now (the process's resident memory for
    /// host memory, whatever scale the decisions are carried out at); observed, never decided
    /// on. The books alone measure nothing.
    fn resident_bytes_now(&mut self) -> Option<u64> {
        None
    }
}

/// Books and digest: the simplest executor, and the part every executor shares.
#[derive(Clone, Debug)]
pub struct Ledger {
    pub books: Books,
    pub digest: Digest,
}

impl Ledger {
    pub fn new(books: Books) -> Self {
        Ledger {
            books,
            digest: Digest::new(),
        }
    }

    /// Records `d` with the outcome another executor observed (the books apply it only when it
    /// happened). Panics if the books refuse what the executor says happened.
    pub fn record(&mut self, d: Decision, outcome: Result<(), Refusal>) {
        if outcome.is_ok() {
            if let Err(r) = self.books.book(&d) {
                panic!("books refused {d:?} ({r:?}) after it was carried out");
            }
        }
        self.digest.decision(&d, outcome);
    }
}

impl Ledger {
    /// Books and digests `d` (what [`Executor::apply`] does) by reference, so that an executor
    /// wrapping the ledger reads the decision in place rather than copying it again.
    #[inline]
    pub fn carry(&mut self, d: &Decision) -> Result<(), Refusal> {
        let outcome = self.books.book(d);
        self.digest.decision(d, outcome);
        outcome
    }
}

impl Executor for Ledger {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        self.carry(&d)
    }

    fn books(&self) -> &Books {
        &self.books
    }

    fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl<E: Executor + ?Sized> Executor for &mut E {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        (**self).apply(d)
    }
    fn books(&self) -> &Books {
        (**self).books()
    }
    fn digest(&self) -> &Digest {
        (**self).digest()
    }
    fn checkpoint(&mut self) -> u64 {
        (**self).checkpoint()
    }
    fn segment_base(&self, segment: SegmentId) -> Option<u64> {
        (**self).segment_base(segment)
    }
    fn resident_bytes_now(&mut self) -> Option<u64> {
        (**self).resident_bytes_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::SegmentId;
    use crate::place::{Owner, Place, Tier};

    #[test]
    fn each_place_has_its_own_capacity() {
        let host = Place::new(0, Tier::PinnedHost);
        let mut ledger = Ledger::new(Books::with_places(&[(Place::GPU0, 100), (host, 1000)]));
        let gpu_seg = SegmentId::new(Place::GPU0, Owner::KvPool, 0);
        let host_seg = SegmentId::new(host, Owner::KvOffload, 0);
        let other_seg = SegmentId::new(Place::gpu(1), Owner::KvPool, 0);
        let reserve = |segment, bytes| Decision::Reserve { segment, bytes };
        assert_eq!(ledger.apply(reserve(gpu_seg, 101)), Err(Refusal::Capacity));
        assert_eq!(ledger.apply(reserve(host_seg, 1000)), Ok(()));
        assert_eq!(ledger.apply(reserve(gpu_seg, 100)), Ok(()));
        // A place the books were not given holds nothing.
        assert_eq!(ledger.apply(reserve(other_seg, 1)), Err(Refusal::Capacity));
        assert_eq!(ledger.books.account(host).reserved_bytes, 1000);
        assert_eq!(ledger.books.reserved_bytes(), 100);
        assert_eq!(ledger.books.reserved_bytes_on(Place::GPU0.device), 1100);
        ledger
            .apply(Decision::Release { segment: host_seg })
            .unwrap();
        assert_eq!(ledger.books.account(host).reserved_bytes, 0);
        assert_eq!(ledger.books.account(host).reserved_bytes_peak, 1000);
    }

    #[test]
    fn segments_of_different_owners_do_not_collide() {
        let mut ledger = Ledger::new(Books::new(1000));
        let a = SegmentId::new(Place::GPU0, Owner::Arena, 0);
        let k = SegmentId::new(Place::GPU0, Owner::KvPool, 0);
        ledger
            .apply(Decision::Reserve {
                segment: a,
                bytes: 10,
            })
            .unwrap();
        ledger
            .apply(Decision::Reserve {
                segment: k,
                bytes: 10,
            })
            .unwrap();
        assert_eq!(ledger.books.segment_count(), 2);
        assert_ne!(a.packed(), k.packed());
    }

    #[test]
    #[should_panic(expected = "outside its segment")]
    fn a_transfer_past_its_segment_is_a_policy_bug() {
        let host = Place::new(0, Tier::PageableHost);
        let mut ledger = Ledger::new(Books::with_places(&[(Place::GPU0, 100), (host, 100)]));
        let g = SegmentId::new(Place::GPU0, Owner::KvPool, 0);
        let h = SegmentId::new(host, Owner::KvOffload, 0);
        for segment in [g, h] {
            ledger
                .apply(Decision::Reserve { segment, bytes: 64 })
                .unwrap();
        }
        let at = |segment, offset| crate::decision::Loc { segment, offset };
        ledger
            .apply(Decision::Transfer {
                from: at(g, 0),
                to: at(h, 32),
                bytes: 64,
                content: 1,
            })
            .unwrap();
    }
}
