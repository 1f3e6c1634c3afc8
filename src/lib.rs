//! gpumem as a library: the workspace's crates under one roof.
//!
//! - [`core`]: pure policies answering inputs with decisions;
//! - [`traces`]: trace formats, importers and seeded generators;
//! - [`sim`]: the deterministic driver, simulated executor and reports;
//! - [`gpu`]: the executor on real memory (host, CUDA).

pub use gpumem_core as core;
pub use gpumem_gpu as gpu;
pub use gpumem_sim as sim;
pub use gpumem_traces as traces;
