//! Amity's worker.
//!
//! A worker joins a coordinator, fetches (or reads locally) the shards it is assigned, trains the
//! JEPA for a round with its inner optimiser on whichever backend this build has (see
//! [`amity_shared::device::Backend`]) and uploads its compressed pseudo-gradient.

pub use amity_shared::device::Backend;

pub mod run;

pub use run::{Fault, WorkerError, WorkerOptions, WorkerSummary, run};
