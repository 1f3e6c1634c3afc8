//! gpumem's predictive prefetch (`OffloadEngineConfig::prefetch`) on random small workloads
//! whose prompts share heads, over a CPU tier on the roofline clock: every step's invariants
//! hold (the prefetch never changes the free-block count, never counts a block twice, and
//! every block it tracks is free and holds what it should), the counters add up, and the same
//! run twice decides the same.

use gpumem_core::kv::offload::OffloadPolicyKind;
use gpumem_sim::serve::{
    drive, Arrivals, CostModel, DriveOptions, EngineConfig, EvictionKind, GpuProfile, ModelProfile,
    OffloadEngineConfig, PrefetchTotals, Prompt, Roofline, SchedulingPolicy, ServeError,
    TooLongPrompt, TransferTiming, VllmEngine, Workload, WorkloadRequest,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const HEADS: [&[u32]; 3] = [
    &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    &[1, 2, 3, 4, 9, 9, 9, 9, 2, 2, 2, 2],
    &[5, 5, 5, 5, 6, 6, 6, 6],
];

fn workload() -> impl Strategy<Value = Workload> {
    let request = (
        0u64..300,
        0usize..HEADS.len(),
        proptest::collection::vec(0u32..4, 0..24),
        1u64..16,
    );
    proptest::collection::vec(request, 1..40).prop_map(|rs| {
        let mut t = 0;
        let requests = rs
            .into_iter()
            .enumerate()
            .map(|(i, (gap, head, tail, max_tokens))| {
                t += gap;
                let mut tokens = HEADS[head].to_vec();
                tokens.extend(tail);
                WorkloadRequest {
                    id: format!("q{i}"),
                    arrival_us: t,
                    prompt: Prompt::Tokens(tokens),
                    max_tokens,
                    priority: 0,
                    line: i as u64 + 1,
                    model: None,
                }
            })
            .collect();
        Workload {
            source: "random".into(),
            requests,
            warnings: Vec::new(),
        }
    })
}

fn config(blocks: u32, per_chunk: u32, cpu_blocks: u32, prefetch: u32) -> EngineConfig {
    let gpu = GpuProfile::resolve("h100").unwrap();
    let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
    EngineConfig {
        num_gpu_blocks: blocks,
        block_size: 4,
        max_num_seqs: 4,
        max_num_batched_tokens: 32,
        max_model_len: 64.min((blocks as u64 - 1) * 4),
        enable_prefix_caching: true,
        cost: CostModel::Roofline(Roofline::new(&gpu, &model)),
        eviction: EvictionKind::Lru,
        watermark_blocks: 0,
        policy: SchedulingPolicy::Fcfs,
        offload: Some(OffloadEngineConfig {
            cpu_blocks,
            block_size: 4 * per_chunk,
            policy: OffloadPolicyKind::default(),
            prompt_only: true,
            timing: TransferTiming::Link {
                link: gpu.links().unwrap().host_pinned,
                block_bytes: model.kv_bytes_per_token() * 4,
            },
            prefetch,
        }),
    }
}

fn run(w: &Workload, cfg: EngineConfig) -> Result<(String, u64, PrefetchTotals), ServeError> {
    let mut engine = VllmEngine::new(cfg)?;
    let mut arrivals = Arrivals::from_workload(w.clone(), cfg.max_model_len, TooLongPrompt::Refuse);
    let options = DriveOptions {
        check_invariants_every: 1,
    };
    let sum = drive(&mut engine, &mut arrivals, options, &mut |_, _| Ok(()))?;
    let totals = engine.prefetch_totals().unwrap_or_default();
    Ok((sum.digest, sum.requests_finished, totals))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prefetch_keeps_its_promises(
        w in workload(),
        blocks in 18u32..40,
        per_chunk in 1u32..3,
        cpu_blocks in 4u32..40,
        prefetch in 1u32..5,
    ) {
        let cfg = config(blocks, per_chunk, cpu_blocks, prefetch);
        match run(&w, cfg) {
            Ok((digest, finished, t)) => {
                prop_assert!(t.hits + t.wasted <= t.loads, "{:?}", t);
                prop_assert_eq!(t.free_count_changes, 0);
                prop_assert_eq!(finished, w.requests.len() as u64);
                let again = run(&w, cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(again, (digest, finished, t));
            }
            // A broken invariant is an internal error; a stall is the workload's.
            Err(e) => prop_assert!(matches!(e, ServeError::Stall(_)), "{}", e),
        }
    }
}

/// Over many such workloads the prefetch loads blocks and some of them are hit: it is not
/// idle, and what it loads can serve an admission.
#[test]
fn prefetch_loads_blocks_that_admissions_use() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut total = PrefetchTotals::default();
    for _ in 0..64 {
        let w = workload().new_tree(&mut runner).unwrap().current();
        if let Ok((_, _, t)) = run(&w, config(24, 1, 32, 4)) {
            total.loads += t.loads;
            total.hits += t.hits;
            total.wasted += t.wasted;
        }
    }
    assert!(total.loads > 0 && total.hits > 0, "{total:?}");
    assert!(total.hits + total.wasted <= total.loads, "{total:?}");
}
