//! Drawing arena scenes with tiny-skia (anti-aliased, so sub-pixel motion changes the pixels).

use tiny_skia::{Color, FillRule, Paint, PathBuilder, Pixmap, Rect, Transform};

use super::ARENA;

/// An RGB colour.
pub type Rgb = [u8; 3];

/// Floor.
pub const FLOOR: Rgb = [40, 40, 48];
/// Walls.
pub const WALL: Rgb = [170, 170, 170];
/// The agent.
pub const AGENT: Rgb = [235, 60, 50];
/// The pushed block.
pub const BLOCK: Rgb = [60, 120, 235];
/// The target pad.
pub const PAD: Rgb = [60, 170, 80];

/// A frame being drawn, in arena coordinates (y up).
pub struct Canvas {
    pixmap: Pixmap,
    scale: f32,
}

fn paint(c: Rgb) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color(Color::from_rgba8(c[0], c[1], c[2], 255));
    p.anti_alias = true;
    p
}

impl Canvas {
    /// A `size x size` frame filled with the floor colour.
    pub fn new(size: usize) -> Self {
        let mut pixmap = Pixmap::new(size as u32, size as u32).expect("a non-zero frame size");
        pixmap.fill(Color::from_rgba8(FLOOR[0], FLOOR[1], FLOOR[2], 255));
        Canvas {
            pixmap,
            scale: size as f32 / ARENA,
        }
    }

    fn px(&self, p: [f32; 2]) -> (f32, f32) {
        (p[0] * self.scale, (ARENA - p[1]) * self.scale)
    }

    /// An axis-aligned rectangle given by centre and half extents.
    pub fn rect(&mut self, centre: [f32; 2], half: [f32; 2], c: Rgb) {
        let (x, y) = self.px([centre[0] - half[0], centre[1] + half[1]]);
        if let Some(r) =
            Rect::from_xywh(x, y, 2.0 * half[0] * self.scale, 2.0 * half[1] * self.scale)
        {
            self.pixmap
                .fill_rect(r, &paint(c), Transform::identity(), None);
        }
    }

    /// A disc.
    pub fn disc(&mut self, centre: [f32; 2], radius: f32, c: Rgb) {
        let (x, y) = self.px(centre);
        if let Some(path) = PathBuilder::from_circle(x, y, radius * self.scale) {
            self.pixmap.fill_path(
                &path,
                &paint(c),
                FillRule::Winding,
                Transform::identity(),
                None,
            );
        }
    }

    /// A square of half side `half` rotated by `angle` radians (counter-clockwise, y up).
    pub fn square(&mut self, centre: [f32; 2], half: f32, angle: f32, c: Rgb) {
        let (x, y) = self.px(centre);
        let h = half * self.scale;
        if let Some(r) = Rect::from_xywh(x - h, y - h, 2.0 * h, 2.0 * h) {
            let path = PathBuilder::from_rect(r);
            // Screen y points down, so a counter-clockwise turn in the arena is clockwise here.
            let t = Transform::from_rotate_at(-angle.to_degrees(), x, y);
            self.pixmap
                .fill_path(&path, &paint(c), FillRule::Winding, t, None);
        }
    }

    /// The frame as RGB bytes (the pixmap is opaque, so premultiplied = straight).
    pub fn into_rgb(self) -> Vec<u8> {
        self.pixmap
            .data()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect()
    }
}
