//! The async shell around [`Core`]: QUIC with mutual TLS, the command log, the content store.
//!
//! One driver task owns the core. Connection tasks turn what workers send into [`Event`]s on a
//! channel; the driver handles each (plus a tick every 200 ms) and carries out the resulting
//! [`Action`]s in order: blobs into the store, entries into the journal, messages to the
//! connection tasks. Workers pull every blob (state, deltas, shards) on streams of their own;
//! the coordinator pulls each update from its worker the same way, so every transfer is
//! verified and resumable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::conn::{
    ConnError, MsgStream, OutboardCache, fetch_blob_bytes, serve_blob_requests,
};
use amity_protocol::message::{Capabilities, ClientMsg, ErrorCode, MAX_STRING, ServerMsg, brief};
use amity_protocol::tls::{ClientAuth, Identity, Revocations, peer_name, quic_server_config_with};
use amity_shared::codec;
use amity_shared::corpus::manifest::{Manifest, open_blobs};
use amity_shared::data::ClipSource;
use amity_shared::federated::{GlobalParams, RoundLoss};
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::CoordinatorConfig;
use crate::core::{
    Action, ArrivedUpdate, Core, Event, JoinInfo, LogEntry, Provenance, RoundSummary, ShardInfo,
    Snapshot, WorkerId,
};
use crate::journal::Journal;
use crate::layout::StateLayout;
use crate::release;
use crate::retention::{Retention, Usage};
use crate::scoring::HeldOut;

/// What the coordinator says (with [`ErrorCode::Finished`], in an error message and as the
/// connection close reason) when `max_rounds` are done: workers exit instead of reconnecting.
const FINISHED_REASON: &str = "training finished";

/// Connections of any kind at once. QUIC connections share one UDP socket, but each holds
/// memory and, while it fetches, open files; beyond this, new ones are refused before their
/// handshake.
pub const MAX_CONNECTIONS: usize = 2048;
/// Connections without a certificate (downstream users fetching releases) at once, in all.
pub const MAX_ANONYMOUS: usize = 512;
/// Connections without a certificate at once from one IP address.
pub const MAX_ANONYMOUS_PER_IP: usize = 16;
/// Streams an anonymous peer may have open at once: its control stream and a few fetches.
pub const ANONYMOUS_STREAMS: u32 = 4;
/// The time a peer has to finish its handshake, open its control stream and say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the coordinator turned away, for `status.json`: each attack it meets is logged where it
/// happens and counted here.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Defence {
    /// Connections refused before their handshake ([`MAX_CONNECTIONS`] reached).
    pub connections_refused: u64,
    /// Anonymous connections closed over [`MAX_ANONYMOUS`] or [`MAX_ANONYMOUS_PER_IP`].
    pub anonymous_over_cap: u64,
    /// Peers that did not finish the handshake and Hello within [`HELLO_TIMEOUT`].
    pub hello_timeouts: u64,
    /// Registrations refused to peers without a certificate.
    pub registrations_refused: u64,
    /// Updates refused before or while they were fetched (round not open, one already
    /// received, longer than announced, not matching their id, undecodable), by institution.
    pub updates_refused: BTreeMap<String, u64>,
    /// Store or journal writes that failed and were retried (a full disk, say).
    pub storage_faults: u64,
    /// The last storage fault, until a write succeeds again.
    pub storage_error: Option<String>,
}

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
    /// What was turned away: refused connections and updates, storage faults.
    pub defence: Defence,
    /// The store after the last retention sweep, and what retention removed.
    pub storage: Usage,
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
    /// The round the core has open (or will open next), for checks made before a transfer.
    round: AtomicU64,
    /// Whether updates for closed rounds are dropped (then they are refused unfetched).
    late_dropped: bool,
    /// Update pulls under way or done, by (worker name, round): one per worker and round.
    pulls: Mutex<HashMap<(String, u64), PullState>>,
    /// Updates being pulled, or pulled and not yet handled by the core: retention keeps them.
    pinned: Mutex<BTreeMap<BlobId, usize>>,
    /// The last retention sweep's figures.
    storage: Mutex<Usage>,
    /// The published releases.
    releases: release::ReleaseIndex,
    /// Certificate names refused at the handshake (replaced while running).
    revoked: Revocations,
    /// Bumped when `revoked` changes, so that connections of newly revoked names close.
    revocations_changed: tokio::sync::watch::Sender<u64>,
    /// Anonymous connections open, per IP address.
    anonymous: Mutex<HashMap<IpAddr, usize>>,
    /// What was turned away.
    defence: Mutex<Defence>,
}

/// An anonymous connection's place under the caps; dropping it frees the place.
struct AnonymousSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut open = self.shared.anonymous.lock().expect("anonymous lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Where a worker's update for a round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullState {
    /// Being fetched.
    Pulling,
    /// Fetched and handed to the core.
    Done,
}

impl Shared {
    /// The shell's shared state over `store`, with the store's unfinished writes and the
    /// partial updates of an earlier run cleared (workers send afresh).
    fn open(
        store: LocalStore,
        corpus: Option<LocalStore>,
        layout: &StateLayout,
        core: &Core,
        events_tx: mpsc::UnboundedSender<Event>,
        revoked: Revocations,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            store,
            corpus,
            layout: layout.clone(),
            update_parts: core.update_parts(),
            events: events_tx,
            outboxes: Arc::new(Mutex::new(HashMap::new())),
            next_worker: AtomicU64::new(1),
            outboards: OutboardCache::new(),
            round: AtomicU64::new(core.round()),
            late_dropped: core.config().rounds.late == crate::config::LatePolicy::Drop,
            pulls: Mutex::new(HashMap::new()),
            pinned: Mutex::new(BTreeMap::new()),
            storage: Mutex::new(Usage::default()),
            releases: release::ReleaseIndex::new(layout.releases()),
            revoked,
            revocations_changed: tokio::sync::watch::Sender::new(0),
            anonymous: Mutex::new(HashMap::new()),
            defence: Mutex::new(Defence::default()),
        });
        match shared.store.clear_temp() {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} unfinished writes from the store"),
            Err(e) => tracing::warn!("{e}"),
        }
        // Partial updates of an earlier run are never resumed (workers send afresh).
        if let Ok(entries) = std::fs::read_dir(layout.incoming()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        shared
    }
}

impl Shared {
    /// A place for an anonymous connection from `ip`, or `None` over the caps.
    fn anonymous_slot(self: &Arc<Self>, ip: IpAddr) -> Option<AnonymousSlot> {
        let mut open = self.anonymous.lock().expect("anonymous lock");
        let total: usize = open.values().sum();
        let here = open.entry(ip).or_default();
        if total >= MAX_ANONYMOUS || *here >= MAX_ANONYMOUS_PER_IP {
            if *here == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *here += 1;
        Some(AnonymousSlot {
            shared: self.clone(),
            ip,
        })
    }

    /// Records something turned away (or a storage fault) in the `defence` counters.
    fn count(&self, record: impl FnOnce(&mut Defence)) {
        record(&mut self.defence.lock().expect("defence lock"));
    }

    /// Counts a refused update from `from`.
    fn count_refused_update(&self, from: &str) {
        self.count(|d| *d.updates_refused.entry(from.to_owned()).or_default() += 1);
    }

    /// Claims the pull of `from`'s update for `round`, or says why it may not happen: the round
    /// is not open, or this worker's update for it is already being fetched or was fetched.
    fn claim_pull(&self, from: &str, round: u64) -> Result<(), String> {
        let open = self.round.load(Ordering::Relaxed);
        if round > open {
            return Err(format!("round {round} is not open (round {open} is)"));
        }
        if round < open && self.late_dropped {
            return Err(format!("round {round} closed; late updates are dropped"));
        }
        let mut pulls = self.pulls.lock().expect("pulls lock");
        // Forget pulls of rounds long closed.
        pulls.retain(|(_, r), _| r + 64 >= open);
        match pulls.get(&(from.to_owned(), round)) {
            Some(PullState::Pulling) => {
                Err(format!("an update for round {round} is already arriving"))
            }
            Some(PullState::Done) => {
                Err(format!("an update for round {round} was already received"))
            }
            None => {
                pulls.insert((from.to_owned(), round), PullState::Pulling);
                Ok(())
            }
        }
    }

    /// Ends a claimed pull: kept as done, or released (a failed transfer may be retried).
    fn end_pull(&self, from: &str, round: u64, done: bool) {
        let mut pulls = self.pulls.lock().expect("pulls lock");
        if done {
            pulls.insert((from.to_owned(), round), PullState::Done);
        } else {
            pulls.remove(&(from.to_owned(), round));
        }
    }
}

impl Shared {
    /// Sends every connected worker an error with `code` (`Finished`: the workers exit;
    /// `ShuttingDown`: they reconnect later) and `message`, the last message of their session.
    fn tell_everyone(&self, code: ErrorCode, message: &str) {
        let msg = ServerMsg::Error {
            code,
            message: message.into(),
        };
        for tx in self.outboxes.lock().expect("outbox lock").values() {
            let _ = tx.send(msg.clone());
        }
    }

    /// Keeps blob `id` from retention until [`Shared::unpin`].
    fn pin(&self, id: BlobId) {
        *self.pinned.lock().expect("pin lock").entry(id).or_default() += 1;
    }

    /// Undoes one [`Shared::pin`].
    fn unpin(&self, id: &BlobId) {
        let mut pinned = self.pinned.lock().expect("pin lock");
        if let Some(n) = pinned.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                pinned.remove(id);
            }
        }
    }

    /// Queues `msg` for `worker`'s connection, if it is still connected.
    fn tell(&self, worker: WorkerId, msg: ServerMsg) {
        if let Some(tx) = self.outboxes.lock().expect("outbox lock").get(&worker) {
            let _ = tx.send(msg);
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
        let (mut core, actions) =
            Core::restore(core_cfg, snap).map_err(|e| setup(format!("snapshot {snap_id}: {e}")))?;
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
            params = %core.params_hash().to_hex(),
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

/// Gives `core` its contribution scorer: held-out clips from the coordinator's corpus (a seeded
/// sample) or, without one, synthetic clips from a stream no worker draws.
fn add_scorer(cfg: &CoordinatorConfig, core: &mut Core) -> Result<(), CoordinatorError> {
    let clips = core.config().aggregation.held_out_clips;
    if clips == 0 {
        return Ok(());
    }
    let run = core.config().run.clone();
    let source = match &cfg.corpus {
        Some(dir) => ClipSource::shards(dir, &run.model, None).map_err(setup)?,
        None => ClipSource::synthetic(&run.model),
    };
    core.set_scorer(Box::new(HeldOut::new(&run, &source, clips)));
    Ok(())
}

/// Runs the coordinator until `shutdown` resolves (or, with `exit_when_finished`, until
/// `max_rounds` are done). Returns the final status.
pub async fn run(
    cfg: CoordinatorConfig,
    identity: Identity,
    controls: Controls,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Status, CoordinatorError> {
    let Controls {
        exit_when_finished,
        bound,
        mut revocations,
    } = controls;
    raise_open_file_limit();
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
    add_scorer(&cfg, &mut core)?;

    let revoked = Revocations::new(cfg.revoked.iter().cloned());
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
    let shared = Shared::open(store, corpus, &layout, &core, events_tx, revoked);
    let mut checkpoint = latest_checkpoint(&layout);
    for action in &initial {
        execute_one(&shared, &mut journal, action, &mut checkpoint)?;
    }
    let mut retention = Retention::new(cfg.retention);
    sweep(&shared, &mut retention, &mut journal, &core);
    write_status(&shared, &core, &checkpoint);

    let accept = tokio::spawn(accept_connections(shared.clone(), endpoint.clone()));

    let start = Instant::now();
    let mut told_finished = false;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    tokio::pin!(shutdown);
    let result = loop {
        let event = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(names) = next_revocations(&mut revocations) => {
                revoke(&shared, names);
                continue;
            }
            _ = tick.tick() => Event::Tick,
            e = events.recv() => match e {
                Some(e) => e,
                None => break Ok(()),
            },
        };
        // An update the core is about to see stays pinned until its decision is carried out.
        let pulled = match &event {
            Event::Update { update, .. } => Some(update.blob),
            _ => None,
        };
        let actions = core.handle(event, start.elapsed().as_millis() as u64);
        shared.round.store(core.round(), Ordering::Relaxed);
        let closed = actions.iter().any(|a| matches!(a, Action::RoundClosed(_)));
        if let Err(e) = execute_retrying(
            &shared,
            &mut journal,
            &mut core,
            actions,
            &mut checkpoint,
            &mut shutdown,
        )
        .await
        {
            break Err(e);
        }
        if let Some(id) = pulled {
            shared.unpin(&id);
        }
        if closed {
            sweep(&shared, &mut retention, &mut journal, &core);
            write_status(&shared, &core, &checkpoint);
        }
        if core.finished() {
            if exit_when_finished {
                break Ok(());
            }
            if !told_finished {
                // Workers go home; the coordinator stays up to serve checkpoints and releases.
                told_finished = true;
                shared.tell_everyone(ErrorCode::Finished, FINISHED_REASON);
            }
        }
    };
    // Tell the workers, then close.
    let (code, reason) = if core.finished() {
        (ErrorCode::Finished, FINISHED_REASON)
    } else {
        (ErrorCode::ShuttingDown, "coordinator shutting down")
    };
    shared.tell_everyone(code, reason);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    endpoint.close(amity_protocol::conn::quic_code(code), reason.as_bytes());
    accept.abort();
    write_status(&shared, &core, &checkpoint);
    result?;
    Ok(status(&shared, &core, &checkpoint))
}

/// Accepts connections until the endpoint closes: over [`MAX_CONNECTIONS`] refused, unvalidated
/// addresses sent a Retry first, the handshake given [`HELLO_TIMEOUT`], then one task each.
async fn accept_connections(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if endpoint.open_connections() >= MAX_CONNECTIONS {
            tracing::warn!(
                from = %incoming.remote_address(),
                "connection refused: {MAX_CONNECTIONS} connections open"
            );
            shared.count(|d| d.connections_refused += 1);
            incoming.refuse();
            continue;
        }
        // Address validation (a Retry round trip) before any handshake work, so that a spoofed
        // source address cannot make us spend or send on its behalf.
        let incoming = if incoming.remote_address_validated() {
            incoming
        } else {
            match incoming.retry() {
                Ok(()) => continue,
                Err(e) => e.into_incoming(),
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => serve_connection(shared, conn).await,
                Ok(Err(e)) => tracing::warn!(%from, "handshake refused: {e}"),
                Err(_) => {
                    tracing::warn!(%from, "handshake not finished in {HELLO_TIMEOUT:?}");
                    shared.count(|d| d.hello_timeouts += 1);
                }
            }
        });
    }
}

/// What drives [`run`] from outside besides its config.
#[derive(Debug, Default)]
pub struct Controls {
    /// Return once `max_rounds` are done (otherwise stay up, serving checkpoints and releases).
    pub exit_when_finished: bool,
    /// Told the bound address once the endpoint listens.
    pub bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    /// New revocation lists (`amity coordinator` sends one per SIGHUP, re-read from
    /// `coordinator.toml`): names added are refused from their next handshake on, and their
    /// open connections are closed.
    pub revocations: Option<mpsc::UnboundedReceiver<Vec<String>>>,
}

async fn next_revocations(
    rx: &mut Option<mpsc::UnboundedReceiver<Vec<String>>>,
) -> Option<Vec<String>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Replaces the revocation list and closes the connections of names newly on it.
fn revoke(shared: &Shared, names: Vec<String>) {
    let count = names.len();
    let added = shared.revoked.replace(names);
    tracing::info!(
        revoked = count,
        added = ?added,
        "revocation list reloaded"
    );
    if !added.is_empty() {
        shared.revocations_changed.send_modify(|n| *n += 1);
    }
}

/// Raises the soft limit on open files to the hard limit: every blob a peer fetches holds a file
/// while it is served, and running out of descriptors would fail the store's writes.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
        let raised = unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && {
                let was = r.rlim_cur;
                r.rlim_cur = r.rlim_max;
                was >= r.rlim_max || libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0
            }
        };
        if raised {
            tracing::debug!(limit = r.rlim_cur, "open-file limit");
        } else {
            tracing::warn!("cannot raise the open-file limit");
        }
    }
}

fn latest_checkpoint(layout: &StateLayout) -> Option<PathBuf> {
    let p = layout.latest_checkpoint();
    p.exists().then_some(p)
}

fn status(shared: &Shared, core: &Core, checkpoint: &Option<PathBuf>) -> Status {
    Status {
        round: core.round(),
        params: core.params_hash().to_hex(),
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
        defence: shared.defence.lock().expect("defence lock").clone(),
        storage: shared.storage.lock().expect("storage lock").clone(),
    }
}

fn write_status(shared: &Shared, core: &Core, checkpoint: &Option<PathBuf>) {
    let layout = &shared.layout;
    let s = status(shared, core, checkpoint);
    let tmp = layout.dir.join("status.json.tmp");
    let json = serde_json::to_vec_pretty(&s).expect("status serialises");
    if let Err(e) = std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, layout.status()))
    {
        tracing::warn!("cannot write {}: {e}", layout.status().display());
    }
}

/// Deletes what no longer needs keeping ([`crate::retention`]). A failure is logged and counted,
/// never fatal: the next round sweeps again.
fn sweep(shared: &Shared, retention: &mut Retention, journal: &mut Journal, core: &Core) {
    let pinned: BTreeSet<BlobId> = shared
        .pinned
        .lock()
        .expect("pin lock")
        .keys()
        .copied()
        .collect();
    let swept = retention.sweep(
        core.live_blobs(),
        &pinned,
        journal,
        &shared.store,
        &shared.layout,
    );
    match swept {
        Ok(()) => *shared.storage.lock().expect("storage lock") = retention.usage().clone(),
        Err(e) => {
            tracing::warn!("{e}; trying again after the next round");
            shared.count(|d| {
                d.storage_faults += 1;
                d.storage_error = Some(e.to_string());
            });
        }
    }
}

/// Copies `src` to `dst` atomically: into a temporary file beside `dst`, synced, then renamed
/// over it, so that a reader (`amity release`) or a crash never sees half a checkpoint.
fn install_copy(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<()> {
    let tmp = dst.with_extension("tmp");
    std::fs::copy(src, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dst)?;
    if let Some(dir) = dst.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Carries out the core's actions in order. A failed write (a full disk, too many open files) is
/// retried with backoff until it succeeds or `shutdown` resolves (then its error is returned):
/// nothing the core decided is skipped, and no resource error ends the coordinator on its own.
async fn execute_retrying<F: std::future::Future<Output = ()>>(
    shared: &Shared,
    journal: &mut Journal,
    // `&mut` only so that the future is `Send` (the core is not `Sync`); it is only read.
    core: &mut Core,
    actions: Vec<Action>,
    checkpoint: &mut Option<PathBuf>,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Result<(), CoordinatorError> {
    for action in actions {
        let mut delay = Duration::from_secs(1);
        while let Err(e) = execute_one(shared, journal, &action, checkpoint) {
            tracing::error!("{e}; retrying in {delay:?} (nothing acknowledged is lost)");
            shared.count(|d| {
                d.storage_faults += 1;
                d.storage_error = Some(e.to_string());
            });
            write_status(shared, core, checkpoint);
            tokio::select! {
                _ = shutdown.as_mut() => return Err(e),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        shared.count(|d| d.storage_error = None);
    }
    Ok(())
}

/// Carries out one action of the core. Fails only on storage (store, journal, checkpoint file).
fn execute_one(
    shared: &Shared,
    journal: &mut Journal,
    action: &Action,
    checkpoint: &mut Option<PathBuf>,
) -> Result<(), CoordinatorError> {
    let storage = |e: &dyn std::fmt::Display| CoordinatorError::Storage(e.to_string());
    match action {
        Action::StoreBlob { what, bytes } => {
            let stored = shared
                .store
                .put(bytes)
                .map_err(|e| storage(&format!("storing the {what}: {e}")))?;
            tracing::debug!(what, id = %stored.id.short(), len = stored.len, "stored");
        }
        Action::Persist(entry) => {
            journal
                .append(entry)
                .map_err(|e| storage(&format!("journal: {e}")))?;
        }
        Action::Send { worker, msg } => shared.tell(*worker, msg.clone()),
        Action::Checkpoint { round, blob } => {
            let file = shared.layout.round_checkpoint(*round);
            let latest = shared.layout.latest_checkpoint();
            let src = shared.store.path(blob);
            for dst in [&file, &latest] {
                install_copy(&src, dst).map_err(|e| storage(&format!("{}: {e}", dst.display())))?;
            }
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
    Ok(())
}

/// Aborts a task when dropped (when the connection task that started it ends, however).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes `conn` (with [`ErrorCode::Revoked`]) once `peer`'s name is revoked.
fn watch_revocation(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &str,
) -> tokio::task::JoinHandle<()> {
    let mut changed = shared.revocations_changed.subscribe();
    let revoked = shared.revoked.clone();
    let (conn, peer) = (conn.clone(), peer.to_owned());
    tokio::spawn(async move {
        while changed.changed().await.is_ok() {
            if revoked.contains(&peer) {
                tracing::warn!(%peer, "certificate revoked: closing its connection");
                conn.close(
                    amity_protocol::conn::quic_code(ErrorCode::Revoked),
                    b"certificate revoked",
                );
                return;
            }
        }
    })
}

/// A stranger gets a place under the caps and a few streams, or is sent away (`None`); a member
/// always gets in (`Some(None)`).
fn admit(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &str,
    anonymous: bool,
) -> Option<Option<AnonymousSlot>> {
    if !anonymous {
        // The handshake refuses revoked names; this holds even if a revocation came between
        // the handshake's check and here.
        if shared.revoked.contains(peer) {
            tracing::warn!(%peer, "closed: certificate revoked");
            conn.close(
                amity_protocol::conn::quic_code(ErrorCode::Revoked),
                b"certificate revoked",
            );
            return None;
        }
        return Some(None);
    }
    let Some(slot) = shared.anonymous_slot(conn.remote_address().ip()) else {
        tracing::warn!(%peer, "closed: too many anonymous connections");
        shared.count(|d| d.anonymous_over_cap += 1);
        conn.close(
            amity_protocol::conn::quic_code(ErrorCode::Unexpected),
            b"too many connections without a certificate; try again later",
        );
        return None;
    };
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(ANONYMOUS_STREAMS));
    conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Some(Some(slot))
}

/// The peer's control stream and Hello, within [`HELLO_TIMEOUT`], answered with Welcome: the
/// control stream, or `None` when the peer is gone, late, of another protocol version or not
/// making sense (each said in the log or to the peer).
async fn greet(shared: &Shared, conn: &quinn::Connection, peer: &str) -> Option<MsgStream> {
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let mut control = MsgStream::accept(conn, peer).await?;
        let hello = match &mut control {
            Some(c) => Some(c.recv::<ClientMsg>().await),
            None => None,
        };
        Ok::<_, ConnError>((control, hello))
    })
    .await;
    let (mut control, hello) = match opened {
        Ok(Ok((Some(control), Some(hello)))) => (control, hello),
        Ok(Ok(_)) => return None,
        Ok(Err(e)) => {
            tracing::warn!("{e}");
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, "no Hello within {HELLO_TIMEOUT:?}: closing");
            shared.count(|d| d.hello_timeouts += 1);
            conn.close(
                amity_protocol::conn::quic_code(ErrorCode::Unexpected),
                b"no Hello in time",
            );
            return None;
        }
    };
    match hello {
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
            return None;
        }
        other => {
            let got = brief(&format!("{other:?}"), 200);
            tracing::warn!(%peer, "expected Hello, got {got}");
            return None;
        }
    }
    let welcome = ServerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        identity: peer.to_owned(),
    };
    control.send(&welcome).await.ok()?;
    Some(control)
}

/// One connection's life: admission, Hello, then a downstream client's release queries or a
/// member's worker session.
async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    // A peer without a certificate is a downstream user: releases only.
    let named = peer_name(&conn);
    let anonymous = named.is_none();
    let peer = named.unwrap_or_else(|| format!("anonymous client {}", conn.remote_address()));
    let Some(_slot) = admit(&shared, &conn, &peer, anonymous) else {
        return;
    };
    let Some(mut control) = greet(&shared, &conn, &peer).await else {
        return;
    };
    // A member whose name is revoked while connected is cut off at once.
    let _cut_off = (!anonymous).then(|| AbortOnDrop(watch_revocation(&shared, &conn, &peer)));
    let blobs = serve_blobs(&shared, &conn, &peer, anonymous);
    match registration(&shared, &conn, &mut control, &peer, anonymous).await {
        Registration::Worker(caps) => {
            worker_session(&shared, &conn, control, &peer, caps).await;
            blobs.abort();
        }
        // A downstream client: it fetches blobs until it closes the connection.
        Registration::Downstream => {
            let _ = blobs.await;
        }
        Registration::Gone => blobs.abort(),
    }
}

/// Serves blob requests on the connection's further streams: members get training blobs and
/// releases, anonymous peers releases only (never shards or states).
fn serve_blobs(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &str,
    anonymous: bool,
) -> tokio::task::JoinHandle<()> {
    let located = shared.clone();
    tokio::spawn(serve_blob_requests(
        conn.clone(),
        peer.to_owned(),
        shared.outboards.clone(),
        move |id: &BlobId| {
            let training = if anonymous {
                None
            } else {
                located.blob_path(id)
            };
            training.or_else(|| release::locate(&located.releases.cached(), id))
        },
    ))
}

/// How a connection's control stream went before any round.
enum Registration {
    /// A member registered to train, with these capabilities.
    Worker(Capabilities),
    /// A downstream client said goodbye or closed its control stream; it may still fetch.
    Downstream,
    /// The peer is gone, was refused, or made no sense.
    Gone,
}

/// Answers release queries until the peer registers (members only), leaves or breaks off.
async fn registration(
    shared: &Shared,
    conn: &quinn::Connection,
    control: &mut MsgStream,
    peer: &str,
    anonymous: bool,
) -> Registration {
    loop {
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
                shared.count(|d| d.registrations_refused += 1);
                // Let the peer read the refusal before the connection goes.
                control.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
                return Registration::Gone;
            }
            Ok(Some(ClientMsg::Register(c))) => return Registration::Worker(c),
            Ok(Some(ClientMsg::ReleaseQuery { name })) => {
                let answer = release_answer(shared, &name).await;
                if control.send(&answer).await.is_err() {
                    return Registration::Gone;
                }
            }
            Ok(Some(ClientMsg::Goodbye)) | Ok(None) => return Registration::Downstream,
            Err(ConnError::Connection { .. }) => {
                // A downstream client that fetched what it wanted and closed.
                tracing::debug!(%peer, "connection closed");
                return Registration::Gone;
            }
            other => {
                let got = brief(&format!("{other:?}"), 200);
                tracing::warn!(%peer, "expected Register or ReleaseQuery, got {got}");
                return Registration::Gone;
            }
        }
    }
}

/// The answer to a query for release `name`: its manifest, or which releases there are.
async fn release_answer(shared: &Shared, name: &str) -> ServerMsg {
    let releases = shared.releases.current().await;
    if let Some(r) = release::find(&releases, name) {
        return ServerMsg::ReleaseInfo {
            name: r.signed.manifest.name.clone(),
            manifest: r.signed.manifest_id(),
            signature: r.signed.signature.clone(),
        };
    }
    let mut names: Vec<&str> = releases
        .iter()
        .map(|r| r.signed.manifest.name.as_str())
        .collect();
    names.sort_unstable();
    // Within a message's text limit however many releases there are (and whatever name was
    // asked for).
    let text = format!(
        "no release `{}` here (published: {})",
        brief(name, 200),
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    );
    ServerMsg::Error {
        code: ErrorCode::NotFound,
        message: brief(&text, MAX_STRING - 64),
    }
}

/// A registered worker's session: joins the core, then relays the core's messages to the worker
/// and the worker's heartbeats and update offers to the core, until either side leaves.
async fn worker_session(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut control: MsgStream,
    peer: &str,
    caps: Capabilities,
) {
    let worker = WorkerId(shared.next_worker.fetch_add(1, Ordering::Relaxed));
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
            id: s.id,
            clips: s.clips,
        })
        .collect();
    let info = JoinInfo {
        name: peer.to_owned(),
        backend: caps.backend.clone(),
        samples_per_s: caps.samples_per_s as f64,
        local_shards,
    };
    let _ = shared.events.send(Event::Joined { worker, info });
    loop {
        tokio::select! {
            msg = outbox.recv() => {
                let Some(msg) = msg else { break };
                let last = matches!(
                    msg,
                    ServerMsg::Error { code: ErrorCode::ShuttingDown | ErrorCode::Finished, .. }
                );
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
                Ok(Some(header @ ClientMsg::UpdateHeader { .. })) => {
                    offer_update(shared, conn, peer, worker, header);
                }
                Ok(Some(ClientMsg::Goodbye)) | Ok(None) => break,
                Ok(Some(other)) => {
                    let got = brief(&format!("{other:?}"), 200);
                    tracing::warn!(%peer, "unexpected {got} on the control stream");
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
}

/// A worker offers its update (`header` is its `UpdateHeader`): refused at once when its round is
/// not open or it was offered before, else pulled, decoded and handed to the core on a task of
/// its own (a failed pull is the worker's delivery for the round, refused with the reason).
fn offer_update(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &str,
    worker: WorkerId,
    header: ClientMsg,
) {
    let ClientMsg::UpdateHeader {
        round,
        blob,
        bytes,
        samples,
        steps,
        loss,
    } = header
    else {
        return;
    };
    // Checked before a byte is fetched: the round, and one pull per round.
    if let Err(why) = shared.claim_pull(peer, round) {
        tracing::warn!(%peer, round, "update refused unfetched: {why}");
        shared.count_refused_update(peer);
        shared.tell(
            worker,
            ServerMsg::Error {
                code: ErrorCode::Unexpected,
                message: format!("update for round {round}: {why}"),
            },
        );
        return;
    }
    let (shared, conn, peer) = (shared.clone(), conn.clone(), peer.to_owned());
    tokio::spawn(async move {
        // Pinned from before it is stored until the core has handled it (the driver unpins).
        shared.pin(blob);
        let pulled = pull_update(&shared, &conn, &peer, blob, bytes).await;
        shared.end_pull(&peer, round, pulled.is_ok());
        if pulled.is_err() {
            shared.unpin(&blob);
        }
        match pulled {
            Ok(values) => {
                let loss = RoundLoss {
                    mean: loss.mean as f64,
                    first: loss.first as f64,
                    last: loss.last as f64,
                };
                let update = ArrivedUpdate {
                    round,
                    blob,
                    bytes,
                    samples,
                    steps,
                    loss,
                    values,
                };
                let _ = shared.events.send(Event::Update { worker, update });
            }
            Err(PullError::Storage(e)) => {
                // Not the worker's fault: counted as a storage fault, not against it. The
                // update is dropped unacknowledged (the worker sends the next round's), and the
                // round goes on without it.
                tracing::error!(%peer, round, "cannot store the update: {e}");
                shared.count(|d| {
                    d.storage_faults += 1;
                    d.storage_error = Some(e.clone());
                });
                shared.tell(
                    worker,
                    ServerMsg::Error {
                        code: ErrorCode::Internal,
                        message: format!("update for round {round} not stored here: {e}"),
                    },
                );
            }
            Err(PullError::Peer(e)) => {
                tracing::warn!(%peer, round, "update refused: {e}");
                shared.count_refused_update(&peer);
                let reason = format!("refused on arrival: {e}");
                let _ = shared.events.send(Event::UpdateRefused {
                    worker,
                    round,
                    reason,
                });
                shared.tell(
                    worker,
                    ServerMsg::Error {
                        code: ErrorCode::Malformed,
                        message: format!("update for round {round}: {e}"),
                    },
                );
            }
        }
    });
}

/// Why an update could not be pulled: the worker's doing, or our own disk's.
#[derive(Debug)]
enum PullError {
    /// What the worker sent (or did not) is refused.
    Peer(String),
    /// Storing it failed here (a full disk): not the worker's fault.
    Storage(String),
}

impl From<String> for PullError {
    fn from(e: String) -> Self {
        PullError::Peer(e)
    }
}

/// Fetches an update from its worker into the store and decodes it (validated in full).
async fn pull_update(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &str,
    id: BlobId,
    announced: u64,
) -> Result<Vec<f32>, PullError> {
    // An update is at most a dense fp32 vector plus its header.
    let values: usize = shared.update_parts.iter().sum();
    let limit = values as u64 * 4 + 64 * shared.update_parts.len() as u64;
    if announced > limit {
        return Err(PullError::Peer(format!(
            "{announced} bytes announced, at most {limit} allowed"
        )));
    }
    let decode = |bytes: &[u8]| codec::decode_parts(bytes, &shared.update_parts);
    if shared.store.contains(&id) {
        let bytes = shared
            .store
            .get(&id)
            .map_err(|e| PullError::Storage(e.to_string()))?;
        return Ok(decode(&bytes).map_err(|e| e.to_string())?);
    }
    let part = shared
        .layout
        .incoming()
        .join(format!("{}.part", id.to_hex()));
    // The served length must be the announced one (the blob id fixes the content).
    let bytes = fetch_blob_bytes(conn, peer, id, &part, announced)
        .await
        .map_err(|e: ConnError| match e {
            ConnError::Io { .. } => PullError::Storage(e.to_string()),
            other => PullError::Peer(other.to_string()),
        })?;
    // Only what decodes is stored.
    let values = decode(&bytes).map_err(|e| e.to_string())?;
    shared
        .store
        .put(&bytes)
        .map_err(|e| PullError::Storage(e.to_string()))?;
    Ok(values)
}
