//! Clip sampling: which frames of a video make each clip.

use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, ModelConfig};
use crate::rng::Rng;

/// How clips are cut from videos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipSpec {
    /// Frames per clip.
    pub frames: usize,
    /// Distance between consecutive clip frames in the source (V-JEPA: 4).
    pub frame_step: usize,
    /// Clips drawn per video (fewer if the video is short).
    pub clips_per_video: usize,
}

impl ClipSpec {
    /// The clip sampling of a run: the model's clip length, the data config's frame step and
    /// clips per video.
    pub fn for_config(data: &DataConfig, model: &ModelConfig) -> Self {
        ClipSpec {
            frames: model.frames,
            frame_step: data.frame_step,
            clips_per_video: data.clips_per_video,
        }
    }

    /// Source frames one clip spans.
    pub fn span(&self) -> usize {
        (self.frames - 1) * self.frame_step + 1
    }

    /// Start frames of the clips of a video of `len` frames, deterministic from `seed`.
    ///
    /// Starts are drawn uniformly from the valid range, sorted, and distinct where the video is
    /// long enough; a video shorter than one span gives no clip.
    pub fn starts(&self, len: usize, seed: u64) -> Vec<usize> {
        let span = self.span();
        if len < span || self.clips_per_video == 0 {
            return Vec::new();
        }
        let range = len - span + 1;
        if range <= self.clips_per_video {
            return (0..range).collect();
        }
        let mut rng = Rng::derive(seed, &[0xc11b]);
        let mut all: Vec<usize> = (0..range).collect();
        rng.shuffle(&mut all);
        let mut starts = all[..self.clips_per_video].to_vec();
        starts.sort_unstable();
        starts
    }

    /// The source frame indices of the clip starting at `start`.
    pub fn frame_indices(&self, start: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.frames).map(move |i| start + i * self.frame_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_deterministic_in_range_and_distinct() {
        let spec = ClipSpec {
            frames: 8,
            frame_step: 4,
            clips_per_video: 3,
        };
        assert_eq!(spec.span(), 29);
        let a = spec.starts(100, 5);
        assert_eq!(a, spec.starts(100, 5));
        assert_ne!(a, spec.starts(100, 6));
        assert_eq!(a.len(), 3);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&s| s + spec.span() <= 100));
        assert!(spec.starts(28, 0).is_empty());
        assert_eq!(spec.starts(30, 0), vec![0, 1]);
        let idx: Vec<usize> = spec.frame_indices(2).collect();
        assert_eq!(idx, vec![2, 6, 10, 14, 18, 22, 26, 30]);
    }
}
