//! What the coordinator and the workers of a DiLoCo-style run agree on: the global state and its
//! hash, the target-encoder policy, and one worker's local round.
//!
//! A round: the worker loads the global parameters (encoder + predictor, and the EMA target),
//! takes local AdamW steps on its shards (its optimiser state persists across rounds), and
//! returns the **pseudo-gradient** `start - end`. The coordinator averages pseudo-gradients and
//! applies its outer optimiser (see `amity-coordinator`).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::data::ClipSource;
use crate::flat::LengthMismatch;
use crate::train::Trainer;

/// Who owns the EMA target encoder while workers take local steps.
///
/// Neither DiLoCo nor its descendants train JEPAs, so both plausible answers are implemented and
/// compared by `amity bench federated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetPolicy {
    /// The coordinator keeps the EMA of the *global* encoder, one EMA step per round with the
    /// momentum compounded over the round's local steps; workers hold the target fixed.
    CoordinatorEma,
    /// Each worker runs the per-step EMA during its local steps, starting from the global
    /// target; the coordinator averages the workers' target movements like pseudo-gradients.
    LocalEma,
}

impl std::fmt::Display for TargetPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetPolicy::CoordinatorEma => "coordinator-ema",
            TargetPolicy::LocalEma => "local-ema",
        })
    }
}

/// The global parameters of a run: trainable model and target encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalParams {
    /// Encoder + predictor in the `Jepa` flat layout.
    pub model: Vec<f32>,
    /// EMA target encoder in the `Encoder` flat layout.
    pub target: Vec<f32>,
}

impl GlobalParams {
    /// A run's seeded initialisation, the same as [`crate::train::Trainer::new`]'s without
    /// building a model: `flat::init_params` with the run's seed; the target starts as the
    /// encoder, which is the prefix of the model's flat layout.
    pub fn seeded(run: &crate::config::Config) -> Self {
        let (model_layout, target_layout) = crate::checkpoint::layouts(run);
        let model = crate::flat::init_params(&model_layout, run.train.seed);
        GlobalParams {
            target: model[..target_layout.total].to_vec(),
            model,
        }
    }

    /// BLAKE3 of the little-endian bytes of `model` then `target`: the name of a state that
    /// both ends compute and compare.
    pub fn hash(&self) -> [u8; 32] {
        // Hashed in blocks: one `update` per value costs far more than the hashing itself.
        let mut h = blake3::Hasher::new();
        let mut buf = Vec::with_capacity(4 * 4096);
        for block in [&self.model, &self.target]
            .into_iter()
            .flat_map(|v| v.chunks(4096))
        {
            buf.clear();
            buf.extend(block.iter().flat_map(|v| v.to_le_bytes()));
            h.update(&buf);
        }
        *h.finalize().as_bytes()
    }

    /// `model` followed by `target`, the vector state deltas are taken over.
    pub fn concat(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.model.len() + self.target.len());
        v.extend_from_slice(&self.model);
        v.extend_from_slice(&self.target);
        v
    }

    /// The lengths of the two parts of [`GlobalParams::concat`], as state deltas are encoded
    /// (`codec::encode_parts`).
    pub fn parts(&self) -> [usize; 2] {
        [self.model.len(), self.target.len()]
    }

    /// Adds a delta over [`GlobalParams::concat`] in place (`f32` additions, so both ends that
    /// add the same decoded delta to the same state get bit-identical results).
    pub fn apply_delta(&mut self, delta: &[f32]) -> Result<(), LengthMismatch> {
        let want = self.model.len() + self.target.len();
        if delta.len() != want {
            return Err(LengthMismatch {
                want,
                got: delta.len(),
            });
        }
        let (dm, dt) = delta.split_at(self.model.len());
        for (p, d) in self.model.iter_mut().zip(dm) {
            *p += d;
        }
        for (p, d) in self.target.iter_mut().zip(dt) {
            *p += d;
        }
        Ok(())
    }
}

/// When a worker stops its local steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundBudget {
    /// Stop after this many steps (`None`: only the time budget counts).
    pub steps: Option<u64>,
    /// Stop when this much time has passed (`None`: only the step budget counts).
    pub time: Option<Duration>,
}

impl RoundBudget {
    /// Exactly `n` steps.
    pub fn steps(n: u64) -> Self {
        RoundBudget {
            steps: Some(n),
            time: None,
        }
    }
}

/// Loss statistics of a round's local steps.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RoundLoss {
    /// Mean over the round's steps.
    pub mean: f64,
    /// First step.
    pub first: f64,
    /// Last step.
    pub last: f64,
}

/// What a worker's local round produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalUpdate {
    /// `start - end` of the trainable model.
    pub model_delta: Vec<f32>,
    /// `start - end` of the target encoder (only under [`TargetPolicy::LocalEma`]).
    pub target_delta: Option<Vec<f32>>,
    /// Clips processed.
    pub samples: u64,
    /// Local steps taken.
    pub steps: u64,
    /// Loss statistics.
    pub loss: RoundLoss,
}

impl LocalUpdate {
    /// The lengths of the parts of [`LocalUpdate::wire_values`] (each encoded on its own).
    pub fn wire_parts(&self) -> Vec<usize> {
        let mut parts = vec![self.model_delta.len()];
        if let Some(t) = &self.target_delta {
            parts.push(t.len());
        }
        parts
    }

    /// The values a worker uploads: the model delta, then the target delta when there is one.
    pub fn wire_values(&self) -> Vec<f32> {
        let mut v = self.model_delta.clone();
        if let Some(t) = &self.target_delta {
            v.extend_from_slice(t);
        }
        v
    }
}

/// Options of one local round.
#[derive(Debug, Clone, Copy)]
pub struct LocalRoundOptions {
    /// When to stop.
    pub budget: RoundBudget,
    /// Target-encoder policy of the run.
    pub policy: TargetPolicy,
    /// Seed of the batches (mixed with the trainer's step count, which keeps growing).
    pub seed: u64,
    /// Makes each step take `slowdown` times as long (sleeping the rest), to stand in for slower
    /// hardware in demos and tests; 1.0 is full speed.
    pub slowdown: f64,
}

/// Runs one local round from `start`: loads it into `trainer` (keeping the trainer's AdamW
/// state), steps until the budget or `stop()` says so (at least one step), and returns the
/// pseudo-gradient.
pub fn local_round(
    trainer: &mut Trainer,
    start: &GlobalParams,
    source: &ClipSource,
    opts: &LocalRoundOptions,
    mut on_step: impl FnMut(u64, f64),
    stop: impl Fn() -> bool,
) -> Result<LocalUpdate, LengthMismatch> {
    trainer.load_model_flat(&start.model)?;
    trainer.load_target_flat(&start.target)?;
    trainer.set_target_frozen(opts.policy == TargetPolicy::CoordinatorEma);
    let config = trainer.config().clone();
    let began = Instant::now();
    let (mut steps, mut samples, mut sum) = (0u64, 0u64, 0.0f64);
    let mut loss = RoundLoss::default();
    loop {
        let t0 = Instant::now();
        let batch = source.batch(
            opts.seed,
            trainer.step_count(),
            config.train.batch,
            &config.model,
        );
        let s = trainer.step(&batch);
        if opts.slowdown > 1.0 {
            std::thread::sleep(t0.elapsed().mul_f64(opts.slowdown - 1.0));
        }
        if steps == 0 {
            loss.first = s.loss;
        }
        loss.last = s.loss;
        sum += s.loss;
        steps += 1;
        samples += batch.batch as u64;
        on_step(steps, s.loss);
        let done = opts.budget.steps.is_some_and(|n| steps >= n)
            || opts.budget.time.is_some_and(|t| began.elapsed() >= t)
            || stop();
        if done {
            break;
        }
    }
    loss.mean = sum / steps as f64;
    let diff = |a: &[f32], b: Vec<f32>| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f32>>();
    Ok(LocalUpdate {
        model_delta: diff(&start.model, trainer.model_flat()),
        target_delta: (opts.policy == TargetPolicy::LocalEma)
            .then(|| diff(&start.target, trainer.target_flat())),
        samples,
        steps,
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use burn::tensor::Device;

    #[test]
    fn a_local_round_returns_start_minus_end() {
        let mut config = Config::preset("tiny").unwrap();
        config.train.batch = 2;
        let mut t = Trainer::new(config.clone(), &Device::flex());
        let start = GlobalParams {
            model: t.model_flat(),
            target: t.target_flat(),
        };
        let source = ClipSource::synthetic(&config.model);
        for policy in [TargetPolicy::CoordinatorEma, TargetPolicy::LocalEma] {
            let opts = LocalRoundOptions {
                budget: RoundBudget::steps(2),
                policy,
                seed: 1,
                slowdown: 1.0,
            };
            let u = local_round(&mut t, &start, &source, &opts, |_, _| {}, || false).unwrap();
            assert_eq!((u.steps, u.samples), (2, 4));
            let mut end = start.clone();
            let neg: Vec<f32> = u.wire_values().iter().map(|d| -d).collect();
            match policy {
                TargetPolicy::CoordinatorEma => {
                    assert!(u.target_delta.is_none());
                    // The target did not move.
                    assert_eq!(t.target_flat(), start.target);
                    let mut m = end.model.clone();
                    for (p, d) in m.iter_mut().zip(&neg) {
                        *p += d;
                    }
                    assert!(
                        m.iter()
                            .zip(t.model_flat())
                            .all(|(a, b)| (a - b).abs() < 1e-6)
                    );
                }
                TargetPolicy::LocalEma => {
                    assert_ne!(t.target_flat(), start.target);
                    end.apply_delta(&neg).unwrap();
                    let got = t.target_flat();
                    assert!(
                        end.target
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| (a - b).abs() < 1e-6)
                    );
                }
            }
        }
        // Hashes name states.
        let mut other = start.clone();
        assert_eq!(other.hash(), start.hash());
        other.model[0] += 1.0;
        assert_ne!(other.hash(), start.hash());
        assert!(other.apply_delta(&[0.0]).is_err());
    }
}
