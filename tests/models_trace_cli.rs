//! `gpumem models --trace`: requests that name their model (the conformance and Mooncake
//! `model` field, BurstGPT's `Model` column through `--model-map`). Every trace is written by
//! the test into a scratch directory.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{assert_clean_error, gpumem, scratch_dir, stderr, stdout};
use serde_json::Value;

const FIVE: &str = "llama-3.1-8b,qwen2.5-7b,mistral-7b,llama-3.1-8b@ft1,qwen2.5-7b@ft2";
const FIVE_NAMES: [&str; 5] = [
    "llama-3.1-8b",
    "qwen2.5-7b",
    "mistral-7b",
    "llama-3.1-8b@ft1",
    "qwen2.5-7b@ft2",
];

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write the trace");
    p
}

/// The model of request `i`: uneven counts, in runs, every model used.
fn model_of(i: usize) -> &'static str {
    FIVE_NAMES[[0, 0, 0, 1, 1, 2, 3, 0, 4, 1, 0][i % 11]]
}

/// A conformance trace of `n` requests, request `i` naming `model(i)`.
fn conformance(n: usize, model: impl Fn(usize) -> String) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"id\": \"q{i}\", \"arrival_us\": {}, \"hash_ids\": [{}, {}], \"input_length\": {}, \"max_tokens\": {}, \"model\": {}}}\n",
                i * 40_000,
                i % 3,
                1000 + i,
                300 + (i * 37) % 500,
                4 + i % 9,
                serde_json::to_string(&model(i)).unwrap()
            )
        })
        .collect()
}

fn run_json(args: &[&str]) -> Value {
    let out = gpumem(args);
    assert!(
        out.status.success(),
        "gpumem {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

/// Requests per model as the report gives them.
fn per_model(r: &Value) -> BTreeMap<String, u64> {
    r["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_string(),
                m["requests"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn counts<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut c: BTreeMap<String, u64> = FIVE_NAMES.iter().map(|m| (m.to_string(), 0)).collect();
    for n in names {
        *c.get_mut(n).expect("a model of the run") += 1;
    }
    c
}

#[test]
fn conformance_requests_go_to_the_model_they_name_tags_included() {
    let dir = scratch_dir();
    let n = 77;
    let trace = write(
        &dir,
        "w.jsonl",
        &conformance(n, |i| model_of(i).to_string()),
    );
    let t = trace.to_str().unwrap();
    let r = run_json(&["models", "--trace", t, "--models", FIVE, "--json"]);
    assert_eq!(per_model(&r), counts((0..n).map(model_of)));
    assert_eq!(r["requests"].as_u64(), Some(n as u64));
    assert_eq!(r["requests_finished"].as_u64(), Some(n as u64), "{r}");
    assert!(
        r["weight_loads"].as_u64().unwrap() > 0,
        "five models cannot all stay"
    );
    assert!(r["peak_gpu_bytes"].as_u64() <= r["gpu_bytes"].as_u64());

    // --limit takes the first N requests.
    let r = run_json(&[
        "models", "--trace", t, "--models", FIVE, "--limit", "20", "--json",
    ]);
    assert_eq!(per_model(&r), counts((0..20).map(model_of)));
}

#[test]
fn two_runs_of_a_trace_are_byte_identical_and_the_trace_matters() {
    let dir = scratch_dir();
    let a = write(&dir, "a.jsonl", &conformance(50, |i| model_of(i).into()));
    let b = write(
        &dir,
        "b.jsonl",
        &conformance(50, |i| model_of(i + 1).into()),
    );
    let run = |p: &Path| {
        let out = gpumem(&[
            "models",
            "--trace",
            p.to_str().unwrap(),
            "--models",
            FIVE,
            "--policy",
            "offloader",
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        out.stdout
    };
    assert_eq!(run(&a), run(&a));
    assert_ne!(run(&a), run(&b), "other models for the same requests");
}

#[test]
fn mooncake_requests_name_their_model() {
    let dir = scratch_dir();
    let n = 40;
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}, \"hash_ids\": [{}, {}], \"model\": \"{}\"}}\n",
                i * 50,
                600 + i * 7,
                3 + i % 5,
                i % 4,
                100 + i,
                model_of(i)
            )
        })
        .collect();
    let trace = write(&dir, "m.jsonl", &text);
    let r = run_json(&[
        "models",
        "--trace",
        trace.to_str().unwrap(),
        "--models",
        FIVE,
        "--json",
    ]);
    assert_eq!(per_model(&r), counts((0..n).map(model_of)));
    assert_eq!(r["requests_finished"].as_u64(), Some(n as u64));
}

const BURSTGPT_HEADER: &str =
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n";

/// BurstGPT rows: (seconds, model); every seventh a failed request (zero response tokens).
fn burstgpt(rows: &[(&str, &str)]) -> String {
    let mut text = BURSTGPT_HEADER.to_string();
    for (i, (t, m)) in rows.iter().enumerate() {
        let response = if i % 7 == 6 { 0 } else { 20 + i % 30 };
        let request = 200 + (i * 53) % 900;
        text += &format!(
            "{t},{m},{request},{response},{},Conversation log\n",
            request + response
        );
    }
    text
}

#[test]
fn burstgpt_models_are_mapped_and_failed_rows_skipped() {
    let dir = scratch_dir();
    let names: Vec<&str> = (0..45)
        .map(|i| if i % 3 == 1 { "GPT-4" } else { "ChatGPT" })
        .collect();
    let times: Vec<String> = (0..45).map(|i| format!("{}.25", i / 2)).collect();
    let rows: Vec<(&str, &str)> = times
        .iter()
        .zip(&names)
        .map(|(t, m)| (t.as_str(), *m))
        .collect();
    let trace = write(&dir, "BurstGPT_test.csv", &burstgpt(&rows));
    let r = run_json(&[
        "models",
        "--trace",
        trace.to_str().unwrap(),
        "--models",
        "llama-3.1-8b,qwen2.5-7b",
        "--model-map",
        "ChatGPT=llama-3.1-8b,GPT-4=qwen2.5-7b",
        "--json",
    ]);
    let served = |name: &str| {
        names
            .iter()
            .enumerate()
            .filter(|&(i, m)| *m == name && i % 7 != 6)
            .count() as u64
    };
    let got = per_model(&r);
    assert_eq!(got["llama-3.1-8b"], served("ChatGPT"), "{r}");
    assert_eq!(got["qwen2.5-7b"], served("GPT-4"), "{r}");
    assert_eq!(
        r["requests_finished"].as_u64(),
        Some(served("ChatGPT") + served("GPT-4"))
    );
}

#[test]
fn a_model_not_in_models_is_refused_with_file_line_and_name() {
    let dir = scratch_dir();
    let text = conformance(8, |i| {
        if i == 5 {
            "gemma-2b".into()
        } else {
            model_of(i).into()
        }
    });
    let trace = write(&dir, "unknown.jsonl", &text);
    let t = trace.to_str().unwrap();
    let out = gpumem(&["models", "--trace", t, "--models", FIVE]);
    assert_clean_error(
        &out,
        &[
            &format!("{t}:6:"),
            "model \"gemma-2b\" is not one of --models",
            "llama-3.1-8b@ft1",
        ],
    );
    // A tag is part of the name: llama-3.1-8b@ft1 is not llama-3.1-8b.
    let tagged = write(
        &dir,
        "tagged.jsonl",
        &conformance(3, |i| {
            ["llama-3.1-8b", "llama-3.1-8b@ft1", "llama-3.1-8b@ft9"][i].into()
        }),
    );
    let out = gpumem(&[
        "models",
        "--trace",
        tagged.to_str().unwrap(),
        "--models",
        "llama-3.1-8b,llama-3.1-8b@ft1",
    ]);
    assert_clean_error(
        &out,
        &[&format!("{}:3:", tagged.display()), "\"llama-3.1-8b@ft9\""],
    );
}

#[test]
fn a_request_naming_no_model_is_refused() {
    let dir = scratch_dir();
    // Lines 1-3 name llama-3.1-8b, line 4 qwen2.5-7b: its field is removed.
    assert_eq!(model_of(3), "qwen2.5-7b");
    let text =
        conformance(5, |i| model_of(i).into()).replacen(", \"model\": \"qwen2.5-7b\"", "", 1);
    let trace = write(&dir, "none.jsonl", &text);
    let t = trace.to_str().unwrap();
    let out = gpumem(&["models", "--trace", t, "--models", FIVE]);
    assert_clean_error(&out, &[&format!("{t}:4:"), "names no model"]);
}

#[test]
fn unmapped_burstgpt_models_are_refused_naming_them_and_the_keys() {
    let dir = scratch_dir();
    let rows = [
        ("0", "ChatGPT"),
        ("1", "GPT-4"),
        ("2", "Claude"),
        ("3", "ChatGPT"),
    ];
    let trace = write(&dir, "burst.csv", &burstgpt(&rows));
    let t = trace.to_str().unwrap();
    let out = gpumem(&[
        "models",
        "--trace",
        t,
        "--models",
        "llama-3.1-8b,qwen2.5-7b",
        "--model-map",
        "ChatGPT=llama-3.1-8b,GPT-4=qwen2.5-7b",
    ]);
    assert_clean_error(
        &out,
        &[
            &format!("{t}:4:"),
            "model \"Claude\" is not in --model-map",
            "ChatGPT, GPT-4",
        ],
    );
    // Without a map, BurstGPT's names are not models: the error says how to map them.
    let out = gpumem(&["models", "--trace", t, "--models", "llama-3.1-8b"]);
    assert_clean_error(&out, &[&format!("{t}:2:"), "\"ChatGPT\"", "--model-map"]);
    // A map onto a model the run does not serve.
    let out = gpumem(&[
        "models",
        "--trace",
        t,
        "--models",
        "llama-3.1-8b",
        "--model-map",
        "ChatGPT=mistral-7b",
    ]);
    assert_clean_error(
        &out,
        &["--model-map", "\"mistral-7b\" is not one of --models"],
    );
    let out = gpumem(&[
        "models",
        "--trace",
        t,
        "--models",
        "llama-3.1-8b",
        "--model-map",
        "ChatGPT",
    ]);
    assert_clean_error(&out, &["--model-map", "TRACE_NAME=MODEL"]);
}

#[test]
fn overlong_and_odd_model_names_are_refused_with_file_line_and_escapes() {
    let dir = scratch_dir();
    let long = "m".repeat(257);
    let text = conformance(4, |i| {
        if i == 2 {
            long.clone()
        } else {
            model_of(i).into()
        }
    });
    let trace = write(&dir, "long.jsonl", &text);
    let t = trace.to_str().unwrap();
    let out = gpumem(&["models", "--trace", t, "--models", FIVE]);
    assert_clean_error(
        &out,
        &[
            &format!("{t}:3:"),
            "257 bytes",
            "MAX_MODEL_NAME_BYTES",
            "256",
        ],
    );
    assert!(
        !stderr(&out).contains(&long),
        "the name is cut in the error"
    );
    // 256 bytes is within the limit: refused only as a model the run does not serve.
    let text = conformance(4, |i| {
        if i == 2 {
            "m".repeat(256)
        } else {
            model_of(i).into()
        }
    });
    let trace = write(&dir, "at-limit.jsonl", &text);
    let out = gpumem(&[
        "models",
        "--trace",
        trace.to_str().unwrap(),
        "--models",
        FIVE,
    ]);
    assert_clean_error(&out, &["is not one of --models"]);
    assert!(!stderr(&out).contains("MAX_MODEL_NAME_BYTES"));

    // Control characters are escaped, never written to the terminal.
    let text = conformance(2, |i| {
        if i == 1 {
            "\u{1b}[31mred\u{7}".into()
        } else {
            model_of(i).into()
        }
    });
    let trace = write(&dir, "esc.jsonl", &text);
    let out = gpumem(&[
        "models",
        "--trace",
        trace.to_str().unwrap(),
        "--models",
        FIVE,
    ]);
    assert_clean_error(&out, &[":2:", "\\u{1b}[31mred\\u{7}"]);
    assert!(!stderr(&out).contains('\u{1b}'));

    // BurstGPT's Model column has the same limit.
    let rows = [("0", "ChatGPT"), ("1", long.as_str())];
    let trace = write(&dir, "long.csv", &burstgpt(&rows));
    let out = gpumem(&[
        "models",
        "--trace",
        trace.to_str().unwrap(),
        "--models",
        "llama-3.1-8b",
        "--model-map",
        "ChatGPT=llama-3.1-8b",
    ]);
    assert_clean_error(&out, &[":3:", "'Model'", "MAX_MODEL_NAME_BYTES"]);

    // Not a string.
    let text = conformance(1, |_| "x".into()).replace("\"model\": \"x\"", "\"model\": 7");
    let trace = write(&dir, "num.jsonl", &text);
    let out = gpumem(&[
        "models",
        "--trace",
        trace.to_str().unwrap(),
        "--models",
        FIVE,
    ]);
    assert_clean_error(&out, &[":1:", "'model' must be a string"]);
}

#[test]
fn formats_without_model_names_and_flag_mixups_are_clear_errors() {
    let dir = scratch_dir();
    let azure = write(
        &dir,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n",
    );
    let out = gpumem(&["models", "--trace", azure.to_str().unwrap()]);
    assert_clean_error(&out, &["azure trace names no model"]);
    let w = write(&dir, "w.jsonl", &conformance(2, |i| model_of(i).into()));
    let w = w.to_str().unwrap();
    let out = gpumem(&["models", "--trace", w, "--requests", "10"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--requests is the built-in workload's"
    );
    let out = gpumem(&["models", "--limit", "10"]);
    assert_eq!(out.status.code(), Some(2), "--limit needs --trace");
    let out = gpumem(&["models", "--trace", w, "--format", "azure"]);
    assert_eq!(out.status.code(), Some(2));
    let out = gpumem(&["models", "--trace", w, "--limit", "0"]);
    assert_clean_error(&out, &["--limit 0"]);
}

#[test]
fn a_prompt_longer_than_its_model_takes_is_refused_with_its_line() {
    let dir = scratch_dir();
    // mistral-7b: max_model_len 32768.
    let text = format!(
        "{{\"id\": \"a\", \"arrival_us\": 0, \"hash_ids\": [1], \"input_length\": 100, \"max_tokens\": 4, \"model\": \"mistral-7b\"}}\n{{\"id\": \"b\", \"arrival_us\": 5, \"hash_ids\": [{}], \"input_length\": 40000, \"max_tokens\": 4, \"model\": \"mistral-7b\"}}\n",
        (0..79).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
    );
    let trace = write(&dir, "long-prompt.jsonl", &text);
    let t = trace.to_str().unwrap();
    // The default 4 GiB KV pool holds 32752 tokens, less than the profile's 32768.
    let out = gpumem(&["models", "--trace", t, "--models", "mistral-7b"]);
    assert_clean_error(
        &out,
        &[
            &format!("{t}:2:"),
            "40000 tokens",
            "mistral-7b",
            "max_model_len 32752",
        ],
    );
    let out = gpumem(&[
        "models",
        "--trace",
        t,
        "--models",
        "mistral-7b",
        "--kv-cache-gib",
        "8",
    ]);
    assert_clean_error(&out, &[&format!("{t}:2:"), "max_model_len 32768"]);
    // Within the limit, it is served.
    let short = write(&dir, "short.jsonl", &text.replace("40000", "30000"));
    let r = run_json(&[
        "models",
        "--trace",
        short.to_str().unwrap(),
        "--models",
        "mistral-7b",
        "--json",
    ]);
    assert_eq!(r["requests_finished"].as_u64(), Some(2));
}

#[test]
fn kv_ignores_the_model_field_byte_for_byte() {
    let dir = scratch_dir();
    let with = dir.join("with");
    let without = dir.join("without");
    std::fs::create_dir_all(&with).unwrap();
    std::fs::create_dir_all(&without).unwrap();
    let text = conformance(30, |i| model_of(i).into());
    let plain: String = text
        .lines()
        .map(|l| format!("{}}}\n", &l[..l.find(", \"model\"").unwrap()]))
        .collect();
    assert_ne!(text, plain);
    let a = write(&with, "w.jsonl", &text);
    let b = write(&without, "w.jsonl", &plain);
    let kv = |p: &Path| {
        let out = gpumem(&["kv", "--trace", p.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        (out.stdout, err)
    };
    let (ja, ea) = kv(&a);
    let (jb, eb) = kv(&b);
    assert_eq!(ja, jb);
    assert!(!ea.contains("model"), "no warning about the field: {ea}");
    assert_eq!(ea, eb);
}

#[test]
fn the_trace_is_streamed_limit_stops_reading_and_a_pipe_works() {
    let dir = scratch_dir();
    let n = 30;
    let good = conformance(n, |i| model_of(i).into());
    // Past the first n requests, a line that would stop any reader that got to it.
    let trace = write(&dir, "tail.jsonl", &format!("{good}{{not json\n"));
    let t = trace.to_str().unwrap();
    let limit = n.to_string();
    let r = run_json(&[
        "models", "--trace", t, "--models", FIVE, "--limit", &limit, "--json",
    ]);
    assert_eq!(per_model(&r), counts((0..n).map(model_of)));
    let out = gpumem(&["models", "--trace", t, "--models", FIVE]);
    assert_clean_error(&out, &[&format!("{t}:{}:", n + 1)]);

    // Standard input, read once: the same report as the file.
    let plain = write(&dir, "plain.jsonl", &good);
    let file = gpumem(&[
        "models",
        "--trace",
        plain.to_str().unwrap(),
        "--models",
        FIVE,
        "--json",
    ]);
    assert!(file.status.success(), "{}", stderr(&file));
    let piped = std::process::Command::new(env!("CARGO_BIN_EXE_gpumem"))
        .args(["models", "--trace", "-", "--models", FIVE, "--json"])
        .stdin(std::fs::File::open(&plain).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert_eq!(piped.stdout, file.stdout);
}

#[test]
fn a_shared_mooncake_trace_without_model_fields_is_refused_at_its_first_line() {
    let p = common::mooncake_conversation();
    let t = p.to_str().unwrap();
    let out = gpumem(&["models", "--trace", t, "--limit", "100"]);
    assert_clean_error(&out, &[&format!("{t}:1:"), "names no model"]);
}
