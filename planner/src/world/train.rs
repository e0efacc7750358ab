//! Training the action-conditioned predictor on frozen latents: L1 teacher forcing over every
//! step of a window plus L1 on an autoregressive rollout (V-JEPA 2-AC's objective, whose
//! rollout is two steps; [`WorldModelConfig::rollout_steps`]), with
//! a smaller L1 on the predicted states, and (when weighted) an L1 between what the frozen
//! position probes read from the predicted latents and the true positions, with the windows
//! where a position changed counting more.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use amity_shared::config::TrainConfig;
use amity_shared::eval::Ridge;
use amity_shared::model::flat::{ParamLayout, init_params, load_flat};
use amity_shared::rng::Rng;
use amity_shared::train::{AdamW, Schedule};

use super::WorldModelConfig;
use super::data::{Latents, Trajectory};
use super::predictor::ActionPredictor;

/// Frozen linear read-outs (the world model's position probes) whose reading of the
/// *predicted* latents is trained to match the true positions. The teacher-forcing L1 weighs
/// every token alike, and the agent or block is one token of sixteen: a predictor can get the
/// loss low while the thing that moved is smeared. The read-outs single out exactly what
/// planning reads from the predicted latents.
pub struct Readouts {
    /// `[features, k]`: every probe's standardisation folded into its weights.
    weights: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    /// Per episode, per frame, the `k` true values (positions / ARENA).
    truth: Vec<Vec<f32>>,
}

impl Readouts {
    /// Read-outs from probes and, per probe, the positions it reads (per episode, per frame,
    /// arena units).
    pub fn new(probes: &[(&Ridge, &[Vec<[f32; 2]>])]) -> Readouts {
        let d = probes[0].0.parts().0.len();
        let k: usize = probes
            .iter()
            .map(|(r, _)| r.parts().2.len() / (d + 1))
            .sum();
        let mut weights = vec![0f32; d * k];
        let mut bias = Vec::with_capacity(k);
        let mut col = 0;
        for (ridge, _) in probes {
            // (x - mean) * scale . w + b  =  x . (scale * w) + (b - mean . (scale * w))
            let (mean, scale, w) = ridge.parts();
            let kr = w.len() / (d + 1);
            for c in 0..kr {
                let mut b = w[d * kr + c];
                for i in 0..d {
                    let wi = w[i * kr + c] * scale[i];
                    weights[i * k + col + c] = wi as f32;
                    b -= mean[i] * wi;
                }
                bias.push(b as f32);
            }
            col += kr;
        }
        let truth = (0..probes[0].1.len())
            .map(|e| {
                (0..probes[0].1[e].len())
                    .flat_map(|t| {
                        probes
                            .iter()
                            .flat_map(move |(_, pos)| pos[e][t].map(|v| v / crate::env::ARENA))
                    })
                    .collect()
            })
            .collect();
        Readouts {
            weights,
            bias,
            k,
            truth,
        }
    }

    /// The folded weights `[features, k]` and bias `[1, k]` as tensors on `device` (built once
    /// per training run, not per step).
    fn maps(&self, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let f = self.weights.len() / self.k.max(1);
        let w = Tensor::from_data(TensorData::new(self.weights.clone(), [f, self.k]), device);
        let bias = Tensor::from_data(TensorData::new(self.bias.clone(), [1, self.k]), device);
        (w, bias)
    }

    /// The read-outs of `z [B, T, P, D]` through [`Readouts::maps`]: `[B, T, k]`.
    fn read(&self, maps: &(Tensor<2>, Tensor<2>), z: Tensor<4>) -> Tensor<3> {
        let [b, t, p, d] = z.dims();
        let (w, bias) = maps;
        (z.reshape([b * t, p * d]).matmul(w.clone()) + bias.clone()).reshape([b, t, self.k])
    }

    /// The true values at the frames windows `picks` predict, `[B, t, k]`, and the weight of
    /// each: `1 + min(|change over the step| / MOTION_UNIT, cap)`, so that a block that was
    /// pushed counts several times a block that sat still.
    fn truth(
        &self,
        picks: &[(usize, usize)],
        t: usize,
        skip: usize,
        cap: f32,
        device: &Device,
    ) -> (Tensor<3>, Tensor<3>) {
        let k = self.k;
        let mut v = Vec::with_capacity(picks.len() * t * k);
        let mut w = Vec::with_capacity(picks.len() * t * k);
        for &(e, t0) in picks {
            for s in 0..t {
                let f = t0 + (s + 1) * skip;
                let now = &self.truth[e][f * k..(f + 1) * k];
                let before = &self.truth[e][(f - skip) * k..(f - skip + 1) * k];
                v.extend_from_slice(now);
                w.extend(now.iter().zip(before).map(|(a, b)| {
                    let moved = (a - b).abs() * crate::env::ARENA;
                    1.0 + (moved / MOTION_UNIT).min(cap)
                }));
            }
        }
        let shape = [picks.len(), t, k];
        (
            Tensor::from_data(TensorData::new(v, shape), device),
            Tensor::from_data(TensorData::new(w, shape), device),
        )
    }
}

/// Changes of a read position (arena units) that count as one unit of motion in the read-out
/// loss's weights (see [`WorldModelConfig::readout_motion`]).
const MOTION_UNIT: f32 = 0.1;

/// Windows of steps, gathered from the latents and trajectories as tensors.
struct Windows {
    z_in: Tensor<4>,
    s_in: Tensor<3>,
    a_in: Tensor<3>,
    z_out: Tensor<4>,
    s_out: Tensor<3>,
}

/// `t` predictor steps from each pick `(episode, first frame)`, a step being `skip` frames.
fn windows(
    lat: &Latents,
    trajs: &[Trajectory],
    picks: &[(usize, usize)],
    t: usize,
    skip: usize,
    device: &Device,
) -> Windows {
    let (p, d) = (lat.tokens, lat.width);
    let b = picks.len();
    let mut z_in = Vec::with_capacity(b * t * p * d);
    let mut z_out = Vec::with_capacity(b * t * p * d);
    let mut s_in = Vec::with_capacity(b * t * 4);
    let mut s_out = Vec::with_capacity(b * t * 4);
    let mut a_in = Vec::with_capacity(b * t * 2 * skip);
    for &(e, t0) in picks {
        for k in 0..t {
            let (now, next) = (t0 + k * skip, t0 + (k + 1) * skip);
            z_in.extend_from_slice(lat.frame(e, now));
            z_out.extend_from_slice(lat.frame(e, next));
            s_in.extend(trajs[e].proprio[now]);
            s_out.extend(trajs[e].proprio[next]);
            for a in &trajs[e].actions[now..next] {
                a_in.extend(a);
            }
        }
    }
    let f4 = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, t, p, d]), device);
    let f3 = |v: Vec<f32>, k: usize| Tensor::<3>::from_data(TensorData::new(v, [b, t, k]), device);
    Windows {
        z_in: f4(z_in),
        z_out: f4(z_out),
        s_in: f3(s_in, 4),
        s_out: f3(s_out, 4),
        a_in: f3(a_in, 2 * skip),
    }
}

/// The energy-consistency loss ([`WorldModelConfig::energy_weight`]) of predictions `pred` and
/// real frames `real` (`[B, 1, P, D]`), with token smoothing `blur` (`[P, P]`): each window's goal
/// is the next window's real frame, and the loss is the mean absolute difference between the
/// predicted and the real energy to it, over the batch's mean real energy.
fn energy_consistency(pred: Tensor<4>, real: Tensor<4>, blur: &Tensor<2>) -> Tensor<1> {
    let [b, _, p, d] = real.dims();
    let (pred, real) = (pred.reshape([b, p, d]), real.reshape([b, p, d]));
    // A batch of one has no other window: its goal is its own real frame.
    let goal = if b > 1 {
        Tensor::cat(
            vec![
                real.clone().narrow(0, 1, b - 1),
                real.clone().narrow(0, 0, 1),
            ],
            0,
        )
    } else {
        real.clone()
    };
    let smooth = |x: Tensor<3>| blur.clone().unsqueeze::<3>().expand([b, p, p]).matmul(x);
    let goal = smooth(goal);
    let energy = |x: Tensor<3>| {
        let diff = smooth(x) - goal.clone();
        (diff.clone() * diff)
            .reshape([b, p * d])
            .mean_dim(1)
            .reshape([b])
    };
    let (e_pred, e_real) = (energy(pred), energy(real));
    let scale: f32 = e_real.clone().mean().into_scalar();
    (e_pred - e_real).abs().mean() / scale.max(1e-12)
}

/// Mean L1 error of two-step autoregressive rollouts on `picks` (windows of 2 steps): predict
/// step 1 from step 0, then step 2 from step 0 and the *predicted* step 1.
pub fn rollout_error(
    model: &ActionPredictor,
    lat: &Latents,
    trajs: &[Trajectory],
    picks: &[(usize, usize)],
    skip: usize,
    device: &Device,
) -> f64 {
    let w = windows(lat, trajs, picks, 2, skip, device);
    let (z0, s0) = (
        w.z_in.clone().narrow(1, 0, 1),
        w.s_in.clone().narrow(1, 0, 1),
    );
    let (z, _) = roll_on(model, z0, s0, &w.a_in, 2, 2);
    let z2 = z.narrow(1, 1, 1);
    let target = w.z_out.narrow(1, 1, 1);
    let e: f32 = (z2 - target).abs().mean().into_scalar();
    e as f64
}

/// Continues windows autoregressively: from the steps so far (`z [B, T0, P, D]`, `s [B, T0, 4]`)
/// predicts `steps` more, every prediction fed back as the next step's input (the predictor
/// seeing at most `history` steps, as the planner does; `a` holds every step's action).
/// Returns the predicted steps, `[B, steps, P, D]` and `[B, steps, 4]`.
fn roll_on(
    model: &ActionPredictor,
    mut z: Tensor<4>,
    mut s: Tensor<3>,
    a: &Tensor<3>,
    steps: usize,
    history: usize,
) -> (Tensor<4>, Tensor<3>) {
    let t0 = z.dims()[1];
    for _ in 0..steps {
        let (zn, sn) = model.next_step(history, z.clone(), s.clone(), a.clone());
        z = Tensor::cat(vec![z, zn], 1);
        s = Tensor::cat(vec![s, sn], 1);
    }
    (z.narrow(1, t0, steps), s.narrow(1, t0, steps))
}

/// Held-out two-step windows (of `skip` frames a step) for measuring rollouts: `n` seeded picks.
pub fn eval_picks(lat: &Latents, n: usize, skip: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::derive(seed, &[0xe7a1]);
    (0..n)
        .map(|_| (rng.below(lat.episodes), rng.below(lat.frames - 2 * skip)))
        .collect()
}

/// What training did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Two-step rollout error on held-out windows before training.
    pub rollout_before: f64,
    /// The same after training.
    pub rollout_after: f64,
    /// Teacher-forcing loss at the last step.
    pub final_loss: f64,
}

/// A freshly initialised predictor (seeded, on `device`).
pub fn init(
    cfg: &WorldModelConfig,
    tokens: usize,
    width: usize,
    device: &Device,
) -> ActionPredictor {
    let shell = ActionPredictor::new(cfg, tokens, width, device);
    let flat = init_params(&ParamLayout::of(&shell), cfg.seed);
    load_flat(shell, &flat).expect("layout from the same shell")
}

/// Trains a predictor on `lat` (episodes `train` of it; the rest is held out for the report),
/// with the read-out loss weighted by `cfg.readout_weight` when `readouts` are given.
/// `log` gets (step, teacher-forcing loss, rollout loss).
pub fn train(
    cfg: &WorldModelConfig,
    lat: &Latents,
    trajs: &[Trajectory],
    readouts: Option<&Readouts>,
    device: &Device,
    log: &mut dyn FnMut(u64, f64, f64),
) -> (ActionPredictor, TrainReport) {
    let ad = device.clone().autodiff();
    let mut model = init(cfg, lat.tokens, lat.width, &ad);
    let held = (lat.episodes / 10).max(1);
    let train_eps = lat.episodes - held;
    let mut rng = Rng::derive(cfg.seed, &[0x7a11]);
    let skip = cfg.frameskip.max(1);
    assert!(
        lat.frames > 2 * skip,
        "episodes of {} frames are too short for frameskip {skip}",
        lat.frames
    );
    let eval: Vec<(usize, usize)> = eval_picks(lat, 64, skip, cfg.seed)
        .into_iter()
        .map(|(e, t)| (train_eps + e % held, t))
        .collect();
    let before = rollout_error(&model.valid(), lat, trajs, &eval, skip, device);
    let mut recipe = TrainConfig::vjepa(cfg.steps, cfg.batch);
    recipe.lr = cfg.lr;
    recipe.start_lr = cfg.lr * 0.1;
    recipe.final_lr = cfg.lr * 0.05;
    recipe.warmup = (cfg.steps / 20).max(1);
    recipe.weight_decay = 0.01;
    recipe.weight_decay_end = 0.01;
    recipe.clip_grad = 1.0;
    let mut optim = AdamW::new(&recipe);
    let t = cfg
        .window
        .max(cfg.rollout_steps)
        .min((lat.frames - 1) / skip)
        .max(2);
    // Autoregressive steps of the rollout loss (its first step is teacher-forced).
    let k = cfg.rollout_steps.clamp(2, t);
    let readouts = readouts
        .filter(|_| cfg.readout_weight > 0.0)
        .map(|r| (r, r.maps(&ad)));
    let energy_blur = (cfg.energy_weight > 0.0).then(|| {
        let side = (lat.tokens as f64).sqrt().round() as usize;
        let energy = crate::plan::LatentEnergy::default();
        crate::plan::blur_matrix((side, side), energy.blur * side as f32, &ad)
            .unwrap_or_else(|| Tensor::eye(lat.tokens, &ad))
    });
    let mut last = f64::NAN;
    for step in 0..cfg.steps {
        let picks: Vec<(usize, usize)> = (0..cfg.batch)
            .map(|_| (rng.below(train_eps), rng.below(lat.frames - t * skip)))
            .collect();
        let w = windows(lat, trajs, &picks, t, skip, &ad);
        let (z, s) = model.forward(w.z_in.clone(), w.s_in.clone(), w.a_in.clone());
        // The rollout's first step is the teacher-forced prediction of step 1 (the mask hides
        // the later steps from it): it continues from there instead of predicting it again.
        let z01 = Tensor::cat(
            vec![w.z_in.clone().narrow(1, 0, 1), z.clone().narrow(1, 0, 1)],
            1,
        );
        let s01 = Tensor::cat(
            vec![w.s_in.clone().narrow(1, 0, 1), s.clone().narrow(1, 0, 1)],
            1,
        );
        let tf = (z.clone() - w.z_out.clone()).abs().mean()
            + (s - w.s_out.clone()).abs().mean() * cfg.state_weight;
        let (zr, _) = roll_on(&model, z01, s01, &w.a_in, k - 1, cfg.history());
        let ro = (zr.clone() - w.z_out.clone().narrow(1, 1, k - 1))
            .abs()
            .mean();
        let mut loss = tf.clone() + ro.clone();
        if let Some(blur) = &energy_blur {
            let pred = zr.clone().narrow(1, k - 2, 1);
            let real = w.z_out.clone().narrow(1, k - 1, 1);
            loss = loss + energy_consistency(pred, real, blur) * cfg.energy_weight;
        }
        if let Some((r, maps)) = &readouts {
            // Teacher-forced steps and the rollout's fed-back steps alike.
            let cap = cfg.readout_motion as f32;
            let (truth, weight) = r.truth(&picks, t, skip, cap, &ad);
            let weighted = |read: Tensor<3>, truth: Tensor<3>, weight: Tensor<3>| {
                ((read - truth).abs() * weight.clone()).sum() / weight.sum()
            };
            let read = weighted(r.read(maps, z), truth.clone(), weight.clone())
                + weighted(
                    r.read(maps, zr),
                    truth.narrow(1, 1, k - 1),
                    weight.narrow(1, 1, k - 1),
                );
            loss = loss + read * cfg.readout_weight;
        }
        let (tf_v, ro_v): (f32, f32) = (tf.inner().into_scalar(), ro.inner().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (m, _) = optim.step(model, grads, Schedule::at(&recipe, step));
        model = m;
        last = tf_v as f64;
        log(step, tf_v as f64, ro_v as f64);
    }
    let valid = model.valid();
    let after = rollout_error(&valid, lat, trajs, &eval, skip, device);
    (
        valid,
        TrainReport {
            rollout_before: before,
            rollout_after: after,
            final_loss: last,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_consistency_is_zero_for_exact_predictions_and_grows_off_the_real_frames() {
        let device = Device::flex();
        let (b, p, d) = (4, 16, 3);
        let real: Vec<f32> = (0..b * p * d)
            .map(|i| ((i * 7) % 11) as f32 / 11.0)
            .collect();
        let frames =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, 1, p, d]), &device);
        let blur = crate::plan::blur_matrix((4, 4), 1.0, &device).expect("sigma > 0");
        let loss = |pred: Vec<f32>| -> f32 {
            energy_consistency(frames(pred), frames(real.clone()), &blur).into_scalar()
        };
        assert!(loss(real.clone()).abs() < 1e-6);
        let near: Vec<f32> = real.iter().map(|v| v + 0.05).collect();
        let far: Vec<f32> = real.iter().map(|v| v + 0.5).collect();
        let (near, far) = (loss(near), loss(far));
        assert!(near > 0.0 && far > near, "near {near}, far {far}");

        // It trains the predictions: the gradient reaches them.
        let ad = device.autodiff();
        let pred = Tensor::<4>::from_data(
            TensorData::new(
                real.iter().map(|v| v + 0.5).collect::<Vec<f32>>(),
                [b, 1, p, d],
            ),
            &ad,
        )
        .require_grad();
        let real_ad = Tensor::<4>::from_data(TensorData::new(real.clone(), [b, 1, p, d]), &ad);
        let blur_ad = crate::plan::blur_matrix((4, 4), 1.0, &ad).expect("sigma > 0");
        let grads = energy_consistency(pred.clone(), real_ad, &blur_ad).backward();
        let g = amity_shared::model::host_f32(pred.grad(&grads).expect("a gradient"));
        assert!(g.iter().any(|v| v.abs() > 0.0));
    }

    #[test]
    fn readouts_read_what_the_probes_predict() {
        // Two probes on random features of 3 tokens x 4: folding each probe's standardisation
        // into one affine map must not change what it reads.
        let (p, d, n) = (3, 4, 40);
        let mut rng = Rng::new(7);
        let x: Vec<f64> = (0..n * p * d).map(|_| rng.normal() * 2.0 + 0.5).collect();
        let ya: Vec<f64> = (0..n * 2).map(|_| rng.uniform()).collect();
        let yb: Vec<f64> = (0..n * 2).map(|_| rng.uniform()).collect();
        let a = Ridge::fit(&x, &ya, n, p * d, 2, 1.0);
        let b = Ridge::fit(&x, &yb, n, p * d, 2, 3.0);
        let none: Vec<Vec<[f32; 2]>> = vec![vec![[0.0; 2]; n]];
        let r = Readouts::new(&[(&a, &none), (&b, &none)]);
        let device = Device::flex();
        let z = Tensor::<4>::from_data(
            TensorData::new(x.iter().map(|&v| v as f32).collect(), [1, n, p, d]),
            &device,
        );
        let read: Vec<f32> = amity_shared::model::host_f32(r.read(&r.maps(&device), z));
        let (pa, pb) = (a.predict(&x, n), b.predict(&x, n));
        for i in 0..n {
            let want = [pa[2 * i], pa[2 * i + 1], pb[2 * i], pb[2 * i + 1]];
            for (k, w) in want.iter().enumerate() {
                let got = read[4 * i + k] as f64;
                assert!(
                    (got - w).abs() < 1e-3 * (1.0 + w.abs()),
                    "row {i} output {k}: {got} vs {w}"
                );
            }
        }
    }

    #[test]
    fn read_out_errors_count_more_where_the_position_moved() {
        // One probe output pair; episode 0 stands still for a step, then moves 0.3 and 2.0 units.
        let x: Vec<f64> = (0..8).map(|i| i as f64).collect();
        let y: Vec<f64> = (0..8).map(|i| (i % 2) as f64).collect();
        let ridge = Ridge::fit(&x, &y, 4, 2, 2, 1.0);
        let path = vec![vec![[1.0, 1.0], [1.0, 1.0], [1.3, 1.0], [1.3, 3.0]]];
        let r = Readouts::new(&[(&ridge, &path)]);
        let device = Device::flex();
        let (truth, weight) = r.truth(&[(0, 0)], 3, 1, 10.0, &device);
        let truth: Vec<f32> = amity_shared::model::host_f32(truth);
        let weight: Vec<f32> = amity_shared::model::host_f32(weight);
        // Positions are read in arena fractions.
        assert!(
            (truth[2] - 1.3 / crate::env::ARENA).abs() < 1e-6,
            "{truth:?}"
        );
        // Still: 1; x moved 0.3: 1 + 3; y moved 2.0: capped at 1 + 10.
        let want = [1.0, 1.0, 4.0, 1.0, 1.0, 11.0];
        for (w, e) in weight.iter().zip(want) {
            assert!((w - e).abs() < 1e-4, "{weight:?}");
        }
        // Cap 0: every window alike (the loss is the plain mean).
        let (_, flat) = r.truth(&[(0, 0)], 3, 1, 0.0, &device);
        assert!(
            amity_shared::model::host_f32(flat)
                .iter()
                .all(|&w| w == 1.0)
        );
    }
}
