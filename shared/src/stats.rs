//! Small statistics every role uses, and the collapse statistics of a set of features (RankMe,
//! per-dimension spread) that training telemetry and evaluation report.

use crate::linalg::{gram, symmetric_eigenvalues};

/// The median of `v` (the mean of the two middle values for an even count; 0 when empty).
pub fn median<T: Copy + Into<f64>>(v: &[T]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s: Vec<f64> = v.iter().map(|&x| x.into()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// The lower median of `v`: the middle value, or the smaller of the two middle ones (0 when
/// empty). With two values it is the smaller, so one outlier cannot move it (the coordinator's
/// screens take it as their reference).
pub fn lower_median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(s.len() - 1) / 2]
}

/// Reads an `f64` that JSON may hold as `null`: serde_json writes NaN and infinities as `null`
/// (JSON has no such numbers), so a statistic that was NaN (the mean loss of a round in which
/// no update was accepted, say) must read back as NaN rather than fail the whole document.
pub fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// NaN: the serde default of a statistic that older documents do not hold, so that "not
/// measured" never reads as a measured 0.
pub fn nan() -> f64 {
    f64::NAN
}

/// RankMe (Garrido et al. 2023): `exp` of the entropy of the normalised singular values of an
/// `n x d` embedding matrix. Between 1 (collapsed) and `min(n, d)`.
pub fn rankme(z: &[f64], n: usize, d: usize) -> f64 {
    let eig = symmetric_eigenvalues(&gram(z, n, d), d);
    let sv: Vec<f64> = eig.iter().map(|&e| e.max(0.0).sqrt()).collect();
    let total: f64 = sv.iter().sum::<f64>() + 1e-12;
    let entropy: f64 = sv
        .iter()
        .map(|s| s / total + 1e-7)
        .map(|p| -p * p.ln())
        .sum();
    entropy.exp()
}

/// RankMe of the embeddings less their mean: the effective number of directions in which the
/// clips *differ*. Plain RankMe is taken on the raw embeddings, so a large mean shared by every
/// clip (a world whose clips share a background, say) fills its first singular value and pulls
/// it towards 1 even when the spread around that mean uses many dimensions; this one separates
/// the two.
pub fn rankme_centred(z: &[f64], n: usize, d: usize) -> f64 {
    let mean = column_means(z, n, d);
    let centred: Vec<f64> = z
        .chunks_exact(d)
        .take(n)
        .flat_map(|row| row.iter().zip(&mean).map(|(x, m)| x - m))
        .collect();
    rankme(&centred, n, d)
}

/// The mean of each of the `d` columns of the first `n` rows of `z`.
fn column_means(z: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut mean = vec![0.0; d];
    for row in z.chunks_exact(d).take(n) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x / n as f64;
        }
    }
    mean
}

/// Per-dimension standard deviation of `n x d` features: `(mean over dims, min over dims)`.
pub fn feature_std(z: &[f64], n: usize, d: usize) -> (f64, f64) {
    let mean = column_means(z, n, d);
    let mut var = vec![0.0; d];
    for r in 0..n {
        for c in 0..d {
            var[c] += (z[r * d + c] - mean[c]).powi(2) / n as f64;
        }
    }
    let std: Vec<f64> = var.iter().map(|v| v.sqrt()).collect();
    let avg = std.iter().sum::<f64>() / d as f64;
    let min = std.iter().copied().fold(f64::INFINITY, f64::min);
    (avg, min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn median_of_odd_even_and_empty_samples() {
        assert_eq!(median(&[3.0f64, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0f32, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median::<f64>(&[]), 0.0);
        assert_eq!(lower_median(&[5.0, 1.0]), 1.0);
        assert_eq!(lower_median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(lower_median(&[]), 0.0);
    }

    #[test]
    fn rankme_of_collapsed_and_isotropic_embeddings() {
        let (n, d) = (500, 8);
        let collapsed: Vec<f64> = (0..n).flat_map(|r| vec![r as f64 * 0.01; d]).collect();
        assert!(rankme(&collapsed, n, d) < 1.1);
        let mut rng = Rng::new(2);
        let iso: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        assert!(rankme(&iso, n, d) > 7.5);
        // A large shared mean hides an isotropic spread from RankMe, not from the centred one.
        let offset: Vec<f64> = iso.iter().map(|x| 0.2 * x + 5.0).collect();
        assert!(rankme(&offset, n, d) < 2.0, "{}", rankme(&offset, n, d));
        assert!(rankme_centred(&offset, n, d) > 7.5);
        assert!(rankme_centred(&collapsed, n, d) < 1.1);
        let (avg, min) = feature_std(&iso, n, d);
        assert!((avg - 1.0).abs() < 0.1 && min > 0.85);
    }
}
