//! Several models served from fewer GPUs than models: `gpumem models`.
//!
//! Every model is a `vllm-0.33` engine with its own KV pool, homed on one GPU of a
//! [`DeviceSet`](gpumem_core::DeviceSet) by the
//! [`MultiGpuMemoryBalancer`](gpumem_core::balance::MultiGpuMemoryBalancer). A model runs only
//! while it is *resident* (its weights, its KV pool and its activation reserve on the GPU); a
//! request for a model that is not waits for it to be loaded, over the GPU profile's links.
//! Models on one GPU share its compute: their steps never overlap (the longest-waiting model
//! steps first), and their loads share its host link.
//!
//! Policies ([`Policy`]): `static` keeps every model resident (refused when they do not fit);
//! `lru` loads on demand and offloads the least recently used idle model to make room (the
//! [`ModelWeightCache`](gpumem_core::weights::ModelWeightCache): weights keep a pinned host
//! copy, so an offload copies nothing back); `offloader` adds the
//! [`AutomaticOffloader`](gpumem_core::offloader::AutomaticOffloader)'s thresholds and
//! forecast (offloads above one threshold, prefetches below the other); `sleep` is vLLM's sleep
//! mode per engine ([`CuMemPool`](gpumem_core::sleep::CuMemPool)): an offload is a sleep (level
//! 1 backs the weights up GPU → host, level 2 discards them and a wake reloads them from disk),
//! a load a wake at the same addresses. Offloading a model discards its KV cache: its prefix
//! cache starts empty again, as vLLM resets it on sleep.

pub mod driver;
pub mod report;
pub mod trace;
pub mod workload;

use gpumem_core::balance::Placement;
use gpumem_core::offloader::OffloaderConfig;
use gpumem_core::sleep::SleepLevel;

use crate::serve::profile::{GpuProfile, ModelProfile};

pub use driver::{
    models_books, simulate_models, simulate_models_on, simulate_models_trace,
    simulate_models_trace_on,
};
pub use report::{render_models_text, ModelsReport};
pub use trace::{ModelMap, TraceArrivals};
pub use workload::{ModelsWorkload, MAX_MODELS};

/// When models leave and enter the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Static,
    Lru,
    Offloader,
    Sleep,
}

impl Policy {
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s {
            "static" => Ok(Policy::Static),
            "lru" => Ok(Policy::Lru),
            "offloader" => Ok(Policy::Offloader),
            "sleep" => Ok(Policy::Sleep),
            other => Err(format!(
                "policy '{other}': expected static, lru, offloader or sleep"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::Lru => "lru",
            Policy::Offloader => "offloader",
            Policy::Sleep => "sleep",
        }
    }
}

/// One model to serve: its name as given (`NAME` or `NAME@TAG`) and its profile.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelChoice {
    pub name: String,
    pub profile: ModelProfile,
}

/// Everything a `gpumem models` run is.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelsSetup {
    pub models: Vec<ModelChoice>,
    pub gpu: GpuProfile,
    pub gpus: usize,
    pub placement: Placement,
    pub policy: Policy,
    /// vLLM's `gpu_memory_utilization`, ppm: the share of each GPU the models may use.
    pub utilization_ppm: u64,
    /// Each model's KV pool; `None`: `static` splits what the weights leave evenly, the others
    /// give every model [`DEFAULT_KV_BYTES`].
    pub kv_bytes_per_model: Option<u64>,
    pub block_size: u32,
    pub offloader: OffloaderConfig,
    pub sleep_level: SleepLevel,
}

/// The KV pool of each model under the dynamic policies when none is given: 4 GiB.
pub const DEFAULT_KV_BYTES: u64 = 4 << 30;

/// Pinned host memory each GPU's models may keep their weight copies and backups in.
pub const HOST_BYTES_PER_GPU: u64 = 4 << 40;
