//! The conformance workload (JSON Lines, one request a line) and config (one JSON object) of
//! `../shared/conformance/README.md`, read with the same checks as vLLM's oracle: every
//! refusal names the file and line, never panics, and nothing is simulated from bad input.
//!
//! Prompts in the Mooncake form (`hash_ids` + `input_length`) are not expanded into memory;
//! [`Prompt::fill`] produces any token range on demand by the contract's rule.

use std::fmt;
use std::io::BufRead;
use std::path::Path;

use serde_json::{Map, Value};

/// The contract's token expansion constants.
pub const PROMPT_MOD: i128 = 1_000_000_007;
pub const GEN_BASE: u64 = 2_000_000_000;
pub const GEN_STRIDE: u64 = 10_000;
pub const DEFAULT_HASH_BLOCK: u64 = 512;
/// Longest prompt gpumem accepts (bounds what a hostile workload can make it allocate).
pub const MAX_PROMPT_TOKENS: u64 = 1 << 32;
/// Limits on the config, far above any real deployment, that bound the simulator's memory
/// (block arrays, token buffers, per-request hash lists) and keep the clock from overflowing.
pub const MAX_GPU_BLOCKS: u64 = 1 << 24;
pub const MAX_BLOCK_SIZE: u64 = 1 << 16;
pub const MAX_MODEL_LEN: u64 = 1 << 26;
pub const MAX_STEP_US: u64 = 1 << 40;
/// Latest arrival time accepted (keeps `step * step_us` far from overflow).
pub const MAX_ARRIVAL_US: u64 = 1 << 60;

/// A refused input: what and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Explicit token ids.
    Tokens(Vec<u32>),
    /// The Mooncake form: token `j` is `(hash_ids[j / hash_block] * hash_block + j % hash_block)
    /// mod 1_000_000_007`.
    HashIds {
        hash_ids: Vec<i64>,
        input_length: u64,
        hash_block: u64,
    },
}

impl Prompt {
    pub fn len(&self) -> u64 {
        match self {
            Prompt::Tokens(t) => t.len() as u64,
            Prompt::HashIds { input_length, .. } => *input_length,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends prompt tokens `start..end` to `out`.
    pub fn fill(&self, start: u64, end: u64, out: &mut Vec<u32>) {
        debug_assert!(start <= end && end <= self.len());
        match self {
            Prompt::Tokens(t) => out.extend_from_slice(&t[start as usize..end as usize]),
            Prompt::HashIds {
                hash_ids,
                hash_block,
                ..
            } => {
                let hb = *hash_block;
                let mut j = start;
                while j < end {
                    let b = j / hb;
                    let o = j % hb;
                    let run_end = end.min((b + 1) * hb);
                    let base = (hash_ids[b as usize] as i128 * hb as i128 + o as i128)
                        .rem_euclid(PROMPT_MOD) as u64;
                    // Consecutive offsets in one hash block: no division per token.
                    let mut t = base;
                    for _ in j..run_end {
                        out.push(t as u32);
                        t += 1;
                        if t == PROMPT_MOD as u64 {
                            t = 0;
                        }
                    }
                    j = run_end;
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadRequest {
    pub id: String,
    pub arrival_us: u64,
    pub prompt: Prompt,
    pub max_tokens: u64,
    /// 1-based line in the workload file (for error messages).
    pub line: u64,
}

impl WorkloadRequest {
    /// The `k`-th generated token of the request on 0-based line `index` of the workload.
    #[inline]
    pub fn generated_token(index: usize, k: u64) -> u32 {
        (GEN_BASE + index as u64 * GEN_STRIDE + k) as u32
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Where it was read from (for error messages).
    pub source: String,
    /// Requests in file order (the 0-based position is the request's index).
    pub requests: Vec<WorkloadRequest>,
    /// Unknown fields that were ignored, one message each (the oracle prints them too).
    pub warnings: Vec<String>,
}

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

fn req_u64(r: &Map<String, Value>, key: &str, min: u64, where_: &str) -> Result<u64, InputError> {
    match r.get(key) {
        Some(v) if is_int(v) => match v.as_u64() {
            Some(x) if x >= min => Ok(x),
            _ => Err(InputError(format!(
                "{where_}: '{key}' must be an integer >= {min}"
            ))),
        },
        _ => Err(InputError(format!(
            "{where_}: '{key}' must be an integer >= {min}"
        ))),
    }
}

impl Workload {
    pub fn read_file(path: &Path) -> Result<Workload, InputError> {
        let f = std::fs::File::open(path)
            .map_err(|e| InputError(format!("{}: {e}", path.display())))?;
        Self::read(std::io::BufReader::new(f), &path.display().to_string())
    }

    /// Parses a workload; `source` names it in errors.
    pub fn read(input: impl BufRead, source: &str) -> Result<Workload, InputError> {
        const KNOWN: [&str; 7] = [
            "id",
            "arrival_us",
            "prompt",
            "hash_ids",
            "input_length",
            "hash_block",
            "max_tokens",
        ];
        let mut w = Workload {
            source: source.to_string(),
            ..Workload::default()
        };
        let mut seen = std::collections::HashSet::new();
        let mut warned = std::collections::BTreeSet::new();
        let mut last_arrival = 0u64;
        for (i, line) in input.lines().enumerate() {
            let lineno = i as u64 + 1;
            let where_ = format!("{source}:{lineno}");
            let line = line.map_err(|e| InputError(format!("{where_}: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| InputError(format!("{where_}: bad JSON: {e}")))?;
            let Value::Object(r) = v else {
                return Err(InputError(format!(
                    "{where_}: each line must be a JSON object"
                )));
            };
            for k in r.keys() {
                if !KNOWN.contains(&k.as_str()) && warned.insert(k.clone()) {
                    w.warnings
                        .push(format!("ignoring unknown workload field {k:?}"));
                }
            }
            let id = match r.get("id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                _ => {
                    return Err(InputError(format!(
                        "{where_}: 'id' must be a non-empty string"
                    )))
                }
            };
            if !seen.insert(id.clone()) {
                return Err(InputError(format!("{where_}: duplicate id {id:?}")));
            }
            let arrival_us = req_u64(&r, "arrival_us", 0, &where_)?;
            if arrival_us > MAX_ARRIVAL_US {
                return Err(InputError(format!(
                    "{where_}: 'arrival_us' {arrival_us} exceeds gpumem's limit of {MAX_ARRIVAL_US}"
                )));
            }
            if arrival_us < last_arrival {
                return Err(InputError(format!(
                    "{where_}: requests must be in arrival order ({arrival_us} < {last_arrival})"
                )));
            }
            last_arrival = arrival_us;
            let max_tokens = req_u64(&r, "max_tokens", 1, &where_)?;
            let prompt = if let Some(p) = r.get("prompt") {
                if r.contains_key("hash_ids") || r.contains_key("input_length") {
                    return Err(InputError(format!(
                        "{where_}: give either 'prompt' or 'hash_ids'+'input_length', not both"
                    )));
                }
                let Value::Array(items) = p else {
                    return Err(InputError(format!(
                        "{where_}: 'prompt' must be a list of integers"
                    )));
                };
                let mut toks = Vec::with_capacity(items.len());
                for t in items {
                    if !is_int(t) {
                        return Err(InputError(format!(
                            "{where_}: 'prompt' must be a list of integers"
                        )));
                    }
                    match t.as_u64().and_then(|x| u32::try_from(x).ok()) {
                        Some(x) => toks.push(x),
                        None => {
                            return Err(InputError(format!(
                            "{where_}: prompt token {t} is outside 0..2^32 (gpumem's token range)"
                        )))
                        }
                    }
                }
                Prompt::Tokens(toks)
            } else {
                let hash_ids = match r.get("hash_ids") {
                    Some(Value::Array(items)) if items.iter().all(is_int) => {
                        let mut ids = Vec::with_capacity(items.len());
                        for h in items {
                            match h.as_i64() {
                                Some(x) => ids.push(x),
                                None => {
                                    return Err(InputError(format!(
                                        "{where_}: hash id {h} is outside the 64-bit signed range"
                                    )))
                                }
                            }
                        }
                        ids
                    }
                    _ => {
                        return Err(InputError(format!(
                            "{where_}: 'hash_ids' must be a list of integers"
                        )))
                    }
                };
                let input_length = match r.get("input_length") {
                    Some(v) if is_int(v) => v.as_u64().unwrap_or(0),
                    _ => {
                        return Err(InputError(format!(
                            "{where_}: 'input_length' must be an integer"
                        )))
                    }
                };
                let hash_block = match r.get("hash_block") {
                    None => DEFAULT_HASH_BLOCK,
                    Some(v) if is_int(v) && v.as_u64().is_some_and(|x| x >= 1) => {
                        v.as_u64().unwrap()
                    }
                    Some(_) => {
                        return Err(InputError(format!(
                            "{where_}: 'hash_block' must be a positive integer"
                        )))
                    }
                };
                let capacity = (hash_ids.len() as u128) * hash_block as u128;
                if input_length as u128 > capacity {
                    return Err(InputError(format!(
                        "{where_}: input_length {input_length} needs {} hash_ids of {hash_block} tokens, got {}",
                        input_length.div_ceil(hash_block),
                        hash_ids.len()
                    )));
                }
                Prompt::HashIds {
                    hash_ids,
                    input_length,
                    hash_block,
                }
            };
            if prompt.is_empty() {
                return Err(InputError(format!(
                    "{where_}: empty prompt (vLLM rejects it)"
                )));
            }
            if prompt.len() > MAX_PROMPT_TOKENS {
                return Err(InputError(format!(
                    "{where_}: prompt of {} tokens exceeds gpumem's limit of {MAX_PROMPT_TOKENS}",
                    prompt.len()
                )));
            }
            let index = w.requests.len() as u64;
            let last_gen =
                GEN_BASE as u128 + index as u128 * GEN_STRIDE as u128 + (max_tokens - 1) as u128;
            if last_gen > u32::MAX as u128 {
                return Err(InputError(format!(
                    "{where_}: generated token ids of this request exceed 2^32 (line index {index}, max_tokens {max_tokens})"
                )));
            }
            w.requests.push(WorkloadRequest {
                id,
                arrival_us,
                prompt,
                max_tokens,
                line: lineno,
            });
        }
        Ok(w)
    }

    /// vLLM's input-processor checks against a config: every prompt shorter than
    /// `max_model_len`.
    pub fn validate(&self, max_model_len: u64) -> Result<(), InputError> {
        for r in &self.requests {
            let n = r.prompt.len();
            if n >= max_model_len {
                return Err(InputError(format!(
                    "{}:{}: prompt length {n} >= max_model_len {max_model_len} (vLLM's input processor rejects it)",
                    self.source, r.line
                )));
            }
        }
        Ok(())
    }
}

/// The knobs both sides must agree on (`../shared/conformance/README.md`, "Config").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConformanceConfig {
    pub num_gpu_blocks: u64,
    pub block_size: u64,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    pub max_model_len: u64,
    pub enable_prefix_caching: bool,
    pub step_us: u64,
}

const CONFIG_KEYS: [&str; 7] = [
    "num_gpu_blocks",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "enable_prefix_caching",
    "step_us",
];

impl ConformanceConfig {
    pub fn read_file(path: &Path) -> Result<(ConformanceConfig, Vec<String>), InputError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InputError(format!("{}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a config object; returns it and warnings about ignored keys.
    pub fn parse(text: &str, source: &str) -> Result<(ConformanceConfig, Vec<String>), InputError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| InputError(format!("{source}: bad JSON: {e}")))?;
        let Value::Object(m) = v else {
            return Err(InputError(format!(
                "{source}: config must be a JSON object"
            )));
        };
        let missing: Vec<&str> = CONFIG_KEYS
            .iter()
            .copied()
            .filter(|k| !m.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(InputError(format!(
                "{source}: missing config keys: {}",
                missing.join(", ")
            )));
        }
        let mut warnings = Vec::new();
        let unknown: Vec<&String> = m
            .keys()
            .filter(|k| !CONFIG_KEYS.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = unknown.iter().map(|s| s.as_str()).collect();
            warnings.push(format!(
                "ignoring unknown config keys: {}",
                names.join(", ")
            ));
        }
        let int = |k: &str| -> Result<u64, InputError> {
            match m[k].as_u64() {
                Some(x) if x >= 1 && is_int(&m[k]) => Ok(x),
                _ => Err(InputError(format!(
                    "{source}: {k} must be a positive integer"
                ))),
            }
        };
        let enable_prefix_caching = match m["enable_prefix_caching"] {
            Value::Bool(b) => b,
            _ => {
                return Err(InputError(format!(
                    "{source}: enable_prefix_caching must be true or false"
                )))
            }
        };
        let c = ConformanceConfig {
            num_gpu_blocks: int("num_gpu_blocks")?,
            block_size: int("block_size")?,
            max_num_seqs: int("max_num_seqs")?,
            max_num_batched_tokens: int("max_num_batched_tokens")?,
            max_model_len: int("max_model_len")?,
            enable_prefix_caching,
            step_us: int("step_us")?,
        };
        if c.num_gpu_blocks < 2 {
            return Err(InputError(format!(
                "{source}: num_gpu_blocks must be >= 2 (block 0 is the null block)"
            )));
        }
        Ok((c, warnings))
    }

    /// Configurations vLLM 0.33.0 refuses at start-up (the oracle exits 2 on them), and the
    /// limits of gpumem's own representation.
    pub fn startup_errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        let usable = (self.num_gpu_blocks as u128 - 1) * self.block_size as u128;
        if self.max_model_len as u128 > usable {
            out.push(format!(
                "max_model_len {} exceeds the KV pool ({} usable blocks x {} = {usable} tokens); real vLLM refuses to start (check_enough_kv_cache_memory)",
                self.max_model_len,
                self.num_gpu_blocks - 1,
                self.block_size
            ));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            out.push(
                "max_num_batched_tokens < max_num_seqs: vLLM's SchedulerConfig rejects this".into(),
            );
        }
        for (name, value, limit) in [
            ("num_gpu_blocks", self.num_gpu_blocks, MAX_GPU_BLOCKS),
            ("block_size", self.block_size, MAX_BLOCK_SIZE),
            ("max_model_len", self.max_model_len, MAX_MODEL_LEN),
            ("step_us", self.step_us, MAX_STEP_US),
        ] {
            if value > limit {
                out.push(format!("{name} {value} exceeds gpumem's limit of {limit}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_rule() {
        let p = Prompt::HashIds {
            hash_ids: vec![3, 1_000_000_000],
            input_length: 6,
            hash_block: 4,
        };
        let mut out = Vec::new();
        p.fill(0, 6, &mut out);
        let want: Vec<u32> = (0..6u64)
            .map(|j| {
                let h = [3i128, 1_000_000_000][(j / 4) as usize];
                ((h * 4 + (j % 4) as i128) % PROMPT_MOD) as u32
            })
            .collect();
        assert_eq!(out, want);
        out.clear();
        p.fill(3, 5, &mut out);
        assert_eq!(out, want[3..5]);
        assert_eq!(WorkloadRequest::generated_token(2, 5), 2_000_020_005);
    }

    #[test]
    fn errors_name_file_and_line() {
        let bad = [
            ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}\nnot json", "w:2: bad JSON"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":0}", "w:1: 'max_tokens'"),
            ("{\"id\":\"a\",\"arrival_us\":-1,\"prompt\":[1],\"max_tokens\":1}", "w:1: 'arrival_us'"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[],\"max_tokens\":1}", "w:1: empty prompt"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":\"x\",\"max_tokens\":1}", "w:1: 'prompt'"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1.5],\"max_tokens\":1}", "w:1: 'prompt'"),
            ("{\"id\":\"a\",\"arrival_us\":5,\"prompt\":[1],\"max_tokens\":1}\n{\"id\":\"b\",\"arrival_us\":4,\"prompt\":[1],\"max_tokens\":1}", "w:2: requests must be in arrival order"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}\n{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}", "w:2: duplicate id"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"hash_ids\":[1],\"input_length\":513,\"max_tokens\":1}", "w:1: input_length 513 needs 2"),
            ("{\"id\":\"a\",\"arrival_us\":0,\"hash_ids\":[1],\"input_length\":\"3\",\"max_tokens\":1}", "w:1: 'input_length'"),
            ("[1,2]", "w:1: each line must be a JSON object"),
        ];
        for (text, want) in bad {
            let err = Workload::read(text.as_bytes(), "w").unwrap_err();
            assert!(err.0.starts_with(want), "{text:?}: got {err}");
        }
        let ok = Workload::read(
            "{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1,2],\"max_tokens\":1,\"x\":1}\n\n"
                .as_bytes(),
            "w",
        )
        .unwrap();
        assert_eq!(ok.requests.len(), 1);
        assert_eq!(ok.warnings.len(), 1);
        assert!(ok
            .validate(2)
            .unwrap_err()
            .0
            .starts_with("w:1: prompt length 2 >= max_model_len 2"));
    }

    #[test]
    fn config_checks() {
        let good = r#"{"num_gpu_blocks": 10, "block_size": 4, "max_num_seqs": 2,
            "max_num_batched_tokens": 8, "max_model_len": 36, "enable_prefix_caching": true,
            "step_us": 1000}"#;
        let (c, w) = ConformanceConfig::parse(good, "c").unwrap();
        assert!(w.is_empty() && c.startup_errors().is_empty());
        let too_long = good.replace("36", "37");
        let (c, _) = ConformanceConfig::parse(&too_long, "c").unwrap();
        assert!(c.startup_errors()[0].contains("exceeds the KV pool"));
        let missing = good.replace("\"step_us\": 1000", "\"x\": 1");
        assert!(ConformanceConfig::parse(&missing, "c")
            .unwrap_err()
            .0
            .contains("missing config keys: step_us"));
        let bad = good.replace("true", "1");
        assert!(ConformanceConfig::parse(&bad, "c").is_err());
        let one_block = good.replace("\"num_gpu_blocks\": 10", "\"num_gpu_blocks\": 1");
        assert!(ConformanceConfig::parse(&one_block, "c")
            .unwrap_err()
            .0
            .contains(">= 2"));
    }
}
