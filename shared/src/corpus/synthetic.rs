//! A synthetic corpus of real MP4 files with ground truth (`amity corpus synth`).
//!
//! Each video is a [`crate::data::synth`] moving-shapes video encoded as baseline H.264 (so the
//! built-in decoder reads it back) with a `.labels.json` beside it. In violation mode the corpus
//! is a list of matched pairs, identical up to a frame `k` after which the second breaks a law,
//! indexed in `pairs.json`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::CorpusError;
use super::h264::encode_mp4;
use super::labels::{LabelsFile, PAIRS_FILE, PairRecord, write_labels};
use crate::data::synth::{SynthConfig, ViolationKind, generate, generate_pair};
use crate::rng::Rng;

/// One written item: its bytes and, for a pair, its record.
type ItemResult = Result<(u64, Option<PairRecord>), CorpusError>;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthCorpusOptions {
    /// Videos (or, with violations, pairs).
    pub videos: usize,
    /// Seed of everything.
    pub seed: u64,
    /// Frame side in pixels (even).
    pub size: usize,
    /// Frames per video.
    pub frames: usize,
    /// Frame rate written into the files.
    pub fps: u32,
    /// Write matched possible/impossible pairs instead of plain videos.
    pub violations: bool,
    /// Encoding threads.
    pub threads: usize,
}

impl Default for SynthCorpusOptions {
    fn default() -> Self {
        SynthCorpusOptions {
            videos: 200,
            seed: 0,
            size: 64,
            frames: 48,
            fps: 10,
            violations: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthCorpusSummary {
    /// Video files written.
    pub files: usize,
    /// Total bytes of the video files.
    pub bytes: u64,
    /// The pairs, in violation mode.
    pub pairs: Vec<PairRecord>,
}

/// Writes the corpus into `out` (created if needed). `progress` is called with the number of
/// items (videos or pairs) finished.
pub fn write_synthetic_corpus(
    out: &Path,
    opts: &SynthCorpusOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<SynthCorpusSummary, CorpusError> {
    std::fs::create_dir_all(out).map_err(|source| CorpusError::Io {
        path: out.to_owned(),
        source,
    })?;
    let cfg = SynthConfig::for_size(opts.size, opts.frames);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, ItemResult)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= opts.videos {
                        break;
                    }
                    let r = write_item(out, opts, &cfg, i);
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, r));
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let mut summary = SynthCorpusSummary {
        files: 0,
        bytes: 0,
        pairs: Vec::new(),
    };
    for (_, r) in results {
        let (bytes, pair) = r?;
        summary.bytes += bytes;
        match pair {
            Some(p) => {
                summary.files += 2;
                summary.pairs.push(p);
            }
            None => summary.files += 1,
        }
    }
    if opts.violations {
        let path = out.join(PAIRS_FILE);
        let json = serde_json::to_vec_pretty(&summary.pairs).expect("pairs serialise");
        std::fs::write(&path, json).map_err(|source| CorpusError::Io { path, source })?;
    }
    Ok(summary)
}

fn write_item(out: &Path, opts: &SynthCorpusOptions, cfg: &SynthConfig, i: usize) -> ItemResult {
    let seed = Rng::derive(opts.seed, &[0x5c0, i as u64]).next_u64();
    let fps = opts.fps as f64;
    let write = |name: &str, v: &crate::data::synth::SynthVideo| -> Result<u64, CorpusError> {
        let path: PathBuf = out.join(name);
        encode_mp4(&v.pixels, v.size, v.size, opts.fps, &path)?;
        write_labels(
            &path,
            &LabelsFile {
                fps,
                labels: v.labels.clone(),
            },
        )?;
        Ok(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0))
    };
    if opts.violations {
        let kind = ViolationKind::in_turn(i);
        let (possible, impossible) = generate_pair(cfg, seed, kind);
        let frame = impossible.labels.violation.map_or(0, |v| v.frame);
        let (a, b) = (
            format!("pair_{i:05}_possible.mp4"),
            format!("pair_{i:05}_impossible.mp4"),
        );
        let bytes = write(&a, &possible)? + write(&b, &impossible)?;
        Ok((
            bytes,
            Some(PairRecord {
                possible: a,
                impossible: b,
                kind,
                frame,
            }),
        ))
    } else {
        let v = generate(cfg, seed);
        Ok((write(&format!("video_{i:05}.mp4"), &v)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::labels::read_labels;

    #[test]
    fn writes_videos_labels_and_pairs() {
        let dir = std::env::temp_dir().join(format!("amity-synthcorpus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = SynthCorpusOptions {
            videos: 3,
            size: 32,
            frames: 12,
            threads: 2,
            ..Default::default()
        };
        let s = write_synthetic_corpus(&dir, &opts, &|_| {}).unwrap();
        assert_eq!(s.files, 3);
        let labels = read_labels(&dir.join("video_00002.mp4")).unwrap().unwrap();
        assert_eq!(labels.labels.frames.len(), 12);

        let pairs_dir = dir.join("pairs");
        let s = write_synthetic_corpus(
            &pairs_dir,
            &SynthCorpusOptions {
                violations: true,
                ..opts
            },
            &|_| {},
        )
        .unwrap();
        assert_eq!((s.files, s.pairs.len()), (6, 3));
        assert_eq!(s.pairs[1].kind, ViolationKind::ALL[1]);
        let index: Vec<PairRecord> =
            serde_json::from_slice(&std::fs::read(pairs_dir.join(PAIRS_FILE)).unwrap()).unwrap();
        assert_eq!(index, s.pairs);
        let twin = read_labels(&pairs_dir.join(&s.pairs[0].impossible))
            .unwrap()
            .unwrap();
        assert_eq!(twin.labels.violation.unwrap().frame, s.pairs[0].frame);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
