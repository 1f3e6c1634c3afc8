//! `gpumem kv` end to end: the conformance command line against vLLM's golden step logs,
//! determinism, reports on the real Mooncake and Azure traces, bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn json_report(args: &[&str]) -> Value {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance")
        .join(name)
}

/// The conformance command line for a fixture's config.
fn conformance_args(dir: &Path, step_log: &Path) -> Vec<String> {
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut args: Vec<String> = [
        "kv",
        "--trace",
        dir.join("workload.jsonl").to_str().unwrap(),
        "--format",
        "conformance",
        "--engine",
        "vllm-0.33",
        "--cost",
        &format!("fixed:{}", c["step_us"]),
        "--kv-blocks",
        &c["num_gpu_blocks"].to_string(),
        "--block-size",
        &c["block_size"].to_string(),
        "--max-num-seqs",
        &c["max_num_seqs"].to_string(),
        "--max-num-batched-tokens",
        &c["max_num_batched_tokens"].to_string(),
        "--max-model-len",
        &c["max_model_len"].to_string(),
        "--step-log",
        step_log.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    if c["enable_prefix_caching"] == false {
        args.push("--no-prefix-caching".into());
    }
    if let Some(policy) = c["policy"].as_str() {
        args.extend(["--scheduling-policy".into(), policy.into()]);
    }
    args
}

#[test]
fn the_conformance_command_line_writes_vllms_step_logs() {
    let dir = scratch_dir();
    for name in [
        "exact-blocks",
        "preempt-evict",
        "hol-blocking",
        "no-prefix-caching",
        "random-3",
        "mooncake-500-small",
        "priority-pressure-2",
    ] {
        let case = fixture(name);
        let log = dir.join(format!("{name}.jsonl"));
        let args = conformance_args(&case, &log);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if name == "no-prefix-caching" || name == "random-3" {
            assert!(args.contains(&"--no-prefix-caching"), "{name}");
        }
        let out = gpumem(&args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let got = std::fs::read_to_string(&log).unwrap();
        let want = std::fs::read_to_string(case.join("steps.jsonl")).unwrap();
        assert!(
            got == want,
            "{name}: the step log differs from vLLM's ({} lines vs {})",
            got.lines().count(),
            want.lines().count()
        );
    }
}

#[test]
fn the_conformance_format_refuses_what_vllm_refuses() {
    let dir = scratch_dir();
    let too_long = fixture("error-prompt-too-long");
    let args = conformance_args(&too_long, &dir.join("a.jsonl"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_clean_error(
        &gpumem(&args),
        &[
            "gpumem: error: ",
            "error-prompt-too-long/workload.jsonl:2: prompt length 60 >= max_model_len 60",
        ],
    );
    let small = fixture("error-pool-too-small");
    let args = conformance_args(&small, &dir.join("b.jsonl"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_clean_error(&gpumem(&args), &["exceeds the KV pool"]);
}

#[test]
fn the_default_run_needs_no_data() {
    let out = gpumem(&["kv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "generated:serving seed=0",
        "vllm-0.33",
        "h100 / llama-3.1-8b",
        "prefix cache  hit rate",
        "TTFT",
        "TPOT",
        "digest",
    ] {
        assert!(text.contains(needle), "report lacks {needle:?}:\n{text}");
    }
}

#[test]
fn two_runs_give_byte_identical_json() {
    let trace = mooncake_conversation();
    let args = [
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "400",
        "--kv-blocks",
        "3000",
        "--json",
    ];
    let (a, b) = (gpumem(&args), gpumem(&args));
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
    let generated = ["kv", "--limit", "300", "--seed", "7", "--json"];
    assert_eq!(gpumem(&generated).stdout, gpumem(&generated).stdout);
    let other = ["kv", "--limit", "300", "--seed", "8", "--json"];
    assert_ne!(gpumem(&generated).stdout, gpumem(&other).stdout);
}

#[test]
fn the_json_carries_the_fields_programs_rely_on() {
    let r = json_report(&["kv", "--limit", "200", "--json"]);
    for key in [
        "requests",
        "requests_finished",
        "requests_rejected",
        "prompt_tokens",
        "prefix_hit_tokens",
        "preemptions",
        "blocks_evicted",
        "steps",
        "sim_time_us",
        "kv_blocks",
        "kv_blocks_used_peak",
    ] {
        assert!(r[key].is_u64(), "{key} in {r}");
    }
    for key in ["prefix_hit_rate", "throughput_tokens_per_s"] {
        assert!(r[key].is_f64(), "{key} in {r}");
    }
    for key in ["ttft_us", "tpot_us"] {
        for p in ["p50", "p90", "p99"] {
            assert!(r[key][p].is_u64(), "{key}.{p} in {r}");
        }
        assert!(r[key]["p50"].as_u64() <= r[key]["p99"].as_u64());
    }
    assert_eq!(r["digest"].as_str().unwrap().len(), 32);
    assert_eq!(r["requests"], 200);
    assert_eq!(r["requests_finished"], 200);
    let rate = r["prefix_hit_rate"].as_f64().unwrap();
    assert!(rate > 0.2 && rate < 1.0, "shared prefixes hit: {rate}");
    let timeline = r["timeline"].as_array().unwrap();
    assert!(!timeline.is_empty() && timeline.len() <= 48);
}

/// The report without its timeline (checked apart: 48 points are too many to review).
fn snapshot_report(args: &[&str]) -> Value {
    let mut r = json_report(args);
    let timeline = r.as_object_mut().unwrap().remove("timeline").unwrap();
    let points = timeline.as_array().unwrap();
    assert!(!points.is_empty());
    let last = &points[points.len() - 1];
    assert_eq!(last["t_us"], r["sim_time_us"]);
    assert_eq!(last["running"], 0);
    assert_eq!(last["waiting"], 0);
    r
}

#[test]
fn reports_on_the_mooncake_and_azure_traces() {
    let mooncake = mooncake_conversation();
    let r = snapshot_report(&[
        "kv",
        "--trace",
        mooncake.to_str().unwrap(),
        "--limit",
        "1000",
        "--json",
    ]);
    insta::assert_json_snapshot!("mooncake_conversation_1000_h100_llama8b", r);

    let code = azure_trace("code");
    let r = snapshot_report(&[
        "kv",
        "--trace",
        code.to_str().unwrap(),
        "--limit",
        "4000",
        "--json",
    ]);
    insta::assert_json_snapshot!("azure_code_4000_h100_llama8b", r);

    // A smaller GPU and pool: preemptions and a queue.
    let conv = azure_trace("conv");
    let r = snapshot_report(&[
        "kv",
        "--trace",
        conv.to_str().unwrap(),
        "--limit",
        "4000",
        "--gpu",
        "l40s",
        "--model",
        "qwen2.5-7b",
        "--kv-blocks",
        "1200",
        "--json",
    ]);
    insta::assert_json_snapshot!("azure_conv_4000_l40s_qwen7b_1200_blocks", r);
}

#[test]
fn too_long_requests_are_rejected_and_counted() {
    let dir = scratch_dir();
    let trace = dir.join("long.jsonl");
    let ids = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    std::fs::write(
        &trace,
        format!(
            "{{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [{}]}}\n\
             {{\"timestamp\": 10, \"input_length\": 40000, \"output_length\": 10, \"hash_ids\": [{}]}}\n\
             {{\"timestamp\": 20, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [{}]}}\n",
            ids(2),
            ids(79),
            ids(2)
        ),
    )
    .unwrap();
    let r = json_report(&[
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--model",
        "qwen2.5-7b",
        "--json",
    ]);
    assert_eq!(r["requests"], 3);
    assert_eq!(r["requests_rejected"], 1);
    assert_eq!(r["requests_finished"], 2);
    assert_eq!(r["config"]["max_model_len"], 32768);
    // The third request has the first one's prompt: its 62 full 16-token blocks hit (the
    // last token is never a hit).
    assert_eq!(r["prefix_hit_tokens"], 992);
}

#[test]
fn bad_input_is_a_clear_error_naming_file_and_line() {
    let dir = scratch_dir();
    let ok = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1]}\n";
    let cases: [(&str, String, &[&str]); 6] = [
        ("malformed.jsonl", format!("{ok}{ok}{{\"timestamp\": 5,\n"), &["malformed.jsonl:3: column 16: bad JSON: EOF while parsing"]),
        ("wrong-type.jsonl", format!("{ok}{{\"timestamp\": 0, \"input_length\": \"10\", \"output_length\": 2, \"hash_ids\": [1]}}\n"), &["wrong-type.jsonl:2: 'input_length' must be a non-negative integer"]),
        ("negative.jsonl", "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": -2, \"hash_ids\": [1]}\n".to_string(), &["negative.jsonl:1: 'output_length' is negative (-2)"]),
        ("negative.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,-4808,10\n".to_string(), &["negative.csv:2: ContextTokens is negative"]),
        ("short-row.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808\n".to_string(), &["short-row.csv:2: expected 3 fields, got 2"]),
        ("unknown.txt", "hello\n".to_string(), &["unknown.txt:1: cannot tell the workload format"]),
    ];
    for (name, text, mentions) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = gpumem(&["kv", "--trace", path.to_str().unwrap()]);
        let mut want = vec!["gpumem: error: "];
        want.extend_from_slice(mentions);
        assert_clean_error(&out, &want);
    }
    let missing = gpumem(&["kv", "--trace", "/nonexistent/trace.jsonl"]);
    assert_clean_error(&missing, &["/nonexistent/trace.jsonl"]);
}

#[test]
fn impossible_pools_and_configs_are_refused() {
    assert_clean_error(
        &gpumem(&["kv", "--kv-blocks", "1"]),
        &["smaller than one block"],
    );
    assert_clean_error(
        &gpumem(&["kv", "--model", "llama-3.1-70b"]),
        &["no room for the KV cache"],
    );
    assert_clean_error(
        &gpumem(&["kv", "--gpu-memory-utilization", "0.1"]),
        &["no room for the KV cache"],
    );
    assert_clean_error(
        &gpumem(&["kv", "--kv-blocks", "10", "--max-model-len", "1000"]),
        &["max_model_len 1000 exceeds the KV pool"],
    );
    assert_clean_error(
        &gpumem(&["kv", "--gpu", "tpu-v5"]),
        &["unknown GPU", "h100"],
    );
    assert_clean_error(&gpumem(&["kv", "--cost", "magic"]), &["unknown cost model"]);
    // clap's own refusals exit 2 as well.
    for args in [
        ["kv", "--eviction", "random"],
        ["kv", "--engine", "sglang"],
        ["kv", "--format", "parquet"],
        ["kv", "--gpu-memory-utilization", "1.5"],
    ] {
        assert_eq!(gpumem(&args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn plot_and_step_log_are_written_for_any_format() {
    let dir = scratch_dir();
    let svg = dir.join("kv.svg");
    let log = dir.join("steps.jsonl");
    let conv = azure_trace("conv");
    let out = gpumem(&[
        "kv",
        "--trace",
        conv.to_str().unwrap(),
        "--limit",
        "200",
        "--plot",
        svg.to_str().unwrap(),
        "--step-log",
        log.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("waiting"));
    let log = std::fs::read_to_string(&log).unwrap();
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 0);
    assert_eq!(first["admitted"][0][0], "r0");
}

/// A trace read from a pipe (read once, lazily) gives the report the file gives, its format
/// named or told from its first line (which the run then reads on from), as `-` or as
/// `/dev/stdin`.
#[test]
fn a_pipe_is_a_trace_too() {
    let trace = mooncake_conversation();
    let args = ["--limit", "300", "--kv-blocks", "3000", "--json"];
    let mut from_file = vec!["kv", "--trace", trace.to_str().unwrap()];
    from_file.extend(args);
    let file = json_report(&from_file);
    assert_eq!(file["requests"], 300);
    let bytes = std::fs::read(&trace).unwrap();
    for (name, format) in [("-", Some("mooncake")), ("-", None), ("/dev/stdin", None)] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gpumem"));
        command.args(["kv", "--trace", name]).args(args);
        if let Some(format) = format {
            command.args(["--format", format]);
        }
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        let bytes = bytes.clone();
        // gpumem stops reading after 300 requests: the rest of the write may find the pipe
        // closed.
        let writer = std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut pipe, &bytes);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "{name} {format:?}: {}", stderr(&out));
        let mut piped: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(piped["config"]["trace"], name.rsplit('/').next().unwrap());
        piped["config"]["trace"] = file["config"]["trace"].clone();
        assert_eq!(piped, file, "{name} {format:?}");
    }
}

#[test]
fn vllms_own_flag_spellings_are_accepted() {
    let base = ["kv", "--limit", "30", "--json"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        json_report(&args)
    };
    let plain = with(&[]);
    let off = with(&["--no-prefix-caching"]);
    assert_eq!(with(&["--no-enable-prefix-caching"]), off);
    assert_eq!(with(&["--enable-prefix-caching"]), plain);
    // The last of the two wins, as vLLM's argparse does.
    assert_eq!(
        with(&["--no-enable-prefix-caching", "--enable-prefix-caching"]),
        plain
    );
    assert_eq!(
        with(&["--num-gpu-blocks-override", "500"]),
        with(&["--kv-blocks", "500"])
    );
    assert_eq!(plain["config"]["scheduling_policy"], "fcfs");
}

#[test]
fn flags_without_effect_are_refused_and_the_policy_is_shown() {
    assert_clean_error(
        &gpumem(&["kv", "--bytes-per-block", "4KiB"]),
        &["--bytes-per-block needs --execute"],
    );
    let conv = mooncake_conversation();
    let priority = [
        "kv",
        "--trace",
        conv.to_str().unwrap(),
        "--scheduling-policy",
        "priority",
    ];
    assert_clean_error(&gpumem(&priority), &["only the conformance format carries"]);
    let text = stdout(&gpumem(&["kv", "--limit", "10"]));
    assert!(text.contains("scheduler     fcfs,"), "{text}");
}

#[test]
fn a_refused_run_leaves_an_existing_step_log_alone() {
    let dir = scratch_dir();
    let log = dir.join("steps.jsonl");
    std::fs::write(&log, "a log from an earlier run\n").unwrap();
    let out = gpumem(&[
        "kv",
        "--max-num-seqs",
        "0",
        "--step-log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "a log from an earlier run\n"
    );
    // No temporary file stays behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A completed run replaces it.
    let ok = gpumem(&["kv", "--limit", "5", "--step-log", log.to_str().unwrap()]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .starts_with("{\"step\":"));
    // An output that cannot be written is found before the run.
    let unwritable = gpumem(&["kv", "--limit", "5", "--plot", "/nonexistent/kv.svg"]);
    assert_clean_error(&unwritable, &["/nonexistent/kv.svg", "cannot write here"]);
}
