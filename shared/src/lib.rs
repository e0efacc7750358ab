//! The model and the maths every Amity role uses.
//!
//! The coordinator, the workers, the planner and the release tools all need the same V-JEPA
//! model, the same flat parameter layout and the same compression codecs; they live here so
//! that there is exactly one of each.

pub mod device;
