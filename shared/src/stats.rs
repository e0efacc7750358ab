//! Small statistics every role uses.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty_samples() {
        assert_eq!(median(&[3.0f64, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0f32, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median::<f64>(&[]), 0.0);
        assert_eq!(lower_median(&[5.0, 1.0]), 1.0);
        assert_eq!(lower_median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(lower_median(&[]), 0.0);
    }
}
