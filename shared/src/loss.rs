//! The objectives: V-JEPA's L1 regression and VICReg's variance-invariance-covariance terms.

use burn::tensor::Tensor;
use burn::tensor::activation::relu;

/// Mean absolute error between predicted and target features (V-JEPA's loss).
pub fn l1(pred: Tensor<3>, target: Tensor<3>) -> Tensor<1> {
    (pred - target).abs().mean()
}

/// The three VICReg terms, unweighted, and their weighted sum.
#[derive(Debug, Clone)]
pub struct Vicreg {
    /// `w_inv · inv + w_var · var + w_cov · cov`.
    pub total: Tensor<1>,
    /// Mean squared error between the two views.
    pub invariance: Tensor<1>,
    /// Hinge on each dimension's standard deviation (gamma 1), averaged over both views.
    pub variance: Tensor<1>,
    /// Squared off-diagonal covariances over the dimension, summed over both views.
    pub covariance: Tensor<1>,
}

/// VICReg (Bardes, Ponce, LeCun 2022) on two batches of embeddings `[B, D]`, with weights
/// `[invariance, variance, covariance]` (the paper's: 25, 25, 1).
pub fn vicreg(a: Tensor<2>, b: Tensor<2>, weights: [f64; 3]) -> Vicreg {
    let invariance = (a.clone() - b.clone()).powi_scalar(2).mean();
    let (va, ca) = var_cov_terms(a);
    let (vb, cb) = var_cov_terms(b);
    let variance = (va + vb) / 2.0;
    let covariance = ca + cb;
    let total = invariance.clone() * weights[0]
        + variance.clone() * weights[1]
        + covariance.clone() * weights[2];
    Vicreg {
        total,
        invariance,
        variance,
        covariance,
    }
}

/// `mean(relu(1 - sqrt(var + 1e-4)))` and `sum(offdiag(cov)^2) / D` of one view.
fn var_cov_terms(x: Tensor<2>) -> (Tensor<1>, Tensor<1>) {
    let [n, d] = x.dims();
    let centred = x.clone() - x.mean_dim(0);
    let denom = (n.max(2) - 1) as f64;
    let var = centred.clone().powi_scalar(2).sum_dim(0) / denom; // [1, D]
    let std = (var.clone() + 1e-4).sqrt();
    let variance = relu(-std + 1.0).mean();
    let cov = centred.clone().transpose().matmul(centred) / denom; // [D, D]
    let off = cov.powi_scalar(2).sum() - var.powi_scalar(2).sum();
    (variance, off / d as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), &Device::flex())
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar()
    }

    #[test]
    fn l1_by_hand() {
        let d = Device::flex();
        let p =
            Tensor::<3>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0, 0.5], [1, 2, 2]), &d);
        let t = Tensor::<3>::from_data(TensorData::new(vec![0.0f32, 0.0, 1.0, 1.0], [1, 2, 2]), &d);
        // |1| + |-2| + |2| + |-0.5| = 5.5, mean 1.375
        assert!((scalar(l1(p, t)) - 1.375).abs() < 1e-6);
    }

    #[test]
    fn vicreg_by_hand() {
        // View a: two samples of two dims; view b: a shifted by one in dim 0.
        let a = t2(vec![0.0, 0.0, 2.0, 2.0], [2, 2]);
        let b = t2(vec![1.0, 0.0, 3.0, 2.0], [2, 2]);
        let v = vicreg(a, b, [25.0, 25.0, 1.0]);
        // invariance: squared errors [1, 0, 1, 0] -> mean 0.5
        assert!((scalar(v.invariance.clone()) - 0.5).abs() < 1e-6);
        // per-dim variance (n-1 = 1): ((-1)^2 + 1^2) / 1 = 2; std = sqrt(2.0001)
        let hinge = (1.0f32 - 2.0001f32.sqrt()).max(0.0);
        assert!((scalar(v.variance.clone()) - hinge).abs() < 1e-6);
        // covariance: centred [[-1,-1],[1,1]] -> cov [[2,2],[2,2]]; off-diagonal 2*4 = 8,
        // / D = 4 per view, two views identical in shape -> 8
        assert!((scalar(v.covariance.clone()) - 8.0).abs() < 1e-5);
        assert!((scalar(v.total) - (25.0 * 0.5 + 25.0 * hinge + 8.0)).abs() < 1e-4);
    }

    #[test]
    fn collapsed_embeddings_pay_the_variance_hinge() {
        let a = t2(vec![1.0; 8], [4, 2]);
        let v = vicreg(a.clone(), a, [25.0, 25.0, 1.0]);
        let expect = 1.0 - 1e-4f32.sqrt();
        assert!((scalar(v.variance) - expect).abs() < 1e-5);
        assert!(scalar(v.invariance).abs() < 1e-9);
    }
}
