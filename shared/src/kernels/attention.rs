//! Multi-head self-attention over `f32` slices, with a backward that recomputes the scores.
//!
//! `O = softmax(s Q Kᵀ) V` per (batch, head), without a mask, read straight from the fused
//! projection's output `qkv` (`[batch, tokens, 3, heads, head_dim]`) and written as
//! `[batch, tokens, heads, head_dim]`, so that the transformer block needs no split, transpose or
//! merge copies around it. The forward keeps only `O` and the log-sum-exp of each score row
//! (`lse`); the backward recomputes the probabilities from `Q`, `K` and `lse`
//! (`P = e^{sQKᵀ - lse}`), so that no `N × N` matrix outlives the head it belongs to (as in
//! FlashAttention). With `D = rowsum(dO ∘ O)`:
//!
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - D)`, `dQ = s dS K`, `dK = s dSᵀ Q`.
//!
//! burn's autodiff instead builds attention from a matrix product, a softmax and another
//! product, and keeps the `N × N` probabilities of every head of every layer for the backward.
//!
//! Clips run in parallel, heads one after another inside a clip. Each head's matrix products
//! go through the `gemm` crate (the one burn's CPU backend multiplies with, single-threaded
//! here), reading `Q`, `K`, `V` and `dO` where they lie through strides and writing `O` and the
//! head's columns of `d qkv` in place; one `N × N` score block (two in the backward) per rayon
//! job is reused across its clips and their heads. The row-wise softmax parts between the products are plain vectorised loops.
//! An earlier version computed every product row by row in its own loops: at 256 tokens the
//! attention was 40% of the `small` step, since each query row streamed all of `K` and `V` from
//! the cache; a blocked product loads each of them once per tile of rows.

use rayon::prelude::*;

use super::matmul::{Matrix, product};
use super::simd::{dot, exp_nonpositive, map_in_place_sum, simd, vectorised, zeros};

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Clips.
    pub batch: usize,
    /// Tokens per clip (queries and keys alike).
    pub tokens: usize,
    /// Attention heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

impl Shape {
    /// Floats of one clip's `qkv` block.
    fn qkv_len(&self) -> usize {
        self.tokens * 3 * self.heads * self.head_dim
    }

    /// Floats of one clip's output block.
    fn out_len(&self) -> usize {
        self.tokens * self.heads * self.head_dim
    }

    /// Where token `i`'s `part` (0 query, 1 key, 2 value) of `head` starts in a `qkv` block.
    fn offset(&self, i: usize, part: usize, head: usize) -> usize {
        ((i * 3 + part) * self.heads + head) * self.head_dim
    }

    /// Where token `i` of `head` starts in an output block.
    fn out_offset(&self, i: usize, head: usize) -> usize {
        (i * self.heads + head) * self.head_dim
    }

    /// One head's `part` (0 `Q`, 1 `K`, 2 `V`) in a clip's `qkv` block: `[tokens, head_dim]`.
    fn part<'a>(&self, qkv: &'a [f32], part: usize, head: usize) -> Matrix<'a> {
        let row_stride = self.offset(1, 0, 0);
        Matrix::new(
            qkv,
            self.offset(0, part, head),
            [self.tokens, self.head_dim],
            [row_stride, 1],
        )
    }

    /// One head's rows in a clip's output (or output gradient) block: `[tokens, head_dim]`.
    fn head_rows<'a>(&self, out: &'a [f32], head: usize) -> Matrix<'a> {
        let row_stride = self.out_offset(1, 0);
        Matrix::new(
            out,
            self.out_offset(0, head),
            [self.tokens, self.head_dim],
            [row_stride, 1],
        )
    }
}

/// `max xs` with eight accumulators.
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Each row of the scores `s` (`[tokens, tokens]`) becomes `e^{s - max}`, unnormalised;
/// `inv_sum` gets each row's `1 / Σ e^{s - max}` (the caller scales the product `P V` by it,
/// `head_dim` floats a row instead of `tokens`) and `lse` its log-sum-exp.
#[inline(always)]
fn softmax_rows(s: &mut [f32], lse: &mut [f32], inv_sum: &mut [f32]) {
    for ((row, lse_i), inv_i) in s.chunks_exact_mut(lse.len()).zip(lse).zip(inv_sum) {
        let m = max(row);
        let l = map_in_place_sum(row, |x| exp_nonpositive(x - m));
        *inv_i = 1.0 / l;
        *lse_i = m + l.ln();
    }
}

/// From the scores `s` and `dp = dO Vᵀ` (`[tokens, tokens]` each): `s` becomes the
/// probabilities `P` and `dp` becomes `dS · scale = P ∘ (dP - D) · scale`, with `D_i =
/// rowsum(dO ∘ O)_i` in `delta`.
#[inline(always)]
fn score_gradients(s: &mut [f32], dp: &mut [f32], lse: &[f32], delta: &[f32], scale: f32) {
    let n = lse.len();
    for (((p, dp), &lse_i), &d_i) in s
        .chunks_exact_mut(n)
        .zip(dp.chunks_exact_mut(n))
        .zip(lse)
        .zip(delta)
    {
        for (p, dp) in p.iter_mut().zip(dp.iter_mut()) {
            *p = exp_nonpositive(*p - lse_i);
            *dp = *p * (*dp - d_i) * scale;
        }
    }
}

/// `delta[i] = Σ_c dO[i][c] O[i][c]` over one head's rows of a clip's output block.
fn row_dots(grad_out: &[f32], out: &[f32], shape: Shape, head: usize, delta: &mut [f32]) {
    for (i, d) in delta.iter_mut().enumerate() {
        let at = shape.out_offset(i, head);
        *d = dot(
            &grad_out[at..][..shape.head_dim],
            &out[at..][..shape.head_dim],
        );
    }
}

vectorised!(fn softmax_rows_simd => softmax_rows, (
    s: &mut [f32], lse: &mut [f32], inv_sum: &mut [f32],
));
vectorised!(fn score_gradients_simd => score_gradients, (
    s: &mut [f32], dp: &mut [f32], lse: &[f32], delta: &[f32], scale: f32,
));

/// The forward pass from `qkv`: returns `out` (`[batch, tokens, heads, head_dim]`) and `lse`
/// (`[batch, heads, tokens]`).
///
/// # Panics
/// If `qkv`'s length does not match `shape`, or there are no tokens (caller bugs).
pub fn forward(qkv: &[f32], shape: Shape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let Shape {
        batch,
        tokens: n,
        heads,
        ..
    } = shape;
    assert_eq!(qkv.len(), batch * shape.qkv_len(), "attention: qkv length");
    assert!(n > 0, "attention: no tokens");
    let mut out = zeros(batch * shape.out_len());
    let mut lse = vec![0.0f32; batch * heads * n];
    let simd = simd();
    out.par_chunks_mut(shape.out_len())
        .zip(lse.par_chunks_mut(heads * n))
        .zip(qkv.par_chunks(shape.qkv_len()))
        // One score block per rayon job (not per clip): the products overwrite it.
        .for_each_init(
            || (vec![0.0f32; n * n], vec![0.0f32; n]),
            |(s, inv_sum), ((out, lse), qkv)| {
                for (h, lse) in lse.chunks_exact_mut(n).enumerate() {
                    let [q, k, v] = [0, 1, 2].map(|part| shape.part(qkv, part, h));
                    product(s, 0, [n, 1], q, k.t(), scale);
                    softmax_rows_simd(simd, s, lse, inv_sum);
                    let e = Matrix::new(s, 0, [n, n], [n, 1]);
                    let o = shape.out_offset(0, h);
                    product(out, o, [shape.out_offset(1, 0), 1], e, v, 1.0);
                    for (i, &inv) in inv_sum.iter().enumerate() {
                        for x in &mut out[shape.out_offset(i, h)..][..shape.head_dim] {
                            *x *= inv;
                        }
                    }
                }
            },
        );
    (out, lse)
}

/// The backward pass from the forward's `qkv`, `out` and `lse`, and `dO`: returns `d qkv`.
///
/// # Panics
/// If a slice's length does not match `shape` (caller bugs).
pub fn backward(
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    grad_out: &[f32],
    shape: Shape,
    scale: f32,
) -> Vec<f32> {
    let Shape {
        batch,
        tokens: n,
        heads,
        ..
    } = shape;
    assert_eq!(qkv.len(), batch * shape.qkv_len(), "attention: qkv length");
    assert_eq!(
        out.len(),
        batch * shape.out_len(),
        "attention: output length"
    );
    assert_eq!(
        grad_out.len(),
        out.len(),
        "attention: output gradient length"
    );
    assert_eq!(
        lse.len(),
        batch * heads * n,
        "attention: log-sum-exp length"
    );
    let mut d_qkv = zeros(qkv.len());
    let simd = simd();
    let row = shape.offset(1, 0, 0);
    d_qkv
        .par_chunks_mut(shape.qkv_len())
        .zip(qkv.par_chunks(shape.qkv_len()))
        .zip(out.par_chunks(shape.out_len()))
        .zip(grad_out.par_chunks(shape.out_len()))
        .zip(lse.par_chunks(heads * n))
        // Score blocks per rayon job (not per clip): the products overwrite them.
        .for_each_init(
            || (vec![0.0f32; n * n], vec![0.0f32; n * n], vec![0.0f32; n]),
            |(s, dp, delta), ((((d, qkv), out), grad_out), lse)| {
                for (h, lse) in lse.chunks_exact(n).enumerate() {
                    let [q, k, v] = [0, 1, 2].map(|part| shape.part(qkv, part, h));
                    let d_o = shape.head_rows(grad_out, h);
                    product(s, 0, [n, 1], q, k.t(), scale);
                    product(dp, 0, [n, 1], d_o, v.t(), 1.0);
                    row_dots(grad_out, out, shape, h, delta);
                    score_gradients_simd(simd, s, dp, lse, delta, scale);
                    let [p, ds] = [&*s, &*dp].map(|m| Matrix::new(m, 0, [n, n], [n, 1]));
                    product(d, shape.offset(0, 0, h), [row, 1], ds, k, 1.0);
                    product(d, shape.offset(0, 1, h), [row, 1], ds.t(), q, 1.0);
                    product(d, shape.offset(0, 2, h), [row, 1], p.t(), d_o, 1.0);
                }
            },
        );
    d_qkv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::values;

    /// Attention in f64 with the `N × N` probabilities kept: `[out, d_qkv]`.
    fn reference(qkv: &[f32], s: Shape, scale: f64, g: &[f32]) -> [Vec<f64>; 2] {
        let Shape {
            batch,
            tokens: n,
            heads,
            head_dim: dh,
        } = s;
        let mut o = vec![0.0; batch * s.out_len()];
        let mut d = vec![0.0; qkv.len()];
        for b in 0..batch {
            for h in 0..heads {
                let at = |part: usize, i: usize, c: usize| {
                    qkv[b * s.qkv_len() + s.offset(i, part, h) + c] as f64
                };
                let go = |i: usize, c: usize| g[b * s.out_len() + s.out_offset(i, h) + c] as f64;
                let dix =
                    |part: usize, i: usize, c: usize| b * s.qkv_len() + s.offset(i, part, h) + c;
                for i in 0..n {
                    let sc: Vec<f64> = (0..n)
                        .map(|j| scale * (0..dh).map(|c| at(0, i, c) * at(1, j, c)).sum::<f64>())
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let l: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / l).collect();
                    for c in 0..dh {
                        o[b * s.out_len() + s.out_offset(i, h) + c] =
                            (0..n).map(|j| p[j] * at(2, j, c)).sum();
                    }
                    let dp: Vec<f64> = (0..n)
                        .map(|j| (0..dh).map(|c| go(i, c) * at(2, j, c)).sum())
                        .collect();
                    let delta: f64 = (0..n).map(|j| p[j] * dp[j]).sum();
                    for j in 0..n {
                        let ds = p[j] * (dp[j] - delta) * scale;
                        for c in 0..dh {
                            d[dix(0, i, c)] += ds * at(1, j, c);
                            d[dix(1, j, c)] += ds * at(0, i, c);
                            d[dix(2, j, c)] += p[j] * go(i, c);
                        }
                    }
                }
            }
        }
        [o, d]
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * w.abs().max(1.0),
                "{what}[{i}] = {g}, want {w}"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_the_f64_reference() {
        // Odd sizes exercise the accumulators' tails; large scores exercise the max shift.
        for (shape, amplitude) in [
            (
                Shape {
                    batch: 2,
                    tokens: 13,
                    heads: 3,
                    head_dim: 4,
                },
                1.0,
            ),
            (
                Shape {
                    batch: 3,
                    tokens: 17,
                    heads: 2,
                    head_dim: 16,
                },
                4.0,
            ),
            // 64 + 16 + 10 keys and 16 + 8 channels: every block width of the inner loops.
            (
                Shape {
                    batch: 1,
                    tokens: 90,
                    heads: 2,
                    head_dim: 24,
                },
                2.0,
            ),
        ] {
            let qkv = values(shape.batch * shape.qkv_len(), 1, amplitude);
            let g = values(shape.batch * shape.out_len(), 4, 1.0);
            let scale = 1.0 / (shape.head_dim as f32).sqrt();
            let (out, lse) = forward(&qkv, shape, scale);
            let d = backward(&qkv, &out, &lse, &g, shape, scale);
            let [o_ref, d_ref] = reference(&qkv, shape, scale as f64, &g);
            assert_close(&out, &o_ref, 2e-5, "out");
            assert_close(&d, &d_ref, 1e-4, "d_qkv");
        }
    }
}
