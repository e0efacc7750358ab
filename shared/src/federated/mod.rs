//! What the coordinator and the workers of a DiLoCo-style run agree on: the global state and its
//! hash, the target-encoder policy, and one worker's local round.
//!
//! A round: the worker loads the global parameters (encoder + predictor, and the EMA target),
//! takes local AdamW steps on its shards (its optimiser state persists across rounds), and
//! returns the **pseudo-gradient** `start - end`. The coordinator averages pseudo-gradients and
//! applies its outer optimiser (see `amity-coordinator`).

pub mod codec;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use amity_protocol::message::LossStats;

use crate::config::TrainConfig;
use crate::data::ClipSource;
use crate::model::flat::LengthMismatch;
use crate::train::Schedule;
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

impl TargetPolicy {
    /// Every policy, in the order their names are listed in errors.
    pub const ALL: [TargetPolicy; 2] = [TargetPolicy::CoordinatorEma, TargetPolicy::LocalEma];

    /// The policy's name, as configs and the wire spell it.
    pub fn name(self) -> &'static str {
        match self {
            TargetPolicy::CoordinatorEma => "coordinator-ema",
            TargetPolicy::LocalEma => "local-ema",
        }
    }
}

impl std::fmt::Display for TargetPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TargetPolicy {
    type Err = crate::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| crate::UnknownName {
                what: "target policy",
                got: s.to_owned(),
                expected: &["coordinator-ema", "local-ema"],
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
        let model = crate::model::flat::init_params(&model_layout, run.train.seed);
        GlobalParams {
            target: model[..target_layout.total].to_vec(),
            model,
        }
    }

    /// Where a worker's own training stands when it holds this global state and an
    /// error-feedback `residual`: the state less the residual. The residual is what compression
    /// has not sent yet of the worker's pseudo-gradients (`start - end`, in the order of
    /// [`LocalUpdate::wire_values`]: the model, then the target under the local-EMA policy), so
    /// the difference is the state plus the training the coordinator has not heard of.
    ///
    /// A worker starts each round here rather than at the global state. Restarted at the global
    /// state, it learns again in every round what its residual already holds, the residual
    /// piles those copies up, and the dense flush at the end applies them all at once: measured
    /// (`amity bench federated`, default codec, H = 50, seed 0), the released predictor's
    /// held-out loss was 14.2 times that of predicting the mean target, and the workers' loss
    /// never got below it in any round. From here: 0.91 released, 0.88 while training (dense
    /// fp32 DiLoCo: 0.86 and 0.85; central: 0.82), velocity R² 0.402 instead of 0.324.
    ///
    /// A residual of another length (none yet, or a codec or policy that changed) leaves the
    /// state as it is.
    pub fn ahead_by(self: Arc<Self>, residual: &[f32]) -> Arc<Self> {
        let (m, t) = (self.model.len(), self.target.len());
        if residual.len() != m && residual.len() != m + t {
            return self;
        }
        let mut own = Arc::unwrap_or_clone(self);
        for (p, r) in own.model.iter_mut().zip(&residual[..m]) {
            *p -= r;
        }
        for (p, r) in own.target.iter_mut().zip(&residual[m..]) {
            *p -= r;
        }
        Arc::new(own)
    }

    /// BLAKE3 of the little-endian bytes of `model` then `target`: the name of a state that
    /// both ends compute and compare.
    pub fn hash(&self) -> crate::store::BlobId {
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
        crate::store::BlobId(*h.finalize().as_bytes())
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

    /// Moves the target encoder one EMA step towards the model's encoder:
    /// `target = m * target + (1 - m) * encoder`, in `f32` in a fixed order, so that the
    /// coordinator and every worker that apply it to the same state get bit-identical targets.
    /// Under [`TargetPolicy::CoordinatorEma`] this is how the target moves: it is never sent.
    pub fn ema_target(&mut self, m: f32) {
        let keep = 1.0 - m;
        for (t, e) in self.target.iter_mut().zip(&self.model) {
            *t = m * *t + keep * *e;
        }
    }

    /// The state after a coordinator's state delta (`codec::encode_parts` bytes, validated in
    /// full): `self + delta` over the model and the target, or, with a target momentum (the
    /// coordinator-EMA policy), over the model only followed by the target's EMA step
    /// ([`GlobalParams::ema_target`]), exactly as the coordinator computed it.
    pub fn after_delta(
        &self,
        bytes: &[u8],
        target_momentum: Option<f32>,
    ) -> Result<GlobalParams, crate::federated::codec::CodecError> {
        let parts: Vec<usize> = match target_momentum {
            None => self.parts().to_vec(),
            Some(_) => vec![self.model.len()],
        };
        let values = crate::federated::codec::decode_parts(bytes, &parts)?;
        let mut next = self.clone();
        next.apply_state_delta(&values, target_momentum)
            .expect("decode_parts checked the lengths");
        Ok(next)
    }

    /// Applies a decoded state delta in place: over the model and the target, or, with a
    /// target momentum (coordinator EMA), over the model only, then the target's EMA step. The
    /// one way both the coordinator and the workers move a state, so their hashes agree.
    pub fn apply_state_delta(
        &mut self,
        values: &[f32],
        target_momentum: Option<f32>,
    ) -> Result<(), LengthMismatch> {
        let Some(m) = target_momentum else {
            return self.apply_delta(values);
        };
        if values.len() != self.model.len() {
            return Err(LengthMismatch {
                want: self.model.len(),
                got: values.len(),
            });
        }
        for (p, d) in self.model.iter_mut().zip(values) {
            *p += d;
        }
        self.ema_target(m);
        Ok(())
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

/// Where a round sits in its run, as the coordinator announces it: the schedules of every
/// worker follow this global progress, not the worker's own step count, so a slow worker and a
/// fast one use the same learning rate, weight decay and EMA momentum at the same moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunProgress {
    /// The round (0-based).
    pub round: u64,
    /// Rounds planned for the run (`0`: no planned end).
    pub planned_rounds: u64,
}

impl RunProgress {
    /// The fraction of the run done when `within` (0 to 1) of this round is done, or `None`
    /// for a run without a planned end.
    pub fn done(&self, within: f64) -> Option<f64> {
        (self.planned_rounds > 0)
            .then(|| (self.round as f64 + within.clamp(0.0, 1.0)) / self.planned_rounds as f64)
    }

    /// The schedule at `within` of this round; `local_step` (the worker's own step count)
    /// times the warm-up of a run without a planned end, which then holds the schedule
    /// constant ([`Schedule::open_ended`]).
    pub fn schedule(&self, cfg: &TrainConfig, within: f64, local_step: u64) -> Schedule {
        match self.done(within) {
            Some(done) => Schedule::at_progress(cfg, done),
            None => Schedule::open_ended(cfg, local_step),
        }
    }

    /// The momentum of the coordinator-EMA target's one step for this round: the per-step
    /// momentum at the round's start compounded over the round's `steps` (mean local steps).
    pub fn target_momentum(&self, cfg: &TrainConfig, steps: f64) -> f32 {
        let m = self.schedule(cfg, 0.0, u64::MAX).ema;
        m.powf(steps.max(1.0)) as f32
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
    /// How much of the budget `steps` taken after `elapsed` have used, 0 to 1 (the larger of
    /// the step and the time fraction).
    pub fn within(&self, steps: u64, elapsed: Duration) -> f64 {
        let by_steps = self.steps.map_or(0.0, |n| steps as f64 / n.max(1) as f64);
        let by_time = self
            .time
            .map_or(0.0, |t| elapsed.as_secs_f64() / t.as_secs_f64().max(1e-9));
        by_steps.max(by_time).min(1.0)
    }

    /// Exactly `n` steps.
    pub fn steps(n: u64) -> Self {
        RoundBudget {
            steps: Some(n),
            time: None,
        }
    }
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
    pub loss: LossStats,
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
    /// Seed of the batches (mixed with `worker` and the trainer's step count, which keeps
    /// growing).
    pub seed: u64,
    /// The worker's identity in the run: mixed into the batch and mask seeds, so that two
    /// workers never draw the same batches or masks.
    pub worker: u64,
    /// Where the round sits in the run (drives the schedules).
    pub progress: RunProgress,
    /// Makes each step take `slowdown` times as long (sleeping the rest), to stand in for slower
    /// hardware in demos and tests; 1.0 is full speed.
    pub slowdown: f64,
}

/// The batch seed of `worker` in a run seeded `seed`: each worker draws its own stream.
pub fn worker_seed(seed: u64, worker: u64) -> u64 {
    crate::rng::Rng::derive(seed, &[0xda7a, worker]).next_u64()
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
    trainer.set_stream(opts.worker.wrapping_add(1));
    let seed = worker_seed(opts.seed, opts.worker);
    let config = trainer.config().clone();
    let began = Instant::now();
    let (mut steps, mut samples, mut sum, mut base_sum) = (0u64, 0u64, 0.0f64, 0.0f64);
    let mut loss = LossStats::default();
    loop {
        let t0 = Instant::now();
        let batch = source.batch(
            seed,
            trainer.step_count(),
            config.train.batch,
            &config.model,
        );
        let within = opts.budget.within(steps, began.elapsed());
        let schedule = opts
            .progress
            .schedule(&config.train, within, trainer.step_count());
        let s = trainer.step_with(&batch, schedule);
        if opts.slowdown > 1.0 {
            std::thread::sleep(t0.elapsed().mul_f64(opts.slowdown - 1.0));
        }
        if steps == 0 {
            loss.first = s.loss as f32;
        }
        loss.last = s.loss as f32;
        sum += s.loss;
        base_sum += s.mean_baseline;
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
    loss.mean = (sum / steps as f64) as f32;
    loss.baseline = (base_sum / steps as f64) as f32;
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

    /// Local-round options of `worker` in round 0 of 4 planned.
    fn options(
        budget: RoundBudget,
        policy: TargetPolicy,
        seed: u64,
        worker: u64,
    ) -> LocalRoundOptions {
        LocalRoundOptions {
            budget,
            policy,
            seed,
            worker,
            progress: RunProgress {
                round: 0,
                planned_rounds: 4,
            },
            slowdown: 1.0,
        }
    }

    /// A worker's own position is the global state less its residual, the target included
    /// when the residual covers it; a residual that fits neither layout changes nothing.
    #[test]
    fn a_worker_stands_ahead_of_the_global_state_by_its_residual() {
        let global = Arc::new(GlobalParams {
            model: vec![1.0, 2.0, 3.0],
            target: vec![10.0, 20.0],
        });
        let own = global.clone().ahead_by(&[0.5, -1.0, 0.0]);
        assert_eq!(own.model, [0.5, 3.0, 3.0]);
        assert_eq!(own.target, [10.0, 20.0]);
        let own = global.clone().ahead_by(&[0.0, 0.0, 1.0, 2.0, -2.0]);
        assert_eq!(
            (&own.model[..], &own.target[..]),
            (&[1.0, 2.0, 2.0][..], &[8.0, 22.0][..])
        );
        for other in [&[][..], &[1.0][..], &[1.0; 4][..]] {
            let same = global.clone().ahead_by(other);
            assert!(Arc::ptr_eq(&same, &global), "{other:?}");
        }
        assert_eq!(
            *global,
            GlobalParams {
                model: vec![1.0, 2.0, 3.0],
                target: vec![10.0, 20.0]
            }
        );
    }

    #[test]
    fn target_policies_parse_from_their_names() {
        for p in TargetPolicy::ALL {
            assert_eq!(p.name().parse::<TargetPolicy>(), Ok(p));
            // The serde spelling (configs, status files) is the same name.
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        let err = "global-ema".parse::<TargetPolicy>().unwrap_err();
        assert!(err.to_string().contains("global-ema"), "{err}");
    }

    #[test]
    fn schedules_follow_announced_progress_whatever_the_worker_speed() {
        let cfg = Config::preset("tiny").unwrap().train;
        let progress = RunProgress {
            round: 3,
            planned_rounds: 10,
        };
        // Halfway through round 3: a fast worker at step 50 of 100, a slow one at step 5 of
        // 10, a time-budgeted one after 5 of its 10 s, whatever their own step counts.
        let fast = RoundBudget::steps(100).within(50, Duration::ZERO);
        let slow = RoundBudget::steps(10).within(5, Duration::ZERO);
        let timed = RoundBudget {
            steps: None,
            time: Some(Duration::from_secs(10)),
        }
        .within(2, Duration::from_secs(5));
        let at = |within| progress.schedule(&cfg, within, 12_345);
        assert_eq!(at(fast), at(slow));
        assert_eq!(at(fast), at(timed));
        assert_eq!(at(fast), Schedule::at_progress(&cfg, 0.35));
        // The schedule moves with the run, not with the worker's own steps.
        assert!(at(fast).lr > Schedule::at_progress(&cfg, 0.9).lr);
        assert!(at(fast).ema < Schedule::at_progress(&cfg, 0.9).ema);
        // Without a planned end: warm-up by local steps, then constant.
        let open = RunProgress {
            round: 3,
            planned_rounds: 0,
        };
        assert_eq!(
            open.schedule(&cfg, 0.5, 12_345),
            Schedule::open_ended(&cfg, 12_345)
        );
        // The coordinator's target momentum for a round compounds the per-step one.
        let m = progress.target_momentum(&cfg, 20.0) as f64;
        let step = progress.schedule(&cfg, 0.0, 0).ema;
        assert!((m - step.powf(20.0)).abs() < 1e-6);
    }

    #[test]
    fn two_workers_never_draw_the_same_batch_or_masks() {
        let mut config = Config::preset("tiny").unwrap();
        config.train.batch = 2;
        let source = ClipSource::synthetic(&config.model);
        let batches: Vec<_> = (0..4)
            .map(|w| source.batch(worker_seed(7, w), 0, 2, &config.model))
            .collect();
        for a in 0..batches.len() {
            for b in a + 1..batches.len() {
                assert_ne!(batches[a], batches[b], "workers {a} and {b}");
            }
        }
        // Same start, same trainer state, same step: two workers still move differently.
        let t = Trainer::new(config.clone(), &Device::flex());
        let start = GlobalParams {
            model: t.model_flat(),
            target: t.target_flat(),
        };
        let delta = |worker| {
            let mut t = Trainer::new(config.clone(), &Device::flex());
            let mut opts = options(
                RoundBudget::steps(1),
                TargetPolicy::CoordinatorEma,
                7,
                worker,
            );
            opts.progress.planned_rounds = 2;
            local_round(&mut t, &start, &source, &opts, |_, _| {}, || false)
                .unwrap()
                .model_delta
        };
        assert_eq!(delta(1), delta(1), "a worker's round is reproducible");
        assert_ne!(delta(0), delta(1));
    }

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
            let opts = options(RoundBudget::steps(2), policy, 1, 0);
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
        // With both budgets, whichever runs out first ends the round (at least one step).
        for (budget, steps) in [(Duration::ZERO, 1), (Duration::from_secs(3600), 3)] {
            let both = RoundBudget {
                steps: Some(3),
                time: Some(budget),
            };
            let opts = options(both, TargetPolicy::CoordinatorEma, 1, 0);
            let u = local_round(&mut t, &start, &source, &opts, |_, _| {}, || false).unwrap();
            assert_eq!(u.steps, steps, "time budget {budget:?}");
        }
        // Hashes name states.
        let mut other = start.clone();
        assert_eq!(other.hash(), start.hash());
        other.model[0] += 1.0;
        assert_ne!(other.hash(), start.hash());
        assert!(other.apply_delta(&[0.0]).is_err());
    }
}
