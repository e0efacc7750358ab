//! `amity corpus ingest`: a folder of videos becomes content-addressed shards and a manifest.
//!
//! The walk is sorted, each video's clip starts are seeded by its relative path, and shards are
//! packed in walk order, so the same input gives the same shard ids wherever it lives on disk
//! and whatever else the folder holds. Decoding runs on every core, a few videos at a time;
//! memory stays bounded by those videos plus one shard being packed, whatever the corpus size.
//! A source that cannot be decoded is reported and skipped; it never aborts the ingest.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::CorpusError;
use super::clips::ClipSpec;
use super::frames::{DecodedVideo, decode_frame_folder};
use super::labels::read_labels;
use super::manifest::{ClipShape, Manifest, ShardEntry, Skipped, open_blobs};
use super::shard::ShardBuilder;
use super::video::{DecodeTarget, DecoderChoice, decode_video, is_video_file};
use crate::config::{DataConfig, ModelConfig};
use crate::data::synth::VideoLabels;
use crate::rng::Rng;
use crate::store::BlobStore;

/// Default target shard size.
pub const DEFAULT_SHARD_BYTES: usize = 64 << 20;

/// How to ingest.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Preset name recorded in the shards.
    pub preset: String,
    /// The model the clips are for (clip length and size).
    pub model: ModelConfig,
    /// Frame rate and clip sampling.
    pub data: DataConfig,
    /// Seed of the clip sampling.
    pub seed: u64,
    /// Target shard size in bytes (a shard closes before it would exceed it).
    pub shard_bytes: usize,
    /// Video decoder.
    pub decoder: DecoderChoice,
    /// Decoding threads.
    pub threads: usize,
}

impl IngestOptions {
    /// Options for a preset's model and sampling, with defaults for the rest.
    pub fn for_config(config: &crate::config::Config) -> Self {
        IngestOptions {
            preset: config.preset.clone(),
            model: config.model.clone(),
            data: config.data,
            seed: config.train.seed,
            shard_bytes: DEFAULT_SHARD_BYTES,
            decoder: DecoderChoice::Auto,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Where ingest stands, for progress bars.
#[derive(Debug, Clone)]
pub struct IngestProgress {
    /// Sources finished (used or skipped).
    pub done: usize,
    /// Sources found.
    pub total: usize,
    /// Clips packed so far.
    pub clips: u64,
    /// Sources skipped so far.
    pub skipped: usize,
}

/// What ingest did.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Frames decoded (after resampling).
    pub decoded_frames: u64,
    /// Wall time.
    pub seconds: f64,
    /// Shards that were not already in the store.
    pub new_shards: usize,
}

/// A video file or a frame folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Where it is.
    pub path: PathBuf,
    /// Path relative to the corpus root, `/`-separated (recorded in shards).
    pub rel: String,
    /// A folder of frame images rather than a video file.
    pub is_frame_folder: bool,
}

/// Every video file and frame folder under `root`, sorted by relative path.
pub fn find_sources(root: &Path) -> Result<Vec<Source>, CorpusError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CorpusError::Io { path, source }
    };
    if !root.is_dir() {
        return Err(CorpusError::Io {
            path: root.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
        });
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut has_frames = false;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if is_video_file(&path) {
                out.push((path, false));
            } else if super::frames::is_frame(&path) {
                has_frames = true;
            }
        }
        if has_frames {
            out.push((dir, true));
        }
    }
    let mut sources: Vec<Source> = out
        .into_iter()
        .map(|(path, is_frame_folder)| {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            Source {
                path,
                rel,
                is_frame_folder,
            }
        })
        .collect();
    sources.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(sources)
}

/// The clips of one source.
struct SourceClips {
    clips: Vec<(usize, Vec<u8>, Option<VideoLabels>)>,
    frames: usize,
}

/// Decodes one source and cuts its clips; `Err` is the reason it is skipped.
/// The message of a caught panic.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

fn cut_source(src: &Source, opts: &IngestOptions) -> Result<SourceClips, String> {
    let size = opts.model.image_size;
    let video: DecodedVideo = if src.is_frame_folder {
        // (a frame folder's error names the bad frame, so it keeps its path)
        decode_frame_folder(&src.path, size, opts.data.max_frames).map_err(|e| e.to_string())?
    } else {
        let target = DecodeTarget {
            size,
            fps: opts.data.fps,
            max_frames: opts.data.max_frames,
        };
        decode_video(&src.path, target, opts.decoder).map_err(|e| e.reason())?
    };
    let labels = read_labels(&src.path).map_err(|e| e.to_string())?;
    let spec = ClipSpec::for_config(&opts.data, &opts.model);
    let path_seed = u64::from_le_bytes(
        blake3::hash(src.rel.as_bytes()).as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    );
    let starts = spec.starts(
        video.frames,
        Rng::derive(opts.seed, &[path_seed]).next_u64(),
    );
    if starts.is_empty() {
        return Err(format!(
            "{} frames at {} fps, a clip needs {}",
            video.frames,
            opts.data.fps,
            spec.span()
        ));
    }
    let mut clips = Vec::with_capacity(starts.len());
    for start in starts {
        let mut pixels = Vec::with_capacity(opts.model.frames * size * size * 3);
        for f in spec.frame_indices(start) {
            pixels.extend_from_slice(video.frame(f));
        }
        // Frame folders have no frame rate of their own: their labels index frames directly.
        let clip_labels = labels.as_ref().and_then(|l| {
            let rate = if src.is_frame_folder {
                l.fps
            } else {
                opts.data.fps
            };
            l.clip(spec.frame_indices(start).map(|f| f as f64 / rate))
        });
        if labels.is_some() && clip_labels.is_none() {
            return Err(format!(
                "its labels file covers fewer frames than the video (clip at frame {start})"
            ));
        }
        clips.push((start, pixels, clip_labels));
    }
    Ok(SourceClips {
        clips,
        frames: video.frames,
    })
}

/// Cuts every source of `window` into clips on up to `threads` threads, in `window`'s order: each
/// source's clips, or why it is skipped.
fn decode_window(
    window: &[Source],
    opts: &IngestOptions,
    threads: usize,
) -> Vec<Result<SourceClips, String>> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<SourceClips, String>>>> =
        window.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(window.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= window.len() {
                        break;
                    }
                    // A panic in a decoder (a hostile file can find one in a library)
                    // skips that source, never the ingest.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cut_source(&window[i], opts)
                    }))
                    .unwrap_or_else(|panic| {
                        Err(format!("decoder crashed: {}", panic_text(&panic)))
                    });
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Err("decoder thread stopped".into()))
        })
        .collect()
}

/// Ingests `input` into the shard store at `store_dir`, writing `manifest.json` last.
pub fn ingest(
    input: &Path,
    store_dir: &Path,
    opts: &IngestOptions,
    progress: &mut dyn FnMut(&IngestProgress),
) -> Result<IngestReport, CorpusError> {
    let started = Instant::now();
    let sources = find_sources(input)?;
    if sources.is_empty() {
        return Err(CorpusError::Empty {
            path: input.to_owned(),
        });
    }
    let blobs = open_blobs(store_dir)?;
    let mut manifest = Manifest {
        format: 1,
        preset: opts.preset.clone(),
        clip: ClipShape::of(&opts.model),
        data: opts.data,
        seed: opts.seed,
        videos: 0,
        clips: 0,
        labelled: true,
        shards: Vec::new(),
        skipped: Vec::new(),
    };
    let new_builder = || {
        ShardBuilder::new(
            &opts.preset,
            opts.model.frames,
            opts.model.image_size,
            opts.data.fps,
            opts.data.frame_step,
        )
        .with_payload_capacity(opts.shard_bytes)
    };
    let mut builder = new_builder();
    let mut decoded_frames = 0u64;
    let mut new_shards = 0usize;
    let mut flush = |b: ShardBuilder, manifest: &mut Manifest| -> Result<(), CorpusError> {
        let clips = b.len() as u64;
        // Hashed and written in one pass over the shard's bytes.
        let stored = blobs.put_reader(&mut b.finish().reader(), None)?;
        new_shards += usize::from(stored.new);
        manifest.shards.push(ShardEntry {
            id: stored.id,
            bytes: stored.len,
            clips,
        });
        Ok(())
    };
    let threads = opts.threads.max(1);
    let mut state = IngestProgress {
        done: 0,
        total: sources.len(),
        clips: 0,
        skipped: 0,
    };
    progress(&state);
    for window in sources.chunks(threads * 2) {
        // Decode a window of sources in parallel, then pack them in walk order.
        let decoded = decode_window(window, opts, threads);
        for (src, result) in window.iter().zip(decoded) {
            match result {
                Err(reason) => {
                    tracing::debug!("skipped {}: {reason}", src.path.display());
                    // Reasons name files relative to the corpus root, like `path`, so the
                    // manifest does not depend on where the corpus sits.
                    let root = format!("{}/", input.display());
                    manifest.skipped.push(Skipped {
                        path: src.rel.clone(),
                        reason: reason.replace(&root, ""),
                    });
                    state.skipped += 1;
                }
                Ok(sc) => {
                    decoded_frames += sc.frames as u64;
                    manifest.videos += 1;
                    for (start, pixels, labels) in sc.clips {
                        if !builder.is_empty()
                            && builder.payload_bytes() + pixels.len() > opts.shard_bytes
                        {
                            flush(
                                std::mem::replace(&mut builder, new_builder()),
                                &mut manifest,
                            )?;
                        }
                        manifest.labelled &= labels.is_some();
                        builder.push(&src.rel, start, &pixels, labels);
                        manifest.clips += 1;
                        state.clips += 1;
                    }
                }
            }
            state.done += 1;
            progress(&state);
        }
    }
    if !builder.is_empty() {
        flush(builder, &mut manifest)?;
    }
    if manifest.clips == 0 {
        manifest.labelled = false;
    }
    manifest.save(store_dir)?;
    Ok(IngestReport {
        manifest,
        decoded_frames,
        seconds: started.elapsed().as_secs_f64(),
        new_shards,
    })
}
