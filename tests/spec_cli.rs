//! Run specs end to end: `gpumem alloc|kv … --print-spec > s.ron && gpumem run s.ron` prints
//! byte for byte what the flags print (JSON and text, digests included), on the built-in
//! workloads and on real traces; printed specs read back to themselves; bad specs are refused
//! with the file, line and field; relative paths resolve against the spec file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn gpumem_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("gpumem runs")
}

fn succeeded(args: &[&str]) -> Output {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    out
}

/// `args --print-spec`, written to a fresh file.
fn print_spec(args: &[&str]) -> ScratchFile {
    let out = succeeded(&[args, &["--print-spec"]].concat());
    let file = scratch_file("spec.ron");
    std::fs::write(&file, &out.stdout).unwrap();
    file
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The flags and their printed spec give the same stdout, with and without --json, and the
/// same exit code; returns the JSON report.
fn assert_spec_runs_as_flags(args: &[&str]) -> Value {
    let spec = print_spec(args);
    let spec = path_str(&spec);
    for json in [true, false] {
        let with_json = |a: &[&str]| -> Vec<String> {
            let mut a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            if json {
                a.push("--json".into());
            }
            a
        };
        let flags = with_json(args);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let run = with_json(&["run", spec]);
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        let (by_flags, by_spec) = (succeeded(&flags), succeeded(&run));
        assert!(!by_flags.stdout.is_empty(), "{args:?} printed nothing");
        assert!(
            by_flags.stdout == by_spec.stdout,
            "{args:?} (json {json}): the spec's output differs from the flags'\n--- flags\n{}\n--- spec\n{}",
            stdout(&by_flags),
            stdout(&by_spec)
        );
    }
    serde_json::from_str(&stdout(&succeeded(&[args, &["--json"]].concat()))).unwrap()
}

#[test]
fn a_kv_spec_prints_what_its_flags_print() {
    let mooncake = mooncake_conversation();
    let azure = azure_trace("conv");
    for args in [
        vec!["kv"],
        vec!["kv", "--trace", path_str(&mooncake), "--limit", "300"],
        vec![
            "kv",
            "--trace",
            path_str(&mooncake),
            "--limit",
            "200",
            "--gpu",
            "h200",
            "--model",
            "qwen2.5-7b",
            "--gpu-memory-utilization",
            "0.5",
            "--eviction",
            "leaf-lru",
            "--block-size",
            "32",
        ],
        vec![
            "kv",
            "--trace",
            path_str(&azure),
            "--limit",
            "300",
            "--kv-blocks",
            "400",
            "--cost",
            "fixed:1000",
            "--eviction",
            "arc",
            "--max-num-seqs",
            "16",
            "--no-prefix-caching",
            "--pressure-thresholds",
            "0.3,0.5",
            "--cudagraph-sizes",
            "auto",
        ],
    ] {
        let report = assert_spec_runs_as_flags(&args);
        assert!(report["digest"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(
            report["requests_finished"].as_u64().unwrap() > 0,
            "{args:?}"
        );
    }
}

#[test]
fn an_alloc_spec_prints_what_its_flags_print() {
    let snapshot = snapshot("yiyi_oom_snapshot.pickle");
    for args in [
        vec!["alloc", "--ops", "400"],
        vec![
            "alloc",
            "--generate",
            "occupancy",
            "--ops",
            "3000",
            "--capacity",
            "256MiB",
            "--occupancy",
            "70",
            "--strategy",
            "tlsf,buddy,best-fit",
            "--defrag",
            "on-failure",
            "--seed",
            "7",
        ],
        vec!["alloc", "--trace", path_str(&snapshot)],
    ] {
        let report = assert_spec_runs_as_flags(&args);
        let results = report["results"].as_array().unwrap();
        assert!(!results.is_empty(), "{args:?}");
        assert!(results.iter().all(|r| r["digest"].is_string()));
    }
}

/// The executor's timings are measured, so two runs differ there and only there.
fn without_timings(mut v: Value) -> Value {
    match v.get_mut("results") {
        Some(Value::Array(results)) => results.iter_mut().for_each(|r| {
            r["execution"].take();
        }),
        _ => {
            v["execution"].take();
        }
    }
    v
}

#[test]
fn execution_and_injected_faults_travel_in_the_spec() {
    let mooncake = mooncake_conversation();
    for (args, want_code) in [
        (
            vec![
                "kv",
                "--limit",
                "60",
                "--kv-blocks",
                "300",
                "--bytes-per-block",
                "4KiB",
                "--execute",
                "host",
            ],
            0,
        ),
        (
            vec![
                "kv",
                "--trace",
                path_str(&mooncake),
                "--limit",
                "200",
                "--kv-blocks",
                "3000",
                "--max-model-len",
                "40000",
                "--bytes-per-block",
                "4KiB",
                "--execute",
                "host",
                "--inject",
                "corrupt-block:1",
            ],
            1,
        ),
        (
            // A refused reservation changes the executed digest: exit 1 either way.
            vec![
                "alloc",
                "--generate",
                "occupancy",
                "--ops",
                "2000",
                "--capacity",
                "64MiB",
                "--strategy",
                "tlsf,caching",
                "--execute",
                "host",
                "--checkpoint-every",
                "500",
                "--inject",
                "refuse-alloc:1",
            ],
            1,
        ),
    ] {
        let spec = print_spec(&args);
        let by_flags = gpumem(&[&args[..], &["--json"]].concat());
        let by_spec = gpumem(&["run", path_str(&spec), "--json"]);
        assert_eq!(
            by_flags.status.code(),
            Some(want_code),
            "{args:?}: {}",
            stderr(&by_flags)
        );
        assert_eq!(
            by_spec.status.code(),
            Some(want_code),
            "{args:?}: {}",
            stderr(&by_spec)
        );
        let (f, s): (Value, Value) = (
            serde_json::from_str(&stdout(&by_flags)).unwrap(),
            serde_json::from_str(&stdout(&by_spec)).unwrap(),
        );
        if args[0] == "kv" && want_code == 1 {
            assert!(
                f["mismatches"].as_u64().unwrap() > 0,
                "the corruption is caught"
            );
        }
        assert_eq!(without_timings(f), without_timings(s), "{args:?}");
    }
}

#[test]
fn a_step_log_and_a_relative_trace_path_resolve_against_the_spec_file() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/exact-blocks");
    let dir = scratch_dir();
    std::fs::copy(case.join("workload.jsonl"), dir.join("workload.jsonl")).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("config.json")).unwrap()).unwrap();
    let knob = |key: &str| config[key].to_string();
    let conformance = |workload: &str, log: &str| -> Vec<String> {
        let mut args: Vec<String> = ["kv", "--trace", workload, "--step-log", log]
            .map(String::from)
            .to_vec();
        for (flag, key) in [
            ("--kv-blocks", "num_gpu_blocks"),
            ("--block-size", "block_size"),
            ("--max-num-seqs", "max_num_seqs"),
            ("--max-num-batched-tokens", "max_num_batched_tokens"),
            ("--max-model-len", "max_model_len"),
        ] {
            args.extend([flag.to_string(), knob(key)]);
        }
        args.extend(["--cost".into(), format!("fixed:{}", knob("step_us"))]);
        args
    };
    assert_eq!(config["enable_prefix_caching"], true);
    assert!(config.get("policy").is_none(), "FCFS");
    // Printed from inside the folder with relative paths; the spec holds absolute ones.
    let args = conformance("workload.jsonl", "flags.jsonl");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let printed = gpumem_in(&dir, &[&args[..], &["--print-spec"]].concat());
    assert!(printed.status.success(), "{}", stderr(&printed));
    let text = stdout(&printed);
    assert!(
        text.contains(&format!("\"{}\"", dir.join("workload.jsonl").display())),
        "{text}"
    );
    // A spec written by hand with paths relative to itself runs from any folder.
    let relative = text
        .replace(&format!("{}/", dir.display()), "")
        .replace("\"flags.jsonl\"", "\"spec.jsonl\"");
    assert!(relative.contains("path: \"workload.jsonl\""), "{relative}");
    std::fs::write(dir.join("spec.ron"), relative).unwrap();
    let by_spec = gpumem_in(Path::new("/"), &["run", path_str(&dir.join("spec.ron"))]);
    assert!(by_spec.status.success(), "{}", stderr(&by_spec));
    let by_flags = gpumem_in(&dir, &args);
    assert_eq!(stdout(&by_flags), stdout(&by_spec));
    let want = std::fs::read_to_string(case.join("steps.jsonl")).unwrap();
    for log in ["flags.jsonl", "spec.jsonl"] {
        let got = std::fs::read_to_string(dir.join(log)).unwrap();
        assert!(got == want, "{log}: not vLLM's step log");
    }
}

#[test]
fn a_printed_spec_reads_back_to_the_same_text_over_many_flag_combinations() {
    let mooncake = mooncake_conversation();
    let azure = azure_trace("code");
    let snapshot = snapshot("sketchkv2_my_snapshot.pickle");
    let dir = scratch_dir();
    let (plot, log) = (dir.join("p.svg"), dir.join("log.jsonl"));
    let gpu_file = dir.join("gpu.ron");
    std::fs::write(
        &gpu_file,
        "(name: \"my-gpu\", memory_bytes: 50000000000, flops_per_s: 400000000000000,\n\
         mem_bytes_per_s: 2000000000000, default_max_num_seqs: 128,\n\
         default_max_num_batched_tokens: 2048, links: (pcie_gen: 5))",
    )
    .unwrap();
    // Only the conformance format carries priorities.
    let priority_workload =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/exact-blocks/workload.jsonl");
    let combos: Vec<Vec<&str>> = vec![
        vec!["kv"],
        vec!["kv", "--seed", "3", "--limit", "10", "--eviction", "arc"],
        vec![
            "kv",
            "--pressure-thresholds",
            "0.5,0.8",
            "--cudagraph-sizes",
            "16,1,8",
        ],
        vec!["kv", "--cudagraph-sizes", "auto"],
        vec![
            "kv",
            "--kv-offloading-size",
            "0.5",
            "--offload-block-size",
            "32",
            "--offload-policy",
            "arc",
            "--offload-all-tokens",
        ],
        vec![
            "kv",
            "--cost",
            "fixed:500",
            "--cpu-offload-blocks",
            "300",
            "--offload-latency-steps",
            "2",
        ],
        vec![
            "kv",
            "--gpu",
            "a100-80gb",
            "--model",
            "mistral-7b",
            "--gpu-memory-utilization",
            "0.333333",
        ],
        vec![
            "kv",
            "--gpu",
            path_str(&gpu_file),
            "--model",
            "qwen2.5-7b",
            "--block-size",
            "8",
        ],
        vec![
            "kv",
            "--kv-blocks",
            "64",
            "--max-model-len",
            "100",
            "--cost",
            "fixed:20",
            "--trace",
            path_str(&priority_workload),
            "--format",
            "conformance",
            "--scheduling-policy",
            "priority",
        ],
        vec![
            "kv",
            "--trace",
            path_str(&mooncake),
            "--format",
            "mooncake",
            "--plot",
            path_str(&plot),
        ],
        vec![
            "kv",
            "--trace",
            path_str(&azure),
            "--step-log",
            path_str(&log),
            "--no-prefix-caching",
        ],
        vec![
            "kv",
            "--kv-blocks",
            "50",
            "--execute",
            "cuda",
            "--bytes-per-block",
            "1MiB",
            "--inject",
            "corrupt-block",
        ],
        vec![
            "kv",
            "--execute",
            "host",
            "--gpu",
            "l40s",
            "--model",
            "llama-3.1-8b",
        ],
        vec!["alloc"],
        vec!["alloc", "--pressure-thresholds", "0.6,1"],
        vec![
            "alloc",
            "--generate",
            "occupancy",
            "--capacity",
            "1GiB",
            "--alignment",
            "4KiB",
            "--page",
            "64KiB",
        ],
        vec![
            "alloc",
            "--trace",
            path_str(&snapshot),
            "--strategy",
            "caching-expandable,pool",
            "--check",
        ],
        vec![
            "alloc",
            "--ops",
            "10",
            "--export-trace",
            path_str(&log),
            "--plot",
            path_str(&plot),
        ],
        vec![
            "alloc",
            "--execute",
            "host",
            "--checkpoint-every",
            "9",
            "--inject",
            "corrupt-block:2",
            "--inject",
            "refuse-alloc",
            "--seed",
            "18446744073709551615",
        ],
    ];
    for args in combos {
        let first = succeeded(&[&args[..], &["--print-spec"]].concat());
        let again = succeeded(&[&args[..], &["--print-spec"]].concat());
        assert_eq!(
            first.stdout, again.stdout,
            "{args:?}: the printed spec is not deterministic"
        );
        let file = dir.join("combo.ron");
        std::fs::write(&file, &first.stdout).unwrap();
        let read_back = succeeded(&["run", path_str(&file), "--print-spec"]);
        assert!(
            first.stdout == read_back.stdout,
            "{args:?}: parse(print(spec)) != spec\n--- printed\n{}\n--- read back\n{}",
            stdout(&first),
            stdout(&read_back)
        );
    }
    let inlined = std::fs::read_to_string(dir.join("combo.ron")).unwrap();
    assert!(inlined.contains("refuse-alloc"), "{inlined}");
    let gpu = succeeded(&["kv", "--gpu", path_str(&gpu_file), "--print-spec"]);
    assert!(
        stdout(&gpu).contains("name: \"my-gpu\""),
        "a profile file is inlined"
    );
}

/// A spec printed by `kv --kv-blocks 100 --cost fixed:1000`, its `field` line replaced.
fn broken_spec(field: &str, line: &str) -> (ScratchFile, usize) {
    let spec = print_spec(&["kv", "--kv-blocks", "100", "--cost", "fixed:1000"]);
    let text = std::fs::read_to_string(&spec).unwrap();
    let at = text
        .lines()
        .position(|l| l.trim_start().starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in {text}"));
    let lines: Vec<&str> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i == at { line } else { l })
        .collect();
    std::fs::write(&spec, lines.join("\n")).unwrap();
    (spec, at + 1)
}

#[test]
fn a_bad_spec_is_refused_with_its_file_line_and_field() {
    for (field, line, path, says) in [
        ("seed:", "    sead: 0,", "Kv.sead", "unknown field `sead`"),
        (
            "kv_blocks:",
            "    kv_blocks: \"100\",",
            "Kv.kv_blocks",
            "Expected integer",
        ),
        (
            "prefix_caching:",
            "    prefix_caching: \"yes\",",
            "Kv.prefix_caching",
            "Expected boolean",
        ),
        (
            "eviction:",
            "    eviction: \"fifo\",",
            "Kv.eviction",
            "unknown eviction policy 'fifo'; known: lru, arc, leaf-lru",
        ),
        (
            "cost:",
            "    cost: \"fast\",",
            "Kv.cost",
            "unknown cost model",
        ),
        (
            "gpu:",
            "    gpu: \"h100.ron\",",
            "Kv.gpu",
            "unknown GPU 'h100.ron'",
        ),
        (
            "trace:",
            "    trace: Generated(requests: 10, seed: 1),",
            "Kv.trace",
            "unknown field `seed`",
        ),
    ] {
        let (spec, at) = broken_spec(field, line);
        let out = gpumem(&["run", path_str(&spec)]);
        let want = format!("{}:{at}:", spec.display());
        assert_clean_error(&out, &[&want, &format!(" {path}"), says]);
    }
    // Beyond what serde checks: the pool, named by its file.
    let (spec, _) = broken_spec("kv_blocks:", "    kv_blocks: 1,");
    let out = gpumem(&["run", path_str(&spec)]);
    assert_clean_error(
        &out,
        &[
            &format!("{}: kv_blocks 1", spec.display()),
            "smaller than one block",
        ],
    );
    let (spec, _) = broken_spec(
        "gpu_memory_utilization:",
        "    gpu_memory_utilization: Some(0.9),",
    );
    let out = gpumem(&["run", path_str(&spec)]);
    assert_clean_error(
        &out,
        &["kv_blocks 100 is not the", "gpu_memory_utilization: None"],
    );
    let (spec, _) = broken_spec(
        "execute:",
        "    execute: Some((device: \"host\", bytes_per_block: 4096, inject: [\"melt\"])),",
    );
    let out = gpumem(&["run", path_str(&spec)]);
    assert_clean_error(&out, &[&format!("{}: --inject melt", spec.display())]);
}

#[test]
fn what_is_not_a_spec_is_refused_without_reading_it_whole() {
    assert_clean_error(
        &gpumem(&["run", "/dev/zero"]),
        &["/dev/zero", "larger than a spec may be"],
    );
    assert_clean_error(
        &gpumem(&["run", "/nonexistent/s.ron"]),
        &["/nonexistent/s.ron", "cannot read"],
    );
    let dir = scratch_dir();
    let csv = dir.join("trace.ron");
    std::fs::write(&csv, "TIMESTAMP,ContextTokens,GeneratedTokens\n").unwrap();
    assert_clean_error(&gpumem(&["run", path_str(&csv)]), &["trace.ron:1:"]);
    let alloc = print_spec(&["alloc"]);
    let text = std::fs::read_to_string(&alloc).unwrap();
    std::fs::write(
        &alloc,
        text.replace("\"buddy\",", "\"buddy\",\n        \"slab\","),
    )
    .unwrap();
    assert_clean_error(
        &gpumem(&["run", path_str(&alloc)]),
        &["spec.ron:", "Alloc.strategy", "unknown strategy 'slab'"],
    );
}

#[test]
fn the_help_of_run_shows_a_spec_that_runs() {
    let help = stdout(&succeeded(&["run", "--help"]));
    let start = help.find("  Kv((").expect("an example spec in --help");
    let end = start + help[start..].find("\n  ))").expect("the example's end") + 5;
    let example: String = help[start..end]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let mooncake = mooncake_conversation();
    let dir = scratch_dir();
    std::fs::write(dir.join("spec.ron"), &example).unwrap();
    std::os::unix::fs::symlink(&mooncake, dir.join("conversation_trace.jsonl")).unwrap();
    // The help names the flags it came from: they print the same spec.
    let flags = [
        "kv",
        "--trace",
        "conversation_trace.jsonl",
        "--limit",
        "200",
        "--kv-blocks",
        "2000",
        "--bytes-per-block",
        "4KiB",
        "--execute",
        "host",
    ];
    assert!(help.contains(&flags[..7].join(" ")), "{help}");
    let printed = gpumem_in(&dir, &[&flags[..], &["--print-spec"]].concat());
    assert!(printed.status.success(), "{}", stderr(&printed));
    let abs = format!("\"{}\"", dir.join("conversation_trace.jsonl").display());
    assert!(
        stdout(&printed)
            .replace(&abs, "\"conversation_trace.jsonl\"")
            .contains(&example),
        "the help's example is not what --print-spec prints:\n{example}\n---\n{}",
        stdout(&printed)
    );
    let run = gpumem(&["run", path_str(&dir.join("spec.ron")), "--json"]);
    assert!(run.status.success(), "{}", stderr(&run));
}

#[test]
fn models_and_colocate_specs_print_what_their_flags_print() {
    let dir = scratch_dir();
    let trace = dir.join("models.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            let model = ["llama-3.1-8b", "qwen2.5-7b"][i % 2];
            format!(
                "{{\"timestamp\": {}, \"input_length\": 600, \"output_length\": 8, \"hash_ids\": [{i}, 1], \"model\": \"{model}\"}}",
                i * 300
            )
        })
        .collect();
    std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
    let train = snapshot("yiyi_1.3b_snapshot.pickle");
    let serve = mooncake_conversation();
    for args in [
        vec!["models", "--requests", "30"],
        vec![
            "models",
            "--trace",
            path_str(&trace),
            "--limit",
            "10",
            "--models",
            "llama-3.1-8b,qwen2.5-7b",
        ],
        vec![
            "colocate",
            "--train",
            path_str(&train),
            "--serve",
            path_str(&serve),
            "--limit",
            "50",
        ],
    ] {
        assert_spec_runs_as_flags(&args);
        let spec = print_spec(&args);
        let read_back = succeeded(&["run", path_str(&spec), "--print-spec"]);
        assert!(
            read_back.stdout == std::fs::read(&spec).unwrap(),
            "{args:?}"
        );
        let text = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(&spec, text.replacen("    seed:", "    sead:", 1)).unwrap();
        let out = gpumem(&["run", path_str(&spec)]);
        assert_clean_error(&out, &[&spec.display().to_string(), "unknown field `sead`"]);
    }
}
