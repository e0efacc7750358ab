//! Amity's bundled planner and surprise detector: what downstream users do with a released
//! encoder.
//!
//! - [`env`]: PointMaze and PushBlock, rapier2d physics rendered with tiny-skia.
//! - [`world`]: the frozen encoder, the action-conditioned predictor, its data and training.
//! - [`plan`]: CEM/MPPI model-predictive control in latent space with guardrails, an oracle on
//!   the true simulator and a random baseline.
//! - [`surprise`]: sliding-window prediction error that flags physically impossible events.

pub mod bench;
pub mod env;
pub mod plan;
pub mod surprise;
pub mod surprise_bench;
pub mod world;

/// Errors of the planner; each names the file or what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A name that is none of the environments or planners.
    #[error(transparent)]
    UnknownName(#[from] amity_shared::UnknownName),
    /// Bad input (a file, an argument).
    #[error("{0}")]
    Invalid(String),
}

impl PlannerError {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| PlannerError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Wraps another library's error.
    pub fn other(e: impl std::fmt::Display) -> Self {
        PlannerError::Invalid(e.to_string())
    }
}
