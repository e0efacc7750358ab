//! Amity's coordinator.
//!
//! It shards corpora into content-addressed shards, schedules DiLoCo-style training rounds over
//! the workers that join, aggregates their compressed pseudo-gradients robustly, applies the outer
//! optimiser and publishes checkpoints. Its core is a deterministic, sans-IO state machine so that
//! it can be tested without sockets and replicated with Raft.

pub mod aggregate;
pub mod config;
pub mod core;
pub mod journal;
pub mod layout;
pub mod release;
pub mod replica;
pub mod retention;
pub mod scoring;
pub mod server;
