//! The objectives: V-JEPA's L1 regression, VICReg's variance-invariance-covariance terms and
//! LeJEPA's SIGReg.

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

/// Points of SIGReg's integral over `t`: 17 from -5 to 5 (LeJEPA's).
const SIGREG_POINTS: usize = 17;
const SIGREG_T_MAX: f64 = 5.0;

/// SIGReg (Balestriero & LeCun 2025, LeJEPA): how far embeddings `z` (`[N, D]`) are from an
/// isotropic standard Gaussian, measured along the unit `directions` (`[D, M]`, the sketch).
///
/// Each slice `z · a` is compared with N(0, 1) by the Epps-Pulley statistic: the squared
/// distance between its empirical characteristic function `mean(exp(i t x))` and the Gaussian's
/// `exp(-t²/2)`, weighted by `exp(-t²/2)` and integrated (trapezoid) over `t` in [-5, 5],
/// times `N`; the loss is the mean over slices. By Cramér-Wold, matching every 1-D projection
/// matches the distribution, so minimising it pushes the embeddings towards an isotropic
/// Gaussian, which rules out collapse without a teacher or a stop-gradient.
pub fn sigreg(z: Tensor<2>, directions: Tensor<2>) -> Tensor<1> {
    let [n, _] = z.dims();
    let device = z.device();
    let proj = z.matmul(directions); // [N, M]
    let step = 2.0 * SIGREG_T_MAX / (SIGREG_POINTS - 1) as f64;
    let ts: Vec<f32> = (0..SIGREG_POINTS)
        .map(|i| (-SIGREG_T_MAX + step * i as f64) as f32)
        .collect();
    let gauss: Vec<f32> = ts.iter().map(|t| (-0.5 * t * t).exp()).collect();
    // Trapezoid weights times the Gaussian weight of each point.
    let weights: Vec<f32> = gauss
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let end = i == 0 || i == SIGREG_POINTS - 1;
            g * step as f32 * if end { 0.5 } else { 1.0 }
        })
        .collect();
    let row = |v: Vec<f32>| {
        Tensor::<1>::from_data(burn::tensor::TensorData::new(v, [SIGREG_POINTS]), &device)
            .reshape([1, 1, SIGREG_POINTS])
    };
    let (t, phi, w) = (row(ts), row(gauss), row(weights));
    let args = proj.unsqueeze_dim::<3>(2) * t; // [N, M, T]
    let re = args.clone().cos().mean_dim(0); // [1, M, T]
    let im = args.sin().mean_dim(0);
    let err = (re - phi).powi_scalar(2) + im.powi_scalar(2);
    (err * w).sum_dim(2).mean() * n as f64
}

/// `m` unit directions in `d` dimensions (`[d, m]`), drawn from `seed`: SIGReg's sketch, new
/// every step.
pub fn sigreg_directions(
    d: usize,
    m: usize,
    seed: u64,
    device: &burn::tensor::Device,
) -> Tensor<2> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut v: Vec<f32> = (0..d * m).map(|_| rng.normal() as f32).collect();
    for j in 0..m {
        let norm = (0..d)
            .map(|i| v[i * m + j].powi(2))
            .sum::<f32>()
            .sqrt()
            .max(1e-12);
        for i in 0..d {
            v[i * m + j] /= norm;
        }
    }
    Tensor::from_data(burn::tensor::TensorData::new(v, [d, m]), device)
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
    fn sigreg_is_small_for_a_gaussian_and_large_for_a_collapse() {
        let d = Device::flex();
        let (n, dim) = (512, 16);
        let mut rng = crate::rng::Rng::new(3);
        let gaussian: Vec<f32> = (0..n * dim).map(|_| rng.normal() as f32).collect();
        let dirs = || sigreg_directions(dim, 32, 9, &d);
        let g = scalar(sigreg(t2(gaussian.clone(), [n, dim]), dirs()));
        // Every sample the same point: a collapse.
        let collapsed = scalar(sigreg(t2(vec![0.3; n * dim], [n, dim]), dirs()));
        // Gaussian but ten times too wide.
        let wide: Vec<f32> = gaussian.iter().map(|x| 10.0 * x).collect();
        let wide = scalar(sigreg(t2(wide, [n, dim]), dirs()));
        assert!(g < 2.0, "gaussian {g}");
        assert!(collapsed > 20.0 * g, "collapsed {collapsed} vs {g}");
        assert!(wide > 20.0 * g, "wide {wide} vs {g}");
        // The directions are unit vectors.
        let norms = crate::model::host_f32(dirs().powi_scalar(2).sum_dim(0).sqrt());
        assert!(norms.iter().all(|x| (x - 1.0).abs() < 1e-5), "{norms:?}");
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
