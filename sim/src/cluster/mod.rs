//! Replicas behind a router: several `vllm-0.33` engines, each with its own KV pool on its own
//! GPU (a [`DeviceSet`](gpumem_core::place::DeviceSet)), fed by one router that sees every
//! request on arrival, on one simulated clock.
//!
//! - [`router`]: the routing policies (`round-robin`, `least-loaded`, `kv-aware:W`) and the
//!   router's view: outstanding tokens per replica and a KV-event cache index per replica,
//!   optionally late; [`prompt_hashes`]: a prompt's block hashes as the engine makes them;
//! - [`driver`]: the clock over the replicas, in a fixed order (deterministic, and with one
//!   replica the single-engine run step for step);
//! - [`simulate`](mod@simulate): `gpumem kv --replicas N`'s run; [`report`]: the fleet's,
//!   each replica's and the router's figures, as JSON and text.
//!
//! The engines are driven through their public interface only (`add_request`, `step`, their
//! KV events), as the single-engine driver drives one.

pub mod driver;
pub mod prompt_hashes;
pub mod report;
pub mod router;
pub mod simulate;

pub use driver::{Cluster, Replica};
pub use report::{render_cluster_text, ClusterReport, ReplicaReport, RouterReport};
pub use router::{Router, RouterPolicy, RouterStats};
pub use simulate::{simulate_cluster, ClusterSetup};

/// Most replicas in one cluster: each holds a whole engine (its pool and its requests).
pub const MAX_REPLICAS: u64 = 4096;
