//! Multi-head self-attention over `f32` slices, with a backward that recomputes the scores.
//!
//! `O = softmax(s Q Kᵀ) V` per (batch, head), without a mask, read straight from the fused
//! projection's output `qkv` (`[batch, tokens, 3, heads, head_dim]`) and written as
//! `[batch, tokens, heads, head_dim]`, so that the transformer block needs no split, transpose or
//! merge copies around it. The forward keeps only `O` and the log-sum-exp of each score row
//! (`lse`); the backward recomputes each row's probabilities from `Q`, `K` and `lse`
//! (`P = e^{sQKᵀ - lse}`), so that no `N × N` matrix outlives the row it belongs to (as in
//! FlashAttention). With `D = rowsum(dO ∘ O)`:
//!
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - D)`, `dQ = s dS K`, `dK = s dSᵀ Q`.
//!
//! burn's autodiff instead builds attention from a matrix product, a softmax and another
//! product, and keeps the `N × N` probabilities of every head for the backward.
//!
//! The forward runs (batch, head) pairs in parallel, the backward batches. Inside a head, loops
//! run along contiguous rows (`K`, and `V` for the backward, are gathered transposed first) and
//! accumulate 16 lanes at a time in local arrays that stay in registers; reductions use eight
//! accumulators. So the loops vectorise and every sum has a fixed order.

use rayon::prelude::*;

use super::simd::{exp_nonpositive, simd, sum, vectorised};

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
}

/// `[head_dim, tokens]`: one head's keys or values gathered from a batch's `qkv` block and
/// transposed, so that loops over the tokens run along contiguous memory.
fn gather_transposed(qkv: &[f32], shape: Shape, part: usize, head: usize) -> Vec<f32> {
    let Shape {
        tokens: n,
        head_dim: dh,
        ..
    } = shape;
    let mut dst = vec![0.0; dh * n];
    for j in 0..n {
        let row = &qkv[shape.offset(j, part, head)..][..dh];
        for (c, &x) in row.iter().enumerate() {
            dst[c * n + j] = x;
        }
    }
    dst
}

/// `out = Σ_j w[j] data[base + j·stride ..][..out.len()]`: a weighted sum of rows (of `V` for an
/// output row, of `K` for a row of `dQ`).
///
/// The sum runs over 16 (then 8, then 1) channels at a time in a local array that stays in
/// registers. Adding each weighted row into `out` in memory instead made a chain of dependent
/// stores and loads per key that took 40% of the first forward kernel.
#[inline(always)]
fn weighted_rows(w: &[f32], data: &[f32], base: usize, stride: usize, out: &mut [f32]) {
    /// Four partial sums over alternating keys, so that four additions are in flight at once
    /// rather than one chain of `n` dependent ones.
    #[inline(always)]
    fn block<const W: usize>(w: &[f32], data: &[f32], base: usize, stride: usize, out: &mut [f32]) {
        let mut acc = [[0.0f32; W]; 4];
        let quads = w.chunks_exact(4);
        let tail = quads.remainder();
        for (q, w4) in quads.enumerate() {
            for (lane, (a, &wj)) in acc.iter_mut().zip(w4).enumerate() {
                let row = &data[base + (4 * q + lane) * stride..][..W];
                for (a, &x) in a.iter_mut().zip(row) {
                    *a += wj * x;
                }
            }
        }
        for (t, &wj) in tail.iter().enumerate() {
            let row = &data[base + (w.len() - tail.len() + t) * stride..][..W];
            for (a, &x) in acc[0].iter_mut().zip(row) {
                *a += wj * x;
            }
        }
        for (c, o) in out[..W].iter_mut().enumerate() {
            *o = (acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c]);
        }
    }
    let mut c = 0;
    while c + 16 <= out.len() {
        block::<16>(w, data, base + c, stride, &mut out[c..]);
        c += 16;
    }
    while c + 8 <= out.len() {
        block::<8>(w, data, base + c, stride, &mut out[c..]);
        c += 8;
    }
    while c < out.len() {
        block::<1>(w, data, base + c, stride, &mut out[c..]);
        c += 1;
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

/// `s[j] = scale · Σ_c q[c] kt[c][j]`: one query's scores against all keys (`kt` is `Kᵀ`,
/// `[head_dim, n]`), 64 keys at a time in registers (four vectors of additions in flight).
#[inline(always)]
fn scores(q: &[f32], kt: &[f32], scale: f32, s: &mut [f32]) {
    #[inline(always)]
    fn block<const W: usize>(q: &[f32], kt: &[f32], n: usize, j: usize, scale: f32, s: &mut [f32]) {
        let mut acc = [0.0f32; W];
        for (c, &qc) in q.iter().enumerate() {
            for (a, &k) in acc.iter_mut().zip(&kt[c * n + j..][..W]) {
                *a += qc * k;
            }
        }
        for (sj, a) in s[j..][..W].iter_mut().zip(acc) {
            *sj = a * scale;
        }
    }
    let n = s.len();
    let mut j = 0;
    while j + 64 <= n {
        block::<64>(q, kt, n, j, scale, s);
        j += 64;
    }
    while j + 16 <= n {
        block::<16>(q, kt, n, j, scale, s);
        j += 16;
    }
    while j < n {
        block::<1>(q, kt, n, j, scale, s);
        j += 1;
    }
}

/// `y += a x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// One head's forward: `out` (`[tokens, head_dim]`) and `lse` (`[tokens]`).
#[inline(always)]
fn head_forward(
    qkv: &[f32],
    shape: Shape,
    head: usize,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let Shape {
        tokens: n,
        head_dim: dh,
        ..
    } = shape;
    let kt = gather_transposed(qkv, shape, 1, head);
    let (v_base, stride) = (shape.offset(0, 2, head), shape.offset(1, 0, 0));
    let mut p = vec![0.0f32; n];
    for (i, (oi, lse_i)) in out.chunks_exact_mut(dh).zip(lse).enumerate() {
        scores(&qkv[shape.offset(i, 0, head)..][..dh], &kt, scale, &mut p);
        let m = max(&p);
        for pj in p.iter_mut() {
            *pj = exp_nonpositive(*pj - m);
        }
        let l = sum(&p);
        weighted_rows(&p, qkv, v_base, stride, oi);
        let inv = 1.0 / l;
        for o in oi.iter_mut() {
            *o *= inv;
        }
        *lse_i = m + l.ln();
    }
}

/// One clip's inputs to the backward.
struct ClipBackward<'a> {
    qkv: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    grad_out: &'a [f32],
}

/// One head's backward, written into its rows of a clip's `d_qkv` block (zeroed beforehand).
#[inline(always)]
fn head_backward(c: &ClipBackward<'_>, shape: Shape, head: usize, scale: f32, d_qkv: &mut [f32]) {
    let Shape {
        tokens: n,
        head_dim: dh,
        ..
    } = shape;
    let kt = gather_transposed(c.qkv, shape, 1, head);
    let vt = gather_transposed(c.qkv, shape, 2, head);
    let (k_base, stride) = (shape.offset(0, 1, head), shape.offset(1, 0, 0));
    let lse = &c.lse[head * n..][..n];
    let mut p = vec![0.0f32; n];
    let mut dp = vec![0.0f32; n];
    let mut ds = vec![0.0f32; n];
    let mut dq = vec![0.0f32; dh];
    for (i, &lse_i) in lse.iter().enumerate() {
        let qi = &c.qkv[shape.offset(i, 0, head)..][..dh];
        let oi = &c.out[shape.out_offset(i, head)..][..dh];
        let doi = &c.grad_out[shape.out_offset(i, head)..][..dh];
        scores(qi, &kt, scale, &mut p);
        for pj in p.iter_mut() {
            *pj = exp_nonpositive(*pj - lse_i);
        }
        // dp[j] = Σ_c dO[i][c] V[j][c], D_i = Σ_c dO[i][c] O[i][c].
        scores(doi, &vt, 1.0, &mut dp);
        let delta: f32 = doi.iter().zip(oi).map(|(&g, &o)| g * o).sum();
        for ((dsj, &pj), &dpj) in ds.iter_mut().zip(&p).zip(&dp) {
            *dsj = pj * (dpj - delta) * scale;
        }
        weighted_rows(&ds, c.qkv, k_base, stride, &mut dq);
        d_qkv[shape.offset(i, 0, head)..][..dh].copy_from_slice(&dq);
        for (j, (&dsj, &pj)) in ds.iter().zip(&p).enumerate() {
            axpy(dsj, qi, &mut d_qkv[shape.offset(j, 1, head)..][..dh]);
            axpy(pj, doi, &mut d_qkv[shape.offset(j, 2, head)..][..dh]);
        }
    }
}

vectorised!(fn head_forward_simd => head_forward, (
    qkv: &[f32], shape: Shape, head: usize, scale: f32, out: &mut [f32], lse: &mut [f32],
));
vectorised!(fn head_backward_simd => head_backward, (
    c: &ClipBackward<'_>, shape: Shape, head: usize, scale: f32, d_qkv: &mut [f32],
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
        head_dim: dh,
    } = shape;
    assert_eq!(qkv.len(), batch * shape.qkv_len(), "attention: qkv length");
    assert!(n > 0, "attention: no tokens");
    // Heads write into a head-major buffer in parallel, then it is laid out token-major.
    let mut by_head = vec![0.0f32; batch * heads * n * dh];
    let mut lse = vec![0.0f32; batch * heads * n];
    let simd = simd();
    by_head
        .par_chunks_mut(n * dh)
        .zip(lse.par_chunks_mut(n))
        .enumerate()
        .for_each(|(bh, (o, l))| {
            let qkv = &qkv[(bh / heads) * shape.qkv_len()..][..shape.qkv_len()];
            head_forward_simd(simd, qkv, shape, bh % heads, scale, o, l);
        });
    let mut out = vec![0.0f32; batch * shape.out_len()];
    out.par_chunks_mut(shape.out_len())
        .zip(by_head.par_chunks(heads * n * dh))
        .for_each(|(o, hm)| {
            for h in 0..heads {
                for i in 0..n {
                    o[shape.out_offset(i, h)..][..dh]
                        .copy_from_slice(&hm[(h * n + i) * dh..][..dh]);
                }
            }
        });
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
    let mut d_qkv = vec![0.0f32; qkv.len()];
    let simd = simd();
    d_qkv
        .par_chunks_mut(shape.qkv_len())
        .enumerate()
        .for_each(|(b, d)| {
            let clip = ClipBackward {
                qkv: &qkv[b * shape.qkv_len()..][..shape.qkv_len()],
                out: &out[b * shape.out_len()..][..shape.out_len()],
                lse: &lse[b * heads * n..][..heads * n],
                grad_out: &grad_out[b * shape.out_len()..][..shape.out_len()],
            };
            for h in 0..heads {
                head_backward_simd(simd, &clip, shape, h, scale, d);
            }
        });
    d_qkv
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn values(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n)
            .map(|_| amplitude * rng.range_f64(-1.0, 1.0) as f32)
            .collect()
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
