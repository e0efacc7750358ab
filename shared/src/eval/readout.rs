//! Readouts: which view of the target encoder's tokens a probe is fitted on.
//!
//! The standard probe ([`Readout::SpaceMean`]) averages each time step's tokens over space, so a
//! linear map can read the object's position only if the encoder writes it into its channels;
//! [`Readout::Quadrants`] keeps where in the frame a feature fired (a mean per quarter of the
//! patch grid), so a linear map can read position from *which* tokens respond, as it can from a
//! random encoder's. The two side by side tell how much of a probe score is the encoder's and
//! how much the readout's (`amity bench probe`).

use crate::config::TokenGrid;
use crate::data::ClipBatch;
use crate::train::Trainer;

/// How a clip's token features become one probe row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readout {
    /// Mean over space within each tubelet time step, concatenated over time (`T' x width`
    /// values): the probe every learning figure in this project reports.
    SpaceMean,
    /// Mean over each quarter of the patch grid (top-left, top-right, bottom-left,
    /// bottom-right; an odd side puts its middle row or column in the lower or right half)
    /// within each time step, concatenated (`T' x 4 x width`).
    Quadrants,
}

impl Readout {
    /// Every readout, the standard one first.
    pub const ALL: [Readout; 2] = [Readout::SpaceMean, Readout::Quadrants];

    /// The readout's name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Readout::SpaceMean => "space_mean",
            Readout::Quadrants => "quadrants",
        }
    }

    /// Probe rows of `batch` (`batch.batch` rows) from `trainer`'s target encoder.
    pub fn features(self, trainer: &Trainer, batch: &ClipBatch) -> Vec<f32> {
        match self {
            Readout::SpaceMean => trainer.probe_features(batch),
            Readout::Quadrants => {
                let model = &trainer.config().model;
                quadrant_means(
                    &trainer.token_features(batch),
                    batch.batch,
                    model.grid(),
                    model.width,
                )
            }
        }
    }
}

/// Quadrant means of `clips x tokens x width` token features in `(t, h, w)` order: per clip,
/// `frames x 4 x width` values (quadrant `2 * (row >= height / 2) + (col >= width / 2)`).
fn quadrant_means(tokens: &[f32], clips: usize, grid: TokenGrid, width: usize) -> Vec<f32> {
    let (h, w) = (grid.height, grid.width);
    let per_clip = grid.len() * width;
    assert_eq!(
        tokens.len(),
        clips * per_clip,
        "token features of {clips} clips"
    );
    let quadrant = |r: usize, c: usize| 2 * usize::from(r >= h / 2) + usize::from(c >= w / 2);
    let mut counts = [0usize; 4];
    for r in 0..h {
        for c in 0..w {
            counts[quadrant(r, c)] += 1;
        }
    }
    let mut out = vec![0.0f32; clips * grid.frames * 4 * width];
    for (clip, feats) in tokens.chunks_exact(per_clip).enumerate() {
        for t in 0..grid.frames {
            let row_out = (clip * grid.frames + t) * 4 * width;
            for r in 0..h {
                for c in 0..w {
                    let q = quadrant(r, c);
                    let token = (t * h + r) * w + c;
                    let scale = 1.0 / counts[q].max(1) as f32;
                    let src = &feats[token * width..(token + 1) * width];
                    let dst = &mut out[row_out + q * width..row_out + (q + 1) * width];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s * scale;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadrant_means_average_each_quarter_of_each_time_step() {
        // 2 clips, 2 time steps, a 3 x 2 grid, width 1: token value = its own index.
        let grid = TokenGrid {
            frames: 2,
            height: 3,
            width: 2,
        };
        let tokens: Vec<f32> = (0..2 * grid.len()).map(|i| i as f32).collect();
        let out = quadrant_means(&tokens, 2, grid, 1);
        assert_eq!(out.len(), 2 * 2 * 4);
        // Clip 0, t 0: rows 0 | 1-2 (h / 2 = 1), columns 0 | 1.
        // Tokens (r, c) -> r * 2 + c: TL {0}, TR {1}, BL {2, 4}, BR {3, 5}.
        assert_eq!(&out[..4], &[0.0, 1.0, 3.0, 4.0]);
        // Clip 0, t 1: the same plus 6; clip 1 adds 12.
        assert_eq!(&out[4..8], &[6.0, 7.0, 9.0, 10.0]);
        assert_eq!(&out[8..12], &[12.0, 13.0, 15.0, 16.0]);
    }
}
