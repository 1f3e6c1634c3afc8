//! The simulated executor: keeps the books, digests the decision stream and charges modelled
//! time — per decision from [`AllocCostModel`], per transfer from the [`Links`] of the GPU
//! profile. It implements the one executor contract of `gpumem_core::executor`.

use gpumem_core::books::Books;
use gpumem_core::decision::{Decision, Refusal};
use gpumem_core::digest::Digest;
use gpumem_core::executor::{Executor, Ledger};
use gpumem_core::link::Links;
use serde::Serialize;

/// Modelled cost of each kind of decision, integer nanoseconds. The defaults are orders of
/// magnitude for a current datacenter GPU (cudaMalloc tens of µs, a 2 MiB map a few µs, a copy
/// at about half of HBM bandwidth), meant to be calibrated against `--execute cuda`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AllocCostModel {
    pub reserve_ns: u64,
    pub release_ns: u64,
    pub map_ns_per_2mib: u64,
    pub unmap_ns_per_2mib: u64,
    pub bookkeeping_ns: u64,
    pub copy_bytes_per_us: u64,
}

impl Default for AllocCostModel {
    fn default() -> Self {
        AllocCostModel {
            reserve_ns: 20_000,
            release_ns: 10_000,
            map_ns_per_2mib: 4_000,
            unmap_ns_per_2mib: 3_000,
            bookkeeping_ns: 100,
            copy_bytes_per_us: 1_500_000,
        }
    }
}

const TWO_MIB: u64 = 2 << 20;

impl AllocCostModel {
    pub fn cost_ns(&self, d: &Decision) -> u64 {
        match *d {
            Decision::Reserve { .. } => self.reserve_ns,
            Decision::Release { .. } | Decision::ReleaseVa { .. } => self.release_ns,
            Decision::ReserveVa { .. } => self.bookkeeping_ns,
            Decision::Map { bytes, .. } => bytes.div_ceil(TWO_MIB) * self.map_ns_per_2mib,
            Decision::Unmap { bytes, .. } => bytes.div_ceil(TWO_MIB) * self.unmap_ns_per_2mib,
            Decision::Place { .. } | Decision::Free { .. } => self.bookkeeping_ns,
            Decision::WriteKv { bytes, .. } | Decision::ReadKv { bytes, .. } => {
                bytes.saturating_mul(1000) / self.copy_bytes_per_us.max(1)
            }
            Decision::Move { bytes, .. } => {
                // Read and write: twice the bytes cross the memory bus.
                (2 * bytes).saturating_mul(1000) / self.copy_bytes_per_us.max(1)
            }
            // Charged by the link it takes (`SimExecutor`), not here.
            Decision::Transfer { .. } => 0,
        }
    }
}

/// Count and time of one kind of decision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCost {
    pub kind: &'static str,
    pub count: u64,
    pub modelled_ns: u64,
}

#[derive(Clone, Debug)]
pub struct SimExecutor {
    ledger: Ledger,
    cost: AllocCostModel,
    links: Links,
    kinds: [KindCost; Decision::KIND_NAMES.len()],
}

impl SimExecutor {
    /// One place (device 0's GPU memory) of `capacity_bytes`, the default links.
    pub fn new(capacity_bytes: u64, cost: AllocCostModel) -> Self {
        Self::with_books(
            Books::new(capacity_bytes),
            cost,
            crate::serve::profile::GpuProfile::default_links(),
        )
    }

    /// Any places (`books` holds their capacities), transfers charged by `links`.
    pub fn with_books(books: Books, cost: AllocCostModel, links: Links) -> Self {
        SimExecutor {
            ledger: Ledger::new(books),
            cost,
            links,
            kinds: std::array::from_fn(|i| KindCost {
                kind: Decision::KIND_NAMES[i],
                ..KindCost::default()
            }),
        }
    }

    /// Per kind of decision carried out: how many and their modelled time.
    pub fn costs(&self) -> Vec<KindCost> {
        self.kinds.iter().filter(|k| k.count > 0).cloned().collect()
    }

    pub fn modelled_ns_total(&self) -> u64 {
        self.kinds.iter().map(|k| k.modelled_ns).sum()
    }

    /// Modelled time of `d`.
    pub fn cost_ns(&self, d: &Decision) -> u64 {
        modelled_ns(&self.cost, &self.links, d)
    }

    pub fn digest_hex(&self) -> String {
        self.ledger.digest.hex()
    }
}

impl Executor for SimExecutor {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let outcome = self.ledger.carry(&d);
        if outcome.is_ok() {
            let ns = self.cost_ns(&d);
            let k = &mut self.kinds[d.kind_index()];
            k.count += 1;
            k.modelled_ns = k.modelled_ns.saturating_add(ns);
        }
        outcome
    }

    fn books(&self) -> &Books {
        &self.ledger.books
    }

    fn digest(&self) -> &Digest {
        &self.ledger.digest
    }
}

/// Modelled time of `d`: transfers by the link they take, the rest by `cost`.
pub fn modelled_ns(cost: &AllocCostModel, links: &Links, d: &Decision) -> u64 {
    match *d {
        Decision::Transfer {
            from, to, bytes, ..
        } => links
            .between(from.segment.place, to.segment.place)
            .transfer_ns(bytes),
        _ => cost.cost_ns(d),
    }
}

/// Any executor with the simulator's modelled time beside it: every decision carried out is
/// charged as [`SimExecutor`] charges it. A driver whose clock follows its decisions' modelled
/// time (the models driver's loads, colocation's sleeps and wakes) runs on a device executor
/// through this, so the clock, hence every later decision, is the simulation's.
pub struct Timed<E: Executor> {
    inner: E,
    cost: AllocCostModel,
    links: Links,
    modelled_ns: u64,
}

impl<E: Executor> Timed<E> {
    pub fn new(inner: E, cost: AllocCostModel, links: Links) -> Self {
        Timed {
            inner,
            cost,
            links,
            modelled_ns: 0,
        }
    }

    /// Modelled time of every decision carried out so far.
    pub fn modelled_ns_total(&self) -> u64 {
        self.modelled_ns
    }

    pub fn digest_hex(&self) -> String {
        self.inner.digest().hex()
    }

    pub fn inner_mut(&mut self) -> &mut E {
        &mut self.inner
    }
}

impl<E: Executor> Executor for Timed<E> {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let outcome = self.inner.apply(d);
        if outcome.is_ok() {
            let ns = modelled_ns(&self.cost, &self.links, &d);
            self.modelled_ns = self.modelled_ns.saturating_add(ns);
        }
        outcome
    }

    fn books(&self) -> &Books {
        self.inner.books()
    }

    fn digest(&self) -> &Digest {
        self.inner.digest()
    }

    fn checkpoint(&mut self) -> u64 {
        self.inner.checkpoint()
    }

    fn segment_base(&self, segment: gpumem_core::decision::SegmentId) -> Option<u64> {
        self.inner.segment_base(segment)
    }

    fn resident_bytes_now(&mut self) -> Option<u64> {
        self.inner.resident_bytes_now()
    }
}
