//! `amity release`, `amity fetch` and `amity embed`: publishing a model and using it downstream.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;

use amity_coordinator::config::CoordinatorConfig;
use amity_coordinator::release::{ReleaseRequest, release_round};
use amity_release::known::KnownPublishers;
use amity_release::known::{Trust, TrustOutcome};
use amity_release::publish::{PublishOptions, publish};
use amity_release::sign::{PublicKey, ReleaseKey, SignError};
use amity_release::{FetchReport, ReleaseError, Signed, fetch_folder};
use amity_shared::train::Trainer;

use amity_release::fetch::{FetchError, QuicSource, fetch_quic};

/// `amity release`: a checkpoint becomes a signed release with a model card.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The release's name (letters, digits, `.`, `_`, `-`).
    #[arg(long)]
    pub name: String,
    /// The coordinator's config: publish its checkpoint into `<state_dir>/releases/<name>`,
    /// where the coordinator serves it.
    #[arg(long, conflicts_with = "checkpoint")]
    pub config: Option<PathBuf>,
    /// The round whose checkpoint to publish (default: the latest).
    #[arg(long, requires = "config")]
    pub round: Option<u64>,
    /// Publish this checkpoint file instead (e.g. from `amity train`); needs `--out`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Publisher name for `--checkpoint` releases (a coordinator uses its `name`).
    #[arg(long, default_value = "amity")]
    pub publisher: String,
    /// The release signing key (default with `--config`: `<ca_dir>/release.key`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Also write the release here as a plain folder (to mirror on a web server or object
    /// store); required with `--checkpoint`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Synthetic videos for the frozen-encoder probe evaluation in the model card (0: none).
    #[arg(long, default_value_t = 240)]
    pub probe_videos: usize,
    /// Licence of the weights (SPDX id).
    #[arg(long, default_value = "Apache-2.0")]
    pub licence: String,
}

/// `amity fetch`: download a release and verify every byte and its signature.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// A coordinator (`host:port`) or a release folder (a mirror).
    pub source: String,
    /// The release's name (`latest` for a coordinator's newest); ignored for a folder.
    #[arg(default_value = "latest")]
    pub release: String,
    /// Where the verified release goes (must not exist, unless it already holds this release).
    #[arg(long)]
    pub out: PathBuf,
    /// The publisher's public key (64 hex digits or a `release.pub` file). Without it the key
    /// pinned for the publisher at this source in the known-publishers file must match, like
    /// SSH's known hosts; a first use is asked about on a terminal and refused otherwise.
    #[arg(long)]
    pub key: Option<String>,
    /// Pin an unknown publisher's key on first use without asking (scripts). Implied by `--ca`,
    /// which authenticates the coordinator the key comes from.
    #[arg(long)]
    pub accept_new: bool,
    /// The known-publishers file (default: `$AMITY_KNOWN_PUBLISHERS` or
    /// `~/.amity/known_publishers`).
    #[arg(long)]
    pub known_publishers: Option<PathBuf>,
    /// The operator CA certificate to authenticate the coordinator with (optional: the release
    /// signature is what makes a download trustworthy).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The coordinator's certificate name.
    #[arg(long, default_value = "coordinator")]
    pub server_name: String,
    /// Fault injection for tests: drop the connection once this many bytes arrived.
    #[arg(long, hide = true)]
    pub fault_drop_after_bytes: Option<u64>,
}

/// `amity embed`: features of a video with a released encoder.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A video file (any container FFmpeg reads; baseline MP4 without it) or a folder of frames.
    pub input: PathBuf,
    /// The release folder (from `amity fetch`).
    #[arg(long)]
    pub release: PathBuf,
    /// Per-clip features (mean over tokens), `clips x width` float32 `.npy`.
    #[arg(long, default_value = "features.npy")]
    pub out: PathBuf,
    /// Also write per-token features, `clips x tokens x width`, here.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Resampled frames between clip starts (default: one clip span, no overlap).
    #[arg(long)]
    pub stride: Option<usize>,
}

/// Runs `amity ca release-key`.
pub fn release_key(dir: &Path) -> Result<()> {
    let (key, key_path, pub_path) = ReleaseKey::generate(dir)?;
    println!(
        "release signing key {} (keep it secret) and public key {} ({})\ndownstream users \
         verify releases with: amity fetch ... --key {}",
        key_path.display(),
        pub_path.display(),
        key.public().to_hex(),
        key.public().to_hex()
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        bail!("{} already exists", to.display());
    }
    std::fs::create_dir_all(to).with_context(|| to.display().to_string())?;
    for e in std::fs::read_dir(from).with_context(|| from.display().to_string())? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))
            .with_context(|| format!("copying {}", e.path().display()))?;
    }
    Ok(())
}

fn describe(signed: &Signed, dir: &Path) {
    let m = &signed.manifest;
    println!(
        "release `{}` (round {}) by `{}`, key {}: {} files, {} bytes, in {}",
        m.name,
        m.round,
        m.publisher,
        m.public_key,
        m.files.len(),
        m.total_bytes(),
        dir.display()
    );
    for f in &m.files {
        println!(
            "  {:<20} {:>12} bytes  blake3 {}",
            f.path, f.bytes, f.blake3
        );
    }
}

/// Runs `amity release`.
pub fn release(args: ReleaseArgs) -> Result<()> {
    match (&args.config, &args.checkpoint) {
        (Some(config), None) => {
            let cfg = CoordinatorConfig::load(config)?;
            let key_path = args
                .key
                .clone()
                .unwrap_or_else(|| cfg.ca_dir.join("release.key"));
            let key = ReleaseKey::load(&key_path).with_context(|| {
                format!(
                    "the release key (create one with `amity ca release-key --dir {}`)",
                    cfg.ca_dir.display()
                )
            })?;
            let req = ReleaseRequest {
                name: args.name.clone(),
                round: args.round,
                probe_videos: args.probe_videos,
                licence: args.licence.clone(),
                evaluation: Vec::new(),
            };
            let (signed, dir) = release_round(&cfg, &req, &key)?;
            describe(&signed, &dir);
            println!(
                "the coordinator serves it as `{}` (and as `latest` when newest)",
                args.name
            );
            if let Some(out) = &args.out {
                copy_dir(&dir, out)?;
                println!("mirror copy written to {}", out.display());
            }
        }
        (None, Some(checkpoint)) => {
            let Some(out) = &args.out else {
                bail!("--checkpoint needs --out (the release folder to write)");
            };
            let Some(key_path) = &args.key else {
                bail!("--checkpoint needs --key (a release.key from `amity ca release-key`)");
            };
            let key = ReleaseKey::load(key_path)?;
            let opts = PublishOptions {
                name: args.name.clone(),
                publisher: args.publisher.clone(),
                corpus: None,
                evaluation: Vec::new(),
                probe_videos: args.probe_videos,
                licence: args.licence.clone(),
            };
            let signed = publish(checkpoint, out, &opts, &key)?;
            describe(&signed, out);
        }
        _ => bail!(
            "say what to release: --config <coordinator.toml> [--round R], or --checkpoint <file> --out <dir>"
        ),
    }
    Ok(())
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {wide_bar}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The trust of a fetch from `origin` (the coordinator's address or the mirror folder).
fn trust_of(args: &FetchArgs, origin: String) -> Result<Trust> {
    let key = args.key.as_deref().map(PublicKey::parse_arg).transpose()?;
    let file = args
        .known_publishers
        .clone()
        .unwrap_or_else(KnownPublishers::default_file);
    Ok(Trust {
        key,
        known: Some(KnownPublishers::new(file)),
        origin,
        accept_new: args.accept_new || args.ca.is_some(),
    })
}

/// Whether `e` is a first use of a publisher that was not allowed to be pinned.
/// The refusal may come as itself or inside a release or fetch error, whose `transparent` display
/// hides it from the source chain: each is looked into.
fn unknown_publisher(e: &anyhow::Error) -> Option<&SignError> {
    e.chain()
        .filter_map(sign_error)
        .find(|s| matches!(s, SignError::UnknownPublisher { .. }))
}

/// The signature error `c` is or wraps, if any.
fn sign_error<'a>(c: &'a (dyn std::error::Error + 'static)) -> Option<&'a SignError> {
    if let Some(s) = c.downcast_ref::<SignError>() {
        return Some(s);
    }
    match (
        c.downcast_ref::<ReleaseError>(),
        c.downcast_ref::<FetchError>(),
    ) {
        (Some(ReleaseError::Sign(s)), _) => Some(s),
        (_, Some(FetchError::Release(ReleaseError::Sign(s)))) => Some(s),
        _ => None,
    }
}

/// Asks on the terminal whether to pin the key named in `e`.
fn confirm_new_publisher(e: &SignError) -> Result<bool> {
    use std::io::Write;
    let SignError::UnknownPublisher {
        publisher,
        origin,
        key,
    } = e
    else {
        return Ok(false);
    };
    eprint!(
        "first release from publisher `{publisher}` at {origin}.\nIts key is {key}.\n\
         Check it with the publisher. Trust it from now on? [y/N] "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes"))
}

fn report(r: &FetchReport) {
    if let TrustOutcome::PinnedNew(file) = &r.trust {
        println!(
            "first release from `{}`: trusting its key {} from now on (pinned in {})",
            r.manifest.publisher,
            r.manifest.public_key,
            file.display()
        );
    }
    if r.already_present {
        println!(
            "{} already holds release `{}`, verified",
            r.out.display(),
            r.manifest.name
        );
    } else {
        println!(
            "fetched release `{}` (round {}) by `{}`: {} files, {} bytes, every BLAKE3 and the \
             signature verified, in {}",
            r.manifest.name,
            r.manifest.round,
            r.manifest.publisher,
            r.manifest.files.len(),
            r.transferred,
            r.out.display()
        );
    }
}

/// Runs `amity fetch`.
pub fn fetch(args: FetchArgs) -> Result<()> {
    let src = Path::new(&args.source);
    let origin = if src.is_dir() {
        std::fs::canonicalize(src)
            .with_context(|| src.display().to_string())?
            .display()
            .to_string()
    } else {
        args.source.clone()
    };
    let mut trust = trust_of(&args, origin)?;
    let r = match fetch_with(&args, &trust) {
        Err(e) if std::io::stdin().is_terminal() && unknown_publisher(&e).is_some() => {
            let asked = unknown_publisher(&e).expect("checked");
            if !confirm_new_publisher(asked)? {
                return Err(e);
            }
            trust.accept_new = true;
            fetch_with(&args, &trust)?
        }
        other => other?,
    };
    report(&r);
    Ok(())
}

/// One fetch from a folder or a coordinator under `trust`.
fn fetch_with(args: &FetchArgs, trust: &Trust) -> Result<FetchReport> {
    let src = Path::new(&args.source);
    let r = if src.is_dir() {
        let signed = Signed::read(src)?;
        let bar = progress_bar(signed.manifest.total_bytes());
        let r = fetch_folder(src, &args.out, trust, &mut |n| bar.set_position(n));
        bar.finish_and_clear();
        r?
    } else {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&args.source)
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| {
                format!(
                    "{}: neither a release folder nor a coordinator address (host:port)",
                    args.source
                )
            })?;
        let source = QuicSource {
            addr,
            server_name: args.server_name.clone(),
            server_ca: args.ca.clone(),
            drop_after_bytes: args.fault_drop_after_bytes,
        };
        fetch_over_quic(&source, &args.release, &args.out, trust)?
    };
    Ok(r)
}

/// [`fetch_quic`] on a runtime of its own, with a progress bar.
pub fn fetch_over_quic(
    source: &QuicSource,
    release: &str,
    out: &Path,
    trust: &Trust,
) -> Result<FetchReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(fetch_quic_with_bar(source, release, out, trust))
}

/// [`fetch_quic`] with a progress bar (for callers inside a runtime).
pub async fn fetch_quic_with_bar(
    source: &QuicSource,
    release: &str,
    out: &Path,
    trust: &Trust,
) -> Result<FetchReport> {
    let progress = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(0);
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.load(Ordering::Relaxed));
                bar.set_length(bar.length().unwrap_or(0).max(bar.position()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let r = fetch_quic(source, release, out, trust, progress).await;
    ticker.abort();
    bar.finish_and_clear();
    Ok(r?)
}

/// Runs `amity embed`.
pub fn embed(args: EmbedArgs) -> Result<()> {
    let ckpt = amity_release::load_model(&args.release)?;
    let device = Device::flex();
    let trainer = Trainer::from_checkpoint(&ckpt, &device)?;
    let video = amity_shared::eval::embed::decode_for(&args.input, &ckpt.config)?;
    let e = amity_shared::eval::embed::embed_video(
        &trainer,
        &video,
        args.stride,
        args.tokens.is_some(),
    )?;
    let clips = e.starts.len();
    amity_shared::eval::npy::write(&args.out, &[clips, e.width], &e.pooled)?;
    if let (Some(path), Some(t)) = (&args.tokens, &e.token_features) {
        amity_shared::eval::npy::write(path, &[clips, e.tokens, e.width], t)?;
    }
    let fps = ckpt.config.data.fps;
    println!(
        "{}: {} frames at {fps} fps -> {clips} clips (starting at {}) -> {} ({clips} x {})",
        args.input.display(),
        video.frames,
        e.starts
            .iter()
            .map(|s| format!("{:.1}s", *s as f64 / fps))
            .collect::<Vec<_>>()
            .join(", "),
        args.out.display(),
        e.width
    );
    if let Some(path) = &args.tokens {
        println!(
            "token features: {} ({clips} x {} x {})",
            path.display(),
            e.tokens,
            e.width
        );
    }
    Ok(())
}
