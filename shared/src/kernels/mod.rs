//! Amity's own CPU kernels, added to burn through its backend extension API.
//!
//! Where the training step's profile (issue #29) shows burn's CPU backend spending time in scalar
//! code, the operation is implemented here, vectorised and threaded, with a hand-written backward:
//!
//! - [`gelu()`]: exact GELU (`x Φ(x)`, as PyTorch's default and V-JEPA's), forward and backward;
//! - [`layer_norm()`]: layer normalisation with its own backward (burn's autodiff composes it
//!   from nine operations);
//! - [`self_attention()`]: multi-head attention straight from the fused `qkv` projection, whose
//!   backward recomputes the scores from the log-sum-exp instead of keeping every head's `N × N`
//!   probabilities;
//! - [`linear()`]: a linear layer as one product over every token of the batch, with the bias
//!   written before the product instead of added after it.
//!
//! The model calls these functions instead of burn's. They run Amity's kernel on the CPU backend
//! (`flex`, with or without autodiff, `f32` tensors) and burn's own operation everywhere else (GPU
//! backends, other dtypes), so results never depend on whether an extension exists for a backend.
//! [`set_kernels`] switches back to burn's operations on the CPU too: `amity bench train-step`
//! uses it to time both in one run.

pub mod attention;
mod extension;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
mod matmul;
mod simd;

use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::{Dispatch, DispatchDevice};
use burn::nn::Linear;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor};

use extension::AmityOps;

/// The vector unit this CPU's kernels run on, by the name of its x86 extension: `avx512f`,
/// `avx2` (with FMA), or `none` (the build target's baseline). For reports such as `amity bench
/// train-step`, whose ratios move with it.
pub fn vector_unit() -> &'static str {
    match simd::simd() {
        simd::Simd::Baseline => "none",
        #[cfg(target_arch = "x86_64")]
        simd::Simd::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        simd::Simd::Avx512 => "avx512f",
    }
}

/// Which implementation the operations of this module run on the CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Amity's kernels (the default).
    Amity,
    /// burn's own operations, as if this module did not exist (the baseline of the bench).
    Burn,
}

static BURN_ONLY: AtomicBool = AtomicBool::new(false);

/// Chooses the implementation for the whole process (a benchmark switch; training is the same
/// computation either way, within `f32` rounding).
pub fn set_kernels(kernels: Kernels) {
    BURN_ONLY.store(kernels == Kernels::Burn, Ordering::Relaxed);
}

/// The implementation in use.
pub fn kernels() -> Kernels {
    if BURN_ONLY.load(Ordering::Relaxed) {
        Kernels::Burn
    } else {
        Kernels::Amity
    }
}

/// Whether Amity's kernels run for `x`: `f32` on the CPU backend, and not switched off.
fn enabled_for<const D: usize>(x: &Tensor<D>) -> bool {
    kernels() == Kernels::Amity
        && x.dtype() == DType::F32
        && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// Exact GELU, `x Φ(x)`, differentiable.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if enabled_for(&x) {
        Tensor::from_dispatch(<Dispatch as AmityOps>::exact_gelu(x.into_dispatch()))
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// `layer`'s transform `x W + b` over the last axis of `x`, differentiable; the same as
/// `layer.forward(x)` within `f32` rounding.
///
/// On the CPU, every leading axis is folded into the rows of one product (burn multiplies clip by
/// clip) and the bias is written before it (burn adds it after, on one thread).
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let (weight, bias) = match &layer.bias {
        Some(bias) if enabled_for(&x) && x.shape().num_elements() > 0 => {
            (layer.weight.val(), bias.val())
        }
        _ => return layer.forward(x),
    };
    if weight.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        return layer.forward(x);
    }
    let mut dims = x.dims();
    let [d_in, d_out] = weight.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "linear: input has {} features, the layer {d_in}",
        dims[D - 1]
    );
    let rows = x.shape().num_elements() / d_in;
    let y = Tensor::<2>::from_dispatch(<Dispatch as AmityOps>::fused_linear(
        x.reshape([rows, d_in]).into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ));
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// Layer normalisation over the last axis, differentiable: `(x - μ) / √(σ² + eps) · gamma + beta`
/// with the biased variance, as `burn::nn::LayerNorm` and PyTorch's.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    if enabled_for(&x) && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32 {
        Tensor::from_dispatch(<Dispatch as AmityOps>::fused_layer_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps as f32,
        ))
    } else {
        burn::tensor::module::layer_norm(x, gamma, Some(beta), eps)
    }
}

/// Multi-head self-attention, differentiable: `qkv` is the fused projection `[batch, tokens,
/// 3 × width]` (queries, keys, values, each `heads × head_dim` channels), the result
/// `softmax(Q Kᵀ / √head_dim + mask) V` with its heads merged, `[batch, tokens, width]`. `mask`
/// is `[batch, heads, tokens, tokens]`, true where a query may not look.
///
/// Unmasked calls run Amity's kernel, which reads `qkv` and writes the merged heads in place;
/// masked ones (the planner's causal predictor) split the heads for burn's attention.
pub fn self_attention(qkv: Tensor<3>, heads: usize, mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
    if mask.is_none() && enabled_for(&qkv) {
        return Tensor::from_dispatch(<Dispatch as AmityOps>::self_attention(
            qkv.into_dispatch(),
            heads,
        ));
    }
    let [b, n, three_d] = qkv.dims();
    let head_dim = three_d / (3 * heads);
    let qkv = qkv.reshape([b, n, 3 * heads, head_dim]).swap_dims(1, 2);
    let mut parts = qkv.chunk(3, 1).into_iter();
    let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
        unreachable!("chunk(3) of a 3 x heads axis gives three parts")
    };
    let o = burn::tensor::module::attention(q, k, v, mask, None, AttentionModuleOptions::default());
    o.swap_dims(1, 2).reshape([b, n, heads * head_dim])
}

/// `n` values uniform in `[-amplitude, amplitude]` from the project's seeded [`crate::rng::Rng`]:
/// the kernels' tests' data (test helper).
#[cfg(test)]
fn values(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..n)
        .map(|_| amplitude * rng.range_f64(-1.0, 1.0) as f32)
        .collect()
}

/// The largest absolute difference between two tensors' values (test helper).
#[cfg(test)]
fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let a = a.into_data().try_to_vec::<f32>().expect("f32 tensor");
    let b = b.into_data().try_to_vec::<f32>().expect("f32 tensor");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn input(device: &Device) -> Tensor<2> {
        let values: Vec<f32> = (0..6 * 50).map(|i| (i as f32 - 150.0) * 0.04).collect();
        Tensor::<1>::from_floats(values.as_slice(), device).reshape([6, 50])
    }

    #[test]
    fn gelu_and_its_gradient_match_burns_exact_gelu() {
        let device = Device::flex().autodiff();
        // Strided input (a transpose) and a downstream weighting, so the gradient is not all ones.
        let w = Tensor::<1>::from_floats(
            (0..300)
                .map(|i| (i % 7) as f32 - 3.0)
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )
        .reshape([50, 6]);
        let run = |ours: bool| {
            let x = input(&device).require_grad();
            let xt = x.clone().transpose();
            let y = if ours {
                gelu(xt)
            } else {
                burn::tensor::activation::gelu(xt)
            };
            let loss = (y.clone() * w.clone()).sum();
            let grads = loss.backward();
            let g = x.grad(&grads).expect("x requires grad");
            (y.inner(), g)
        };
        let (y_ours, g_ours) = run(true);
        let (y_burn, g_burn) = run(false);
        assert!(max_abs_diff(y_ours.transpose(), y_burn.transpose()) < 1e-6);
        assert!(max_abs_diff(g_ours, g_burn) < 4e-6);
    }

    #[test]
    fn f32_tensors_on_the_cpu_backend_take_amitys_kernels() {
        assert!(enabled_for(&input(&Device::flex())));
        assert!(enabled_for(&input(&Device::flex().autodiff())));
        assert!(!enabled_for(&input(&Device::flex()).cast(DType::F64)));
    }

    #[test]
    fn without_autodiff_it_matches_burns_exact_gelu() {
        let device = Device::flex();
        let ours = gelu(input(&device));
        let burns = burn::tensor::activation::gelu(input(&device));
        assert!(max_abs_diff(ours, burns) < 1e-6);
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// burn's attention on the split heads (an all-false mask takes that path and masks
    /// nothing; the process-wide switch is left alone, as other tests run concurrently).
    fn split_reference(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, n, _] = qkv.dims();
        let mask = Tensor::<4>::zeros([b, heads, n, n], &qkv.device()).greater_elem(0.0);
        self_attention(qkv, heads, Some(mask))
    }

    #[test]
    fn attention_and_its_gradients_match_burns() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let qkv0 = Tensor::<3>::random([2, 9, 3 * 3 * 5], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random([2, 9, 15], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let qkv = qkv0.clone().detach().require_grad();
            let o = if ours {
                self_attention(qkv.clone(), 3, None)
            } else {
                split_reference(qkv.clone(), 3)
            };
            let grads = (o.clone() * w.clone()).sum().backward();
            (o.inner(), qkv.grad(&grads).expect("qkv requires grad"))
        };
        let (o_ours, g_ours) = run(true);
        let (o_burn, g_burn) = run(false);
        assert!(max_abs_diff(o_ours, o_burn) < 2e-6);
        assert!(max_abs_diff(g_ours, g_burn) < 2e-5);
    }

    #[test]
    fn without_autodiff_attention_matches_burns() {
        let device = Device::flex();
        device.seed(8);
        let qkv = Tensor::<3>::random([1, 7, 3 * 2 * 4], Distribution::Normal(0.0, 2.0), &device);
        let ours = self_attention(qkv.clone(), 2, None);
        assert!(max_abs_diff(ours, split_reference(qkv, 2)) < 2e-6);
    }
}

#[cfg(test)]
mod layer_norm_tests {
    use super::*;
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn layer_norm_and_its_gradients_match_burns_module() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let mut norm = LayerNormConfig::new(24).with_epsilon(1e-6).init(&device);
        // Non-trivial gamma and beta, so that their gradients and their use are both checked.
        norm.gamma = norm.gamma.map(|g| {
            g.random_like(Distribution::Uniform(0.5, 1.5))
                .require_grad()
        });
        norm.beta = norm
            .beta
            .map(|b| b.map(|b| b.random_like(Distribution::Normal(0.0, 1.0)).require_grad()));
        let x0 = Tensor::<3>::random([3, 70, 24], Distribution::Normal(1.0, 2.0), &device);
        let w = Tensor::<3>::random([3, 70, 24], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let x = x0.clone().detach().require_grad();
            let (gamma, beta) = (
                norm.gamma.val(),
                norm.beta.as_ref().map(|b| b.val()).expect("bias"),
            );
            let y = if ours {
                layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-6)
            } else {
                norm.forward(x.clone())
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            let get = |t: Tensor<1>| t.grad(&grads).expect("requires grad").into_data();
            (
                y.inner().into_data(),
                x.grad(&grads).expect("requires grad").into_data(),
                get(gamma),
                get(beta),
            )
        };
        let ours = run(true);
        let burns = run(false);
        let tol = burn::tensor::Tolerance::<f32>::absolute(5e-5);
        ours.0.assert_approx_eq::<f32>(&burns.0, tol);
        ours.1.assert_approx_eq::<f32>(&burns.1, tol);
        ours.2
            .assert_approx_eq::<f32>(&burns.2, burn::tensor::Tolerance::<f32>::absolute(5e-4));
        ours.3
            .assert_approx_eq::<f32>(&burns.3, burn::tensor::Tolerance::<f32>::absolute(5e-4));
    }
}

#[cfg(test)]
mod linear_tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution, Tolerance};

    /// `[y, dx, dW, db]` through Amity's kernel or burn's module; `dx` is absent when the input
    /// wants no gradient (as the patches the first layer reads).
    fn run(
        layer: &Linear,
        x0: &Tensor<3>,
        w: &Tensor<3>,
        ours: bool,
        x_grad: bool,
    ) -> Vec<Option<burn::tensor::TensorData>> {
        let x = if x_grad {
            x0.clone().detach().require_grad()
        } else {
            x0.clone().detach()
        };
        let y = if ours {
            linear(layer, x.clone())
        } else {
            layer.forward(x.clone())
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        let bias = layer.bias.as_ref().expect("a bias").val();
        vec![
            Some(y.inner().into_data()),
            x.grad(&grads).map(|g| g.into_data()),
            layer.weight.val().grad(&grads).map(|g| g.into_data()),
            bias.grad(&grads).map(|g| g.into_data()),
        ]
    }

    #[test]
    fn linear_and_its_gradients_match_burns_module() {
        let device = Device::flex().autodiff();
        device.seed(12);
        // 64 rows per clip: burn takes its per-clip product path; ours folds the clips.
        let layer = LinearConfig::new(40, 72).init(&device);
        let x0 = Tensor::<3>::random([3, 64, 40], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random([3, 64, 72], Distribution::Normal(0.0, 1.0), &device);
        for x_grad in [true, false] {
            let ours = run(&layer, &x0, &w, true, x_grad);
            let burns = run(&layer, &x0, &w, false, x_grad);
            for (i, (o, b)) in ours.iter().zip(&burns).enumerate() {
                match (o, b) {
                    (Some(o), Some(b)) => o.assert_approx_eq::<f32>(b, Tolerance::absolute(2e-4)),
                    (None, None) => assert!(i == 1 && !x_grad, "gradient {i} missing"),
                    _ => panic!("gradient {i} is present on one side only"),
                }
            }
        }
    }

    #[test]
    fn without_autodiff_linear_matches_burns_module_at_any_rank() {
        let device = Device::flex();
        device.seed(13);
        let layer = LinearConfig::new(5, 3).init(&device);
        let x = Tensor::<4>::random([2, 3, 4, 5], Distribution::Normal(0.0, 1.0), &device);
        let tol = Tolerance::<f32>::absolute(1e-5);
        linear(&layer, x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&layer.forward(x).into_data(), tol);
        let v = Tensor::<1>::random([5], Distribution::Normal(0.0, 1.0), &device);
        linear(&layer, v.clone())
            .into_data()
            .assert_approx_eq::<f32>(&layer.forward(v).into_data(), tol);
    }
}
