//! Layer normalisation over the last axis of `f32` slices, forward and backward in one pass each.
//!
//! `y = (x - μ) ρ γ + β` per row, with `μ` the row's mean, `σ²` its (biased) variance and
//! `ρ = 1/√(σ² + ε)`. The forward keeps `μ` and `ρ` per row; the backward, with `x̂ = (x - μ) ρ`
//! and `g = dy ∘ γ`, is
//!
//! `dx = ρ (g - mean(g) - x̂ mean(g ∘ x̂))`, `dγ = Σ_rows dy ∘ x̂`, `dβ = Σ_rows dy`.
//!
//! burn's CPU backend fuses the forward, but under autodiff it builds layer norm from nine
//! element-wise and reduction operations, each with its own pass and backward node. Rows run in
//! parallel in fixed blocks; the per-block sums of `dγ` and `dβ` are added in block order, so the
//! result does not depend on the number of threads.

use rayon::prelude::*;

use super::simd::{dot, simd, sum, sum_map, vectorised, zeros};

/// Rows per parallel task (and per partial sum of `dγ`, `dβ`).
const ROWS_PER_TASK: usize = 64;

/// Statistics of one row: `(μ, ρ)`.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum(x) / d;
    let var = sum_map(x, |x| (x - mean) * (x - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A block of rows' forward.
#[inline(always)]
fn rows_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    stats: &mut [f32],
) {
    let d = gamma.len();
    for ((xr, yr), st) in x
        .chunks_exact(d)
        .zip(y.chunks_exact_mut(d))
        .zip(stats.chunks_exact_mut(2))
    {
        let (mean, rstd) = row_stats(xr, eps);
        for (((y, &x), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
            *y = (x - mean) * rstd * g + b;
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

/// One block of rows' inputs to the backward.
struct RowsBackward<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    stats: &'a [f32],
    grad: &'a [f32],
}

/// A block of rows' backward: `dx` for its rows, and its partial `dγ`, `dβ` (`[2, d]`, added to).
#[inline(always)]
fn rows_backward(r: &RowsBackward<'_>, dx: &mut [f32], partial: &mut [f32], scratch: &mut [f32]) {
    let d = r.gamma.len();
    let (d_gamma, d_beta) = partial.split_at_mut(d);
    let (g, xhat) = scratch.split_at_mut(d);
    let rows =
        r.x.chunks_exact(d)
            .zip(r.grad.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d));
    for (((xr, dyr), dxr), st) in rows.zip(r.stats.chunks_exact(2)) {
        let (mean, rstd) = (st[0], st[1]);
        for ((((xh, gc), &x), &dy), &gm) in xhat
            .iter_mut()
            .zip(g.iter_mut())
            .zip(xr)
            .zip(dyr)
            .zip(r.gamma)
        {
            *xh = (x - mean) * rstd;
            *gc = dy * gm;
        }
        let inv_d = 1.0 / d as f32;
        let mean_g = sum(g) * inv_d;
        let mean_gx = dot(g, xhat) * inv_d;
        for (((dx, &gc), &xh), ((dgm, dbt), &dy)) in dxr
            .iter_mut()
            .zip(g.iter())
            .zip(xhat.iter())
            .zip(d_gamma.iter_mut().zip(d_beta.iter_mut()).zip(dyr))
        {
            *dx = rstd * (gc - mean_g - xh * mean_gx);
            *dgm += dy * xh;
            *dbt += dy;
        }
    }
}

vectorised!(fn rows_forward_simd => rows_forward, (
    x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], stats: &mut [f32],
));
vectorised!(fn rows_backward_simd => rows_backward, (
    r: &RowsBackward<'_>, dx: &mut [f32], partial: &mut [f32], scratch: &mut [f32],
));

/// The forward pass over rows of `gamma.len()` values: returns `y` and `[rows, 2]` statistics
/// (`μ`, `ρ` per row).
///
/// # Panics
/// If `x` is not a whole number of rows, or `beta` differs from `gamma` in length (caller bugs).
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && beta.len() == d,
        "layer norm: shapes do not fit"
    );
    let rows = x.len() / d;
    let mut y = zeros(x.len());
    let mut stats = vec![0.0f32; 2 * rows];
    let simd = simd();
    y.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(stats.par_chunks_mut(ROWS_PER_TASK * 2))
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .for_each(|((y, st), x)| rows_forward_simd(simd, x, gamma, beta, eps, y, st));
    (y, stats)
}

/// The backward pass from the forward's `x`, `γ`, statistics and `dy`: returns `(dx, dγ, dβ)`.
///
/// # Panics
/// If the lengths do not fit together (caller bugs).
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    stats: &[f32],
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && grad.len() == x.len(),
        "layer norm: shapes do not fit"
    );
    assert_eq!(
        stats.len(),
        2 * (x.len() / d),
        "layer norm: statistics length"
    );
    let mut dx = zeros(x.len());
    let blocks = x.len().div_ceil(ROWS_PER_TASK * d);
    let mut partials = vec![0.0f32; blocks * 2 * d];
    let simd = simd();
    dx.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(partials.par_chunks_mut(2 * d))
        .enumerate()
        .for_each(|(i, (dx, partial))| {
            let rows = dx.len() / d;
            let r = RowsBackward {
                x: &x[i * ROWS_PER_TASK * d..][..rows * d],
                gamma,
                stats: &stats[i * ROWS_PER_TASK * 2..][..rows * 2],
                grad: &grad[i * ROWS_PER_TASK * d..][..rows * d],
            };
            let mut scratch = vec![0.0f32; 2 * d];
            rows_backward_simd(simd, &r, dx, partial, &mut scratch);
        });
    let mut d_gamma = vec![0.0f32; d];
    let mut d_beta = vec![0.0f32; d];
    for partial in partials.chunks_exact(2 * d) {
        for (acc, &p) in d_gamma.iter_mut().zip(&partial[..d]) {
            *acc += p;
        }
        for (acc, &p) in d_beta.iter_mut().zip(&partial[d..]) {
            *acc += p;
        }
    }
    (dx, d_gamma, d_beta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_backward_match_the_f64_reference() {
        let (rows, d, eps) = (150, 37, 1e-6f32);
        let mut rng = crate::rng::Rng::new(3);
        let mut draw = |n: usize, lo: f64, hi: f64| -> Vec<f32> {
            (0..n).map(|_| rng.range_f64(lo, hi) as f32).collect()
        };
        let x = draw(rows * d, -3.0, 5.0);
        let gamma = draw(d, 0.5, 1.5);
        let beta = draw(d, -0.5, 0.5);
        let dy = draw(rows * d, -1.0, 1.0);
        let (y, stats) = forward(&x, &gamma, &beta, eps);
        let (dx, dg, db) = backward(&x, &gamma, &stats, &dy);
        let (mut dg_ref, mut db_ref) = (vec![0.0f64; d], vec![0.0f64; d]);
        for r in 0..rows {
            let xr: Vec<f64> = x[r * d..][..d].iter().map(|&v| v as f64).collect();
            let mean = xr.iter().sum::<f64>() / d as f64;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = (0..d)
                .map(|c| dy[r * d + c] as f64 * gamma[c] as f64)
                .collect();
            let mg = g.iter().sum::<f64>() / d as f64;
            let mgx = (0..d).map(|c| g[c] * xhat[c]).sum::<f64>() / d as f64;
            for c in 0..d {
                let y_ref = xhat[c] * gamma[c] as f64 + beta[c] as f64;
                assert!((y[r * d + c] as f64 - y_ref).abs() < 2e-5, "y[{r},{c}]");
                let dx_ref = rstd * (g[c] - mg - xhat[c] * mgx);
                assert!(
                    (dx[r * d + c] as f64 - dx_ref).abs() < 2e-5 * dx_ref.abs().max(1.0),
                    "dx[{r},{c}]"
                );
                dg_ref[c] += dy[r * d + c] as f64 * xhat[c];
                db_ref[c] += dy[r * d + c] as f64;
            }
        }
        for c in 0..d {
            assert!(
                (dg[c] as f64 - dg_ref[c]).abs() < 1e-4 * dg_ref[c].abs().max(1.0),
                "dgamma[{c}]"
            );
            assert!(
                (db[c] as f64 - db_ref[c]).abs() < 1e-4 * db_ref[c].abs().max(1.0),
                "dbeta[{c}]"
            );
        }
    }
}
