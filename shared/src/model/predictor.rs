//! The predictor: a narrower ViT that regresses target-token features from context features.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::vit::{Block, LN_EPS, norm};
use super::{posemb, select_rows};
use crate::config::ModelConfig;
use crate::kernels::linear;

/// V-JEPA's predictor: context features projected to the predictor width plus their positions,
/// one learned mask token plus the position of every target, transformer blocks, a norm, and a
/// projection back to the encoder width, read at the targets.
#[derive(Module, Debug)]
pub struct Predictor {
    /// Encoder width → predictor width.
    pub embed: Linear,
    /// The learned mask token `[1, 1, pred_width]`, zero-initialised.
    pub mask_token: Param<Tensor<3>>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Predictor width → encoder width.
    pub head: Linear,
    /// Fixed positions `[N, pred_width]` (a constant, not a parameter).
    pub pos: Tensor<2>,
}

impl Predictor {
    /// A predictor of the config's shape.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let pw = cfg.pred_width;
        let pos = posemb::sincos_3d(cfg.grid(), pw);
        Predictor {
            embed: LinearConfig::new(cfg.width, pw).init(device),
            mask_token: Param::from_tensor(Tensor::zeros([1, 1, pw], device)),
            blocks: (0..cfg.pred_depth)
                .map(|_| Block::new(pw, cfg.pred_heads, cfg.mlp_ratio, device))
                .collect(),
            norm: LayerNormConfig::new(pw).with_epsilon(LN_EPS).init(device),
            head: LinearConfig::new(pw, cfg.width).init(device),
            pos: Tensor::from_data(TensorData::new(pos, [cfg.tokens(), pw]), device),
        }
    }

    /// `context [B, Kc, D]` features at token indices `context_idx [B, Kc]`; predicts the
    /// features at `target_idx [B, Kt]` → `[B, Kt, D]`.
    pub fn forward(
        &self,
        context: Tensor<3>,
        context_idx: Tensor<2, Int>,
        target_idx: Tensor<2, Int>,
    ) -> Tensor<3> {
        let [b, kc, _] = context.dims();
        let [_, kt] = target_idx.dims();
        let pos = self.pos.clone().to_device(&context.device());
        let pw = pos.dims()[1];
        let x = linear(&self.embed, context) + select_rows(pos.clone(), context_idx);
        let m = self.mask_token.val().expand([b, kt, pw]) + select_rows(pos, target_idx);
        let mut z = Tensor::cat(vec![x, m], 1);
        for block in &self.blocks {
            z = block.forward(z, None);
        }
        let z = norm(&self.norm, z).narrow(1, kc, kt);
        linear(&self.head, z)
    }
}
