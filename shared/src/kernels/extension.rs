//! The backend extension that carries Amity's kernels: the trait, its CPU (`Flex`) implementation
//! and its autodiff implementation with hand-written backward passes.
//!
//! burn's `#[backend_extension]` generates the routing from the run-time `Dispatch` backend to
//! these implementations. Only `Flex` and `Autodiff<Flex>` are routed: calling an extension on an
//! unlisted backend panics, so `super::enabled_for` keeps other backends on burn's operations.
//! The backward passes live on [`CpuKernels`], a plain trait of the CPU backend that the autodiff
//! implementation calls, so that no second-order gradient is ever promised.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::{DType, Shape as TensorShape};

use super::{attention, gelu, layer_norm, linear};

/// Differentiable operations Amity implements itself for the CPU backend (`f32` tensors).
#[backend_extension(Flex, Autodiff)]
pub trait AmityOps: Backend {
    /// Exact GELU, `x Φ(x)`.
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Unmasked multi-head self-attention from a fused projection `qkv` (`[batch, tokens,
    /// 3 × width]`, query, key, value, each `heads × head_dim`) to `[batch, tokens, width]`.
    fn self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
    /// Layer normalisation over the last axis, `(x - μ) / √(σ² + eps) · gamma + beta`.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
    /// The linear layer `x W + b`: `x` `[rows, d_in]`, `W` `[d_in, d_out]`, `b` `[d_out]`.
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// What the autodiff implementation of [`AmityOps`] needs from the backend underneath: forward
/// passes that keep what their backward needs, and the backward passes.
pub trait CpuKernels: Backend {
    /// `grad · gelu'(x)`.
    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`AmityOps::self_attention`] and the log-sum-exp of each score row (`[batch, heads,
    /// tokens]`).
    fn self_attention_with_lse(
        qkv: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// [`AmityOps::fused_layer_norm`] and each row's mean and `1/√(σ² + eps)` (`[rows, 2]`).
    fn layer_norm_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dγ, dβ)` from what the forward kept and the output's gradient.
    fn layer_norm_backward(
        saved: LayerNormSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
    /// The gradient of `qkv` from what the forward kept and the output's gradient.
    fn self_attention_backward(
        saved: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// The wanted ones of `(dx, dW, db)` from the forward's `x` and `W` and the output's gradient.
    fn linear_backward(
        saved: LinearSaved<Self>,
        grad: FloatTensor<Self>,
        wanted: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3];
}

/// What the linear layer's backward keeps from its forward.
#[derive(Debug, Clone)]
pub struct LinearSaved<B: Backend> {
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
}

/// What the attention's backward keeps from its forward.
#[derive(Debug, Clone)]
pub struct AttentionSaved<B: Backend> {
    qkv: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    heads: usize,
}

/// What the layer norm's backward keeps from its forward.
#[derive(Debug, Clone)]
pub struct LayerNormSaved<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    stats: FloatTensor<B>,
}

/// `x`'s elements in logical order, as one slice (copied only if `x` is strided).
fn contiguous(x: FlexTensor) -> FlexTensor {
    if x.layout().contiguous_offsets().is_some() {
        x
    } else {
        x.to_contiguous()
    }
}

fn slice(x: &FlexTensor) -> &[f32] {
    let Some((start, end)) = x.layout().contiguous_offsets() else {
        unreachable!("slice() of a strided tensor: call contiguous() first")
    };
    &x.storage::<f32>()[start..end]
}

/// Runs `f` on the elements of `x` in place (copying first only if `x` is shared or strided).
fn map_f32(x: FlexTensor, f: impl FnOnce(&mut [f32])) -> FlexTensor {
    let mut x = contiguous(x);
    let Some((start, end)) = x.layout().contiguous_offsets() else {
        unreachable!("contiguous() returned a strided tensor")
    };
    f(&mut x.storage_mut::<f32>()[start..end]);
    x
}

fn tensor(values: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::from_data(burn::tensor::TensorData::new(
        values,
        TensorShape::from(dims.to_vec()),
    ))
}

fn check_f32(tensors: &[&FlexTensor], op: &str) {
    for t in tensors {
        assert_eq!(
            t.dtype(),
            DType::F32,
            "{op}: Amity's CPU kernels take f32 tensors"
        );
    }
}

/// The attention shape of a `[batch, tokens, 3 × width]` `qkv` tensor, and its scale `1/√head_dim`.
fn attention_shape(qkv: &FlexTensor, heads: usize) -> (attention::Shape, f32) {
    let dims = qkv.layout().shape();
    assert!(
        dims.num_dims() == 3 && heads > 0 && dims[2].is_multiple_of(3 * heads),
        "self-attention: qkv {dims:?} is not [batch, tokens, 3 x {heads} heads x head_dim]"
    );
    let head_dim = dims[2] / (3 * heads);
    let shape = attention::Shape {
        batch: dims[0],
        tokens: dims[1],
        heads,
        head_dim,
    };
    (shape, 1.0 / (head_dim as f32).sqrt())
}

impl AmityOps for Flex {
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        check_f32(&[&x], "gelu");
        map_f32(x, gelu::forward_in_place)
    }

    fn self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        Self::self_attention_with_lse(qkv, heads).0
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        Self::layer_norm_with_stats(x, gamma, beta, eps).0
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        check_f32(&[&x, &weight, &bias], "linear");
        let dims = linear_dims(&x, &weight);
        let [x, weight, bias] = [x, weight, bias].map(contiguous);
        let y = linear::forward(slice(&x), slice(&weight), slice(&bias), dims);
        tensor(y, &[dims.rows, dims.d_out])
    }
}

/// The sizes of a linear layer call on `x` `[rows, d_in]` and `weight` `[d_in, d_out]`.
fn linear_dims(x: &FlexTensor, weight: &FlexTensor) -> linear::Dims {
    let (xs, ws) = (x.layout().shape(), weight.layout().shape());
    assert!(
        xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0],
        "linear: x {xs:?} and weight {ws:?} do not chain"
    );
    linear::Dims {
        rows: xs[0],
        d_in: xs[1],
        d_out: ws[1],
    }
}

impl CpuKernels for Flex {
    fn layer_norm_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        check_f32(&[&x, &gamma, &beta], "layer norm");
        let dims = x.layout().shape().to_vec();
        let [x, gamma, beta] = [x, gamma, beta].map(contiguous);
        let (y, stats) = layer_norm::forward(slice(&x), slice(&gamma), slice(&beta), eps);
        let rows = stats.len() / 2;
        (tensor(y, &dims), tensor(stats, &[rows, 2]))
    }

    fn layer_norm_backward(
        s: LayerNormSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        check_f32(&[&grad], "layer norm backward");
        let dims = s.x.layout().shape().to_vec();
        let d = s.gamma.layout().shape().num_elements();
        let [x, gamma, stats, grad] = [s.x, s.gamma, s.stats, grad].map(contiguous);
        let (dx, dg, db) =
            layer_norm::backward(slice(&x), slice(&gamma), slice(&stats), slice(&grad));
        [tensor(dx, &dims), tensor(dg, &[d]), tensor(db, &[d])]
    }

    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        check_f32(&[&x, &grad], "gelu backward");
        assert_eq!(
            x.layout().shape(),
            grad.layout().shape(),
            "gelu backward: shapes differ"
        );
        let x = contiguous(x);
        map_f32(grad, |g| gelu::backward_in_place(slice(&x), g))
    }

    fn self_attention_with_lse(
        qkv: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        check_f32(&[&qkv], "self-attention");
        let (shape, scale) = attention_shape(&qkv, heads);
        let qkv = contiguous(qkv);
        let (out, lse) = attention::forward(slice(&qkv), shape, scale);
        let width = heads * shape.head_dim;
        (
            tensor(out, &[shape.batch, shape.tokens, width]),
            tensor(lse, &[shape.batch, heads, shape.tokens]),
        )
    }

    fn self_attention_backward(
        s: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        check_f32(&[&grad], "self-attention backward");
        let (shape, scale) = attention_shape(&s.qkv, s.heads);
        let dims = s.qkv.layout().shape().to_vec();
        let [qkv, out, lse, grad] = [s.qkv, s.out, s.lse, grad].map(contiguous);
        let d = attention::backward(
            slice(&qkv),
            slice(&out),
            slice(&lse),
            slice(&grad),
            shape,
            scale,
        );
        tensor(d, &dims)
    }

    fn linear_backward(
        s: LinearSaved<Self>,
        grad: FloatTensor<Self>,
        [x, weight, bias]: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        check_f32(&[&grad], "linear backward");
        let dims = linear_dims(&s.x, &s.weight);
        let [xs, w, grad] = [s.x, s.weight, grad].map(contiguous);
        let wanted = linear::Wanted { x, weight, bias };
        let g = linear::backward(slice(&xs), slice(&w), slice(&grad), dims, wanted);
        [
            g.x.map(|d| tensor(d, &[dims.rows, dims.d_in])),
            g.weight.map(|d| tensor(d, &[dims.d_in, dims.d_out])),
            g.bias.map(|d| tensor(d, &[dims.d_out])),
        ]
    }
}

/// The autodiff node of a kernel: its backward is one [`CpuKernels`] call from the saved state `S`
/// and the output's gradient to the gradients of the `N` inputs.
struct KernelBackward<B: Backend, S, const N: usize>(BackwardFn<B, S, N>);

/// A kernel's backward: from the saved state, the output's gradient and which inputs want a
/// gradient (an input without one, such as the patches the first layer reads, costs nothing), the
/// inputs' gradients.
type BackwardFn<B, S, const N: usize> =
    fn(S, FloatTensor<B>, [bool; N]) -> [Option<FloatTensor<B>>; N];

impl<B: Backend, S, const N: usize> std::fmt::Debug for KernelBackward<B, S, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelBackward")
    }
}

impl<B: Backend, S: Clone + Send + std::fmt::Debug + 'static, const N: usize> Backward<B, N>
    for KernelBackward<B, S, N>
{
    type State = S;

    fn backward(self, ops: Ops<S, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let wanted = ops.parents.each_ref().map(Option::is_some);
        for (parent, d) in ops
            .parents
            .into_iter()
            .zip((self.0)(ops.state, grad, wanted))
        {
            if let (Some(parent), Some(d)) = (parent, d) {
                grads.register::<B>(parent.id, d);
            }
        }
    }
}

/// Records a kernel on the autodiff graph (`C`, the checkpoint strategy, is named by the caller:
/// the tensors do not carry it). It is compute-bound: what its backward needs is kept
/// (as burn's own GELU node keeps its input), never recomputed. `tracked` computes the output
/// and that state when a gradient is wanted, `untracked` the output alone otherwise.
fn record<B, C, S, const N: usize>(
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    backward: BackwardFn<B, S, N>,
    tracked: impl FnOnce([FloatTensor<B>; N]) -> (S, FloatTensor<B>),
    untracked: impl FnOnce([FloatTensor<B>; N]) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    let nodes = inputs.each_ref().map(|t| t.node());
    let prep = KernelBackward(backward)
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful();
    let primitives = inputs.map(|t| t.into_primitive());
    match prep {
        OpsKind::Tracked(prep) => {
            let (state, out) = tracked(primitives);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(untracked(primitives)),
    }
}

impl<B: AmityOps + CpuKernels, C: CheckpointStrategy> AmityOps for Autodiff<B, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        record::<B, C, _, 3>(
            [x, gamma, beta],
            |saved, grad, _| B::layer_norm_backward(saved, grad).map(Some),
            |[x, gamma, beta]| {
                let (y, stats) = B::layer_norm_with_stats(x.clone(), gamma.clone(), beta, eps);
                (LayerNormSaved { x, gamma, stats }, y)
            },
            |[x, gamma, beta]| B::fused_layer_norm(x, gamma, beta, eps),
        )
    }

    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C, _, 1>(
            [x],
            |x, grad, _| [Some(B::exact_gelu_backward(x, grad))],
            |[x]| (x.clone(), B::exact_gelu(x)),
            |[x]| B::exact_gelu(x),
        )
    }

    fn self_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        record::<B, C, _, 1>(
            [qkv],
            |saved, grad, _| [Some(B::self_attention_backward(saved, grad))],
            |[qkv]| {
                let (out, lse) = B::self_attention_with_lse(qkv.clone(), heads);
                let saved = AttentionSaved {
                    qkv,
                    out: out.clone(),
                    lse,
                    heads,
                };
                (saved, out)
            },
            |[qkv]| B::self_attention(qkv, heads),
        )
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        record::<B, C, _, 3>(
            [x, weight, bias],
            B::linear_backward,
            |[x, weight, bias]| {
                let y = B::fused_linear(x.clone(), weight.clone(), bias);
                (LinearSaved { x, weight }, y)
            },
            |[x, weight, bias]| B::fused_linear(x, weight, bias),
        )
    }
}
