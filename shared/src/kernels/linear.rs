//! The linear layer `y = x W + b` over `f32` slices, forward and backward, as whole-batch products.
//!
//! `x` is every token of every clip as one `[rows, d_in]` matrix, `W` is `[d_in, d_out]` (burn's
//! layout), `b` is `[d_out]`. The backward is `dx = dy Wᵀ`, `dW = xᵀ dy`, `db = Σ_rows dy`.
//!
//! burn's CPU backend runs a linear layer over `[clips, tokens, d_in]` as one product per clip
//! whenever the tokens fill its row tiles (256 tokens in the `small` preset do), packing `W` again
//! for each clip, and then adds the bias in a second pass on one thread; its autodiff takes `dx`
//! the same per-clip way. Here each product runs once over all rows, split between threads by
//! `gemm`, and the bias is written into the output before the product accumulates onto it, so
//! no pass over the output runs on one thread.

use rayon::prelude::*;

use super::matmul::{Matrix, Write, product_into};
use super::simd::{repeated_rows, simd, vectorised, zeros};

/// Rows per parallel task when summing the bias's gradient.
const ROWS_PER_TASK: usize = 256;

/// The sizes of one linear layer call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Rows of `x` (every leading axis folded together).
    pub rows: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// Every product of the layer: split between threads by `gemm`, overwriting its destination.
const THREADED: Write = Write {
    scale: 1.0,
    accumulate: false,
    threaded: true,
};

/// `x W + b`, `[rows, d_out]`.
///
/// # Panics
/// If a slice's length does not match `dims`, or a size is 0 (caller bugs).
pub fn forward(x: &[f32], w: &[f32], b: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { rows, d_in, d_out } = dims;
    check(x, w, dims);
    assert_eq!(b.len(), d_out, "linear: bias length");
    let mut y = repeated_rows(b, rows);
    let write = Write {
        accumulate: true,
        ..THREADED
    };
    let (x, w) = (Matrix::rows(x, rows, d_in), Matrix::rows(w, d_in, d_out));
    product_into(&mut y, 0, [d_out, 1], x, w, write);
    y
}

/// Which gradients a backward pass computes (an input that needs none costs nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// `dx`.
    pub x: bool,
    /// `dW`.
    pub weight: bool,
    /// `db`.
    pub bias: bool,
}

/// The gradients [`backward`] computed: `dx` `[rows, d_in]`, `dW` `[d_in, d_out]`, `db` `[d_out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// `dy Wᵀ`, when wanted.
    pub x: Option<Vec<f32>>,
    /// `xᵀ dy`, when wanted.
    pub weight: Option<Vec<f32>>,
    /// `Σ_rows dy`, when wanted.
    pub bias: Option<Vec<f32>>,
}

/// The backward pass from the forward's `x` and `W` and the output's gradient `dy`.
///
/// # Panics
/// If a slice's length does not match `dims`, or a size is 0 (caller bugs).
pub fn backward(x: &[f32], w: &[f32], dy: &[f32], dims: Dims, wanted: Wanted) -> Gradients {
    let Dims { rows, d_in, d_out } = dims;
    check(x, w, dims);
    assert_eq!(dy.len(), rows * d_out, "linear: output gradient length");
    let dy_m = Matrix::rows(dy, rows, d_out);
    let dx = wanted.x.then(|| {
        let mut dx = zeros(rows * d_in);
        let wt = Matrix::rows(w, d_in, d_out).t();
        product_into(&mut dx, 0, [d_in, 1], dy_m, wt, THREADED);
        dx
    });
    let dw = wanted.weight.then(|| {
        let mut dw = vec![0.0f32; d_in * d_out];
        let xt = Matrix::rows(x, rows, d_in).t();
        product_into(&mut dw, 0, [d_out, 1], xt, dy_m, THREADED);
        dw
    });
    let db = wanted.bias.then(|| column_sums(dy, d_out));
    Gradients {
        x: dx,
        weight: dw,
        bias: db,
    }
}

fn check(x: &[f32], w: &[f32], dims: Dims) {
    let Dims { rows, d_in, d_out } = dims;
    assert!(rows > 0 && d_in > 0 && d_out > 0, "linear: empty operand");
    assert_eq!(x.len(), rows * d_in, "linear: input length");
    assert_eq!(w.len(), d_in * d_out, "linear: weight length");
}

#[inline(always)]
fn add_rows_generic(rows: &[f32], acc: &mut [f32]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

vectorised!(fn add_rows => add_rows_generic, (rows: &[f32], acc: &mut [f32]));

/// `Σ` over the rows of a row-major `[_, cols]` matrix. Each task sums a fixed block of rows and
/// the blocks' sums are added in order, so the result does not depend on the thread count.
fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let block = ROWS_PER_TASK * cols;
    let mut partials = vec![0.0f32; m.len().div_ceil(block) * cols];
    let simd = simd();
    partials
        .par_chunks_mut(cols)
        .zip(m.par_chunks(block))
        .for_each(|(acc, rows)| add_rows(simd, rows, acc));
    let mut sums = vec![0.0f32; cols];
    add_rows(simd, &partials, &mut sums);
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::values;

    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= tol, "{what}[{i}] = {g}, want {w}");
        }
    }

    #[test]
    fn forward_and_backward_match_the_f64_reference() {
        // Rows not a multiple of the task size, and large enough that the products are threaded.
        let d = Dims {
            rows: 700,
            d_in: 48,
            d_out: 300,
        };
        let (x, w, b) = (
            values(d.rows * d.d_in, 1, 1.0),
            values(d.d_in * d.d_out, 2, 1.0),
            values(d.d_out, 3, 1.0),
        );
        let dy = values(d.rows * d.d_out, 4, 1.0);
        let at = |m: &[f32], cols: usize, r: usize, c: usize| m[r * cols + c] as f64;
        let y_want: Vec<f64> = (0..d.rows * d.d_out)
            .map(|i| {
                let (r, c) = (i / d.d_out, i % d.d_out);
                b[c] as f64
                    + (0..d.d_in)
                        .map(|k| at(&x, d.d_in, r, k) * at(&w, d.d_out, k, c))
                        .sum::<f64>()
            })
            .collect();
        close(&forward(&x, &w, &b, d), &y_want, 1e-4, "y");

        let all = Wanted {
            x: true,
            weight: true,
            bias: true,
        };
        let g = backward(&x, &w, &dy, d, all);
        let dx_want: Vec<f64> = (0..d.rows * d.d_in)
            .map(|i| {
                let (r, k) = (i / d.d_in, i % d.d_in);
                (0..d.d_out)
                    .map(|c| at(&dy, d.d_out, r, c) * at(&w, d.d_out, k, c))
                    .sum()
            })
            .collect();
        let dw_want: Vec<f64> = (0..d.d_in * d.d_out)
            .map(|i| {
                let (k, c) = (i / d.d_out, i % d.d_out);
                (0..d.rows)
                    .map(|r| at(&x, d.d_in, r, k) * at(&dy, d.d_out, r, c))
                    .sum()
            })
            .collect();
        let db_want: Vec<f64> = (0..d.d_out)
            .map(|c| (0..d.rows).map(|r| at(&dy, d.d_out, r, c)).sum())
            .collect();
        close(g.x.as_deref().expect("dx wanted"), &dx_want, 1e-3, "dx");
        close(
            g.weight.as_deref().expect("dW wanted"),
            &dw_want,
            1e-3,
            "dW",
        );
        close(g.bias.as_deref().expect("db wanted"), &db_want, 1e-3, "db");
    }

    #[test]
    fn only_the_wanted_gradients_are_computed() {
        let d = Dims {
            rows: 3,
            d_in: 2,
            d_out: 4,
        };
        let (x, w, dy) = (values(6, 1, 1.0), values(8, 2, 1.0), values(12, 3, 1.0));
        let wanted = Wanted {
            x: false,
            weight: true,
            bias: false,
        };
        let g = backward(&x, &w, &dy, d, wanted);
        assert!(g.x.is_none() && g.bias.is_none());
        assert_eq!(g.weight.map(|w| w.len()), Some(8));
    }

    #[test]
    fn the_bias_gradient_is_the_same_bits_at_any_thread_count() {
        let dy = values(1000 * 33, 5, 1.0);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool")
            .install(|| column_sums(&dy, 33));
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .expect("a four-thread pool")
            .install(|| column_sums(&dy, 33));
        assert_eq!(one, many);
    }
}
