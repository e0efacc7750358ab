//! Fixed 3-D sin-cos positional embeddings (V-JEPA 1).
//!
//! Half of the channels encode time, a quarter each the row and the column, each as
//! `[sin(pos * w_i), cos(pos * w_i)]` with `w_i = 10000^(-i / (d/2))`, concatenated in the order
//! (time, height, width), as in facebookresearch/jepa's `get_3d_sincos_pos_embed`.

use crate::config::TokenGrid;

/// `grid.len() x dim` row-major table, token order `(t, h, w)`.
///
/// # Panics
/// If `dim` is not a multiple of 8 for a clean split; presets always are.
pub fn sincos_3d(grid: TokenGrid, dim: usize) -> Vec<f32> {
    assert!(
        dim.is_multiple_of(8),
        "positional width {dim} must be a multiple of 8"
    );
    let d_h = dim / 4;
    let d_w = dim / 4;
    let d_t = dim - d_h - d_w;
    let mut out = Vec::with_capacity(grid.len() * dim);
    for t in 0..grid.frames {
        for h in 0..grid.height {
            for w in 0..grid.width {
                push_1d(&mut out, d_t, t as f64);
                push_1d(&mut out, d_h, h as f64);
                push_1d(&mut out, d_w, w as f64);
            }
        }
    }
    out
}

fn push_1d(out: &mut Vec<f32>, dim: usize, pos: f64) {
    let half = dim / 2;
    let freq = |i: usize| 1.0 / 10000f64.powf(i as f64 / half as f64);
    out.extend((0..half).map(|i| (pos * freq(i)).sin() as f32));
    out.extend((0..half).map(|i| (pos * freq(i)).cos() as f32));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_values() {
        let grid = TokenGrid {
            frames: 2,
            height: 3,
            width: 4,
        };
        let e = sincos_3d(grid, 16);
        assert_eq!(e.len(), 24 * 16);
        // Token 0 is at the origin: sin parts 0, cos parts 1.
        assert_eq!(&e[..8], &[0., 0., 0., 0., 1., 1., 1., 1.]);
        // Distinct positions get distinct embeddings.
        for a in 0..24 {
            for b in a + 1..24 {
                assert_ne!(&e[a * 16..a * 16 + 16], &e[b * 16..b * 16 + 16]);
            }
        }
    }
}
