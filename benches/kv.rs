//! KV paging: block-pool operations per second, and whole runs of the serving simulator.
//!
//! `cargo bench --bench kv`. The pool benchmarks report blocks per second (one element = one
//! block looked up, then touched or allocated, cached and freed): 2,000 requests of 64 blocks
//! on a pool of 16,384, every other one re-using the first half of the request before it.
//! The engine benchmarks time one whole run: the `mooncake-500-small` conformance fixture
//! (fixed cost, 1,200 blocks, preemptions) and the built-in workload of `gpumem kv`.
//!
//! The whole Mooncake conversation trace is measured on the release binary instead:
//!
//! ```text
//! cargo build --release
//! /usr/bin/time -f "%e s %M KB" target/release/gpumem kv \
//!     --trace ../shared/traces/mooncake/conversation_trace.jsonl \
//!     --cost roofline --gpu h100 --model llama-3.1-8b
//! ```

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gpumem_core::kv::{BlockHash, BlockId, BlockPool};
use gpumem_sim::serve::{
    run_conformance, simulate, Arrivals, ConformanceConfig, CostModel, EngineConfig, EvictionKind,
    GpuProfile, ModelProfile, Roofline, RunInfo, SchedulingPolicy, TooLongPrompt, Workload,
};
use gpumem_traces::serving::generate::{serving, ServingParams};

const POOL_BLOCKS: u32 = 16_384;
const REQUESTS: u64 = 2_000;
const BLOCKS_PER_REQUEST: usize = 64;

/// Hash chains: an odd request shares its first half with the request before it.
fn chains() -> Vec<Vec<BlockHash>> {
    let mut out: Vec<Vec<BlockHash>> = Vec::new();
    for r in 0..REQUESTS {
        let mut h: Vec<BlockHash> = (0..BLOCKS_PER_REQUEST as u64)
            .map(|i| BlockHash((r << 32 | i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1))
            .collect();
        if r % 2 == 1 {
            let parent = &out[(r - 1) as usize];
            h[..BLOCKS_PER_REQUEST / 2].copy_from_slice(&parent[..BLOCKS_PER_REQUEST / 2]);
        }
        out.push(h);
    }
    out
}

/// Every request: look up its prefix, touch the hits, allocate the rest, cache them all,
/// free them tail first. Returns the hit blocks.
fn pool_run(chains: &[Vec<BlockHash>]) -> u64 {
    let mut pool = BlockPool::new(POOL_BLOCKS, true);
    let mut table: Vec<BlockId> = Vec::with_capacity(BLOCKS_PER_REQUEST);
    let mut hits = 0u64;
    for hashes in chains {
        table.clear();
        for &h in hashes {
            match pool.get_cached(h) {
                Some(b) => table.push(b),
                None => break,
            }
        }
        hits += table.len() as u64;
        pool.touch(&table);
        let cached = table.len();
        pool.get_new_blocks(BLOCKS_PER_REQUEST - cached, &mut table);
        pool.cache_full_blocks(&table, hashes, cached, BLOCKS_PER_REQUEST);
        pool.free_blocks(table.iter().rev().copied());
    }
    hits
}

fn bench_pool(c: &mut Criterion) {
    let chains = chains();
    eprintln!(
        "pool: {} of {} blocks served from the prefix cache",
        pool_run(&chains),
        REQUESTS * BLOCKS_PER_REQUEST as u64
    );
    let mut group = c.benchmark_group("kv_pool");
    group.throughput(Throughput::Elements(REQUESTS * BLOCKS_PER_REQUEST as u64));
    group.bench_function("lookup_allocate_cache_free", |b| {
        b.iter(|| pool_run(&chains))
    });
    group.bench_function("allocate_free_no_caching", |b| {
        b.iter(|| {
            let mut pool = BlockPool::new(POOL_BLOCKS, false);
            let mut table: Vec<BlockId> = Vec::with_capacity(BLOCKS_PER_REQUEST);
            for _ in 0..REQUESTS {
                table.clear();
                pool.get_new_blocks(BLOCKS_PER_REQUEST, &mut table);
                pool.free_blocks(table.iter().rev().copied());
            }
            pool.num_free()
        })
    });
    group.finish();
}

fn bench_engine(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/mooncake-500-small");
    let w = Workload::read_file(&dir.join("workload.jsonl")).unwrap();
    let (cfg, _) = ConformanceConfig::read_file(&dir.join("config.json")).unwrap();
    let mut group = c.benchmark_group("kv_engine");
    group.sample_size(10);
    group.bench_function("conformance_mooncake_500_small", |b| {
        b.iter(|| {
            run_conformance(&w, &cfg, &mut std::io::sink())
                .unwrap()
                .steps
        })
    });
    let generated = serving(&ServingParams::default());
    let gpu = GpuProfile::resolve("h100").unwrap();
    let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
    let engine = EngineConfig {
        num_gpu_blocks: 28_019,
        block_size: 16,
        max_num_seqs: 1024,
        max_num_batched_tokens: 8192,
        max_model_len: 131_072,
        enable_prefix_caching: true,
        cost: CostModel::Roofline(Roofline::new(&gpu, &model)),
        eviction: EvictionKind::Lru,
        watermark_blocks: 0,
        policy: SchedulingPolicy::Fcfs,
        offload: None,
    };
    group.bench_function("default_workload_roofline_h100", |b| {
        b.iter(|| {
            let requests = generated.requests.iter().cloned().map(Ok);
            let mut arrivals = Arrivals::new(
                requests,
                &generated.source,
                engine.max_model_len,
                TooLongPrompt::Reject,
            );
            simulate(&mut arrivals, engine, RunInfo::default(), None, &mut |_| {})
                .unwrap()
                .steps
        })
    });
    group.finish();
}

criterion_group!(benches, bench_pool, bench_engine);
criterion_main!(benches);
