//! Surprise: the predictor's error on what comes next, as a detector of impossible events.
//!
//! A window of one clip slides over the video. In each window the first tubelet time steps are
//! the context and the rest the target: the predictor regresses the target tokens' features
//! from the context (its training task, with a mask that hides the future), and the L1 error
//! against the target encoder's layer-normed features measures how unexpected the future is.
//! A [`Scoring`] says how the token errors become the window's **energy** (all tokens' mean as
//! Garrido et al. 2025, or the worst tenth; forward only, or also backwards, the past from the
//! future; one context length or several) and how the windows become the video's surprise
//! (peak or mean). An object that vanishes, teleports or changes shape or colour makes the
//! future unlike anything the context predicts: the energy spikes. Pairs of a possible video
//! and its impossible twin are scored IntPhys-style (the impossible one should be the more
//! surprising), and counterbalanced quadruplets by IntPhys's relative score
//! ([`quadruplet_correct`]).

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

/// Share of a window's target tokens whose errors make the [`TokenStat::Top`] statistic (the
/// largest ones): an impossible event is local (one object), and a mean over every token
/// dilutes it.
pub const TOP_FRACTION: f32 = 0.1;

/// How a window's target-token errors become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenStat {
    /// The mean over all target tokens (Garrido et al. 2025).
    Mean,
    /// The mean of the largest [`TOP_FRACTION`].
    Top,
}

/// Which way a window is forecast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The future from the past (Garrido et al.).
    Forward,
    /// The larger of forward and backward (the past from the future): an object that vanishes
    /// leaves a future that is easy to predict but a past the future cannot explain.
    Both,
}

/// Which context lengths a window is scored at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Contexts {
    /// The first half of the window's time steps.
    Half,
    /// Every length from one time step to all but one, averaged (Garrido et al. score several
    /// context lengths).
    Every,
}

impl Contexts {
    /// The context lengths (in tubelet time steps) of a window of `time_steps`.
    pub fn steps(self, time_steps: usize) -> Vec<usize> {
        match self {
            Contexts::Half => vec![(time_steps / 2).max(1)],
            Contexts::Every => (1..time_steps.max(2)).collect(),
        }
    }
}

/// How a video's window energies become its surprise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowStat {
    /// The peak.
    Max,
    /// The mean.
    Mean,
}

/// A way to score surprise: per window, the token statistic of the forecast's errors in the
/// chosen directions (the larger of them), averaged over the chosen context lengths; per video,
/// the peak or the mean over windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scoring {
    /// Per window: over target tokens.
    pub tokens: TokenStat,
    /// Per window: forward, or the larger of both.
    pub direction: Direction,
    /// Per window: context lengths.
    pub contexts: Contexts,
    /// Per video: over windows.
    pub windows: WindowStat,
}

impl Scoring {
    /// The first detector's scoring (top tenth, both directions, half the window as context,
    /// peak over windows): the paired figure the bench keeps.
    pub const PAIRED: Scoring = Scoring {
        tokens: TokenStat::Top,
        direction: Direction::Both,
        contexts: Contexts::Half,
        windows: WindowStat::Max,
    };

    /// What `amity surprise` and the demo use: the scoring `amity bench surprise` chose on its
    /// 40 validation quadruplets for the bench's pretrained tiny model (relative accuracy 0.875
    /// there, 0.825 on the 100 test quadruplets; all-token mean forward only: 0.838 / 0.840;
    /// the first detector's scoring: 0.863 / 0.835). The bench itself chooses afresh for the
    /// model it scores.
    pub const DEFAULT: Scoring = Scoring {
        tokens: TokenStat::Mean,
        direction: Direction::Both,
        contexts: Contexts::Every,
        windows: WindowStat::Max,
    };

    /// Every scoring, in a fixed order (ties go to the first).
    pub fn all() -> Vec<Scoring> {
        let mut out = Vec::with_capacity(16);
        for tokens in [TokenStat::Mean, TokenStat::Top] {
            for direction in [Direction::Forward, Direction::Both] {
                for contexts in [Contexts::Every, Contexts::Half] {
                    for windows in [WindowStat::Max, WindowStat::Mean] {
                        out.push(Scoring {
                            tokens,
                            direction,
                            contexts,
                            windows,
                        });
                    }
                }
            }
        }
        out
    }

    /// The context lengths (in tubelet time steps) of a window of `time_steps`.
    pub fn context_steps(&self, time_steps: usize) -> Vec<usize> {
        self.contexts.steps(time_steps)
    }

    /// The energy curve of one video under this scoring (`stats` must hold its contexts).
    pub fn curve(&self, stats: &WindowStats) -> Curve {
        let steps = self.context_steps(stats.time_steps);
        let cols: Vec<usize> = steps
            .iter()
            .map(|c| {
                stats
                    .context_steps
                    .iter()
                    .position(|s| s == c)
                    .expect("window stats computed for this scoring's contexts")
            })
            .collect();
        let t = self.tokens as usize;
        let energy = stats
            .windows
            .iter()
            .map(|w| {
                let per: f32 = cols
                    .iter()
                    .map(|&c| match self.direction {
                        Direction::Forward => w[c][0][t],
                        Direction::Both => w[c][0][t].max(w[c][1][t]),
                    })
                    .sum();
                per / cols.len() as f32
            })
            .collect();
        Curve {
            starts: stats.starts.clone(),
            energy,
            span: stats.span,
        }
    }

    /// A video's surprise from its curve; `-inf` for an empty curve.
    pub fn surprise(&self, curve: &Curve) -> f32 {
        match self.windows {
            WindowStat::Max => curve.peak(),
            WindowStat::Mean if curve.energy.is_empty() => f32::NEG_INFINITY,
            WindowStat::Mean => curve.energy.iter().sum::<f32>() / curve.energy.len() as f32,
        }
    }
}

impl std::fmt::Display for Scoring {
    /// E.g. `mean tokens, forward, contexts 1..T-1, max over windows`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens, {}, {}, {} over windows",
            match self.tokens {
                TokenStat::Mean => "mean of all",
                TokenStat::Top => "top 10% of",
            },
            match self.direction {
                Direction::Forward => "forward",
                Direction::Both => "max(forward, backward)",
            },
            match self.contexts {
                Contexts::Half => "context half the window",
                Contexts::Every => "every context length averaged",
            },
            match self.windows {
                WindowStat::Max => "max",
                WindowStat::Mean => "mean",
            }
        )
    }
}

/// Per window of a video, per context length, per direction: the `[mean, top]` statistics of
/// the forecast's token errors. Every [`Scoring`] is a function of these.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    /// First frame of each window.
    pub starts: Vec<usize>,
    /// Source frames one window covers.
    pub span: usize,
    /// Tubelet time steps per window.
    pub time_steps: usize,
    /// The context lengths computed (columns of `windows`).
    pub context_steps: Vec<usize>,
    /// `windows[w][c][d][s]`: window `w`, context `context_steps[c]`, direction `d` (0 forward,
    /// 1 backward), statistic `s` ([`TokenStat`] as index).
    pub windows: Vec<Vec<[[f32; 2]; 2]>>,
}

/// The energy curve of a video (`frames` RGB frames at the model's size, contiguous), one
/// window every `stride` frames, forecast by the checkpoint's predictor and scored by `scoring`.
pub fn curve(
    trainer: &Trainer,
    scoring: &Scoring,
    pixels: &[u8],
    frames: usize,
    stride: usize,
) -> Curve {
    curves(
        trainer,
        scoring,
        &[Forecaster::Predictor],
        pixels,
        frames,
        stride,
    )
    .remove(0)
}

/// [`curve`] for each of `forecasters` (e.g. the predictor beside the persistence baseline).
pub fn curves(
    trainer: &Trainer,
    scoring: &Scoring,
    forecasters: &[Forecaster],
    pixels: &[u8],
    frames: usize,
    stride: usize,
) -> Vec<Curve> {
    let steps = scoring.context_steps(trainer.config().model.grid().frames);
    window_stats(trainer, forecasters, pixels, frames, stride, &steps)
        .iter()
        .map(|s| scoring.curve(s))
        .collect()
}

/// The [`WindowStats`] of a video for each of `forecasters` at each of `context_steps`, every
/// window cut, uploaded and target-encoded once for all of them.
pub fn window_stats(
    trainer: &Trainer,
    forecasters: &[Forecaster],
    pixels: &[u8],
    frames: usize,
    stride: usize,
    context_steps: &[usize],
) -> Vec<WindowStats> {
    let cfg = trainer.config();
    let m = &cfg.model;
    let step = cfg.data.frame_step.max(1);
    let span = (m.frames - 1) * step + 1;
    let frame_bytes = m.image_size * m.image_size * 3;
    let starts = clip_starts(frames, m.frames, step, stride);
    let grid = m.grid();
    let per_step = grid.height * grid.width;
    let parts: Vec<(Vec<u32>, Vec<u32>)> = context_steps
        .iter()
        .map(|&c| split_tokens(grid.frames, per_step, c.clamp(1, grid.frames - 1)))
        .collect();
    let splits: Vec<(&[u32], &[u32])> = parts
        .iter()
        .flat_map(|(past, future)| [(past.as_slice(), future.as_slice()), (future, past)])
        .collect();
    let mut windows = vec![Vec::with_capacity(starts.len()); forecasters.len()];
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
        let errors = trainer.forecast_energies(&batch, &splits, forecasters);
        for (out, errors) in windows.iter_mut().zip(&errors) {
            // errors[split] holds every window's token errors, window-major.
            let stats: Vec<Vec<[f32; 2]>> = splits
                .iter()
                .zip(errors)
                .map(|((_, target), e)| token_stats(e, target.len()))
                .collect();
            // Splits alternate forward and backward per context length.
            out.extend((0..chunk.len()).map(|w| {
                stats
                    .chunks_exact(2)
                    .map(|dirs| [dirs[0][w], dirs[1][w]])
                    .collect::<Vec<_>>()
            }));
        }
    }
    windows
        .into_iter()
        .map(|windows| WindowStats {
            starts: starts.clone(),
            span,
            time_steps: grid.frames,
            context_steps: context_steps.to_vec(),
            windows,
        })
        .collect()
}

/// Per window, `[mean, top]`: the mean of its `per_window` token errors and the mean of the
/// largest [`TOP_FRACTION`] of them.
fn token_stats(errors: &[f32], per_window: usize) -> Vec<[f32; 2]> {
    let n = per_window.max(1);
    let k = ((n as f32 * TOP_FRACTION).ceil() as usize).clamp(1, n);
    errors
        .chunks_exact(n)
        .map(|tokens| {
            let mut t = tokens.to_vec();
            t.sort_by(|a, b| b.total_cmp(a));
            let mean = t.iter().sum::<f32>() / n as f32;
            [mean, t[..k].iter().sum::<f32>() / k as f32]
        })
        .collect()
}

/// IntPhys's relative score of one quadruplet: whether its two impossible videos are together
/// more surprising than its two possible ones (1, ties 0.5, else 0). A detector biased toward
/// any one segment gains as much on one side as on the other.
/// It is the paired comparison of the summed surprises, so a set's relative accuracy is
/// [`paired_accuracy`] over `(possible sum, impossible sum)` pairs.
pub fn quadruplet_correct(possible: [f32; 2], impossible: [f32; 2]) -> f64 {
    beats(impossible[0] + impossible[1], possible[0] + possible[1])
}

/// 1 when `impossible` is the more surprising, 0.5 on a tie, else 0 (the comparison every
/// score here counts).
fn beats(impossible: f32, possible: f32) -> f64 {
    match impossible.partial_cmp(&possible) {
        Some(std::cmp::Ordering::Greater) => 1.0,
        Some(std::cmp::Ordering::Equal) => 0.5,
        _ => 0.0,
    }
}

/// IntPhys-style paired accuracy: the fraction of (possible, impossible) pairs whose impossible
/// video has the higher surprise (ties count half).
pub fn paired_accuracy(pairs: &[(f32, f32)]) -> f64 {
    if pairs.is_empty() {
        return f64::NAN;
    }
    let wins: f64 = pairs.iter().map(|&(p, i)| beats(i, p)).sum();
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
            u += beats(*i, *p);
        }
    }
    u / (possible.len() * impossible.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scorings_read_the_window_statistics() {
        // Two windows, contexts 1..3 of 4 steps; forward [mean, top], backward [mean, top].
        let w = |x: f32| vec![[[x, 2.0 * x], [3.0 * x, 0.0]]; 3];
        let stats = WindowStats {
            starts: vec![0, 1],
            span: 8,
            time_steps: 4,
            context_steps: vec![1, 2, 3],
            windows: vec![w(1.0), w(2.0)],
        };
        let forward = Scoring {
            direction: Direction::Forward,
            ..Scoring::DEFAULT
        };
        assert_eq!(forward.curve(&stats).energy, vec![1.0, 2.0]);
        assert_eq!(Scoring::DEFAULT.curve(&stats).energy, vec![3.0, 6.0]);
        assert_eq!(Scoring::PAIRED.curve(&stats).energy, vec![2.0, 4.0]);
        let both_mean = Scoring {
            windows: WindowStat::Mean,
            ..Scoring::DEFAULT
        };
        let c = both_mean.curve(&stats);
        assert_eq!(c.energy, vec![3.0, 6.0]);
        assert_eq!(both_mean.surprise(&c), 4.5);
        assert_eq!(Scoring::all().len(), 16);
        assert_eq!(Scoring::PAIRED.context_steps(4), vec![2]);
        assert_eq!(Scoring::DEFAULT.context_steps(4), vec![1, 2, 3]);
        assert_eq!(token_stats(&[1.0, 3.0, 2.0, 6.0], 4), vec![[3.0, 6.0]]);
        assert_eq!(quadruplet_correct([1.0, 2.0], [0.5, 3.0]), 1.0);
        assert_eq!(quadruplet_correct([1.0, 2.0], [3.0, 0.0]), 0.5);
        assert_eq!(quadruplet_correct([1.0, 2.0], [0.1, 0.2]), 0.0);
    }

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
