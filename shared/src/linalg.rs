//! Small dense linear algebra in `f64` for probes and telemetry (a few hundred dimensions at
//! most): Cholesky solves and symmetric eigenvalues. Host-side, no dependencies.

/// Solves `A X = B` for symmetric positive-definite `A` (`n x n`, row-major) and `B` (`n x k`).
/// Returns `None` if `A` is not positive definite.
pub fn cholesky_solve(a: &[f64], n: usize, b: &[f64], k: usize) -> Option<Vec<f64>> {
    debug_assert_eq!(a.len(), n * n);
    debug_assert_eq!(b.len(), n * k);
    // A = L L^T
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut sum = a[i * n + j];
            for p in 0..j {
                sum -= l[i * n + p] * l[j * n + p];
            }
            if i == j {
                if sum <= 0.0 || !sum.is_finite() {
                    return None;
                }
                l[i * n + i] = sum.sqrt();
            } else {
                l[i * n + j] = sum / l[j * n + j];
            }
        }
    }
    let mut x = b.to_vec();
    for c in 0..k {
        // L y = b
        for i in 0..n {
            let mut sum = x[i * k + c];
            for p in 0..i {
                sum -= l[i * n + p] * x[p * k + c];
            }
            x[i * k + c] = sum / l[i * n + i];
        }
        // L^T x = y
        for i in (0..n).rev() {
            let mut sum = x[i * k + c];
            for p in i + 1..n {
                sum -= l[p * n + i] * x[p * k + c];
            }
            x[i * k + c] = sum / l[i * n + i];
        }
    }
    Some(x)
}

/// Eigenvalues of a symmetric matrix (`n x n`, row-major) by cyclic Jacobi rotations,
/// in descending order.
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    for _sweep in 0..100 {
        let mut off = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                off += m[i * n + j] * m[i * n + j];
            }
        }
        let scale: f64 = (0..n).map(|i| m[i * n + i].abs()).sum::<f64>().max(1e-300);
        if off.sqrt() <= 1e-13 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..n {
                    let arp = m[r * n + p];
                    let arq = m[r * n + q];
                    m[r * n + p] = c * arp - s * arq;
                    m[r * n + q] = s * arp + c * arq;
                }
                for r in 0..n {
                    let apr = m[p * n + r];
                    let aqr = m[q * n + r];
                    m[p * n + r] = c * apr - s * aqr;
                    m[q * n + r] = s * apr + c * aqr;
                }
            }
        }
    }
    let mut eig: Vec<f64> = (0..n).map(|i| m[i * n + i]).collect();
    eig.sort_by(|a, b| b.total_cmp(a));
    eig
}

/// `X^T X` of an `n x d` row-major matrix.
pub fn gram(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut g = vec![0.0; d * d];
    for r in 0..n {
        let row = &x[r * d..(r + 1) * d];
        for i in 0..d {
            let xi = row[i];
            if xi == 0.0 {
                continue;
            }
            for j in i..d {
                g[i * d + j] += xi * row[j];
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            g[i * d + j] = g[j * d + i];
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        let a = [4.0, 2.0, 2.0, 3.0];
        let x_true = [1.0, -2.0, 0.5, 3.0]; // 2 x 2
        let mut b = [0.0; 4];
        for i in 0..2 {
            for c in 0..2 {
                b[i * 2 + c] = (0..2).map(|p| a[i * 2 + p] * x_true[p * 2 + c]).sum();
            }
        }
        let x = cholesky_solve(&a, 2, &b, 2).unwrap();
        for (u, v) in x.iter().zip(x_true) {
            assert!((u - v).abs() < 1e-12);
        }
        assert!(cholesky_solve(&[1.0, 2.0, 2.0, 1.0], 2, &[1.0, 1.0], 1).is_none());
    }

    #[test]
    fn eigenvalues_of_known_matrices() {
        let e = symmetric_eigenvalues(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((e[0] - 3.0).abs() < 1e-12 && (e[1] - 1.0).abs() < 1e-12);
        let e = symmetric_eigenvalues(&[5.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0], 3);
        assert_eq!(e, vec![5.0, 3.0, 1.0]);
        // Trace is preserved on a random symmetric matrix.
        let n = 6;
        let mut rng = crate::rng::Rng::new(3);
        let mut m = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let v = rng.normal();
                m[i * n + j] = v;
                m[j * n + i] = v;
            }
        }
        let trace: f64 = (0..n).map(|i| m[i * n + i]).sum();
        let e = symmetric_eigenvalues(&m, n);
        assert!((e.iter().sum::<f64>() - trace).abs() < 1e-9);
        let frob: f64 = m.iter().map(|v| v * v).sum();
        assert!((e.iter().map(|v| v * v).sum::<f64>() - frob).abs() < 1e-9);
    }
}
