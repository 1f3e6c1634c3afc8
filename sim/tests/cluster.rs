//! The cluster driver: one replica runs the single-engine run step for step (every router,
//! random small workloads and configs, both clocks); the router's prompt hashes are the ones
//! the engine stores; a prefix-aware router finds the shared prefixes round-robin scatters;
//! `kv-aware:0` routes as `least-loaded`; late KV events change what the router sees; the same
//! inputs give the same report.

use gpumem_core::kv::KvEvent;
use gpumem_core::place::DeviceSet;
use gpumem_sim::cluster::prompt_hashes::prompt_block_hashes;
use gpumem_sim::cluster::{simulate_cluster, ClusterReport, ClusterSetup, RouterPolicy};
use gpumem_sim::serve::{
    simulate, Arrivals, CostModel, EngineConfig, EvictionKind, GpuProfile, KvReport, ModelProfile,
    Now, Prompt, Roofline, RunInfo, SchedulingPolicy, TooLongPrompt, VllmEngine, Workload,
    WorkloadRequest,
};
use gpumem_traces::serving::generate::{ServingParams, ServingRequests};
use proptest::prelude::*;

const HEADS: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7, 8], &[1, 2, 3, 4, 9], &[5, 5, 5]];

fn workload(max_model_len: u64) -> impl Strategy<Value = Workload> {
    let request = (
        0u64..2_000,
        0usize..HEADS.len(),
        proptest::collection::vec(0u32..4, 0..40),
        1u64..24,
    );
    proptest::collection::vec(request, 1..24).prop_map(move |rs| {
        let mut t = 0;
        let requests = rs
            .into_iter()
            .enumerate()
            .map(|(i, (gap, head, tail, max_tokens))| {
                t += gap;
                let mut tokens = HEADS[head].to_vec();
                tokens.extend(tail);
                tokens.truncate(max_model_len as usize - 1);
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

fn roofline() -> CostModel {
    let gpu = GpuProfile::resolve("h100").unwrap();
    let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
    CostModel::Roofline(Roofline::new(&gpu, &model))
}

fn config() -> impl Strategy<Value = EngineConfig> {
    (
        (6u32..32, prop_oneof![Just(1u32), Just(2), Just(4)]),
        (1u64..6, 0u64..40),
        any::<bool>(),
        prop_oneof![(1u64..3000).prop_map(Some), Just(None)],
    )
        .prop_map(
            |((blocks, bs), (seqs, extra), caching, step)| EngineConfig {
                num_gpu_blocks: blocks,
                block_size: bs,
                max_num_seqs: seqs,
                max_num_batched_tokens: seqs + extra,
                max_model_len: ((blocks as u64 - 1) * bs as u64).min(64),
                enable_prefix_caching: caching,
                cost: match step {
                    Some(step_us) => CostModel::Fixed { step_us },
                    None => roofline(),
                },
                eviction: EvictionKind::Lru,
                watermark_blocks: 0,
                policy: SchedulingPolicy::Fcfs,
                offload: None,
            },
        )
}

fn routers() -> impl Strategy<Value = RouterPolicy> {
    prop_oneof![
        Just(RouterPolicy::RoundRobin),
        Just(RouterPolicy::LeastLoaded),
        Just(RouterPolicy::KV_AWARE),
    ]
}

fn single(w: &Workload, cfg: EngineConfig) -> Result<KvReport, String> {
    let mut arrivals = Arrivals::from_workload(w.clone(), cfg.max_model_len, TooLongPrompt::Reject);
    simulate(&mut arrivals, cfg, RunInfo::default(), None, &mut |_| {}).map_err(|e| e.to_string())
}

fn cluster(
    w: &Workload,
    cfg: EngineConfig,
    replicas: usize,
    router: RouterPolicy,
    lag_us: u64,
) -> Result<ClusterReport, String> {
    let mut arrivals = Arrivals::from_workload(w.clone(), cfg.max_model_len, TooLongPrompt::Reject);
    let setup = ClusterSetup {
        engine: cfg,
        devices: DeviceSet::first(replicas).unwrap(),
        router,
        router_lag_us: lag_us,
    };
    simulate_cluster(&mut arrivals, &setup, RunInfo::default(), &mut |_| {})
        .map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn one_replica_is_the_single_engine_run(
        (cfg, w) in config().prop_flat_map(|c| (Just(c), workload(c.max_model_len))),
        router in routers(),
        lag_us in prop_oneof![Just(0u64), 1u64..5000],
    ) {
        match (single(&w, cfg), cluster(&w, cfg, 1, router, lag_us)) {
            (Ok(one), Ok(c)) => {
                prop_assert_eq!(&c.fleet, &one);
                prop_assert_eq!(c.replicas.len(), 1);
                prop_assert_eq!(&c.replicas[0].digest, &one.digest);
                prop_assert_eq!(c.router.stats.requests_routed, w.requests.len() as u64);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "single {:?} vs cluster {:?}", a.map(|r| r.digest), b.map(|r| r.fleet.digest)),
        }
    }

    #[test]
    fn every_request_finishes_on_some_replica(
        (cfg, w) in config().prop_flat_map(|c| (Just(c), workload(c.max_model_len))),
        router in routers(),
        replicas in 2usize..5,
    ) {
        if let Ok(c) = cluster(&w, cfg, replicas, router, 0) {
            let n = w.requests.len() as u64;
            prop_assert_eq!(c.fleet.requests_finished, n);
            prop_assert_eq!(c.replicas.iter().map(|r| r.requests).sum::<u64>(), n);
            prop_assert_eq!(c.replicas.iter().map(|r| r.requests_finished).sum::<u64>(), n);
            prop_assert!(c.replicas.iter().all(|r| r.sim_time_us <= c.fleet.sim_time_us));
            // The same inputs, the same run.
            prop_assert_eq!(cluster(&w, cfg, replicas, router, 0).unwrap(), c);
        }
    }
}

/// The built-in workload (shared system prompts and multi-turn sessions) on an H100.
fn generated(requests: u64) -> (Workload, EngineConfig) {
    let p = ServingParams {
        requests,
        ..ServingParams::default()
    };
    let w = Workload {
        source: "generated".into(),
        requests: ServingRequests::new(&p).collect(),
        warnings: Vec::new(),
    };
    let cfg = EngineConfig {
        num_gpu_blocks: 3000,
        block_size: 16,
        max_num_seqs: 64,
        max_num_batched_tokens: 8192,
        max_model_len: 40_000,
        enable_prefix_caching: true,
        cost: roofline(),
        eviction: EvictionKind::Lru,
        watermark_blocks: 0,
        policy: SchedulingPolicy::Fcfs,
        offload: None,
    };
    (w, cfg)
}

#[test]
fn the_router_hashes_a_prompt_as_the_engine_stores_it() {
    let (w, cfg) = generated(40);
    let mut engine = VllmEngine::new(cfg).unwrap();
    engine.publish_kv_events();
    let (mut tokens, mut hashes) = (Vec::new(), Vec::new());
    let mut held = std::collections::HashSet::new();
    for (i, req) in w.requests.into_iter().enumerate() {
        let len = req.prompt.len();
        let bs = cfg.block_size as u64;
        prompt_block_hashes(
            &req.prompt,
            cfg.block_size,
            len / bs,
            &mut tokens,
            &mut hashes,
        );
        // What a prefix lookup serves (never the last token), stored by earlier requests.
        let hit = hashes
            .iter()
            .take(((len - 1) / bs) as usize)
            .take_while(|h| held.contains(*h))
            .count();
        engine.add_request(req).unwrap();
        let mut stored = Vec::new();
        let mut step = i as u64 * 1000;
        while engine.has_unfinished_requests() {
            engine.step(Now { step, ns: step });
            step += 1;
            for ev in engine.take_kv_events() {
                if let KvEvent::Stored { hashes, .. } = ev {
                    stored.extend(hashes);
                }
            }
        }
        // The prompt's blocks past the hit are stored first, then the output's.
        assert!(
            stored.len() >= hashes.len() - hit && stored[..hashes.len() - hit] == hashes[hit..],
            "request {i}: the router's hashes differ from the engine's"
        );
        held.extend(stored);
    }
}

#[test]
fn kv_aware_routing_finds_the_shared_prefixes_round_robin_scatters() {
    let (w, cfg) = generated(600);
    let run = |router| cluster(&w, cfg, 4, router, 0).unwrap();
    let (rr, kv) = (run(RouterPolicy::RoundRobin), run(RouterPolicy::KV_AWARE));
    assert!(
        kv.fleet.prefix_hit_rate > rr.fleet.prefix_hit_rate,
        "kv-aware {} vs round-robin {}",
        kv.fleet.prefix_hit_rate,
        rr.fleet.prefix_hit_rate
    );
    // What the router expected to hit, the engines mostly did.
    assert!(kv.router.expected_hit_rate > 0.0);
    assert_eq!(
        rr.router.stats.kv_events_applied, 0,
        "round-robin reads no events"
    );
    // Round-robin spreads evenly.
    assert!(rr.replicas.iter().all(|r| r.requests == 150));
    let devices: Vec<u16> = kv.replicas.iter().map(|r| r.device).collect();
    assert_eq!(devices, [0, 1, 2, 3]);
}

#[test]
fn kv_aware_without_weight_is_least_loaded_and_late_events_change_the_view() {
    let (w, cfg) = generated(300);
    let run = |router, lag_us| cluster(&w, cfg, 3, router, lag_us).unwrap();
    let least = run(RouterPolicy::LeastLoaded, 0);
    let zero = run(RouterPolicy::KvAware { weight_milli: 0 }, 0);
    assert_eq!(zero.router.digest, least.router.digest);
    assert_eq!(zero.fleet.digest, least.fleet.digest);
    let prompt = run(RouterPolicy::KV_AWARE, 0);
    let late = run(RouterPolicy::KV_AWARE, 60_000_000);
    assert_ne!(late.router.digest, prompt.router.digest);
    assert!(
        late.router.expected_hit_rate < prompt.router.expected_hit_rate,
        "a minute late the router sees less: {} vs {}",
        late.router.expected_hit_rate,
        prompt.router.expected_hit_rate
    );
}
