//! `gpumem sweep kv|alloc` and `gpumem sweep merge` end to end: thread counts change no byte,
//! shards run as separate processes merge into the unsharded bytes, a point's report is its
//! single run's, and missing, duplicate or foreign shards are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn gpumem_with_threads(threads: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .env("RAYON_NUM_THREADS", threads)
        .args(args)
        .output()
        .expect("gpumem runs")
}

fn succeeded(out: Output) -> Output {
    assert!(out.status.success(), "failed: {}", stderr(&out));
    out
}

/// A kv sweep of 6 points over the first requests of the Mooncake conversation trace.
fn kv_sweep(trace: &Path) -> Vec<String> {
    [
        "sweep",
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "120",
        "--axis",
        "replicas=1,2,3",
        "--axis=router=round-robin,kv-aware:0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn lines(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn the_thread_count_changes_no_byte() {
    let args = kv_sweep(&mooncake_conversation());
    let one = succeeded(gpumem_with_threads("1", &strs(&args)));
    let two = succeeded(gpumem_with_threads("2", &strs(&args)));
    assert!(one.stdout == two.stdout, "1 and 2 threads differ");
    let points = lines(&one.stdout);
    assert_eq!(points.len(), 6);
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p["point"], i);
        assert_eq!(p["points"], 6);
        assert_eq!(p["sweep"], points[0]["sweep"]);
        // The last axis varies fastest.
        assert_eq!(p["axes"]["replicas"], ["1", "2", "3"][i / 2]);
        assert_eq!(p["spec"]["replicas"], [1, 2, 3][i / 2]);
        let replicas = p["report"]["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), i / 2 + 1);
        assert_eq!(p["report"]["requests"], 120);
    }
    assert_ne!(points[2]["report"]["digest"], points[3]["report"]["digest"]);
}

#[test]
fn a_points_report_is_its_single_runs() {
    let trace = mooncake_conversation();
    let out = succeeded(gpumem(&strs(&kv_sweep(&trace))));
    let point = &lines(&out.stdout)[3];
    assert_eq!(point["axes"]["router"], "kv-aware:0.5");
    let single = succeeded(gpumem(&[
        "kv",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "120",
        "--replicas",
        "2",
        "--router",
        "kv-aware:0.5",
        "--json",
    ]));
    let single: Value = serde_json::from_slice(&single.stdout).unwrap();
    assert_eq!(point["report"], single);
}

/// Runs `args --shard i/n --out DIR/shard-i.jsonl` for every i as separate processes at
/// once, as a batch scheduler's array tasks would.
fn run_shards(args: &[String], n: usize, dir: &Path) -> Vec<PathBuf> {
    let children: Vec<_> = (0..n)
        .map(|i| {
            let file = dir.join(format!("shard-{i}.jsonl"));
            let child = Command::new(env!("CARGO_BIN_EXE_gpumem"))
                .args(args)
                .args(["--shard", &format!("{i}/{n}"), "--out"])
                .arg(&file)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("gpumem starts");
            (file, child)
        })
        .collect();
    children
        .into_iter()
        .map(|(file, child)| {
            succeeded(child.wait_with_output().unwrap());
            file
        })
        .collect()
}

fn merge(files: &[&PathBuf], out: &Path) -> Output {
    let mut args: Vec<&str> = vec!["sweep", "merge"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap()]);
    gpumem(&args)
}

#[test]
fn shards_run_as_separate_processes_merge_into_the_unsharded_bytes() {
    let dir = scratch_dir();
    let args = kv_sweep(&mooncake_conversation());
    let whole = succeeded(gpumem(&strs(&args))).stdout;
    // 4 shards of 6 points: two hold two points, two hold one.
    let shards = run_shards(&args, 4, &dir);
    let merged = dir.join("merged.jsonl");
    let order: Vec<&PathBuf> = [3, 1, 0, 2].iter().map(|&i| &shards[i]).collect();
    succeeded(merge(&order, &merged));
    assert!(std::fs::read(&merged).unwrap() == whole);
    // More shards than points: some are empty, and the merge still is the whole.
    let many = dir.join("many");
    std::fs::create_dir_all(&many).unwrap();
    let shards8 = run_shards(&args, 8, &many);
    assert!(std::fs::read(&shards8[7]).unwrap().is_empty());
    succeeded(merge(&shards8.iter().collect::<Vec<_>>(), &merged));
    assert!(std::fs::read(&merged).unwrap() == whole);
}

#[test]
fn missing_duplicate_and_foreign_shards_are_refused() {
    let dir = scratch_dir();
    let args = kv_sweep(&mooncake_conversation());
    let shards = run_shards(&args, 3, &dir);
    let merged = dir.join("merged.jsonl");
    std::fs::write(&merged, "left alone\n").unwrap();
    let out = merge(&[&shards[0], &shards[2]], &merged);
    assert_clean_error(
        &out,
        &["2 of 6 points missing (1, 4)", "a shard is missing"],
    );
    let out = merge(&[&shards[0], &shards[1], &shards[1], &shards[2]], &merged);
    assert_clean_error(&out, &["point 1 twice", "shard-1.jsonl:1"]);
    // A shard of another sweep (another limit) does not join.
    let mut other = args.clone();
    other[5] = "121".into();
    let foreign_dir = dir.join("other");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let foreign = run_shards(&other, 3, &foreign_dir);
    let out = merge(&[&shards[0], &foreign[1], &shards[2]], &merged);
    assert_clean_error(&out, &["another sweep", "shard-1.jsonl:1"]);
    let junk = dir.join("junk.jsonl");
    std::fs::write(&junk, "{\"not\": \"a sweep\"}\n").unwrap();
    assert_clean_error(
        &merge(&[&junk], &merged),
        &["junk.jsonl:1", "not a sweep line"],
    );
    assert_eq!(std::fs::read_to_string(&merged).unwrap(), "left alone\n");
}

#[test]
fn an_alloc_sweep_runs_its_points() {
    let args = [
        "sweep",
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "3000",
        "--capacity",
        "64MiB",
        "--strategy",
        "tlsf,buddy",
        "--axis",
        "occupancy=50,90",
        "--axis",
        "check=true,false",
    ];
    let one = succeeded(gpumem_with_threads("1", &args));
    assert!(one.stdout == succeeded(gpumem_with_threads("2", &args)).stdout);
    let points = lines(&one.stdout);
    assert_eq!(points.len(), 4);
    assert_eq!(points[0]["spec"]["check"], true);
    assert_eq!(points[1]["spec"]["check"], false);
    assert_eq!(points[3]["axes"]["occupancy"], "90");
    assert_eq!(points[0]["report"]["results"].as_array().unwrap().len(), 2);
    assert_ne!(points[0]["report"], points[2]["report"]);
}

#[test]
fn bad_sweeps_are_refused_before_any_run() {
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--axis", "bogus=1,2"], &["--axis bogus: not a flag"]),
        (&["--axis", "eviction"], &["no '='"]),
        (
            &["--axis", "kv-blocks=1,100"],
            &["point 0 (kv-blocks=1)", "kv_blocks 1"],
        ),
        (
            &["--axis", "eviction=lru,fifo"],
            &["point 1 (eviction=fifo)"],
        ),
        (
            &["--eviction", "arc", "--axis", "eviction=lru"],
            &["sets --eviction too"],
        ),
        (&["--axis", "no-prefix-caching=yes"], &["true,false"]),
        (&["--shard", "4/4"], &["--shard 4/4"]),
    ];
    let dir = scratch_dir();
    let out_file = dir.join("never.jsonl");
    for (extra, needles) in cases {
        let out = gpumem(
            &[
                &[
                    "sweep",
                    "kv",
                    "--limit",
                    "5",
                    "--out",
                    out_file.to_str().unwrap(),
                ],
                extra,
            ]
            .concat(),
        );
        assert_clean_error(&out, needles);
        assert!(!out_file.exists(), "{extra:?} wrote its output");
    }
    assert_clean_error(&gpumem(&["sweep", "kv", "--json"]), &["--json"]);
}

#[test]
fn a_printed_sweep_runs_as_its_flags_and_resolves_against_its_folder() {
    let dir = scratch_dir();
    // A link beside the spec, named relatively in it: the spec and its trace move together.
    let link = dir.join("trace.jsonl");
    std::os::unix::fs::symlink(mooncake_conversation(), &link).unwrap();
    let mut args = kv_sweep(&link);
    let by_flags = succeeded(gpumem(&strs(&args))).stdout;
    args.push("--print-spec".into());
    let printed = stdout(&succeeded(gpumem(&strs(&args))));
    assert!(
        printed.contains(&format!("\"{}\"", link.display())),
        "{printed}"
    );
    let relative = printed.replace(&format!("\"{}\"", link.display()), "\"trace.jsonl\"");
    let spec = dir.join("sweep.ron");
    std::fs::write(&spec, &relative).unwrap();
    let elsewhere = Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .current_dir(std::env::temp_dir())
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(succeeded(elsewhere).stdout == by_flags);
    // Read back, it prints itself with the path made absolute again.
    let again = succeeded(gpumem(&["sweep", spec.to_str().unwrap(), "--print-spec"]));
    assert_eq!(stdout(&again), printed);
    let shard = succeeded(gpumem(&["sweep", spec.to_str().unwrap(), "--shard", "1/2"]));
    assert_eq!(lines(&shard.stdout).len(), 3);
}

#[test]
fn a_bad_sweep_spec_names_its_file_line_and_field() {
    let dir = scratch_dir();
    let spec = dir.join("bad.ron");
    let cases: [(&str, &[&str]); 4] = [
        (
            "(subcommand: \"kv\", flags: [],\n axes: [(flag: \"eviction\", value: [\"lru\"])])",
            &["bad.ron:2:", "axes[0]", "unknown field `value`"],
        ),
        ("(subcommand: \"train\", flags: [], axes: [])", &["subcommand \"train\""]),
        (
            "(subcommand: \"kv\", flags: [\"--axis\", \"eviction=lru\"], axes: [])",
            &["axes go in `axes`"],
        ),
        (
            "(subcommand: \"kv\", flags: [\"--limit\", \"5\"], axes: [(flag: \"eviction\", values: [\"lru\", \"fifo\"])])",
            &["point 1 (eviction=fifo)"],
        ),
    ];
    for (text, needles) in cases {
        std::fs::write(&spec, text).unwrap();
        assert_clean_error(&gpumem(&["sweep", spec.to_str().unwrap()]), needles);
    }
}

#[test]
fn a_snapshot_swept_through_caching_starts_as_alloc_starts_it() {
    // One replay path: each point's report is `gpumem alloc --json` at its capacity, and the
    // caching strategy starts from the recorded state where it fits (80 GiB), empty where the
    // 4,238,344,192 bytes held before the first event do not (3 GiB).
    let trace = snapshot("cs336_bcrafton_memory_snapshot.pickle");
    let trace = trace.to_str().unwrap();
    let out = succeeded(gpumem(&[
        "sweep",
        "alloc",
        "--trace",
        trace,
        "--strategy",
        "caching",
        "--axis",
        "capacity=3GiB,80GiB",
    ]));
    let points: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("report").is_some())
        .collect();
    assert_eq!(points.len(), 2);
    for (point, (capacity, start, peak)) in points.iter().zip([
        ("3GiB", "empty", 2_151_677_952u64),
        ("80GiB", "recorded", 4_238_344_192),
    ]) {
        let single = succeeded(gpumem(&[
            "alloc",
            "--trace",
            trace,
            "--strategy",
            "caching",
            "--capacity",
            capacity,
            "--json",
        ]));
        let single: Value = serde_json::from_str(&stdout(&single)).unwrap();
        assert_eq!(point["report"], single, "{capacity}");
        let r = &single["results"][0];
        assert_eq!(r["start"], start, "{capacity}: {r}");
        assert_eq!(r["bytes_reserved_peak"], peak, "{capacity}");
    }
}

#[test]
fn a_sweep_is_plotted_one_line_per_series_value_and_bad_names_are_refused() {
    let dir = scratch_dir();
    let sweep_file = dir.join("fleet.jsonl");
    let mut args = kv_sweep(&mooncake_conversation());
    args.extend([
        "--out".to_string(),
        sweep_file.to_str().unwrap().to_string(),
    ]);
    succeeded(gpumem(&strs(&args)));
    let svg_file = dir.join("ttft.svg");
    let plot = |extra: &[&str]| {
        let mut a = vec!["sweep", "plot", sweep_file.to_str().unwrap()];
        a.extend_from_slice(extra);
        gpumem(&a)
    };
    let svg_arg = svg_file.to_str().unwrap();
    let flags = [
        "--metric",
        "ttft_us.p99",
        "--x",
        "replicas",
        "--series",
        "router",
        "--out",
        svg_arg,
    ];
    succeeded(plot(&flags));
    let svg = std::fs::read_to_string(&svg_file).unwrap();
    for text in [
        "ttft_us.p99 by replicas, one line per router",
        "round-robin",
        "kv-aware:0.5",
    ] {
        assert!(svg.contains(text), "no '{text}' in the plot");
    }
    // One line of three points (replicas 1, 2, 3) per router.
    let three_point_lines = svg
        .split("<polyline")
        .skip(1)
        .filter(|p| {
            let points = p
                .split("points=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            points.split_whitespace().count() == 3
        })
        .count();
    assert_eq!(three_point_lines, 2, "{svg}");
    succeeded(plot(&flags));
    assert_eq!(
        std::fs::read_to_string(&svg_file).unwrap(),
        svg,
        "not deterministic"
    );

    let no_axis = plot(&[
        "--metric",
        "ttft_us.p99",
        "--x",
        "kv-blocks",
        "--out",
        svg_arg,
    ]);
    assert_clean_error(
        &no_axis,
        &["fleet.jsonl:1", "no axis 'kv-blocks'", "replicas, router"],
    );
    let no_metric = plot(&[
        "--metric",
        "ttft_us.p100",
        "--x",
        "replicas",
        "--out",
        svg_arg,
    ]);
    assert_clean_error(
        &no_metric,
        &["fleet.jsonl:1", "no 'ttft_us.p100'", "ttft_us"],
    );
    let not_a_number = plot(&["--metric", "ttft_us", "--x", "replicas", "--out", svg_arg]);
    assert_clean_error(&not_a_number, &["metric 'ttft_us' is not a number"]);
    let same = plot(&[
        "--metric", "steps", "--x", "router", "--series", "router", "--out", svg_arg,
    ]);
    assert_clean_error(&same, &["name two axes"]);
}
