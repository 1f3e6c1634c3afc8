//! Run specs: every `gpumem` run (`alloc`, `kv`) as one plain value, kept on disk as RON.
//!
//! `gpumem alloc|kv … --print-spec` prints the spec its flags make, every default resolved;
//! `gpumem run SPEC.ron` runs it and prints what those flags print. Sweeps vary a spec field by
//! field, so the fields follow fixed rules:
//!
//! - a field is named after the flag that sets it (`--kv-blocks` → `kv_blocks`); a size adds its
//!   unit (`--capacity 80GiB` → `capacity_bytes: 85899345920`, `--occupancy` → `occupancy_pct`);
//!   `--no-prefix-caching` is `prefix_caching: false`;
//! - a value from a closed set is spelled as the flag spells it (`eviction: "leaf-lru"`,
//!   `cost: "fixed:1000"`, `gpu: "h100"`); a GPU or model profile from a file is inlined;
//! - every field must be present, except the output files (`plot`, `step_log`,
//!   `export_trace`) and a cluster's (`replicas`, `router`, `router_lag_us`: all three or
//!   none; none is one engine without a router); an unknown field, a wrong type or an unknown
//!   value is refused with the file, line and field;
//! - a relative path resolves against the folder of the spec file (so a spec and its trace
//!   move together); `--print-spec` writes absolute paths;
//! - a spec names its trace (path, format, limit) or generator; it never holds the workload.
//!
//! One link between fields: `gpu_memory_utilization: Some(f)` says `kv_blocks` was sized
//! from the GPU and model as vLLM sizes it, and a run checks that it still is (a spec whose
//! profile or sizing changed is refused, not silently run on another pool). To give
//! `kv_blocks` freely, set `gpu_memory_utilization: None`.

mod names;

use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use gpumem_core::alloc::Strategy;
use gpumem_core::buffers::SizesChoice;
use gpumem_core::kv::eviction::EvictionKind;
use gpumem_core::kv::offload::OffloadPolicyKind;
use gpumem_traces::serving::import::parse_decimal;
use gpumem_traces::serving::WorkloadFormat;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::alloc_replay::DefragMode;
use crate::cluster::{RouterPolicy, MAX_REPLICAS};
use crate::monitor::Thresholds;
use crate::serve::conformance::MAX_OFFLOAD_BLOCKS;
use crate::serve::workload::{MAX_BLOCK_SIZE, MAX_GPU_BLOCKS, MAX_MODEL_LEN};
use crate::serve::SchedulingPolicy;
use crate::serve::{kv_sizing, CostModel, GpuProfile, KvSizing, ModelProfile, Roofline};
pub use names::{ByName, Named};

/// A spec file larger than this is refused before it is read whole (a spec is a page of text;
/// `/dev/zero` must not fill memory).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// One run of `gpumem`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunSpec {
    Alloc(Box<AllocSpec>),
    Kv(Box<KvSpec>),
    Models(Box<ModelsSpec>),
    Colocate(Box<ColocateSpec>),
}

/// `gpumem models`: several models served from fewer GPUs under one residency policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    pub trace: ModelsTraceSpec,
    /// Seed of the built-in workload and of fault injection.
    pub seed: u64,
    /// The models, `NAME` or `NAME@TAG`, as `--models` lists them.
    pub models: Vec<String>,
    #[serde(with = "names::one")]
    pub policy: crate::models::Policy,
    pub gpu: ProfileSpec<GpuProfile>,
    pub gpus: u64,
    #[serde(with = "names::one")]
    pub placement: gpumem_core::balance::Placement,
    pub gpu_memory_utilization: Fraction,
    /// Each model's KV pool in GiB; None: the policy's default.
    pub kv_cache_gib: Option<u64>,
    pub block_size: u32,
    pub offload_threshold: Fraction,
    pub restore_threshold: Fraction,
    pub predict_horizon_ms: u64,
    pub sleep_level: u64,
    /// Also carry the run out on real memory.
    pub execute: Option<SleepExecuteSpec>,
}

/// Where `gpumem models`' requests come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ModelsTraceSpec {
    /// A trace whose requests name their model; `format` None: told from its first line.
    File {
        path: PathBuf,
        format: Option<ByName<WorkloadFormat>>,
        limit: Option<u64>,
        /// `--model-map` as the flag takes it (`ChatGPT=llama-3.1-8b,GPT-4=qwen2.5-7b`).
        model_map: Option<String>,
    },
    /// The built-in seeded workload: `requests` requests arriving at `rate` per second (as
    /// `--rate` takes it, three decimals at most), `burst_pct` percent staying with the
    /// previous request's model.
    Generated {
        requests: u64,
        rate: String,
        burst_pct: u32,
    },
}

/// `gpumem colocate`: a training step and rollout serving taking turns on one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColocateSpec {
    /// The training step: a PyTorch memory snapshot or allocation trace.
    pub train: PathBuf,
    /// The rollout requests: a serving trace, at most `limit` of them.
    pub serve: PathBuf,
    pub limit: u64,
    pub rounds: u64,
    pub sleep_level: u64,
    pub gpu: ProfileSpec<GpuProfile>,
    pub model: ProfileSpec<ModelProfile>,
    pub gpu_memory_utilization: Fraction,
    pub block_size: u32,
    /// Seed of fault injection.
    pub seed: u64,
    /// Also carry the serving engine's memory out on real memory.
    pub execute: Option<SleepExecuteSpec>,
}

/// `--execute` of `gpumem models` and `gpumem colocate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepExecuteSpec {
    #[serde(with = "names::one")]
    pub device: ExecuteDevice,
    /// Carry every range out at 1/`weight_bytes_scale` of its size (host only; a power of
    /// two, 1 to 512).
    pub weight_bytes_scale: u64,
    /// Faults as `--inject` takes them (`corrupt-backup:1`); checked by the executor.
    pub inject: Vec<String>,
}

/// `gpumem alloc`: an allocation trace through allocation strategies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocSpec {
    pub trace: AllocTraceSpec,
    /// Seed of the built-in workload and of fault injection.
    pub seed: u64,
    /// Strategies compared, in this order.
    #[serde(with = "names::list")]
    pub strategy: Vec<Strategy>,
    pub capacity_bytes: u64,
    pub alignment_bytes: u64,
    pub page_bytes: u64,
    #[serde(with = "names::one")]
    pub defrag: DefragMode,
    /// Walk every strategy's full invariants after every operation.
    pub check: bool,
    /// The memory-pressure monitor's warning and critical fractions of the capacity, as
    /// `--pressure-thresholds` takes them (`"0.75,0.9"`).
    pub pressure_thresholds: Thresholds,
    /// Also carry the decisions out on real memory.
    pub execute: Option<AllocExecuteSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plot: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_trace: Option<PathBuf>,
    /// The caching strategies' settings in PyTorch's `PYTORCH_CUDA_ALLOC_CONF` syntax, on top
    /// of those a snapshot recorded (`--pytorch-alloc-conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pytorch_alloc_conf: Option<String>,
    /// Replay a snapshot event by event through `caching` and compare its segment events and
    /// final segments with the recorded ones (`--compare-segments`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compare_segments: bool,
}

/// Where `gpumem alloc`'s operations come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum AllocTraceSpec {
    /// A PyTorch memory snapshot or gpumem JSON Lines (told apart by their bytes).
    File { path: PathBuf },
    /// The built-in LLM-serving workload (`--generate llm-serving`), `steps` engine steps.
    LlmServing { steps: u32 },
    /// Random sizes and lifetimes held near `occupancy_pct` of the capacity
    /// (`--generate occupancy`).
    Occupancy { ops: u64, occupancy_pct: u32 },
}

/// `--execute` of `gpumem alloc`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocExecuteSpec {
    #[serde(with = "names::one")]
    pub device: ExecuteDevice,
    /// Re-verify every live block every this many operations (0: only at the end).
    pub checkpoint_every: u64,
    /// Carry every block out at 1/`scale` of its size (host only; a power of two, 1 to 512).
    #[serde(default = "unscaled")]
    pub scale: u64,
    /// Faults as `--inject` takes them (`corrupt-block:3`); checked by the executor.
    pub inject: Vec<String>,
}

fn unscaled() -> u64 {
    1
}

/// `gpumem kv`: a request trace through a serving engine's paged KV cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSpec {
    pub trace: KvTraceSpec,
    /// Seed of the built-in workload and of fault injection.
    pub seed: u64,
    pub gpu: ProfileSpec<GpuProfile>,
    pub model: ProfileSpec<ModelProfile>,
    /// vLLM's num_gpu_blocks, the null block included.
    pub kv_blocks: u64,
    /// What `kv_blocks` was sized from (see the module documentation); None: given.
    pub gpu_memory_utilization: Option<Fraction>,
    /// Tokens per KV block.
    pub block_size: u64,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    pub max_model_len: u64,
    #[serde(with = "names::one")]
    pub engine: Engine,
    pub cost: CostSpec,
    #[serde(with = "names::one")]
    pub eviction: EvictionKind,
    pub prefix_caching: bool,
    #[serde(with = "names::one")]
    pub scheduling_policy: SchedulingPolicy,
    /// The memory-pressure monitor's warning and critical fractions of the KV pool, as
    /// `--pressure-thresholds` takes them (`"0.75,0.9"`).
    pub pressure_thresholds: Thresholds,
    /// CUDA-graph capture sizes as `--cudagraph-sizes` takes them: `"vllm"`, `"auto"` or a
    /// list (`"1,2,4,8"`).
    pub cudagraph_sizes: SizesChoice,
    /// Engines behind a router, each with its own pool on its own GPU (`--replicas`); absent,
    /// one engine and no router: the single-engine run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
    /// With `replicas`: how the router picks a replica, as `--router` spells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterPolicy>,
    /// With `replicas`: how late the engines' KV events reach the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_lag_us: Option<u64>,
    /// Also run the KV pool on real memory.
    pub execute: Option<KvExecuteSpec>,
    /// The KV cache's CPU tier (vLLM's OffloadingConnector); absent: no tier, and the run is
    /// the one without these fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_offload: Option<KvOffloadSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_log: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plot: Option<PathBuf>,
}

/// `--cpu-offload-blocks` / `--kv-offloading-size` of `gpumem kv` and the tier's other flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvOffloadSpec {
    /// CPU blocks in the tier (vLLM's chunks of `offload_block_size` tokens).
    pub cpu_offload_blocks: u64,
    /// What `cpu_offload_blocks` was sized from: vLLM's `--kv-offloading-size` in bytes (a run
    /// checks it still sizes that many); None: given.
    pub kv_offloading_bytes: Option<u64>,
    /// Tokens per CPU block: a multiple of `block_size`.
    pub offload_block_size: u64,
    #[serde(with = "names::one")]
    pub offload_policy: OffloadPolicyKind,
    /// The copy engine's latency in engine steps: the conformance clock's (`cost: "fixed:…"`);
    /// with the roofline a copy takes the host link's time and this must be 0.
    pub offload_latency_steps: u64,
    /// Every token offloaded, not only the prompt's (vLLM's `offload_prompt_only: false`).
    pub offload_all_tokens: bool,
    /// gpumem's predictive prefetch (beyond vLLM): the CPU-resident prefixes of the next this
    /// many waiting requests are loaded while they queue. 0 (absent): vLLM's tier exactly.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub offload_prefetch: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// Where `gpumem kv`'s requests come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum KvTraceSpec {
    /// A request trace; at most `limit` requests of it.
    File {
        path: PathBuf,
        #[serde(with = "names::one")]
        format: WorkloadFormat,
        limit: Option<u64>,
    },
    /// The built-in seeded workload of `requests` requests.
    Generated { requests: u64 },
}

/// `--execute` of `gpumem kv`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvExecuteSpec {
    #[serde(with = "names::one")]
    pub device: ExecuteDevice,
    pub bytes_per_block: u64,
    /// Faults as `--inject` takes them (`corrupt-block:3`); checked by the executor.
    pub inject: Vec<String>,
}

/// Where `--execute` carries decisions out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecuteDevice {
    Host,
    Cuda,
}

impl Named for ExecuteDevice {
    const WHAT: &'static str = "execute device";
    fn all() -> &'static [Self] {
        &[ExecuteDevice::Host, ExecuteDevice::Cuda]
    }
    fn name(self) -> &'static str {
        match self {
            ExecuteDevice::Host => "host",
            ExecuteDevice::Cuda => "cuda",
        }
    }
}

/// The serving engine's personality.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Vllm033,
}

impl Named for Engine {
    const WHAT: &'static str = "engine";
    fn all() -> &'static [Self] {
        &[Engine::Vllm033]
    }
    fn name(self) -> &'static str {
        match self {
            Engine::Vllm033 => "vllm-0.33",
        }
    }
}

/// The step cost model as `--cost` names it: `roofline` or `fixed:STEP_US`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostSpec {
    Roofline,
    Fixed { step_us: u64 },
}

impl CostSpec {
    pub fn parse(s: &str) -> Result<CostSpec, String> {
        if s == "roofline" {
            return Ok(CostSpec::Roofline);
        }
        match s.split_once(':') {
            Some(("fixed", us)) => match us.parse::<u64>() {
                Ok(step_us) if step_us > 0 => Ok(CostSpec::Fixed { step_us }),
                _ => Err(format!(
                    "cost model {s:?}: STEP_US must be a positive integer"
                )),
            },
            _ => Err(format!(
                "unknown cost model {s:?} (expected fixed:STEP_US or roofline)"
            )),
        }
    }

    pub fn name(self) -> String {
        match self {
            CostSpec::Roofline => "roofline".into(),
            CostSpec::Fixed { step_us } => format!("fixed:{step_us}"),
        }
    }

    /// The model for a run on `gpu` with `model`.
    pub fn model(self, gpu: &GpuProfile, model: &ModelProfile) -> CostModel {
        match self {
            CostSpec::Roofline => CostModel::Roofline(Roofline::new(gpu, model)),
            CostSpec::Fixed { step_us } => CostModel::Fixed { step_us },
        }
    }
}

impl Serialize for CostSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for CostSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        CostSpec::parse(&text).map_err(de::Error::custom)
    }
}

/// A fraction in (0, 1], held exactly as parts per million; written as a decimal number
/// (`0.9`). Floats never decide anything: the number is read back from its shortest decimal
/// text, which is what was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fraction {
    pub ppm: u64,
}

impl Fraction {
    /// A decimal in (0, 1], six digits after the point at most (more are cut off).
    pub fn parse(text: &str) -> Result<Fraction, String> {
        match parse_decimal(text.trim(), 6) {
            Some(ppm) if ppm > 0 && ppm <= 1_000_000 => Ok(Fraction { ppm }),
            _ => Err(format!("'{text}' is not a fraction in (0, 1]")),
        }
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = format!("{}.{:06}", self.ppm / 1_000_000, self.ppm % 1_000_000);
        f.write_str(text.trim_end_matches('0').trim_end_matches('.'))
    }
}

impl Serialize for Fraction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // At most 7 significant digits: the f64 prints back as exactly this decimal.
        s.serialize_f64(self.ppm as f64 / 1e6)
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FractionVisitor;
        impl Visitor<'_> for FractionVisitor {
            type Value = Fraction;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a fraction in (0, 1] such as 0.9")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Fraction, E> {
                Fraction::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Fraction, E> {
                Fraction::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Fraction, E> {
                Fraction::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Fraction, E> {
                Fraction::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(FractionVisitor)
    }
}

/// A GPU or model profile: a built-in's name (`"h100"`), or the whole profile inline
/// (`(name: "my-gpu", memory_bytes: …)`, the form of `sim/profiles/*.ron`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileSpec<T> {
    Builtin(String),
    Inline(T),
}

/// What [`ProfileSpec`] needs of a profile type.
pub trait Profile: Sized + Clone + Serialize + for<'de> Deserialize<'de> {
    /// For errors: "GPU".
    const WHAT: &'static str;
    fn builtin_named(name: &str) -> Result<Self, String>;
    /// Why an inline profile cannot be used, if it cannot.
    fn check(&self) -> Result<(), String>;
}

impl Profile for GpuProfile {
    const WHAT: &'static str = "GPU";
    fn builtin_named(name: &str) -> Result<Self, String> {
        GpuProfile::builtin_named(name)
    }
    fn check(&self) -> Result<(), String> {
        self.links().map(|_| ())
    }
}

impl Profile for ModelProfile {
    const WHAT: &'static str = "model";
    fn builtin_named(name: &str) -> Result<Self, String> {
        ModelProfile::builtin_named(name)
    }
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl<T: Profile> ProfileSpec<T> {
    /// The profile this names, checked.
    pub fn load(&self) -> Result<T, String> {
        match self {
            ProfileSpec::Builtin(name) => T::builtin_named(name),
            ProfileSpec::Inline(p) => p.check().map(|_| p.clone()),
        }
    }
}

impl<T: Profile> Serialize for ProfileSpec<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ProfileSpec::Builtin(name) => s.serialize_str(name),
            ProfileSpec::Inline(p) => p.serialize(s),
        }
    }
}

impl<'de, T: Profile> Deserialize<'de> for ProfileSpec<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ProfileVisitor<T>(PhantomData<T>);
        impl<'de, T: Profile> Visitor<'de> for ProfileVisitor<T> {
            type Value = ProfileSpec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a built-in {} name in quotes, or a profile (name: …, …)",
                    T::WHAT
                )
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
                T::builtin_named(name).map_err(E::custom)?;
                Ok(ProfileSpec::Builtin(name.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let profile = T::deserialize(de::value::MapAccessDeserializer::new(map))?;
                profile.check().map_err(de::Error::custom)?;
                Ok(ProfileSpec::Inline(profile))
            }
        }
        d.deserialize_any(ProfileVisitor(PhantomData))
    }
}

/// A spec that does not parse: where, which field, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub line: usize,
    pub column: usize,
    /// The field's path from the top (`Kv.execute.device`); empty when the text is not RON.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl RunSpec {
    /// Parses a spec's text; paths stay as written.
    pub fn from_ron(text: &str) -> Result<RunSpec, SpecError> {
        from_ron_as(text)
    }

    /// Reads a spec file (at most [`MAX_SPEC_BYTES`]); its relative paths resolve against the
    /// file's folder. Errors name the file, and the line and field where there is one.
    pub fn read_file(path: &Path) -> Result<RunSpec, String> {
        let text = read_bounded(path)?;
        let mut spec = RunSpec::from_ron(&text).map_err(|e| format!("{}:{e}", path.display()))?;
        let folder = path.parent().unwrap_or(Path::new(""));
        spec.rebase_paths(folder);
        Ok(spec)
    }

    /// The spec as RON, one field a line, after a comment saying how to run it.
    pub fn to_ron(&self) -> Result<String, String> {
        let pretty = ron::ser::PrettyConfig::new()
            .indentor("    ".into())
            .new_line("\n".into());
        let body = ron::ser::to_string_pretty(self, pretty)
            .map_err(|e| format!("cannot write the spec: {e}"))?;
        Ok(format!(
            "// gpumem run spec: `gpumem run FILE.ron [--json]`; relative paths resolve against this file's folder.\n{body}\n"
        ))
    }

    /// Joins every relative path of the spec to `folder`.
    pub fn rebase_paths(&mut self, folder: &Path) {
        self.for_each_path(|p| {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        });
    }

    /// Calls `f` on every path the spec holds: its trace and its output files.
    pub fn for_each_path(&mut self, f: impl FnMut(&mut PathBuf)) {
        let mut paths: Vec<&mut PathBuf> = Vec::new();
        match self {
            RunSpec::Alloc(a) => {
                if let AllocTraceSpec::File { path } = &mut a.trace {
                    paths.push(path);
                }
                paths.extend(a.plot.as_mut());
                paths.extend(a.export_trace.as_mut());
            }
            RunSpec::Kv(k) => {
                if let KvTraceSpec::File { path, .. } = &mut k.trace {
                    paths.push(path);
                }
                paths.extend(k.step_log.as_mut());
                paths.extend(k.plot.as_mut());
            }
            RunSpec::Models(m) => {
                if let ModelsTraceSpec::File { path, .. } = &mut m.trace {
                    paths.push(path);
                }
            }
            RunSpec::Colocate(c) => {
                paths.push(&mut c.train);
                paths.push(&mut c.serve);
            }
        }
        paths.into_iter().for_each(f);
    }
}

/// Parses RON text as a `T` (a run spec, a sweep spec): errors name the line, column and field.
pub(crate) fn from_ron_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    let mut de = ron::Deserializer::from_str(text).map_err(|e| SpecError {
        line: e.position.line,
        column: e.position.col,
        field: String::new(),
        message: describe(&e.code),
    })?;
    let spec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // `?` stands for a segment the path could not name (inside a value that ended early).
        let path = e.path().to_string();
        let field = path
            .trim_end_matches(".?")
            .trim_matches(['.', '?'])
            .to_string();
        let spanned = de.span_error(e.into_inner());
        SpecError {
            line: spanned.position.line,
            column: spanned.position.col,
            field,
            message: describe(&spanned.code),
        }
    })?;
    de.end().map_err(|e| {
        let spanned = de.span_error(e);
        SpecError {
            line: spanned.position.line,
            column: spanned.position.col,
            field: String::new(),
            message: "text after the end of the spec".into(),
        }
    })?;
    Ok(spec)
}

/// RON's error, in the words of a spec: what was found and what may stand there.
fn describe(code: &ron::Error) -> String {
    let list = |names: &[&str]| names.join(", ");
    match code {
        ron::Error::NoSuchStructField {
            expected, found, ..
        } => format!("unknown field `{found}`; the fields are {}", list(expected)),
        ron::Error::MissingStructField { field, .. } => format!(
            "field `{field}` is missing (a spec gives every field; `--print-spec` writes them all)"
        ),
        ron::Error::DuplicateStructField { field, .. } => format!("field `{field}` given twice"),
        ron::Error::NoSuchEnumVariant {
            expected, found, ..
        } => format!(
            "unknown variant `{found}`; expected one of {}",
            list(expected)
        ),
        other => other.to_string(),
    }
}

/// The file's text, refused when it is larger than [`MAX_SPEC_BYTES`] or not UTF-8.
pub(crate) fn read_bounded(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{}: cannot read the spec: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: cannot read the spec: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "{}: larger than a spec may be ({} KiB); is it a spec?",
            path.display(),
            MAX_SPEC_BYTES >> 10
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        format!("{}:{line}: the spec is not UTF-8 text", path.display())
    })
}

/// Most operations the occupancy generator makes (the trace is held in memory: about 2 GiB).
pub const MAX_GENERATED_OPS: u64 = 1 << 26;
/// Most engine steps the llm-serving generator makes (a few hundred operations a step).
pub const MAX_GENERATED_STEPS: u32 = 1 << 18;

/// Largest `execute.scale` (the gpu crate's `scaled::MAX_SCALE`; sim may not depend on gpu).
pub const MAX_EXECUTE_SCALE: u64 = 512;

impl AllocSpec {
    /// What the replay needs that serde cannot check alone.
    pub fn validate(&self) -> Result<(), String> {
        if self.strategy.is_empty() {
            return Err("strategy: name at least one strategy".into());
        }
        for (i, s) in self.strategy.iter().enumerate() {
            if self.strategy[..i].contains(s) {
                return Err(format!("strategy: '{}' is named twice", s.name()));
            }
        }
        if let AllocTraceSpec::Occupancy { occupancy_pct, ops } = self.trace {
            if !(1..=99).contains(&occupancy_pct) {
                return Err(format!(
                    "trace: occupancy_pct {occupancy_pct} is not in 1..=99"
                ));
            }
            if ops == 0 || ops > MAX_GENERATED_OPS {
                return Err(format!(
                    "trace: {ops} operations; the generator makes 1 to {MAX_GENERATED_OPS} (MAX_GENERATED_OPS: the trace is held in memory, 32 bytes an operation)"
                ));
            }
        }
        if let AllocTraceSpec::LlmServing { steps } = self.trace {
            if steps == 0 || steps > MAX_GENERATED_STEPS {
                return Err(format!(
                    "trace: {steps} engine steps; the generator makes 1 to {MAX_GENERATED_STEPS} (MAX_GENERATED_STEPS)"
                ));
            }
        }
        if let Some(e) = &self.execute {
            if !(1..=MAX_EXECUTE_SCALE).contains(&e.scale) || !e.scale.is_power_of_two() {
                return Err(format!(
                    "execute.scale {}: must be a power of two from 1 to {MAX_EXECUTE_SCALE}",
                    e.scale
                ));
            }
            if e.scale > 1 && e.device != ExecuteDevice::Host {
                return Err(format!(
                    "execute.scale {}: only host memory is executed scaled (a GPU maps whole pages of its own granularity)",
                    e.scale
                ));
            }
            if e.scale > self.alignment_bytes {
                return Err(format!(
                    "execute.scale {} is larger than the alignment ({} bytes): the smallest blocks would not be checked",
                    e.scale, self.alignment_bytes
                ));
            }
        }
        Ok(())
    }
}

/// Tokens per KV block, within gpumem's limits.
pub fn check_block_size(block_size: u64) -> Result<(), String> {
    if block_size == 0 || block_size > MAX_BLOCK_SIZE {
        return Err(format!(
            "block size {block_size} must be between 1 and {MAX_BLOCK_SIZE}"
        ));
    }
    Ok(())
}

/// What a checked [`KvSpec`] resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvResolved {
    pub gpu: GpuProfile,
    pub model: ModelProfile,
    /// How the pool was sized (None when `kv_blocks` was given).
    pub sizing: Option<KvSizing>,
}

impl KvSpec {
    /// Loads the profiles and checks the pool: sizes in range and, when the pool was sized,
    /// sized as the GPU and model say.
    pub fn resolve(&self) -> Result<KvResolved, String> {
        let gpu = self.gpu.load()?;
        let model = self.model.load()?;
        check_block_size(self.block_size)?;
        let sizing = match self.gpu_memory_utilization {
            Some(f) => Some(kv_sizing(&gpu, &model, f.ppm, self.block_size)?),
            None => None,
        };
        if let Some(s) = sizing.filter(|s| s.num_blocks != self.kv_blocks) {
            return Err(format!(
                "kv_blocks {} is not the {} blocks that gpu_memory_utilization {} sizes on {} with {}; set kv_blocks: {} or gpu_memory_utilization: None",
                self.kv_blocks,
                s.num_blocks,
                self.gpu_memory_utilization.expect("sized"),
                gpu.name,
                model.name,
                s.num_blocks
            ));
        }
        let carries_priorities = matches!(
            self.trace,
            KvTraceSpec::File {
                format: WorkloadFormat::Conformance,
                ..
            }
        );
        if self.scheduling_policy == SchedulingPolicy::Priority && !carries_priorities {
            return Err(
                "scheduling_policy priority: only the conformance format carries request priorities; every other trace would run as fcfs"
                    .into(),
            );
        }
        if self.kv_blocks < 2 {
            return Err(format!(
                "kv_blocks {}: the pool is smaller than one block (vLLM's num_gpu_blocks counts the null block 0, so at least 2 are needed)",
                self.kv_blocks
            ));
        }
        if self.kv_blocks > MAX_GPU_BLOCKS {
            return Err(format!(
                "kv_blocks {} exceeds gpumem's limit of {MAX_GPU_BLOCKS}",
                self.kv_blocks
            ));
        }
        if self.max_model_len == 0 {
            return Err("max_model_len must be at least 1".into());
        }
        self.cudagraph_sizes.check(self.max_num_batched_tokens)?;
        if let Some(o) = &self.cpu_offload {
            o.check(self, &model)?;
        }
        self.check_cluster()?;
        Ok(KvResolved { gpu, model, sizing })
    }

    /// A cluster names its replicas, router and lag together, and runs simulated only.
    fn check_cluster(&self) -> Result<(), String> {
        let Some(replicas) = self.replicas else {
            if self.router.is_some() || self.router_lag_us.is_some() {
                return Err(
                    "router and router_lag_us need replicas (--router and --router-lag-us need --replicas N)"
                        .into(),
                );
            }
            return Ok(());
        };
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(format!(
                "replicas {replicas}: a cluster has 1 to {MAX_REPLICAS} replicas (MAX_REPLICAS)"
            ));
        }
        if self.router.is_none() || self.router_lag_us.is_none() {
            return Err("replicas needs router and router_lag_us".into());
        }
        if self.router_lag_us > Some(crate::serve::vllm::MAX_CLOCK_US) {
            return Err(format!(
                "router_lag_us {}: beyond the simulated clock ({} us)",
                self.router_lag_us.unwrap_or(0),
                crate::serve::vllm::MAX_CLOCK_US
            ));
        }
        if self.execute.is_some() {
            return Err(
                "--execute carries out one engine's pool; with --replicas the run is simulated only"
                    .into(),
            );
        }
        if self.cpu_offload.is_some() {
            return Err(
                "a CPU tier (--cpu-offload-blocks, --kv-offloading-size) is one engine's; with --replicas the replicas have none yet"
                    .into(),
            );
        }
        if self.step_log.is_some() {
            return Err(
                "--step-log writes one engine's steps; with --replicas there is one engine per replica"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the report names the GPU and model: only when they decide something (the
    /// roofline cost or the pool's size).
    pub fn uses_profiles(&self) -> bool {
        self.cost == CostSpec::Roofline || self.gpu_memory_utilization.is_some()
    }
}

impl KvOffloadSpec {
    /// What vLLM refuses, what does nothing, and what gpumem cannot hold.
    fn check(&self, spec: &KvSpec, model: &ModelProfile) -> Result<(), String> {
        let block_size = spec.block_size;
        if self.offload_block_size == 0 || !self.offload_block_size.is_multiple_of(block_size) {
            return Err(format!(
                "offload_block_size {} is not a multiple of block_size {block_size}: vLLM's OffloadingConnector rejects this (kv_connector_extra_config 'block_size' must be a multiple of the GPU KV cache block size)",
                self.offload_block_size
            ));
        }
        if self.offload_block_size > MAX_MODEL_LEN {
            return Err(format!(
                "offload_block_size {} exceeds gpumem's limit of {}",
                self.offload_block_size, MAX_MODEL_LEN
            ));
        }
        if let Some(bytes) = self.kv_offloading_bytes {
            let per_block = model.kv_bytes_per_token().saturating_mul(block_size);
            let blocks_per_chunk = self.offload_block_size / block_size;
            let chunk_bytes = offload_chunk_bytes(per_block, blocks_per_chunk);
            let n = bytes / chunk_bytes;
            if n == 0 {
                return Err(format!(
                    "kv_offloading_bytes {bytes} holds no CPU block: one of {} tokens takes {chunk_bytes} bytes with {} ({} bytes per token, rounded up to 4 KiB pages), as vLLM sizes it",
                    self.offload_block_size,
                    model.name,
                    model.kv_bytes_per_token()
                ));
            }
            if n != self.cpu_offload_blocks {
                return Err(format!(
                    "cpu_offload_blocks {} is not the {n} CPU blocks that kv_offloading_bytes {bytes} sizes with {}; set cpu_offload_blocks: {n} or kv_offloading_bytes: None",
                    self.cpu_offload_blocks, model.name
                ));
            }
        }
        if self.cpu_offload_blocks == 0 {
            return Err("cpu_offload_blocks must be at least 1 (vLLM's CPU tier needs room for one CPU block)".into());
        }
        if self.cpu_offload_blocks > MAX_OFFLOAD_BLOCKS {
            return Err(format!(
                "cpu_offload_blocks {} exceeds gpumem's limit of {MAX_OFFLOAD_BLOCKS}",
                self.cpu_offload_blocks
            ));
        }
        if self.offload_latency_steps > 0 && spec.cost == CostSpec::Roofline {
            return Err(format!(
                "offload_latency_steps {} is the conformance clock's copy latency (cost fixed:STEP_US); with the roofline cost a copy takes the host link's time for its bytes",
                self.offload_latency_steps
            ));
        }
        if self.offload_prefetch > 0 {
            if spec.cost != CostSpec::Roofline {
                return Err("offload_prefetch is gpumem's, not vLLM's: it would change what the conformance clock (cost fixed:STEP_US) checks step for step against vLLM; use cost roofline".into());
            }
            if spec.step_log.is_some() {
                return Err("offload_prefetch cannot write a step log: the step log is vLLM's exact behaviour, and a prefetch changes it".into());
            }
            if spec.execute.is_some() {
                return Err("offload_prefetch is simulated only: --execute does not carry prefetch copies out yet".into());
            }
            if !spec.prefix_caching {
                return Err("offload_prefetch needs the prefix cache: a prefetched block is found by its hash at admission".into());
            }
            if spec.eviction != crate::serve::EvictionKind::Lru {
                return Err(format!(
                    "offload_prefetch needs vLLM's free queue (eviction lru), not {}: it loads only into free blocks that queue hands out before any cached one",
                    spec.eviction.name()
                ));
            }
            if self.offload_prefetch > MAX_OFFLOAD_PREFETCH {
                return Err(format!(
                    "offload_prefetch {} exceeds gpumem's limit of {MAX_OFFLOAD_PREFETCH}",
                    self.offload_prefetch
                ));
            }
        }
        if self.offload_latency_steps > MAX_OFFLOAD_LATENCY_STEPS {
            return Err(format!(
                "offload_latency_steps {} exceeds gpumem's limit of {MAX_OFFLOAD_LATENCY_STEPS}",
                self.offload_latency_steps
            ));
        }
        Ok(())
    }
}

/// Most waiting requests a prefetch looks ahead to.
pub const MAX_OFFLOAD_PREFETCH: u64 = 4096;

/// Longest copy latency the conformance clock takes, in engine steps.
pub const MAX_OFFLOAD_LATENCY_STEPS: u64 = 1 << 20;

/// Bytes of one CPU block of `blocks_per_chunk` GPU blocks of `kv_bytes_per_block`, as vLLM's
/// `CPUOffloadingSpec` lays it out (one worker): rounded up to the 4 KiB page.
pub fn offload_chunk_bytes(kv_bytes_per_block: u64, blocks_per_chunk: u64) -> u64 {
    kv_bytes_per_block
        .saturating_mul(blocks_per_chunk)
        .max(1)
        .div_ceil(4096)
        .saturating_mul(4096)
}

#[cfg(test)]
mod tests;
