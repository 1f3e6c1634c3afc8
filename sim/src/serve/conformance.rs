//! The conformance contract of `../shared/conformance/README.md`: its config (one JSON
//! object, read with the same checks as vLLM's oracle) and the runner that replays a
//! conformance workload through `vllm-0.33` and writes the step log, refusing what the oracle
//! refuses, in the oracle's order.

use std::path::Path;

use gpumem_core::kv::offload::OffloadPolicyKind;
use gpumem_traces::TraceError;
use serde_json::{Map, Value};

use super::arrivals::{Arrivals, TooLongPrompt};
use super::driver::{drive, DriveOptions, RunSummary};
use super::step_log::StepLogWriter;
use super::vllm::{EngineConfig, VllmEngine};
use super::workload::{
    RequestStream, Workload, WorkloadFormat, MAX_BLOCK_SIZE, MAX_GPU_BLOCKS, MAX_MODEL_LEN,
    MAX_STEP_US,
};
use super::ServeError;

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
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
    /// vLLM's scheduling policy: `fcfs` (the default) or `priority` (optional key `policy`).
    pub priority_policy: bool,
    /// The CPU offload tier (optional keys `offload_*`; see the contract's "CPU offload tier").
    pub offload: Option<ConformanceOffload>,
}

/// The contract's CPU offload tier keys, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConformanceOffload {
    /// `offload_cpu_blocks`: CPU blocks (chunks) in the tier.
    pub cpu_blocks: u64,
    /// `offload_block_size` (default `block_size`): tokens per CPU block.
    pub block_size: u64,
    /// `offload_policy`: `lru` (default) or `arc`.
    pub policy: OffloadPolicyKind,
    /// `offload_latency_steps` (default 0): the simulated copy engine's latency K.
    pub latency_steps: u64,
    /// `offload_prompt_only` (default true).
    pub prompt_only: bool,
}

/// Most CPU blocks gpumem simulates (the tier keeps a few words per block).
pub const MAX_OFFLOAD_BLOCKS: u64 = 1 << 26;

const OFFLOAD_KEYS: [&str; 5] = [
    "offload_cpu_blocks",
    "offload_block_size",
    "offload_policy",
    "offload_latency_steps",
    "offload_prompt_only",
];

/// The optional offload keys, checked as the oracle checks them.
fn parse_offload(
    m: &Map<String, Value>,
    block_size: u64,
    source: &str,
) -> Result<Option<ConformanceOffload>, TraceError> {
    let given: Vec<&str> = OFFLOAD_KEYS
        .iter()
        .copied()
        .filter(|k| m.contains_key(*k))
        .collect();
    if given.is_empty() {
        return Ok(None);
    }
    if !m.contains_key("offload_cpu_blocks") {
        return Err(TraceError::in_file(
            source,
            format!(
                "{} given without offload_cpu_blocks (the CPU offload tier is off)",
                given.join(", ")
            ),
        ));
    }
    let err = |msg: &str| TraceError::in_file(source, msg.to_string());
    let positive = |k: &str| match m.get(k) {
        Some(v) => match v.as_u64() {
            Some(x) if x >= 1 && is_int(v) => Ok(Some(x)),
            _ => Err(err(&format!("{k} must be a positive integer"))),
        },
        None => Ok(None),
    };
    let cpu_blocks = positive("offload_cpu_blocks")?.expect("checked above");
    let block = positive("offload_block_size")?.unwrap_or(block_size);
    let latency_steps = match m.get("offload_latency_steps") {
        None => 0,
        Some(v) => match v.as_u64() {
            Some(x) if is_int(v) => x,
            _ => return Err(err("offload_latency_steps must be an integer >= 0")),
        },
    };
    let policy = match m.get("offload_policy") {
        None => OffloadPolicyKind::Lru,
        Some(Value::String(p)) if p == "lru" => OffloadPolicyKind::Lru,
        Some(Value::String(p)) if p == "arc" => OffloadPolicyKind::Arc,
        Some(_) => return Err(err("offload_policy must be one of lru, arc")),
    };
    let prompt_only = match m.get("offload_prompt_only") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err("offload_prompt_only must be true or false")),
    };
    Ok(Some(ConformanceOffload {
        cpu_blocks,
        block_size: block,
        policy,
        latency_steps,
        prompt_only,
    }))
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
    pub fn read_file(path: &Path) -> Result<(ConformanceConfig, Vec<String>), TraceError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| TraceError::in_file(path, e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a config object; returns it and warnings about ignored keys.
    pub fn parse(text: &str, source: &str) -> Result<(ConformanceConfig, Vec<String>), TraceError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| TraceError::in_file(source, format!("bad JSON: {e}")))?;
        let Value::Object(m) = v else {
            return Err(TraceError::in_file(source, "config must be a JSON object"));
        };
        let missing: Vec<&str> = CONFIG_KEYS
            .iter()
            .copied()
            .filter(|k| !m.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(TraceError::in_file(
                source,
                format!("missing config keys: {}", missing.join(", ")),
            ));
        }
        let mut warnings = Vec::new();
        let unknown: Vec<&String> = m
            .keys()
            .filter(|k| {
                !CONFIG_KEYS.contains(&k.as_str())
                    && !OFFLOAD_KEYS.contains(&k.as_str())
                    && k.as_str() != "policy"
            })
            .collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = unknown.iter().map(|s| s.as_str()).collect();
            warnings.push(format!(
                "ignoring unknown config keys: {}",
                names.join(", ")
            ));
        }
        let int = |k: &str| -> Result<u64, TraceError> {
            match m[k].as_u64() {
                Some(x) if x >= 1 && is_int(&m[k]) => Ok(x),
                _ => Err(TraceError::in_file(
                    source,
                    format!("{k} must be a positive integer"),
                )),
            }
        };
        let enable_prefix_caching = match m["enable_prefix_caching"] {
            Value::Bool(b) => b,
            _ => {
                return Err(TraceError::in_file(
                    source,
                    "enable_prefix_caching must be true or false",
                ))
            }
        };
        let block_size = int("block_size")?;
        let c = ConformanceConfig {
            num_gpu_blocks: int("num_gpu_blocks")?,
            block_size,
            max_num_seqs: int("max_num_seqs")?,
            max_num_batched_tokens: int("max_num_batched_tokens")?,
            max_model_len: int("max_model_len")?,
            enable_prefix_caching,
            step_us: int("step_us")?,
            priority_policy: match m.get("policy").and_then(Value::as_str) {
                None if !m.contains_key("policy") => false,
                Some("fcfs") => false,
                Some("priority") => true,
                _ => {
                    return Err(TraceError::in_file(
                        source,
                        "policy must be \"fcfs\" or \"priority\"",
                    ))
                }
            },
            offload: parse_offload(&m, block_size, source)?,
        };
        if c.num_gpu_blocks < 2 {
            return Err(TraceError::in_file(
                source,
                "num_gpu_blocks must be >= 2 (block 0 is the null block)",
            ));
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
        if let Some(o) = &self.offload {
            if o.block_size % self.block_size != 0 {
                out.push(format!(
                    "offload_block_size {} is not a multiple of block_size {}: vLLM's OffloadingConnector rejects this (kv_connector_extra_config 'block_size' must be a multiple of the GPU KV cache block size)",
                    o.block_size, self.block_size
                ));
            }
            for (name, value, limit) in [
                ("offload_cpu_blocks", o.cpu_blocks, MAX_OFFLOAD_BLOCKS),
                ("offload_block_size", o.block_size, MAX_MODEL_LEN),
            ] {
                if value > limit {
                    out.push(format!("{name} {value} exceeds gpumem's limit of {limit}"));
                }
            }
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

/// Reads a conformance workload and config, runs `vllm-0.33` over them and writes the step log
/// to `log`. Warnings about ignored fields go to `warn`. As the oracle does, the whole
/// workload is checked (a first pass over the file) before the config's start-up checks and
/// before anything runs; the run then reads the file again, lazily.
pub fn run_conformance_files(
    workload: &Path,
    config: &Path,
    log: &mut dyn std::io::Write,
    warn: &mut dyn FnMut(&str),
) -> Result<RunSummary, ServeError> {
    let (cfg, cw) = ConformanceConfig::read_file(config)?;
    cw.iter().for_each(|w| warn(w));
    let open = || RequestStream::open(workload, Some(WorkloadFormat::Conformance), None);
    let mut first_pass = open()?;
    let source = first_pass.source().to_string();
    for r in Arrivals::new(
        &mut first_pass,
        &source,
        cfg.max_model_len,
        TooLongPrompt::Refuse,
    ) {
        r?;
    }
    first_pass.warnings().iter().for_each(|m| warn(m));
    let ecfg = EngineConfig::from_conformance(&cfg)?;
    let arrivals = Arrivals::new(open()?, &source, cfg.max_model_len, TooLongPrompt::Refuse);
    run(ecfg, arrivals, log)
}

/// Runs `vllm-0.33` over a parsed workload and config, writing the step log to `log`.
pub fn run_conformance(
    w: &Workload,
    cfg: &ConformanceConfig,
    log: &mut dyn std::io::Write,
) -> Result<RunSummary, ServeError> {
    // The oracle's order: input errors in the workload, then start-up errors of the config.
    w.validate(cfg.max_model_len)?;
    let ecfg = EngineConfig::from_conformance(cfg)?;
    let requests = w.requests.iter().cloned().map(Ok);
    run(
        ecfg,
        Arrivals::new(
            requests,
            &w.source,
            cfg.max_model_len,
            TooLongPrompt::Refuse,
        ),
        log,
    )
}

fn run(
    cfg: EngineConfig,
    mut arrivals: Arrivals<'_>,
    log: &mut dyn std::io::Write,
) -> Result<RunSummary, ServeError> {
    let mut engine = VllmEngine::new(cfg)?;
    let mut writer = StepLogWriter::new();
    drive(
        &mut engine,
        &mut arrivals,
        DriveOptions::default(),
        &mut |rec, engine| {
            log.write_all(writer.line(rec, engine))
                .map_err(|e| ServeError::Io(e.to_string()))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .to_string()
            .contains("missing config keys: step_us"));
        let bad = good.replace("true", "1");
        assert!(ConformanceConfig::parse(&bad, "c").is_err());
        let one_block = good.replace("\"num_gpu_blocks\": 10", "\"num_gpu_blocks\": 1");
        assert!(ConformanceConfig::parse(&one_block, "c")
            .unwrap_err()
            .to_string()
            .contains(">= 2"));
    }
}
