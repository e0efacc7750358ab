//! Clips to tubelet patch vectors, on the host.
//!
//! V-JEPA embeds a clip with a `Conv3d` whose kernel equals its stride (`t x p x p`). That is a
//! linear map of each flattened tubelet, so Amity flattens tubelets here, while building the
//! batch, and the encoder applies one `Linear`. The flattening order within a patch is
//! `(channel, dt, dy, dx)` — a `Conv3d` weight `[D, C, t, p, p]` reshaped to `[D, C*t*p*p]` and
//! transposed is the equivalent `Linear` weight. Tokens are ordered `(t, h, w)`.

use crate::config::ModelConfig;

/// Per-channel mean of RGB in `[0, 1]` (ImageNet statistics, as V-JEPA normalises).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation of RGB in `[0, 1]`.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Appends the normalised patch vectors of one clip to `out`: `N * patch_dim` floats.
///
/// `clip` is `frames x size x size x 3` RGB bytes (the layout decoders produce).
///
/// # Panics
/// If `clip` does not have the config's size; callers validate clips when loading them.
pub fn patchify(clip: &[u8], cfg: &ModelConfig, out: &mut Vec<f32>) {
    let (t, p, s) = (cfg.tubelet, cfg.patch, cfg.image_size);
    assert_eq!(clip.len(), cfg.frames * s * s * 3, "clip size mismatch");
    let grid = cfg.grid();
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * STD[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| MEAN[c] / STD[c]);
    out.reserve(grid.len() * cfg.patch_dim());
    for gt in 0..grid.frames {
        for gh in 0..grid.height {
            for gw in 0..grid.width {
                for c in 0..3 {
                    for dt in 0..t {
                        let frame = gt * t + dt;
                        for dy in 0..p {
                            let y = gh * p + dy;
                            let row = (frame * s + y) * s;
                            for dx in 0..p {
                                let x = gw * p + dx;
                                let v = clip[(row + x) * 3 + c] as f32;
                                out.push(v * scale[c] - shift[c]);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn shapes_and_ordering() {
        let cfg = Config::preset("tiny").unwrap().model;
        let s = cfg.image_size;
        // Encode (frame, y, x, c) into the pixel so the patch layout can be checked.
        let mut clip = vec![0u8; cfg.frames * s * s * 3];
        for f in 0..cfg.frames {
            for y in 0..s {
                for x in 0..s {
                    for c in 0..3 {
                        clip[((f * s + y) * s + x) * 3 + c] =
                            ((f * 7 + y + x + c * 50) % 256) as u8;
                    }
                }
            }
        }
        let mut out = Vec::new();
        patchify(&clip, &cfg, &mut out);
        assert_eq!(out.len(), 64 * cfg.patch_dim());
        assert_eq!(cfg.patch_dim(), 3 * 2 * 8 * 8);
        // Token (t=1, h=2, w=3), channel 2, dt=1, dy=4, dx=5.
        let token = (4 + 2) * 4 + 3;
        let within = ((2 * 2 + 1) * 8 + 4) * 8 + 5;
        let (f, y, x, c) = (3, 2 * 8 + 4, 3 * 8 + 5, 2);
        let raw = ((f * 7 + y + x + c * 50) % 256) as f32;
        let want = (raw / 255.0 - MEAN[c]) / STD[c];
        assert!((out[token * cfg.patch_dim() + within] - want).abs() < 1e-5);
    }
}
