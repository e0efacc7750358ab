//! One V-JEPA training step, and the trainer that owns the model, its EMA target and AdamW.
//!
//! A step: the target encoder (EMA, no gradients) encodes the whole clip and its outputs are
//! layer-normed; for each mask set, the encoder sees the context tokens, the predictor
//! regresses the target tokens' features, and the L1 loss is taken; the losses of the sets are
//! averaged; AdamW updates encoder and predictor; the EMA pulls the target towards the encoder.
//!
//! With the `vicreg` objective the targets are the online encoder's own features (stop
//! gradient) and VICReg on the pooled context features of the two first mask sets keeps them
//! from collapsing; no EMA runs.
//!
//! Its pieces, private here and re-exported: `mask` (V-JEPA's multi-block tube masks), `loss`
//! (L1, VICReg, SIGReg), `optim` (AdamW with V-JEPA's parameter groups, and the schedules),
//! `ema` (the target update).

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};

mod ema;
mod loss;
mod mask;
mod optim;

pub use ema::ema_update;
pub use loss::{Vicreg, l1, sigreg, sigreg_directions, vicreg};
pub use mask::{MaskBatch, MultiBlockMasker};
pub use optim::{AdamW, Schedule, StepInfo};

use crate::config::{Config, Objective};
use crate::data::ClipBatch;
use crate::model::flat::{LengthMismatch, ParamLayout, init_params, load_flat, to_flat};
use crate::model::{Encoder, Jepa, gather_tokens, host_f32, layer_norm_plain};
use crate::stats::{feature_std, rankme, rankme_centred};

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step index (0-based) this was.
    pub step: u64,
    /// The prediction loss (L1), averaged over mask sets.
    pub loss: f64,
    /// The L1 a constant predictor (the batch mean of the targets) would reach: a loss near
    /// this means the predictor learned nothing beyond the mean.
    pub mean_baseline: f64,
    /// The VICReg or SIGReg term (0 with the EMA objective).
    pub vicreg: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// EMA momentum used.
    pub ema: f64,
}

/// Collapse telemetry of the target encoder on a set of clips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Telemetry {
    /// Mean over dimensions of the per-dimension std of token features.
    pub feature_std: f64,
    /// Smallest per-dimension std.
    pub feature_std_min: f64,
    /// RankMe effective rank of the clip-pooled embeddings.
    pub rankme: f64,
    /// The same of the clip-pooled embeddings less their mean ([`rankme_centred`]): how many
    /// directions the clips differ in, whatever the size of what they share.
    pub rankme_centred: f64,
}

/// Owns everything a local V-JEPA run needs.
pub struct Trainer {
    config: Config,
    model: Jepa,
    target: Encoder,
    optim: AdamW,
    masker: MultiBlockMasker,
    step: u64,
    device: Device,
    target_frozen: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("preset", &self.config.preset)
            .field("step", &self.step)
            .finish()
    }
}

fn int_tensor(values: &[u32], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = values.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

impl Trainer {
    /// A fresh run: parameters initialised from `config.train.seed`, target = encoder.
    /// `device` is a plain (non-autodiff) device; the trainer adds autodiff itself.
    pub fn new(config: Config, device: &Device) -> Self {
        let layout = ParamLayout::of(&Jepa::new(&config.model, device));
        let flat = init_params(&layout, config.train.seed);
        Self::from_flat(config, &flat, None, device).expect("layout built from the same config")
    }

    /// A run from given parameters (`model` in the [`Jepa`] layout, `target` in the
    /// [`Encoder`] layout; `None` copies the encoder).
    pub fn from_flat(
        config: Config,
        model: &[f32],
        target: Option<&[f32]>,
        device: &Device,
    ) -> Result<Self, LengthMismatch> {
        let ad = device.clone().autodiff();
        let jepa = load_flat(Jepa::new(&config.model, &ad), model)?;
        let target_enc = match target {
            Some(t) => load_flat(Encoder::new(&config.model, device), t)?,
            None => jepa.encoder.valid(),
        };
        let masker = MultiBlockMasker::new(
            config.model.grid(),
            config.train.masks.clone(),
            config.train.seed,
        );
        Ok(Trainer {
            optim: AdamW::new(&config.train),
            config,
            model: jepa,
            target: target_enc,
            masker,
            step: 0,
            device: device.clone(),
            target_frozen: false,
        })
    }

    /// A run from a checkpoint's config, model and EMA target.
    pub fn from_checkpoint(
        ckpt: &crate::checkpoint::Checkpoint,
        device: &Device,
    ) -> Result<Self, LengthMismatch> {
        Self::from_flat(ckpt.config.clone(), &ckpt.model, Some(&ckpt.target), device)
    }

    /// The run's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Holds the EMA target fixed during steps (`true`) or lets each step pull it towards the
    /// encoder (`false`, the default). A federated worker under the coordinator-EMA policy
    /// freezes it: the coordinator owns the target and ships it every round.
    pub fn set_target_frozen(&mut self, frozen: bool) {
        self.target_frozen = frozen;
    }

    /// The device (without autodiff) the run lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable parameters as a flat vector ([`Jepa`] layout).
    pub fn model_flat(&self) -> Vec<f32> {
        to_flat(&self.model)
    }

    /// The target encoder's parameters as a flat vector ([`Encoder`] layout).
    pub fn target_flat(&self) -> Vec<f32> {
        to_flat(&self.target)
    }

    /// Replaces the trainable parameters (the inner optimiser state is kept).
    pub fn load_model_flat(&mut self, flat: &[f32]) -> Result<(), LengthMismatch> {
        self.model = load_flat(self.model.clone(), flat)?;
        Ok(())
    }

    /// Replaces the target encoder's parameters.
    pub fn load_target_flat(&mut self, flat: &[f32]) -> Result<(), LengthMismatch> {
        self.target = load_flat(self.target.clone(), flat)?;
        Ok(())
    }

    /// The target encoder (what releases ship and probes evaluate).
    pub fn target(&self) -> &Encoder {
        &self.target
    }

    /// The trainable model.
    pub fn model(&self) -> &Jepa {
        &self.model
    }

    /// Gives this trainer its own stream of masks: `0` (the default) draws them from the run's
    /// seed alone, any other value from the seed mixed with `stream`. Federated workers pass
    /// their worker id, so that two workers at the same step never draw the same masks.
    pub fn set_stream(&mut self, stream: u64) {
        let seed = match stream {
            0 => self.config.train.seed,
            s => crate::rng::Rng::derive(self.config.train.seed, &[0x57_4ea3, s]).next_u64(),
        };
        self.masker = MultiBlockMasker::new(
            self.config.model.grid(),
            self.config.train.masks.clone(),
            seed,
        );
    }

    /// One optimiser step on `batch`, with the schedule of the run's own step count
    /// ([`Schedule::at`]).
    pub fn step(&mut self, batch: &ClipBatch) -> StepStats {
        let schedule = Schedule::at(&self.config.train, self.step);
        self.step_with(batch, schedule)
    }

    /// One optimiser step on `batch` with a given learning rate, weight decay and EMA momentum
    /// (a federated worker's, from the run's global progress).
    pub fn step_with(&mut self, batch: &ClipBatch, schedule: Schedule) -> StepStats {
        let cfg = &self.config.train;
        let ad = self.device.clone().autodiff();
        let b = batch.batch;
        // One upload of the batch; the autodiff view shares it (inputs need no gradient).
        let plain = batch.tensor(&self.device);
        let patches = plain.clone().autodiff();
        let masks = self.masker.sample(self.step, b);

        // Targets: layer-normed features of the whole clip, without gradients (SIGReg: with
        // gradients, through the online encoder itself).
        let full = match cfg.objective {
            Objective::Ema => self.target.forward(plain, None),
            Objective::Vicreg => self.model.encoder.valid().forward(plain, None),
            Objective::Sigreg => self.model.encoder.valid().forward(plain.clone(), None),
        };
        let h = layer_norm_plain(full);
        let h_grad = (cfg.objective == Objective::Sigreg)
            .then(|| layer_norm_plain(self.model.encoder.forward(patches.clone(), None)));

        let mut pred_loss: Option<Tensor<1>> = None;
        let mut baseline: Option<Tensor<1>> = None;
        let mut pooled = Vec::new();
        for m in &masks {
            let (ctx, tgt) = mask_tensors(m, &ad);
            let h_t = gather_tokens(h.clone(), tgt.clone().inner());
            let mean = h_t.clone().mean_dim(1).mean_dim(0);
            let base = (h_t.clone() - mean).abs().mean();
            let h_t = match &h_grad {
                Some(h) => gather_tokens(h.clone(), tgt.clone()),
                None => Tensor::from_inner(h_t),
            };
            let z = self
                .model
                .encoder
                .forward(patches.clone(), Some(ctx.clone()));
            if cfg.objective != Objective::Ema {
                pooled.push(z.clone().mean_dim(1).squeeze_dim::<2>(1));
            }
            let pred = self.model.predictor.forward(z, ctx, tgt);
            let loss = l1(pred, h_t);
            pred_loss = Some(match pred_loss {
                Some(acc) => acc + loss,
                None => loss,
            });
            baseline = Some(match baseline {
                Some(acc) => acc + base,
                None => base,
            });
        }
        let sets = masks.len() as f64;
        let pred_loss = pred_loss.expect("at least one mask set") / sets;
        let mut loss = pred_loss.clone();
        let mut vicreg_value = 0.0;
        if cfg.objective == Objective::Vicreg && pooled.len() >= 2 {
            let mut views = pooled.into_iter();
            let (a, c) = (
                views.next().expect("two views"),
                views.next().expect("two views"),
            );
            let v = vicreg(a, c, cfg.vicreg);
            vicreg_value = v.total.clone().into_scalar::<f32>() as f64;
            loss = loss + v.total;
        } else if cfg.objective == Objective::Sigreg {
            let (lambda, slices) = cfg.sigreg;
            let z = Tensor::cat(pooled, 0);
            let width = z.dims()[1];
            let seed = crate::rng::Rng::derive(cfg.seed, &[0x5169, self.step]).next_u64();
            let dirs = crate::train::sigreg_directions(width, slices, seed, &ad);
            let reg = sigreg(z, dirs);
            vicreg_value = reg.clone().into_scalar::<f32>() as f64;
            loss = loss * (1.0 - lambda) + reg * lambda;
        }
        let loss_value: f32 = pred_loss.clone().inner().into_scalar();
        let base_value: f32 = (baseline.expect("at least one mask set") / sets).into_scalar();

        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        // Module clones share their tensors: this hands the model over without copying it.
        let (model, info) = self.optim.step(self.model.clone(), grads, schedule);
        self.model = model;
        match cfg.objective {
            Objective::Ema if self.target_frozen => {}
            Objective::Ema => {
                self.target = ema_update(self.target.clone(), &self.model.encoder, schedule.ema);
            }
            // No EMA: the encoder itself is what gets evaluated and released.
            Objective::Vicreg | Objective::Sigreg => self.target = self.model.encoder.valid(),
        }
        let stats = StepStats {
            step: self.step,
            loss: loss_value as f64,
            mean_baseline: base_value as f64,
            vicreg: vicreg_value,
            grad_norm: info.grad_norm,
            lr: schedule.lr,
            ema: schedule.ema,
        };
        self.step += 1;
        stats
    }

    /// Clip embeddings of the target encoder, mean-pooled over tokens: `batch x width`.
    pub fn pooled_features(&self, batch: &ClipBatch) -> Vec<f32> {
        let z = self.target.forward(batch.tensor(&self.device), None);
        host_f32(z.mean_dim(1))
    }

    /// Token features of the target encoder: `batch x tokens x width`.
    pub fn token_features(&self, batch: &ClipBatch) -> Vec<f32> {
        host_f32(self.target.forward(batch.tensor(&self.device), None))
    }

    /// Probe features of the target encoder: token features mean-pooled over space within each
    /// tubelet time step and concatenated over time, `batch x (T' * width)`.
    ///
    /// A mean over space *and* time cannot carry velocity to a linear probe (the order of the
    /// frames is averaged away: measured R² ≈ 0 for trained and random encoders alike), while
    /// the per-time spatial mean keeps the trajectory.
    pub fn probe_features(&self, batch: &ClipBatch) -> Vec<f32> {
        let z = self.target.forward(batch.tensor(&self.device), None);
        let [b, n, d] = z.dims();
        let t = self.config.model.grid().frames;
        host_f32(z.reshape([b, t, n / t, d]).mean_dim(2).reshape([b, t * d]))
    }

    /// Collapse telemetry of the target encoder on `batch` (use a few hundred clips: RankMe
    /// cannot exceed the number of clips).
    pub fn telemetry(&self, batch: &ClipBatch) -> Telemetry {
        let d = self.config.model.width;
        let z = self.target.forward(batch.tensor(&self.device), None);
        let tokens: Vec<f64> = host_f32(z.clone()).into_iter().map(f64::from).collect();
        let (std, std_min) = feature_std(&tokens, tokens.len() / d, d);
        let pooled: Vec<f64> = host_f32(z.mean_dim(1)).into_iter().map(f64::from).collect();
        Telemetry {
            feature_std: std,
            feature_std_min: std_min,
            rankme: rankme(&pooled, batch.batch, d),
            rankme_centred: rankme_centred(&pooled, batch.batch, d),
        }
    }

    /// Per-clip prediction energy: the mean L1 error of the predictor on the `target` tokens from
    /// the `context` tokens, against the layer-normed target-encoder features. Low energy means
    /// the clip is what the model expects.
    pub fn energy(&self, batch: &ClipBatch, context: &[u32], target: &[u32]) -> Vec<f32> {
        let per_token = self.token_energies(batch, &[(context, target)]).remove(0);
        per_token
            .chunks_exact(target.len().max(1))
            .map(|t| t.iter().sum::<f32>() / t.len() as f32)
            .collect()
    }

    /// [`Trainer::energy`] per target token, for several `(context, target)` splits of the same
    /// clips: one `batch x target.len()` vector of mean L1 errors per split, so that a local
    /// surprise (one object) is not averaged away over the clip. The target encoder runs once.
    pub fn token_energies(&self, batch: &ClipBatch, splits: &[(&[u32], &[u32])]) -> Vec<Vec<f32>> {
        self.forecast_energies(batch, splits, &[Forecaster::Predictor])
            .remove(0)
    }

    /// [`Trainer::token_energies`] for each of `forecasters` (outer index), the clips uploaded
    /// and the full-clip targets encoded once for all of them. Every forecaster's errors are
    /// taken against the same layer-normed target-encoder features of the whole clip.
    pub fn forecast_energies(
        &self,
        batch: &ClipBatch,
        splits: &[(&[u32], &[u32])],
        forecasters: &[Forecaster],
    ) -> Vec<Vec<Vec<f32>>> {
        let b = batch.batch;
        let patches = batch.tensor(&self.device);
        let h = layer_norm_plain(self.target.forward(patches.clone(), None));
        let grid = self.config.model.grid();
        let per_step = (grid.height * grid.width) as u32;
        let rep = |idx: &[u32]| {
            let all: Vec<u32> = (0..b).flat_map(|_| idx.iter().copied()).collect();
            int_tensor(&all, [b, idx.len()], &self.device)
        };
        // What every forecaster shares, per split: the index tensors and the targets' features.
        let prepared: Vec<_> = splits
            .iter()
            .map(|(context, target)| {
                let tgt = rep(target);
                let h_t = gather_tokens(h.clone(), tgt.clone());
                (*context, *target, rep(context), tgt, h_t)
            })
            .collect();
        let model = self.model.valid();
        forecasters
            .iter()
            .map(|forecaster| {
                prepared
                    .iter()
                    .map(|(context, target, ctx, tgt, h_t)| {
                        let forecast = match forecaster {
                            Forecaster::Predictor => {
                                model.predict(patches.clone(), ctx.clone(), tgt.clone())
                            }
                            Forecaster::Persistence => {
                                let source: Vec<u32> = target
                                    .iter()
                                    .map(|&t| nearest_in_time(context, t, per_step))
                                    .collect();
                                let seen = self.target.forward(patches.clone(), Some(ctx.clone()));
                                gather_tokens(layer_norm_plain(seen), rep(&source))
                            }
                            // [1, 1, width]: broadcast over clips and tokens below.
                            Forecaster::Mean => h_t.clone().mean_dim(1).mean_dim(0),
                        };
                        host_f32((forecast - h_t.clone()).abs().mean_dim(2))
                    })
                    .collect()
            })
            .collect()
    }
}

/// Who forecasts the target tokens of a `(context, target)` split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forecaster {
    /// The V-JEPA predictor, from the context encoder's features.
    Predictor,
    /// The baseline a predictor has to beat, *persistence* ("the scene stays as last seen"):
    /// every target token is forecast as the context token at the same spatial position nearest
    /// in time, read from the target encoder run on the context tokens alone, so nothing of the
    /// target leaks in. A spatial position with no context token at all falls back to the
    /// nearest context token in the token order.
    Persistence,
    /// What a collapsed predictor scores: every target token forecast as the mean of the
    /// split's target-token features over all clips (it reads the targets: a yardstick, never a
    /// forecaster). The training step reports the same figure as
    /// [`StepStats::mean_baseline`].
    Mean,
}

/// The position in `context` of the token at `target`'s spatial position nearest to it in
/// time (ties: the earlier); without one, of the context token nearest in token order.
fn nearest_in_time(context: &[u32], target: u32, per_step: u32) -> u32 {
    let (t, s) = (target / per_step, target % per_step);
    let same_place = context
        .iter()
        .enumerate()
        .filter(|(_, c)| *c % per_step == s)
        .min_by_key(|(_, c)| ((*c / per_step).abs_diff(t), *c / per_step));
    let pick = same_place.or_else(|| {
        context
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.abs_diff(target))
    });
    pick.map_or(0, |(i, _)| i as u32)
}

fn mask_tensors(m: &MaskBatch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    (
        int_tensor(&m.context, [m.batch, m.n_context], device),
        int_tensor(&m.target, [m.batch, m.n_target], device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ClipSource;

    fn tiny(objective: Objective) -> (Config, ClipSource) {
        let mut config = Config::preset("tiny").expect("preset");
        config.train.objective = objective;
        config.train.batch = 4;
        config.train.steps = 10;
        let source = ClipSource::synthetic(&config.model);
        (config, source)
    }

    #[test]
    fn steps_are_deterministic_from_the_config() {
        let (config, source) = tiny(Objective::Ema);
        let run = || {
            let mut t = Trainer::new(config.clone(), &Device::flex());
            for step in 0..2 {
                t.step(&source.batch(config.train.seed, step, 4, &config.model));
            }
            (t.model_flat(), t.target_flat())
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        // The EMA moved the target, but only a little.
        let fresh = Trainer::new(config.clone(), &Device::flex()).target_flat();
        assert_ne!(a.1, fresh);
    }

    #[test]
    fn vicreg_and_sigreg_objectives_train_without_an_ema() {
        for objective in [Objective::Vicreg, Objective::Sigreg] {
            let (config, source) = tiny(objective);
            let mut t = Trainer::new(config.clone(), &Device::flex());
            let before = t.model_flat();
            let s = t.step(&source.batch(0, 0, 4, &config.model));
            assert!(
                s.loss.is_finite() && s.vicreg.is_finite() && s.vicreg > 0.0,
                "{objective:?}: {s:?}"
            );
            assert_ne!(t.model_flat(), before, "{objective:?} did not train");
            // Without an EMA the released encoder is the online encoder itself.
            let model = t.model_flat();
            let enc_len = t.target_flat().len();
            assert_eq!(&model[..enc_len], t.target_flat().as_slice());
        }
    }

    #[test]
    fn energy_is_one_finite_positive_value_per_clip() {
        let (config, source) = tiny(Objective::Ema);
        let t = Trainer::new(config.clone(), &Device::flex());
        let batch = source.batch(0, 0, 4, &config.model);
        let e = t.energy(&batch, &[0, 1, 2], &[40, 41]);
        assert_eq!(e.len(), 4);
        assert!(e.iter().all(|v| v.is_finite() && *v > 0.0));
    }

    #[test]
    fn forecasters_sharing_one_pass_score_as_they_do_alone() {
        let (config, source) = tiny(Objective::Ema);
        let t = Trainer::new(config.clone(), &Device::flex());
        let batch = source.batch(0, 0, 3, &config.model);
        let (ctx, tgt): (Vec<u32>, Vec<u32>) = ((0..32).collect(), (32..64).collect());
        let splits = [(ctx.as_slice(), tgt.as_slice()), (&tgt, &ctx)];
        let both = t.forecast_energies(
            &batch,
            &splits,
            &[Forecaster::Predictor, Forecaster::Persistence],
        );
        assert_eq!(both[0], t.token_energies(&batch, &splits));
        let alone = t.forecast_energies(&batch, &splits, &[Forecaster::Persistence]);
        assert_eq!(both[1], alone[0]);
        assert_ne!(both[0], both[1]);
    }

    #[test]
    fn persistence_reads_the_same_place_nearest_in_time() {
        // 4 tokens per time step; context = steps 0 and 1.
        let context: Vec<u32> = (0..8).collect();
        assert_eq!(nearest_in_time(&context, 14, 4), 6); // step 3, place 2 <- step 1, place 2
        assert_eq!(nearest_in_time(&context, 9, 4), 5); // step 2, place 1 <- step 1, place 1
        // Backwards: context = steps 2 and 3 (tokens 8..16, positions 0..8).
        let later: Vec<u32> = (8..16).collect();
        assert_eq!(nearest_in_time(&later, 1, 4), 1); // step 0, place 1 <- step 2, place 1
        // No token at that place: the nearest in token order.
        assert_eq!(nearest_in_time(&[0, 1, 2], 7, 4), 2);
    }

    #[test]
    fn persistence_costs_less_on_a_still_scene_than_on_a_cut() {
        let (config, _) = tiny(Objective::Ema);
        let m = &config.model;
        let t = Trainer::new(config.clone(), &Device::flex());
        let frame = m.image_size * m.image_size * 3;
        let clips = crate::data::synth::generate(
            &crate::data::synth::SynthConfig::for_size(m.image_size, 1),
            5,
        );
        let other = crate::data::synth::generate(
            &crate::data::synth::SynthConfig::for_size(m.image_size, 1),
            6,
        );
        let still: Vec<u8> = (0..m.frames)
            .flat_map(|_| clips.frame(0).to_vec())
            .collect();
        let cut: Vec<u8> = (0..m.frames)
            .flat_map(|f| {
                if f < m.frames / 2 {
                    clips.frame(0)
                } else {
                    other.frame(0)
                }
                .to_vec()
            })
            .collect();
        assert_eq!(still.len(), m.frames * frame);
        let batch = ClipBatch::from_clips([still.as_slice(), cut.as_slice()], m);
        let per = (m.grid().height * m.grid().width) as u32;
        let half = m.grid().frames as u32 / 2 * per;
        let (ctx, tgt): (Vec<u32>, Vec<u32>) = ((0..half).collect(), (half..2 * half).collect());
        let e = t
            .forecast_energies(&batch, &[(&ctx, &tgt)], &[Forecaster::Persistence])
            .remove(0)
            .remove(0);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (still_e, cut_e) = (mean(&e[..tgt.len()]), mean(&e[tgt.len()..]));
        assert!(still_e < 0.5 * cut_e, "still {still_e} vs cut {cut_e}");
    }

    /// The `Mean` yardstick scores what forecasting every target token by the mean of the
    /// split's layer-normed target features scores, computed here on the host from the target
    /// encoder's raw token features.
    #[test]
    fn the_mean_yardstick_is_the_error_of_predicting_the_mean_target() {
        let (config, source) = tiny(Objective::Ema);
        let t = Trainer::new(config.clone(), &Device::flex());
        let batch = source.batch(3, 0, 3, &config.model);
        let (ctx, tgt): (Vec<u32>, Vec<u32>) = ((0..20).collect(), (40..52).collect());
        let got = t
            .forecast_energies(&batch, &[(&ctx, &tgt)], &[Forecaster::Mean])
            .remove(0)
            .remove(0);
        let d = config.model.width;
        let raw = t.token_features(&batch);
        let n = raw.len() / (3 * d);
        let normed: Vec<Vec<f64>> = raw
            .chunks_exact(d)
            .map(|x| {
                let m = x.iter().map(|v| *v as f64).sum::<f64>() / d as f64;
                let var = x.iter().map(|v| (*v as f64 - m).powi(2)).sum::<f64>() / d as f64;
                x.iter()
                    .map(|v| (*v as f64 - m) / (var + 1e-6).sqrt())
                    .collect()
            })
            .collect();
        let targets: Vec<&Vec<f64>> = (0..3)
            .flat_map(|b| tgt.iter().map(move |&i| b * n + i as usize))
            .map(|row| &normed[row])
            .collect();
        let mean: Vec<f64> = (0..d)
            .map(|c| targets.iter().map(|r| r[c]).sum::<f64>() / targets.len() as f64)
            .collect();
        assert_eq!(got.len(), targets.len());
        for (g, r) in got.iter().zip(&targets) {
            let want = r.iter().zip(&mean).map(|(x, m)| (x - m).abs()).sum::<f64>() / d as f64;
            assert!((*g as f64 - want).abs() < 1e-3, "{g} vs {want}");
        }
    }
}
