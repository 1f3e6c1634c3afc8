use std::path::PathBuf;

use gpumem_core::alloc::Strategy as AllocStrategy;
use gpumem_core::kv::eviction::EvictionKind;
use gpumem_core::kv::offload::OffloadPolicyKind;
use gpumem_traces::serving::WorkloadFormat;
use proptest::prelude::*;

use super::{
    AllocExecuteSpec, AllocSpec, AllocTraceSpec, CostSpec, Engine, ExecuteDevice, Fraction,
    KvExecuteSpec, KvOffloadSpec, KvSpec, KvTraceSpec, Named, ProfileSpec, RunSpec, MAX_SPEC_BYTES,
};
use crate::alloc_replay::DefragMode;
use crate::cluster::RouterPolicy;
use crate::monitor::Thresholds;
use crate::serve::profile::LinkSpec;
use crate::serve::{kv_sizing, GpuProfile, ModelProfile, SchedulingPolicy};
use gpumem_core::buffers::SizesChoice;

fn pick<T: Named + std::fmt::Debug>() -> impl Strategy<Value = T> {
    proptest::sample::select(T::all())
}

/// Paths with the characters RON must escape.
fn path() -> impl Strategy<Value = PathBuf> {
    "[a-zA-Z0-9 /._\"\\\\é-]{1,24}".prop_map(PathBuf::from)
}

fn faults() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec("[a-z:0-9-]{0,16}", 0..3)
}

fn device() -> impl Strategy<Value = ExecuteDevice> {
    pick::<ExecuteDevice>()
}

fn alloc_trace() -> impl Strategy<Value = AllocTraceSpec> {
    prop_oneof![
        path().prop_map(|path| AllocTraceSpec::File { path }),
        any::<u32>().prop_map(|steps| AllocTraceSpec::LlmServing { steps }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(ops, occupancy_pct)| AllocTraceSpec::Occupancy { ops, occupancy_pct }),
    ]
}

fn thresholds() -> impl Strategy<Value = Thresholds> {
    (1u64..1_000_000)
        .prop_flat_map(|w| (Just(w), w + 1..=1_000_000))
        .prop_map(|(w, c)| Thresholds::new(w, c).unwrap())
}

fn cudagraph_sizes() -> impl Strategy<Value = SizesChoice> {
    prop_oneof![
        Just(SizesChoice::Vllm),
        Just(SizesChoice::Auto),
        proptest::collection::btree_set(1u64..=u64::MAX, 1..6)
            .prop_map(|s| SizesChoice::List(s.into_iter().collect())),
    ]
}

fn alloc_spec() -> impl Strategy<Value = AllocSpec> {
    let execute = proptest::option::of((device(), any::<u64>(), any::<u64>(), faults()).prop_map(
        |(device, checkpoint_every, scale, inject)| AllocExecuteSpec {
            device,
            checkpoint_every,
            scale,
            inject,
        },
    ));
    (
        alloc_trace(),
        any::<u64>(),
        proptest::collection::vec(pick::<AllocStrategy>(), 0..8),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        pick::<DefragMode>(),
        (any::<bool>(), thresholds()),
        execute,
        proptest::option::of(path()),
        proptest::option::of(path()),
    )
        .prop_map(
            |(
                trace,
                seed,
                strategy,
                (capacity, alignment, page),
                defrag,
                (check, pressure_thresholds),
                execute,
                plot,
                export,
            )| {
                AllocSpec {
                    trace,
                    seed,
                    strategy,
                    capacity_bytes: capacity,
                    alignment_bytes: alignment,
                    page_bytes: page,
                    defrag,
                    check,
                    pressure_thresholds,
                    execute,
                    plot,
                    export_trace: export,
                    pytorch_alloc_conf: None,
                    compare_segments: false,
                }
            },
        )
}

fn gpu_profile() -> impl Strategy<Value = GpuProfile> {
    (
        "[a-z0-9 -]{1,12}",
        proptest::collection::vec("[A-Za-z0-9 ]{1,8}", 0..3),
        (
            any::<u64>(),
            any::<u64>(),
            1..u64::MAX,
            any::<u64>(),
            any::<u64>(),
        ),
        (3u32..=6, proptest::sample::select(vec![1u32, 2, 4, 8, 16])),
        (any::<u64>(), 1u64..=100, any::<u64>(), any::<u64>()),
        (1..u64::MAX, 1..u64::MAX, any::<u64>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                name,
                aliases,
                (memory, flops, bandwidth, seqs, tokens),
                (gen, lanes),
                l,
                h,
                price,
            )| {
                GpuProfile {
                    name,
                    aliases,
                    memory_bytes: memory,
                    flops_per_s: flops,
                    mem_bytes_per_s: bandwidth,
                    default_max_num_seqs: seqs,
                    default_max_num_batched_tokens: tokens,
                    links: LinkSpec {
                        pcie_gen: gen,
                        pcie_lanes: lanes,
                        pcie_latency_ns: l.0,
                        pageable_pct: l.1,
                        nvlink_bytes_per_s: l.2,
                        nvlink_latency_ns: l.3,
                        host_memory_bytes_per_s: h.0,
                        disk_bytes_per_s: h.1,
                        disk_latency_ns: h.2,
                    },
                    price_per_hour_usd_cents: price,
                }
            },
        )
}

fn model_profile() -> impl Strategy<Value = ModelProfile> {
    (
        "[a-z0-9./-]{1,16}",
        proptest::collection::vec(any::<u64>(), 9),
    )
        .prop_map(|(name, n)| ModelProfile {
            name,
            aliases: Vec::new(),
            params: n[0],
            layers: n[1],
            attention_heads: n[2],
            kv_heads: n[3],
            head_dim: n[4],
            dtype_bytes: n[5],
            max_model_len: n[6],
            activation_reserve_bytes: n[7],
            cudagraph_bytes_per_graph: n[8],
        })
}

fn gpu() -> impl Strategy<Value = ProfileSpec<GpuProfile>> {
    let names: Vec<String> = GpuProfile::builtin().into_iter().map(|g| g.name).collect();
    prop_oneof![
        proptest::sample::select(names).prop_map(ProfileSpec::Builtin),
        gpu_profile().prop_map(ProfileSpec::Inline),
    ]
}

fn model() -> impl Strategy<Value = ProfileSpec<ModelProfile>> {
    let names: Vec<String> = ModelProfile::builtin()
        .into_iter()
        .map(|m| m.name)
        .collect();
    prop_oneof![
        proptest::sample::select(names).prop_map(ProfileSpec::Builtin),
        model_profile().prop_map(ProfileSpec::Inline),
    ]
}

fn kv_trace() -> impl Strategy<Value = KvTraceSpec> {
    prop_oneof![
        (
            path(),
            pick::<WorkloadFormat>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(path, format, limit)| KvTraceSpec::File {
                path,
                format,
                limit
            }),
        any::<u64>().prop_map(|requests| KvTraceSpec::Generated { requests }),
    ]
}

fn cost() -> impl Strategy<Value = CostSpec> {
    prop_oneof![
        Just(CostSpec::Roofline),
        (1..u64::MAX).prop_map(|step_us| CostSpec::Fixed { step_us }),
    ]
}

fn kv_spec() -> impl Strategy<Value = KvSpec> {
    let execute = proptest::option::of((device(), any::<u64>(), faults()).prop_map(
        |(device, bytes_per_block, inject)| KvExecuteSpec {
            device,
            bytes_per_block,
            inject,
        },
    ));
    let cpu_offload = proptest::option::of(
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            pick::<OffloadPolicyKind>(),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(
                |(blocks, bytes, size, policy, latency, all)| KvOffloadSpec {
                    cpu_offload_blocks: blocks,
                    kv_offloading_bytes: bytes,
                    offload_block_size: size,
                    offload_policy: policy,
                    offload_latency_steps: latency,
                    offload_all_tokens: all,
                    offload_prefetch: 0,
                },
            ),
    );
    (
        (kv_trace(), any::<u64>(), gpu(), model()),
        (
            any::<u64>(),
            proptest::option::of((1u64..=1_000_000).prop_map(|ppm| Fraction { ppm })),
            any::<[u64; 4]>(),
        ),
        (
            cost(),
            pick::<EvictionKind>(),
            any::<bool>(),
            pick::<SchedulingPolicy>(),
        ),
        (thresholds(), cudagraph_sizes()),
        (
            execute,
            cpu_offload,
            proptest::option::of(path()),
            proptest::option::of(path()),
        ),
        proptest::option::of((any::<u64>(), router(), any::<u64>())),
    )
        .prop_map(
            |(
                (trace, seed, gpu, model),
                (kv_blocks, gpu_memory_utilization, n),
                (cost, eviction, prefix_caching, scheduling_policy),
                (pressure_thresholds, cudagraph_sizes),
                (execute, cpu_offload, step_log, plot),
                cluster,
            )| KvSpec {
                trace,
                seed,
                gpu,
                model,
                kv_blocks,
                gpu_memory_utilization,
                block_size: n[0],
                max_num_seqs: n[1],
                max_num_batched_tokens: n[2],
                max_model_len: n[3],
                engine: Engine::Vllm033,
                cost,
                eviction,
                prefix_caching,
                scheduling_policy,
                pressure_thresholds,
                cudagraph_sizes,
                replicas: cluster.map(|c| c.0),
                router: cluster.map(|c| c.1),
                router_lag_us: cluster.map(|c| c.2),
                execute,
                cpu_offload,
                step_log,
                plot,
            },
        )
}

fn router() -> impl Strategy<Value = RouterPolicy> {
    prop_oneof![
        Just(RouterPolicy::RoundRobin),
        Just(RouterPolicy::LeastLoaded),
        (0..=crate::cluster::router::MAX_KV_WEIGHT)
            .prop_map(|weight_milli| RouterPolicy::KvAware { weight_milli }),
    ]
}

fn run_spec() -> impl Strategy<Value = RunSpec> {
    prop_oneof![
        alloc_spec().prop_map(|a| RunSpec::Alloc(Box::new(a))),
        kv_spec().prop_map(|k| RunSpec::Kv(Box::new(k))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_printed_spec_parses_back_to_itself(spec in run_spec()) {
        let text = spec.to_ron().unwrap();
        prop_assert_eq!(RunSpec::from_ron(&text), Ok(spec.clone()), "{}", text);
        // And prints the same again: the text is a function of the value.
        prop_assert_eq!(RunSpec::from_ron(&text).unwrap().to_ron().unwrap(), text);
    }
}

/// The spec `gpumem kv --print-spec` prints by default, with a line to change.
fn kv_text() -> String {
    RunSpec::Kv(Box::new(KvSpec {
        trace: KvTraceSpec::Generated { requests: 10 },
        seed: 0,
        gpu: ProfileSpec::Builtin("h100".into()),
        model: ProfileSpec::Builtin("llama-3.1-8b".into()),
        kv_blocks: 100,
        gpu_memory_utilization: None,
        block_size: 16,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len: 1000,
        engine: Engine::Vllm033,
        cost: CostSpec::Fixed { step_us: 1000 },
        eviction: EvictionKind::Lru,
        prefix_caching: true,
        scheduling_policy: SchedulingPolicy::Fcfs,
        pressure_thresholds: Thresholds::default(),
        cudagraph_sizes: SizesChoice::Vllm,
        replicas: None,
        router: None,
        router_lag_us: None,
        execute: None,
        cpu_offload: None,
        step_log: None,
        plot: None,
    }))
    .to_ron()
    .unwrap()
}

/// `kv_text()` with the line that starts with `field` replaced by `line`.
fn kv_with(field: &str, line: &str) -> (String, usize) {
    let text = kv_text();
    let mut at = 0;
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if l.trim_start().starts_with(field) {
                at = i + 1;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(at > 0, "no line for {field}");
    (lines.join("\n"), at)
}

#[test]
fn the_default_text_parses() {
    assert!(RunSpec::from_ron(&kv_text()).is_ok());
}

#[test]
fn an_unknown_field_is_named_with_its_line() {
    let (text, line) = kv_with("seed:", "    seeds: 0,");
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (line, "Kv.seeds"), "{e}");
    assert!(e.message.contains("unknown field `seeds`"), "{e}");
    assert!(
        e.message.contains("seed, gpu"),
        "the known fields are listed: {e}"
    );
}

#[test]
fn a_wrong_type_is_named_with_its_line() {
    let (text, line) = kv_with("kv_blocks:", "    kv_blocks: \"lots\",");
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (line, "Kv.kv_blocks"), "{e}");
    assert!(e.message.contains("integer"), "{e}");
    let (text, line) = kv_with("prefix_caching:", "    prefix_caching: 1,");
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert_eq!(
        (e.line, e.field.as_str()),
        (line, "Kv.prefix_caching"),
        "{e}"
    );
}

#[test]
fn a_bad_value_is_named_with_its_line_and_the_known_ones() {
    for (field, line, message) in [
        (
            "eviction:",
            "    eviction: \"mru\",",
            "known: lru, arc, leaf-lru",
        ),
        (
            "cost:",
            "    cost: \"fixed:0\",",
            "STEP_US must be a positive",
        ),
        ("engine:", "    engine: \"vllm-0.1\",", "known: vllm-0.33"),
        ("gpu:", "    gpu: \"tpu\",", "unknown GPU 'tpu'"),
        ("model:", "    model: \"gpt-5\",", "unknown model 'gpt-5'"),
        (
            "scheduling_policy:",
            "    scheduling_policy: \"edf\",",
            "known: fcfs, priority",
        ),
        (
            "gpu_memory_utilization:",
            "    gpu_memory_utilization: Some(1.5),",
            "(0, 1]",
        ),
        (
            "execute:",
            "    execute: Some((device: \"tpu\", bytes_per_block: 1, inject: [])),",
            "known: host, cuda",
        ),
        (
            "pressure_thresholds:",
            "    pressure_thresholds: \"0.9,0.75\",",
            "0 < WARNING < CRITICAL <= 1",
        ),
        (
            "cudagraph_sizes:",
            "    cudagraph_sizes: \"1,0\",",
            "'0' is not a batch size",
        ),
    ] {
        let (text, at) = kv_with(field, line);
        let e = RunSpec::from_ron(&text).unwrap_err();
        let name = field.trim_end_matches(':');
        assert_eq!(e.line, at, "{e}");
        assert!(e.field.starts_with(&format!("Kv.{name}")), "{e}");
        assert!(e.message.contains(message), "{e}");
    }
}

#[test]
fn a_missing_field_is_named() {
    let (text, _) = kv_with("seed:", "");
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert!(e.message.contains("field `seed` is missing"), "{e}");
}

#[test]
fn an_inline_profile_refuses_unknown_fields_too() {
    let (text, line) = kv_with(
        "gpu:",
        "    gpu: (name: \"x\", memory_bytes: 1, flops_per_s: 1, mem_bytes_per_s: 1,\n default_max_num_seqs: 1, default_max_num_batched_tokens: 1, hbm: 3),",
    );
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert_eq!(e.line, line + 1, "{e}");
    assert!(e.field.starts_with("Kv.gpu"), "{e}");
    assert!(e.message.contains("unknown field `hbm`"), "{e}");
}

#[test]
fn an_inline_profile_is_checked() {
    let (text, _) = kv_with(
        "gpu:",
        "    gpu: (name: \"x\", memory_bytes: 1, flops_per_s: 1, mem_bytes_per_s: 1, default_max_num_seqs: 1, default_max_num_batched_tokens: 1, links: (pcie_gen: 2)),",
    );
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert!(e.message.contains("PCIe generation 2"), "{e}");
}

#[test]
fn text_that_is_not_a_spec_is_refused_with_its_line() {
    let e = RunSpec::from_ron("Train((\n))").unwrap_err();
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("expected one of Alloc, Kv"), "{e}");
    let e = RunSpec::from_ron(&format!("{}\nKv(())", kv_text())).unwrap_err();
    assert!(e.message.contains("after the end"), "{e}");
    assert!(RunSpec::from_ron("").is_err());
}

#[test]
fn fractions_print_as_they_were_given() {
    for (text, ppm) in [
        ("0.9", 900_000),
        ("1", 1_000_000),
        ("0.000001", 1),
        ("0.123456", 123_456),
    ] {
        let f = Fraction::parse(text).unwrap();
        assert_eq!(f.ppm, ppm);
        assert_eq!(f.to_string(), text);
        let ron = ron::to_string(&f).unwrap();
        assert_eq!(ron::from_str::<Fraction>(&ron), Ok(f), "{ron}");
    }
    // Either a number or its text.
    assert_eq!(ron::from_str::<Fraction>("\"0.5\"").unwrap().ppm, 500_000);
    assert_eq!(ron::from_str::<Fraction>("1").unwrap().ppm, 1_000_000);
    for bad in ["0", "0.0000001", "1.000001", "-0.5", "\"half\""] {
        assert!(ron::from_str::<Fraction>(bad).is_err(), "{bad}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpumem-spec-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn relative_paths_resolve_against_the_spec_file() {
    let dir = scratch("rebase");
    let spec = RunSpec::Alloc(Box::new(AllocSpec {
        trace: AllocTraceSpec::File {
            path: "traces/t.jsonl".into(),
        },
        seed: 0,
        strategy: vec![AllocStrategy::Tlsf],
        capacity_bytes: 1 << 30,
        alignment_bytes: 512,
        page_bytes: 2 << 20,
        defrag: DefragMode::Off,
        check: false,
        pressure_thresholds: Thresholds::default(),
        execute: None,
        plot: Some("/abs/plot.svg".into()),
        export_trace: Some("out.jsonl".into()),
        pytorch_alloc_conf: None,
        compare_segments: false,
    }));
    let file = dir.join("s.ron");
    std::fs::write(&file, spec.to_ron().unwrap()).unwrap();
    let RunSpec::Alloc(read) = RunSpec::read_file(&file).unwrap() else {
        panic!("an alloc spec")
    };
    assert_eq!(
        read.trace,
        AllocTraceSpec::File {
            path: dir.join("traces/t.jsonl")
        }
    );
    assert_eq!(
        read.plot,
        Some("/abs/plot.svg".into()),
        "absolute paths stay"
    );
    assert_eq!(read.export_trace, Some(dir.join("out.jsonl")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_huge_or_binary_file_is_refused() {
    let dir = scratch("huge");
    let big = dir.join("big.ron");
    std::fs::write(&big, vec![b' '; MAX_SPEC_BYTES as usize + 1]).unwrap();
    let e = RunSpec::read_file(&big).unwrap_err();
    assert!(
        e.contains("big.ron") && e.contains("larger than a spec may be"),
        "{e}"
    );
    let binary = dir.join("bin.ron");
    std::fs::write(&binary, b"Kv((\n\xff))").unwrap();
    let e = RunSpec::read_file(&binary).unwrap_err();
    assert!(e.contains("bin.ron:2: the spec is not UTF-8"), "{e}");
    let e = RunSpec::read_file(&dir.join("missing.ron")).unwrap_err();
    assert!(e.contains("missing.ron: cannot read the spec"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sized_pool_must_still_be_what_the_profiles_size() {
    let gpu = GpuProfile::resolve("h100").unwrap();
    let model = ModelProfile::resolve("llama-3.1-8b").unwrap();
    let sized = kv_sizing(&gpu, &model, 900_000, 16).unwrap();
    let RunSpec::Kv(mut spec) = RunSpec::from_ron(&kv_text()).unwrap() else {
        panic!("a kv spec")
    };
    spec.gpu_memory_utilization = Some(Fraction { ppm: 900_000 });
    spec.kv_blocks = sized.num_blocks;
    assert_eq!(spec.resolve().unwrap().sizing, Some(sized));
    spec.kv_blocks -= 1;
    let e = spec.resolve().unwrap_err();
    assert!(
        e.contains(&format!("set kv_blocks: {}", sized.num_blocks)),
        "{e}"
    );
    spec.gpu_memory_utilization = None;
    assert_eq!(spec.resolve().unwrap().sizing, None, "given, not sized");
    spec.kv_blocks = 1;
    assert!(spec
        .resolve()
        .unwrap_err()
        .contains("smaller than one block"));
}

#[test]
fn an_alloc_spec_names_each_strategy_once() {
    let mut spec = AllocSpec {
        trace: AllocTraceSpec::LlmServing { steps: 10 },
        seed: 0,
        strategy: vec![],
        capacity_bytes: 1 << 30,
        alignment_bytes: 512,
        page_bytes: 2 << 20,
        defrag: DefragMode::Off,
        check: false,
        pressure_thresholds: Thresholds::default(),
        execute: None,
        plot: None,
        export_trace: None,
        pytorch_alloc_conf: None,
        compare_segments: false,
    };
    assert!(spec.validate().unwrap_err().contains("at least one"));
    spec.strategy = vec![
        AllocStrategy::Tlsf,
        AllocStrategy::Buddy,
        AllocStrategy::Tlsf,
    ];
    assert!(spec
        .validate()
        .unwrap_err()
        .contains("'tlsf' is named twice"));
    spec.strategy.pop();
    assert_eq!(spec.validate(), Ok(()));
}

/// A CPU tier in a spec: read back with a bad policy named, its sizing checked against the
/// bytes it was sized from (and refused when the model no longer gives that many), and the
/// refusals vLLM makes.
#[test]
fn a_cpu_tier_is_read_and_checked() {
    let tier = |blocks: u64, bytes: &str, size: u64, policy: &str, latency: u64| {
        kv_with(
            "execute:",
            &format!(
                "    execute: None, cpu_offload: Some((cpu_offload_blocks: {blocks}, kv_offloading_bytes: {bytes}, offload_block_size: {size}, offload_policy: \"{policy}\", offload_latency_steps: {latency}, offload_all_tokens: false)),"
            ),
        )
    };
    let resolve = |text: &str| match RunSpec::from_ron(text).unwrap() {
        RunSpec::Kv(k) => k.resolve().map(|_| ()),
        _ => unreachable!(),
    };
    // Llama-3.1-8B: 2 MiB a block of 16 tokens, so 1 GiB is 512 CPU blocks of 16 tokens.
    let (ok, _) = tier(512, "Some(1073741824)", 16, "arc", 2);
    assert_eq!(resolve(&ok), Ok(()));
    let (text, _) = tier(500, "Some(1073741824)", 16, "lru", 0);
    let e = resolve(&text).unwrap_err();
    assert!(e.contains("is not the 512 CPU blocks"), "{e}");
    let (text, _) = tier(500, "None", 16, "lru", 0);
    assert_eq!(resolve(&text), Ok(()));
    let (text, _) = tier(500, "None", 20, "lru", 0);
    let e = resolve(&text).unwrap_err();
    assert!(e.contains("not a multiple of block_size 16"), "{e}");
    let (text, line) = tier(500, "None", 16, "fifo", 0);
    let e = RunSpec::from_ron(&text).unwrap_err();
    assert_eq!(e.line, line, "{e}");
    assert!(e.message.contains("known: lru, arc"), "{e}");
}
