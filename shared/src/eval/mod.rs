//! The standard frozen-encoder evaluation on the synthetic moving-shapes world.
//!
//! Probes are fitted on one set of videos and scored on another (disjoint seeds): velocity and
//! position (R²), shape and colour (accuracy), all through one [`Readout`] of the target
//! encoder's tokens: the standard one averages each time step over space
//! ([`Trainer::probe_features`]). The same suite runs on a randomly initialised encoder for the
//! baseline a number must be read against.
//!
//! Also here: `probe` (ridge probes) and `readout` (which view of the tokens a probe reads),
//! private and re-exported; [`embed`] (a video's clips through a released encoder) and [`npy`]
//! (NumPy files), which `amity embed` and `amity surprise` use.

use serde::Serialize;

pub mod embed;
pub mod npy;
mod probe;
mod readout;

pub use probe::{ProbeKind, Ridge, probe, r2};
pub use readout::Readout;

use crate::config::ModelConfig;
use crate::data::ClipBatch;
use crate::data::synth::{COLOURS, SynthConfig, SynthVideo, generate};
use crate::train::{Forecaster, MultiBlockMasker, Telemetry, Trainer};

/// Videos for probing: a fitting split and a scoring split.
#[derive(Debug, Clone)]
pub struct ProbeSet {
    /// Videos the probes are fitted on.
    pub train: Vec<SynthVideo>,
    /// Held-out videos the probes are scored on.
    pub test: Vec<SynthVideo>,
}

impl ProbeSet {
    /// `n_train` and `n_test` videos from seed ranges no training set uses
    /// (`10^8 + i` and `2 * 10^8 + i`).
    pub fn synthetic(cfg: &SynthConfig, n_train: usize, n_test: usize) -> Self {
        ProbeSet {
            train: (0..n_train as u64)
                .map(|i| generate(cfg, 100_000_000 + i))
                .collect(),
            test: (0..n_test as u64)
                .map(|i| generate(cfg, 200_000_000 + i))
                .collect(),
        }
    }

    /// [`ProbeSet::synthetic`] at `model`'s frame size and clip length.
    pub fn for_model(model: &ModelConfig, n_train: usize, n_test: usize) -> Self {
        Self::synthetic(
            &SynthConfig::for_size(model.image_size, model.frames),
            n_train,
            n_test,
        )
    }
}

/// Probe scores of one encoder.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProbeReport {
    /// R² of the clip's mean velocity of the first object.
    pub velocity_r2: f64,
    /// R² of the clip's mean position of the first object.
    pub position_r2: f64,
    /// Accuracy of the first object's shape (chance 1/3).
    pub shape_acc: f64,
    /// Accuracy of the first object's colour (chance 1/5).
    pub colour_acc: f64,
}

/// Probe targets of one video: mean velocity, mean position, shape one-hot, colour one-hot.
fn targets(v: &SynthVideo) -> ([f64; 2], [f64; 2], [f64; 3], [f64; COLOURS.len()]) {
    let frames = &v.labels.frames;
    let n = frames.len() as f64;
    let mut vel = [0.0; 2];
    let mut pos = [0.0; 2];
    for f in frames {
        for a in 0..2 {
            vel[a] += f[0].vel[a] as f64 / n;
            pos[a] += f[0].pos[a] as f64 / n;
        }
    }
    let o = &v.labels.objects[0];
    let shape = std::array::from_fn(|i| (i == o.shape.index()) as u8 as f64);
    let colour = std::array::from_fn(|i| (i == o.colour) as u8 as f64);
    (vel, pos, shape, colour)
}

struct Columns {
    features: Vec<f64>,
    velocity: Vec<f64>,
    position: Vec<f64>,
    shape: Vec<f64>,
    colour: Vec<f64>,
}

fn columns(trainer: &Trainer, videos: &[SynthVideo], readout: Readout) -> Columns {
    let model = &trainer.config().model;
    let mut c = Columns {
        features: Vec::new(),
        velocity: Vec::new(),
        position: Vec::new(),
        shape: Vec::new(),
        colour: Vec::new(),
    };
    for chunk in videos.chunks(64) {
        let batch = ClipBatch::from_clips(chunk.iter().map(|v| v.pixels.as_slice()), model);
        c.features
            .extend(readout.features(trainer, &batch).into_iter().map(f64::from));
    }
    for v in videos {
        let (vel, pos, shape, colour) = targets(v);
        c.velocity.extend(vel);
        c.position.extend(pos);
        c.shape.extend(shape);
        c.colour.extend(colour);
    }
    c
}

/// Fits and scores every probe on `trainer`'s target encoder, through the standard readout
/// ([`Readout::SpaceMean`]).
pub fn probe_report(trainer: &Trainer, set: &ProbeSet) -> ProbeReport {
    probe_report_through(trainer, set, Readout::SpaceMean)
}

/// Fits and scores every probe on `trainer`'s target encoder, through `readout`.
pub fn probe_report_through(trainer: &Trainer, set: &ProbeSet, readout: Readout) -> ProbeReport {
    let (a, b) = (
        columns(trainer, &set.train, readout),
        columns(trainer, &set.test, readout),
    );
    let d = a.features.len() / set.train.len().max(1);
    let run = |kind, ya: &[f64], yb: &[f64]| probe(kind, (&a.features, ya), (&b.features, yb), d);
    ProbeReport {
        velocity_r2: run(ProbeKind::Regression, &a.velocity, &b.velocity),
        position_r2: run(ProbeKind::Regression, &a.position, &b.position),
        shape_acc: run(ProbeKind::Classification, &a.shape, &b.shape),
        colour_acc: run(ProbeKind::Classification, &a.colour, &b.colour),
    }
}

/// Held-out clips (a probe set's first test videos) of [`loss_over_mean`].
pub const LOSS_OVER_MEAN_CLIPS: usize = 128;

/// The seed of [`loss_over_mean`]'s masks: the same for every model, so figures compare.
const LOSS_OVER_MEAN_MASKS: u64 = 0x4e1d_0a7e;

/// The predictor's held-out loss over what predicting the mean target scores
/// ([`Forecaster::Mean`]), on the first [`LOSS_OVER_MEAN_CLIPS`] test videos of a probe set
/// and masks drawn by the training recipe from a fixed seed: below 1 the predictor explains
/// part of the target's spread. Unlike the loss, the ratio does not fall just because the
/// target's features narrow.
pub fn loss_over_mean(trainer: &Trainer, set: &ProbeSet) -> f64 {
    let config = trainer.config();
    let (n, seed) = (
        LOSS_OVER_MEAN_CLIPS.min(set.test.len()),
        LOSS_OVER_MEAN_MASKS,
    );
    let batch = ClipBatch::from_clips(
        set.test[..n].iter().map(|v| v.pixels.as_slice()),
        &config.model,
    );
    let masker = MultiBlockMasker::new(config.model.grid(), config.train.masks.clone(), seed);
    let masks = masker.sample(0, 1);
    let splits: Vec<(&[u32], &[u32])> = masks
        .iter()
        .map(|m| (m.context_of(0), m.target_of(0)))
        .collect();
    let both =
        trainer.forecast_energies(&batch, &splits, &[Forecaster::Predictor, Forecaster::Mean]);
    let total = |e: &Vec<Vec<f32>>| e.iter().flatten().map(|x| *x as f64).sum::<f64>();
    total(&both[0]) / total(&both[1])
}

/// Collapse telemetry on the first `n` test videos of a probe set.
pub fn telemetry(trainer: &Trainer, set: &ProbeSet, n: usize) -> Telemetry {
    let n = n.min(set.test.len());
    let batch = ClipBatch::from_clips(
        set.test[..n].iter().map(|v| v.pixels.as_slice()),
        &trainer.config().model,
    );
    trainer.telemetry(&batch)
}
