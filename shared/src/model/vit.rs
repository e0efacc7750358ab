//! The pre-norm transformer block shared by the encoder and the predictor.
//!
//! `x + proj(attn(norm1(x)))`, then `x + fc2(gelu(fc1(norm2(x))))`. Query, key and value come
//! from one fused linear layer. Linear layers, norms, attention and GELU are [`crate::kernels`]'
//! (Amity's own on the CPU, burn's elsewhere).

use crate::kernels::{gelu, layer_norm, linear, self_attention};
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Bool, Device, Tensor};

/// LayerNorm epsilon used everywhere (V-JEPA's 1e-6).
pub const LN_EPS: f64 = 1e-6;

/// `norm(x)` through [`crate::kernels::layer_norm`]. Every `LayerNorm` of the model is built with
/// [`LN_EPS`] (burn keeps a module's epsilon private, so it is passed here).
pub fn norm<const D: usize>(norm: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    match &norm.beta {
        Some(beta) => layer_norm(x, norm.gamma.val(), beta.val(), LN_EPS),
        None => norm.forward(x),
    }
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Fused query/key/value projection, `[width, 3 * width]`.
    pub qkv: Linear,
    /// Attention output projection.
    pub proj: Linear,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP expansion.
    pub fc1: Linear,
    /// MLP contraction.
    pub fc2: Linear,
    /// Attention heads (not a parameter).
    pub heads: usize,
}

impl Block {
    /// A block of `width` channels, `heads` heads and an MLP of `mlp_ratio * width`.
    pub fn new(width: usize, heads: usize, mlp_ratio: usize, device: &Device) -> Self {
        let ln = || {
            LayerNormConfig::new(width)
                .with_epsilon(LN_EPS)
                .init(device)
        };
        Block {
            norm1: ln(),
            qkv: LinearConfig::new(width, 3 * width).init(device),
            proj: LinearConfig::new(width, width).init(device),
            norm2: ln(),
            fc1: LinearConfig::new(width, mlp_ratio * width).init(device),
            fc2: LinearConfig::new(mlp_ratio * width, width).init(device),
            heads,
        }
    }

    /// `[B, N, D]` → `[B, N, D]`, with an optional attention mask `[B, H, N, N]` (true = blocked).
    pub fn forward(&self, x: Tensor<3>, mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
        let qkv = linear(&self.qkv, norm(&self.norm1, x.clone()));
        let o = self_attention(qkv, self.heads, mask);
        let x = x + linear(&self.proj, o);
        let h = gelu(linear(&self.fc1, norm(&self.norm2, x.clone())));
        let m = linear(&self.fc2, h);
        x + m
    }
}
