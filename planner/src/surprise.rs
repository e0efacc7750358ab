//! Surprise: the predictor's error on what comes next, as a detector of impossible events.
//!
//! A window of one clip slides over the video. In each window the first half of the tubelet
//! time steps is the context and the second half the target: the predictor regresses the
//! target tokens' features from the context (its training task, with a mask that hides the
//! future), and the L1 error against the target encoder's layer-normed features, averaged over
//! the worst tenth of the target tokens, measures how unexpected the future is. The same is done
//! backwards (the past from the future): an object that vanishes leaves a future that is easy
//! to predict but a past that the future cannot explain. The larger of the two is the window's
//! **energy**. An object that vanishes, teleports or changes shape or colour makes the
//! future unlike anything the context predicts: the energy spikes. A video's surprise is its
//! peak energy; pairs of a possible video and its impossible twin (identical up to a frame) are
//! scored IntPhys-style: the impossible one should be the more surprising.

use amity_shared::data::ClipBatch;
use amity_shared::eval::embed::clip_starts;
use amity_shared::stats::median;
use amity_shared::train::Trainer;

/// Windows per forward pass.
const BATCH: usize = 32;

pub use amity_shared::train::Forecaster;

/// The energy of every window of a video.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// First frame of each window.
    pub starts: Vec<usize>,
    /// Its energy.
    pub energy: Vec<f32>,
    /// Source frames one window covers.
    pub span: usize,
}

impl Curve {
    /// The highest energy (the video's surprise); `-inf` for an empty curve.
    pub fn peak(&self) -> f32 {
        self.energy
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// The highest energy among the windows that see frame `from` or a later one (`-inf` if
    /// none does): where an event at `from` can show. Twins identical up to `from` share every
    /// earlier window, so when both peaks lie there they tie, and this is the part of the
    /// curves that tells them apart.
    pub fn peak_from(&self, from: usize) -> f32 {
        self.starts
            .iter()
            .zip(&self.energy)
            .filter(|&(&s, _)| s + self.span > from)
            .map(|(_, &e)| e)
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// Windows whose energy stands out: above the median by more than `k` times the median
    /// absolute deviation (a robust z-score; `k = 3.5` is the usual outlier threshold).
    pub fn spikes(&self, k: f32) -> Vec<usize> {
        if self.energy.len() < 3 {
            return Vec::new();
        }
        let med = median(&self.energy) as f32;
        let dev: Vec<f32> = self.energy.iter().map(|e| (e - med).abs()).collect();
        let mad = (median(&dev) as f32).max(1e-6);
        (0..self.energy.len())
            .filter(|&i| (self.energy[i] - med) / (1.4826 * mad) > k)
            .collect()
    }
}

/// Context and target token indices of a window: the first `context_steps` tubelet time steps
/// and the rest (tokens are ordered `(t, h, w)`).
pub fn split_tokens(
    time_steps: usize,
    per_step: usize,
    context_steps: usize,
) -> (Vec<u32>, Vec<u32>) {
    let cut = (context_steps * per_step) as u32;
    let all = (time_steps * per_step) as u32;
    ((0..cut).collect(), (cut..all).collect())
}

/// Share of a window's target tokens whose errors make its energy (the largest ones): an
/// impossible event is local (one object), and a mean over every token would dilute it.
pub const TOP_FRACTION: f32 = 0.1;

/// The energy curve of a video (`frames` RGB frames at the model's size, contiguous), one
/// window every `stride` frames, forecast by the checkpoint's predictor. A window's energy is
/// the mean of its largest [`TOP_FRACTION`] token errors.
pub fn curve(trainer: &Trainer, pixels: &[u8], frames: usize, stride: usize) -> Curve {
    curves(trainer, &[Forecaster::Predictor], pixels, frames, stride).remove(0)
}

/// [`curve`] for each of `forecasters` (e.g. the predictor beside the persistence baseline),
/// every window cut, uploaded and target-encoded once for all of them.
pub fn curves(
    trainer: &Trainer,
    forecasters: &[Forecaster],
    pixels: &[u8],
    frames: usize,
    stride: usize,
) -> Vec<Curve> {
    let cfg = trainer.config();
    let m = &cfg.model;
    let step = cfg.data.frame_step.max(1);
    let span = (m.frames - 1) * step + 1;
    let frame_bytes = m.image_size * m.image_size * 3;
    let starts = clip_starts(frames, m.frames, step, stride);
    let grid = m.grid();
    let per_step = grid.height * grid.width;
    let (context, target) = split_tokens(grid.frames, per_step, grid.frames / 2);
    let mut energy = vec![Vec::with_capacity(starts.len()); forecasters.len()];
    for chunk in starts.chunks(BATCH) {
        let clips: Vec<Vec<u8>> = chunk
            .iter()
            .map(|&s| {
                (0..m.frames)
                    .flat_map(|i| {
                        let f = s + i * step;
                        pixels[f * frame_bytes..(f + 1) * frame_bytes]
                            .iter()
                            .copied()
                    })
                    .collect()
            })
            .collect();
        let batch = ClipBatch::from_clips(clips.iter().map(Vec::as_slice), m);
        let splits = [(context.as_slice(), target.as_slice()), (&target, &context)];
        let errors = trainer.forecast_energies(&batch, &splits, forecasters);
        for (energy, errors) in energy.iter_mut().zip(&errors) {
            let forward = top_mean(&errors[0], target.len());
            let backward = top_mean(&errors[1], context.len());
            energy.extend(forward.iter().zip(&backward).map(|(f, b)| f.max(*b)));
        }
    }
    energy
        .into_iter()
        .map(|energy| Curve {
            starts: starts.clone(),
            energy,
            span,
        })
        .collect()
}

/// Per window, the mean of the largest [`TOP_FRACTION`] of its `per_window` token errors.
fn top_mean(errors: &[f32], per_window: usize) -> Vec<f32> {
    let k = ((per_window as f32 * TOP_FRACTION).ceil() as usize).clamp(1, per_window.max(1));
    errors
        .chunks_exact(per_window.max(1))
        .map(|tokens| {
            let mut t = tokens.to_vec();
            t.sort_by(|a, b| b.total_cmp(a));
            t[..k].iter().sum::<f32>() / k as f32
        })
        .collect()
}

/// IntPhys-style paired accuracy: the fraction of (possible, impossible) pairs whose impossible
/// video has the higher surprise (ties count half).
pub fn paired_accuracy(pairs: &[(f32, f32)]) -> f64 {
    if pairs.is_empty() {
        return f64::NAN;
    }
    let wins: f64 = pairs
        .iter()
        .map(|(p, i)| match i.partial_cmp(p) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .sum();
    wins / pairs.len() as f64
}

/// The share of pairs whose two videos are equally surprising. Twins are identical up to the
/// violation, so a tie means both peaks lie in the shared part: the violation did not stand out
/// from what came before it (such pairs count half in [`paired_accuracy`]).
pub fn tie_share(pairs: &[(f32, f32)]) -> f64 {
    if pairs.is_empty() {
        return f64::NAN;
    }
    pairs.iter().filter(|(p, i)| p == i).count() as f64 / pairs.len() as f64
}

/// Area under the ROC curve of telling impossible videos (positives) from possible ones by
/// their surprise, pooled over all videos (the Mann-Whitney U statistic, ties counted half).
pub fn auroc(possible: &[f32], impossible: &[f32]) -> f64 {
    if possible.is_empty() || impossible.is_empty() {
        return f64::NAN;
    }
    let mut u = 0.0;
    for i in impossible {
        for p in possible {
            u += match i.partial_cmp(p) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            };
        }
    }
    u / (possible.len() * impossible.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_and_spikes() {
        assert_eq!(paired_accuracy(&[(1.0, 2.0), (2.0, 1.0), (1.0, 1.0)]), 0.5);
        assert_eq!(
            tie_share(&[(1.0, 2.0), (2.0, 1.0), (1.0, 1.0), (3.0, 3.0)]),
            0.5
        );
        assert!(tie_share(&[]).is_nan());
        assert_eq!(auroc(&[0.1, 0.2], &[0.3, 0.4]), 1.0);
        assert_eq!(auroc(&[0.3, 0.4], &[0.1, 0.2]), 0.0);
        assert_eq!(auroc(&[0.1, 0.3], &[0.2, 0.4]), 0.75);
        let c = Curve {
            starts: (0..8).collect(),
            energy: vec![1.0, 1.1, 0.9, 1.0, 5.0, 1.05, 0.95, 1.0],
            span: 3,
        };
        assert_eq!(c.spikes(3.5), vec![4]);
        assert_eq!(c.peak(), 5.0);
        // Windows of 3 frames: those starting at 4..8 see frame 6 or later.
        assert_eq!(c.peak_from(6), 5.0);
        assert_eq!(c.peak_from(7), 1.05);
        assert_eq!(c.peak_from(20), f32::NEG_INFINITY);
        assert_eq!(split_tokens(4, 16, 2).0.len(), 32);
        assert_eq!(split_tokens(4, 16, 2).1, (32..64).collect::<Vec<u32>>());
    }
}
