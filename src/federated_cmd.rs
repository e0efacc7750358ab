//! `amity coordinator`, `amity worker` and `amity demo`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;

use amity_coordinator::config::CoordinatorConfig;
use amity_coordinator::server;
use amity_protocol::tls::Identity;
use amity_shared::device::Backend;
use amity_worker::config::WorkerConfig;
use amity_worker::{CoordinatorAddr, Fault, WorkerOptions};

/// `amity coordinator`: schedule rounds, aggregate, checkpoint.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorArgs {
    /// The coordinator's TOML config (see `amity_coordinator::config` for every key). Send the
    /// process SIGHUP to reload its `revoked` list without a restart.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Exit once `rounds.max_rounds` are done (instead of serving until Ctrl-C).
    #[arg(long)]
    pub exit_when_finished: bool,
    /// Ask a running coordinator instead of running one.
    #[command(subcommand)]
    pub command: Option<CoordinatorCommand>,
}

/// What `amity coordinator` can ask a running coordinator.
#[derive(Debug, clap::Subcommand)]
pub enum CoordinatorCommand {
    /// Print the state of each coordinator (or replica) given: round, parameters, workers and,
    /// for a replica, its term, leader, commit and applied index and (on the leader) every
    /// replica's lag. Each answer is a linearizable read: it holds everything committed before
    /// the question.
    Status(crate::status_cmd::StatusArgs),
    /// Add, remove or replace a replica of a replicated coordinator, one change at a time
    /// (an operator certificate: `amity ca issue --role operator`).
    Members(crate::members_cmd::MembersArgs),
}

/// `amity worker`: train rounds for a coordinator.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// A `worker.toml` holding these settings (`deploy/worker.toml` lists every key); a flag
    /// given here wins over the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The coordinator's address (`host:port`), or every replica's, comma-separated
    /// (`a:7700,b:7700,c:7700`); an entry may name its certificate (`coord-a@a:7700`), else
    /// `--server-name` is expected.
    #[arg(long, value_delimiter = ',')]
    pub coordinator: Vec<String>,
    /// This worker's certificate (from `amity ca issue`).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Its private key (default: the certificate's path with `.key` for `.crt`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The operator CA certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The certificate name expected of coordinator addresses that name none
    /// [default: coordinator].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Compute backend (`--list-backends` shows this build's) [default: flex].
    #[arg(long)]
    pub backend: Option<String>,
    /// List the backends compiled into this build and exit.
    #[arg(long)]
    pub list_backends: bool,
    /// Cache folder for fetched shards and outgoing updates [default: amity-worker-cache].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Your institution's own shard store: registered by shard id, never uploaded.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Make every step take this many times as long (stands in for slower hardware).
    #[arg(long, default_value_t = 1.0)]
    pub slowdown: f64,
    /// Fault injection for tests (a hostile institution): `nan`, `huge`, `flip`, `oversize`,
    /// `replay`, `scale:<factor>`, `noise:<sigma>` or `claim:<factor>`.
    #[arg(long, hide = true)]
    pub fault: Option<String>,
    /// Serve Prometheus `/metrics` on this TCP address (e.g. `127.0.0.1:9465`).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl WorkerArgs {
    /// The settings: `--config`'s file, with every flag given here over it.
    fn settings(&self) -> Result<WorkerConfig> {
        let file = match &self.config {
            Some(path) => WorkerConfig::load(path)?,
            None => WorkerConfig::default(),
        };
        let over = |flag: &Option<PathBuf>, file: Option<PathBuf>| flag.clone().or(file);
        Ok(WorkerConfig {
            coordinator: if self.coordinator.is_empty() {
                file.coordinator
            } else {
                self.coordinator.clone()
            },
            cert: over(&self.cert, file.cert),
            key: over(&self.key, file.key),
            ca: over(&self.ca, file.ca),
            cache: over(&self.cache, file.cache),
            corpus: over(&self.corpus, file.corpus),
            server_name: self.server_name.clone().or(file.server_name),
            backend: self.backend.clone().or(file.backend),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    match args.command {
        Some(CoordinatorCommand::Status(status)) => return crate::status_cmd::status(status),
        Some(CoordinatorCommand::Members(members)) => return crate::members_cmd::members(members),
        None => {}
    }
    let Some(config) = args.config else {
        bail!("amity coordinator needs --config <coordinator.toml> (or `status` to ask one)");
    };
    let cfg = CoordinatorConfig::load(&config)?;
    let identity = Identity::load_from_ca_dir(&cfg.ca_dir, &cfg.name)
        .with_context(|| format!("coordinator identity `{}`", cfg.name))?;
    let rt = runtime()?;
    let (revocations, reloaded) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(reload_revocations_on_hangup(config.clone(), revocations));
    let controls = server::Controls {
        exit_when_finished: args.exit_when_finished,
        bound: None,
        http_bound: None,
        revocations: Some(reloaded),
    };
    let status = rt.block_on(server::run(cfg, identity, controls, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C: shutting down");
    }))?;
    // A log line like the rest, so that `--log-format json` output stays one object per line.
    tracing::info!(
        "coordinator stopped at round {} (params {})",
        status.round,
        &status.params.to_hex()[..16]
    );
    Ok(())
}

/// On every SIGHUP, re-reads `config` and hands its `revoked` list to the running coordinator
/// (other settings need a restart). A config that no longer loads is reported and ignored.
async fn reload_revocations_on_hangup(
    config: PathBuf,
    tx: tokio::sync::mpsc::UnboundedSender<Vec<String>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}): revocations load only at start");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        match CoordinatorConfig::load(&config) {
            Ok(cfg) => {
                if tx.send(cfg.revoked).is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("SIGHUP: {e:#}; keeping the revocation list as it was"),
        }
    }
}

fn parse_fault(s: &str) -> Result<Fault> {
    match s {
        "nan" => return Ok(Fault::Nan),
        "huge" => return Ok(Fault::Huge),
        "flip" => return Ok(Fault::Flip),
        "oversize" => return Ok(Fault::Oversize),
        "replay" => return Ok(Fault::Replay),
        _ => {}
    }
    if let Some(f) = s.strip_prefix("scale:") {
        return Ok(Fault::Scale(f.parse().context("--fault scale:<factor>")?));
    }
    if let Some(f) = s.strip_prefix("noise:") {
        return Ok(Fault::Noise(f.parse().context("--fault noise:<sigma>")?));
    }
    if let Some(f) = s.strip_prefix("claim:") {
        return Ok(Fault::Claim(f.parse().context("--fault claim:<factor>")?));
    }
    bail!(
        "--fault {s}: expected nan, huge, flip, oversize, replay, scale:<factor>, \
         noise:<sigma> or claim:<factor>"
    )
}

/// Runs `amity worker`; progress lines follow `log_format` (JSON log events for collectors).
pub fn worker(args: WorkerArgs, log_format: crate::logging::LogFormat) -> Result<()> {
    let compiled: Vec<&str> = Backend::compiled().iter().map(|b| b.name()).collect();
    if args.list_backends {
        for name in &compiled {
            println!("{name}");
        }
        return Ok(());
    }
    let cfg = args.settings()?;
    let backend = Backend::parse_available(cfg.backend.as_deref().unwrap_or("flex"))?;
    let (false, Some(cert), Some(ca)) = (cfg.coordinator.is_empty(), &cfg.cert, &cfg.ca) else {
        bail!(
            "amity worker needs a coordinator, a certificate and the CA certificate: \
             --coordinator <addr> --cert <file> --ca <file>, or `coordinator`, `cert` and `ca` \
             in --config <worker.toml>"
        );
    };
    let server_name = cfg.server_name.as_deref().unwrap_or("coordinator");
    let coordinators = cfg
        .coordinator
        .iter()
        .map(|a| CoordinatorAddr::parse(a.trim(), server_name))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| anyhow::anyhow!("coordinator {e}"))?;
    let identity = crate::ca_cmd::load_identity(cert, cfg.key.as_deref(), ca)?;
    let fault = args.fault.as_deref().map(parse_fault).transpose()?;
    let opts = WorkerOptions {
        coordinators,
        backend,
        cache_dir: cfg
            .cache
            .clone()
            .unwrap_or_else(|| PathBuf::from("amity-worker-cache")),
        local_corpus: cfg.corpus.clone(),
        slowdown: args.slowdown.max(1.0),
        fault,
        progress: match log_format {
            crate::logging::LogFormat::Text => amity_worker::Progress::Lines,
            crate::logging::LogFormat::Json => amity_worker::Progress::Log,
        },
        metrics: cfg.metrics_listen,
    };
    let progress = opts.progress;
    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime()?;
    let summary = rt.block_on(async {
        let s = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                progress.say("Ctrl-C: abandoning the current round and leaving");
                s.store(true, Ordering::Relaxed);
            }
        });
        amity_worker::run(opts, identity, stop).await
    })?;
    progress.say(&format!(
        "worker done: {} rounds acknowledged, {} local steps, {} up, {} down",
        summary.rounds,
        summary.steps,
        amity_worker::human(summary.bytes_up),
        amity_worker::human(summary.bytes_down)
    ));
    Ok(())
}
