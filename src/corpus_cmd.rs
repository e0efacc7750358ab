//! `amity corpus`: synthesise, ingest and verify video corpora.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use amity_shared::config::Config;
use amity_shared::corpus::ingest::{DEFAULT_SHARD_BYTES, IngestOptions, ingest};
use amity_shared::corpus::loader::ShardSet;
use amity_shared::corpus::manifest::Manifest;
use amity_shared::corpus::synthetic::{SynthCorpusOptions, write_synthetic_corpus};
use amity_shared::corpus::video::{DecoderChoice, ffmpeg_version};

/// `amity corpus`.
#[derive(Debug, Args)]
pub struct CorpusArgs {
    #[command(subcommand)]
    pub command: CorpusCommand,
}

/// The corpus tasks.
#[derive(Debug, Subcommand)]
pub enum CorpusCommand {
    /// Write a synthetic corpus of MP4 files with ground-truth labels.
    Synth(SynthArgs),
    /// Decode a folder of videos, cut clips and pack them into content-addressed shards.
    Ingest(IngestArgs),
    /// Check every shard of a store against its hash and its header.
    Verify(VerifyArgs),
}

/// `amity corpus synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Videos to write (pairs, with --violations).
    #[arg(long, default_value_t = 200)]
    pub videos: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frame side in pixels (even).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Frames per video.
    #[arg(long, default_value_t = 48)]
    pub frames: usize,
    /// Frames per second.
    #[arg(long, default_value_t = 10)]
    pub fps: u32,
    /// Write matched possible/impossible pairs (for the surprise detector) and pairs.json.
    #[arg(long)]
    pub violations: bool,
}

/// `amity corpus ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Folder of videos (MP4, WebM, MKV, AVI, ...) and/or frame folders; searched recursively.
    pub input: PathBuf,
    /// Shard store to write (`manifest.json` and `blobs/`).
    #[arg(long)]
    pub store: PathBuf,
    /// Preset whose clip shape, frame rate and sampling to cut for.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// A TOML config instead of a preset (its model and data sections are used).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of the clip sampling (default: the config's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Target shard size in MiB (fractions allowed).
    #[arg(long, default_value_t = (DEFAULT_SHARD_BYTES >> 20) as f64)]
    pub shard_mib: f64,
    /// Video decoder: auto (built-in for baseline MP4, FFmpeg for the rest), ffmpeg, builtin.
    #[arg(long, default_value = "auto")]
    pub decoder: DecoderChoice,
    /// Decoding threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `amity corpus verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Shard store.
    #[arg(long)]
    pub store: PathBuf,
}

/// Runs `amity corpus`.
pub fn run(args: CorpusArgs) -> Result<()> {
    match args.command {
        CorpusCommand::Synth(a) => synth(a),
        CorpusCommand::Ingest(a) => ingest_cmd(a),
        CorpusCommand::Verify(a) => verify(a),
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn synth(a: SynthArgs) -> Result<()> {
    if !a.size.is_multiple_of(2) || a.size < 16 {
        bail!("--size must be even and at least 16 (H.264 4:2:0)");
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let progress = bar(a.videos as u64, "synth");
    let summary = write_synthetic_corpus(
        &a.out,
        &SynthCorpusOptions {
            videos: a.videos,
            seed: a.seed,
            size: a.size,
            frames: a.frames,
            fps: a.fps,
            violations: a.violations,
            threads,
        },
        &|done| progress.set_position(done as u64),
    )?;
    progress.finish_and_clear();
    println!(
        "wrote {} MP4 files ({:.1} MiB) with labels to {}{}",
        summary.files,
        summary.bytes as f64 / (1 << 20) as f64,
        a.out.display(),
        if a.violations {
            format!(", {} pairs indexed in pairs.json", summary.pairs.len())
        } else {
            String::new()
        }
    );
    Ok(())
}

fn ingest_cmd(a: IngestArgs) -> Result<()> {
    let config = match &a.config {
        Some(path) => Config::from_toml_file(path)?,
        None => Config::preset(&a.preset)?,
    };
    let mut opts = IngestOptions::for_config(&config);
    if let Some(seed) = a.seed {
        opts.seed = seed;
    }
    if !(a.shard_mib.is_finite() && a.shard_mib > 0.0) {
        bail!("--shard-mib must be positive");
    }
    opts.shard_bytes = (a.shard_mib * (1 << 20) as f64) as usize;
    opts.decoder = a.decoder;
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    eprintln!(
        "ingest {} -> {} for preset {} ({} frames of {}px at {} fps, step {}); decoder: {}",
        a.input.display(),
        a.store.display(),
        config.preset,
        config.model.frames,
        config.model.image_size,
        config.data.fps,
        config.data.frame_step,
        match (a.decoder, ffmpeg_version()) {
            (DecoderChoice::Builtin, _) | (DecoderChoice::Auto, None) =>
                "built-in (MP4 + baseline H.264)".to_owned(),
            (DecoderChoice::Auto, Some(v)) => format!("built-in for baseline MP4, else {v}"),
            (DecoderChoice::Ffmpeg, Some(v)) => v.to_owned(),
            (DecoderChoice::Ffmpeg, None) => "ffmpeg (not found)".to_owned(),
        }
    );
    let progress = bar(0, "ingest");
    let report = ingest(&a.input, &a.store, &opts, &mut |p| {
        progress.set_length(p.total as u64);
        progress.set_position(p.done as u64);
        progress.set_message(format!("{} clips, {} skipped", p.clips, p.skipped));
    })?;
    progress.finish_and_clear();
    let m = &report.manifest;
    for s in &m.skipped {
        eprintln!("skipped {}: {}", a.input.join(&s.path).display(), s.reason);
    }
    println!(
        "{} videos -> {} clips in {} shards ({:.1} MiB, {} new), {} skipped, {} labelled; \
         {:.1} s ({:.0} frames/s decoded)",
        m.videos,
        m.clips,
        m.shards.len(),
        m.total_bytes() as f64 / (1 << 20) as f64,
        report.new_shards,
        m.skipped.len(),
        if m.labelled { "all" } else { "not" },
        report.seconds,
        report.decoded_frames as f64 / report.seconds.max(1e-9)
    );
    println!(
        "manifest {} ({})",
        m.id(),
        a.store.join("manifest.json").display()
    );
    if m.clips == 0 {
        bail!("no clip could be cut from {}", a.input.display());
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let manifest = Manifest::load(&a.store)?;
    let set = ShardSet::open(&a.store, &manifest, None)
        .with_context(|| format!("verifying {}", a.store.display()))?;
    println!(
        "ok: {} shards, {} clips of {} x {}px, manifest {}",
        manifest.shards.len(),
        set.len(),
        set.frames(),
        set.size(),
        manifest.id()
    );
    Ok(())
}
