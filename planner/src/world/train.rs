//! Training the action-conditioned predictor on frozen latents: L1 teacher forcing over every
//! step of a window plus L1 on a two-step autoregressive rollout (V-JEPA 2-AC's objective), with
//! a smaller L1 on the predicted states.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use amity_shared::config::TrainConfig;
use amity_shared::flat::{ParamLayout, init_params, load_flat};
use amity_shared::optim::{AdamW, Schedule};
use amity_shared::rng::Rng;

use super::WorldModelConfig;
use super::data::{Latents, Trajectory};
use super::predictor::ActionPredictor;

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
    let (z2, _) = two_step(model, &w);
    let target = w.z_out.narrow(1, 1, 1);
    let e: f32 = (z2 - target).abs().mean().into_scalar();
    e as f64
}

/// Step 2 predicted from step 0 and the prediction of step 1: `[B, 1, P, D]` and its state.
fn two_step(model: &ActionPredictor, w: &Windows) -> (Tensor<4>, Tensor<3>) {
    let z0 = w.z_in.clone().narrow(1, 0, 1);
    let s0 = w.s_in.clone().narrow(1, 0, 1);
    let (z1, s1) = model.forward(z0.clone(), s0.clone(), w.a_in.clone().narrow(1, 0, 1));
    let (z, s) = model.forward(
        Tensor::cat(vec![z0, z1], 1),
        Tensor::cat(vec![s0, s1], 1),
        w.a_in.clone().narrow(1, 0, 2),
    );
    (z.narrow(1, 1, 1), s.narrow(1, 1, 1))
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

/// Trains a predictor on `lat` (episodes `train` of it; the rest is held out for the report).
/// `log` gets (step, teacher-forcing loss, rollout loss).
pub fn train(
    cfg: &WorldModelConfig,
    lat: &Latents,
    trajs: &[Trajectory],
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
    let t = cfg.window.min((lat.frames - 1) / skip).max(2);
    let mut last = f64::NAN;
    for step in 0..cfg.steps {
        let picks: Vec<(usize, usize)> = (0..cfg.batch)
            .map(|_| (rng.below(train_eps), rng.below(lat.frames - t * skip)))
            .collect();
        let w = windows(lat, trajs, &picks, t, skip, &ad);
        let (z, s) = model.forward(w.z_in.clone(), w.s_in.clone(), w.a_in.clone());
        let tf = (z - w.z_out.clone()).abs().mean()
            + (s - w.s_out.clone()).abs().mean() * cfg.state_weight;
        let (z2, _) = two_step(&model, &w);
        let ro = (z2 - w.z_out.clone().narrow(1, 1, 1)).abs().mean();
        let loss = tf.clone() + ro.clone();
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
