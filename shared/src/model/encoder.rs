//! The ViT encoder over video tubelets.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::vit::{Block, LN_EPS, norm};
use super::{gather_tokens, posemb, select_rows};
use crate::config::ModelConfig;
use crate::kernels::linear;

/// Tubelet embedding, fixed 3-D sin-cos positions, pre-norm blocks, final LayerNorm.
#[derive(Module, Debug)]
pub struct Encoder {
    /// Linear tubelet embedding `[patch_dim, width]` (a `Conv3d` with kernel = stride).
    pub patch_embed: Linear,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Fixed positions `[N, width]` (a constant, not a parameter).
    pub pos: Tensor<2>,
}

impl Encoder {
    /// An encoder of the config's shape.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Self {
        let pos = posemb::sincos_3d(cfg.grid(), cfg.width);
        Encoder {
            patch_embed: LinearConfig::new(cfg.patch_dim(), cfg.width).init(device),
            blocks: (0..cfg.depth)
                .map(|_| Block::new(cfg.width, cfg.heads, cfg.mlp_ratio, device))
                .collect(),
            norm: LayerNormConfig::new(cfg.width)
                .with_epsilon(LN_EPS)
                .init(device),
            pos: Tensor::from_data(TensorData::new(pos, [cfg.tokens(), cfg.width]), device),
        }
    }

    /// Features of the kept tokens: `patches [B, N, P]`, `keep [B, K]` (all tokens when `None`)
    /// → `[B, K, D]`.
    pub fn forward(&self, patches: Tensor<3>, keep: Option<Tensor<2, Int>>) -> Tensor<3> {
        let [b, n, _] = patches.dims();
        let pos = self.pos.clone().to_device(&patches.device());
        // Embedding is per token, so gathering first saves the work on dropped tokens.
        let mut x = match keep {
            Some(idx) => {
                linear(&self.patch_embed, gather_tokens(patches, idx.clone()))
                    + select_rows(pos, idx)
            }
            None => {
                let d = pos.dims()[1];
                linear(&self.patch_embed, patches) + pos.reshape([1, n, d]).expand([b, n, d])
            }
        };
        for block in &self.blocks {
            x = block.forward(x, None);
        }
        norm(&self.norm, x)
    }
}
