//! gpumem's policies: pure state machines. A policy receives inputs and answers with
//! [`decision::Decision`]s, carried out by an [`executor::Executor`] — the one contract between
//! policies, drivers and executors.
//!
//! Nothing here performs I/O, reads a clock, spawns a thread or draws a random number it was
//! not given.

pub mod alloc;
pub mod balance;
pub mod books;
pub mod buffers;
pub mod decision;
pub mod digest;
pub mod executor;
pub mod fixed_hash;
pub mod kv;
pub mod link;
pub mod offloader;
pub mod place;
pub mod sleep;
pub mod tiers;
pub mod weights;

pub use books::{Account, Books};
pub use decision::{AllocId, Decision, Loc, Refusal, SegmentId};
pub use executor::{Executor, Ledger};
pub use place::{DeviceId, DeviceSet, Owner, Place, Tier};
