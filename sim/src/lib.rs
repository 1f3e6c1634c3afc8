//! gpumem's deterministic driver: replays traces through policies against an executor, keeps
//! modelled time, and renders reports.
//!
//! Runs are single-threaded and deterministic; only whole runs go in parallel.

pub mod alloc_replay;
pub mod cluster;
pub mod colocate;
pub mod executor;
mod id_map;
pub mod models;
pub mod monitor;
pub mod plan;
pub mod plot;
pub mod recorded;
pub mod report;
pub mod serve;
pub mod sleep_watch;
pub mod spec;
pub mod sweep;
pub mod tiers;

pub use alloc_replay::{
    replay, simulate_all, AllocReport, DefragMode, ReplayConfig, ReplayError, StrategyResult,
};
pub use executor::{AllocCostModel, SimExecutor};
pub use gpumem_core::executor::Executor;
