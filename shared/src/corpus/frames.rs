//! Folders of JPEG/PNG frames: one sub-folder per video, frames in file-name order.
//!
//! Every frame is resized so its short side matches the target (bilinear), then centre-cropped
//! to a square, as V-JEPA's evaluation transforms do.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::CorpusError;

/// A video's frames as RGB bytes, `frames x size x size x 3`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedVideo {
    /// Where it came from.
    pub source: PathBuf,
    /// Frame side in pixels.
    pub size: usize,
    /// Number of frames.
    pub frames: usize,
    /// The pixels.
    pub pixels: Vec<u8>,
}

impl DecodedVideo {
    /// The bytes of `frame`.
    pub fn frame(&self, frame: usize) -> &[u8] {
        let n = self.size * self.size * 3;
        &self.pixels[frame * n..(frame + 1) * n]
    }
}

/// Whether `path` is a JPEG/PNG frame (by extension).
pub fn is_frame(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, CorpusError> {
    let io = |source| CorpusError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()).map_err(io))
        .collect::<Result<_, _>>()?;
    entries.sort();
    Ok(entries)
}

/// The most elongated frame accepted (long side over short side).
pub const MAX_ASPECT: u32 = 8;

/// Resizes an image so its short side is `size`, then crops the centre square.
pub fn resize_centre_crop(img: &image::RgbImage, size: usize) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let short = w.min(h).max(1) as f64;
    let scale = size as f64 / short;
    let nw = ((w as f64 * scale).round() as u32).max(size as u32);
    let nh = ((h as f64 * scale).round() as u32).max(size as u32);
    let resized = image::imageops::resize(img, nw, nh, FilterType::Triangle);
    let x0 = (nw - size as u32) / 2;
    let y0 = (nh - size as u32) / 2;
    image::imageops::crop_imm(&resized, x0, y0, size as u32, size as u32)
        .to_image()
        .into_raw()
}

/// Decodes the first `max_frames` frames of a frame folder at `size x size`.
pub fn decode_frame_folder(
    dir: &Path,
    size: usize,
    max_frames: usize,
) -> Result<DecodedVideo, CorpusError> {
    let files: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_file() && is_frame(p))
        .take(max_frames)
        .collect();
    let mut pixels = Vec::with_capacity(files.len() * size * size * 3);
    for f in &files {
        let img = image::open(f)
            .map_err(|e| CorpusError::Decode {
                path: f.clone(),
                reason: e.to_string(),
            })?
            .to_rgb8();
        let (w, h) = img.dimensions();
        if w.max(h) > MAX_ASPECT * w.min(h).max(1) {
            // Scaling the short side to `size` would make the long side huge.
            return Err(CorpusError::Decode {
                path: f.clone(),
                reason: format!("{w}x{h} pixels: wider than {MAX_ASPECT}:1"),
            });
        }
        pixels.extend(resize_centre_crop(&img, size));
    }
    Ok(DecodedVideo {
        source: dir.to_owned(),
        size,
        frames: files.len(),
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_round_trip_through_png_and_bad_frames_are_named() {
        let root = std::env::temp_dir().join(format!("amity-frames-{}", std::process::id()));
        let video = root.join("a/video1");
        std::fs::create_dir_all(&video).unwrap();
        // 3 frames, 64x48: the short side 48 becomes 32, the centre crop 32x32.
        for f in 0..3u8 {
            let img =
                image::RgbImage::from_fn(64, 48, |x, _| image::Rgb([f * 80, (x * 4) as u8, 10]));
            img.save(video.join(format!("{f:03}.png"))).unwrap();
        }
        std::fs::write(root.join("a/notes.txt"), "not a frame").unwrap();
        let v = decode_frame_folder(&video, 32, 100).unwrap();
        assert_eq!((v.frames, v.size, v.pixels.len()), (3, 32, 3 * 32 * 32 * 3));
        assert_eq!(v.frame(2)[0], 160); // red channel carries the frame index
        // Resize to 43x32, crop from column 5: crop column 0 is source x ≈ 7.5, green ≈ 30.
        let g = v.frame(0)[1] as i32;
        assert!((g - 30).abs() <= 4, "green {g}");

        std::fs::write(video.join("004.png"), b"not a png").unwrap();
        let err = decode_frame_folder(&video, 32, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("004.png"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
