//! GPU and model profiles (RON data, built-ins in `sim/profiles/`) and the number of KV blocks
//! that follows from them the way vLLM sizes its cache.

use std::path::Path;

use gpumem_core::link::{Link, Links};
use serde::{Deserialize, Serialize};

use super::workload::MAX_GPU_BLOCKS;

const BUILTIN_GPUS: &str = include_str!("../../profiles/gpus.ron");
const BUILTIN_MODELS: &str = include_str!("../../profiles/models.ron");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// How the GPU reaches host memory, storage and its peers (PCIe 4.0 x16 and no NVLink when
    /// a profile file leaves it out).
    #[serde(default)]
    pub links: LinkSpec,
}

/// The links of a GPU profile, in the units data sheets give.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkSpec {
    /// PCIe generation (3 to 6) and lanes (1, 2, 4, 8 or 16) to the host.
    pub pcie_gen: u32,
    pub pcie_lanes: u32,
    /// Fixed cost of one host transfer (launch and DMA setup), ns.
    pub pcie_latency_ns: u64,
    /// Pageable host memory is copied through a pinned staging buffer: this share of the
    /// pinned bandwidth, percent (1 to 100).
    pub pageable_pct: u64,
    /// NVLink bandwidth one way, bytes/s; 0 when peers talk over PCIe.
    pub nvlink_bytes_per_s: u64,
    pub nvlink_latency_ns: u64,
    /// Host memory copy bandwidth (memcpy), bytes/s.
    pub host_memory_bytes_per_s: u64,
    /// Local storage read bandwidth (weights loaded from disk), bytes/s, and latency, ns.
    pub disk_bytes_per_s: u64,
    pub disk_latency_ns: u64,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            pcie_gen: 4,
            pcie_lanes: 16,
            pcie_latency_ns: 10_000,
            pageable_pct: 50,
            nvlink_bytes_per_s: 0,
            nvlink_latency_ns: 5_000,
            host_memory_bytes_per_s: 100_000_000_000,
            disk_bytes_per_s: 5_000_000_000,
            disk_latency_ns: 100_000,
        }
    }
}

impl GpuProfile {
    /// The transfer links this profile describes, or why they are not valid.
    pub fn links(&self) -> Result<Links, String> {
        let l = &self.links;
        let host = Link::pcie(l.pcie_gen, l.pcie_lanes, l.pcie_latency_ns).ok_or_else(|| {
            format!(
                "GPU profile {}: PCIe generation {} with {} lanes is not a link gpumem knows (generations 3 to 6, lanes 1, 2, 4, 8 or 16)",
                self.name, l.pcie_gen, l.pcie_lanes
            )
        })?;
        let positive = [
            ("pageable_pct", l.pageable_pct),
            ("host_memory_bytes_per_s", l.host_memory_bytes_per_s),
            ("disk_bytes_per_s", l.disk_bytes_per_s),
            ("mem_bytes_per_s", self.mem_bytes_per_s),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!(
                "GPU profile {}: {name} must be positive",
                self.name
            ));
        }
        if l.pageable_pct > 100 {
            return Err(format!(
                "GPU profile {}: pageable_pct {} is more than 100",
                self.name, l.pageable_pct
            ));
        }
        let peer = if l.nvlink_bytes_per_s > 0 {
            Link {
                bytes_per_s: l.nvlink_bytes_per_s,
                latency_ns: l.nvlink_latency_ns,
            }
        } else {
            host
        };
        Ok(Links {
            // A copy inside HBM reads and writes it: half the bandwidth each way.
            device_local: Link {
                bytes_per_s: (self.mem_bytes_per_s / 2).max(1),
                latency_ns: 2_000,
            },
            host_pinned: host,
            host_pageable: Link {
                bytes_per_s: (host.bytes_per_s / 100 * l.pageable_pct).max(1),
                latency_ns: host.latency_ns,
            },
            peer,
            host_memory: Link {
                bytes_per_s: l.host_memory_bytes_per_s,
                latency_ns: 1_000,
            },
            disk: Link {
                bytes_per_s: l.disk_bytes_per_s,
                latency_ns: l.disk_latency_ns,
            },
        })
    }

    /// The links of the default GPU (`h100`).
    pub fn default_links() -> Links {
        GpuProfile::resolve("h100")
            .and_then(|g| g.links())
            .expect("the built-in h100 profile has valid links")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Memory of one captured CUDA graph (an estimate; vLLM logs its own as "Estimated CUDA
    /// graph memory"). Reported with the capture sizes; it is part of
    /// `activation_reserve_bytes`, so it does not size the KV pool. 0 when a file leaves it out.
    #[serde(default)]
    pub cudagraph_bytes_per_graph: u64,
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
    builtin_named(arg, builtin, what, names)
}

/// A built-in profile by name or alias (case-insensitive).
fn builtin_named<T: for<'de> Deserialize<'de>>(
    arg: &str,
    builtin: &str,
    what: &str,
    names: impl Fn(&T) -> Vec<String>,
) -> Result<T, String> {
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
    /// A built-in name or alias, or a FILE.ron; checked.
    pub fn resolve(arg: &str) -> Result<GpuProfile, String> {
        let gpu = resolve(arg, BUILTIN_GPUS, "GPU", GpuProfile::names)?;
        gpu.links()?;
        Ok(gpu)
    }

    /// A built-in profile by name or alias, never a file.
    pub fn builtin_named(name: &str) -> Result<GpuProfile, String> {
        builtin_named(name, BUILTIN_GPUS, "GPU", GpuProfile::names)
    }

    fn names(&self) -> Vec<String> {
        std::iter::once(self.name.clone())
            .chain(self.aliases.clone())
            .collect()
    }

    pub fn builtin() -> Vec<GpuProfile> {
        ron::from_str(BUILTIN_GPUS).expect("built-in profiles parse")
    }
}

impl ModelProfile {
    /// A built-in name or alias, or a FILE.ron.
    pub fn resolve(arg: &str) -> Result<ModelProfile, String> {
        resolve(arg, BUILTIN_MODELS, "model", ModelProfile::names)
    }

    /// A built-in profile by name or alias, never a file.
    pub fn builtin_named(name: &str) -> Result<ModelProfile, String> {
        builtin_named(name, BUILTIN_MODELS, "model", ModelProfile::names)
    }

    fn names(&self) -> Vec<String> {
        std::iter::once(self.name.clone())
            .chain(self.aliases.clone())
            .collect()
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

/// A KV pool of at most `kv_bytes` for `model`: its `num_gpu_blocks` (the null block
/// included) and the bytes they take. Fails below two blocks or past gpumem's limit.
pub fn kv_sizing_bytes(
    model: &ModelProfile,
    kv_bytes: u64,
    block_size: u64,
) -> Result<(u32, u64), String> {
    let per_block = model.kv_bytes_per_token().saturating_mul(block_size).max(1);
    let blocks = kv_bytes / per_block;
    if blocks < 2 {
        return Err(format!(
            "a KV pool of {kv_bytes} bytes holds fewer than two blocks of {per_block} bytes"
        ));
    }
    if blocks > MAX_GPU_BLOCKS {
        return Err(format!(
            "{blocks} KV blocks exceed gpumem's limit of {MAX_GPU_BLOCKS}; raise --block-size"
        ));
    }
    Ok((blocks as u32, blocks * per_block))
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
    fn links_follow_the_data_sheet() {
        let h100 = GpuProfile::resolve("h100").unwrap().links().unwrap();
        let l40s = GpuProfile::resolve("l40s").unwrap().links().unwrap();
        // PCIe 5.0 x16 against 4.0 x16; NVLink against none.
        assert!(h100.host_pinned.bytes_per_s > 3 * l40s.host_pinned.bytes_per_s / 2);
        assert!(h100.peer.bytes_per_s > 5 * h100.host_pinned.bytes_per_s);
        assert_eq!(l40s.peer, l40s.host_pinned);
        assert!(h100.host_pageable.bytes_per_s < h100.host_pinned.bytes_per_s);
        let mut bad = GpuProfile::resolve("h100").unwrap();
        bad.links.pcie_gen = 2;
        assert!(bad.links().unwrap_err().contains("PCIe generation 2"));
        bad.links.pcie_gen = 5;
        bad.links.pageable_pct = 0;
        assert!(bad.links().unwrap_err().contains("pageable_pct"));
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
