//! Where training clips come from, as deterministic batches, and the prefetching loader.
//!
//! A batch is a pure function of `(source, seed, step)`, so a run (or a federated round) can be
//! replayed exactly from its config. [`Prefetcher`] computes the next batches on a background
//! thread (decoding shards' bytes into normalised patches) while the trainer runs the current one.

pub mod synth;

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::config::ModelConfig;
use crate::corpus::CorpusError;
use crate::corpus::loader::ShardSet;
use crate::corpus::manifest::Manifest;
use crate::data::synth::{SynthConfig, generate};
use crate::rng::Rng;
use crate::store::BlobId;
use burn::tensor::{Device, Tensor, TensorData};

use crate::model::tubelet;

/// A batch of clips as tubelet patch vectors, ready for the encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipBatch {
    /// Clips in the batch.
    pub batch: usize,
    /// Tokens per clip.
    pub tokens: usize,
    /// Values per token.
    pub patch_dim: usize,
    /// `batch * tokens * patch_dim` normalised values.
    pub patches: Vec<f32>,
}

impl ClipBatch {
    /// Patchifies RGB clips (`frames x size x size x 3` bytes each).
    pub fn from_clips<'a>(
        clips: impl IntoIterator<Item = &'a [u8]>,
        model: &crate::config::ModelConfig,
    ) -> Self {
        let mut patches = Vec::new();
        let mut batch = 0;
        for clip in clips {
            tubelet::patchify(clip, model, &mut patches);
            batch += 1;
        }
        ClipBatch {
            batch,
            tokens: model.tokens(),
            patch_dim: model.patch_dim(),
            patches,
        }
    }

    /// The batch as a `[B, N, P]` tensor on `device`.
    pub fn tensor(&self, device: &Device) -> Tensor<3> {
        Tensor::from_data(
            TensorData::new(
                self.patches.clone(),
                [self.batch, self.tokens, self.patch_dim],
            ),
            device,
        )
    }
}

/// A source of training clips.
#[derive(Debug, Clone)]
pub enum ClipSource {
    /// Fresh synthetic moving-shapes videos, one per clip, seeded by `(seed, step, index)`.
    Synthetic(SynthConfig),
    /// Clips of verified, memory-mapped shards, drawn in seeded epochs.
    Shards(Arc<ShardSet>),
    /// RGB clips held in memory (benches build skewed, non-IID splits this way), drawn
    /// uniformly with a seeded generator.
    Memory(Arc<Vec<Vec<u8>>>),
}

impl ClipSource {
    /// Synthetic videos sized for `model`.
    pub fn synthetic(model: &ModelConfig) -> Self {
        ClipSource::Synthetic(SynthConfig::for_size(model.image_size, model.frames))
    }

    /// The shards of the store at `store_dir` (all of them, or only `ids`), checked against
    /// `model`'s clip shape.
    pub fn shards(
        store_dir: &Path,
        model: &ModelConfig,
        ids: Option<&[BlobId]>,
    ) -> Result<Self, CorpusError> {
        let manifest = Manifest::load(store_dir)?;
        manifest
            .check_model(model)
            .map_err(|e| CorpusError::Mismatch {
                path: store_dir.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(ClipSource::Shards(Arc::new(ShardSet::open(
            store_dir, &manifest, ids,
        )?)))
    }

    /// Number of distinct clips (`None`: unbounded).
    pub fn len(&self) -> Option<usize> {
        match self {
            ClipSource::Synthetic(_) => None,
            ClipSource::Shards(set) => Some(set.len()),
            ClipSource::Memory(clips) => Some(clips.len()),
        }
    }

    /// Whether the source holds no clip.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// The batch of `step`.
    pub fn batch(&self, seed: u64, step: u64, batch: usize, model: &ModelConfig) -> ClipBatch {
        match self {
            ClipSource::Synthetic(cfg) => {
                let videos: Vec<_> = (0..batch as u64)
                    .map(|i| generate(cfg, Rng::derive(seed, &[0x5e7, step, i]).next_u64()))
                    .collect();
                ClipBatch::from_clips(videos.iter().map(|v| v.pixels.as_slice()), model)
            }
            ClipSource::Shards(set) => {
                let picks = set.sample(seed, step, batch);
                ClipBatch::from_clips(picks.iter().map(|&i| set.clip(i)), model)
            }
            ClipSource::Memory(clips) => {
                let mut rng = Rng::derive(seed, &[0x3e3, step]);
                let picks: Vec<usize> = (0..batch).map(|_| rng.below(clips.len())).collect();
                ClipBatch::from_clips(picks.iter().map(|&i| clips[i].as_slice()), model)
            }
        }
    }
}

/// Batches of consecutive steps computed ahead on a background thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Receiver<ClipBatch>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts producing the batches of `steps`, keeping up to `depth` ready.
    pub fn spawn(
        source: ClipSource,
        model: ModelConfig,
        seed: u64,
        batch: usize,
        steps: std::ops::Range<u64>,
        depth: usize,
    ) -> Self {
        let (tx, rx): (SyncSender<ClipBatch>, _) = sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name("amity-prefetch".into())
            .spawn(move || {
                for step in steps {
                    if tx.send(source.batch(seed, step, batch, &model)).is_err() {
                        break; // the consumer went away
                    }
                }
            })
            .expect("spawning a thread");
        Prefetcher {
            rx,
            worker: Some(worker),
        }
    }
}

impl Iterator for Prefetcher {
    type Item = ClipBatch;

    fn next(&mut self) -> Option<ClipBatch> {
        self.rx.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Unblock the producer, then wait for it.
        let (_, dead) = sync_channel(0);
        self.rx = dead;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn prefetched_batches_equal_direct_ones() {
        let model = Config::preset("tiny").unwrap().model;
        let source = ClipSource::synthetic(&model);
        let direct: Vec<Vec<f32>> = (3..6)
            .map(|s| source.batch(9, s, 2, &model).patches)
            .collect();
        let fetched: Vec<Vec<f32>> =
            Prefetcher::spawn(source.clone(), model.clone(), 9, 2, 3..6, 2)
                .map(|b| b.patches)
                .collect();
        assert_eq!(direct, fetched);
        // Dropping a prefetcher mid-way stops its thread.
        let mut p = Prefetcher::spawn(source, model, 9, 2, 0..1000, 2);
        assert!(p.next().is_some());
        drop(p);
    }
}
