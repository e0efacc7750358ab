//! The action-conditioned predictor (V-JEPA 2-AC style): per time step the sequence holds an
//! action token, a state (proprioception) token and the frame's patch tokens; attention is
//! block-causal over time (a step sees itself and the past); the outputs at a step's patch
//! tokens predict the change to the next frame's latents (added to the step's own latents, then
//! layer-normed) and the output at its state token predicts the next state.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor, TensorData};

use amity_shared::model::layer_norm_plain;
use amity_shared::model::vit::{Block, LN_EPS, norm};

use super::WorldModelConfig;

/// Action dimensions.
pub const ACTION_DIM: usize = 2;
/// State (proprioception) dimensions.
pub const STATE_DIM: usize = 4;

/// The predictor.
#[derive(Module, Debug)]
pub struct ActionPredictor {
    /// The `frameskip` actions of a step, concatenated → width.
    pub action: Linear,
    /// State → width.
    pub state: Linear,
    /// Encoder feature → width.
    pub frame: Linear,
    /// Learned embedding of each slot of a step: action, state, then every patch position.
    pub slots: Param<Tensor<2>>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Width → encoder feature (next frame's latents).
    pub frame_head: Linear,
    /// Width → next state.
    pub state_head: Linear,
    /// Fixed sin-cos embedding of the time step `[max_steps, width]` (not a parameter).
    pub time: Tensor<2>,
    /// Attention heads (not a parameter).
    pub heads: usize,
}

fn sincos(steps: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(steps * width);
    for t in 0..steps {
        for i in 0..width / 2 {
            let w = 10000f64.powf(-(i as f64) / (width / 2) as f64);
            out.push((t as f64 * w).sin() as f32);
        }
        for i in 0..width - width / 2 {
            let w = 10000f64.powf(-(i as f64) / (width / 2) as f64);
            out.push((t as f64 * w).cos() as f32);
        }
    }
    out
}

/// `[T*S, T*S]` block-causal mask (true = blocked): token of step `i` may not see step `j > i`.
fn block_causal(steps: usize, per_step: usize, device: &Device) -> Tensor<2, Bool> {
    let n = steps * per_step;
    let v: Vec<bool> = (0..n * n)
        .map(|k| (k % n) / per_step > (k / n) / per_step)
        .collect();
    Tensor::from_data(TensorData::new(v, [n, n]), device)
}

impl ActionPredictor {
    /// A predictor for `tokens` patch tokens of width `feature` per frame.
    pub fn new(cfg: &WorldModelConfig, tokens: usize, feature: usize, device: &Device) -> Self {
        let w = cfg.width;
        ActionPredictor {
            action: LinearConfig::new(ACTION_DIM * cfg.frameskip.max(1), w).init(device),
            state: LinearConfig::new(STATE_DIM, w).init(device),
            frame: LinearConfig::new(feature, w).init(device),
            slots: Param::from_tensor(Tensor::zeros([tokens + 2, w], device)),
            blocks: (0..cfg.depth)
                .map(|_| Block::new(w, cfg.heads, cfg.mlp_ratio, device))
                .collect(),
            norm: LayerNormConfig::new(w).with_epsilon(LN_EPS).init(device),
            frame_head: LinearConfig::new(w, feature).init(device),
            state_head: LinearConfig::new(w, STATE_DIM).init(device),
            time: Tensor::from_data(
                TensorData::new(sincos(cfg.max_steps, w), [cfg.max_steps, w]),
                device,
            ),
            heads: cfg.heads,
        }
    }

    /// `z [B, T, P, D]` latents, `s [B, T, 4]` states, `a [B, T, 2 * frameskip]` actions → the predicted
    /// latents `[B, T, P, D]` (layer-normed) and states `[B, T, 4]` of steps `1..=T`.
    pub fn forward(&self, z: Tensor<4>, s: Tensor<3>, a: Tensor<3>) -> (Tensor<4>, Tensor<3>) {
        let [b, t, p, d] = z.dims();
        let w = self.time.dims()[1];
        let device = z.device();
        let a = self.action.forward(a).unsqueeze_dim::<4>(2);
        let s = self.state.forward(s).unsqueeze_dim::<4>(2);
        let input = z.clone().reshape([b, t * p, d]);
        let z = self.frame.forward(input.clone()).reshape([b, t, p, w]);
        let time = self
            .time
            .clone()
            .to_device(&device)
            .narrow(0, 0, t)
            .reshape([1, t, 1, w]);
        let x = Tensor::cat(vec![a, s, z], 2) + self.slots.val().reshape([1, 1, p + 2, w]) + time;
        let n = t * (p + 2);
        let mut x = x.reshape([b, n, w]);
        let mask = block_causal(t, p + 2, &device)
            .unsqueeze::<4>()
            .expand([b, self.heads, n, n]);
        for block in &self.blocks {
            x = block.forward(x, Some(mask.clone()));
        }
        let x = norm(&self.norm, x).reshape([b, t, p + 2, w]);
        // Residual: a step predicts the change of its frame's latents, so an untrained model
        // already copies the present and training spends itself on what actions change.
        let frames = input
            + self
                .frame_head
                .forward(x.clone().narrow(2, 2, p).reshape([b, t * p, w]));
        let frames = layer_norm_plain(frames).reshape([b, t, p, d]);
        let states = self
            .state_head
            .forward(x.narrow(2, 1, 1).reshape([b, t, w]));
        (frames, states)
    }

    /// One autoregressive step: from the steps so far (`z [B, T, P, D]`, `s [B, T, 4]`) and
    /// the actions (`a [B, >= T, 2 * frameskip]`, step `i`'s action at `i`), the predicted
    /// latents `[B, 1, P, D]` and state `[B, 1, 4]` of step `T`, seeing at most the last
    /// `history` steps (see [`WorldModelConfig::history`]).
    pub fn next_step(
        &self,
        history: usize,
        z: Tensor<4>,
        s: Tensor<3>,
        a: Tensor<3>,
    ) -> (Tensor<4>, Tensor<3>) {
        let len = z.dims()[1];
        let from = len.saturating_sub(history);
        let (zp, sp) = self.forward(
            z.narrow(1, from, len - from),
            s.narrow(1, from, len - from),
            a.narrow(1, from, len - from),
        );
        let last = len - from - 1;
        (zp.narrow(1, last, 1), sp.narrow(1, last, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_hides_the_future_only() {
        let m = block_causal(3, 2, &Device::flex());
        let v: Vec<bool> = m.into_data().try_to_vec::<bool>().unwrap();
        // Row 0 (step 0) sees tokens 0-1, not 2-5; row 5 (step 2) sees all.
        assert_eq!(&v[0..6], &[false, false, true, true, true, true]);
        assert_eq!(&v[30..36], &[false; 6]);
        assert_eq!(&v[12..18], &[false, false, false, false, true, true]);
    }

    #[test]
    fn a_step_does_not_depend_on_later_steps() {
        let cfg = WorldModelConfig::default();
        let device = Device::flex();
        let layout =
            amity_shared::model::flat::ParamLayout::of(&ActionPredictor::new(&cfg, 4, 8, &device));
        let flat = amity_shared::model::flat::init_params(&layout, 3);
        let p =
            amity_shared::model::flat::load_flat(ActionPredictor::new(&cfg, 4, 8, &device), &flat)
                .unwrap();
        let z = Tensor::<4>::random([1, 3, 4, 8], burn::tensor::Distribution::Default, &device);
        let s = Tensor::<3>::zeros([1, 3, 4], &device);
        let a = Tensor::<3>::zeros([1, 3, 2 * cfg.frameskip], &device);
        let (z1, _) = p.forward(z.clone(), s.clone(), a.clone());
        // Change the last step's input: the first step's prediction must not move.
        let z2 = z.clone().slice_assign(
            [0..1, 2..3, 0..4, 0..8],
            Tensor::ones([1, 1, 4, 8], &device),
        );
        let (z2, _) = p.forward(z2, s, a);
        let d: f32 = (z1.clone().narrow(1, 0, 2) - z2.clone().narrow(1, 0, 2))
            .abs()
            .max()
            .into_scalar();
        assert!(d < 1e-5, "{d}");
        let d: f32 = (z1.narrow(1, 2, 1) - z2.narrow(1, 2, 1))
            .abs()
            .max()
            .into_scalar();
        assert!(d > 1e-4);
    }
}
