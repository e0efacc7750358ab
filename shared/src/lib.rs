//! The model and the maths every Amity role uses.
//!
//! The coordinator, the workers, the planner and the release tools all need the same V-JEPA
//! model, the same flat parameter layout and the same compression codecs; they live here so
//! that there is exactly one of each.
//!
//! Its folders are its layers, each using only those above it:
//!
//! 1. foundations: [`config`] (presets, token grids, mask sets), [`rng`], [`stats`] (medians,
//!    RankMe), [`store`] (the content store), [`device`] (compute backends), [`kernels`] (Amity's
//!    own CPU kernels inside burn), and `linalg`;
//! 2. [`model`]: the V-JEPA encoder and predictor, and [`model::flat`], the flat parameter view;
//!    [`checkpoint`], their file format;
//! 3. data: [`corpus`] (video files to shards) and [`data`] (clip batches and sources, the
//!    synthetic world);
//! 4. [`train`]: the trainer, its masks, losses, optimiser and EMA;
//! 5. [`eval`]: probes, RankMe and the standard evaluation; embedding a video;
//! 6. [`federated`]: what the coordinator and the workers share (the global state, one local
//!    round) and the update [`federated::codec`].
//!
//! Inside a folder, modules are private where their items are re-exported by the folder, so
//! that an item nothing uses is flagged.

pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod device;
pub mod eval;
pub mod federated;
pub mod kernels;
mod linalg;
pub mod model;
pub mod rng;
pub mod stats;
pub mod store;
pub mod train;

/// A name given for one of a fixed set of choices (a target policy, a video decoder, a planner,
/// an environment) that is none of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{got}` (expected {})", expected.join(", "))]
pub struct UnknownName {
    /// What was being named (`target policy`, `decoder`, ...).
    pub what: &'static str,
    /// The name given.
    pub got: String,
    /// The names there are.
    pub expected: &'static [&'static str],
}
