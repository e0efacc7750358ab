//! `amity bench ...`: each benchmark runs its baseline in the same invocation and reports
//! both, ending with one JSON line of figures.

pub mod ingest;
pub mod train_step;

pub use ingest::{IngestBenchOptions, IngestBenchReport, ingest_bench};
pub use train_step::{TrainStepOptions, TrainStepReport, find_torch_python, train_step};

/// Errors of the bench.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The preset is unknown.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The corpus machinery failed.
    #[error(transparent)]
    Corpus(#[from] crate::corpus::CorpusError),
    /// A scratch folder could not be used.
    #[error("{0}")]
    Io(String),
    /// The reference ran but its output could not be read.
    #[error("PyTorch reference {script}: {reason}")]
    Reference {
        /// The script.
        script: String,
        /// What went wrong.
        reason: String,
    },
}
