//! Features of a video with a frozen encoder: what `amity embed` computes.
//!
//! The video is decoded at the model's frame rate and resolution (the same decoders and
//! transforms as corpus ingest), cut into consecutive clips of the model's length (every
//! `stride` resampled frames, by default one clip span so clips do not overlap), and each clip
//! goes through the **target encoder** (the EMA encoder V-JEPA evaluates). A clip's feature is
//! the mean of its token features; the token features themselves are optional.

use std::path::Path;

use crate::config::Config;
use crate::corpus::CorpusError;
use crate::corpus::frames::{DecodedVideo, decode_frame_folder};
use crate::corpus::video::{DecodeTarget, DecoderChoice, decode_video};
use crate::data::ClipBatch;
use crate::train::Trainer;

/// Clips encoded per forward pass.
const BATCH: usize = 16;

/// A video's features.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// First resampled frame of each clip.
    pub starts: Vec<usize>,
    /// Encoder width.
    pub width: usize,
    /// Tokens per clip.
    pub tokens: usize,
    /// `clips x width`: mean over each clip's tokens.
    pub pooled: Vec<f32>,
    /// `clips x tokens x width`, when asked for.
    pub token_features: Option<Vec<f32>>,
}

/// Decodes a video file or a folder of frames at `config`'s frame rate and resolution.
pub fn decode_for(path: &Path, config: &Config) -> Result<DecodedVideo, CorpusError> {
    let size = config.model.image_size;
    let max_frames = config.data.max_frames;
    if path.is_dir() {
        decode_frame_folder(path, size, max_frames)
    } else {
        let target = DecodeTarget {
            size,
            fps: config.data.fps,
            max_frames,
        };
        decode_video(path, target, DecoderChoice::Auto)
    }
}

/// First frames of every clip of `clip_frames` frames `frame_step` apart, one every `stride`
/// frames, that fits in `frames`.
pub fn clip_starts(
    frames: usize,
    clip_frames: usize,
    frame_step: usize,
    stride: usize,
) -> Vec<usize> {
    let span = (clip_frames - 1) * frame_step + 1;
    if frames < span {
        return Vec::new();
    }
    (0..=frames - span).step_by(stride.max(1)).collect()
}

/// The RGB bytes of the clip starting at `start`.
pub fn clip_at(
    video: &DecodedVideo,
    start: usize,
    clip_frames: usize,
    frame_step: usize,
) -> Vec<u8> {
    (0..clip_frames)
        .flat_map(|i| video.frame(start + i * frame_step).iter().copied())
        .collect()
}

/// Embeds every clip of `video` (see the module docs); `stride` defaults to one clip span.
pub fn embed_video(
    trainer: &Trainer,
    video: &DecodedVideo,
    stride: Option<usize>,
    tokens: bool,
) -> Result<Embeddings, CorpusError> {
    let cfg = trainer.config();
    let (f, step) = (cfg.model.frames, cfg.data.frame_step);
    let span = (f - 1) * step + 1;
    let starts = clip_starts(video.frames, f, step, stride.unwrap_or(span));
    if starts.is_empty() {
        return Err(CorpusError::Decode {
            path: video.source.clone(),
            reason: format!(
                "{} frames at {} fps; one clip needs {span} ({f} frames, step {step})",
                video.frames, cfg.data.fps
            ),
        });
    }
    let width = cfg.model.width;
    let n = cfg.model.tokens();
    let mut pooled = Vec::with_capacity(starts.len() * width);
    let mut token_features = tokens.then(|| Vec::with_capacity(starts.len() * n * width));
    for chunk in starts.chunks(BATCH) {
        let clips: Vec<Vec<u8>> = chunk.iter().map(|&s| clip_at(video, s, f, step)).collect();
        let batch = ClipBatch::from_clips(clips.iter().map(Vec::as_slice), &cfg.model);
        let z = trainer.token_features(&batch);
        for clip in z.chunks_exact(n * width) {
            for d in 0..width {
                let sum: f32 = (0..n).map(|t| clip[t * width + d]).sum();
                pooled.push(sum / n as f32);
            }
        }
        if let Some(all) = token_features.as_mut() {
            all.extend_from_slice(&z);
        }
    }
    Ok(Embeddings {
        starts,
        width,
        tokens: n,
        pooled,
        token_features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_starts_cover_the_video_without_overrunning() {
        assert_eq!(clip_starts(16, 8, 1, 8), vec![0, 8]);
        assert_eq!(clip_starts(17, 8, 1, 8), vec![0, 8]);
        assert_eq!(clip_starts(7, 8, 1, 8), Vec::<usize>::new());
        // 16 frames 4 apart span 61 frames.
        assert_eq!(clip_starts(70, 16, 4, 61), vec![0]);
        assert_eq!(clip_starts(12, 8, 1, 2), vec![0, 2, 4]);
    }
}
