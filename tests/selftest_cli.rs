//! `gpumem selftest`: every executor path simulated and carried out on host memory. The
//! acceptance of contract v2's transfers: the tier cache moves content GPU → host → GPU
//! through transfers on real memory, with the simulation's digests, every transferred byte
//! verified at both ends, and an injected corrupt transfer failing the run.

mod common;

use common::*;
use serde_json::Value;

fn selftest(args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["selftest", "--execute", "host", "--json"];
    all.extend_from_slice(args);
    let out = gpumem(&all);
    let v = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("gpumem {all:?}: {e}; stderr: {}", stderr(&out)));
    (out.status.code(), v)
}

fn path<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == name)
        .unwrap_or_else(|| panic!("no path {name} in {r}"))
}

/// Drops what is measured rather than decided (times, resident memory).
fn decided_only(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| {
                !(k.starts_with("measured")
                    || k.starts_with("checkpoint_ns")
                    || k.starts_with("resident"))
            });
            m.values_mut().for_each(decided_only);
        }
        Value::Array(a) => a.iter_mut().for_each(decided_only),
        _ => {}
    }
}

#[test]
fn every_path_agrees_with_the_simulation_on_host_memory() {
    let (code, r) = selftest(&[]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["passed"], true);
    let paths = r["paths"].as_array().unwrap();
    assert_eq!(
        paths.len(),
        7 + 1 + 2,
        "seven strategies, the KV pool, two host tiers"
    );
    for p in paths {
        assert_eq!(p["digest_simulated"], p["digest_executed"], "{}", p["path"]);
        assert_eq!(p["digests_equal"], true);
        assert_eq!(p["mismatches"], 0, "{}", p["path"]);
        assert!(p["bytes_verified"].as_u64().unwrap() > 0, "{}", p["path"]);
    }
    for name in ["alloc caching", "alloc tlsf", "alloc buddy", "kv vllm-0.33"] {
        assert_eq!(path(&r, name)["transfers"], 0, "{name} has no transfers");
    }
    let kv = path(&r, "kv vllm-0.33");
    assert!(kv["detail"]["prefix_hit_tokens"].as_u64().unwrap() > 0);
    assert!(kv["detail"]["blocks_evicted"].as_u64().unwrap() > 0);

    for tier in ["pinned-host", "pageable-host"] {
        let p = path(&r, &format!("tiers {tier}"));
        let stats = &p["detail"]["executed"];
        assert_eq!(stats, &p["detail"]["simulated"]);
        let (offloads, restores) = (
            stats["offloads"].as_u64().unwrap(),
            stats["restores"].as_u64().unwrap(),
        );
        assert!(offloads > 100 && restores > 100, "{stats}");
        // Every transfer carried out, every one verified at its source and at its copy.
        let e = &p["execution"];
        assert_eq!(e["transfers"].as_u64().unwrap(), offloads + restores);
        assert_eq!(e["transfers_refused"], 0);
        let moved = e["bytes_transferred"].as_u64().unwrap();
        assert_eq!(
            moved,
            stats["bytes_offloaded"].as_u64().unwrap() + stats["bytes_restored"].as_u64().unwrap()
        );
        assert_eq!(e["transfer_bytes_verified"].as_u64().unwrap(), 2 * moved);
        assert!(p["bytes_verified"].as_u64().unwrap() >= 2 * moved);
        let links = p["detail"]["links"].as_array().unwrap();
        assert_eq!(links[0]["from"], "gpu");
        assert_eq!(links[0]["to"], tier);
        assert_eq!(links[1]["from"], tier);
    }
    // Pinned memory is reached at the link's full bandwidth, pageable through staging.
    let modelled = |t: &str| {
        path(&r, &format!("tiers {t}"))["modelled_ns"]
            .as_u64()
            .unwrap()
    };
    assert!(modelled("pinned-host") < modelled("pageable-host"));

    // The same seed decides the same: byte-identical apart from measured times.
    let (_, again) = selftest(&[]);
    let (mut a, mut b) = (r.clone(), again);
    decided_only(&mut a);
    decided_only(&mut b);
    assert_eq!(a.to_string(), b.to_string());
}

#[test]
fn a_corrupt_transfer_is_caught_and_fails_the_run() {
    let out = gpumem(&[
        "selftest",
        "--execute",
        "host",
        "--inject",
        "corrupt-transfer:5",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("injecting corrupt-transfer:5"), "{text}");
    for tier in ["pinned-host", "pageable-host"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("tiers {tier}")))
            .unwrap();
        assert!(line.contains(" NO "), "{line}");
        assert!(
            text.contains(&format!("tiers {tier}: 1 wrong bytes; first: transfer-to")),
            "{text}"
        );
    }
    // Paths without transfers are untouched by this fault.
    let alloc = text.lines().find(|l| l.starts_with("alloc tlsf")).unwrap();
    assert!(alloc.contains(" yes "), "{alloc}");
    assert!(text.contains("8 of 10 paths passed"), "{text}");
    assert!(text.contains("FAILED"), "{text}");

    let (code, r) = selftest(&["--inject", "corrupt-transfer:5", "--seed", "3"]);
    assert_eq!(code, Some(1));
    assert_eq!(r["passed"], false);
    let p = path(&r, "tiers pinned-host");
    assert_eq!(p["digests_equal"], false);
    assert_eq!(p["mismatches"], 1);
    assert_eq!(p["refused"], 1);
    assert_eq!(p["execution"]["injected_transfer_corruptions"], 1);
    assert_eq!(
        p["detail"]["executed"]["lost"], 1,
        "the policy lost the item"
    );
    assert_eq!(p["detail"]["simulated"]["lost"], 0);
}

#[test]
fn a_refused_reservation_fails_every_path_without_a_panic() {
    let (code, r) = selftest(&["--inject", "refuse-alloc:1"]);
    assert_eq!(code, Some(1));
    for p in r["paths"].as_array().unwrap() {
        assert_eq!(p["digests_equal"], false, "{}", p["path"]);
    }
    let tiers = path(&r, "tiers pinned-host");
    assert!(
        tiers["error"].as_str().unwrap().contains("refused"),
        "{tiers}"
    );
}

#[test]
fn cuda_runs_where_a_driver_is_and_is_a_clean_error_where_not() {
    let out = gpumem(&["selftest", "--execute", "cuda"]);
    if gpumem::gpu::cuda::driver_present() {
        // The one command that proves the CUDA path.
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
    } else {
        assert_clean_error(
            &out,
            &["--execute cuda", "no CUDA driver", "--execute host"],
        );
        assert!(stdout(&out).is_empty(), "nothing ran");
    }
}

#[test]
fn bad_flags_are_clean_errors() {
    assert_clean_error(&gpumem(&["selftest"]), &["--execute"]);
    assert_clean_error(
        &gpumem(&[
            "selftest",
            "--execute",
            "host",
            "--inject",
            "corrupt-transfer:0",
        ]),
        &["corrupt-transfer:0", "not a count from 1"],
    );
    assert_clean_error(
        &gpumem(&["selftest", "--execute", "tpu"]),
        &["tpu", "host", "cuda"],
    );
    assert_clean_error(
        &gpumem(&[
            "selftest",
            "--execute",
            "host",
            "--seed",
            "18446744073709551616",
        ]),
        &["--seed"],
    );
}
