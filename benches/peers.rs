//! gpumem's `tlsf`, `best-fit` and `buddy` beside the public allocators of the same kind, driven
//! in one process on one seeded stream: 2M operations held at 85% occupancy (`occupancy`,
//! seed 42, sizes log-uniform 4 KiB – 16 MiB) over 4 GiB, counted in 4 KiB units (1,048,576
//! units). Every allocator sees the same requests; a refused request's later free is skipped.
//!
//! `cargo bench --bench peers` prints a Markdown table: thread CPU time (not wall time: the
//! machine is shared), median of `PEERS_REPS` rounds (default 3), the allocators interleaved
//! within each round so that a change of load hits them all alike; then each gpumem strategy's
//! ratio to its peers. The whole simulated replay of `tlsf` (books, digest, statistics,
//! pressure monitor) is timed beside its strategy alone.
//!
//! Not a criterion benchmark: the figure wanted is a ratio between allocators measured in the
//! same process under the same load, and the refusal rates beside it.

mod common;
use common::CapacityOnly;

use std::hint::black_box;

use gpumem_core::alloc::buddy::Buddy;
use gpumem_core::alloc::fit::{FitAllocator, FitPolicy};
use gpumem_core::alloc::tlsf::Tlsf;
use gpumem_core::alloc::{AllocConfig, AllocRequest, Allocate, Strategy, GIB, KIB, MIB};
use gpumem_core::books::Books;
use gpumem_core::decision::AllocId;
use gpumem_core::digest::Digest;
use gpumem_sim::{replay, AllocCostModel, ReplayConfig, SimExecutor};
use gpumem_traces::generate::{occupancy, OccupancyParams};
use gpumem_traces::{AllocTrace, OpKind};

const OPS: u64 = 2_000_000;
const CAPACITY: u64 = 4 * GIB;
const UNIT: u64 = 4 * KIB;
const UNITS: u32 = (CAPACITY / UNIT) as u32;

/// One operation of the stream: allocate `units` for slot `id`, or free slot `id`.
#[derive(Clone, Copy)]
enum Op {
    Alloc { id: u32, units: u32 },
    Free { id: u32 },
}

fn trace() -> AllocTrace {
    occupancy(&OccupancyParams {
        seed: 42,
        ops: OPS,
        capacity_bytes: CAPACITY,
        target_occupancy_pct: 85,
        min_bytes: UNIT,
        max_bytes: 16 * MIB,
    })
}

fn stream(trace: &AllocTrace) -> Vec<Op> {
    trace
        .ops
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Alloc { id, bytes, .. } => Some(Op::Alloc {
                id: id as u32,
                units: bytes.div_ceil(UNIT) as u32,
            }),
            OpKind::Free { id } => Some(Op::Free { id: id as u32 }),
            OpKind::EmptyCache => None,
        })
        .collect()
}

/// What the driver needs of an allocator: a handle for what it placed, and a free of it.
trait Peer {
    type Handle: Copy;
    fn alloc(&mut self, units: u32) -> Option<Self::Handle>;
    fn free(&mut self, h: Self::Handle, units: u32);
}

/// Replays the stream; returns refused requests.
fn drive<P: Peer>(p: &mut P, ops: &[Op], ids: usize) -> u64 {
    let mut live: Vec<Option<(P::Handle, u32)>> = vec![None; ids];
    let mut refused = 0;
    for op in ops {
        match *op {
            Op::Alloc { id, units } => match p.alloc(units) {
                Some(h) => live[id as usize] = Some((h, units)),
                None => refused += 1,
            },
            Op::Free { id } => {
                if let Some((h, units)) = live[id as usize].take() {
                    p.free(h, units);
                }
            }
        }
    }
    refused
}

struct OffsetAlloc(offset_allocator::Allocator);
impl Peer for OffsetAlloc {
    type Handle = offset_allocator::Allocation;
    fn alloc(&mut self, units: u32) -> Option<Self::Handle> {
        self.0.allocate(units)
    }
    fn free(&mut self, h: Self::Handle, _: u32) {
        self.0.free(h)
    }
}

struct BuddySystem(buddy_system_allocator::FrameAllocator<21>);
impl Peer for BuddySystem {
    type Handle = usize;
    fn alloc(&mut self, units: u32) -> Option<usize> {
        self.0.alloc(units as usize)
    }
    fn free(&mut self, h: usize, units: u32) {
        self.0.dealloc(h, units as usize)
    }
}

struct XallocTlsf(xalloc::SysTlsf<u32>);
impl Peer for XallocTlsf {
    type Handle = usize;
    fn alloc(&mut self, units: u32) -> Option<usize> {
        // The region is a raw pointer to xalloc's block header; the driver keeps it as an
        // integer so that every peer's handle is `Copy`.
        self.0
            .alloc(units)
            .map(|(r, _)| Box::into_raw(Box::new(r)) as usize)
    }
    fn free(&mut self, h: usize, _: u32) {
        // SAFETY: `h` came from `Box::into_raw` in `alloc` and is freed once.
        let r = unsafe { Box::from_raw(h as *mut xalloc::SysTlsfRegion) };
        self.0.dealloc(*r).expect("a region of this allocator");
    }
}

struct RangeAlloc(range_alloc::RangeAllocator<u32>);
impl Peer for RangeAlloc {
    type Handle = u32;
    fn alloc(&mut self, units: u32) -> Option<u32> {
        self.0.allocate_range(units).ok().map(|r| r.start)
    }
    fn free(&mut self, start: u32, units: u32) {
        self.0.free_range(start..start + units)
    }
}

/// A gpumem strategy against a memory that only answers whether a reservation fits (as in
/// `benches/alloc.rs`), asked in bytes of whole units, aligned to the unit.
struct Gpumem<A> {
    a: A,
    mem: CapacityOnly,
    next: u64,
    /// Freed ids, reused most recent first (as `gpumem alloc`'s replay does): the peers reuse
    /// their handles, and a strategy's id-indexed tables then stay the size of the live set.
    free_ids: Vec<AllocId>,
}

impl<A: Allocate> Peer for Gpumem<A> {
    type Handle = AllocId;
    fn alloc(&mut self, units: u32) -> Option<AllocId> {
        let id = self.free_ids.pop().unwrap_or_else(|| {
            self.next += 1;
            AllocId(self.next - 1)
        });
        let req = AllocRequest {
            id,
            bytes: units as u64 * UNIT,
            stream: 0,
            pinned: false,
        };
        match self.a.alloc(req, &mut self.mem) {
            Ok(_) => Some(id),
            Err(_) => {
                self.free_ids.push(id);
                None
            }
        }
    }
    fn free(&mut self, id: AllocId, _: u32) {
        self.a.free(id, &mut self.mem);
        self.free_ids.push(id);
    }
}

fn config() -> AllocConfig {
    AllocConfig {
        capacity_bytes: CAPACITY,
        alignment_bytes: UNIT,
        ..AllocConfig::default()
    }
}

fn gpumem<A>(a: A) -> Gpumem<A> {
    Gpumem {
        a,
        mem: CapacityOnly {
            books: Books::new(CAPACITY),
            digest: Digest::new(),
        },
        next: 0,
        free_ids: Vec::new(),
    }
}

/// CPU seconds this thread has run.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Builds an allocator (outside the timing), replays the stream; CPU seconds and refusals.
fn timed<P: Peer>(make: impl Fn() -> P, ops: &[Op], ids: usize) -> (f64, u64) {
    let mut p = make();
    let start = cpu_seconds();
    let refused = drive(&mut p, ops, ids);
    let secs = cpu_seconds() - start;
    black_box(&p);
    (secs, refused)
}

type Run = Box<dyn Fn(&[Op], usize) -> (f64, u64)>;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects allocators by name: the one
    // it names exactly, else every one whose name contains it ("gpumem tlsf" alone, "tlsf"
    // both gpumem runs).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let reps: usize = std::env::var("PEERS_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let trace = trace();
    let ops = stream(&trace);
    let ids = ops
        .iter()
        .map(|op| match *op {
            Op::Alloc { id, .. } | Op::Free { id } => id as usize + 1,
        })
        .max()
        .unwrap_or(0);
    let allocs = ops
        .iter()
        .filter(|op| matches!(op, Op::Alloc { .. }))
        .count() as u64;

    let mut runs: Vec<(&str, Run)> = vec![
        (
            "offset-allocator 0.2",
            Box::new(|o, n| {
                timed(
                    || OffsetAlloc(offset_allocator::Allocator::with_max_allocs(UNITS, 1 << 20)),
                    o,
                    n,
                )
            }),
        ),
        (
            "buddy_system_allocator 0.13",
            Box::new(|o, n| {
                timed(
                    || {
                        let mut b = buddy_system_allocator::FrameAllocator::<21>::new();
                        b.add_frame(0, UNITS as usize);
                        BuddySystem(b)
                    },
                    o,
                    n,
                )
            }),
        ),
        (
            "xalloc 0.2 TLSF",
            Box::new(|o, n| timed(|| XallocTlsf(xalloc::SysTlsf::new(UNITS)), o, n)),
        ),
        (
            "range-alloc 0.1 (best fit)",
            Box::new(|o, n| {
                timed(
                    || RangeAlloc(range_alloc::RangeAllocator::new(0..UNITS)),
                    o,
                    n,
                )
            }),
        ),
        (
            "gpumem tlsf",
            Box::new(|o, n| timed(|| gpumem(Tlsf::new(&config())), o, n)),
        ),
        (
            "gpumem best-fit",
            Box::new(|o, n| {
                timed(
                    || gpumem(FitAllocator::new(FitPolicy::Best, &config())),
                    o,
                    n,
                )
            }),
        ),
        (
            "gpumem buddy",
            Box::new(|o, n| timed(|| gpumem(Buddy::new(&config())), o, n)),
        ),
    ];
    // The whole `gpumem alloc` replay, on the byte trace the stream was made from (sizes
    // rounded to the unit by the strategy's alignment).
    let replay_trace = trace.clone();
    runs.push((
        "gpumem tlsf, whole simulated replay",
        Box::new(move |_, _| {
            let mut exec = SimExecutor::new(CAPACITY, AllocCostModel::default());
            let start = cpu_seconds();
            let r = replay(
                &replay_trace,
                Strategy::Tlsf,
                &ReplayConfig::new(config()),
                &mut exec,
                &mut |_| {},
            )
            .expect("replay");
            let secs = cpu_seconds() - start;
            black_box(&r);
            (secs, u64::MAX)
        }),
    ));
    let exact: Vec<bool> = filter
        .iter()
        .map(|f| runs.iter().any(|(name, _)| name == f))
        .collect();
    runs.retain(|(name, _)| {
        filter.is_empty()
            || filter.iter().zip(&exact).any(|(f, &exact)| {
                if exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            })
    });

    let mut times: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut refusals: Vec<u64> = vec![0; runs.len()];
    for _ in 0..reps {
        for (k, (_, run)) in runs.iter().enumerate() {
            let (secs, refused) = run(&ops, ids);
            times[k].push(secs);
            refusals[k] = refused;
        }
    }
    let mops: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            OPS as f64 / t[t.len() / 2] / 1e6
        })
        .collect();

    println!(
        "{} operations ({} requests), 85% occupancy, {} units of 4 KiB; CPU time, median of {reps}\n",
        ops.len(),
        allocs,
        UNITS
    );
    println!("| allocator | M ops/s | refused |");
    println!("|---|---:|---:|");
    for (k, (name, _)) in runs.iter().enumerate() {
        let refused = if refusals[k] == u64::MAX {
            String::new()
        } else {
            format!("{:.3}%", refusals[k] as f64 * 100.0 / allocs as f64)
        };
        println!("| {name} | {:.1} | {refused} |", mops[k]);
    }
    let find = |name: &str| runs.iter().position(|(n, _)| *n == name);
    println!();
    for (ours, peer) in [
        ("gpumem tlsf", "xalloc 0.2 TLSF"),
        ("gpumem tlsf", "offset-allocator 0.2"),
        ("gpumem best-fit", "range-alloc 0.1 (best fit)"),
        ("gpumem buddy", "buddy_system_allocator 0.13"),
        ("gpumem tlsf, whole simulated replay", "gpumem tlsf"),
    ] {
        if let (Some(a), Some(b)) = (find(ours), find(peer)) {
            println!("{ours} / {peer}: {:.2}×", mops[a] / mops[b]);
        }
    }
}
