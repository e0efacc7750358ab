//! Video corpora on the way into training.
//!
//! ```text
//! video files / frame folders --decode--> RGB frames at the preset's fps and size
//!   (video: FFmpeg or built-in H.264; frames: image)
//!   --clips--> F-frame clips, several per video, seeded
//!   --shard--> content-addressed shard files in a blob store + manifest.json   (ingest)
//!   --loader--> shuffled batches for the trainer, verified once, prefetched  (data)
//! ```
//!
//! [`synthetic`] writes a corpus of real MP4 files with ground-truth labels and matched
//! possible/impossible pairs, so every stage can be tested and measured without downloads.

pub mod clips;
pub mod frames;
pub mod h264;
pub mod ingest;
pub mod labels;
pub mod loader;
pub mod manifest;
pub mod shard;
pub mod synthetic;
pub mod video;

use std::path::PathBuf;

use crate::store::{BlobId, StoreError};

/// Errors reading a corpus; each names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A frame or video could not be decoded.
    #[error("{path}: cannot decode: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Nothing usable was found.
    #[error("{path}: no videos found (expected video files or sub-folders of .png/.jpg frames)")]
    Empty {
        /// The folder.
        path: PathBuf,
    },
    /// A video could not be written.
    #[error("{path}: cannot encode video: {reason}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A labels file is unusable.
    #[error("{path}: bad labels: {reason}")]
    Labels {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A shard failed validation.
    #[error("shard {id} ({path}): {source}")]
    Shard {
        /// The shard.
        id: BlobId,
        /// Its file.
        path: PathBuf,
        /// Why.
        source: shard::ShardError,
    },
    /// The shard store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The corpus manifest.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// A corpus that does not fit the model.
    #[error("{path}: {reason}")]
    Mismatch {
        /// The store.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl CorpusError {
    /// The reason alone, without the path (for reports that list the path beside it).
    pub fn reason(&self) -> String {
        match self {
            CorpusError::Io { source, .. } => source.to_string(),
            CorpusError::Decode { reason, .. } => reason.clone(),
            CorpusError::Labels { reason, .. } => format!("bad labels: {reason}"),
            other => other.to_string(),
        }
    }
}
