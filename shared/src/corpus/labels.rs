//! Ground-truth labels beside videos, and the index of possible/impossible pairs.
//!
//! A video `clip.mp4` may have `clip.labels.json` beside it; a frame folder may hold
//! `labels.json`. Ingest carries the labels of each clip's frames into the shard header, so
//! frozen-encoder probes can read them next to the pixels.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CorpusError;
use crate::data::synth::{VideoLabels, ViolationKind};

/// The name of a synthetic corpus's pair index.
pub const PAIRS_FILE: &str = "pairs.json";

/// What a labels file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsFile {
    /// Frame rate the labels' frames are at (the video's own rate).
    pub fps: f64,
    /// Per-video and per-frame ground truth.
    pub labels: VideoLabels,
}

/// A matched pair: identical up to `frame`, then the impossible one breaks a law.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// The possible video, relative to the corpus root.
    pub possible: String,
    /// Its impossible twin.
    pub impossible: String,
    /// The law broken.
    pub kind: ViolationKind,
    /// First frame (at the videos' own rate) where the twins differ.
    pub frame: usize,
}

/// Where the labels of a video file or frame folder live.
pub fn labels_path(source: &Path) -> PathBuf {
    if source.is_dir() {
        return source.join("labels.json");
    }
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    source.with_file_name(format!("{stem}.labels.json"))
}

/// Reads the labels of `source` if it has a labels file.
pub fn read_labels(source: &Path) -> Result<Option<LabelsFile>, CorpusError> {
    let path = labels_path(source);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| CorpusError::Io {
        path: path.clone(),
        source: e,
    })?;
    let file: LabelsFile = serde_json::from_slice(&bytes).map_err(|e| CorpusError::Labels {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let l = &file.labels;
    if !(file.fps.is_finite() && file.fps > 0.0)
        || l.frames.iter().any(|f| f.len() != l.objects.len())
    {
        return Err(CorpusError::Labels {
            path,
            reason: "fps must be positive and every frame must list every object".into(),
        });
    }
    Ok(Some(file))
}

/// Writes a labels file.
pub fn write_labels(source: &Path, labels: &LabelsFile) -> Result<(), CorpusError> {
    let path = labels_path(source);
    let json = serde_json::to_vec(labels).expect("labels always serialise");
    std::fs::write(&path, json).map_err(|e| CorpusError::Io { path, source: e })
}

impl LabelsFile {
    /// The labels of a clip: `frame_times` are the clip frames' times in seconds; each takes the
    /// label frame shown at that time. `None` when the labels do not cover the clip.
    pub fn clip(&self, frame_times: impl Iterator<Item = f64>) -> Option<VideoLabels> {
        let mut frames = Vec::new();
        for t in frame_times {
            let f = (t * self.fps + 1e-6).floor() as usize;
            frames.push(self.labels.frames.get(f)?.clone());
        }
        Some(VideoLabels {
            frames,
            ..self.labels.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::{SynthConfig, generate};

    #[test]
    fn clip_labels_pick_frames_by_time() {
        let v = generate(&SynthConfig::for_size(16, 10), 1);
        let file = LabelsFile {
            fps: 10.0,
            labels: v.labels.clone(),
        };
        // Resampled to 5 fps: clip frames at 0.2 s steps pick every other source frame.
        let clip = file.clip((0..3).map(|i| 0.4 + i as f64 * 0.2)).unwrap();
        assert_eq!(clip.frames.len(), 3);
        assert_eq!(clip.frames[1], v.labels.frames[6]);
        assert!(file.clip([2.0].into_iter()).is_none());
        assert_eq!(
            labels_path(Path::new("/c/v_001.mp4")),
            Path::new("/c/v_001.labels.json")
        );
    }
}
