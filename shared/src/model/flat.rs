//! The flat parameter view: a module's trainable state as one contiguous `Vec<f32>`, and back.
//!
//! Order and layout (stable, documented, relied on by the wire protocol and checkpoints):
//! parameters appear in **module field order** (depth first, `Vec` elements by index), each
//! tensor row-major in its burn shape. A parameter's name is its field path joined by dots,
//! e.g. `encoder.blocks.3.qkv.weight`. `Linear` weights are stored `[in, out]` (burn's layout,
//! the transpose of PyTorch's `nn.Linear.weight`).
//!
//! The federated code ships pseudo-gradients as differences of these vectors, so a round trip
//! must be exact: it is (tested below), since values are copied, never recomputed.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::rng::Rng;

/// One parameter's place in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Dotted field path, e.g. `encoder.blocks.0.qkv.weight`.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Offset of the first value in the flat vector.
    pub offset: usize,
}

impl ParamSpec {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether AdamW applies weight decay to it: matrices yes; biases, norms and other 1-D
    /// parameters no (V-JEPA's rule).
    pub fn decays(&self) -> bool {
        self.shape.len() > 1 && !self.name.ends_with(".bias")
    }
}

/// The order, names and shapes of a module's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    /// One entry per parameter, in flat order.
    pub params: Vec<ParamSpec>,
    /// Total number of values.
    pub total: usize,
}

impl ParamLayout {
    /// The layout of `module`.
    pub fn of<M: Module>(module: &M) -> Self {
        let mut v = LayoutVisitor::default();
        module.visit(&mut v);
        ParamLayout {
            total: v.offset,
            params: v.params,
        }
    }

    /// The spec named `name`.
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

#[derive(Default)]
struct LayoutVisitor {
    path: Vec<String>,
    params: Vec<ParamSpec>,
    offset: usize,
}

impl ModuleVisitor for LayoutVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.lazy_shape().to_vec();
        let len: usize = shape.iter().product();
        self.params.push(ParamSpec {
            name: self.path.join("."),
            shape,
            offset: self.offset,
        });
        self.offset += len;
    }
}

/// Copies every parameter of `module` into one vector, in layout order.
pub fn to_flat<M: Module>(module: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(crate::model::host_f32(param.val()));
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

/// Error from loading a flat vector whose length does not match the module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("flat parameter vector has {got} values, the model needs {want}")]
pub struct LengthMismatch {
    /// Values the model has.
    pub want: usize,
    /// Values given.
    pub got: usize,
}

/// Replaces every parameter of `module` with the values of `flat` (layout order), on the
/// parameter's own device, keeping whether it requires gradients.
pub fn load_flat<M: Module>(module: M, flat: &[f32]) -> Result<M, LengthMismatch> {
    let want = ParamLayout::of(&module).total;
    if flat.len() != want {
        return Err(LengthMismatch {
            want,
            got: flat.len(),
        });
    }
    struct Load<'a> {
        flat: &'a [f32],
        offset: usize,
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let len = shape.num_elements();
            let values = self.flat[self.offset..self.offset + len].to_vec();
            self.offset += len;
            let device = tensor.device();
            let require_grad = tensor.is_require_grad();
            let mut fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
            if require_grad {
                fresh = fresh.require_grad();
            }
            Param::from_mapped_value(id, fresh, mapper)
        }
    }
    Ok(module.map(&mut Load { flat, offset: 0 }))
}

/// Deterministic initial values for a layout, independent of the backend: matrices
/// ~ N(0, 0.02²) truncated at ±2σ (V-JEPA's `trunc_normal_(std=0.02)`), biases and LayerNorm
/// shifts 0, LayerNorm scales 1, the mask token 0.
pub fn init_params(layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut flat = Vec::with_capacity(layout.total);
    for (i, spec) in layout.params.iter().enumerate() {
        let n = spec.len();
        if spec.name.ends_with(".gamma") {
            flat.extend(std::iter::repeat_n(1.0, n));
        } else if spec.name.ends_with(".bias")
            || spec.name.ends_with(".beta")
            || spec.name.ends_with("mask_token")
        {
            flat.extend(std::iter::repeat_n(0.0, n));
        } else {
            let mut rng = Rng::derive(seed, &[0x1417, i as u64]);
            flat.extend((0..n).map(|_| {
                loop {
                    let z = rng.normal();
                    if z.abs() <= 2.0 {
                        break (0.02 * z) as f32;
                    }
                }
            }));
        }
    }
    flat
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Jepa;
    use burn::tensor::Device;

    #[test]
    fn layout_names_are_dotted_paths_in_field_order() {
        let cfg = Config::preset("tiny").unwrap().model;
        let model = Jepa::new(&cfg, &Device::flex());
        let layout = ParamLayout::of(&model);
        assert_eq!(layout.params[0].name, "encoder.patch_embed.weight");
        assert_eq!(layout.params[0].shape, vec![cfg.patch_dim(), 64]);
        assert!(layout.get("encoder.blocks.3.qkv.weight").is_some());
        assert!(layout.get("predictor.mask_token").is_some());
        assert_eq!(layout.params.last().unwrap().name, "predictor.head.bias");
        assert_eq!(layout.total, model.num_params());
        let mut offset = 0;
        for p in &layout.params {
            assert_eq!(p.offset, offset);
            offset += p.len();
        }
    }

    #[test]
    fn flat_round_trip_is_exact() {
        let cfg = Config::preset("tiny").unwrap().model;
        let device = Device::flex().autodiff();
        let model = Jepa::new(&cfg, &device);
        let layout = ParamLayout::of(&model);
        let values = init_params(&layout, 7);
        let model = load_flat(model, &values).unwrap();
        assert_eq!(to_flat(&model), values);
        // Still trainable after loading.
        let mut grads = 0;
        struct Trainable<'a>(&'a mut usize);
        impl ModuleVisitor for Trainable<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                if p.val().is_require_grad() {
                    *self.0 += 1;
                }
            }
        }
        model.visit(&mut Trainable(&mut grads));
        assert_eq!(grads, layout.params.len());
        assert_eq!(
            load_flat(model, &values[1..]).unwrap_err(),
            LengthMismatch {
                want: layout.total,
                got: layout.total - 1
            }
        );
    }

    #[test]
    fn init_is_deterministic_and_follows_the_rules() {
        let cfg = Config::preset("tiny").unwrap().model;
        let layout = ParamLayout::of(&Jepa::new(&cfg, &Device::flex()));
        let a = init_params(&layout, 1);
        assert_eq!(a, init_params(&layout, 1));
        assert_ne!(a, init_params(&layout, 2));
        let g = layout.get("encoder.norm.gamma").unwrap();
        assert!(a[g.offset..g.offset + g.len()].iter().all(|&v| v == 1.0));
        let w = layout.get("encoder.blocks.0.fc1.weight").unwrap();
        let ws = &a[w.offset..w.offset + w.len()];
        assert!(ws.iter().all(|v| v.abs() <= 0.04));
        let std = (ws.iter().map(|v| v * v).sum::<f32>() / ws.len() as f32).sqrt();
        assert!((0.014..0.02).contains(&std), "{std}");
        assert!(w.decays() && !layout.get("encoder.blocks.0.fc1.bias").unwrap().decays());
    }
}
