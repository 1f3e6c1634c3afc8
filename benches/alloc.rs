//! Allocation strategies on a seeded 2M-operation workload held at 85% occupancy.
//!
//! `cargo bench --bench alloc` reports time per whole replay; the ops/s figure is
//! 2,000,000 / that time. Two variants per strategy: the strategy alone against a minimal
//! capacity-only memory, and the full simulated executor (books, digest, modelled time).
//!
//! The capacity-only memory keeps the same books as every executor, so a segment released
//! (`caching` empties its cache when a reservation is refused) is credited back; the bench
//! checks that the strategy alone refuses exactly the requests the full replay refuses.

mod common;
use common::CapacityOnly;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpumem_core::alloc::{build, AllocConfig, AllocRequest, Strategy, GIB};
use gpumem_core::books::Books;
use gpumem_core::decision::AllocId;
use gpumem_core::digest::Digest;
use gpumem_sim::{replay, AllocCostModel, ReplayConfig, SimExecutor};
use gpumem_traces::generate::{occupancy, OccupancyParams};
use gpumem_traces::{AllocTrace, OpKind};

const OPS: u64 = 2_000_000;

fn workload() -> AllocTrace {
    occupancy(&OccupancyParams {
        seed: 42,
        ops: OPS,
        capacity_bytes: GIB,
        target_occupancy_pct: 85,
        min_bytes: 512,
        max_bytes: 16 << 20,
    })
}

fn config() -> AllocConfig {
    AllocConfig {
        capacity_bytes: GIB,
        ..AllocConfig::default()
    }
}

/// Replays the workload straight into the strategy; returns refused requests. Trace ids of the
/// generated workload are dense, so a vector maps them without hashing.
fn strategy_alone(strategy: Strategy, trace: &AllocTrace, id_count: usize) -> u64 {
    let mut alloc = build(strategy, &config());
    let mut mem = CapacityOnly {
        books: Books::new(GIB),
        digest: Digest::new(),
    };
    let mut live: Vec<Option<AllocId>> = vec![None; id_count];
    let mut refused = 0;
    for (i, op) in trace.ops.iter().enumerate() {
        match op.kind {
            OpKind::Alloc {
                id,
                bytes,
                stream,
                pinned,
            } => {
                let req = AllocRequest {
                    id: AllocId(i as u64),
                    bytes,
                    stream,
                    pinned,
                };
                match alloc.alloc(req, &mut mem) {
                    Ok(_) => live[id as usize] = Some(req.id),
                    Err(_) => refused += 1,
                }
            }
            OpKind::Free { id } => {
                if let Some(a) = live[id as usize].take() {
                    alloc.free(a, &mut mem);
                }
            }
            OpKind::EmptyCache => alloc.empty_cache(&mut mem),
        }
    }
    refused
}

fn bench(c: &mut Criterion) {
    let trace = workload();
    let max_id = trace
        .ops
        .iter()
        .map(|op| match op.kind {
            OpKind::Alloc { id, .. } | OpKind::Free { id } => id,
            OpKind::EmptyCache => 0,
        })
        .max()
        .unwrap_or(0);
    let id_count = max_id as usize + 1;
    assert!(id_count <= 2 * OPS as usize, "generated ids are dense");
    let mut group = c.benchmark_group("alloc-2M-ops-85pct");
    group.sample_size(10);
    group.throughput(Throughput::Elements(OPS));
    for strategy in Strategy::ALL {
        let refused = strategy_alone(strategy, &trace, id_count);
        let mut exec = SimExecutor::new(GIB, AllocCostModel::default());
        let full = replay(
            &trace,
            strategy,
            &ReplayConfig::new(config()),
            &mut exec,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            refused,
            full.fragmentation_failures + full.ooms,
            "{}: the capacity-only memory refuses what the simulated executor refuses",
            strategy.name()
        );
        let allocs = trace
            .ops
            .iter()
            .filter(|op| matches!(op.kind, OpKind::Alloc { .. }))
            .count();
        eprintln!(
            "{:>20}: {refused} of {allocs} requests refused ({:.3}%)",
            strategy.name(),
            refused as f64 * 100.0 / allocs as f64
        );
        group.bench_with_input(
            BenchmarkId::new("strategy", strategy.name()),
            &strategy,
            |b, &s| b.iter(|| strategy_alone(s, &trace, id_count)),
        );
        group.bench_with_input(
            BenchmarkId::new("simulated", strategy.name()),
            &strategy,
            |b, &s| {
                b.iter(|| {
                    let mut exec = SimExecutor::new(GIB, AllocCostModel::default());
                    replay(
                        &trace,
                        s,
                        &ReplayConfig::new(config()),
                        &mut exec,
                        &mut |_| {},
                    )
                    .unwrap()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
