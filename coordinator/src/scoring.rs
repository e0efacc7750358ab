//! Contribution scoring: what each update does to the JEPA loss on clips the coordinator keeps.
//!
//! Norm screens stop crude attacks (NaN, huge or scaled values), not a plausible but harmful
//! update such as the honest one with its sign flipped, or noise at the honest norm. So, like
//! Templar's "Gauntlet", the coordinator applies each update alone to the current model and
//! measures the prediction loss on a held-out batch: an honest round of local training lowers it
//! (or leaves it nearly unchanged), a harmful update raises it. The core turns the change into a
//! weight or a rejection ([`crate::aggregate::AggregationConfig::score_tolerance`]); this module
//! only measures.
//!
//! **Opt-in** (`aggregation.held_out_clips`, 0 by default), because the measure is not yet a
//! reliable judge of harm. Measured:
//! - `tests/hostile.rs` (tiny preset, 4 local steps a round, 4 honest workers and one sending
//!   its update with the sign flipped): dense rounds move the held-out loss by -5% to -8% for
//!   honest updates and +5% to +8% for the flipped one, which is rejected; compressed rounds
//!   (sparseloco) by about -0.2% and +0.25%: the sign separates them, the 2% tolerance does not,
//!   so the flipped update is only down-weighted.
//! - `amity demo` (three honest workers, 10 s rounds): honest updates of one round ranged from
//!   -26% to +23% (the fast worker's rounds 4 and 5 were rejected), because the loss is taken
//!   against the coordinator's target, which the next rounds move; the flush round's updates
//!   (every held-back residual, applied alone) read +90% to +156%, so flush rounds are not
//!   scored.
//!
//! A sounder score would compare each update's end state with its own moved target plus a
//! collapse guard, or a probe; the scores are logged per round, per institution and in the model
//! card so that operators can see them meanwhile.
//!
//! The measure is the model's energy ([`Trainer::token_energies`]): the mean L1 error of the
//! predictor on fixed multi-block target tokens from the context tokens, against the layer-normed
//! features of the coordinator's current target encoder, over a fixed held-out batch. Everything
//! is seeded, so a replay after a restart scores the same.

use amity_shared::config::Config;
use amity_shared::data::ClipBatch;
use amity_shared::data::ClipSource;
use amity_shared::rng::Rng;
use amity_shared::train::MultiBlockMasker;
use amity_shared::train::Trainer;
use burn::tensor::Device;

/// The held-out loss of a state (model and target encoder, flat): what the core asks of a
/// scorer. Deterministic for the same inputs.
pub trait HeldOutLoss: Send + std::fmt::Debug {
    /// The loss of `model` against `target` on the held-out clips.
    fn loss(&mut self, model: &[f32], target: &[f32]) -> f64;
}

/// [`HeldOutLoss`] on a fixed batch of clips with fixed masks.
pub struct HeldOut {
    trainer: Trainer,
    batch: ClipBatch,
    splits: Vec<(Vec<u32>, Vec<u32>)>,
}

impl std::fmt::Debug for HeldOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldOut")
            .field("clips", &self.batch.batch)
            .field("splits", &self.splits.len())
            .finish()
    }
}

/// The seed label of the held-out clips and masks (distinct from every training stream).
const HELD_OUT: u64 = 0x04e1_d0c7;

impl HeldOut {
    /// `clips` held-out clips of `source` for `run`'s model. Synthetic clips are drawn from a
    /// stream no worker uses; corpus clips are a seeded sample of the coordinator's shards.
    pub fn new(run: &Config, source: &ClipSource, clips: usize) -> Self {
        let device = Device::flex();
        let seed = Rng::derive(run.train.seed, &[HELD_OUT]).next_u64();
        let batch = source.batch(seed, 0, clips.max(1), &run.model);
        let masker = MultiBlockMasker::new(run.model.grid(), run.train.masks.clone(), seed);
        let splits = masker
            .sample(0, 1)
            .iter()
            .map(|m| (m.context_of(0).to_vec(), m.target_of(0).to_vec()))
            .collect();
        HeldOut {
            trainer: Trainer::new(run.clone(), &device),
            batch,
            splits,
        }
    }
}

impl HeldOutLoss for HeldOut {
    fn loss(&mut self, model: &[f32], target: &[f32]) -> f64 {
        if self.trainer.load_model_flat(model).is_err()
            || self.trainer.load_target_flat(target).is_err()
        {
            return f64::INFINITY;
        }
        let splits: Vec<(&[u32], &[u32])> = self
            .splits
            .iter()
            .map(|(c, t)| (c.as_slice(), t.as_slice()))
            .collect();
        let energies = self.trainer.token_energies(&self.batch, &splits);
        let (sum, n) = energies
            .iter()
            .flatten()
            .fold((0.0f64, 0usize), |(s, n), e| (s + *e as f64, n + 1));
        if n == 0 {
            f64::INFINITY
        } else {
            sum / n as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amity_shared::federated::GlobalParams;

    #[test]
    fn training_lowers_the_held_out_loss_and_its_flip_raises_it() {
        let mut run = Config::preset("tiny").unwrap();
        run.train.batch = 8;
        let source = ClipSource::synthetic(&run.model);
        let mut scorer = HeldOut::new(&run, &source, 16);
        let start = GlobalParams::seeded(&run);
        let base = scorer.loss(&start.model, &start.target);
        assert!(base.is_finite() && base > 0.0);
        assert_eq!(
            scorer.loss(&start.model, &start.target),
            base,
            "deterministic"
        );
        // Twenty honest steps on other clips.
        let device = Device::flex();
        let mut t =
            Trainer::from_flat(run.clone(), &start.model, Some(&start.target), &device).unwrap();
        for step in 0..20 {
            t.step(&source.batch(7, step, 8, &run.model));
        }
        let trained = t.model_flat();
        let flipped: Vec<f32> = start
            .model
            .iter()
            .zip(&trained)
            .map(|(s, e)| s - (e - s))
            .collect();
        let honest = scorer.loss(&trained, &start.target);
        let hostile = scorer.loss(&flipped, &start.target);
        assert!(honest < base, "{honest} vs {base}");
        assert!(hostile > base, "{hostile} vs {base}");
    }
}
