//! The exponential moving average that turns the context encoder into the target encoder.
//!
//! `target ← m · target + (1 − m) · online`, parameter by parameter, with no gradients. The
//! two modules are paired by layout order (same type, same shapes), so a target loaded from a
//! checkpoint pairs with a freshly built online encoder.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// One EMA update of `target` towards `online` with momentum `m`.
///
/// # Panics
/// If the two modules do not have the same parameter layout (a programming error: they are
/// always built from one config).
pub fn ema_update<M: Module>(target: M, online: &M, m: f64) -> M {
    struct Collect(Vec<Tensor<1>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let t = p.val().inner();
            let n = t.shape().num_elements();
            self.0.push(t.reshape([n]));
        }
    }
    let mut online_params = Collect(Vec::new());
    online.visit(&mut online_params);

    struct Update {
        online: std::vec::IntoIter<Tensor<1>>,
        m: f64,
    }
    impl ModuleMapper for Update {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, t, mapper) = param.consume();
            let o = self.online.next().expect("EMA pair has the same layout");
            let shape = t.shape();
            let o = o.reshape(shape).to_device(&t.device());
            let updated = t * self.m + o * (1.0 - self.m);
            Param::from_mapped_value(id, updated, mapper)
        }
    }
    target.map(&mut Update {
        online: online_params.0.into_iter(),
        m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, TensorData};

    fn linear_with(w: [f32; 2], b: f32, device: &Device) -> Linear {
        let mut l = LinearConfig::new(2, 1).init(device);
        l.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(w.to_vec(), [2, 1]),
            device,
        ));
        l.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![b], [1]),
            device,
        )));
        l
    }

    #[test]
    fn ema_maths_on_a_toy_module() {
        let device = Device::flex();
        let target = linear_with([1.0, 2.0], 3.0, &device);
        let online = linear_with([3.0, 6.0], -1.0, &device);
        let out = ema_update(target, &online, 0.75);
        let w: Vec<f32> = out.weight.val().into_data().try_to_vec_as::<f32>().unwrap();
        let b: Vec<f32> = out
            .bias
            .unwrap()
            .val()
            .into_data()
            .try_to_vec_as::<f32>()
            .unwrap();
        // 0.75 * [1, 2] + 0.25 * [3, 6] = [1.5, 3.0]; 0.75 * 3 + 0.25 * -1 = 2.0
        assert_eq!(w, vec![1.5, 3.0]);
        assert_eq!(b, vec![2.0]);
    }

    #[test]
    fn momentum_one_keeps_the_target() {
        let device = Device::flex();
        let target = linear_with([1.0, 2.0], 3.0, &device);
        let online = linear_with([9.0, 9.0], 9.0, &device);
        let out = ema_update(target, &online, 1.0);
        let w: Vec<f32> = out.weight.val().into_data().try_to_vec_as::<f32>().unwrap();
        assert_eq!(w, vec![1.0, 2.0]);
    }
}
