//! The conformance workload's line parser (`../shared/conformance/README.md`, "Workload"),
//! with the same checks as vLLM's oracle: ids unique, arrivals in order, every prompt
//! non-empty, generated token ids within 32 bits.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::import::{json_model, UnknownFields};
use super::stream::{LineParser, Record, Timing};
use super::{
    Prompt, WorkloadRequest, DEFAULT_HASH_BLOCK, GEN_BASE, GEN_STRIDE, MAX_ARRIVAL_US,
    MAX_PROMPT_TOKENS,
};
use crate::error::{echo, json_reason, TraceError};

const KNOWN: [&str; 9] = [
    "id",
    "priority",
    "arrival_us",
    "prompt",
    "hash_ids",
    "input_length",
    "hash_block",
    "max_tokens",
    "model",
];

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

fn req_u64(r: &Map<String, Value>, key: &str, min: u64) -> Result<u64, String> {
    match r.get(key) {
        Some(v) if is_int(v) => match v.as_u64() {
            Some(x) if x >= min => Ok(x),
            _ => Err(format!("'{key}' must be an integer >= {min}")),
        },
        _ => Err(format!("'{key}' must be an integer >= {min}")),
    }
}

/// 128 bits of an id (FNV-1a): the duplicate check keeps this instead of the id, so its
/// memory is 16 bytes a request; two ids meet by chance with probability about n² / 2^129.
fn fingerprint(id: &str) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    id.bytes()
        .fold(OFFSET, |h, b| (h ^ b as u128).wrapping_mul(PRIME))
}

pub(super) struct Conformance {
    source: String,
    seen: HashSet<u128>,
    unknown: UnknownFields,
    last_arrival: u64,
    requests: u64,
    /// Read the `model` field (else it is ignored unread).
    models: bool,
}

impl Conformance {
    pub(super) fn new(source: &str) -> Self {
        Conformance {
            source: source.to_string(),
            seen: HashSet::new(),
            unknown: UnknownFields::new("workload"),
            last_arrival: 0,
            requests: 0,
            models: false,
        }
    }

    fn request(&mut self, r: &Map<String, Value>, line: u64) -> Result<WorkloadRequest, String> {
        let id = match r.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err("'id' must be a non-empty string".into()),
        };
        if !self.seen.insert(fingerprint(&id)) {
            return Err(format!("duplicate id \"{}\"", echo(&id)));
        }
        let arrival_us = req_u64(r, "arrival_us", 0)?;
        if arrival_us > MAX_ARRIVAL_US {
            return Err(format!(
                "'arrival_us' {arrival_us} exceeds gpumem's limit of {MAX_ARRIVAL_US}"
            ));
        }
        if arrival_us < self.last_arrival {
            return Err(format!(
                "requests must be in arrival order ({arrival_us} < {})",
                self.last_arrival
            ));
        }
        self.last_arrival = arrival_us;
        let max_tokens = req_u64(r, "max_tokens", 1)?;
        let priority = match r.get("priority") {
            None => 0,
            Some(v) if is_int(v) && v.as_i64().is_some() => v.as_i64().unwrap_or(0),
            Some(_) => return Err("'priority' must be an integer".into()),
        };
        let prompt = match r.get("prompt") {
            Some(p) => {
                if r.contains_key("hash_ids") || r.contains_key("input_length") {
                    return Err(
                        "give either 'prompt' or 'hash_ids'+'input_length', not both".into(),
                    );
                }
                tokens(p)?
            }
            None => hashed(r)?,
        };
        if prompt.is_empty() {
            return Err("empty prompt (vLLM rejects it)".into());
        }
        if prompt.len() > MAX_PROMPT_TOKENS {
            return Err(format!(
                "prompt of {} tokens exceeds gpumem's limit of {MAX_PROMPT_TOKENS}",
                prompt.len()
            ));
        }
        let model = match self.models {
            true => json_model(r)?,
            false => None,
        };
        let index = self.requests;
        let last_gen =
            GEN_BASE as u128 + index as u128 * GEN_STRIDE as u128 + (max_tokens - 1) as u128;
        if last_gen > u32::MAX as u128 {
            return Err(format!(
                "generated token ids of this request exceed 2^32 (line index {index}, max_tokens {max_tokens})"
            ));
        }
        Ok(WorkloadRequest {
            id,
            arrival_us,
            prompt,
            max_tokens,
            priority,
            line,
            model,
        })
    }
}

/// `"prompt": [token, …]`.
fn tokens(p: &Value) -> Result<Prompt, String> {
    let Value::Array(items) = p else {
        return Err("'prompt' must be a list of integers".into());
    };
    let mut toks = Vec::with_capacity(items.len());
    for t in items {
        if !is_int(t) {
            return Err("'prompt' must be a list of integers".into());
        }
        match t.as_u64().and_then(|x| u32::try_from(x).ok()) {
            Some(x) => toks.push(x),
            None => {
                return Err(format!(
                    "prompt token {t} is outside 0..2^32 (gpumem's token range)"
                ))
            }
        }
    }
    Ok(Prompt::Tokens(toks))
}

/// `"hash_ids": […], "input_length": n[, "hash_block": b]`.
fn hashed(r: &Map<String, Value>) -> Result<Prompt, String> {
    let hash_ids = match r.get("hash_ids") {
        Some(Value::Array(items)) if items.iter().all(is_int) => {
            let mut ids = Vec::with_capacity(items.len());
            for h in items {
                match h.as_i64() {
                    Some(x) => ids.push(x),
                    None => return Err(format!("hash id {h} is outside the 64-bit signed range")),
                }
            }
            ids
        }
        _ => return Err("'hash_ids' must be a list of integers".into()),
    };
    let input_length = match r.get("input_length") {
        Some(v) if is_int(v) => v.as_u64().unwrap_or(0),
        _ => return Err("'input_length' must be an integer".into()),
    };
    let hash_block = match r.get("hash_block") {
        None => DEFAULT_HASH_BLOCK,
        Some(v) if is_int(v) && v.as_u64().is_some_and(|x| x >= 1) => v.as_u64().unwrap_or(1),
        Some(_) => return Err("'hash_block' must be a positive integer".into()),
    };
    let capacity = (hash_ids.len() as u128) * hash_block as u128;
    if input_length as u128 > capacity {
        return Err(format!(
            "input_length {input_length} needs {} hash_ids of {hash_block} tokens, got {}",
            input_length.div_ceil(hash_block),
            hash_ids.len()
        ));
    }
    Ok(Prompt::HashIds {
        hash_ids,
        input_length,
        hash_block,
    })
}

impl LineParser for Conformance {
    fn parse(
        &mut self,
        line: u64,
        text: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Record>, TraceError> {
        let err = |m: String| TraceError::at_line(&self.source, line, m);
        let v: Value = serde_json::from_str(text).map_err(|e| err(json_reason(&e, "bad JSON")))?;
        let Value::Object(r) = v else {
            return Err(err("each line must be a JSON object".into()));
        };
        self.unknown.check(&r, &KNOWN, warnings);
        let request = self
            .request(&r, line)
            .map_err(|m| TraceError::at_line(&self.source, line, m))?;
        self.requests += 1;
        Ok(Some(Record {
            time: request.arrival_us,
            request,
        }))
    }

    fn finish(&mut self, warnings: &mut Vec<String>) -> Result<(), TraceError> {
        self.unknown.finish(warnings);
        Ok(())
    }

    fn read_models(&mut self) -> bool {
        self.models = true;
        true
    }

    fn timing(&self) -> Timing {
        Timing {
            reorder: false,
            rebase: false,
            per_us: 1,
        }
    }
}
