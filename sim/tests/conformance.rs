//! Replays every fixture under `tests/conformance/` (golden step logs written by vLLM 0.33.0's
//! own scheduler, see `tests/conformance/regenerate.sh`) through the `vllm-0.33` personality and
//! compares the step logs line by line. A case with `expected_error.txt` instead of
//! `steps.jsonl` must be refused.

use std::path::{Path, PathBuf};

use gpumem_sim::serve::{run_conformance_files, ServeError};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("workload.jsonl").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    dirs
}

fn run(dir: &Path) -> Result<String, ServeError> {
    let mut log = Vec::new();
    run_conformance_files(
        &dir.join("workload.jsonl"),
        &dir.join("config.json"),
        &mut log,
        &mut |_| {},
    )?;
    Ok(String::from_utf8(log).unwrap())
}

/// None if equal, else a description of the first difference.
fn first_difference(got: &str, want: &str) -> Option<String> {
    let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    for i in 0..g.len().max(w.len()) {
        let (a, b) = (g.get(i), w.get(i));
        if a != b {
            let ndiff = (0..g.len().max(w.len()))
                .filter(|&j| g.get(j) != w.get(j))
                .count();
            return Some(format!(
                "first difference at line {}:\n  gpumem: {}\n  vllm:   {}\n  ({ndiff} differing lines; gpumem {} lines, vllm {})",
                i + 1,
                a.unwrap_or(&"<end of file>"),
                b.unwrap_or(&"<end of file>"),
                g.len(),
                w.len()
            ));
        }
    }
    if got != want {
        return Some("logs differ in line endings".into());
    }
    None
}

#[test]
fn step_logs_match_vllm() {
    let mut failures = Vec::new();
    let mut passed = 0;
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let golden = dir.join("steps.jsonl");
        let expected_error = dir.join("expected_error.txt");
        match (run(&dir), golden.is_file()) {
            (Ok(got), true) => {
                let want = std::fs::read_to_string(&golden).unwrap();
                match first_difference(&got, &want) {
                    None => passed += 1,
                    Some(d) => failures.push(format!("{name}: {d}")),
                }
            }
            (Err(e), false) if expected_error.is_file() => {
                if e.exit_code() == 2 {
                    passed += 1;
                } else {
                    failures.push(format!("{name}: expected an input error, got {e}"));
                }
            }
            (Ok(_), false) => failures.push(format!("{name}: ran, but vLLM refuses this input")),
            (Err(e), _) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{passed} fixtures conform, {} do not:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The KV manager's full invariant walk holds after every engine step of every fixture (every
/// 50th step on the big pools, where one walk costs 20,000 blocks).
#[test]
fn invariants_hold_after_every_step() {
    use gpumem_sim::serve::{
        drive, Arrivals, ConformanceConfig, DriveOptions, EngineConfig, TooLongPrompt, VllmEngine,
        Workload,
    };
    for dir in fixtures() {
        if !dir.join("steps.jsonl").is_file() {
            continue;
        }
        let (cfg, _) = ConformanceConfig::read_file(&dir.join("config.json")).unwrap();
        let w = Workload::read_file(&dir.join("workload.jsonl")).unwrap();
        let mut engine = VllmEngine::new(EngineConfig::from_conformance(&cfg).unwrap()).unwrap();
        let mut arrivals = Arrivals::from_workload(w, cfg.max_model_len, TooLongPrompt::Refuse);
        let options = DriveOptions {
            check_invariants_every: if cfg.num_gpu_blocks > 2000 { 50 } else { 1 },
        };
        let sum = drive(&mut engine, &mut arrivals, options, &mut |_, _| Ok(()))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(sum.requests_finished, sum.requests, "{}", dir.display());
        // Everything is returned at the end.
        assert_eq!(engine.kv().num_free_blocks() as u64, cfg.num_gpu_blocks - 1);
    }
}

/// Same inputs, byte-identical step log and identical summary.
#[test]
fn deterministic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    for case in [
        "mooncake-500-small",
        "pressure-0",
        "offload-mooncake-300",
        "offload-arc-k3-x2-nocache",
    ] {
        let dir = root.join(case);
        let mut outs = Vec::new();
        for _ in 0..2 {
            let mut log = Vec::new();
            let sum = run_conformance_files(
                &dir.join("workload.jsonl"),
                &dir.join("config.json"),
                &mut log,
                &mut |_| {},
            )
            .unwrap();
            outs.push((log, sum));
        }
        assert!(
            outs[0].0 == outs[1].0,
            "{case}: step logs differ between runs"
        );
        assert_eq!(
            outs[0].1, outs[1].1,
            "{case}: summaries differ between runs"
        );
    }
}

/// Refused inputs say which file and line, and map to the oracle's exit code 2.
#[test]
fn refusals_name_file_and_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let err = run(&root.join("error-prompt-too-long")).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let msg = err.to_string();
    assert!(
        msg.contains("workload.jsonl:2: prompt length 60 >= max_model_len 60"),
        "{msg}"
    );
    let err = run(&root.join("error-pool-too-small")).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("exceeds the KV pool"), "{err}");

    let dir = std::env::temp_dir().join(format!("gpumem-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        root.join("exact-blocks/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("workload.jsonl"),
        "{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1,2],\"max_tokens\":1}\n{\"id\":\"b\",\"arrival_us\":0,\"prompt\":[1,2],\"max_tokens\":\"3\"}\n",
    )
    .unwrap();
    let err = run(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("workload.jsonl:2: 'max_tokens'"),
        "{err}"
    );
}

/// The CPU-tier fixtures do what they are there for: every one stores into the tier and evicts
/// from it, and all but the tiny one load hits back; the step log's per-step counters add up to
/// the run's totals. Without the `offload_*` keys the same workload writes a log without the
/// tier's keys.
#[test]
fn offload_fixtures_exercise_the_cpu_tier() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let mut seen = 0;
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("offload-") {
            continue;
        }
        seen += 1;
        let mut log = Vec::new();
        let sum = run_conformance_files(
            &dir.join("workload.jsonl"),
            &dir.join("config.json"),
            &mut log,
            &mut |_| {},
        )
        .unwrap();
        let o = sum.offload.unwrap_or_else(|| panic!("{name}: no CPU tier"));
        assert!(o.offload_stored_blocks > 0, "{name}: nothing stored");
        assert!(o.cpu_evicted_blocks > 0, "{name}: nothing evicted");
        if name != "offload-tiny" {
            assert!(o.cpu_hit_tokens > 0, "{name}: no CPU hit");
        }
        let (mut stored, mut loaded, mut evicted, mut hit_tokens) = (0, 0, 0, 0);
        for line in String::from_utf8(log).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            stored += v["offload_stored"].as_u64().unwrap();
            loaded += v["offload_loaded"].as_u64().unwrap();
            evicted += v["cpu_evicted"].as_u64().unwrap();
            for a in v["admitted"].as_array().unwrap() {
                hit_tokens += a[2].as_u64().unwrap();
            }
        }
        assert_eq!(stored, o.offload_stored_blocks, "{name}");
        assert_eq!(loaded, o.offload_loaded_blocks, "{name}");
        assert_eq!(evicted, o.cpu_evicted_blocks, "{name}");
        assert_eq!(hit_tokens, o.cpu_hit_tokens, "{name}");
    }
    assert!(seen >= 8, "only {seen} offload fixtures");

    // The tier off: no offload key anywhere in the log.
    let dir = std::env::temp_dir().join(format!("gpumem-conf-off-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let case = root.join("offload-lru-k0");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("config.json")).unwrap()).unwrap();
    let plain: serde_json::Map<String, serde_json::Value> = cfg
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.starts_with("offload_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&plain).unwrap(),
    )
    .unwrap();
    std::fs::copy(case.join("workload.jsonl"), dir.join("workload.jsonl")).unwrap();
    let got = run(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!got.is_empty());
    assert!(!got.contains("offload"), "{got}");
    let first: serde_json::Value = serde_json::from_str(got.lines().next().unwrap()).unwrap();
    assert_eq!(first["admitted"][0].as_array().unwrap().len(), 2);
}

/// An offload block size that is not a multiple of the GPU block size is refused as vLLM
/// refuses it, naming both sizes.
#[test]
fn offload_refusals_say_why() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let err = run(&root.join("error-offload-block-size")).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string()
            .contains("offload_block_size 6 is not a multiple of block_size 4"),
        "{err}"
    );
}
