//! The worker side of shards: open them (memory-mapped), verify each once, and draw clips.
//!
//! Sampling is by epochs without replacement: epoch `e` visits every clip once in an order
//! drawn from `(seed, e)`, and step `s` of a run with batch `B` takes positions
//! `s*B .. s*B+B` of that sequence. So a batch is a pure function of `(shards, seed, step)`,
//! a run can be replayed from its config, and a worker told "steps 1000..1100" knows its clips.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::CorpusError;
use super::manifest::{ClipShape, Manifest, open_blobs};
use super::shard::{ShardHeader, ShardView};
use crate::data::synth::VideoLabels;
use crate::rng::Rng;
use crate::store::{BlobId, BlobStore, LocalStore};

/// `(seed, epoch, clip order)`.
type EpochOrder = (u64, u64, Arc<Vec<u32>>);

/// One verified, mapped shard.
#[derive(Debug)]
struct OpenShard {
    map: memmap2::Mmap,
    header: ShardHeader,
    payload_start: usize,
}

/// A set of shards ready to serve clips.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<OpenShard>,
    /// `(shard, clip)` of every clip, in shard order.
    index: Vec<(u32, u32)>,
    frames: usize,
    size: usize,
    /// The last epoch's order, reused by the following steps.
    order: Mutex<Option<EpochOrder>>,
}

impl ShardSet {
    /// Opens the shards `ids` (every shard of the manifest when `None`) of the store at
    /// `store_dir`, verifying each shard's hash and header once.
    pub fn open(
        store_dir: &Path,
        manifest: &Manifest,
        ids: Option<&[BlobId]>,
    ) -> Result<Self, CorpusError> {
        let blobs = open_blobs(store_dir)?;
        let all: Vec<BlobId> = manifest.shards.iter().map(|s| s.id).collect();
        Self::open_in(&[blobs], manifest.clip, ids.unwrap_or(&all), store_dir)
    }

    /// Opens the shards `ids`, each from the first of `stores` that holds it (a worker reads its
    /// institution's own corpus and its cache of fetched shards as one set), checking every
    /// shard's clip shape against `clip`. `origin` names the set in errors.
    pub fn open_in(
        stores: &[LocalStore],
        clip: ClipShape,
        ids: &[BlobId],
        origin: &Path,
    ) -> Result<Self, CorpusError> {
        let mut shards = Vec::with_capacity(ids.len());
        let mut index = Vec::new();
        for (si, id) in ids.iter().enumerate() {
            let blobs = stores
                .iter()
                .find(|s| s.contains(id))
                .or(stores.first())
                .ok_or_else(|| CorpusError::Empty {
                    path: origin.to_owned(),
                })?;
            let shard = open_shard(blobs, id)?;
            if shard.header.frames as usize != clip.frames
                || shard.header.size as usize != clip.size
            {
                return Err(CorpusError::Mismatch {
                    path: blobs.path(id),
                    reason: format!(
                        "shard holds {} x {}px clips, expected {} x {}px",
                        shard.header.frames, shard.header.size, clip.frames, clip.size
                    ),
                });
            }
            index.extend((0..shard.header.clips.len() as u32).map(|c| (si as u32, c)));
            shards.push(shard);
        }
        if index.is_empty() {
            return Err(CorpusError::Empty {
                path: origin.to_owned(),
            });
        }
        Ok(ShardSet {
            shards,
            index,
            frames: clip.frames,
            size: clip.size,
            order: Mutex::new(None),
        })
    }

    /// Clips in the set.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the set holds no clip (never true for an opened set).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Frames per clip.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Clip side in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The RGB bytes of clip `i` (global index in shard order).
    pub fn clip(&self, i: usize) -> &[u8] {
        let (s, c) = self.index[i];
        let shard = &self.shards[s as usize];
        let n = shard.header.clip_bytes();
        let start = shard.payload_start + c as usize * n;
        &shard.map[start..start + n]
    }

    /// The labels of clip `i`, if the corpus has them.
    pub fn labels(&self, i: usize) -> Option<&VideoLabels> {
        let (s, c) = self.index[i];
        self.shards[s as usize].header.clips[c as usize]
            .labels
            .as_ref()
    }

    /// Source file and start frame of clip `i`.
    pub fn origin(&self, i: usize) -> (&str, u32) {
        let (s, c) = self.index[i];
        let h = &self.shards[s as usize].header;
        let rec = &h.clips[c as usize];
        (&h.sources[rec.source as usize], rec.start_frame)
    }

    /// The clip indices of step `step` with `batch` clips per step (epochs without replacement).
    pub fn sample(&self, seed: u64, step: u64, batch: usize) -> Vec<usize> {
        let n = self.index.len() as u64;
        let mut out = Vec::with_capacity(batch);
        for k in 0..batch as u64 {
            let pos = step * batch as u64 + k;
            let (epoch, offset) = (pos / n, pos % n);
            let order = self.epoch_order(seed, epoch);
            out.push(order[offset as usize] as usize);
        }
        out
    }

    fn epoch_order(&self, seed: u64, epoch: u64) -> Arc<Vec<u32>> {
        let mut cache = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, e, order)) = cache.as_ref()
            && *s == seed
            && *e == epoch
        {
            return order.clone();
        }
        let mut order: Vec<u32> = (0..self.index.len() as u32).collect();
        Rng::derive(seed, &[0xe90c, epoch]).shuffle(&mut order);
        let order = Arc::new(order);
        *cache = Some((seed, epoch, order.clone()));
        order
    }
}

fn open_shard(blobs: &LocalStore, id: &BlobId) -> Result<OpenShard, CorpusError> {
    let map = blobs.map_verified(id)?;
    let view = ShardView::parse(&map).map_err(|source| CorpusError::Shard {
        id: *id,
        path: blobs.path(id),
        source,
    })?;
    let payload_start = map.len() - view.len() * view.header.clip_bytes();
    let header = view.header;
    Ok(OpenShard {
        map,
        header,
        payload_start,
    })
}
