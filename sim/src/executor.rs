//! The simulated executor: keeps the books, digests the decision stream and charges modelled
//! time. `Executor` is what the drivers need from any executor, simulated or on real memory.

use gpumem_core::decision::{Decision, Refusal};
use gpumem_core::digest::Digest;
use gpumem_core::memory::{Books, Memory};
use serde::Serialize;

/// An executor as the drivers see it.
pub trait Executor: Memory {
    fn books(&self) -> &Books;
    fn digest_hex(&self) -> String;
    /// Re-check whatever the executor can observe independently (real executors re-verify every
    /// live block's bytes); the simulator has nothing to add to its books.
    fn checkpoint(&mut self) {}
}

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
    books: Books,
    digest: Digest,
    cost: AllocCostModel,
    kinds: [KindCost; Decision::KIND_NAMES.len()],
}

impl SimExecutor {
    pub fn new(capacity_bytes: u64, cost: AllocCostModel) -> Self {
        SimExecutor {
            books: Books::new(capacity_bytes),
            digest: Digest::new(),
            cost,
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
}

impl Memory for SimExecutor {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let outcome = self.books.apply(d);
        self.digest.decision(&d, outcome);
        if outcome.is_ok() {
            let k = &mut self.kinds[d.kind_index()];
            k.count += 1;
            k.modelled_ns += self.cost.cost_ns(&d);
        }
        outcome
    }
}

impl Executor for SimExecutor {
    fn books(&self) -> &Books {
        &self.books
    }

    fn digest_hex(&self) -> String {
        self.digest.hex()
    }
}
