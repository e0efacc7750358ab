//! The model and the maths every Amity role uses.
//!
//! The coordinator, the workers, the planner and the release tools all need the same V-JEPA
//! model, the same flat parameter layout and the same compression codecs; they live here so
//! that there is exactly one of each.
//!
//! Reading order: [`config`] (presets), [`model`] (encoder, predictor), [`mask`] (multi-block
//! tube masks), [`flat`] (the flat parameter view), then training pieces.

pub mod bench;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod corpus;
pub mod data;
pub mod device;
pub mod ema;
pub mod embed;
pub mod eval;
pub mod federated;
pub mod flat;
pub mod linalg;
pub mod loss;
pub mod mask;
pub mod model;
pub mod npy;
pub mod optim;
pub mod probe;
pub mod release;
pub mod rng;
pub mod stats;
pub mod store;
pub mod synth;
pub mod train;
