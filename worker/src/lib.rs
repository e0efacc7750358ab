//! Amity's worker.
//!
//! A worker joins a coordinator, fetches (or reads locally) the shards it is assigned, trains the
//! JEPA for a round with its inner optimiser on whichever backend this build has (see
//! [`amity_shared::device::Backend`]) and uploads its compressed pseudo-gradient.
//!
//! Like the coordinator, it is a sans-IO state machine ([`core::WorkerCore`]: what to do next)
//! under a thin async shell ([`run()`]: sockets, the cache, the training thread).

pub use amity_shared::device::Backend;

pub mod config;
pub mod core;
pub mod metrics;
pub mod run;

pub use core::{Fault, WorkerCore, WorkerError, WorkerSummary, human};
pub use run::{CoordinatorAddr, Progress, WorkerOptions, run};
