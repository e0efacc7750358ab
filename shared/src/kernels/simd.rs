//! What the kernels share: the vector unit found at run time, a macro that compiles a loop once
//! per vector width, a branch-free `exp`, and output buffers filled by every thread.
//!
//! Kernels are written as plain scalar loops over slices, with no branches LLVM cannot turn into
//! selects, so that it vectorises them. [`vectorised!`] compiles such a loop three times (baseline
//! x86-64, AVX2+FMA, AVX-512) and runs the widest one the CPU has. Rust never contracts `a * b + c`
//! into a fused multiply-add, so every width returns the same bits.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The widest vector unit of this CPU that the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    /// Whatever the build target guarantees (SSE2 on x86-64).
    Baseline,
    /// AVX2 with FMA (8 lanes).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F (16 lanes).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Detects [`Simd`] (the standard library caches the CPU query).
pub(crate) fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Simd::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Simd::Avx2;
        }
    }
    Simd::Baseline
}

/// `fn $name(simd: Simd, args…)` that runs `$generic(args…)` compiled for `simd`.
///
/// `$generic` must be `#[inline(always)]` so that its body is compiled inside each wrapper.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident => $generic:path, ($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        $vis fn $name(simd: $crate::kernels::simd::Simd, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                $generic($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn avx512($($arg: $ty),*) {
                $generic($($arg),*)
            }
            match simd {
                $crate::kernels::simd::Simd::Baseline => $generic($($arg),*),
                // SAFETY: `simd()` found these features on this CPU.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::simd::Simd::Avx2 => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::simd::Simd::Avx512 => unsafe { avx512($($arg),*) },
            }
        }
    };
}
pub(crate) use vectorised;

/// `Σ f(x)` over `xs` with eight accumulators: vectorisable (LLVM does not reorder a single
/// running sum), and the same order at every vector width. Every reduction of the kernels goes
/// through this order ([`sum`], [`dot`], [`map_in_place_sum`]).
#[inline(always)]
pub(crate) fn sum_map(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ xs`, in [`sum_map`]'s order.
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    sum_map(xs, |x| x)
}

/// `Σ a[i] b[i]` over the shorter length, in [`sum_map`]'s order.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a8, b8) in ca.zip(cb) {
        for ((acc, &x), &y) in acc.iter_mut().zip(a8).zip(b8) {
            *acc += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Replaces every `x` by `f(x)` and returns `Σ f(x)`, in [`sum_map`]'s order, in one pass.
#[inline(always)]
pub(crate) fn map_in_place_sum(xs: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = f(*x);
            *a += *x;
        }
    }
    let mut tail = 0.0f32;
    for x in chunks.into_remainder() {
        *x = f(*x);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// Elements per task when a buffer is written in parallel.
const FILL_CHUNK: usize = 64 * 1024;

/// `n` zeros, written by rayon's threads. `vec![0.0; n]` on memory the allocator reuses is a
/// `memset` on the calling thread while the other threads wait (2.8% of the `small` preset's
/// step when every kernel allocated its outputs that way).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(FILL_CHUNK)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the capacity is at least `n`, and the loop above wrote all of the first `n`.
    unsafe { v.set_len(n) };
    v
}

/// `rows` copies of `row`, one after another, written by rayon's threads (see [`zeros`]).
///
/// # Panics
/// If `row` is empty (a caller bug).
pub(crate) fn repeated_rows(row: &[f32], rows: usize) -> Vec<f32> {
    assert!(!row.is_empty(), "repeated_rows: empty row");
    let n = rows * row.len();
    let per_task = (FILL_CHUNK / row.len()).max(1) * row.len();
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(per_task)
        .for_each(|chunk| {
            // Every chunk is whole rows: `per_task` and `n` are multiples of the row's length.
            for dst in chunk.chunks_exact_mut(row.len()) {
                for (d, &x) in dst.iter_mut().zip(row) {
                    d.write(x);
                }
            }
        });
    // SAFETY: the capacity is at least `n`, and the loop above wrote all of the first `n`
    // (`chunks_exact_mut` leaves no remainder, as every chunk is whole rows).
    unsafe { v.set_len(n) };
    v
}

/// `e^a` for `a ≤ ~0.5` (the kernels only need non-positive arguments, up to rounding).
///
/// Cephes `expf`: `a = n ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for `e^r`, then
/// `2^n` put straight into the exponent bits. Below -87 (e^-87 ≈ 1.6e-38, near the smallest
/// normal float) the result is 0, as it is for `-inf`. Relative error below 3e-7.
#[inline(always)]
pub(crate) fn exp_nonpositive(a0: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let a = a0.clamp(-87.0, 1.0);
    let n = (a * LOG2_E).round_ties_even();
    let r = a - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 1], so the biased exponent n + 127 is in [1, 128]: a normal power of two.
    let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if a0 < -87.0 { 0.0 } else { e }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_buffers_hold_what_they_say() {
        for n in [0, 1, 5, FILL_CHUNK - 1, 3 * FILL_CHUNK + 7] {
            assert_eq!(zeros(n), vec![0.0f32; n]);
        }
        let row = [1.0f32, -2.0, 3.5];
        for rows in [0, 1, 2, FILL_CHUNK, FILL_CHUNK + 1] {
            let v = repeated_rows(&row, rows);
            assert_eq!(v.len(), rows * 3);
            assert!(v.chunks_exact(3).all(|r| r == row));
        }
    }

    #[test]
    fn exp_matches_std_to_a_few_ulps() {
        for i in -50..=8700 {
            let a = -(i as f32) * 0.01;
            let got = exp_nonpositive(a);
            let want = (a as f64).exp();
            let rel = ((got as f64 - want) / want).abs();
            assert!(rel < 3e-7, "exp({a}) = {got}, want {want} (rel {rel:e})");
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
    }
}
