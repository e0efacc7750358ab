//! The whole-system tests, in one test binary (as ripgrep gathers its own): each module runs the
//! real `amity` binary as a user or an operator would, over real loopback sockets and real
//! processes. One binary links once, and `common` is compiled once for all of them.
//!
//! Run one module with `cargo test --test system hostile::`.

mod common;

mod cli;
mod corpus;
mod dashboard;
mod deploy;
mod federated;
mod hostile;
mod plan;
mod release;
mod replicated;
mod storage;
mod train;
