//! The streaming engine (driver + `VllmEngine::add_request` / `step`) against the engine as it
//! was before streaming (`reference/old_engine.rs`, whole workload in memory) on random small
//! workloads and configs: the same steps (scheduled, preempted, admitted, finished, free
//! blocks, stored and removed hashes, clock) and the same digest. And the engine placed on an
//! executor decides exactly as without one.

#[path = "reference/old_engine.rs"]
mod old_engine;

use gpumem_core::books::Books;
use gpumem_core::executor::Ledger;
use gpumem_sim::serve::{
    drive, Arrivals, CostModel, DriveOptions, EngineConfig, EvictionKind, GpuProfile, ModelProfile,
    Prompt, Roofline, SchedulingPolicy, TooLongPrompt, VllmEngine, Workload, WorkloadRequest,
};
use proptest::prelude::*;

/// One step as both engines report it, requests named by id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Step {
    step: u64,
    scheduled: Vec<(String, u64)>,
    preempted: Vec<String>,
    admitted: Vec<(String, u64)>,
    finished: Vec<String>,
    free_blocks: u32,
    stored: u64,
    removed: u64,
    end_ns: u64,
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    steps: Vec<Step>,
    digest: String,
    finished: u64,
    output_tokens: u64,
}

fn new_engine_run(w: &Workload, cfg: EngineConfig, placed: bool) -> Result<Run, String> {
    let mut ledger = Ledger::new(Books::new(u64::MAX / 2));
    let mut engine = VllmEngine::new(cfg).map_err(|e| e.to_string())?;
    if placed {
        engine.place(&mut ledger, 64).map_err(|e| e.to_string())?;
    }
    let mut arrivals = Arrivals::from_workload(w.clone(), cfg.max_model_len, TooLongPrompt::Refuse);
    let mut steps = Vec::new();
    let options = DriveOptions {
        check_invariants_every: 1,
    };
    let sum = drive(&mut engine, &mut arrivals, options, &mut |rec, e| {
        let id = |r: usize| e.request_id(r).to_string();
        steps.push(Step {
            step: rec.step,
            scheduled: rec.scheduled.iter().map(|&(r, n)| (id(r), n)).collect(),
            preempted: rec.preempted.iter().map(|&r| id(r)).collect(),
            admitted: rec.admitted.iter().map(|&(r, h)| (id(r), h)).collect(),
            finished: rec.finished.iter().map(|&r| id(r)).collect(),
            free_blocks: rec.free_blocks,
            stored: rec.stored,
            removed: rec.removed,
            end_ns: rec.end_ns,
        });
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(Run {
        steps,
        digest: sum.digest,
        finished: sum.requests_finished,
        output_tokens: sum.output_tokens,
    })
}

fn old_engine_run(w: &Workload, cfg: EngineConfig) -> Result<Run, String> {
    let mut engine = old_engine::OldEngine::new(w, cfg);
    let mut steps = Vec::new();
    let id = |r: usize| w.requests[r].id.clone();
    let sum = engine.run(|rec| {
        steps.push(Step {
            step: rec.step,
            scheduled: rec.scheduled.iter().map(|&(r, n)| (id(r), n)).collect(),
            preempted: rec.preempted.iter().map(|&r| id(r)).collect(),
            admitted: rec.admitted.iter().map(|&(r, h)| (id(r), h)).collect(),
            finished: rec.finished.iter().map(|&r| id(r)).collect(),
            free_blocks: rec.free_blocks,
            stored: rec.stored,
            removed: rec.removed,
            end_ns: rec.end_ns,
        });
    })?;
    Ok(Run {
        steps,
        digest: sum.digest,
        finished: sum.requests_finished,
        output_tokens: sum.output_tokens,
    })
}

/// Shared prompt heads over a tiny alphabet, so that prefixes repeat and hit.
const HEADS: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7, 8], &[1, 2, 3, 4, 9], &[5, 5, 5]];

fn workload(max_model_len: u64) -> impl Strategy<Value = Workload> {
    let request = (
        0u64..2_000,
        0usize..HEADS.len(),
        proptest::collection::vec(0u32..4, 0..40),
        1u64..24,
        -1i64..2,
    );
    proptest::collection::vec(request, 1..24).prop_map(move |rs| {
        let mut t = 0;
        let requests = rs
            .into_iter()
            .enumerate()
            .map(|(i, (gap, head, tail, max_tokens, priority))| {
                t += gap;
                let mut tokens = HEADS[head].to_vec();
                tokens.extend(tail);
                tokens.truncate(max_model_len as usize - 1);
                WorkloadRequest {
                    id: format!("q{i}"),
                    arrival_us: t,
                    prompt: Prompt::Tokens(tokens),
                    max_tokens,
                    priority,
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

fn config() -> impl Strategy<Value = EngineConfig> {
    (
        (6u32..32, prop_oneof![Just(1u32), Just(2), Just(4), Just(8)]),
        (1u64..6, 0u64..40),
        any::<bool>(),
        prop_oneof![
            Just(SchedulingPolicy::Fcfs),
            Just(SchedulingPolicy::Priority)
        ],
        prop_oneof![
            Just(EvictionKind::Lru),
            Just(EvictionKind::Arc),
            Just(EvictionKind::LeafLru)
        ],
        prop_oneof![(1u64..3000).prop_map(Some), Just(None)],
    )
        .prop_map(
            |((blocks, bs), (seqs, extra), caching, policy, eviction, step)| {
                let cost = match step {
                    Some(step_us) => CostModel::Fixed { step_us },
                    None => {
                        let gpu = GpuProfile::resolve("h100").unwrap();
                        let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
                        CostModel::Roofline(Roofline::new(&gpu, &model))
                    }
                };
                EngineConfig {
                    num_gpu_blocks: blocks,
                    block_size: bs,
                    max_num_seqs: seqs,
                    max_num_batched_tokens: seqs + extra,
                    max_model_len: ((blocks as u64 - 1) * bs as u64).min(64),
                    enable_prefix_caching: caching,
                    cost,
                    eviction,
                    watermark_blocks: 0,
                    policy,
                    offload: None,
                }
            },
        )
}

fn case() -> impl Strategy<Value = (EngineConfig, Workload)> {
    config().prop_flat_map(|cfg| (Just(cfg), workload(cfg.max_model_len)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_streaming_engine_steps_as_the_whole_workload_engine_did((cfg, w) in case()) {
        let old = old_engine_run(&w, cfg);
        let new = new_engine_run(&w, cfg, false);
        match (old, new) {
            (Ok(old), Ok(new)) => {
                prop_assert_eq!(&new.steps, &old.steps);
                prop_assert_eq!(&new.digest, &old.digest);
                prop_assert_eq!((new.finished, new.output_tokens), (old.finished, old.output_tokens));
                prop_assert_eq!(new.finished, w.requests.len() as u64);
                // Placed on an executor (nothing corrupt), the engine decides the same.
                let placed = new_engine_run(&w, cfg, true).map_err(TestCaseError::fail)?;
                prop_assert_eq!(placed, new);
            }
            (Err(_), Err(e)) => prop_assert!(e.contains("stalled"), "{}", e),
            (old, new) => prop_assert!(false, "old {:?} vs new {:?}", old.map(|r| r.digest), new.map(|r| r.digest)),
        }
    }
}

/// The engine keeps only the requests in flight: after every step, those waiting, running or
/// finished by that step, never the ones finished before.
#[test]
fn the_engine_holds_only_requests_in_flight() {
    use gpumem_traces::serving::generate::{ServingParams, ServingRequests};
    let p = ServingParams {
        requests: 400,
        ..ServingParams::default()
    };
    let gpu = GpuProfile::resolve("h100").unwrap();
    let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
    let cfg = EngineConfig {
        num_gpu_blocks: 3000,
        block_size: 16,
        max_num_seqs: 64,
        max_num_batched_tokens: 8192,
        max_model_len: 40_000,
        enable_prefix_caching: true,
        cost: CostModel::Roofline(Roofline::new(&gpu, &model)),
        eviction: EvictionKind::Lru,
        watermark_blocks: 0,
        policy: SchedulingPolicy::Fcfs,
        offload: None,
    };
    let mut engine = VllmEngine::new(cfg).unwrap();
    let mut arrivals = Arrivals::new(
        ServingRequests::new(&p).map(Ok),
        "generated",
        cfg.max_model_len,
        TooLongPrompt::Reject,
    );
    let (mut steps, mut most) = (0u64, 0usize);
    let sum = drive(
        &mut engine,
        &mut arrivals,
        DriveOptions::default(),
        &mut |rec, e| {
            let in_flight = (rec.waiting + rec.running) as usize + rec.finished.len();
            assert_eq!(e.requests_in_flight(), in_flight, "step {}", rec.step);
            most = most.max(in_flight);
            steps += 1;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(sum.requests_finished, 400);
    assert!(
        steps > 1000 && most < 400,
        "{steps} steps, at most {most} in flight"
    );
}
