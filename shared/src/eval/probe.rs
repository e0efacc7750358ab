//! Frozen-encoder evaluation: closed-form ridge probes and the collapse telemetry.
//!
//! Probes read the ground truth of the synthetic corpus from mean-pooled target-encoder
//! features: object position and **velocity** (R²; velocity is invisible in a single frame, so
//! it tests whether the encoder understood motion), shape and colour (accuracy). A probe score
//! means little alone: always report the same probe on a randomly initialised encoder beside it.

use crate::linalg::{cholesky_solve, gram};

/// Ridge penalties tried; the best on a validation split of the training set is kept.
const LAMBDAS: [f64; 7] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0];

/// A fitted linear map from standardised features (plus a bias) to targets.
#[derive(Debug, Clone)]
pub struct Ridge {
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// `(d + 1) x k` weights, bias last.
    weights: Vec<f64>,
    d: usize,
    k: usize,
}

impl Ridge {
    /// Fits `y (n x k)` from `x (n x d)` with penalty `lambda`.
    pub fn fit(x: &[f64], y: &[f64], n: usize, d: usize, k: usize, lambda: f64) -> Ridge {
        let mut mean = vec![0.0; d];
        let mut scale = vec![0.0; d];
        for r in 0..n {
            for c in 0..d {
                mean[c] += x[r * d + c] / n as f64;
            }
        }
        for r in 0..n {
            for c in 0..d {
                scale[c] += (x[r * d + c] - mean[c]).powi(2) / n as f64;
            }
        }
        for s in &mut scale {
            *s = if *s > 1e-12 { 1.0 / s.sqrt() } else { 0.0 };
        }
        let da = d + 1;
        let mut xa = vec![0.0; n * da];
        for r in 0..n {
            for c in 0..d {
                xa[r * da + c] = (x[r * d + c] - mean[c]) * scale[c];
            }
            xa[r * da + d] = 1.0;
        }
        let mut a = gram(&xa, n, da);
        for i in 0..d {
            a[i * da + i] += lambda; // the bias is not penalised
        }
        a[d * da + d] += 1e-9;
        let mut b = vec![0.0; da * k];
        for r in 0..n {
            for i in 0..da {
                let xi = xa[r * da + i];
                for c in 0..k {
                    b[i * k + c] += xi * y[r * k + c];
                }
            }
        }
        let weights = cholesky_solve(&a, da, &b, k).unwrap_or_else(|| vec![0.0; da * k]);
        Ridge {
            mean,
            scale,
            weights,
            d,
            k,
        }
    }

    /// The fitted parts: per-feature mean and inverse scale, and the `(d + 1) x k` weights
    /// (bias last), to save a probe.
    pub fn parts(&self) -> (&[f64], &[f64], &[f64]) {
        (&self.mean, &self.scale, &self.weights)
    }

    /// A probe from [`Ridge::parts`]; `None` when the lengths disagree.
    pub fn from_parts(mean: Vec<f64>, scale: Vec<f64>, weights: Vec<f64>) -> Option<Ridge> {
        let d = mean.len();
        if scale.len() != d || weights.is_empty() || !weights.len().is_multiple_of(d + 1) {
            return None;
        }
        let k = weights.len() / (d + 1);
        Some(Ridge {
            mean,
            scale,
            weights,
            d,
            k,
        })
    }

    /// Predictions `n x k` for `x (n x d)`.
    pub fn predict(&self, x: &[f64], n: usize) -> Vec<f64> {
        let (d, k) = (self.d, self.k);
        let mut out = vec![0.0; n * k];
        for r in 0..n {
            for c in 0..k {
                let mut s = self.weights[d * k + c];
                for i in 0..d {
                    s += (x[r * d + i] - self.mean[i]) * self.scale[i] * self.weights[i * k + c];
                }
                out[r * k + c] = s;
            }
        }
        out
    }

    /// Fits with the penalty that scores best on the last fifth of the training rows, then
    /// refits on all of them.
    pub fn fit_cv(
        x: &[f64],
        y: &[f64],
        n: usize,
        d: usize,
        k: usize,
        score: impl Fn(&[f64], &[f64], usize) -> f64,
    ) -> Ridge {
        let n_fit = n - n / 5;
        let n_val = n - n_fit;
        let mut best = (f64::NEG_INFINITY, LAMBDAS[0]);
        if n_val > 0 {
            for lambda in LAMBDAS {
                let r = Ridge::fit(&x[..n_fit * d], &y[..n_fit * k], n_fit, d, k, lambda);
                let s = score(&r.predict(&x[n_fit * d..], n_val), &y[n_fit * k..], n_val);
                if s > best.0 {
                    best = (s, lambda);
                }
            }
        }
        Ridge::fit(x, y, n, d, k, best.1)
    }
}

/// Coefficient of determination averaged over the `k` outputs.
pub fn r2(pred: &[f64], y: &[f64], n: usize) -> f64 {
    let k = y.len() / n.max(1);
    let mut total = 0.0;
    for c in 0..k {
        let mean = (0..n).map(|r| y[r * k + c]).sum::<f64>() / n as f64;
        let sst: f64 = (0..n).map(|r| (y[r * k + c] - mean).powi(2)).sum();
        let sse: f64 = (0..n)
            .map(|r| (y[r * k + c] - pred[r * k + c]).powi(2))
            .sum();
        total += if sst > 0.0 { 1.0 - sse / sst } else { 0.0 };
    }
    total / k as f64
}

/// Share of rows whose arg-max matches the one-hot target.
fn accuracy(pred: &[f64], y: &[f64], n: usize) -> f64 {
    let k = y.len() / n.max(1);
    let argmax = |row: &[f64]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0)
    };
    let hits = (0..n)
        .filter(|&r| argmax(&pred[r * k..(r + 1) * k]) == argmax(&y[r * k..(r + 1) * k]))
        .count();
    hits as f64 / n as f64
}

/// One probe target: a regression (scored by R²) or a classification (accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Real-valued targets, R².
    Regression,
    /// One-hot targets, accuracy.
    Classification,
}

/// Fits a probe on the training rows and scores it on the test rows.
pub fn probe(kind: ProbeKind, train: (&[f64], &[f64]), test: (&[f64], &[f64]), d: usize) -> f64 {
    let n_train = train.0.len() / d;
    let n_test = test.0.len() / d;
    let k = train.1.len() / n_train.max(1);
    let score = match kind {
        ProbeKind::Regression => r2,
        ProbeKind::Classification => accuracy,
    };
    let ridge = Ridge::fit_cv(train.0, train.1, n_train, d, k, score);
    score(&ridge.predict(test.0, n_test), test.1, n_test)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn ridge_recovers_a_linear_map() {
        let (n, d) = (200, 3);
        let mut rng = Rng::new(0);
        let x: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let y: Vec<f64> = (0..n)
            .map(|r| 2.0 * x[r * d] - x[r * d + 2] + 0.5)
            .collect();
        let fit = Ridge::fit(&x, &y, n, d, 1, 1e-6);
        assert!(r2(&fit.predict(&x, n), &y, n) > 0.999999);
        let score = probe(
            ProbeKind::Regression,
            (&x[..300], &y[..100]),
            (&x[300..], &y[100..]),
            d,
        );
        assert!(score > 0.9999, "{score}");
    }

    #[test]
    fn noise_features_do_not_predict() {
        let (n, d) = (400, 8);
        let mut rng = Rng::new(1);
        let x: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let y: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let half = n / 2;
        let score = probe(
            ProbeKind::Regression,
            (&x[..half * d], &y[..half]),
            (&x[half * d..], &y[half..]),
            d,
        );
        assert!(score < 0.1, "{score}");
    }

    #[test]
    fn accuracy_counts_argmax_hits() {
        let pred = [0.9, 0.1, 0.2, 0.8, 0.6, 0.4];
        let y = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        assert!((accuracy(&pred, &y, 3) - 2.0 / 3.0).abs() < 1e-12);
    }
}
