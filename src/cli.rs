//! The command line: one clap subcommand per user task.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Amity: federated pretraining of JEPA world-model video encoders.
///
/// Institutions pool their GPUs to pretrain one shared V-JEPA encoder and publish it openly.
#[derive(Debug, Parser)]
#[command(name = "amity", version, about, long_about = None)]
pub struct Cli {
    /// More logging (-v debug, -vv trace); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Everything `amity` can do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system locally: synthetic corpus, coordinator, three workers, release, planner.
    Demo(crate::demo::DemoArgs),
    /// Run a coordinator: shard corpora, schedule rounds, aggregate updates, publish checkpoints.
    Coordinator(crate::federated_cmd::CoordinatorArgs),
    /// Join a coordinator with this machine's GPU or CPU and train on the shards it assigns.
    Worker(crate::federated_cmd::WorkerArgs),
    /// Synthesise, ingest and inspect video corpora as content-addressed shards.
    Corpus(crate::corpus_cmd::CorpusArgs),
    /// Train the JEPA on this machine alone, from a shard store or synthetic clips.
    Train(crate::train_cmd::TrainArgs),
    /// Turn a coordinator checkpoint into a signed release with a model card.
    Release(crate::release_cmd::ReleaseArgs),
    /// Download a release from a coordinator or a folder and verify every byte and its signature.
    Fetch(crate::release_cmd::FetchArgs),
    /// Compute features of a video or frame folder with a released encoder (NumPy .npy).
    Embed(crate::release_cmd::EmbedArgs),
    /// Slide a window over a video and flag physically impossible events by prediction error.
    Surprise(crate::plan_cmd::SurpriseArgs),
    /// Collect trajectories, train the action-conditioned world model and plan with it.
    Plan(crate::plan_cmd::PlanArgs),
    /// Run a benchmark beside its baseline and print the ratios (last line: JSON).
    Bench(BenchArgs),
    /// Manage the operator's certificate authority, institution certificates and release keys.
    Ca(crate::ca_cmd::CaArgs),
}

/// `amity bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub bench: Bench,
}

/// The benchmarks. Each prints its baseline beside it; the last stdout line is JSON.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Median V-JEPA training step against the PyTorch reference on the same shapes.
    TrainStep(TrainStepArgs),
    /// Corpus ingest throughput, and our video decode beside the `ffmpeg` tool's.
    Ingest(IngestBenchArgs),
    /// Bulk transfer over loopback: QUIC beside TCP+TLS 1.3 and plain TCP.
    Transfer(TransferBenchArgs),
    /// DDP vs DiLoCo vs compressed DiLoCo: bytes on the wire, loss and probe R² on equal
    /// samples; prints `{"bench":"federated",...}` last.
    Federated(crate::federated_cmd::FederatedBenchArgs),
    /// Latent planning success beside a random policy and a simulator oracle, per environment;
    /// prints `{"bench":"plan",...}` last.
    Plan(crate::plan_cmd::PlanBenchArgs),
    /// Surprise detector: paired accuracy and AUROC on synthetic violation pairs; prints
    /// `{"bench":"surprise",...}` last.
    Surprise(crate::plan_cmd::SurpriseBenchArgs),
}

/// `amity bench transfer`.
#[derive(Debug, Args)]
pub struct TransferBenchArgs {
    /// MiB moved per transport.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
}

/// `amity bench ingest`.
#[derive(Debug, Args)]
pub struct IngestBenchArgs {
    /// Synthetic videos to ingest.
    #[arg(long, default_value_t = 100)]
    pub videos: usize,
    /// Preset the corpus is cut for.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
}

/// `amity bench train-step`.
#[derive(Debug, Args)]
pub struct TrainStepArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Clips per step (default: the preset's).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// The fixed PyTorch reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/bench/torch_vjepa.py"))]
    pub torch_script: PathBuf,
    /// Python with PyTorch (default: $AMITY_BENCH_PYTHON, the setup-torch.sh venv, python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => crate::demo::demo(args),
        Command::Coordinator(args) => crate::federated_cmd::coordinator(args),
        Command::Worker(args) => crate::federated_cmd::worker(args),
        Command::Corpus(args) => crate::corpus_cmd::run(args),
        Command::Train(args) => crate::train_cmd::run(args),
        Command::Release(a) => crate::release_cmd::release(a),
        Command::Fetch(a) => crate::release_cmd::fetch(a),
        Command::Embed(a) => crate::release_cmd::embed(a),
        Command::Surprise(a) => crate::plan_cmd::surprise(a),
        Command::Plan(a) => crate::plan_cmd::plan(a),
        Command::Bench(args) => bench(args),
        Command::Ca(args) => crate::ca_cmd::run(args),
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    match args.bench {
        Bench::Plan(a) => crate::plan_cmd::bench_plan(a),
        Bench::Surprise(a) => crate::plan_cmd::bench_surprise(a),
        Bench::Federated(a) => crate::federated_cmd::bench_federated(a),
        Bench::Transfer(a) => {
            let scratch =
                std::env::temp_dir().join(format!("amity-bench-transfer-{}", std::process::id()));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(amity_protocol::bench::transfer(a.mib << 20, &scratch))?;
            println!(
                "transfer {} MiB: QUIC {:.2} GB/s (1 stream {:.2}, 4 streams {:.2}), TCP+TLS {:.2} GB/s, \
                 TCP {:.2} GB/s; QUIC/TLS {:.2}",
                a.mib,
                r.quic_gbps,
                r.quic_1_stream_gbps,
                r.quic_4_streams_gbps,
                r.tls_gbps,
                r.tcp_gbps,
                r.ratio
            );
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Bench::Ingest(a) => {
            use amity_shared::bench::{IngestBenchOptions, ingest_bench};
            let scratch =
                std::env::temp_dir().join(format!("amity-bench-ingest-{}", std::process::id()));
            let r = ingest_bench(&IngestBenchOptions {
                videos: a.videos,
                preset: a.preset,
                scratch,
            })?;
            let fmt = |x: Option<f64>| x.map_or("n/a".to_owned(), |v| format!("{v:.0}"));
            println!(
                "ingest: {:.1} clips/s ({} clips, {:.2} s); decode {} frames/s vs ffmpeg alone {} \
                 (ratio {}); built-in openh264 {:.0} frames/s",
                r.clips_per_s,
                r.clips,
                r.seconds,
                fmt(r.decode_fps),
                fmt(r.ffmpeg_fps),
                r.ratio.map_or("n/a".to_owned(), |v| format!("{v:.2}")),
                r.builtin_fps
            );
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Bench::TrainStep(a) => {
            use amity_shared::bench::{TrainStepOptions, find_torch_python, train_step};
            let (torch_script, python) = if a.no_torch {
                (None, None)
            } else if !a.torch_script.exists() {
                eprintln!(
                    "torch: reference script {} not found; torch_ms is null",
                    a.torch_script.display()
                );
                (None, None)
            } else {
                (Some(a.torch_script), a.python.or_else(find_torch_python))
            };
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let report = train_step(&TrainStepOptions {
                preset: a.preset,
                batch: a.batch,
                steps: a.steps,
                warmup: a.warmup,
                torch_script,
                python,
                threads,
            })?;
            if let Some(ratio) = report.ratio {
                println!(
                    "train-step {}: amity {:.2} ms, torch {:.2} ms, ratio {:.2}x (full 2-set step {:.2} ms)",
                    report.preset,
                    report.amity_ms,
                    report.torch_ms.unwrap_or(f64::NAN),
                    ratio,
                    report.amity_full_step_ms
                );
            } else {
                println!(
                    "train-step {}: amity {:.2} ms (full 2-set step {:.2} ms), no torch baseline",
                    report.preset, report.amity_ms, report.amity_full_step_ms
                );
            }
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}
