//! GPU and model profiles (RON data, built-ins in `sim/profiles/`) and the number of KV blocks
//! that follows from them the way vLLM sizes its cache.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::workload::MAX_GPU_BLOCKS;

const BUILTIN_GPUS: &str = include_str!("../../profiles/gpus.ron");
const BUILTIN_MODELS: &str = include_str!("../../profiles/models.ron");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProfile {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Total device memory.
    pub memory_bytes: u64,
    /// Dense BF16 tensor throughput.
    pub flops_per_s: u64,
    /// Memory bandwidth.
    pub mem_bytes_per_s: u64,
    /// vLLM's defaults on this GPU.
    pub default_max_num_seqs: u64,
    pub default_max_num_batched_tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelProfile {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub params: u64,
    pub layers: u64,
    pub attention_heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Bytes per weight and per KV element.
    pub dtype_bytes: u64,
    pub max_model_len: u64,
    /// Memory vLLM keeps besides weights and KV (activation peak, CUDA graphs, non-torch).
    pub activation_reserve_bytes: u64,
}

impl ModelProfile {
    pub fn weight_bytes(&self) -> u64 {
        self.params.saturating_mul(self.dtype_bytes)
    }

    /// K and V of one token over all layers.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2u64.saturating_mul(self.layers)
            .saturating_mul(self.kv_heads)
            .saturating_mul(self.head_dim)
            .saturating_mul(self.dtype_bytes)
    }
}

/// A profile by built-in name or alias (case-insensitive), or from a RON file (a path ending
/// in `.ron`). Errors name the file and line.
fn resolve<T: for<'de> Deserialize<'de>>(
    arg: &str,
    builtin: &str,
    what: &str,
    names: impl Fn(&T) -> Vec<String>,
) -> Result<T, String> {
    if arg.ends_with(".ron") {
        let path = Path::new(arg);
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the {what} profile: {e}", path.display()))?;
        return ron::from_str(&text).map_err(|e| {
            format!(
                "{}:{}: bad {what} profile: {} (column {})",
                path.display(),
                e.position.line,
                e.code,
                e.position.col
            )
        });
    }
    let all: Vec<T> = ron::from_str(builtin).expect("built-in profiles parse");
    let want = arg.to_ascii_lowercase();
    let mut known = Vec::new();
    for p in all {
        let n = names(&p);
        if n.iter().any(|x| x.to_ascii_lowercase() == want) {
            return Ok(p);
        }
        known.push(n[0].clone());
    }
    Err(format!(
        "unknown {what} '{arg}'; built-in: {}, or a FILE.ron",
        known.join(", ")
    ))
}

impl GpuProfile {
    pub fn resolve(arg: &str) -> Result<GpuProfile, String> {
        resolve(arg, BUILTIN_GPUS, "GPU", |p: &GpuProfile| {
            std::iter::once(p.name.clone())
                .chain(p.aliases.clone())
                .collect()
        })
    }

    pub fn builtin() -> Vec<GpuProfile> {
        ron::from_str(BUILTIN_GPUS).expect("built-in profiles parse")
    }
}

impl ModelProfile {
    pub fn resolve(arg: &str) -> Result<ModelProfile, String> {
        resolve(arg, BUILTIN_MODELS, "model", |p: &ModelProfile| {
            std::iter::once(p.name.clone())
                .chain(p.aliases.clone())
                .collect()
        })
    }

    pub fn builtin() -> Vec<ModelProfile> {
        ron::from_str(BUILTIN_MODELS).expect("built-in profiles parse")
    }
}

/// How the KV pool was sized, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSizing {
    pub memory_bytes: u64,
    /// `memory × gpu_memory_utilization`.
    pub budget_bytes: u64,
    pub weight_bytes: u64,
    pub activation_reserve_bytes: u64,
    pub kv_cache_bytes: u64,
    /// `2 × layers × kv_heads × head_dim × dtype_bytes × block_size`.
    pub bytes_per_block: u64,
    /// vLLM's `num_gpu_blocks` (the null block included).
    pub num_blocks: u64,
}

/// vLLM's sizing: `(memory × utilization − weights − activation reserve) / bytes per block`,
/// with the utilization in parts per million. Fails when not even two blocks (the null block
/// and one usable) fit.
pub fn kv_sizing(
    gpu: &GpuProfile,
    model: &ModelProfile,
    utilization_ppm: u64,
    block_size: u64,
) -> Result<KvSizing, String> {
    let budget =
        (gpu.memory_bytes as u128 * utilization_ppm.min(1_000_000) as u128 / 1_000_000) as u64;
    let weights = model.weight_bytes();
    let reserve = model.activation_reserve_bytes;
    let kv = budget.saturating_sub(weights).saturating_sub(reserve);
    let per_block = model.kv_bytes_per_token().saturating_mul(block_size).max(1);
    let num_blocks = kv / per_block;
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    if num_blocks < 2 {
        return Err(format!(
            "no room for the KV cache: {} of {} ({} x {}) minus {} of {} weights and {} reserved leaves {}, less than two blocks of {} bytes; raise --gpu-memory-utilization, use a bigger GPU or a smaller model, or give --kv-blocks",
            gib(budget),
            gpu.name,
            gib(gpu.memory_bytes),
            utilization_ppm as f64 / 1e6,
            gib(weights),
            model.name,
            gib(reserve),
            gib(kv),
            per_block
        ));
    }
    if num_blocks > MAX_GPU_BLOCKS {
        return Err(format!(
            "{num_blocks} KV blocks exceed gpumem's limit of {MAX_GPU_BLOCKS}; raise --block-size"
        ));
    }
    Ok(KvSizing {
        memory_bytes: gpu.memory_bytes,
        budget_bytes: budget,
        weight_bytes: weights,
        activation_reserve_bytes: reserve,
        kv_cache_bytes: kv,
        bytes_per_block: per_block,
        num_blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_resolve() {
        assert_eq!(GpuProfile::builtin().len(), 4);
        assert_eq!(ModelProfile::builtin().len(), 4);
        assert_eq!(GpuProfile::resolve("H100").unwrap().name, "h100");
        assert_eq!(GpuProfile::resolve("h100-80gb").unwrap().name, "h100");
        assert_eq!(
            ModelProfile::resolve("meta-llama/Llama-3.1-8B")
                .unwrap()
                .name,
            "llama-3.1-8b"
        );
        let e = GpuProfile::resolve("tpu").unwrap_err();
        assert!(e.contains("h100, h200, a100-80gb, l40s"), "{e}");
    }

    #[test]
    fn kv_blocks_as_vllm_sizes_them() {
        let gpu = GpuProfile::resolve("h100").unwrap();
        let m = ModelProfile::resolve("llama-3.1-8b").unwrap();
        assert_eq!(m.kv_bytes_per_token(), 128 << 10);
        let s = kv_sizing(&gpu, &m, 900_000, 16).unwrap();
        assert_eq!(s.bytes_per_block, 2 << 20);
        let want = (85_520_809_984u64 * 9 / 10 - 8_030_261_248 * 2 - (2 << 30)) / (2 << 20);
        assert_eq!(s.num_blocks, want);
        // 70B weights (141 GB in BF16) fit no single GPU (tensor parallelism is not modelled).
        let big = ModelProfile::resolve("llama-3.1-70b").unwrap();
        let e = kv_sizing(&gpu, &big, 900_000, 16).unwrap_err();
        assert!(e.contains("no room for the KV cache"), "{e}");
        let h200 = GpuProfile::resolve("h200").unwrap();
        assert!(kv_sizing(&h200, &big, 900_000, 16).is_err());
        assert!(kv_sizing(&h200, &big, 1_000_000, 16).is_ok());
    }

    #[test]
    fn profile_files_name_their_line() {
        let dir = std::env::temp_dir().join(format!("gpumem-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("gpu.ron");
        std::fs::write(&f, "(\n  name: \"x\",\n  memory_bytes: \"lots\",\n)").unwrap();
        let e = GpuProfile::resolve(f.to_str().unwrap()).unwrap_err();
        assert!(e.contains("gpu.ron:3: bad GPU profile"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
