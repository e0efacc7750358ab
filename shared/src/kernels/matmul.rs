//! Matrix products over `f32` slices, through the `gemm` crate (the one burn's CPU backend
//! multiplies with): a strided view whose construction checks its bounds, and the one call into
//! `gemm` that the kernels share.

use std::marker::PhantomData;

/// A strided matrix inside a slice: element `(r, c)` is at `start + r·strides[0] + c·strides[1]`.
/// Construction checks that every element lies inside the slice, which is what makes the
/// `gemm` call in [`product_into`] sound.
#[derive(Clone, Copy)]
pub(super) struct Matrix<'a> {
    ptr: *const f32,
    dims: [usize; 2],
    strides: [usize; 2],
    _slice: PhantomData<&'a [f32]>,
}

impl<'a> Matrix<'a> {
    /// # Panics
    /// If an element would lie outside `data`, or the matrix is empty (caller bugs).
    pub(super) fn new(
        data: &'a [f32],
        start: usize,
        dims: [usize; 2],
        strides: [usize; 2],
    ) -> Self {
        assert!(dims[0] > 0 && dims[1] > 0, "matmul: empty matrix");
        let last = start + (dims[0] - 1) * strides[0] + (dims[1] - 1) * strides[1];
        assert!(last < data.len(), "matmul: matrix outside its slice");
        Matrix {
            ptr: data[start..].as_ptr(),
            dims,
            strides,
            _slice: PhantomData,
        }
    }

    /// A row-major `rows × cols` matrix filling `data` from its start.
    pub(super) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix::new(data, 0, [rows, cols], [cols, 1])
    }

    /// The same elements, transposed.
    pub(super) fn t(self) -> Self {
        Matrix {
            dims: [self.dims[1], self.dims[0]],
            strides: [self.strides[1], self.strides[0]],
            ..self
        }
    }
}

/// How [`product_into`] writes its destination.
#[derive(Debug, Clone, Copy)]
pub(super) struct Write {
    /// The factor on `lhs · rhs`.
    pub scale: f32,
    /// Add to what the destination holds (`dst + scale · lhs · rhs`) instead of overwriting it.
    pub accumulate: bool,
    /// Split the product over rayon's threads (for products large enough to repay it; the
    /// attention's per-head products run inside a parallel loop and stay on one thread).
    pub threaded: bool,
}

/// Products below this many multiply-adds run on one thread even when [`Write::threaded`] asks
/// otherwise (burn's CPU backend draws the same line): splitting them costs more than it saves.
const THREADED_MIN_MULADDS: usize = 192 * 192 * 192;

/// `dst[start..]` viewed as a `dims` matrix with `strides`, overwritten with `scale · lhs · rhs`
/// by one thread.
///
/// # Panics
/// If the shapes do not chain or `dst`'s elements would lie outside it (caller bugs).
pub(super) fn product(
    dst: &mut [f32],
    start: usize,
    strides: [usize; 2],
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
) {
    let write = Write {
        scale,
        accumulate: false,
        threaded: false,
    };
    product_into(dst, start, strides, lhs, rhs, write);
}

/// `dst[start..]` viewed as a matrix with `strides`, written with `lhs · rhs` as `write` says.
///
/// Results do not depend on the number of threads: `gemm` splits the output's rows and columns
/// between threads, never the sum over the inner dimension.
///
/// # Panics
/// If the shapes do not chain or `dst`'s elements would lie outside it (caller bugs).
pub(super) fn product_into(
    dst: &mut [f32],
    start: usize,
    strides: [usize; 2],
    lhs: Matrix,
    rhs: Matrix,
    write: Write,
) {
    let [m, k] = lhs.dims;
    let n = rhs.dims[1];
    assert_eq!(rhs.dims[0], k, "matmul: product shapes do not chain");
    let last = start + (m - 1) * strides[0] + (n - 1) * strides[1];
    assert!(last < dst.len(), "matmul: product outside its destination");
    let out = dst[start..].as_mut_ptr();
    let s = |x: usize| x as isize;
    let parallelism = if write.threaded && m * n * k >= THREADED_MIN_MULADDS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the inputs were checked to lie inside their slices (`Matrix::new`) and the output
    // inside `dst` (above); `dst` is borrowed mutably, so it overlaps neither input; `gemm` reads
    // `lhs` and `rhs` and writes `m × n` elements of `dst` at those strides (reading them first
    // only when `accumulate` asks it to, and they are initialised: `dst` is a slice).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            s(strides[1]),
            s(strides[0]),
            write.accumulate,
            lhs.ptr,
            s(lhs.strides[1]),
            s(lhs.strides[0]),
            rhs.ptr,
            s(rhs.strides[1]),
            s(rhs.strides[0]),
            1.0,
            write.scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::values;

    /// `a · b` for row-major `a` (`m × k`) and `b` (`k × n`), in f64.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    #[test]
    fn threaded_and_accumulating_products_match_the_reference() {
        let (m, k, n) = (300, 200, 250);
        let (a, b) = (values(m * k, 1, 1.0), values(k * n, 2, 1.0));
        let want = reference(&a, &b, m, k, n);
        let mut one = vec![0.0f32; m * n];
        product(
            &mut one,
            0,
            [n, 1],
            Matrix::rows(&a, m, k),
            Matrix::rows(&b, k, n),
            1.0,
        );
        let mut many = vec![1.0f32; m * n];
        let write = Write {
            scale: 2.0,
            accumulate: true,
            threaded: true,
        };
        product_into(
            &mut many,
            0,
            [n, 1],
            Matrix::rows(&a, m, k),
            Matrix::rows(&b, k, n),
            write,
        );
        for ((w, o), t) in want.iter().zip(&one).zip(&many) {
            assert!((*o as f64 - w).abs() < 1e-4, "{o} vs {w}");
            assert!(
                (*t as f64 - (1.0 + 2.0 * w)).abs() < 2e-4,
                "{t} vs 1 + 2·{w}"
            );
        }
    }

    #[test]
    fn a_threaded_product_is_the_same_bits_at_any_thread_count() {
        let (m, k, n) = (512, 384, 320);
        let (a, b) = (values(m * k, 5, 1.0), values(k * n, 6, 1.0));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let mut c = vec![0.0f32; m * n];
            let write = Write {
                scale: 1.0,
                accumulate: false,
                threaded: true,
            };
            pool.install(|| {
                product_into(
                    &mut c,
                    0,
                    [n, 1],
                    Matrix::rows(&a, m, k),
                    Matrix::rows(&b, k, n),
                    write,
                )
            });
            c
        };
        assert!(run(1) == run(3), "the product moved with the thread count");
    }

    #[test]
    fn a_transposed_view_reads_the_same_elements() {
        let (m, k, n) = (7, 5, 3);
        let (a, b) = (values(m * k, 3, 1.0), values(k * n, 4, 1.0));
        // aᵀ stored row-major (k × m), read back through `t()`.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let mut c = vec![0.0f32; m * n];
        product(
            &mut c,
            0,
            [n, 1],
            Matrix::rows(&at, k, m).t(),
            Matrix::rows(&b, k, n),
            1.0,
        );
        for (c, w) in c.iter().zip(reference(&a, &b, m, k, n)) {
            assert!((*c as f64 - w).abs() < 1e-5);
        }
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn a_view_past_its_slice_is_refused() {
        let data = [0.0f32; 6];
        Matrix::new(&data, 1, [2, 3], [3, 1]);
    }
}
