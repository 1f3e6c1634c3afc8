//! `gpumem kv` with the KV cache's CPU tier (vLLM's OffloadingConnector): the conformance
//! command line against vLLM's golden step logs, the tier sized as vLLM sizes it, refused
//! configurations, the JSON fields, determinism, and the tier's copies on real memory with a
//! corrupted copy caught.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance")
        .join(name)
}

/// Every fixture with a CPU tier.
fn offload_fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.join("steps.jsonl").is_file()
                && p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("offload-")
        })
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "offload fixtures: {dirs:?}");
    dirs
}

/// The command line of a fixture's config, the tier's keys as their flags.
fn conformance_args(dir: &Path, step_log: &Path) -> Vec<String> {
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap().to_string();
    let mut args: Vec<String> = vec![
        "kv".into(),
        "--trace".into(),
        dir.join("workload.jsonl").to_str().unwrap().into(),
        "--format".into(),
        "conformance".into(),
        "--cost".into(),
        format!("fixed:{}", n("step_us")),
        "--step-log".into(),
        step_log.to_str().unwrap().into(),
    ];
    for (flag, key) in [
        ("--kv-blocks", "num_gpu_blocks"),
        ("--block-size", "block_size"),
        ("--max-num-seqs", "max_num_seqs"),
        ("--max-num-batched-tokens", "max_num_batched_tokens"),
        ("--max-model-len", "max_model_len"),
        ("--cpu-offload-blocks", "offload_cpu_blocks"),
        ("--offload-block-size", "offload_block_size"),
        ("--offload-latency-steps", "offload_latency_steps"),
    ] {
        if c.get(key).is_some() {
            args.extend([flag.to_string(), n(key)]);
        }
    }
    if let Some(p) = c["offload_policy"].as_str() {
        args.extend(["--offload-policy".into(), p.into()]);
    }
    if c["offload_prompt_only"] == false {
        args.push("--offload-all-tokens".into());
    }
    if c["enable_prefix_caching"] == false {
        args.push("--no-prefix-caching".into());
    }
    args
}

fn run_ok(args: &[&str]) -> String {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&run_ok(args)).expect("one JSON object")
}

#[test]
fn the_conformance_command_line_with_a_cpu_tier_writes_vllms_step_logs() {
    let dir = scratch_dir();
    let mut flags_seen = std::collections::BTreeSet::new();
    for case in offload_fixtures() {
        let name = case.file_name().unwrap().to_str().unwrap().to_string();
        let log = dir.join(format!("{name}.jsonl"));
        let args = conformance_args(&case, &log);
        flags_seen.extend(args.iter().filter(|a| a.starts_with("--")).cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(&args);
        let got = std::fs::read_to_string(&log).unwrap();
        let want = std::fs::read_to_string(case.join("steps.jsonl")).unwrap();
        assert!(
            got == want,
            "{name}: the step log differs from vLLM's ({} lines vs {})",
            got.lines().count(),
            want.lines().count()
        );
    }
    // The fixtures reach every flag of the tier.
    for flag in [
        "--cpu-offload-blocks",
        "--offload-block-size",
        "--offload-latency-steps",
        "--offload-policy",
        "--offload-all-tokens",
        "--no-prefix-caching",
    ] {
        assert!(flags_seen.contains(flag), "no fixture uses {flag}");
    }
}

#[test]
fn a_printed_spec_with_a_tier_runs_to_the_same_step_log() {
    let dir = scratch_dir();
    let case = fixture("offload-arc-k1-x2-all");
    let log = dir.join("flags.jsonl");
    let args = conformance_args(&case, &log);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec = run_ok(&[&args[..], &["--print-spec"]].concat());
    assert!(spec.contains("cpu_offload: Some("), "{spec}");
    assert!(spec.contains("offload_policy: \"arc\""), "{spec}");
    assert!(spec.contains("offload_all_tokens: true"), "{spec}");
    let spec = spec.replace("flags.jsonl", "spec.jsonl");
    std::fs::write(dir.join("spec.ron"), &spec).unwrap();
    let by_flags = run_ok(&args);
    let by_spec = run_ok(&["run", dir.join("spec.ron").to_str().unwrap()]);
    assert_eq!(by_flags, by_spec);
    let want = std::fs::read_to_string(case.join("steps.jsonl")).unwrap();
    for log in ["flags.jsonl", "spec.jsonl"] {
        assert!(
            std::fs::read_to_string(dir.join(log)).unwrap() == want,
            "{log}: not vLLM's step log"
        );
    }
}

#[test]
fn kv_offloading_size_sizes_the_tier_as_vllm_does() {
    let cpu_blocks = |extra: &[&str]| -> u64 {
        let v = json(&[&["kv", "--limit", "2", "--json"], extra].concat());
        v["config"]["cpu_offload"]["cpu_blocks"].as_u64().unwrap()
    };
    // Llama-3.1-8B: 128 KiB of KV per token, 2 MiB per block of 16 tokens.
    assert_eq!(cpu_blocks(&["--kv-offloading-size", "1"]), 512);
    assert_eq!(cpu_blocks(&["--kv-offloading-size", "0.5"]), 256);
    assert_eq!(cpu_blocks(&["--kv-offloading-size", "768MiB"]), 384);
    assert_eq!(
        cpu_blocks(&["--kv-offloading-size", "1", "--offload-block-size", "48"]),
        170
    );
    // A CPU block is rounded up to whole 4 KiB pages: 3 layers x 1 head x 100 x 2 bytes x 2
    // = 1,200 bytes a token, 19,200 a block of 16, 20,480 with its padding.
    let dir = scratch_dir();
    let model = dir.join("tiny.ron");
    std::fs::write(
        &model,
        "(name: \"tiny\", params: 1000000, layers: 3, attention_heads: 1, kv_heads: 1,\n\
         head_dim: 100, dtype_bytes: 2, max_model_len: 4096, activation_reserve_bytes: 0,\n\
         cudagraph_bytes_per_graph: 0)",
    )
    .unwrap();
    let tiny = model.to_str().unwrap();
    assert_eq!(
        cpu_blocks(&["--model", tiny, "--kv-offloading-size", "1"]),
        (1 << 30) / 20_480
    );
    let v = json(&[
        "kv",
        "--limit",
        "2",
        "--json",
        "--model",
        tiny,
        "--kv-offloading-size",
        "1",
    ]);
    let c = &v["config"]["cpu_offload"];
    assert_eq!(c["kv_bytes_per_block"], 19_200);
    assert_eq!(c["cpu_bytes"], 52_428 * 20_480);
}

#[test]
fn impossible_tiers_are_refused() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--offload-policy", "arc"],
            &["--offload-policy needs a CPU tier"],
        ),
        (
            &["--offload-all-tokens", "--offload-block-size", "32"],
            &["--offload-block-size, --offload-all-tokens needs a CPU tier"],
        ),
        (
            &["--cpu-offload-blocks", "8", "--offload-block-size", "24"],
            &[
                "offload_block_size 24 is not a multiple of block_size 16",
                "vLLM's OffloadingConnector rejects this",
            ],
        ),
        (
            &["--cpu-offload-blocks", "0"],
            &["cpu_offload_blocks must be at least 1"],
        ),
        (
            &["--cpu-offload-blocks", "99999999999"],
            &["cpu_offload_blocks 99999999999 exceeds gpumem's limit"],
        ),
        (
            &["--kv-offloading-size", "0.001"],
            &["holds no CPU block", "2097152 bytes"],
        ),
        (
            &["--cpu-offload-blocks", "8", "--offload-latency-steps", "3"],
            &[
                "offload_latency_steps 3 is the conformance clock's",
                "host link",
            ],
        ),
        (
            &[
                "--kv-blocks",
                "100",
                "--execute",
                "host",
                "--bytes-per-block",
                "4KiB",
                "--inject",
                "corrupt-offload",
            ],
            &["--inject corrupt-offload needs a CPU tier"],
        ),
    ];
    for (extra, needles) in cases {
        let args = [&["kv", "--limit", "2"], *extra].concat();
        assert_clean_error(&gpumem(&args), needles);
    }
    // Both sizes at once: clap's usage error.
    let out = gpumem(&[
        "kv",
        "--cpu-offload-blocks",
        "8",
        "--kv-offloading-size",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

/// The generated workload on a small pool: the tier stores, evicts and loads, the JSON fields
/// agree with each other and with the config, the same run twice prints the same bytes, and a
/// run without the tier has none of its fields.
#[test]
fn the_json_report_carries_the_tier() {
    let base = ["kv", "--limit", "300", "--kv-blocks", "400", "--json"];
    let tier = [
        &base[..],
        &["--cpu-offload-blocks", "800", "--offload-block-size", "32"],
    ]
    .concat();
    let text = run_ok(&tier);
    assert_eq!(text, run_ok(&tier), "not deterministic");
    let v: Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("no {k} in the report"))
    };
    assert!(u("cpu_hit_tokens") > 0);
    assert!(u("cpu_hit_admissions") > 0 && u("cpu_hit_admissions") <= u("requests"));
    assert!(u("cpu_evicted_blocks") > 0);
    assert!(u("offload_loaded_blocks") > 0);
    // Every store completes in a run that ends; the tier never holds more than it has.
    assert_eq!(u("cpu_stored_blocks"), u("offload_stored_blocks"));
    assert!(u("cpu_stored_blocks") - u("cpu_evicted_blocks") <= 800);
    let c = &v["config"]["cpu_offload"];
    assert_eq!(c["cpu_blocks"], 800);
    assert_eq!(c["offload_block_size"], 32);
    assert_eq!(c["offload_policy"], "lru");
    assert_eq!(c["offload_latency_steps"], Value::Null);
    let block = c["kv_bytes_per_block"].as_u64().unwrap();
    assert_eq!(block, 2 << 20);
    assert_eq!(u("bytes_to_cpu"), u("offload_stored_blocks") * 2 * block);
    assert!(u("bytes_from_cpu") <= u("offload_loaded_blocks") * 2 * block);
    assert!(u("bytes_from_cpu") >= u("cpu_hit_tokens") / 16 * block);
    assert_eq!(u("loads_refused") + u("stores_refused"), 0);

    let plain: Value = serde_json::from_str(&run_ok(&base)).unwrap();
    for k in ["cpu_hit_tokens", "bytes_to_cpu", "offload_stored_blocks"] {
        assert!(plain.get(k).is_none(), "{k} without a tier");
    }
    assert!(plain["config"].get("cpu_offload").is_none());

    let as_text: Vec<&str> = tier.iter().copied().filter(|a| *a != "--json").collect();
    let text = run_ok(&as_text);
    assert!(
        text.contains("CPU tier      800 blocks of 32 tokens"),
        "{text}"
    );
    assert!(text.contains("tokens hit in"), "{text}");
}

/// With --execute host every copy to and from the tier is made and checked: digests equal the
/// simulation's. A copy corrupted after it was stored is caught when it is loaded: the load
/// is refused (the request recomputes) and the run exits 1.
#[test]
fn the_tier_runs_on_host_memory_and_a_corrupt_copy_is_caught() {
    let dir = scratch_dir();
    let case = fixture("offload-lru-k1-x3-nocache");
    let args = conformance_args(&case, &dir.join("log.jsonl"));
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--execute", "host", "--bytes-per-block", "4KiB", "--json"]);
    let v = json(&args);
    assert_eq!(v["digest"], v["digest_simulated"]);
    assert_eq!(v["mismatches"], 0);
    let e = &v["execution"];
    let transfers = e["transfers"].as_u64().unwrap();
    // Every GPU block copied either way is one transfer (3 GPU blocks a CPU block).
    let moved = (v["bytes_to_cpu"].as_u64().unwrap() + v["bytes_from_cpu"].as_u64().unwrap())
        / v["config"]["cpu_offload"]["kv_bytes_per_block"]
            .as_u64()
            .unwrap();
    assert!(
        transfers >= moved && moved > 0,
        "{transfers} transfers, {moved} blocks"
    );
    assert_eq!(e["transfers_refused"], 0);

    args.extend(["--inject", "corrupt-offload:1"]);
    let out = gpumem(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["execution"]["injected_offload_corruptions"], 1);
    assert_eq!(v["loads_refused"], 1);
    assert_eq!(
        v["execution"]["first_mismatches"][0]["check"],
        "transfer-from"
    );
    assert!(v["mismatches"].as_u64().unwrap() > 0);
    // The refused load is not a hit: the run's decisions differ from the simulation's.
    assert_ne!(v["digest"], v["digest_simulated"]);
}
