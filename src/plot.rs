//! A small line chart as PNG (the demo's loss curve), drawn with `image` so that the default
//! build needs no font or plotting stack. The y axis spans the values' range; a light grid marks
//! quarters of it; `summary.json` holds the numbers.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

const W: u32 = 640;
const H: u32 = 360;
const PAD: i64 = 30;

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for i in 0..=n {
        let x = x0 + (x1 - x0) * i / n;
        let y = y0 + (y1 - y0) * i / n;
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// Writes `values` (one per x step; non-finite values are skipped) as a line chart.
pub fn line_chart(path: &Path, values: &[f64]) -> Result<()> {
    line_chart_marked(path, values, &[])
}

/// [`line_chart`] with red vertical lines at the indices in `marks` (e.g. surprise spikes).
pub fn line_chart_marked(path: &Path, values: &[f64], marks: &[usize]) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (x0, x1, y0, y1) = (PAD, W as i64 - PAD, H as i64 - PAD, PAD);
    let grid = Rgb([225, 225, 225]);
    for q in 0..=4 {
        let y = y1 + (y0 - y1) * q / 4;
        line(&mut img, (x0, y), (x1, y), grid);
    }
    let axis = Rgb([90, 90, 90]);
    line(&mut img, (x0, y0), (x1, y0), axis);
    line(&mut img, (x0, y0), (x0, y1), axis);
    let pts: Vec<(usize, f64)> = values
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .collect();
    if let (Some(lo), Some(hi)) = (
        pts.iter().map(|p| p.1).reduce(f64::min),
        pts.iter().map(|p| p.1).reduce(f64::max),
    ) {
        let span = (hi - lo).max(1e-9);
        let steps = (values.len().max(2) - 1) as f64;
        let to_px = |(i, v): (usize, f64)| {
            let x = x0 + ((x1 - x0) as f64 * i as f64 / steps) as i64;
            let y = y0 - ((y0 - y1) as f64 * (v - lo) / span) as i64;
            (x, y)
        };
        for &m in marks {
            if let Some(v) = values.get(m) {
                let (x, _) = to_px((m, *v));
                line(&mut img, (x, y0), (x, y1), Rgb([220, 40, 40]));
            }
        }
        let blue = Rgb([31, 100, 200]);
        for w in pts.windows(2) {
            line(&mut img, to_px(w[0]), to_px(w[1]), blue);
        }
        for p in &pts {
            let (x, y) = to_px(*p);
            for dx in -2..=2 {
                for dy in -2..=2 {
                    put(&mut img, x + dx, y + dy, blue);
                }
            }
        }
    }
    img.save(path).with_context(|| path.display().to_string())
}

/// The font charts with text are drawn with, embedded in the binary.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font for plotters' text (once per process).
pub fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
            .is_ok()
    });
    anyhow::ensure!(ok, "the embedded chart font does not parse");
    Ok(())
}
