//! The async shell around [`Core`]: QUIC with mutual TLS, the command log, the content store.
//!
//! One driver task owns the core. Connection tasks turn what workers send into [`Event`]s on a
//! channel; the driver handles each (plus a tick every 200 ms) and carries out the resulting
//! [`Action`]s in order: blobs into the store, entries into the journal, messages to the
//! connection tasks. Workers pull every blob (state, deltas, shards) on streams of their own;
//! the coordinator pulls each update from its worker the same way, so every transfer is
//! verified and resumable.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amity_protocol::message::{ErrorCode, ServerMsg};
use amity_protocol::tls::{ClientAuth, Identity, Revocations, quic_server_config_with};
use amity_shared::corpus::manifest::{Manifest, open_blobs};
use amity_shared::data::ClipSource;
use amity_shared::federated::GlobalParams;
use amity_shared::federated::codec;
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use tokio::sync::mpsc;

use crate::aggregate::StoredUpdate;
use crate::config::CoordinatorConfig;
use crate::core::{Action, Core, Event, FINISHED_REASON, LogEntry, ShardInfo, Snapshot};
use crate::journal::Journal;
use crate::layout::StateLayout;
use crate::replica::{self, ReplicatedCore};
use crate::retention::Retention;
use crate::scoring::HeldOut;

mod connection;
mod http;
mod limits;
mod pull;
mod releases;
mod replicated;
mod shared;
mod status;
mod telemetry;

pub use limits::{
    ANONYMOUS_STREAMS, HELLO_TIMEOUT, MAX_ANONYMOUS, MAX_ANONYMOUS_PER_IP, MAX_CONNECTIONS,
};
pub use replicated::ReplicaStatus;
pub use shared::Defence;
pub use status::{ReleaseView, Status};
pub use telemetry::RoundTelemetry;

use connection::accept_connections;
use shared::Shared;
use status::{status, write_status};

/// Where the driver's answer to a connection's question goes.
pub(crate) type Answer = tokio::sync::oneshot::Sender<ServerMsg>;

/// What a connection asks the driver; each is answered with the message to send back.
pub(crate) enum Query {
    /// The coordinator's state (a linearizable read on a replica).
    Status(Answer),
    /// A membership change (operators only; checked by the connection), answered with the
    /// status once committed, or with why not.
    Membership(amity_protocol::message::MembershipChange, Answer),
    /// A release query to a replica (a linearizable read of the group's releases).
    Release(String, Answer),
    /// The full status as this process sees it, for the dashboard and `/metrics` (not a
    /// linearizable read).
    Dashboard(tokio::sync::oneshot::Sender<Box<Status>>),
    /// An operator decision from the admin API, answered with the status once carried out
    /// (committed, on a replica), or with why not.
    Operator(crate::core::OperatorAction, Answer),
}

/// What a [`CoordinatorError`] came from.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors that stop the coordinator. Each says what it was doing; its source says why.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Config, certificate, store, journal or snapshot problem at start-up.
    #[error("{what}")]
    Setup {
        /// What could not be set up (naming the file or address).
        what: String,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The store or journal failed while running (nothing acknowledged is lost).
    #[error("{what}")]
    Storage {
        /// What could not be written (naming the file).
        what: String,
        /// Why.
        #[source]
        source: Cause,
    },
}

impl CoordinatorError {
    /// The error and its causes on one line (`what: cause: cause`), for logs and `status.json`.
    pub fn report(&self) -> String {
        let mut line = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            line = format!("{line}: {c}");
            cause = c.source();
        }
        line
    }
}

/// A start-up error while doing `what`.
fn setup<E: Into<Cause>>(what: impl std::fmt::Display) -> impl FnOnce(E) -> CoordinatorError {
    move |e| CoordinatorError::Setup {
        what: what.to_string(),
        source: e.into(),
    }
}

/// A storage error while doing `what`.
fn storage<E: Into<Cause>>(what: impl std::fmt::Display) -> impl FnOnce(E) -> CoordinatorError {
    move |e| CoordinatorError::Storage {
        what: what.to_string(),
        source: e.into(),
    }
}

/// Builds the core: resumed from the journal when it holds a closed round, fresh otherwise; then
/// what was logged after that round (accepted updates, operator decisions) is replayed.
fn build_core(
    cfg: &CoordinatorConfig,
    store: &LocalStore,
    journal: &Journal,
) -> Result<(Core, Vec<Action>), CoordinatorError> {
    let core_cfg = cfg.core().map_err(setup("coordinator config"))?;
    let point = journal.resume_point().map_err(setup("command log"))?;
    let (mut core, mut actions) = match point.snapshot {
        None => fresh_core(cfg)?,
        Some(snap_id) => {
            let snap =
                read_snapshot(store, &snap_id).map_err(setup(format!("snapshot {snap_id}")))?;
            Core::restore(core_cfg, snap).map_err(setup(format!("snapshot {snap_id}")))?
        }
    };
    let parts: Arc<[usize]> = core.update_parts().into();
    for entry in &point.after {
        match entry {
            LogEntry::UpdateAccepted { blob, .. } => {
                // Decoded once to check it; the core reads it back when the round closes.
                let bytes = store
                    .get(blob)
                    .map_err(setup(format!("logged update {blob}")))?;
                codec::decode_parts_entries(&bytes, &parts)
                    .map_err(setup(format!("logged update {blob}")))?;
                let values = StoredUpdate::new(store.clone(), *blob, parts.clone());
                core.replay_update(entry, values.into_values());
            }
            LogEntry::Operator(action) => core.replay_operator(action),
            LogEntry::RoundClosed { .. } => {}
        }
    }
    // `restore` reported the snapshot's decisions; later ones change them.
    if point
        .after
        .iter()
        .any(|e| matches!(e, LogEntry::Operator(_)))
    {
        actions.push(Action::Operator(core.operator().clone()));
    }
    if point.snapshot.is_some() {
        tracing::info!(
            round = core.round(),
            params = %core.params_hash().to_hex(),
            replayed = point.after.len(),
            "resumed from the command log"
        );
    }
    Ok((core, actions))
}

/// A core at round 0: the run's seeded parameters and the corpus's shards.
fn fresh_core(cfg: &CoordinatorConfig) -> Result<(Core, Vec<Action>), CoordinatorError> {
    let core_cfg = cfg.core().map_err(setup("coordinator config"))?;
    let run = &core_cfg.run;
    let params = GlobalParams::seeded(run);
    let shards = match &cfg.corpus {
        Some(dir) => {
            let m = Manifest::load(dir).map_err(setup("corpus"))?;
            m.check_model(&run.model)
                .map_err(setup(format!("corpus {}", dir.display())))?;
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
        Some(dir) => ClipSource::shards(dir, &run.model, None).map_err(setup("held-out clips"))?,
        None => ClipSource::synthetic(&run.model),
    };
    core.set_scorer(Box::new(HeldOut::new(&run, &source, clips)));
    Ok(())
}

/// What both kinds of coordinator open before they run: the store, the corpus, the endpoint.
struct Opened {
    store: LocalStore,
    corpus: Option<LocalStore>,
    layout: StateLayout,
    revoked: Revocations,
}

impl Opened {
    fn open(cfg: &CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let layout = StateLayout {
            dir: cfg.state_dir.clone(),
        };
        let store = LocalStore::open(&layout.blobs()).map_err(setup("blob store"))?;
        let corpus = match &cfg.corpus {
            Some(dir) => Some(open_blobs(dir).map_err(setup("corpus blobs"))?),
            None => None,
        };
        for d in [layout.checkpoints(), layout.incoming()] {
            std::fs::create_dir_all(&d).map_err(setup(d.display()))?;
        }
        let revoked = Revocations::new(cfg.revoked.iter().cloned());
        Ok(Opened {
            store,
            corpus,
            layout,
            revoked,
        })
    }

    /// The workers' endpoint. Workers need an institution certificate; downstream users may
    /// download releases without one (what an anonymous peer may do is decided per message).
    fn listen(
        &self,
        cfg: &CoordinatorConfig,
        identity: &Identity,
        bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    ) -> Result<quinn::Endpoint, CoordinatorError> {
        let server_cfg = quic_server_config_with(identity, &self.revoked, ClientAuth::Optional)
            .map_err(setup("TLS"))?;
        let endpoint = amity_protocol::endpoint::server(cfg.listen, server_cfg)
            .map_err(setup(format!("listen on {}", cfg.listen)))?;
        let addr = endpoint.local_addr().map_err(setup("listening address"))?;
        tracing::info!(%addr, "coordinator listening");
        if let Some(tx) = bound {
            let _ = tx.send(addr);
        }
        Ok(endpoint)
    }
}

/// Runs the coordinator until `shutdown` resolves (or, with `exit_when_finished`, until
/// `max_rounds` are done). Returns the final status. With `[replication]` it runs as one
/// replica of several ([`replicated`]), otherwise alone with its own journal.
pub async fn run(
    cfg: CoordinatorConfig,
    identity: Identity,
    controls: Controls,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Status, CoordinatorError> {
    raise_open_file_limit();
    let opened = Opened::open(&cfg)?;
    match cfg.replication.clone() {
        Some(rep) => run_replicated(cfg, rep, identity, opened, controls, shutdown).await,
        None => run_single(cfg, identity, opened, controls, shutdown).await,
    }
}

/// A coordinator alone: its core, journalled.
async fn run_single(
    cfg: CoordinatorConfig,
    identity: Identity,
    opened: Opened,
    controls: Controls,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Status, CoordinatorError> {
    let Controls {
        exit_when_finished,
        bound,
        http_bound,
        mut revocations,
    } = controls;
    let mut journal = Journal::open(&opened.layout.journal()).map_err(setup("command log"))?;
    let (mut core, initial) = build_core(&cfg, &opened.store, &journal)?;
    add_scorer(&cfg, &mut core)?;
    let endpoint = opened.listen(&cfg, &identity, bound)?;
    let Opened {
        store,
        corpus,
        layout,
        revoked,
    } = opened;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (queries_tx, mut queries) = mpsc::unbounded_channel::<Query>();
    let shared = Shared::open(
        store, corpus, &layout, &core, events_tx, queries_tx, revoked,
    );
    let mut checkpoint = latest_checkpoint(&layout);
    for action in &initial {
        execute_one(&shared, Some(&mut journal), action, &mut checkpoint)?;
    }
    let mut retention = Retention::new(cfg.retention);
    sweep(&shared, &mut retention, Some(&mut journal), &core, &[]);
    write_status(&shared, &core, &checkpoint);

    let web = start_web(&cfg, &shared, core.config(), http_bound).await?;
    let accept = tokio::spawn(accept_connections(shared.clone(), endpoint.clone()));

    let start = Instant::now();
    let mut told_finished = false;
    // The answer owed to an operator decision being carried out.
    let mut decided = None;
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
            Some(query) = queries.recv() => {
                match answer_here(&shared, &core, &checkpoint, query) {
                    Some((action, answer)) => {
                        decided = Some(answer);
                        Event::Operator(action)
                    }
                    None => continue,
                }
            }
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
        if let Some(answer) = decided.take() {
            let _ = answer.send(ServerMsg::Status(status::coordinator_status(&core, None)));
        }
        if closed {
            sweep(&shared, &mut retention, Some(&mut journal), &core, &[]);
            write_status(&shared, &core, &checkpoint);
            observe_round(&shared, &core);
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
    say_goodbye(&shared, &endpoint, core.finished()).await;
    accept.abort();
    if let Some(web) = web {
        web.abort();
    }
    write_status(&shared, &core, &checkpoint);
    result?;
    Ok(status(&shared, &core, &checkpoint))
}

/// One replica of a replicated coordinator: a [`ReplicatedCore`] over the Raft log, driven by
/// ticks, peers' messages and (on the leader) what the connections report.
async fn run_replicated(
    cfg: CoordinatorConfig,
    rep: crate::config::ReplicationConfig,
    identity: Identity,
    opened: Opened,
    controls: Controls,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Status, CoordinatorError> {
    let Controls {
        exit_when_finished,
        bound,
        http_bound,
        mut revocations,
    } = controls;
    let (mut rc, initial) = replicated::open_machine(&cfg, &rep, &opened)?;
    let max_entry = update_limit(&rc.core().update_parts()) as usize;
    let members = rc.replica().members().to_vec();
    let transport = replicated::start_transport(
        &rep,
        &members,
        &identity,
        &opened.revoked,
        &opened.store,
        max_entry,
    )?;
    let endpoint = opened.listen(&cfg, &identity, bound)?;
    let Opened {
        store,
        corpus,
        layout,
        revoked,
    } = opened;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (queries_tx, mut queries) = mpsc::unbounded_channel::<Query>();
    let shared = Shared::open(
        store,
        corpus,
        &layout,
        rc.core(),
        events_tx,
        queries_tx,
        revoked,
    );
    // Workers are sent to the leader until this replica leads.
    *shared.redirect.lock().expect("redirect lock") = Some(String::new());
    let mut driver = replicated::Driver::new(&shared, &rc, transport, &cfg, &layout);
    driver.carry_out(&mut rc, Ok(initial))?;
    write_status(&shared, rc.core(), &driver.checkpoint);
    let web = start_web(&cfg, &shared, rc.core().config(), http_bound).await?;
    let accept = tokio::spawn(accept_connections(shared.clone(), endpoint.clone()));
    // Releases published here (`amity release`) are noticed within a second.
    let rescan = tokio::spawn(releases::rescan(shared.clone()));

    let mut told_finished = false;
    let mut tick = tokio::time::interval(replica::TICK);
    tokio::pin!(shutdown);
    let result = loop {
        let now = replicated::clock();
        let actions = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(names) = next_revocations(&mut revocations) => {
                revoke(&shared, names);
                continue;
            }
            _ = tick.tick() => driver.tick(&mut rc, now),
            Some(copied) = driver.releases.next_copied() => {
                driver.releases.copied(copied, now.mono_ms);
                continue;
            }
            Some((from, bytes)) = driver.transport.recv() => rc.peer(from, &bytes),
            Some(pulled) = driver.snapshots.1.recv() => match pulled {
                Ok(snap) => {
                    tracing::info!(round = snap.meta.round, "restored from a peer's snapshot");
                    rc.restore(snap)
                }
                Err(e) => {
                    // Asked again when the leader sends the snapshot again.
                    tracing::warn!("{e}");
                    continue;
                }
            },
            Some(query) = queries.recv() => driver.query(&mut rc, query),
            e = events.recv() => match e {
                Some(event) => propose(&shared, &mut rc, event, now),
                None => break Ok(()),
            },
        };
        if let Err(e) = driver.carry_out(&mut rc, actions) {
            break Err(e);
        }
        if driver.removed {
            tracing::warn!(
                "this replica was removed from the group: stopping (its state dir may be deleted)"
            );
            break Ok(());
        }
        if rc.core().finished() {
            if exit_when_finished {
                break Ok(());
            }
            if !told_finished && rc.replica().is_leader() {
                told_finished = true;
                driver.finished();
            }
        }
    };
    say_goodbye(&shared, &endpoint, rc.core().finished()).await;
    accept.abort();
    rescan.abort();
    if let Some(web) = web {
        web.abort();
    }
    driver.transport.close();
    write_status(&shared, rc.core(), &driver.checkpoint);
    result?;
    Ok(status(&shared, rc.core(), &driver.checkpoint))
}

/// Answers a question a single coordinator's driver can answer at once; an operator decision is
/// returned, to be handled as an event and answered once carried out.
fn answer_here(
    shared: &Shared,
    core: &Core,
    checkpoint: &Option<PathBuf>,
    query: Query,
) -> Option<(crate::core::OperatorAction, Answer)> {
    match query {
        Query::Status(answer) => {
            let _ = answer.send(ServerMsg::Status(status::coordinator_status(core, None)));
        }
        Query::Membership(_, answer) => {
            let _ = answer.send(ServerMsg::Error {
                code: ErrorCode::Unexpected,
                message: "this coordinator is not replicated: it has no members to change".into(),
            });
        }
        // Connections answer release queries themselves here.
        Query::Release(_, answer) => drop(answer),
        Query::Dashboard(answer) => {
            let _ = answer.send(Box::new(status(shared, core, checkpoint)));
        }
        Query::Operator(action, answer) => return Some((action, answer)),
    }
    None
}

/// Starts the operator's web surface and the telemetry probe it shows (with `[http]`).
async fn start_web(
    cfg: &CoordinatorConfig,
    shared: &std::sync::Arc<Shared>,
    core: &crate::config::CoreConfig,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<Option<tokio::task::JoinHandle<()>>, CoordinatorError> {
    let Some(http) = &cfg.http else {
        return Ok(None);
    };
    let token = http.admin_token().map_err(setup("[http]"))?;
    let listener = tokio::net::TcpListener::bind(http.listen)
        .await
        .map_err(setup(format!("dashboard on {}", http.listen)))?;
    let addr = listener.local_addr().map_err(setup("dashboard address"))?;
    if http.telemetry_clips > 0 {
        let source = match &cfg.corpus {
            Some(dir) => {
                ClipSource::shards(dir, &core.run.model, None).map_err(setup("telemetry clips"))?
            }
            None => ClipSource::synthetic(&core.run.model),
        };
        let probe = telemetry::Probe::start(core.run.clone(), source, http.telemetry_clips);
        let _ = shared.telemetry.set(probe);
    }
    tracing::info!(
        url = %format!("http://{addr}/"),
        admin = token.is_some(),
        "dashboard listening"
    );
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    Ok(Some(http::serve(listener, shared.clone(), token)))
}

/// What the shell notes after a round closed: the target encoder's telemetry.
fn observe_round(shared: &Shared, core: &Core) {
    if let (Some(probe), Some(last)) = (shared.telemetry.get(), core.history().last()) {
        probe.measure(last.round, &core.params().target);
    }
}

/// Proposes what a connection reported (an update with its encoded bytes, read back from the
/// store its pull wrote them to). Not leading any more: dropped (the connection is being sent
/// to the leader). The leader holds the update's values as the codec sent them, like every
/// follower: its blob is unpinned here, and a sweep after a round closes before the proposal
/// commits could delete it.
fn propose(
    shared: &Shared,
    rc: &mut ReplicatedCore,
    mut event: Event,
    now: replica::Clock,
) -> Result<Vec<replica::MachineAction>, replica::ReplicaError> {
    let encoded = match &mut event {
        Event::Update { update, .. } => {
            let bytes = shared.store.get(&update.blob);
            shared.unpin(&update.blob);
            let held = bytes.map_err(|e| e.to_string()).and_then(|b| {
                let e = codec::decode_parts_entries(&b, &shared.update_parts);
                e.map(|e| (b, e)).map_err(|e| e.to_string())
            });
            match held {
                Ok((b, entries)) => {
                    update.values = entries.into();
                    Some(b)
                }
                Err(e) => {
                    tracing::error!("update {}: {e}; dropped unacknowledged", update.blob);
                    return Ok(Vec::new());
                }
            }
        }
        _ => None,
    };
    if !rc.replica().is_leader() {
        return Ok(Vec::new());
    }
    rc.propose(event, encoded, now)
}

/// The most bytes an update may have: a dense fp32 vector plus a header per part.
pub(crate) fn update_limit(parts: &[usize]) -> u64 {
    let values: usize = parts.iter().sum();
    values as u64 * 4 + 64 * parts.len() as u64
}

/// Tells every worker the run is over (`finished`: they leave for good) or the coordinator is
/// going (they come back later), gives them a moment to read it, then closes the endpoint with
/// the same code.
async fn say_goodbye(shared: &Shared, endpoint: &quinn::Endpoint, finished: bool) {
    let (code, reason) = if finished {
        (ErrorCode::Finished, FINISHED_REASON)
    } else {
        (ErrorCode::ShuttingDown, "coordinator shutting down")
    };
    shared.tell_everyone(code, reason);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    endpoint.close(amity_protocol::conn::quic_code(code), reason.as_bytes());
}

/// What drives [`run`] from outside besides its config.
#[derive(Debug, Default)]
pub struct Controls {
    /// Return once `max_rounds` are done (otherwise stay up, serving checkpoints and releases).
    pub exit_when_finished: bool,
    /// Told the bound address once the endpoint listens.
    pub bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    /// Told the dashboard's bound address once it listens (with `[http]`).
    pub http_bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
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

/// Replaces the config file's revocation list (re-read on SIGHUP); the operator's revocations
/// stay.
fn revoke(shared: &Shared, names: Vec<String>) {
    tracing::info!(
        names = names.len(),
        "revocation list reloaded from the config file"
    );
    shared.set_revoked(Some(names.into_iter().collect()), None);
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

/// Reads snapshot `id` from `store`, with the global-state blob it names for its parameters
/// (each checked against its id).
fn read_snapshot(store: &LocalStore, id: &BlobId) -> Result<Snapshot, Cause> {
    let bytes = store.get(id)?;
    Ok(Snapshot::read(&bytes, |state| {
        store.get(state).map_err(|e| e.to_string())
    })?)
}

fn latest_checkpoint(layout: &StateLayout) -> Option<PathBuf> {
    let p = layout.latest_checkpoint();
    p.exists().then_some(p)
}

/// Deletes what no longer needs keeping ([`crate::retention`]): what is live, pinned, named by
/// the journal (if any) or `keep` (a replica's base snapshot and its global state) stays. A failure is logged and
/// counted, never fatal: the next round sweeps again.
fn sweep(
    shared: &Shared,
    retention: &mut Retention,
    journal: Option<&mut Journal>,
    core: &Core,
    keep: &[BlobId],
) {
    let mut pinned: BTreeSet<BlobId> = shared
        .pinned
        .lock()
        .expect("pin lock")
        .keys()
        .copied()
        .collect();
    pinned.extend(keep.iter().copied());
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
        while let Err(e) = execute_one(shared, Some(&mut *journal), &action, checkpoint) {
            let why = e.report();
            tracing::error!("{why}; retrying in {delay:?} (nothing acknowledged is lost)");
            shared.count(|d| {
                d.storage_faults += 1;
                d.storage_error = Some(why);
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
/// Without a journal (a replica: the Raft log holds its commands), entries are not written.
fn execute_one(
    shared: &Shared,
    journal: Option<&mut Journal>,
    action: &Action,
    checkpoint: &mut Option<PathBuf>,
) -> Result<(), CoordinatorError> {
    match action {
        Action::StoreBlob { what, bytes } => {
            let stored = shared
                .store
                .put(bytes)
                .map_err(storage(format!("storing the {what}")))?;
            tracing::debug!(what, id = %stored.id.short(), len = stored.len, "stored");
        }
        Action::Persist(entry) => {
            if let Some(journal) = journal {
                journal.append(entry).map_err(storage("journal"))?;
            }
        }
        Action::Send { worker, msg } => shared.tell(*worker, msg.clone()),
        Action::Checkpoint { round, blob } => {
            let file = shared.layout.round_checkpoint(*round);
            let latest = shared.layout.latest_checkpoint();
            let src = shared.store.path(blob);
            for dst in [&file, &latest] {
                install_copy(&src, dst).map_err(storage(dst.display()))?;
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
        Action::Operator(state) => shared.set_revoked(None, Some(state.revoked.clone())),
    }
    Ok(())
}
