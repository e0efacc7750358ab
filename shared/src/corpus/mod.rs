//! Video corpora on the way into training: decoding sources to RGB frames at a preset's
//! resolution, and cutting them into clips.
//!
//! Sources built so far: folders of JPEG/PNG frames ([`frames`]). Clips are cut as V-JEPA does
//! ([`clips`]): `F` frames at a fixed frame step, several clips per video, deterministic from a
//! seed.

pub mod clips;
pub mod frames;

use std::path::PathBuf;

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
    /// A frame could not be decoded.
    #[error("{path}: cannot decode image: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A video is too short for even one clip.
    #[error("{path}: {frames} frames, a clip needs {needed}")]
    TooShort {
        /// The video.
        path: PathBuf,
        /// Frames it has.
        frames: usize,
        /// Frames one clip spans.
        needed: usize,
    },
    /// Nothing usable was found.
    #[error("{path}: no videos found (expected sub-folders of .png/.jpg frames)")]
    Empty {
        /// The folder.
        path: PathBuf,
    },
}
