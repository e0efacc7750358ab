//! The corpus manifest: every shard of a corpus, and how the corpus was cut.
//!
//! A shard store is a folder holding `manifest.json` and `blobs/` (a [`LocalStore`]). The
//! manifest has no timestamps and no absolute paths, so ingesting the same input with the same
//! settings gives the same manifest, byte for byte, and the same [`Manifest::id`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, ModelConfig};
use crate::store::{BlobId, LocalStore, StoreError};

/// The manifest's file name inside a shard store.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The blob folder inside a shard store.
pub const BLOBS_DIR: &str = "blobs";

/// One shard of the corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// BLAKE3 of the shard file.
    pub id: BlobId,
    /// File size in bytes.
    pub bytes: u64,
    /// Clips in the shard.
    pub clips: u64,
}

/// A source that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Path relative to the corpus root.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// The clip shape every shard of a corpus shares.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClipShape {
    /// Frames per clip.
    pub frames: usize,
    /// Clip side in pixels.
    pub size: usize,
}

impl ClipShape {
    /// The shape a model consumes.
    pub fn of(model: &ModelConfig) -> Self {
        ClipShape {
            frames: model.frames,
            size: model.image_size,
        }
    }
}

/// The list of shards of a corpus and how it was cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest layout version.
    pub format: u32,
    /// The preset the clips were cut for.
    pub preset: String,
    /// Clip shape.
    pub clip: ClipShape,
    /// Sampling used.
    pub data: DataConfig,
    /// Seed of the clip sampling.
    pub seed: u64,
    /// Videos that gave at least one clip.
    pub videos: u64,
    /// Clips in all shards.
    pub clips: u64,
    /// Whether clips carry ground-truth labels.
    pub labelled: bool,
    /// The shards, in ingest order.
    pub shards: Vec<ShardEntry>,
    /// Sources that were skipped, with reasons.
    pub skipped: Vec<Skipped>,
}

/// Errors reading a shard store; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid manifest.
    #[error("{path}: not a valid corpus manifest: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The store under the manifest.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Manifest {
    /// The manifest's canonical bytes (pretty JSON, trailing newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = serde_json::to_string_pretty(self).expect("a manifest always serialises");
        s.push('\n');
        s.into_bytes()
    }

    /// BLAKE3 of the canonical bytes: names this exact corpus.
    pub fn id(&self) -> BlobId {
        BlobId::of(&self.to_bytes())
    }

    /// Total shard bytes.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// Reads `<store>/manifest.json`, naming the file in every error.
    pub fn load(store_dir: &Path) -> Result<Self, ManifestError> {
        let path = store_dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|source| ManifestError::Io {
            path: path.clone(),
            source,
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.clone(),
            reason,
        };
        if m.format != 1 {
            return Err(invalid(format!("format {} (this build reads 1)", m.format)));
        }
        let sum: u64 = m.shards.iter().map(|s| s.clips).sum();
        if sum != m.clips {
            return Err(invalid(format!(
                "shards hold {sum} clips, the total says {}",
                m.clips
            )));
        }
        Ok(m)
    }

    /// Writes `<store>/manifest.json` atomically (temp file, fsync, rename).
    pub fn save(&self, store_dir: &Path) -> Result<(), ManifestError> {
        let path = store_dir.join(MANIFEST_FILE);
        let temp = store_dir.join(format!(".{MANIFEST_FILE}.{}.tmp", std::process::id()));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| ManifestError::Io { path: p, source }
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&temp).map_err(io(&temp))?;
            f.write_all(&self.to_bytes()).map_err(io(&temp))?;
            f.sync_all().map_err(io(&temp))?;
        }
        std::fs::rename(&temp, &path).map_err(io(&path))?;
        Ok(())
    }

    /// Checks that the manifest can feed `model` (same clip shape).
    pub fn check_model(&self, model: &ModelConfig) -> Result<(), ClipShapeMismatch> {
        let want = ClipShape::of(model);
        if self.clip != want {
            return Err(ClipShapeMismatch {
                corpus: self.clip,
                preset: self.preset.clone(),
                model: want,
            });
        }
        Ok(())
    }
}

/// A corpus cut for clips of another shape than the model takes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the corpus was cut for {} x {}px clips (preset {preset}), the model needs {} x {}px",
    corpus.frames, corpus.size, model.frames, model.size
)]
pub struct ClipShapeMismatch {
    /// The corpus's clip shape.
    pub corpus: ClipShape,
    /// The preset the corpus was cut for.
    pub preset: String,
    /// The shape the model takes.
    pub model: ClipShape,
}

/// Opens the blob store of a shard store folder.
pub fn open_blobs(store_dir: &Path) -> Result<LocalStore, StoreError> {
    LocalStore::open(&store_dir.join(BLOBS_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: 1,
            preset: "tiny".into(),
            clip: ClipShape {
                frames: 8,
                size: 32,
            },
            data: DataConfig::default(),
            seed: 3,
            videos: 2,
            clips: 5,
            labelled: true,
            shards: vec![
                ShardEntry {
                    id: BlobId::of(b"a"),
                    bytes: 10,
                    clips: 3,
                },
                ShardEntry {
                    id: BlobId::of(b"b"),
                    bytes: 7,
                    clips: 2,
                },
            ],
            skipped: vec![Skipped {
                path: "broken.mp4".into(),
                reason: "moov atom not found".into(),
            }],
        }
    }

    #[test]
    fn save_load_round_trip_and_stable_id() {
        let dir = std::env::temp_dir().join(format!("amity-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = manifest();
        m.save(&dir).unwrap();
        let back = Manifest::load(&dir).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.id(), m.id());
        assert_eq!(
            back.to_bytes(),
            std::fs::read(dir.join(MANIFEST_FILE)).unwrap()
        );

        let mut bad = m.clone();
        bad.clips = 6;
        bad.save(&dir).unwrap();
        let err = Manifest::load(&dir).unwrap_err().to_string();
        assert!(err.contains("manifest.json") && err.contains("6"), "{err}");
        std::fs::write(dir.join(MANIFEST_FILE), "{").unwrap();
        assert!(Manifest::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
