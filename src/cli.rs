//! The command line: one clap subcommand per user task.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Amity: federated pretraining of JEPA world-model video encoders.
///
/// Institutions pool their GPUs to pretrain one shared V-JEPA encoder and publish it openly.
#[derive(Debug, Parser)]
#[command(name = "amity", version, about, long_about = None)]
pub struct Cli {
    /// More logging (-v debug, -vv trace); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log lines on stderr: `text` for people (colour only on a terminal), `json` for log
    /// collectors (one JSON object per line; a worker's progress lines become log events too).
    #[arg(long, global = true, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,

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
    /// Check this machine before joining: backends and speed, memory, disk, UDP buffers,
    /// certificate, and path MTU, reachability, round trip and clock offset to the coordinator.
    Doctor(crate::doctor_cmd::DoctorArgs),
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
    Bench(crate::bench::BenchArgs),
    /// Manage the operator's certificate authority, institution certificates and release keys.
    Ca(crate::ca_cmd::CaArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => crate::demo::demo(args),
        Command::Coordinator(args) => crate::federated_cmd::coordinator(args),
        Command::Worker(args) => crate::federated_cmd::worker(args, cli.log_format),
        Command::Doctor(args) => crate::doctor_cmd::doctor(args),
        Command::Corpus(args) => crate::corpus_cmd::run(args),
        Command::Train(args) => crate::train_cmd::run(args),
        Command::Release(a) => crate::release_cmd::release(a),
        Command::Fetch(a) => crate::release_cmd::fetch(a),
        Command::Embed(a) => crate::release_cmd::embed(a),
        Command::Surprise(a) => crate::plan_cmd::surprise(a),
        Command::Plan(a) => crate::plan_cmd::plan(a),
        Command::Bench(args) => crate::bench::run(args),
        Command::Ca(args) => crate::ca_cmd::run(args),
    }
}
