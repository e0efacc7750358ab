//! The async shell around [`Core`]: QUIC with mutual TLS, the command log, the content store.
//!
//! One driver task owns the core. Connection tasks turn what workers send into [`Event`]s on a
//! channel; the driver handles each (plus a tick every 200 ms) and carries out the resulting
//! [`Action`]s in order: blobs into the store, entries into the journal, messages to the
//! connection tasks. Workers pull every blob (state, deltas, shards) on streams of their own;
//! the coordinator pulls each update from its worker the same way, so every transfer is
//! verified and resumable.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::conn::{
    ConnError, MsgStream, OutboardCache, fetch_blob_bytes, serve_blob_requests,
};
use amity_protocol::message::{ClientMsg, ErrorCode, Hash, ServerMsg};
use amity_protocol::tls::{ClientAuth, Identity, peer_name, quic_server_config_with};
use amity_shared::codec;
use amity_shared::corpus::manifest::{Manifest, open_blobs};
use amity_shared::federated::{GlobalParams, RoundLoss};
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::CoordinatorConfig;
use crate::core::{
    Action, ArrivedUpdate, Core, Event, JoinInfo, LogEntry, Provenance, RoundSummary, ShardInfo,
    Snapshot, WorkerId, hex,
};
use crate::journal::Journal;
use crate::release;

/// What the coordinator tells workers (in a `ShuttingDown` error and the connection close
/// reason) when `max_rounds` are done: workers exit instead of reconnecting.
pub const FINISHED_REASON: &str = "training finished";

/// Errors that stop the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Config, certificate, store, journal or snapshot problem at start-up.
    #[error("{0}")]
    Setup(String),
    /// The store or journal failed while running (nothing acknowledged is lost).
    #[error("{0}")]
    Storage(String),
}

/// What `status.json` holds: the operator's view, rewritten after every round.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Next round to run.
    pub round: u64,
    /// Parameters hash (hex).
    pub params: String,
    /// Whether `max_rounds` are done.
    pub finished: bool,
    /// Connected workers: (session, name).
    pub workers: Vec<(WorkerId, String)>,
    /// Corpus epoch and shards covered in it, of all.
    pub epoch: u64,
    /// Shards trained this epoch.
    pub covered: usize,
    /// Shards scheduled (the coordinator's corpus and every institution's own).
    pub shards: usize,
    /// Clips in the shards scheduled.
    pub clips: u64,
    /// Clips in the shards trained this epoch.
    pub covered_clips: u64,
    /// Per-institution accounting.
    pub provenance: std::collections::BTreeMap<String, Provenance>,
    /// Every closed round.
    pub history: Vec<RoundSummary>,
    /// Latest checkpoint file, if any.
    pub checkpoint: Option<PathBuf>,
}

/// Where the coordinator keeps its files under `state_dir`.
#[derive(Debug, Clone)]
pub struct StateLayout {
    /// The folder.
    pub dir: PathBuf,
}

impl StateLayout {
    /// The content store of states, deltas, snapshots and received updates.
    pub fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }
    /// The command log.
    pub fn journal(&self) -> PathBuf {
        self.dir.join("journal.redb")
    }
    /// `status.json`.
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    /// Checkpoints (`round-N.safetensors`, `latest.safetensors`).
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    /// Published releases, one folder each (plain folders: mirror them anywhere).
    pub fn releases(&self) -> PathBuf {
        self.dir.join("releases")
    }
    /// Partial downloads of updates.
    pub fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }
}

type Outboxes = Arc<Mutex<HashMap<WorkerId, mpsc::UnboundedSender<ServerMsg>>>>;

struct Shared {
    store: LocalStore,
    corpus: Option<LocalStore>,
    layout: StateLayout,
    update_parts: Vec<usize>,
    events: mpsc::UnboundedSender<Event>,
    outboxes: Outboxes,
    next_worker: AtomicU64,
    /// Outboards of served blobs: each round's state delta is hashed once, not per worker.
    outboards: OutboardCache,
}

impl Shared {
    /// Sends every connected worker a `ShuttingDown` error with `message` (workers that read
    /// [`FINISHED_REASON`] in it exit instead of reconnecting).
    fn tell_everyone(&self, message: &str) {
        let msg = ServerMsg::Error {
            code: ErrorCode::ShuttingDown,
            message: message.into(),
        };
        for tx in self.outboxes.lock().expect("outbox lock").values() {
            let _ = tx.send(msg.clone());
        }
    }

    /// Where blob `id` lives, if the coordinator holds it.
    fn blob_path(&self, id: &BlobId) -> Option<PathBuf> {
        if self.store.contains(id) {
            return Some(self.store.path(id));
        }
        self.corpus
            .as_ref()
            .filter(|c| c.contains(id))
            .map(|c| c.path(id))
    }
}

fn setup(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Setup(e.to_string())
}

/// Builds the core: resumed from the journal when it holds a closed round, fresh otherwise.
fn build_core(
    cfg: &CoordinatorConfig,
    store: &LocalStore,
    journal: &Journal,
) -> Result<(Core, Vec<Action>), CoordinatorError> {
    let core_cfg = cfg.core().map_err(setup)?;
    let point = journal.resume_point().map_err(setup)?;
    if let Some(snap_id) = point.snapshot {
        let bytes = store.get(&snap_id).map_err(setup)?;
        let snap = Snapshot::from_bytes(&bytes).map_err(setup)?;
        let (mut core, actions) = Core::restore(core_cfg, snap);
        let parts = core.update_parts();
        for entry in &point.accepted {
            if let LogEntry::UpdateAccepted { blob, .. } = entry {
                let bytes = store.get(blob).map_err(setup)?;
                let values = codec::decode_parts(&bytes, &parts)
                    .map_err(|e| setup(format!("logged update {blob}: {e}")))?;
                core.replay_update(entry, values);
            }
        }
        tracing::info!(
            round = core.round(),
            params = %hex(&core.params_hash()),
            replayed = point.accepted.len(),
            "resumed from the command log"
        );
        return Ok((core, actions));
    }
    let run = &core_cfg.run;
    let params = GlobalParams::seeded(run);
    let shards = match &cfg.corpus {
        Some(dir) => {
            let m = Manifest::load(dir).map_err(setup)?;
            m.check_model(&run.model)
                .map_err(|r| setup(format!("{}: {r}", dir.display())))?;
            m.shards
                .iter()
                .map(|s| ShardInfo {
                    id: s.id,
                    clips: s.clips,
                })
                .collect()
        }
        None => Vec::new(),
    };
    Ok(Core::new(core_cfg, params, &shards))
}

/// Runs the coordinator until `shutdown` resolves (or, with `exit_when_finished`, until
/// `max_rounds` are done). Returns the final status.
pub async fn run(
    cfg: CoordinatorConfig,
    identity: Identity,
    exit_when_finished: bool,
    shutdown: impl std::future::Future<Output = ()>,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<Status, CoordinatorError> {
    let layout = StateLayout {
        dir: cfg.state_dir.clone(),
    };
    let store = LocalStore::open(&layout.blobs()).map_err(setup)?;
    let corpus = match &cfg.corpus {
        Some(dir) => Some(open_blobs(dir).map_err(setup)?),
        None => None,
    };
    for d in [layout.checkpoints(), layout.incoming()] {
        std::fs::create_dir_all(&d).map_err(|e| setup(format!("{}: {e}", d.display())))?;
    }
    let mut journal = Journal::open(&layout.journal()).map_err(setup)?;
    let (mut core, initial) = build_core(&cfg, &store, &journal)?;

    let revoked: BTreeSet<String> = cfg.revoked.iter().cloned().collect();
    // Workers need an institution certificate; downstream users may download releases
    // without one (what an anonymous peer may do is decided per message below).
    let server_cfg =
        quic_server_config_with(&identity, &revoked, ClientAuth::Optional).map_err(setup)?;
    let endpoint = amity_protocol::endpoint::server(cfg.listen, server_cfg)
        .map_err(|e| setup(format!("listen on {}: {e}", cfg.listen)))?;
    let addr = endpoint.local_addr().map_err(setup)?;
    tracing::info!(%addr, round = core.round(), "coordinator listening");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        store,
        corpus,
        layout: layout.clone(),
        update_parts: core.update_parts(),
        events: events_tx,
        outboxes: Arc::new(Mutex::new(HashMap::new())),
        next_worker: AtomicU64::new(1),
        outboards: OutboardCache::new(),
    });
    let mut checkpoint = latest_checkpoint(&layout);
    execute(&shared, &mut journal, initial, &mut checkpoint)?;
    write_status(&layout, &core, &checkpoint);

    let accept = {
        let shared = shared.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => serve_connection(shared, conn).await,
                        Err(e) => tracing::warn!("handshake refused: {e}"),
                    }
                });
            }
        })
    };

    let start = Instant::now();
    let mut told_finished = false;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    tokio::pin!(shutdown);
    let result = loop {
        let event = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tick.tick() => Event::Tick,
            e = events.recv() => match e {
                Some(e) => e,
                None => break Ok(()),
            },
        };
        let actions = core.handle(event, start.elapsed().as_millis() as u64);
        let closed = actions.iter().any(|a| matches!(a, Action::RoundClosed(_)));
        if let Err(e) = execute(&shared, &mut journal, actions, &mut checkpoint) {
            break Err(e);
        }
        if closed {
            write_status(&layout, &core, &checkpoint);
        }
        if core.finished() {
            if exit_when_finished {
                break Ok(());
            }
            if !told_finished {
                // Workers go home; the coordinator stays up to serve checkpoints and releases.
                told_finished = true;
                shared.tell_everyone(FINISHED_REASON);
            }
        }
    };
    // Tell the workers, then close.
    shared.tell_everyone(if core.finished() {
        FINISHED_REASON
    } else {
        "coordinator shutting down"
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let reason: &[u8] = if core.finished() {
        FINISHED_REASON.as_bytes()
    } else {
        b"shutting down"
    };
    endpoint.close(
        amity_protocol::conn::quic_code(ErrorCode::ShuttingDown),
        reason,
    );
    accept.abort();
    write_status(&layout, &core, &checkpoint);
    result?;
    Ok(status(&core, &checkpoint))
}

fn latest_checkpoint(layout: &StateLayout) -> Option<PathBuf> {
    let p = layout.checkpoints().join("latest.safetensors");
    p.exists().then_some(p)
}

fn status(core: &Core, checkpoint: &Option<PathBuf>) -> Status {
    Status {
        round: core.round(),
        params: hex(&core.params_hash()),
        finished: core.finished(),
        workers: core.workers(),
        epoch: core.plan().epoch,
        covered: core.plan().covered.len(),
        shards: core.plan().shards.len(),
        clips: core.plan().clips(),
        covered_clips: core.plan().covered_clips(),
        provenance: core.provenance().clone(),
        history: core.history().to_vec(),
        checkpoint: checkpoint.clone(),
    }
}

fn write_status(layout: &StateLayout, core: &Core, checkpoint: &Option<PathBuf>) {
    let s = status(core, checkpoint);
    let tmp = layout.dir.join("status.json.tmp");
    let json = serde_json::to_vec_pretty(&s).expect("status serialises");
    if std::fs::write(&tmp, json)
        .and_then(|_| std::fs::rename(&tmp, layout.status()))
        .is_err()
    {
        tracing::warn!("cannot write {}", layout.status().display());
    }
}

fn execute(
    shared: &Shared,
    journal: &mut Journal,
    actions: Vec<Action>,
    checkpoint: &mut Option<PathBuf>,
) -> Result<(), CoordinatorError> {
    let storage = |e: &dyn std::fmt::Display| CoordinatorError::Storage(e.to_string());
    for action in actions {
        match action {
            Action::StoreBlob { what, bytes } => {
                let stored = shared.store.put(&bytes).map_err(|e| storage(&e))?;
                tracing::debug!(what, id = %stored.id.short(), len = stored.len, "stored");
            }
            Action::Persist(entry) => {
                journal.append(&entry).map_err(|e| storage(&e))?;
            }
            Action::Send { worker, msg } => {
                if let Some(tx) = shared.outboxes.lock().expect("outbox lock").get(&worker) {
                    let _ = tx.send(msg);
                }
            }
            Action::Checkpoint { round, blob } => {
                let dir = shared.layout.checkpoints();
                let file = dir.join(format!("round-{round}.safetensors"));
                let latest = dir.join("latest.safetensors");
                let src = shared.store.path(&blob);
                std::fs::copy(&src, &file)
                    .and_then(|_| std::fs::copy(&src, &latest))
                    .map_err(|e| storage(&format!("{}: {e}", file.display())))?;
                tracing::info!(round, file = %file.display(), "checkpoint written");
                *checkpoint = Some(latest);
            }
            Action::RoundClosed(s) => {
                tracing::info!(
                    round = s.round,
                    loss = s.loss,
                    accepted = s.accepted.len(),
                    bytes_up = s.bytes_up,
                    bytes_down = s.bytes_down,
                    "round summary"
                );
            }
            Action::Finished => tracing::info!("all rounds done"),
        }
    }
    Ok(())
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    // A peer without a certificate is a downstream user: releases only.
    let named = peer_name(&conn);
    let anonymous = named.is_none();
    let peer = named.unwrap_or_else(|| format!("anonymous client {}", conn.remote_address()));
    let mut control = match MsgStream::accept(&conn, &peer).await {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("{e}");
            return;
        }
    };
    // Hello first.
    match control.recv::<ClientMsg>().await {
        Ok(Some(ClientMsg::Hello { protocol, .. })) if protocol == PROTOCOL_VERSION => {}
        Ok(Some(ClientMsg::Hello { protocol, .. })) => {
            let message =
                format!("protocol {protocol}, this coordinator speaks {PROTOCOL_VERSION}");
            let _ = control
                .send(&ServerMsg::Error {
                    code: ErrorCode::VersionMismatch,
                    message,
                })
                .await;
            return;
        }
        other => {
            tracing::warn!(%peer, "expected Hello, got {other:?}");
            return;
        }
    }
    let welcome = ServerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        identity: peer.clone(),
    };
    if control.send(&welcome).await.is_err() {
        return;
    }
    // Blob requests on further streams: members get training blobs and releases, anonymous
    // peers releases only (never shards or states).
    let blobs = {
        let shared = shared.clone();
        let conn = conn.clone();
        let peer = peer.clone();
        let outboards = shared.outboards.clone();
        tokio::spawn(serve_blob_requests(
            conn,
            peer,
            outboards,
            move |id: &Hash| {
                let id = BlobId(*id);
                let training = if anonymous {
                    None
                } else {
                    shared.blob_path(&id)
                };
                training.or_else(|| release::locate(&release::scan(&shared.layout.releases()), &id))
            },
        ))
    };
    let caps = loop {
        match control.recv::<ClientMsg>().await {
            Ok(Some(ClientMsg::Register(_))) if anonymous => {
                let message = "training needs an institution certificate from the operator's CA \
                               (amity ca issue); without one you may only fetch releases"
                    .to_owned();
                let _ = control
                    .send(&ServerMsg::Error {
                        code: ErrorCode::Unexpected,
                        message,
                    })
                    .await;
                tracing::warn!(%peer, "refused registration without a certificate");
                blobs.abort();
                // Let the peer read the refusal before the connection goes.
                control.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
                return;
            }
            Ok(Some(ClientMsg::Register(c))) => break c,
            Ok(Some(ClientMsg::ReleaseQuery { name })) => {
                let releases = release::scan(&shared.layout.releases());
                let answer = match release::find(&releases, &name) {
                    Some(r) => ServerMsg::ReleaseInfo {
                        name: r.signed.manifest.name.clone(),
                        manifest: r.signed.manifest_id().0,
                        signature: r.signed.signature.clone(),
                    },
                    None => {
                        let mut names: Vec<&str> = releases
                            .iter()
                            .map(|r| r.signed.manifest.name.as_str())
                            .collect();
                        names.sort_unstable();
                        ServerMsg::Error {
                            code: ErrorCode::NotFound,
                            message: format!(
                                "no release `{name}` here (published: {})",
                                if names.is_empty() {
                                    "none".to_owned()
                                } else {
                                    names.join(", ")
                                }
                            ),
                        }
                    }
                };
                if control.send(&answer).await.is_err() {
                    blobs.abort();
                    return;
                }
            }
            Ok(Some(ClientMsg::Goodbye)) | Ok(None) => {
                // A downstream client: it fetches blobs until it closes the connection.
                let _ = blobs.await;
                return;
            }
            Err(ConnError::Connection { .. }) => {
                // A downstream client that fetched what it wanted and closed.
                tracing::debug!(%peer, "connection closed");
                blobs.abort();
                return;
            }
            other => {
                tracing::warn!(%peer, "expected Register or ReleaseQuery, got {other:?}");
                blobs.abort();
                return;
            }
        }
    };
    let worker = shared.next_worker.fetch_add(1, Ordering::Relaxed);
    let (tx, mut outbox) = mpsc::unbounded_channel();
    shared
        .outboxes
        .lock()
        .expect("outbox lock")
        .insert(worker, tx);
    let local_shards = caps
        .local_shards
        .iter()
        .map(|s| ShardInfo {
            id: BlobId(s.id),
            clips: s.clips,
        })
        .collect();
    let info = JoinInfo {
        name: peer.clone(),
        backend: caps.backend.clone(),
        samples_per_s: caps.samples_per_s as f64,
        local_shards,
    };
    let _ = shared.events.send(Event::Joined { worker, info });

    loop {
        tokio::select! {
            msg = outbox.recv() => {
                let Some(msg) = msg else { break };
                let last = matches!(msg, ServerMsg::Error { code: ErrorCode::ShuttingDown, .. });
                if control.send(&msg).await.is_err() {
                    break;
                }
                if last {
                    // Let the worker read it and close first.
                    control.finish();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        conn.closed(),
                    )
                    .await;
                    break;
                }
            }
            msg = control.recv::<ClientMsg>() => match msg {
                Ok(Some(ClientMsg::Heartbeat { .. })) => {
                    let _ = shared.events.send(Event::Heartbeat { worker });
                }
                Ok(Some(ClientMsg::UpdateHeader { round, blob, bytes, samples, steps, loss })) => {
                    let shared = shared.clone();
                    let conn = conn.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        let loss = RoundLoss {
                            mean: loss.mean as f64,
                            first: loss.first as f64,
                            last: loss.last as f64,
                        };
                        match pull_update(&shared, &conn, &peer, BlobId(blob), bytes).await {
                            Ok(values) => {
                                let update = ArrivedUpdate {
                                    round, blob: BlobId(blob), bytes, samples, steps, loss, values,
                                };
                                let _ = shared.events.send(Event::Update { worker, update });
                            }
                            Err(e) => {
                                tracing::warn!(%peer, round, "update refused: {e}");
                                let reason = format!("refused on arrival: {e}");
                                let refused = Event::UpdateRefused { worker, round, reason };
                                let _ = shared.events.send(refused);
                                if let Some(tx) = shared.outboxes.lock().expect("outbox lock").get(&worker) {
                                    let _ = tx.send(ServerMsg::Error {
                                        code: ErrorCode::Malformed,
                                        message: format!("update for round {round}: {e}"),
                                    });
                                }
                            }
                        }
                    });
                }
                Ok(Some(ClientMsg::Goodbye)) | Ok(None) => break,
                Ok(Some(other)) => {
                    tracing::warn!(%peer, "unexpected {other:?} on the control stream");
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    break;
                }
            }
        }
    }
    shared.outboxes.lock().expect("outbox lock").remove(&worker);
    let _ = shared.events.send(Event::Left { worker });
    blobs.abort();
}

/// Fetches an update from its worker into the store and decodes it (validated in full).
async fn pull_update(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &str,
    id: BlobId,
    announced: u64,
) -> Result<Vec<f32>, String> {
    // An update is at most a dense fp32 vector plus its header.
    let values: usize = shared.update_parts.iter().sum();
    let limit = values as u64 * 4 + 64 * shared.update_parts.len() as u64;
    if announced > limit {
        return Err(format!(
            "{announced} bytes announced, at most {limit} allowed"
        ));
    }
    let bytes = if shared.store.contains(&id) {
        shared.store.get(&id).map_err(|e| e.to_string())?
    } else {
        let part = shared
            .layout
            .incoming()
            .join(format!("{}.part", id.to_hex()));
        let bytes = fetch_blob_bytes(conn, peer, id.0, &part)
            .await
            .map_err(|e: ConnError| e.to_string())?;
        shared.store.put(&bytes).map_err(|e| e.to_string())?;
        bytes
    };
    codec::decode_parts(&bytes, &shared.update_parts).map_err(|e| e.to_string())
}
