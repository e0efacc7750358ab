//! Frames to latents with the frozen encoder: a single frame is repeated into a clip and only
//! the first tubelet's tokens are kept, so the encoder sees one tubelet of two identical frames,
//! as V-JEPA 2-AC encodes single images.

use amity_shared::model::flat::LengthMismatch;
use burn::tensor::{Device, Int, Tensor, TensorData};

use amity_shared::checkpoint::Checkpoint;
use amity_shared::config::ModelConfig;
use amity_shared::data::ClipBatch;
use amity_shared::model::{Encoder, host_f32, layer_norm_plain};

/// The frozen (target) encoder of a checkpoint, applied to single frames.
pub struct FrameEncoder {
    encoder: Encoder,
    model: ModelConfig,
    device: Device,
}

impl FrameEncoder {
    /// The checkpoint's target encoder.
    pub fn new(ckpt: &Checkpoint, device: &Device) -> Result<Self, LengthMismatch> {
        let enc = Encoder::new(&ckpt.config.model, device);
        let encoder = amity_shared::model::flat::load_flat(enc, &ckpt.target)?;
        Ok(FrameEncoder {
            encoder,
            model: ckpt.config.model.clone(),
            device: device.clone(),
        })
    }

    /// Tokens per frame (one tubelet's spatial grid).
    pub fn tokens(&self) -> usize {
        let g = self.model.grid();
        g.height * g.width
    }

    /// The token grid of a frame: (rows, columns).
    pub fn grid(&self) -> (usize, usize) {
        let g = self.model.grid();
        (g.height, g.width)
    }

    /// The device it runs on.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// Feature width.
    pub fn width(&self) -> usize {
        self.model.width
    }

    /// Frame side in pixels.
    pub fn size(&self) -> usize {
        self.model.image_size
    }

    /// Layer-normed latents of `frames` (each `size x size x 3`): `[B, tokens, width]`.
    pub fn encode(&self, frames: &[&[u8]]) -> Tensor<3> {
        let clips: Vec<Vec<u8>> = frames.iter().map(|f| f.repeat(self.model.frames)).collect();
        let batch = ClipBatch::from_clips(clips.iter().map(Vec::as_slice), &self.model);
        let b = frames.len();
        let p = self.tokens();
        let keep: Vec<i64> = (0..b).flat_map(|_| 0..p as i64).collect();
        let keep = Tensor::<2, Int>::from_data(TensorData::new(keep, [b, p]), &self.device);
        layer_norm_plain(self.encoder.forward(batch.tensor(&self.device), Some(keep)))
    }

    /// [`FrameEncoder::encode`] on the host, in chunks: `B * tokens * width` values.
    pub fn encode_host(&self, frames: &[&[u8]]) -> Vec<f32> {
        let mut out = Vec::with_capacity(frames.len() * self.tokens() * self.width());
        for chunk in frames.chunks(64) {
            out.extend(host_f32(self.encode(chunk)));
        }
        out
    }
}
