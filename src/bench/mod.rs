//! `amity bench ...`: each benchmark runs its baseline in the same invocation and prints both
//! with their ratio, ending with one JSON line of figures.
//!
//! The bodies of benches that only this command runs live here, next to it: `federated` (the
//! real coordinator and worker cores wired in process), `replication` (coordinator processes on
//! loopback), `scale` (the coordinator core with a thousand simulated workers), `ingest`,
//! `probe` (a checkpoint's probes through two readouts) and `train-step`, and the command-line
//! shells of `plan` and `surprise`. `transfer` lives in `amity-protocol` (it measures that crate's transport); the bodies of `plan` and `surprise`
//! live in `amity-planner`.

mod federated;
mod ingest;
mod plan;
mod probe;
mod replication;
mod scale;
mod surprise;
mod train_step;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

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
    /// Bulk transfer over loopback: our blob protocol on QUIC beside bare quinn, TCP+TLS 1.3
    /// and plain TCP, with where our path loses.
    Transfer(TransferBenchArgs),
    /// DDP vs DiLoCo vs compressed DiLoCo: bytes on the wire, loss and probe R² on equal
    /// samples; prints `{"bench":"federated",...}` last.
    Federated(federated::FederatedBenchArgs),
    /// A replicated coordinator beside a single one: seconds and bytes per round, failover time
    /// over repeated leader kills, snapshot transfer; prints `{"bench":"replication",...}` last.
    Replication(replication::ReplicationBenchArgs),
    /// Latent planning success beside a random policy and a simulator oracle, per environment;
    /// prints `{"bench":"plan",...}` last.
    Plan(plan::PlanBenchArgs),
    /// A checkpoint's probes through the standard readout (features averaged over space) and
    /// one that keeps where features fired, beside a random encoder's; prints
    /// `{"bench":"probe",...}` last.
    Probe(probe::ProbeBenchArgs),
    /// Surprise detector: paired accuracy and AUROC on synthetic violation pairs; prints
    /// `{"bench":"surprise",...}` last.
    Surprise(surprise::SurpriseBenchArgs),
    /// The coordinator core with 1000 simulated workers: round close time, peak memory over
    /// the model state, aggregation beside memcpy; prints `{"bench":"scale",...}` last.
    Scale(scale::ScaleBenchArgs),
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
    /// The backend Amity's step runs on (`flex`, or a GPU backend compiled in).
    #[arg(long, default_value = "flex")]
    pub backend: String,
    /// PyTorch's device for the reference (default: `cpu` beside `flex`, else `cuda`).
    #[arg(long)]
    pub torch_device: Option<String>,
    /// CPU kernels to time: `both` (Amity's, then burn's operations in their place, side by
    /// side), or only `amity` or `burn` (for profilers such as callgrind: one kind per process).
    #[arg(long, value_enum, default_value_t = train_step::KernelsToTime::Both)]
    pub kernels: train_step::KernelsToTime,
}

/// Runs one benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.bench {
        Bench::Plan(a) => plan::bench_plan(a),
        Bench::Surprise(a) => surprise::bench_surprise(a),
        Bench::Federated(a) => federated::run(a),
        Bench::Probe(a) => probe::run(a),
        Bench::Replication(a) => replication::run(a),
        Bench::Scale(a) => {
            let r = scale::run(a)?;
            println!(
                "scale {} workers ({}, {}): round close {:.0} ms, heap peak {:.2}x the model state, \
                 aggregation {:.2} GB/s = {:.2}x memcpy ({:.2} GB/s)",
                r.workers,
                r.preset,
                r.codec,
                r.close_ms,
                r.peak_mem_ratio,
                r.agg_gbps,
                r.agg_vs_memcpy,
                r.memcpy_gbps
            );
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Bench::Transfer(a) => {
            let scratch =
                std::env::temp_dir().join(format!("amity-bench-transfer-{}", std::process::id()));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(amity_protocol::bench::transfer(a.mib << 20, &scratch))?;
            print_transfer(&r, a.mib);
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Bench::Ingest(a) => {
            use ingest::{IngestBenchOptions, ingest_bench};
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
            use train_step::{TrainStepOptions, find_torch_python, train_step};
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
            let backend = amity_shared::device::Backend::parse_available(&a.backend)?;
            let torch_device = a.torch_device.unwrap_or_else(|| {
                let cpu = backend == amity_shared::device::Backend::Flex;
                (if cpu { "cpu" } else { "cuda" }).to_owned()
            });
            let report = train_step(&TrainStepOptions {
                preset: a.preset,
                batch: a.batch,
                steps: a.steps,
                warmup: a.warmup,
                torch_script,
                python,
                threads,
                backend,
                torch_device,
                kernels: a.kernels,
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

/// `amity bench transfer`'s summary line.
fn print_transfer(r: &amity_protocol::bench::TransferReport, mib: u64) {
    println!(
        "transfer {} MiB: ours (blob protocol on QUIC) {:.2} GB/s, bare quinn {:.2} GB/s \
         (ours/bare {:.2}), bare quinn to a file {:.2} GB/s (ours/that {:.2}), TCP+TLS {:.2} \
         GB/s (ours/TLS {:.2}), TCP {:.2} GB/s; CPU per GiB, both ends: ours {:.2} s, bare quinn \
         {:.2} s, bare quinn to a file {:.2} s",
        mib,
        r.quic_gbps,
        r.bare_quinn_gbps,
        r.ratio_bare,
        r.bare_to_file_gbps,
        r.ratio_bare_to_file,
        r.tls_gbps,
        r.ratio,
        r.tcp_gbps,
        r.quic_cpu_s_per_gib,
        r.bare_cpu_s_per_gib,
        r.bare_to_file_cpu_s_per_gib
    );
}
