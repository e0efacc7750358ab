//! The V-JEPA model: a ViT encoder over video tubelets and a narrower predictor.
//!
//! Files, in reading order: [`tubelet`] (clips to patch vectors, host side), [`posemb`] (3-D
//! sin-cos positions), [`vit`] (the transformer block), [`encoder`], [`predictor`], and here the
//! [`Jepa`] pair that training, checkpoints and the flat parameter view work on.

pub mod encoder;
pub mod flat;
pub mod posemb;
pub mod predictor;
pub mod tubelet;
pub mod vit;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

use crate::config::ModelConfig;
pub use encoder::Encoder;
pub use predictor::Predictor;

/// The trainable state: the context encoder and the predictor. The EMA target encoder is a
/// separate [`Encoder`] with the same layout (see [`crate::ema`]).
///
/// Field order is the parameter order of the flat view and of checkpoints: do not reorder.
#[derive(Module, Debug)]
pub struct Jepa {
    /// The context encoder (becomes the released encoder through its EMA).
    pub encoder: Encoder,
    /// The predictor, regressing target features from context features.
    pub predictor: Predictor,
}

impl Jepa {
    /// A model of the given shape on `device`. Weights are placeholders until
    /// [`crate::model::flat::init_params`] (or a checkpoint) sets them deterministically.
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        Jepa {
            encoder: Encoder::new(config, device),
            predictor: Predictor::new(config, device),
        }
    }

    /// Predicted features of the target tokens from the context tokens:
    /// `patches [B, N, P]`, `context`/`target` token indices `[B, Kc]`/`[B, Kt]` → `[B, Kt, D]`.
    pub fn predict(
        &self,
        patches: Tensor<3>,
        context: Tensor<2, Int>,
        target: Tensor<2, Int>,
    ) -> Tensor<3> {
        let z = self.encoder.forward(patches, Some(context.clone()));
        self.predictor.forward(z, context, target)
    }
}

/// Gathers tokens: `x [B, N, D]`, `idx [B, K]` → `[B, K, D]`.
///
/// Whole rows are selected from `x` seen as `[B·N, D]` (row `b·N + idx[b, k]`): a row copy each
/// way, where a `gather` along axis 1 indexes, and its backward scatters, every element (10% of
/// the tiny step's instructions under callgrind).
pub fn gather_tokens(x: Tensor<3>, idx: Tensor<2, Int>) -> Tensor<3> {
    let [b, n, d] = x.dims();
    let [_, k] = idx.dims();
    let first_row = Tensor::<1, Int>::arange(0..b as i64, &idx.device()).mul_scalar(n as i64);
    let rows = (idx + first_row.unsqueeze_dim::<2>(1)).reshape([b * k]);
    x.reshape([b * n, d]).select(0, rows).reshape([b, k, d])
}

/// Rows of a shared table: `table [N, D]`, `idx [B, K]` → `[B, K, D]`.
pub fn select_rows(table: Tensor<2>, idx: Tensor<2, Int>) -> Tensor<3> {
    let [b, k] = idx.dims();
    let [_, d] = table.dims();
    table.select(0, idx.reshape([b * k])).reshape([b, k, d])
}

/// Layer norm over the last dimension without affine parameters (V-JEPA's target transform).
pub fn layer_norm_plain(x: Tensor<3>) -> Tensor<3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean) / (var + 1e-6).sqrt()
}

/// Copies a float tensor to the host as `f32` (whatever the backend's float type).
pub fn host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("float tensors convert to f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn gather_tokens_picks_each_clips_rows_and_routes_their_gradients_back() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let x =
            Tensor::<3>::random([3, 6, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let idx =
            Tensor::<2, Int>::from_data(TensorData::from([[5i64, 0], [2, 2], [1, 4]]), &device);
        let got = gather_tokens(x.clone(), idx.clone());
        let want = x
            .clone()
            .gather(1, idx.unsqueeze_dim::<3>(2).expand([3, 2, 4]));
        got.clone()
            .into_data()
            .assert_eq(&want.clone().into_data(), true);
        let (g_got, g_want) = (got.sum().backward(), want.sum().backward());
        let (a, b) = (
            x.grad(&g_got).expect("grad"),
            x.grad(&g_want).expect("grad"),
        );
        a.into_data().assert_eq(&b.into_data(), true);
    }
}
