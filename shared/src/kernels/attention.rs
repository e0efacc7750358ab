//! Scaled dot-product attention over `f32` slices, with a backward that recomputes the scores.
//!
//! `O = softmax(s Q Kᵀ) V` per (batch, head), without a mask. The forward keeps only `O` and
//! the log-sum-exp of each score row (`lse`); the backward recomputes each row's probabilities
//! from `Q`, `K` and `lse` (`P = e^{sQKᵀ - lse}`), so that no `N × N` matrix outlives the row it
//! belongs to (as in FlashAttention). With `D = rowsum(dO ∘ O)`:
//!
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - D)`, `dQ = s dS K`, `dK = s dSᵀ Q`.
//!
//! burn's autodiff instead builds the attention from a matrix product, a softmax and another
//! product, and keeps the `N × N` probabilities of every head for the backward.
//!
//! Heads run in parallel. Inside a head every loop is an `axpy` over a contiguous row (`K` and
//! `V` are transposed into scratch first), which vectorises; the reductions over a row use eight
//! accumulators, so they vectorise too and keep a fixed order.

use rayon::prelude::*;

use super::simd::{exp_nonpositive, simd, vectorised};

/// The shape of one attention call: `[heads, n_q, d]` queries against `[heads, n_k, d]` keys
/// and `[heads, n_k, d_v]` values, `heads` counting every (batch, head) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Batch × heads.
    pub heads: usize,
    /// Query tokens.
    pub n_q: usize,
    /// Key (and value) tokens.
    pub n_k: usize,
    /// Query and key channels per head.
    pub d: usize,
    /// Value channels per head.
    pub d_v: usize,
}

/// `dst[j] = src[j * stride]` for each column `j`: the columns of a row-major matrix as rows.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0.0; rows * cols];
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            dst[c * rows + r] = x;
        }
    }
    dst
}

/// `Σ xs` with eight accumulators (vectorisable, and the same order at every width).
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
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

/// `s[j] = scale · Σ_c q[c] kt[c][j]`: one query's scores against all keys (`kt` is `Kᵀ`).
#[inline(always)]
fn scores(q: &[f32], kt: &[f32], scale: f32, s: &mut [f32]) {
    let n_k = s.len();
    s.fill(0.0);
    for (c, &qc) in q.iter().enumerate() {
        let a = qc * scale;
        for (sj, &k) in s.iter_mut().zip(&kt[c * n_k..(c + 1) * n_k]) {
            *sj += a * k;
        }
    }
}

/// `y += a x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// One head's forward: `out` (`[n_q, d_v]`) and `lse` (`[n_q]`).
#[inline(always)]
fn head_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: Shape,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let Shape { n_k, d, d_v, .. } = shape;
    let kt = transpose(k, n_k, d);
    let mut p = vec![0.0f32; n_k];
    for ((qi, oi), lse_i) in q.chunks_exact(d).zip(out.chunks_exact_mut(d_v)).zip(lse) {
        scores(qi, &kt, scale, &mut p);
        let m = max(&p);
        for pj in p.iter_mut() {
            *pj = exp_nonpositive(*pj - m);
        }
        let l = sum(&p);
        oi.fill(0.0);
        for (&pj, vj) in p.iter().zip(v.chunks_exact(d_v)) {
            axpy(pj, vj, oi);
        }
        let inv = 1.0 / l;
        for o in oi.iter_mut() {
            *o *= inv;
        }
        *lse_i = m + l.ln();
    }
}

/// Inputs of one head's backward.
struct HeadBackward<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    grad_out: &'a [f32],
}

/// One head's backward into `dq`, `dk`, `dv` (overwritten).
#[inline(always)]
fn head_backward(
    h: &HeadBackward<'_>,
    shape: Shape,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Shape { n_k, d, d_v, .. } = shape;
    let kt = transpose(h.k, n_k, d);
    let vt = transpose(h.v, n_k, d_v);
    let mut p = vec![0.0f32; n_k];
    let mut dp = vec![0.0f32; n_k];
    dk.fill(0.0);
    dv.fill(0.0);
    let rows = h.q.chunks_exact(d).zip(dq.chunks_exact_mut(d));
    let rows = rows.zip(h.out.chunks_exact(d_v).zip(h.grad_out.chunks_exact(d_v)));
    for (((qi, dqi), (oi, doi)), &lse_i) in rows.zip(h.lse) {
        scores(qi, &kt, scale, &mut p);
        for pj in p.iter_mut() {
            *pj = exp_nonpositive(*pj - lse_i);
        }
        // dp[j] = Σ_c dO[i][c] V[j][c], D_i = Σ_c dO[i][c] O[i][c].
        dp.fill(0.0);
        let mut delta = 0.0f32;
        for (c, (&g, &o)) in doi.iter().zip(oi).enumerate() {
            axpy(g, &vt[c * n_k..(c + 1) * n_k], &mut dp);
            delta += g * o;
        }
        dqi.fill(0.0);
        for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
            let ds = pj * (dpj - delta) * scale;
            axpy(ds, &h.k[j * d..(j + 1) * d], dqi);
            axpy(ds, qi, &mut dk[j * d..(j + 1) * d]);
            axpy(pj, doi, &mut dv[j * d_v..(j + 1) * d_v]);
        }
    }
}

vectorised!(fn head_forward_simd => head_forward, (
    q: &[f32], k: &[f32], v: &[f32], shape: Shape, scale: f32, out: &mut [f32], lse: &mut [f32],
));
vectorised!(fn head_backward_simd => head_backward, (
    h: &HeadBackward<'_>, shape: Shape, scale: f32, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32],
));

impl Shape {
    fn check(&self, q: usize, k: usize, v: usize) {
        assert_eq!(q, self.heads * self.n_q * self.d, "attention: query length");
        assert_eq!(k, self.heads * self.n_k * self.d, "attention: key length");
        assert_eq!(
            v,
            self.heads * self.n_k * self.d_v,
            "attention: value length"
        );
    }
}

/// Head `i` of a `[heads, len]` slice.
fn head_of(x: &[f32], i: usize, len: usize) -> &[f32] {
    &x[i * len..(i + 1) * len]
}

/// The forward pass: returns `out` (`[heads, n_q, d_v]`) and `lse` (`[heads, n_q]`).
///
/// # Panics
/// If a slice's length does not match `shape`, or `n_k` is 0 (caller bugs).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], shape: Shape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    shape.check(q.len(), k.len(), v.len());
    assert!(shape.n_k > 0, "attention: no keys");
    let Shape {
        heads,
        n_q,
        n_k,
        d,
        d_v,
    } = shape;
    let mut out = vec![0.0f32; heads * n_q * d_v];
    let mut lse = vec![0.0f32; heads * n_q];
    let simd = simd();
    out.par_chunks_mut(n_q * d_v)
        .zip(lse.par_chunks_mut(n_q))
        .enumerate()
        .for_each(|(i, (o, l))| {
            let (q, k, v) = (
                head_of(q, i, n_q * d),
                head_of(k, i, n_k * d),
                head_of(v, i, n_k * d_v),
            );
            head_forward_simd(simd, q, k, v, shape, scale, o, l);
        });
    (out, lse)
}

/// The backward pass from the forward's inputs, `out`, `lse` and `dO`: returns `(dQ, dK, dV)`.
///
/// # Panics
/// If a slice's length does not match `shape` (caller bugs).
pub fn backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &[f32],
    lse: &[f32],
    grad_out: &[f32],
    shape: Shape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    shape.check(q.len(), k.len(), v.len());
    let Shape {
        heads,
        n_q,
        n_k,
        d,
        d_v,
    } = shape;
    assert_eq!(out.len(), heads * n_q * d_v, "attention: output length");
    assert_eq!(
        grad_out.len(),
        out.len(),
        "attention: output gradient length"
    );
    assert_eq!(lse.len(), heads * n_q, "attention: log-sum-exp length");
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let simd = simd();
    dq.par_chunks_mut(n_q * d)
        .zip(dk.par_chunks_mut(n_k * d))
        .zip(dv.par_chunks_mut(n_k * d_v))
        .enumerate()
        .for_each(|(i, ((dq, dk), dv))| {
            let head = HeadBackward {
                q: head_of(q, i, n_q * d),
                k: head_of(k, i, n_k * d),
                v: head_of(v, i, n_k * d_v),
                out: head_of(out, i, n_q * d_v),
                lse: head_of(lse, i, n_q),
                grad_out: head_of(grad_out, i, n_q * d_v),
            };
            head_backward_simd(simd, &head, shape, scale, dq, dk, dv);
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention in f64 with the `N × N` probabilities kept: the reference.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: Shape,
        scale: f64,
        g: &[f32],
    ) -> [Vec<f64>; 4] {
        let Shape {
            heads,
            n_q,
            n_k,
            d,
            d_v,
        } = s;
        let (mut o, mut dq, mut dk, mut dv) = (
            vec![0.0; heads * n_q * d_v],
            vec![0.0; q.len()],
            vec![0.0; k.len()],
            vec![0.0; v.len()],
        );
        for h in 0..heads {
            let at =
                |x: &[f32], n: usize, c: usize, i: usize, j: usize| x[(h * n + i) * c + j] as f64;
            for i in 0..n_q {
                let sc: Vec<f64> = (0..n_k)
                    .map(|j| {
                        scale
                            * (0..d)
                                .map(|c| at(q, n_q, d, i, c) * at(k, n_k, d, j, c))
                                .sum::<f64>()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / l).collect();
                for c in 0..d_v {
                    o[(h * n_q + i) * d_v + c] =
                        (0..n_k).map(|j| p[j] * at(v, n_k, d_v, j, c)).sum();
                }
                let dp: Vec<f64> = (0..n_k)
                    .map(|j| {
                        (0..d_v)
                            .map(|c| at(g, n_q, d_v, i, c) * at(v, n_k, d_v, j, c))
                            .sum()
                    })
                    .collect();
                let delta: f64 = (0..n_k).map(|j| p[j] * dp[j]).sum();
                for j in 0..n_k {
                    let ds = p[j] * (dp[j] - delta) * scale;
                    for c in 0..d {
                        dq[(h * n_q + i) * d + c] += ds * at(k, n_k, d, j, c);
                        dk[(h * n_k + j) * d + c] += ds * at(q, n_q, d, i, c);
                    }
                    for c in 0..d_v {
                        dv[(h * n_k + j) * d_v + c] += p[j] * at(g, n_q, d_v, i, c);
                    }
                }
            }
        }
        [o, dq, dk, dv]
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
                    heads: 3,
                    n_q: 5,
                    n_k: 13,
                    d: 4,
                    d_v: 6,
                },
                1.0,
            ),
            (
                Shape {
                    heads: 2,
                    n_q: 17,
                    n_k: 17,
                    d: 16,
                    d_v: 16,
                },
                4.0,
            ),
        ] {
            let q = values(shape.heads * shape.n_q * shape.d, 1, amplitude);
            let k = values(shape.heads * shape.n_k * shape.d, 2, amplitude);
            let v = values(shape.heads * shape.n_k * shape.d_v, 3, 1.0);
            let g = values(shape.heads * shape.n_q * shape.d_v, 4, 1.0);
            let scale = 1.0 / (shape.d as f32).sqrt();
            let (out, lse) = forward(&q, &k, &v, shape, scale);
            let (dq, dk, dv) = backward((&q, &k, &v), &out, &lse, &g, shape, scale);
            let [o_ref, dq_ref, dk_ref, dv_ref] = reference(&q, &k, &v, shape, scale as f64, &g);
            assert_close(&out, &o_ref, 2e-5, "out");
            assert_close(&dq, &dq_ref, 1e-4, "dq");
            assert_close(&dk, &dk_ref, 1e-4, "dk");
            assert_close(&dv, &dv_ref, 2e-5, "dv");
        }
    }
}
