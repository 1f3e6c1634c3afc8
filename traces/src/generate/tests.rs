use super::*;
use std::collections::BTreeMap;

/// Every free names a live id; ids are never allocated while live. Returns the live-bytes
/// curve (after each op).
fn check_ids(t: &AllocTrace) -> Vec<u64> {
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut bytes = 0u64;
    let mut curve = Vec::with_capacity(t.ops.len());
    let mut last_t = 0;
    for (i, op) in t.ops.iter().enumerate() {
        assert!(op.t_ns >= last_t, "op {i}: time goes back");
        last_t = op.t_ns;
        assert_eq!(op.line, i as u64 + 1);
        match op.kind {
            OpKind::Alloc { id, bytes: b, .. } => {
                assert!(
                    live.insert(id, b).is_none(),
                    "op {i}: id {id} allocated while live"
                );
                bytes += b;
            }
            OpKind::Free { id } => {
                let b = live
                    .remove(&id)
                    .unwrap_or_else(|| panic!("op {i}: free of dead id {id}"));
                bytes -= b;
            }
            OpKind::EmptyCache => {}
        }
        curve.push(bytes);
    }
    curve
}

#[test]
fn log_uniform_stays_in_range_and_spreads() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (lo, hi) in [
        (512, 64 << 20),
        (1, 1),
        (7, 8),
        (0, 0),
        (1, u64::MAX),
        (100, 3),
    ] {
        let d = LogUniform::new(lo, hi);
        let (lo, hi) = (lo.max(1), hi.max(lo.max(1)));
        for _ in 0..2000 {
            let x = d.sample(&mut rng);
            assert!(x >= lo && x <= hi, "{x} not in [{lo}, {hi}]");
        }
    }
    // Roughly equal mass per octave between 1 KiB and 1 MiB (10 octaves).
    let d = LogUniform::new(1 << 10, 1 << 20);
    let mut per_octave = [0u32; 11];
    for _ in 0..50_000 {
        per_octave[(63 - d.sample(&mut rng).leading_zeros() - 10) as usize] += 1;
    }
    for (k, &n) in per_octave[..10].iter().enumerate() {
        assert!((4000..6000).contains(&n), "octave {k}: {n}");
    }
}

#[test]
fn occupancy_is_deterministic_and_hovers_at_target() {
    let p = OccupancyParams {
        ops: 200_000,
        ..OccupancyParams::default()
    };
    let a = occupancy(&p);
    assert_eq!(a.ops.len(), 200_000);
    assert_eq!(a.name, "generated:occupancy seed=0");
    assert_eq!(a.source, TraceSource::Generated);
    assert_eq!(a, occupancy(&p));
    assert_ne!(
        a.ops,
        occupancy(&OccupancyParams {
            seed: 1,
            ..p.clone()
        })
        .ops
    );
    let curve = check_ids(&a);
    let target = p.capacity_bytes / 100 * u64::from(p.target_occupancy_pct);
    let warm = curve
        .iter()
        .position(|&b| b >= target)
        .expect("reaches target");
    assert!(warm < 50_000, "warm-up took {warm} ops");
    for &b in &curve[warm..] {
        assert!(
            b + p.max_bytes >= target && b < target + p.max_bytes,
            "{b} vs {target}"
        );
    }
    let s = a.summary();
    assert!(s.frees > 50_000 && s.allocs > 50_000, "{s:?}");
    assert!(s.max_alloc_bytes <= p.max_bytes);
}

#[test]
fn occupancy_edge_parameters() {
    for p in [
        OccupancyParams {
            ops: 0,
            ..OccupancyParams::default()
        },
        OccupancyParams {
            ops: 1000,
            capacity_bytes: 0,
            ..OccupancyParams::default()
        },
        OccupancyParams {
            ops: 1000,
            min_bytes: 0,
            max_bytes: 0,
            ..OccupancyParams::default()
        },
        OccupancyParams {
            ops: 1000,
            capacity_bytes: u64::MAX,
            target_occupancy_pct: 300,
            min_bytes: u64::MAX,
            max_bytes: u64::MAX,
            seed: 3,
        },
    ] {
        let t = occupancy(&p);
        assert_eq!(t.ops.len() as u64, p.ops);
        check_ids(&t);
    }
}

#[test]
fn llm_serving_default_shape() {
    let p = LlmServingParams::default();
    let t = llm_serving(&p);
    assert_eq!(t.name, "generated:llm-serving seed=0");
    assert_eq!(t, llm_serving(&p));
    assert_ne!(
        t.ops,
        llm_serving(&LlmServingParams {
            seed: 7,
            ..p.clone()
        })
        .ops
    );
    let curve = check_ids(&t);
    let s = t.summary();
    eprintln!("llm-serving default: {} ops, {s:?}", t.ops.len());
    let gib = 1u64 << 30;
    assert!(
        (20_000..=50_000).contains(&t.ops.len()),
        "{} ops",
        t.ops.len()
    );
    assert!(
        (20 * gib..=40 * gib).contains(&s.peak_live_bytes),
        "peak {} GiB",
        s.peak_live_bytes / gib
    );
    // Weights first, pinned, never freed.
    let weights = 2 + 6 * u64::from(p.layers) + 1;
    assert_eq!(s.pinned_allocs, weights);
    assert!(t.ops[..weights as usize]
        .iter()
        .all(|o| matches!(o.kind, OpKind::Alloc { pinned: true, .. })));
    let w: u64 = t.ops[..weights as usize]
        .iter()
        .map(|o| match o.kind {
            OpKind::Alloc { bytes, .. } => bytes,
            _ => 0,
        })
        .sum();
    assert!(
        w <= p.weights_bytes && w > p.weights_bytes / 100 * 99,
        "{w}"
    );
    assert_eq!(curve[weights as usize - 1], w);
    assert!(curve[weights as usize..].iter().all(|&b| b >= w));
    // Requests both grow by reallocation and by chunks, and finish.
    assert!(s.frees > 10_000);
    assert!(s.final_live_bytes > w);
}

#[test]
fn llm_serving_small_and_degenerate_params() {
    let t = llm_serving(&LlmServingParams {
        steps: 0,
        ..LlmServingParams::default()
    });
    assert_eq!(t.ops.len(), 2 + 6 * 32 + 1);
    for p in [
        LlmServingParams {
            steps: 40,
            layers: 0,
            max_batch: 0,
            kv_chunk_tokens: 0,
            arrivals_per_100_steps: 350,
            min_prompt_tokens: 0,
            max_prompt_tokens: 0,
            min_output_tokens: 0,
            max_output_tokens: 0,
            ..LlmServingParams::default()
        },
        LlmServingParams {
            steps: 60,
            realloc_pct: 100,
            max_prefill_tokens: 1,
            weights_bytes: 0,
            ..LlmServingParams::default()
        },
    ] {
        check_ids(&llm_serving(&p));
    }
}
