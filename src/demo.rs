//! `amity demo`: the whole federated system in one process, over real loopback QUIC with real
//! mTLS certificates, on the tiny preset.
//!
//! It generates the synthetic corpus, ingests it into shards, makes a CA, starts a coordinator
//! and three workers of different speeds, trains for the configured rounds, then probes the
//! trained encoder against a random one, publishes it as a signed release, fetches that back
//! over QUIC like a downstream user, trains a world model on the fetched encoder, plans a few
//! episodes with it, runs the surprise detector on one violation pair, and writes a summary and
//! a loss-curve PNG.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Args;

use amity_coordinator::aggregate::AggregationConfig;
use amity_coordinator::config::{CoordinatorConfig, RoundPolicy};
use amity_coordinator::layout::StateLayout;
use amity_coordinator::release::{ReleaseRequest, release_round};
use amity_coordinator::server;
use amity_protocol::tls::Identity;
use amity_release::FetchReport;
use amity_release::card::EvalResult;
use amity_release::known::Trust;
use amity_release::sign::ReleaseKey;
use amity_shared::checkpoint::Checkpoint;
use amity_shared::config::Config;
use amity_shared::corpus::ingest::{IngestOptions, ingest};
use amity_shared::corpus::synthetic::{SynthCorpusOptions, write_synthetic_corpus};
use amity_shared::data::synth::SynthConfig;
use amity_shared::device::Backend;
use amity_shared::eval::{
    LOSS_OVER_MEAN_CLIPS, ProbeReport, ProbeSet, loss_over_mean, probe_report,
};
use amity_shared::train::Trainer;
use amity_worker::human;
use amity_worker::{CoordinatorAddr, WorkerOptions};

use amity_release::fetch::QuicSource;

const WORKERS: [(&str, f64); 3] = [("uni-fast", 1.0), ("uni-medium", 2.0), ("uni-slow", 4.0)];

/// `amity demo`: the whole system on one machine.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for everything the demo writes (replaced if it holds an earlier demo).
    #[arg(long, default_value = "amity-demo")]
    pub out: PathBuf,
    /// Synthetic videos to generate.
    #[arg(long, default_value_t = 160)]
    pub videos: usize,
    /// Federated rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Local training time per round, seconds: the deadline of the slower workers.
    #[arg(long, default_value_t = 4.0)]
    pub round_secs: f64,
    /// Local steps per round at most (0: no cap, the time budget alone). Without a cap a faster
    /// machine runs more local steps per round: on a 2-core AMD EPYC (Zen 4), 10 s rounds
    /// (about 230 steps of the fastest worker a round) released an encoder at random init's
    /// velocity R². With 4 s rounds capped at 100 steps, three runs gave 0.29-0.38 against
    /// -0.001, and a faster CPU cannot push the fast worker past 100.
    #[arg(long, default_value_t = 100)]
    pub round_steps: u64,
}

/// `amity demo`: runs the demo into `args.out`.
pub fn demo(args: DemoArgs) -> Result<()> {
    let shape = RoundShape {
        rounds: args.rounds,
        secs: args.round_secs,
        steps: args.round_steps,
    };
    run(&args.out, args.videos, shape)
}

/// How many rounds the demo runs and what bounds each.
#[derive(Debug, Clone, Copy)]
pub struct RoundShape {
    /// Federated rounds.
    pub rounds: u64,
    /// Local training time per round, seconds.
    pub secs: f64,
    /// Local steps per round at most (0: no cap).
    pub steps: u64,
}

/// Runs the demo into `out`.
pub fn run(out: &Path, videos: usize, shape: RoundShape) -> Result<()> {
    let rounds = shape.rounds;
    let began = Instant::now();
    if out.join("coordinator").exists() || out.join("ca").exists() {
        std::fs::remove_dir_all(out)
            .with_context(|| format!("clearing the earlier demo in {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let out = out.canonicalize()?;
    println!("amity demo: everything goes under {}", out.display());

    // 1. Corpus: synthetic MP4s with ground truth, cut into content-addressed shards.
    let (run_cfg, store, shards) = corpus(&out, videos, began)?;

    // 2. Trust: an operator CA, a coordinator certificate and one per institution.
    let ca = out.join("ca");
    let names: Vec<&str> = WORKERS.iter().map(|w| w.0).collect();
    crate::ca_cmd::make_pki(&ca, &names)?;

    // 3. Coordinator and workers, over loopback QUIC.
    let state_dir = out.join("coordinator");
    let cfg = coordinator_config(&state_dir, run_cfg, store, &ca, shards, shape)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "training: {rounds} rounds of {} s or {} local steps, workers {} (slowdowns {:?}), uplink \
         {} with error feedback, downlink {} deltas",
        shape.secs,
        shape.steps,
        names.join(", "),
        WORKERS.iter().map(|w| w.1).collect::<Vec<_>>(),
        cfg.codec,
        cfg.downlink_codec
    );
    let release_dir = out.join("downloaded-release");
    let ended = rt.block_on(train_and_release(&out, &cfg, &release_dir))?;

    // 5. Summary.
    let totals = print_rounds(&ended.status);
    let losses: Vec<f64> = ended.status.history.iter().map(|s| s.loss).collect();
    let unexplained: Vec<f64> = ended
        .status
        .history
        .iter()
        .map(|s| s.loss_over_mean())
        .collect();
    print_outcome(&ended, &totals, (&losses, &unexplained), rounds);
    let ckpt_path = ended
        .status
        .checkpoint
        .clone()
        .context("the coordinator wrote no checkpoint")?;
    let fetched = &ended.fetched;
    let downstream = downstream(&fetched.out)?;
    let png = out.join("loss.png");
    crate::plot::line_chart(&png, &losses)?;
    let (a, b) = &ended.probes;
    let summary = serde_json::json!({
        "rounds": ended.status.history.len(),
        "loss": losses,
        "loss_over_mean": unexplained,
        "bytes_up": totals.up,
        "bytes_down": totals.down,
        "dense_fp32_bytes": totals.dense,
        "reduction": totals.reduction(),
        "probes_trained": a,
        "probes_random": b,
        "predictor_loss_over_mean": {"trained": ended.predictor.0, "random": ended.predictor.1},
        "checkpoint": ckpt_path,
        "release": fetched.out,
        "planning": downstream.0,
        "surprise": downstream.1,
        "params": ended.status.params,
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!(
        "\ncheckpoint: {}\nloss curve: {}\nsummary:    {}\ncoordinator state, command log and status: {}",
        ckpt_path.display(),
        png.display(),
        out.join("summary.json").display(),
        state_dir.display()
    );
    println!("demo finished in {:.0} s", began.elapsed().as_secs_f64());
    Ok(())
}

/// Writes `videos` synthetic MP4s and ingests them into ~1 MiB shards: the run config (tiny
/// preset, batch 16), the shard store and its shard count.
pub(crate) fn corpus(
    out: &Path,
    videos: usize,
    began: Instant,
) -> Result<(Config, PathBuf, usize)> {
    let mut run_cfg = Config::preset("tiny")?;
    run_cfg.train.batch = 16;
    let videos_dir = out.join("videos");
    let synth = write_synthetic_corpus(
        &videos_dir,
        &SynthCorpusOptions {
            videos,
            seed: 7,
            size: 64,
            frames: 48,
            fps: 10,
            violations: false,
            threads: 2,
        },
        &|_| {},
    )?;
    let store = out.join("corpus");
    let mut opts = IngestOptions::for_config(&run_cfg);
    opts.shard_bytes = 1 << 20;
    let report = ingest(&videos_dir, &store, &opts, &mut |_| {})?;
    println!(
        "corpus: {} videos -> {} clips in {} shards of ~1 MiB ({:.1} s)",
        synth.files,
        report.manifest.clips,
        report.manifest.shards.len(),
        began.elapsed().as_secs_f64()
    );
    Ok((run_cfg, store, report.manifest.shards.len()))
}

/// The demo coordinator's config (written to `coordinator.toml`, the run config to `run.toml`,
/// both next to its state): the coordinator's defaults, every shard every round, one checkpoint
/// after the last round.
fn coordinator_config(
    state_dir: &Path,
    mut run_cfg: Config,
    store: PathBuf,
    ca: &Path,
    shards: usize,
    shape: RoundShape,
) -> Result<CoordinatorConfig> {
    let (rounds, budget_ms) = (shape.rounds, (shape.secs * 1000.0) as u64);
    // Every worker's schedules follow the rounds (global progress), whatever its speed; the
    // first tenth of the run warms up. The run config travels to the workers.
    run_cfg.train.warmup = (run_cfg.train.steps / 10).max(1);
    std::fs::create_dir_all(state_dir)?;
    let run_path = state_dir.join("run.toml");
    std::fs::write(&run_path, run_cfg.to_toml())?;
    // The coordinator's defaults (codecs, target policy, outer optimiser).
    let default = amity_coordinator::config::CoreConfig::new(run_cfg);
    let cfg = CoordinatorConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: state_dir.to_owned(),
        corpus: Some(store),
        ca_dir: ca.to_owned(),
        name: "coordinator".into(),
        revoked: Vec::new(),
        preset: None,
        run_config: Some(run_path),
        inner_steps: 0,
        codec: default.codec,
        downlink_codec: default.downlink_codec,
        target_policy: default.target_policy,
        // One checkpoint, after the last round: each checkpoint is a flush round (every residual
        // delivered densely at once), which a 10-round run should not pay mid-way.
        checkpoint_every: rounds,
        rounds: RoundPolicy {
            budget_ms: Some(budget_ms),
            steps: shape.steps,
            grace_ms: budget_ms + 20_000,
            min_workers: WORKERS.len(),
            max_rounds: rounds,
            // Every shard every round: each worker sees a fair share of the whole corpus rather
            // than a few shards over and over (many local epochs of 40-130 clips).
            shards_per_round: shards,
            ..RoundPolicy::default()
        },
        outer: Default::default(),
        aggregation: AggregationConfig::default(),
        retention: Default::default(),
        replication: None,
        // The dashboard on a free loopback port, for a person watching the demo.
        http: Some(amity_coordinator::config::HttpConfig {
            listen: "127.0.0.1:0".parse()?,
            admin_token_file: None,
            telemetry_clips: 32,
        }),
    };
    std::fs::write(
        state_dir.join("coordinator.toml"),
        toml::to_string_pretty(&cfg).context("coordinator config")?,
    )?;
    Ok(cfg)
}

/// What the training and release part of the demo ended with.
struct Ended {
    status: server::Status,
    train_secs: f64,
    /// Probes of the trained and the randomly initialised encoder.
    probes: (ProbeReport, ProbeReport),
    /// The predictor's held-out loss over predicting the mean, trained and at random init.
    predictor: (f64, f64),
    fetched: FetchReport,
}

/// Runs the coordinator and the workers until the last round, then evaluates the checkpoint,
/// publishes it as a signed release and fetches it back over QUIC as a downstream user would (no
/// certificate, the release key pinned).
async fn train_and_release(
    out: &Path,
    cfg: &CoordinatorConfig,
    release_dir: &Path,
) -> Result<Ended> {
    let train_began = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The coordinator stays up after the last round: it serves the release below.
    let (http_tx, http_rx) = tokio::sync::oneshot::channel();
    let controls = server::Controls {
        bound: Some(tx),
        http_bound: Some(http_tx),
        ..Default::default()
    };
    let coord_id = Identity::load_from_ca_dir(&cfg.ca_dir, "coordinator")?;
    let coordinator = tokio::spawn(server::run(cfg.clone(), coord_id, controls, async move {
        let _ = stop_rx.await;
    }));
    let addr = rx.await.context("coordinator did not start")?;
    if let Ok(web) = http_rx.await {
        println!("  dashboard: http://{web}/ (while the demo trains)");
    }
    let mut workers = Vec::new();
    for (name, slowdown) in WORKERS {
        let opts = WorkerOptions {
            coordinators: vec![CoordinatorAddr {
                addr,
                name: "coordinator".into(),
            }],
            backend: Backend::Flex,
            cache_dir: out.join("workers").join(name),
            local_corpus: None,
            slowdown,
            fault: None,
            progress: amity_worker::Progress::Off,
            metrics: None,
        };
        let id = Identity::load_from_ca_dir(&cfg.ca_dir, name)?;
        let stop = Arc::new(AtomicBool::new(false));
        workers.push(tokio::spawn(amity_worker::run(opts, id, stop)));
    }
    let status = StateLayout {
        dir: cfg.state_dir.clone(),
    }
    .status();
    let shown = Arc::new(AtomicUsize::new(0));
    let ticker = tokio::spawn(round_progress(status.clone(), train_began, shown.clone()));
    // Workers leave when the coordinator says training finished.
    for w in workers {
        w.await.context("worker task")??;
    }
    ticker.abort();
    print_new_rounds(&status, train_began, &shown);
    let train_secs = train_began.elapsed().as_secs_f64();

    // 4. Evaluate the final checkpoint, publish it, fetch it back.
    let ckpt_path = StateLayout {
        dir: cfg.state_dir.clone(),
    }
    .latest_checkpoint();
    let (probes, predictor) =
        tokio::task::spawn_blocking(move || probe_checkpoint(&ckpt_path)).await??;
    let (key, _, key_pub) = ReleaseKey::generate(&cfg.ca_dir)?;
    let (signed, _) = release_round(cfg, &release_request(&probes, predictor), &key)?;
    println!(
        "\nreleased `{}` (round {}): {} files, {}, signed with {} (public key {})",
        signed.manifest.name,
        signed.manifest.round,
        signed.manifest.files.len(),
        human(signed.manifest.total_bytes()),
        key_pub.display(),
        key.public().to_hex()
    );
    let source = QuicSource {
        addr,
        server_name: "coordinator".into(),
        server_ca: None,
        drop_after_bytes: None,
    };
    let trust = Trust::key(key.public());
    let fetched =
        crate::release_cmd::fetch_quic_with_bar(&source, "latest", release_dir, &trust).await?;
    let _ = stop_tx.send(());
    let status = coordinator.await.context("coordinator task")??;
    Ok(Ended {
        status,
        train_secs,
        probes,
        predictor,
        fetched,
    })
}

/// A line per closed round while training runs, read from the coordinator's `status.json`
/// every half second; `shown` counts the rounds printed.
async fn round_progress(status: PathBuf, began: Instant, shown: Arc<AtomicUsize>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        print_new_rounds(&status, began, &shown);
    }
}

/// Prints the rounds of `status` after the first `shown`.
fn print_new_rounds(status: &Path, began: Instant, shown: &AtomicUsize) {
    let Ok(bytes) = std::fs::read(status) else {
        return;
    };
    let Ok(st) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return;
    };
    let history = st["history"].as_array().cloned().unwrap_or_default();
    let done = shown.load(Ordering::Relaxed);
    for r in history.iter().skip(done) {
        println!(
            "  round {} closed after {:.0} s: loss {:.4}, {} updates accepted",
            r["round"],
            began.elapsed().as_secs_f64(),
            r["loss"].as_f64().unwrap_or(f64::NAN),
            r["accepted"].as_array().map_or(0, Vec::len)
        );
    }
    shown.fetch_max(history.len(), Ordering::Relaxed);
}

/// The frozen-encoder probes of the checkpoint at `path` and of its random initialisation, and
/// the predictor's held-out loss over predicting the mean for both.
type Evaluation = ((ProbeReport, ProbeReport), (f64, f64));

/// Evaluates the checkpoint at `path` ([`Evaluation`]).
fn probe_checkpoint(path: &Path) -> Result<Evaluation> {
    let ckpt = Checkpoint::load(path)?;
    let device = Device::flex();
    let trained = Trainer::from_checkpoint(&ckpt, &device)?;
    let random = Trainer::new(ckpt.config.clone(), &device);
    // The learning test's probe: with 400 fitted videos for 256 features the ridge probe itself
    // caps R2.
    let set = ProbeSet::for_model(&ckpt.config.model, 1000, 500);
    Ok((
        (probe_report(&trained, &set), probe_report(&random, &set)),
        (
            loss_over_mean(&trained, &set),
            loss_over_mean(&random, &set),
        ),
    ))
}

/// The demo release, its model card holding the probes and the predictor's figure against
/// random initialisation.
fn release_request((a, b): &(ProbeReport, ProbeReport), predictor: (f64, f64)) -> ReleaseRequest {
    let protocol =
        "ridge probe on frozen target-encoder features, 1000 synthetic videos fitted, 500 held out";
    let row = |metric: &str, value: f64, random: f64| EvalResult {
        metric: metric.into(),
        value,
        random_init: Some(random),
        protocol: protocol.into(),
    };
    ReleaseRequest {
        name: "demo-v1".into(),
        round: None,
        probe_videos: 0,
        licence: "Apache-2.0".into(),
        evaluation: vec![
            row("velocity_r2", a.velocity_r2, b.velocity_r2),
            row("position_r2", a.position_r2, b.position_r2),
            row("shape_accuracy", a.shape_acc, b.shape_acc),
            row("colour_accuracy", a.colour_acc, b.colour_acc),
            EvalResult {
                metric: "predictor_loss_over_mean".into(),
                value: predictor.0,
                random_init: Some(predictor.1),
                protocol: format!(
                    "L1 of the predictor on the masked tokens of {LOSS_OVER_MEAN_CLIPS} held-out \
                     synthetic videos over that of predicting their mean feature (below 1: the \
                     predictor explains part of the target)"
                ),
            },
        ],
    }
}

/// Bytes a run moved, and what dense fp32 synchronisation every step would have.
struct Totals {
    up: u64,
    down: u64,
    dense: u64,
}

impl Totals {
    /// How many times fewer bytes than dense synchronisation.
    fn reduction(&self) -> f64 {
        self.dense as f64 / (self.up + self.down).max(1) as f64
    }
}

/// Prints a line per round and returns the totals.
fn print_rounds(status: &server::Status) -> Totals {
    println!(
        "\n{:>5} {:>8} {:>8} {:>10} {:>10} {:>12} {:>12} {:>14} {:>10}",
        "round",
        "workers",
        "clips",
        "loss",
        "loss/mean",
        "bytes up",
        "bytes down",
        "dense fp32/step",
        "outer/mean"
    );
    let mut t = Totals {
        up: 0,
        down: 0,
        dense: 0,
    };
    for s in &status.history {
        t.up += s.bytes_up;
        t.down += s.bytes_down;
        t.dense += s.dense_bytes;
        println!(
            "{:>5} {:>8} {:>8} {:>10.4} {:>10.3} {:>12} {:>12} {:>14} {:>10.2}{}",
            s.round,
            s.accepted_count(),
            s.samples,
            s.loss,
            s.loss_over_mean(),
            human(s.bytes_up),
            human(s.bytes_down),
            human(s.dense_bytes),
            s.outer_step_ratio,
            if s.flush { "  flush" } else { "" }
        );
    }
    t
}

/// Prints the bytes, the loss, the institutions' shares, the probes and the fetched release.
/// `losses` are the rounds' losses and, beside them, each over its predict-the-mean baseline.
fn print_outcome(ended: &Ended, t: &Totals, (losses, unexplained): (&[f64], &[f64]), rounds: u64) {
    let status = &ended.status;
    println!(
        "\n{} rounds in {:.0} s. Sent {} in all (up {}, down {}); dense fp32 \
         synchronisation every local step would have sent {}: {:.0}x less.",
        status.history.len(),
        ended.train_secs,
        human(t.up + t.down),
        human(t.up),
        human(t.down),
        human(t.dense),
        t.reduction()
    );
    let lowest = |v: &[f64]| {
        v.iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f64::INFINITY, f64::min)
    };
    if let (Some(last), Some(ratio)) = (losses.last(), unexplained.last()) {
        println!(
            "last round's loss {last:.4} is {:+.1}% from the lowest ({:.4}); over predicting the \
             mean target it is {ratio:.3} ({:+.1}% from the lowest, {:.3}); the schedules \
             followed round / {} on every worker, and the last round flushed every residual",
            100.0 * (last / lowest(losses) - 1.0),
            lowest(losses),
            100.0 * (ratio / lowest(unexplained) - 1.0),
            lowest(unexplained),
            rounds
        );
    }
    for (name, p) in &status.provenance {
        println!(
            "  {name:<11} {:>6} clips, {:>4} steps, {} updates accepted, {} rejected",
            p.samples, p.steps, p.updates, p.rejected
        );
    }
    let (a, b) = &ended.probes;
    println!("\nfrozen-encoder probes on held-out synthetic videos (trained vs random init):");
    println!(
        "  velocity R2 {:.3} vs {:.3}; position R2 {:.3} vs {:.3}; shape acc {:.3} vs {:.3}; colour acc {:.3} vs {:.3}",
        a.velocity_r2,
        b.velocity_r2,
        a.position_r2,
        b.position_r2,
        a.shape_acc,
        b.shape_acc,
        a.colour_acc,
        b.colour_acc
    );
    println!(
        "  predictor's held-out loss over predicting the mean target {:.3} vs {:.3} (below 1: it \
         explains part of the target)",
        ended.predictor.0, ended.predictor.1
    );
    let fetched = &ended.fetched;
    println!(
        "downloaded release `{}` over QUIC like a downstream user: {} files, {} bytes, every \
         BLAKE3 and the Ed25519 signature verified, in {}",
        fetched.manifest.name,
        fetched.manifest.files.len(),
        fetched.transferred,
        fetched.out.display()
    );
}

/// What a downstream user does next with the fetched release: a world model on its frozen
/// encoder, a few planning episodes, and the surprise detector on one violation pair.
fn downstream(release: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
    use amity_planner::env::{EnvKind, make};
    use amity_planner::plan::optimise::{Method, SearchConfig};
    use amity_planner::plan::{LatentEnergy, LatentPlanner, run_episode};
    use amity_planner::surprise::{Scoring, curve};
    use amity_planner::world::data::collect;
    use amity_planner::world::encode::FrameEncoder;
    use amity_planner::world::{WorldModel, WorldModelConfig};
    use amity_shared::data::synth::{ViolationKind, generate_pair};

    let began = Instant::now();
    let ckpt = amity_release::load_model(release)?;
    let device = Device::flex();
    let encoder = FrameEncoder::new(&ckpt, &device)?;
    let kind = EnvKind::PointMaze;
    let trajs = collect(kind, encoder.size(), 80, 16, 11);
    let cfg = WorldModelConfig {
        steps: 300,
        ..WorldModelConfig::default()
    };
    let (wm, fit) = WorldModel::fit(encoder, cfg, &trajs, 1500, &mut |_, _, _| {});
    let (r2, report) = (fit.probe_r2, fit.train);
    println!(
        "\nworld model on the released encoder ({kind}, {} episodes, 300 steps, {:.0} s): 2-step \
         rollout error {:.4} -> {:.4}, position probe R2 {r2:.3}",
        trajs.len(),
        began.elapsed().as_secs_f64(),
        report.rollout_before,
        report.rollout_after
    );
    // The latent energy plus the position term: on this tiny encoder the latent distance alone
    // is too flat to steer by (see `amity bench plan`, which reports both).
    let mut planner = LatentPlanner::new(
        &wm,
        Method::Cem,
        SearchConfig::default(),
        LatentEnergy::default(),
        1,
    )
    .with_readout_weights(amity_planner::plan::ReadoutWeights::default_for(kind));
    println!("  planner: CEM on the latent energy + position term, guardrails on");
    let mut env = make(kind, wm.encoder.size());
    let mut episodes = Vec::new();
    for i in 0..3 {
        let ep = run_episode(env.as_mut(), 900_000 + i, &mut planner, 40, false);
        println!(
            "  planning episode {i}: {} after {} actions, {:.0} ms per action{}",
            if ep.success {
                "goal reached"
            } else {
                "goal not reached"
            },
            ep.steps,
            ep.ms_per_action,
            if ep.entered_forbidden {
                ", entered the no-go zone"
            } else {
                ""
            }
        );
        episodes.push(serde_json::json!({"success": ep.success, "steps": ep.steps, "ms_per_action": ep.ms_per_action}));
    }
    let trainer = Trainer::from_checkpoint(&ckpt, &device)?;
    let m = &ckpt.config.model;
    let synth = SynthConfig::for_size(m.image_size, 32);
    let (possible, impossible) = generate_pair(&synth, 424_242, ViolationKind::Teleport);
    let at = impossible.labels.violation.map_or(0, |v| v.frame);
    let (a, b) = (
        curve(&trainer, &Scoring::DEFAULT, &possible.pixels, 32, 1),
        curve(&trainer, &Scoring::DEFAULT, &impossible.pixels, 32, 1),
    );
    let (a_after, b_after) = (a.peak_from(at), b.peak_from(at));
    println!(
        "surprise on a violation pair (the object teleports at frame {at}): peak {:.4} possible vs \
         {:.4} impossible: {}; over the windows that see frame {at} on, {a_after:.4} vs \
         {b_after:.4}",
        a.peak(),
        b.peak(),
        if b.peak() > a.peak() {
            "the impossible video is the more surprising"
        } else if b.peak() == a.peak() {
            "not detected (both peaks lie before the teleport, in windows the twins share)"
        } else {
            "not detected"
        }
    );
    Ok((
        serde_json::json!({"env": kind.to_string(), "rollout_error": [report.rollout_before, report.rollout_after], "probe_r2": r2, "episodes": episodes}),
        serde_json::json!({"kind": "teleport", "frame": at, "possible_peak": a.peak(), "impossible_peak": b.peak(), "possible_peak_from_frame": a_after, "impossible_peak_from_frame": b_after}),
    ))
}
