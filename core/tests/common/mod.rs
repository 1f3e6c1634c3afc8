//! Helpers shared by the integration tests (each test file is its own crate: `mod common;`).

pub mod kv_model;
