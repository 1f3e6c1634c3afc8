//! gpumem's policies: pure state machines. A policy receives inputs and answers with
//! [`decision::Decision`]s carried out by an executor through [`memory::Memory`].
//!
//! Nothing here performs I/O, reads a clock, spawns a thread or draws a random number it was
//! not given.

pub mod alloc;
pub mod decision;
pub mod defrag;
pub mod digest;
pub mod kv;
pub mod memory;

pub use decision::{AllocId, Decision, Loc, Refusal, SegmentId};
pub use memory::{Books, Memory};
