//! Where training clips come from, as deterministic batches.
//!
//! A batch is a pure function of `(source, seed, step)`, so a run (or a federated round) can be
//! replayed exactly from its config.

use std::path::Path;

use crate::config::ModelConfig;
use crate::corpus::CorpusError;
use crate::corpus::clips::ClipSpec;
use crate::corpus::frames::{decode_frame_folder, find_frame_folders};
use crate::rng::Rng;
use crate::synth::{SynthConfig, generate};
use crate::train::ClipBatch;

/// A source of training clips.
#[derive(Debug, Clone)]
pub enum ClipSource {
    /// Fresh synthetic moving-shapes videos, one per clip, seeded by `(seed, step, index)`.
    Synthetic(SynthConfig),
    /// Decoded clips held in memory, drawn uniformly with replacement.
    Clips {
        /// `frames x size x size x 3` bytes each.
        clips: Vec<Vec<u8>>,
        /// Where they came from (for messages).
        origin: String,
    },
}

impl ClipSource {
    /// Synthetic videos sized for `model`.
    pub fn synthetic(model: &ModelConfig) -> Self {
        ClipSource::Synthetic(SynthConfig::for_size(model.image_size, model.frames))
    }

    /// Every clip of every frame folder under `root`, cut with `spec` at the model's size.
    /// Videos too short for one clip are skipped with a warning; unreadable frames are an error
    /// naming the file.
    pub fn frame_folders(
        root: &Path,
        model: &ModelConfig,
        spec: ClipSpec,
        seed: u64,
    ) -> Result<Self, CorpusError> {
        let folders = find_frame_folders(root)?;
        let mut clips = Vec::new();
        for (i, dir) in folders.iter().enumerate() {
            let video = decode_frame_folder(dir, model.image_size)?;
            let starts = spec.starts(video.frames, Rng::derive(seed, &[i as u64]).next_u64());
            if starts.is_empty() {
                tracing::warn!(
                    "{}: {} frames, a clip needs {}; skipped",
                    dir.display(),
                    video.frames,
                    spec.span()
                );
            }
            for s in starts {
                let mut clip = Vec::with_capacity(model.frames * model.image_size.pow(2) * 3);
                for f in spec.frame_indices(s) {
                    clip.extend_from_slice(video.frame(f));
                }
                clips.push(clip);
            }
        }
        if clips.is_empty() {
            return Err(CorpusError::Empty {
                path: root.to_owned(),
            });
        }
        Ok(ClipSource::Clips {
            clips,
            origin: root.display().to_string(),
        })
    }

    /// Number of distinct clips (`None`: unbounded).
    pub fn len(&self) -> Option<usize> {
        match self {
            ClipSource::Synthetic(_) => None,
            ClipSource::Clips { clips, .. } => Some(clips.len()),
        }
    }

    /// Whether the source holds no clip.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// The batch of `step`.
    pub fn batch(&self, seed: u64, step: u64, batch: usize, model: &ModelConfig) -> ClipBatch {
        match self {
            ClipSource::Synthetic(cfg) => {
                let videos: Vec<_> = (0..batch as u64)
                    .map(|i| generate(cfg, Rng::derive(seed, &[0x5e7, step, i]).next_u64()))
                    .collect();
                ClipBatch::from_clips(videos.iter().map(|v| v.pixels.as_slice()), model)
            }
            ClipSource::Clips { clips, .. } => {
                let mut rng = Rng::derive(seed, &[0xc1b, step]);
                let picks: Vec<usize> = (0..batch).map(|_| rng.below(clips.len())).collect();
                ClipBatch::from_clips(picks.iter().map(|&i| clips[i].as_slice()), model)
            }
        }
    }
}
