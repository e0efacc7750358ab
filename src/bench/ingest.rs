//! `amity bench ingest`: corpus throughput, and our decode speed beside the `ffmpeg` tool's.
//!
//! Three measurements, all on files made in a scratch folder:
//! 1. **clips/s**: a synthetic corpus (real MP4s) through the whole ingest (decode, cut, pack,
//!    hash, write) on every core.
//! 2. **decode fps**: one 640x360 30 fps video decoded to 128 px RGB by our FFmpeg path
//!    (subprocess, `fps`/`scale`/`crop` filters, raw pipe, frames into memory) against the
//!    baseline, the `ffmpeg` tool alone doing the same work (the same decode, filter chain and
//!    RGB conversion, `ffmpeg_filter`) to nowhere (`-f null`), both single-threaded. The ratio is
//!    ours / baseline: what the pipe, the copies and our handling of the frames cost. (Until
//!    stop 38 the baseline only decoded, which charged the resize and conversion to us.)
//! 3. **built-in fps**: the openh264 path on a baseline-profile 640x360 file of ours.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use amity_shared::config::Config;
use amity_shared::corpus::h264::{decode_mp4, encode_mp4};
use amity_shared::corpus::ingest::{IngestOptions, ingest};
use amity_shared::corpus::synthetic::{SynthCorpusOptions, write_synthetic_corpus};
use amity_shared::corpus::video::{
    DecodeTarget, decode_ffmpeg, ffmpeg_filter, ffmpeg_program, ffmpeg_version,
};
use amity_shared::data::synth::{SynthConfig, generate};
use anyhow::{Context, Result, bail};

/// What to measure.
#[derive(Debug, Clone)]
pub struct IngestBenchOptions {
    /// Synthetic videos to ingest.
    pub videos: usize,
    /// Preset the corpus is cut for.
    pub preset: String,
    /// Scratch folder (removed afterwards).
    pub scratch: PathBuf,
}

/// The bench's figures; the last stdout line.
#[derive(Debug, Clone, Serialize)]
pub struct IngestBenchReport {
    /// Always `ingest`.
    pub bench: &'static str,
    /// Videos ingested.
    pub videos: usize,
    /// Clips packed.
    pub clips: u64,
    /// Whole-ingest wall time, seconds.
    pub seconds: f64,
    /// Clips per second through the whole ingest.
    pub clips_per_s: f64,
    /// Our FFmpeg path: 640x360 -> 128 px RGB frames per second (`null` without FFmpeg).
    pub decode_fps: Option<f64>,
    /// The `ffmpeg` tool alone doing the same decode, filters and RGB conversion to a null sink
    /// (`null` without FFmpeg).
    pub ffmpeg_fps: Option<f64>,
    /// `decode_fps / ffmpeg_fps`.
    pub ratio: Option<f64>,
    /// The built-in openh264 path, 640x360 baseline -> 128 px, frames per second.
    pub builtin_fps: f64,
}

/// Runs the bench, printing progress to stderr.
pub fn ingest_bench(opts: &IngestBenchOptions) -> Result<IngestBenchReport> {
    let config = Config::preset(&opts.preset)?;
    let _ = std::fs::remove_dir_all(&opts.scratch);
    std::fs::create_dir_all(&opts.scratch).context("scratch folder")?;
    let corpus = opts.scratch.join("corpus");
    let store = opts.scratch.join("store");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    eprintln!("writing {} synthetic MP4s ...", opts.videos);
    write_synthetic_corpus(
        &corpus,
        &SynthCorpusOptions {
            videos: opts.videos,
            threads,
            ..Default::default()
        },
        &|_| {},
    )?;
    eprintln!(
        "ingesting for preset {} ({})",
        opts.preset,
        ffmpeg_version().unwrap_or("FFmpeg not installed: built-in decoder")
    );
    let report = ingest(
        &corpus,
        &store,
        &IngestOptions::for_config(&config),
        &mut |_| {},
    )?;
    let clips = report.manifest.clips;
    let clips_per_s = clips as f64 / report.seconds;
    eprintln!(
        "ingest: {} videos -> {clips} clips in {} shards, {:.2} s, {clips_per_s:.1} clips/s",
        report.manifest.videos,
        report.manifest.shards.len(),
        report.seconds
    );

    // The built-in path on a baseline file of our own.
    let baseline_file = opts.scratch.join("baseline_640x360.mp4");
    let wide = wide_frames(60);
    encode_mp4(&wide, 640, 360, 30, &baseline_file)?;
    let t = Instant::now();
    let v = decode_mp4(&baseline_file, 128, 30.0, usize::MAX)?;
    let builtin_fps = v.frames as f64 / t.elapsed().as_secs_f64();
    eprintln!("built-in decode (openh264, 640x360 -> 128 px): {builtin_fps:.0} frames/s");

    let (mut decode_fps, mut ffmpeg_fps) = (None, None);
    if ffmpeg_version().is_some() {
        let x264 = opts.scratch.join("x264_640x360.mp4");
        make_x264_file(&x264)?;
        let target = DecodeTarget {
            size: 128,
            fps: 30.0,
            max_frames: 1_000_000,
        };
        let (ours, base) = (0..3)
            .map(|_| -> Result<(f64, f64)> {
                let t = Instant::now();
                let v = decode_ffmpeg(&x264, target)?;
                let ours = v.frames as f64 / t.elapsed().as_secs_f64();
                let t = Instant::now();
                run_ffmpeg(&[
                    "-threads",
                    "1",
                    "-i",
                    &x264.to_string_lossy(),
                    "-map",
                    "0:v:0",
                    "-an",
                    "-vf",
                    &ffmpeg_filter(target),
                    "-pix_fmt",
                    "rgb24",
                    "-f",
                    "null",
                    "-",
                ])?;
                Ok((ours, v.frames as f64 / t.elapsed().as_secs_f64()))
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .fold((0.0f64, 0.0f64), |(a, b), (x, y)| (a.max(x), b.max(y)));
        eprintln!(
            "FFmpeg path (640x360 x264 -> 128 px RGB): {ours:.0} frames/s; \
             `ffmpeg` alone, same filters and RGB to `-f null`: {base:.0} frames/s"
        );
        decode_fps = Some(ours);
        ffmpeg_fps = Some(base);
    } else {
        eprintln!("FFmpeg not installed: decode_fps and ffmpeg_fps are null");
    }
    let _ = std::fs::remove_dir_all(&opts.scratch);
    Ok(IngestBenchReport {
        bench: "ingest",
        videos: opts.videos,
        clips,
        seconds: report.seconds,
        clips_per_s,
        decode_fps,
        ffmpeg_fps,
        ratio: decode_fps.zip(ffmpeg_fps).map(|(a, b)| a / b),
        builtin_fps,
    })
}

/// 640x360 moving-shapes frames (a 360 px synthetic video, padded sideways with its gradient).
fn wide_frames(frames: usize) -> Vec<u8> {
    let v = generate(&SynthConfig::for_size(360, frames), 1);
    let mut out = Vec::with_capacity(frames * 640 * 360 * 3);
    for f in 0..frames {
        let src = v.frame(f);
        for y in 0..360 {
            let row = &src[y * 360 * 3..(y + 1) * 360 * 3];
            for x in 0..640 {
                let sx = (x * 360 / 640).min(359);
                out.extend_from_slice(&row[sx * 3..sx * 3 + 3]);
            }
        }
    }
    out
}

/// Ten seconds of FFmpeg's test pattern as ordinary x264 (high profile, B-frames).
fn make_x264_file(path: &Path) -> Result<()> {
    run_ffmpeg(&[
        "-y",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=30:duration=10",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        &path.to_string_lossy(),
    ])
}

fn run_ffmpeg(args: &[&str]) -> Result<()> {
    let out = Command::new(ffmpeg_program())
        .args(["-nostdin", "-hide_banner", "-loglevel", "error"])
        .args(args)
        .output()
        .context("running ffmpeg")?;
    if !out.status.success() {
        bail!(
            "ffmpeg {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
