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
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::{DType, Shape as TensorShape};

use super::{attention, gelu};

/// Differentiable operations Amity implements itself for the CPU backend (`f32` tensors).
#[backend_extension(Flex, Autodiff)]
pub trait AmityOps: Backend {
    /// Exact GELU, `x Φ(x)`.
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `softmax(scale Q Kᵀ) V` over `[batch, heads, tokens, channels]` tensors, no mask.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// What the autodiff implementation of [`AmityOps`] needs from the backend underneath: forward
/// passes that keep what their backward needs, and the backward passes.
pub trait CpuKernels: Backend {
    /// `grad · gelu'(x)`.
    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The attention output and the log-sum-exp of each score row (`[batch, heads, tokens]`).
    fn attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dQ, dK, dV)` from the inputs, the output, its log-sum-exp and the output's gradient.
    fn attention_backward(
        saved: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
}

/// What the attention's backward keeps from its forward.
#[derive(Debug, Clone)]
pub struct AttentionSaved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    scale: f32,
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

/// The attention shape of `[batch, heads, n, d]` queries, keys and values.
fn attention_shape(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
) -> (attention::Shape, [usize; 4]) {
    let (q, k, v) = (q.layout().shape(), k.layout().shape(), v.layout().shape());
    assert!(
        q.num_dims() == 4 && k.num_dims() == 4 && v.num_dims() == 4,
        "attention: 4-d tensors"
    );
    assert!(
        q[0] == k[0]
            && q[1] == k[1]
            && k[0] == v[0]
            && k[1] == v[1]
            && q[3] == k[3]
            && k[2] == v[2],
        "attention: query {q:?}, key {k:?} and value {v:?} do not fit"
    );
    let shape = attention::Shape {
        heads: q[0] * q[1],
        n_q: q[2],
        n_k: k[2],
        d: q[3],
        d_v: v[3],
    };
    (shape, [q[0], q[1], q[2], v[3]])
}

impl AmityOps for Flex {
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        check_f32(&[&x], "gelu");
        map_f32(x, gelu::forward_in_place)
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        Self::attention_with_lse(q, k, v, scale).0
    }
}

impl CpuKernels for Flex {
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

    fn attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        check_f32(&[&q, &k, &v], "attention");
        let (shape, out_dims) = attention_shape(&q, &k, &v);
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let (out, lse) = attention::forward(slice(&q), slice(&k), slice(&v), shape, scale);
        (tensor(out, &out_dims), tensor(lse, &out_dims[..3]))
    }

    fn attention_backward(
        s: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        check_f32(&[&grad], "attention backward");
        let (shape, _) = attention_shape(&s.q, &s.k, &s.v);
        let dims = |t: &FlexTensor| t.layout().shape().to_vec();
        let (q_dims, k_dims, v_dims) = (dims(&s.q), dims(&s.k), dims(&s.v));
        let [q, k, v, out, lse, grad] = [s.q, s.k, s.v, s.out, s.lse, grad].map(contiguous);
        let (dq, dk, dv) = attention::backward(
            (slice(&q), slice(&k), slice(&v)),
            slice(&out),
            slice(&lse),
            slice(&grad),
            shape,
            s.scale,
        );
        [
            tensor(dq, &q_dims),
            tensor(dk, &k_dims),
            tensor(dv, &v_dims),
        ]
    }
}

/// The autodiff node of [`AmityOps::exact_gelu`]; its state is the input.
#[derive(Debug)]
struct ExactGeluBackward;

impl<B: CpuKernels> Backward<B, 1> for ExactGeluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::exact_gelu_backward(x, grad)
        });
    }
}

/// The autodiff node of [`AmityOps::fused_attention`].
#[derive(Debug)]
struct AttentionBackward;

impl<B: CpuKernels> Backward<B, 3> for AttentionBackward {
    type State = AttentionSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let d = B::attention_backward(ops.state, grad);
        for (parent, d) in ops.parents.into_iter().zip(d) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, d);
            }
        }
    }
}

impl<B: AmityOps + CpuKernels, C: CheckpointStrategy> AmityOps for Autodiff<B, C> {
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // Compute-bound: the input is kept for the backward, as burn's own GELU node does.
        match ExactGeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.into_primitive();
                prep.finish(input.clone(), B::exact_gelu(input))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::exact_gelu(x.into_primitive())),
        }
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, lse) = B::attention_with_lse(q.clone(), k.clone(), v.clone(), scale);
                let saved = AttentionSaved {
                    q,
                    k,
                    v,
                    out: out.clone(),
                    lse,
                    scale,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                prep.finish(B::fused_attention(q, k, v, scale))
            }
        }
    }
}
