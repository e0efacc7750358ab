//! A worker's life: connect with mutual TLS, register, then round after round fetch the state
//! (as a delta when it holds the previous one) and its shards, train locally, compress the
//! pseudo-gradient with error feedback, and offer it to the coordinator, which pulls it.
//! Connection loss means back-off and reconnect with the trainer (AdamW state) and the
//! error-feedback residual kept.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::conn::{
    ConnError, HandshakeRefusal, MsgStream, OutboardCache, fetch_blob_bytes, serve_blob_requests,
};
use amity_protocol::message::{
    Capabilities, ClientMsg, ErrorCode, Hash, LocalShard, LossStats, ServerMsg, StateDelta,
};
use amity_protocol::tls::{Identity, quic_client_config};
use amity_shared::checkpoint::Checkpoint;
use amity_shared::codec::{CodecSpec, ErrorFeedback};
use amity_shared::config::Config;
use amity_shared::corpus::loader::ShardSet;
use amity_shared::corpus::manifest::{ClipShape, Manifest, open_blobs};
use amity_shared::data::ClipSource;
use amity_shared::device::{Backend, Device};
use amity_shared::federated::{
    GlobalParams, LocalRoundOptions, LocalUpdate, RoundBudget, RunProgress, TargetPolicy,
    local_round,
};
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use amity_shared::train::Trainer;

/// The words a coordinator closes with once training is over (kept in step with
/// `amity_coordinator::server::FINISHED_REASON`; the worker does not depend on the coordinator).
const FINISHED_REASON: &str = "training finished";

/// A deliberate misbehaviour, for the fault-injection and hostile-peer tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Upload a pseudo-gradient containing NaN.
    Nan,
    /// Upload the pseudo-gradient multiplied by this factor.
    Scale(f32),
    /// Upload values near `f32::MAX` (finite, but an outer step over them overflows).
    Huge,
    /// Upload the negated pseudo-gradient.
    Flip,
    /// Upload Gaussian noise of this standard deviation instead of the pseudo-gradient.
    Noise(f32),
    /// Claim this many times the samples and steps done (to buy weight).
    Claim(u64),
    /// Announce the update one byte shorter than it is (the served blob is longer).
    Oversize,
    /// Offer the same update twice in a round.
    Replay,
}

/// How to run a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// The coordinator's certificate name.
    pub server_name: String,
    /// Compute backend.
    pub backend: Backend,
    /// Cache of fetched shards and outgoing updates.
    pub cache_dir: PathBuf,
    /// The institution's own shard store (`amity corpus ingest`), registered by id only.
    pub local_corpus: Option<PathBuf>,
    /// Step time multiplier standing in for slower hardware (demo and tests); 1 = full speed.
    pub slowdown: f64,
    /// Deliberate misbehaviour (tests only).
    pub fault: Option<Fault>,
    /// Print a progress line per round on stderr.
    pub progress: bool,
}

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Local set-up failed.
    #[error("{0}")]
    Setup(String),
    /// The coordinator refused us for good.
    #[error("coordinator refused: {0}")]
    Refused(String),
    /// A TLS handshake failed over certificates: reconnecting cannot mend it.
    #[error("{0}")]
    Handshake(String),
}

/// What a worker did, for its exit summary.
#[derive(Debug, Clone, Default)]
pub struct WorkerSummary {
    /// Rounds whose update was acknowledged.
    pub rounds: u64,
    /// Local steps taken.
    pub steps: u64,
    /// Bytes uploaded (updates).
    pub bytes_up: u64,
    /// Bytes downloaded (state, deltas, shards).
    pub bytes_down: u64,
}

/// State that survives reconnects.
struct Local {
    /// The device this worker trains on, opened (and probed) once at start.
    device: Device,
    trainer: Option<Trainer>,
    /// The global state we hold, shared with the training thread, and its hash.
    params: Option<(Arc<GlobalParams>, Hash)>,
    feedback: ErrorFeedback,
    summary: WorkerSummary,
    cache: LocalStore,
    /// The institution's own corpus: its store, and each shard's id and clip count.
    local: Option<(LocalStore, Vec<(BlobId, u64)>)>,
    /// Outboards of the updates we served (a re-request after a dropped connection is not
    /// hashed again).
    outboards: OutboardCache,
    /// Blobs of recent rounds in the cache (states, deltas, our updates), by round: deleted
    /// two rounds on, so that a long run does not fill the disk. Shards stay (every epoch
    /// trains them again).
    transient: std::collections::VecDeque<(u64, Vec<BlobId>)>,
}

impl Local {
    /// Notes that `id` in the cache belongs to round `round` only.
    fn round_blob(&mut self, round: u64, id: BlobId) {
        match self.transient.back_mut() {
            Some((r, ids)) if *r == round => ids.push(id),
            _ => self.transient.push_back((round, vec![id])),
        }
    }

    /// Deletes the round blobs of rounds before `round - 1` (the previous round's update may
    /// still be asked for).
    fn forget_rounds_before(&mut self, round: u64) {
        while let Some((r, _)) = self.transient.front() {
            if *r + 1 >= round {
                break;
            }
            let (_, ids) = self.transient.pop_front().expect("checked");
            for id in ids {
                if let Err(e) = self.cache.remove(&id) {
                    tracing::warn!("cache: {e}");
                }
            }
        }
    }
}

enum SessionEnd {
    /// Training is over or we were asked to stop.
    Done,
    /// Connection lost: reconnect.
    Lost(String),
    /// A side's TLS refused the other's certificate: give up with this explanation.
    Refused(String),
}

/// Runs a worker until the coordinator finishes training or `stop` is set (Ctrl-C).
pub async fn run(
    opts: WorkerOptions,
    identity: Identity,
    stop: Arc<AtomicBool>,
) -> Result<WorkerSummary, WorkerError> {
    let setup = |e: &dyn std::fmt::Display| WorkerError::Setup(e.to_string());
    // Before anything else: a GPU without a driver is a clear error here, not a worker that
    // registers with no throughput and fails at its first round.
    let device = opts.backend.device(0).map_err(|e| setup(&e))?;
    let cache = LocalStore::open(&opts.cache_dir.join("blobs")).map_err(|e| setup(&e))?;
    let local = match &opts.local_corpus {
        Some(dir) => {
            let m = Manifest::load(dir).map_err(|e| setup(&e))?;
            let blobs = open_blobs(dir).map_err(|e| setup(&e))?;
            Some((blobs, m.shards.iter().map(|s| (s.id, s.clips)).collect()))
        }
        None => None,
    };
    let mut state = Local {
        device,
        trainer: None,
        params: None,
        feedback: ErrorFeedback::new(),
        summary: WorkerSummary::default(),
        cache,
        local,
        outboards: OutboardCache::new(),
        transient: Default::default(),
    };
    let client_cfg = quic_client_config(&identity).map_err(|e| setup(&e))?;
    let endpoint =
        amity_protocol::endpoint::client(opts.coordinator, client_cfg).map_err(|e| setup(&e))?;
    let mut backoff = Duration::from_millis(250);
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let conn = match endpoint.connect(opts.coordinator, &opts.server_name) {
            Ok(connecting) => connecting.await,
            Err(e) => return Err(setup(&e)),
        };
        let end = match conn {
            Ok(conn) => {
                backoff = Duration::from_millis(250);
                let end = session(&opts, &conn, &mut state, &stop).await;
                conn.close(0u32.into(), b"bye");
                end
            }
            Err(e) => Ok(match HandshakeRefusal::of(&e) {
                Some(r) => SessionEnd::Refused(refusal(r, &format!("{}: {e}", opts.coordinator))),
                None => SessionEnd::Lost(e.to_string()),
            }),
        };
        match end? {
            SessionEnd::Done => break,
            SessionEnd::Lost(why) if why.contains(FINISHED_REASON) => {
                tracing::info!("coordinator: {FINISHED_REASON}");
                break;
            }
            SessionEnd::Refused(why) => return Err(WorkerError::Handshake(why)),
            SessionEnd::Lost(why) => {
                tracing::warn!(
                    "connection to {} lost: {why}; retrying in {backoff:?}",
                    opts.coordinator
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
    }
    endpoint.wait_idle().await;
    Ok(state.summary)
}

fn lost(e: ConnError) -> SessionEnd {
    match e.handshake_refusal() {
        Some(r) => SessionEnd::Refused(refusal(r, &e.to_string())),
        None => SessionEnd::Lost(e.to_string()),
    }
}

/// What to tell the operator when a TLS handshake refused a certificate (`detail`: the error).
fn refusal(r: HandshakeRefusal, detail: &str) -> String {
    match r {
        HandshakeRefusal::ByPeer(alert) => format!(
            "{detail}\nthe coordinator refused this worker's certificate at the TLS handshake \
             ({alert}): it must be issued by the coordinator's CA (`amity ca issue` in the \
             coordinator's CA folder) and not be listed in its `revoked` names; not retrying"
        ),
        HandshakeRefusal::ByUs(alert) => format!(
            "{detail}\nthis worker refused the coordinator's certificate at the TLS handshake \
             ({alert}): check --ca (the CA certificate that issued the coordinator's) and \
             --server-name (a name on the coordinator's certificate); not retrying"
        ),
    }
}

/// Measures clips/s of this machine on the run's model (a few steps, after one warm-up).
fn measure_throughput(run: &Config, device: &Device, slowdown: f64) -> f32 {
    let mut cfg = run.clone();
    cfg.train.batch = cfg.train.batch.min(8);
    let mut t = Trainer::new(cfg.clone(), device);
    let source = ClipSource::synthetic(&cfg.model);
    let batch = source.batch(0, 0, cfg.train.batch, &cfg.model);
    t.step(&batch);
    let start = Instant::now();
    for _ in 0..2 {
        t.step(&batch);
    }
    let secs = start.elapsed().as_secs_f64() * slowdown.max(1.0);
    (2.0 * cfg.train.batch as f64 / secs) as f32
}

async fn session(
    opts: &WorkerOptions,
    conn: &quinn::Connection,
    st: &mut Local,
    stop: &Arc<AtomicBool>,
) -> Result<SessionEnd, WorkerError> {
    let peer = opts.server_name.clone();
    let mut control = match MsgStream::open(conn, &peer).await {
        Ok(s) => s,
        Err(e) => return Ok(lost(e)),
    };
    let hello = ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        software: format!("amity {}", env!("CARGO_PKG_VERSION")),
    };
    if let Err(e) = control.send(&hello).await {
        return Ok(lost(e));
    }
    match control.recv::<ServerMsg>().await {
        Ok(Some(ServerMsg::Welcome { identity, .. })) => {
            tracing::info!(%identity, "connected to {}", opts.coordinator)
        }
        Ok(Some(ServerMsg::Error { code, message })) => {
            return Err(WorkerError::Refused(format!("{code:?}: {message}")));
        }
        Ok(other) => return Ok(SessionEnd::Lost(format!("expected Welcome, got {other:?}"))),
        Err(e) => return Ok(lost(e)),
    }
    // Serve our updates to the coordinator, which pulls them.
    let server = {
        let conn = conn.clone();
        let cache = st.cache.clone();
        let peer = peer.clone();
        // Our updates, to the coordinator that pulls them.
        let outboards = st.outboards.clone();
        tokio::spawn(serve_blob_requests(
            conn,
            peer,
            outboards,
            move |id: &Hash| {
                let id = BlobId(*id);
                cache.contains(&id).then(|| cache.path(&id))
            },
        ))
    };
    let samples_per_s = match &st.trainer {
        Some(t) => {
            let run = t.config().clone();
            let (d, s) = (st.device.clone(), opts.slowdown);
            tokio::task::spawn_blocking(move || measure_throughput(&run, &d, s))
                .await
                .unwrap_or(0.0)
        }
        // Until the run's config arrives, the first round measures us.
        None => 0.0,
    };
    let caps = Capabilities {
        backend: opts.backend.name().into(),
        device_name: format!("{:?}", opts.backend),
        memory_bytes: 0,
        samples_per_s,
        local_shards: st
            .local
            .as_ref()
            .map(|(_, shards)| {
                shards
                    .iter()
                    .map(|&(id, clips)| LocalShard { id: id.0, clips })
                    .collect()
            })
            .unwrap_or_default(),
    };
    if let Err(e) = control.send(&ClientMsg::Register(caps)).await {
        return Ok(lost(e));
    }
    let (run, codec, policy, worker_id) = match control.recv::<ServerMsg>().await {
        Ok(Some(ServerMsg::Registered {
            run,
            codec,
            target_policy,
            worker,
        })) => {
            let run: Config = toml::from_str(&run)
                .map_err(|e| WorkerError::Refused(format!("run config from coordinator: {e}")))?;
            run.validate()
                .map_err(|e| WorkerError::Refused(format!("run config: {e}")))?;
            let codec: CodecSpec = codec
                .parse()
                .map_err(|e| WorkerError::Refused(format!("{e}")))?;
            let policy = match target_policy.as_str() {
                "local-ema" => TargetPolicy::LocalEma,
                "coordinator-ema" => TargetPolicy::CoordinatorEma,
                other => {
                    return Err(WorkerError::Refused(format!(
                        "unknown target policy {other}"
                    )));
                }
            };
            tracing::info!(worker, %codec, %policy, preset = %run.preset, "registered");
            (run, codec, policy, worker)
        }
        Ok(Some(ServerMsg::Error { code, message })) => {
            return Err(WorkerError::Refused(format!("{code:?}: {message}")));
        }
        Ok(other) => {
            return Ok(SessionEnd::Lost(format!(
                "expected Registered, got {other:?}"
            )));
        }
        Err(e) => return Ok(lost(e)),
    };
    if st.trainer.as_ref().is_none_or(|t| t.config() != &run) {
        let t = Trainer::new(run.clone(), &st.device);
        // The run's seeded initialisation: round 0's state, with no download.
        let init = GlobalParams {
            model: t.model_flat(),
            target: t.target_flat(),
        };
        let hash = init.hash();
        st.params = Some((Arc::new(init), hash));
        st.trainer = Some(t);
    }

    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    let mut seq = 0;
    let mut announce: Option<Announce> = None;
    let end = loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                seq += 1;
                if let Err(e) = control.send(&ClientMsg::Heartbeat { seq }).await {
                    break lost(e);
                }
                if stop.load(Ordering::Relaxed) {
                    let _ = control.send(&ClientMsg::Goodbye).await;
                    break SessionEnd::Done;
                }
            }
            msg = control.recv::<ServerMsg>() => match msg {
                Ok(Some(ServerMsg::RoundAnnounce {
                    round, state, params, delta, budget_ms, steps, planned_rounds, flush,
                })) => {
                    announce = Some(Announce {
                        round, state, params, delta, budget_ms, steps, planned_rounds, flush,
                        shards: Vec::new(),
                    });
                }
                Ok(Some(ServerMsg::ShardAssignment { round, shards })) => {
                    let Some(mut a) = announce.take().filter(|a| a.round == round) else {
                        tracing::warn!(round, "shard assignment without its announce");
                        continue;
                    };
                    a.shards = shards;
                    let session = Session { codec, policy, worker: worker_id };
                    match train_round(opts, conn, &mut control, st, stop, a, session).await {
                        Ok(()) => {}
                        Err(end) => break end,
                    }
                }
                Ok(Some(ServerMsg::Ack { of })) => {
                    st.summary.rounds += 1;
                    tracing::debug!(round = of, "update acknowledged");
                }
                Ok(Some(ServerMsg::Error { code: ErrorCode::ShuttingDown, message })) => {
                    tracing::info!("coordinator: {message}");
                    break if message.contains(FINISHED_REASON) { SessionEnd::Done } else {
                        SessionEnd::Lost(message)
                    };
                }
                Ok(Some(ServerMsg::Error { code, message })) => {
                    tracing::warn!(?code, "coordinator: {message}");
                }
                Ok(Some(other)) => tracing::warn!("unexpected {other:?}"),
                Ok(None) => break SessionEnd::Lost("control stream closed".into()),
                Err(e) => break lost(e),
            }
        }
    };
    server.abort();
    Ok(end)
}

/// A `RoundAnnounce`, kept until its shard assignment arrives (then `shards`).
struct Announce {
    round: u64,
    state: Hash,
    params: Hash,
    delta: Option<StateDelta>,
    budget_ms: u64,
    steps: u64,
    planned_rounds: u64,
    flush: bool,
    shards: Vec<Hash>,
}

/// What registration settled for the session.
#[derive(Clone, Copy)]
struct Session {
    codec: CodecSpec,
    policy: TargetPolicy,
    /// The worker's id in the run (mixed into its batch and mask seeds).
    worker: u64,
}

async fn train_round(
    opts: &WorkerOptions,
    conn: &quinn::Connection,
    control: &mut MsgStream,
    st: &mut Local,
    stop: &Arc<AtomicBool>,
    announce: Announce,
    Session {
        codec,
        policy,
        worker,
    }: Session,
) -> Result<(), SessionEnd> {
    let Announce {
        round,
        state,
        params: params_hash,
        delta,
        budget_ms,
        steps,
        planned_rounds,
        flush,
        shards,
    } = announce;
    let started = Instant::now();
    let peer = opts.server_name.as_str();
    st.forget_rounds_before(round);
    // 1. The global state.
    let held = st.params.clone();
    let mut start = held
        .as_ref()
        .filter(|(_, h)| *h == params_hash)
        .map(|(p, _)| p.clone());
    // Unless we already hold it (the seeded initial state, or a state sent before): the delta
    // when we hold its base, in full otherwise.
    if start.is_none()
        && let (Some(d), Some((p, h))) = (delta, held.as_ref())
        && *h == d.base
    {
        let most = state_bytes_limit(p);
        let bytes = fetch(conn, peer, &st.cache, BlobId(d.blob), most, &mut st.summary).await?;
        st.round_blob(round, BlobId(d.blob));
        match p.after_delta(&bytes, d.target_momentum) {
            Ok(next) if next.hash() == params_hash => start = Some(Arc::new(next)),
            Ok(_) => tracing::warn!(round, "delta did not reproduce the announced state"),
            Err(e) => tracing::warn!(round, "bad delta from coordinator: {e}"),
        }
    }
    let start = match start {
        Some(s) => s,
        None => {
            let most = held
                .as_ref()
                .map_or(MAX_SHARD_BYTES, |(p, _)| state_bytes_limit(p));
            let bytes = fetch(conn, peer, &st.cache, BlobId(state), most, &mut st.summary).await?;
            st.round_blob(round, BlobId(state));
            let ckpt = Checkpoint::from_bytes(&bytes, "global state from coordinator")
                .map_err(|e| SessionEnd::Lost(e.to_string()))?;
            let p = GlobalParams {
                model: ckpt.model,
                target: ckpt.target,
            };
            if p.hash() != params_hash {
                return Err(SessionEnd::Lost(
                    "global state does not match its hash".into(),
                ));
            }
            Arc::new(p)
        }
    };
    st.params = Some((start.clone(), params_hash));
    // 2. Shards: our institution's own, else the cache, else fetched.
    let ids: Vec<BlobId> = shards.iter().map(|h| BlobId(*h)).collect();
    for id in &ids {
        let local = st.local.as_ref().is_some_and(|(s, _)| s.contains(id));
        if !local && !st.cache.contains(id) {
            fetch(conn, peer, &st.cache, *id, MAX_SHARD_BYTES, &mut st.summary).await?;
        }
    }
    let trainer = st.trainer.take().expect("trainer made at registration");
    let run = trainer.config().clone();
    let source = if ids.is_empty() {
        ClipSource::synthetic(&run.model)
    } else {
        let mut stores = Vec::new();
        if let Some((s, _)) = &st.local {
            stores.push(s.clone());
        }
        stores.push(st.cache.clone());
        let set = ShardSet::open_in(&stores, ClipShape::of(&run.model), &ids, &opts.cache_dir)
            .map_err(|e| SessionEnd::Lost(e.to_string()))?;
        ClipSource::Shards(Arc::new(set))
    };
    // 3. Local steps, on a blocking thread; Ctrl-C is honoured between steps.
    let fetch_time = started.elapsed();
    let budget = if steps > 0 {
        RoundBudget::steps(steps)
    } else {
        RoundBudget {
            steps: None,
            time: Some(Duration::from_millis(budget_ms).saturating_sub(fetch_time)),
        }
    };
    let ropts = LocalRoundOptions {
        budget,
        policy,
        seed: run.train.seed ^ round.rotate_left(17),
        worker,
        progress: RunProgress {
            round,
            planned_rounds,
        },
        slowdown: opts.slowdown,
    };
    let stop_flag = stop.clone();
    let progress = opts.progress;
    let bytes_down = st.summary.bytes_down;
    let bytes_up = st.summary.bytes_up;
    let job = tokio::task::spawn_blocking(move || {
        let mut trainer = trainer;
        let t0 = Instant::now();
        let mut on_step = |step: u64, loss: f64| {
            if progress && step.is_multiple_of(5) {
                let rate = (step * run.train.batch as u64) as f64 / t0.elapsed().as_secs_f64();
                eprintln!(
                    "round {round} step {step} loss {loss:.4} {rate:.1} clips/s up {} down {}",
                    human(bytes_up),
                    human(bytes_down)
                );
            }
        };
        let r = local_round(&mut trainer, &start, &source, &ropts, &mut on_step, || {
            stop_flag.load(Ordering::Relaxed)
        });
        (trainer, r)
    });
    // Heartbeats go on while the blocking thread trains.
    let mut job = job;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    let (trainer, result) = loop {
        tokio::select! {
            r = &mut job => break r.map_err(|e| SessionEnd::Lost(format!("training thread: {e}")))?,
            _ = heartbeat.tick() => {
                control.send(&ClientMsg::Heartbeat { seq: round }).await.map_err(lost)?;
            }
        }
    };
    st.trainer = Some(trainer);
    let mut update: LocalUpdate = result.map_err(|e| SessionEnd::Lost(e.to_string()))?;
    st.summary.steps += update.steps;
    if stop.load(Ordering::Relaxed) {
        // Ctrl-C: abandon this round's upload.
        return Err(SessionEnd::Done);
    }
    match opts.fault {
        Some(Fault::Nan) => update.model_delta[0] = f32::NAN,
        Some(Fault::Scale(f)) => update.model_delta.iter_mut().for_each(|v| *v *= f),
        Some(Fault::Huge) => update.model_delta.iter_mut().for_each(|v| *v = 3e38),
        Some(Fault::Flip) => update.model_delta.iter_mut().for_each(|v| *v = -*v),
        Some(Fault::Noise(sigma)) => {
            let mut rng = amity_shared::rng::Rng::new(round);
            for v in &mut update.model_delta {
                *v = sigma * rng.normal() as f32;
            }
        }
        Some(Fault::Claim(k)) => {
            update.samples = update.samples.saturating_mul(k);
            update.steps = update.steps.saturating_mul(k);
        }
        Some(Fault::Oversize | Fault::Replay) | None => {}
    }
    // 4. Compress (error feedback keeps what top-k and int8 drop) and offer the blob. A flush
    //    round goes out densely, so the residual is delivered before a checkpoint or the end.
    let values = update.wire_values();
    let spec = if flush { codec.dense() } else { codec };
    let (bytes, _) = st
        .feedback
        .encode_parts(&spec, &values, &update.wire_parts());
    let stored = st
        .cache
        .put(&bytes)
        .map_err(|e| SessionEnd::Lost(e.to_string()))?;
    st.round_blob(round, stored.id);
    st.summary.bytes_up += bytes.len() as u64;
    let announced = bytes.len() as u64 - u64::from(opts.fault == Some(Fault::Oversize));
    let header = ClientMsg::UpdateHeader {
        round,
        blob: stored.id.0,
        bytes: announced,
        samples: update.samples,
        steps: update.steps,
        loss: LossStats {
            mean: update.loss.mean as f32,
            first: update.loss.first as f32,
            last: update.loss.last as f32,
        },
    };
    control.send(&header).await.map_err(lost)?;
    if opts.fault == Some(Fault::Replay) {
        control.send(&header).await.map_err(lost)?;
    }
    if opts.progress {
        eprintln!(
            "round {round} done: {} steps, {} clips, loss {:.4} -> {:.4}, update {} ({codec}), up {} down {}",
            update.steps,
            update.samples,
            update.loss.first,
            update.loss.last,
            human(bytes.len() as u64),
            human(st.summary.bytes_up),
            human(st.summary.bytes_down)
        );
    }
    Ok(())
}

/// `1.2 MB` style sizes.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// The most bytes a shard may have: ingest cuts shards at 64 MiB by default; this bound only
/// keeps a broken or hostile server from filling the disk.
const MAX_SHARD_BYTES: u64 = 16 << 30;

/// The most bytes a global state or state delta for `params` may have: dense fp32 values plus
/// room for the checkpoint's config and metadata.
fn state_bytes_limit(params: &GlobalParams) -> u64 {
    4 * (params.model.len() + params.target.len()) as u64 + (16 << 20)
}

/// Fetches blob `id` (at most `max_len` bytes) into the cache (verified, resumable) and
/// returns its bytes.
async fn fetch(
    conn: &quinn::Connection,
    peer: &str,
    cache: &LocalStore,
    id: BlobId,
    max_len: u64,
    summary: &mut WorkerSummary,
) -> Result<Vec<u8>, SessionEnd> {
    if cache.contains(&id) {
        return cache.get(&id).map_err(|e| SessionEnd::Lost(e.to_string()));
    }
    let part = cache
        .root()
        .join("tmp")
        .join(format!("{}.fetch", id.to_hex()));
    let bytes = fetch_blob_bytes(conn, peer, id.0, &part, max_len)
        .await
        .map_err(lost)?;
    summary.bytes_down += bytes.len() as u64;
    cache
        .put(&bytes)
        .map_err(|e| SessionEnd::Lost(e.to_string()))?;
    Ok(bytes)
}
