//! The memory-pressure monitor and CUDA-graph padding end to end: `gpumem kv` and `gpumem
//! alloc` report them, observe without deciding (the digest and the steps do not move), give
//! byte-identical JSON twice, shade their plots, and refuse impossible flags.

mod common;

use common::*;
use serde_json::Value;

fn json_report(args: &[&str]) -> (Value, String) {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?} failed: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    (serde_json::from_str(&text).expect("one JSON object"), text)
}

/// The built-in workload on a pool small enough to fill up.
const TIGHT_KV: [&str; 7] = [
    "kv",
    "--kv-blocks",
    "700",
    "--limit",
    "300",
    "--json",
    "--max-model-len",
];

fn tight_kv(extra: &[&str]) -> (Value, String) {
    let args: Vec<&str> = [&TIGHT_KV[..], &["8000"], extra].concat();
    json_report(&args)
}

#[test]
fn impossible_thresholds_and_sizes_are_refused() {
    for cmd in ["kv", "alloc"] {
        for bad in ["0.9,0.75", "0.8,0.8", "0,0.5", "0.5,1.5", "0.75", "a,b", ""] {
            let out = gpumem(&[cmd, "--pressure-thresholds", bad]);
            assert_clean_error(&out, &["0 < WARNING < CRITICAL <= 1"]);
        }
    }
    for bad in ["0", "1,x", "", "2,,4", "1.5"] {
        let out = gpumem(&["kv", "--cudagraph-sizes", bad]);
        assert_clean_error(&out, &["is not a batch size"]);
    }
    let out = gpumem(&[
        "kv",
        "--max-num-batched-tokens",
        "2048",
        "--cudagraph-sizes",
        "8,4096",
    ]);
    assert_clean_error(&out, &["4096 is larger than max_num_batched_tokens 2048"]);
}

#[test]
fn a_tight_kv_pool_crosses_the_thresholds_and_says_when() {
    let (r, text) = tight_kv(&[]);
    let (_, again) = tight_kv(&[]);
    assert!(text == again, "two runs give byte-identical JSON");
    let p = &r["pressure"];
    assert_eq!(p["measure"], "kv-blocks");
    assert_eq!(p["thresholds"], "0.75,0.9");
    let (warnings, criticals) = (p["warning_events"].as_u64(), p["critical_events"].as_u64());
    assert!(warnings > Some(0) && criticals > Some(0), "{p}");
    let place = &p["places"][0];
    assert_eq!(
        (&place["device"], &place["tier"]),
        (&0.into(), &"gpu".into())
    );
    assert_eq!(place["capacity"], 699);
    assert_eq!(place["used_peak"], r["kv_blocks_used_peak"]);
    // The time in each level adds up to the run (to the µs each total rounds down to).
    let time: u64 = ["normal", "warning", "critical"]
        .iter()
        .map(|l| place[&format!("time_{l}_us")].as_u64().unwrap())
        .sum();
    let sim = r["sim_time_us"].as_u64().unwrap();
    assert!(time <= sim && sim - time <= 2, "{time} of {sim}");
    // Each event is a change of level, at or across its threshold.
    let events = p["events"].as_array().unwrap();
    assert!(!events.is_empty() && events.len() <= 20);
    assert!(p["events_total"].as_u64().unwrap() >= events.len() as u64);
    let mut previous = "normal".to_string();
    for e in events {
        let (used, level) = (e["used"].as_u64().unwrap(), e["level"].as_str().unwrap());
        let want = match used * 100 {
            u if u >= 90 * 699 => "critical",
            u if u >= 75 * 699 => "warning",
            _ => "normal",
        };
        assert_eq!(level, want, "{e}");
        assert_ne!(level, previous, "{e}");
        previous = level.to_string();
    }
}

#[test]
fn thresholds_and_capture_sizes_change_the_report_not_the_run() {
    let (base, _) = tight_kv(&[]);
    let (low, _) = tight_kv(&["--pressure-thresholds", "0.1,0.2"]);
    let (auto, _) = tight_kv(&["--cudagraph-sizes", "auto"]);
    let (list, _) = tight_kv(&["--cudagraph-sizes", "1,2,4,8"]);
    for other in [&low, &auto, &list] {
        for key in ["digest", "steps", "sim_time_us", "ttft_us", "preemptions"] {
            assert_eq!(base[key], other[key], "{key}");
        }
    }
    let time = |r: &Value| {
        r["pressure"]["time_warning_us"].as_u64().unwrap()
            + r["pressure"]["time_critical_us"].as_u64().unwrap()
    };
    assert!(time(&low) > time(&base));

    let (vllm, auto, list) = (&base["cudagraph"], &auto["cudagraph"], &list["cudagraph"]);
    assert_eq!(vllm["choice"], "vllm");
    assert_eq!(vllm["padded_tokens"], vllm["vllm_padded_tokens"]);
    // auto: as many sizes as vLLM's at most, vLLM's largest, never more padding.
    assert!(auto["sizes"].as_u64() <= vllm["sizes"].as_u64());
    assert_eq!(auto["largest_size"], vllm["largest_size"]);
    assert_eq!(auto["vllm_padded_tokens"], vllm["padded_tokens"]);
    assert!(auto["padded_tokens"].as_u64() <= vllm["padded_tokens"].as_u64());
    assert_eq!(
        (auto["graph_steps"].as_u64(), auto["eager_steps"].as_u64()),
        (vllm["graph_steps"].as_u64(), vllm["eager_steps"].as_u64())
    );
    // A list that stops at 8 runs every larger batch eagerly.
    assert_eq!(list["capture_sizes"], serde_json::json!([1, 2, 4, 8]));
    assert!(list["eager_steps"].as_u64() > vllm["eager_steps"].as_u64());
    assert_eq!(
        list["graph_steps"].as_u64().unwrap() + list["eager_steps"].as_u64().unwrap(),
        base["steps"].as_u64().unwrap()
    );
    // The static buffers follow the scheduler limits, not the sizes.
    assert_eq!(list["buffer_bytes"], vllm["buffer_bytes"]);
}

#[test]
fn the_plots_shade_warning_and_critical_periods() {
    let dir = scratch_dir();
    let kv_svg = dir.join("kv.svg");
    let args: Vec<&str> = [&TIGHT_KV[..], &["8000", "--plot", kv_svg.to_str().unwrap()]].concat();
    json_report(&args);
    let alloc_svg = dir.join("alloc.svg");
    let (r, _) = json_report(&[
        "alloc",
        "--generate",
        "occupancy",
        "--ops",
        "20000",
        "--capacity",
        "256MiB",
        "--strategy",
        "tlsf,caching",
        "--plot",
        alloc_svg.to_str().unwrap(),
        "--json",
    ]);
    let results = r["results"].as_array().unwrap();
    for s in results {
        let p = &s["pressure"];
        assert_eq!(p["measure"], "reserved-bytes");
        assert_eq!(p["places"][0]["used_peak"], s["bytes_reserved_peak"]);
    }
    assert!(
        results
            .iter()
            .any(|s| s["pressure"]["warning_events"].as_u64() > Some(0)),
        "an 85% occupancy reaches the warning level: {r}"
    );
    for svg in [kv_svg, alloc_svg] {
        let svg = std::fs::read_to_string(svg).unwrap();
        for legend in ["warning ≥ 75%", "critical ≥ 90%"] {
            assert!(svg.contains(legend), "no {legend}");
        }
        assert!(svg.contains("opacity=\"0.16\""), "nothing shaded");
    }
}
