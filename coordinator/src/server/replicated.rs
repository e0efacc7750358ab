//! The driver of a replicated coordinator: the same connections and store as a single one, with
//! a [`ReplicatedCore`] where the core and its journal were.
//!
//! What the connections report is proposed (on the leader; a follower sends registering workers
//! to the leader with [`ErrorCode::NotLeader`]), a Raft tick runs every [`TICK`], peers'
//! messages come from the [`Transport`], and the machine's actions are carried out in order:
//! messages to peers, the core's actions (it makes no journal entries, `CoreConfig::journal`:
//! the Raft log is the journal), and snapshot blobs pulled from a peer. Logged time is the
//! wall clock in ms since the Unix epoch, which the machine keeps from going back or running
//! off ([`Clock`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amity_protocol::message::{ErrorCode, MembershipChange, ServerMsg};
use amity_protocol::tls::{Identity, Revocations};
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{CoordinatorConfig, ReplicaEntry, ReplicationConfig};
use crate::core::{Action, Core, Snapshot};
use crate::replica::machine::snapshot_blob;
use crate::replica::{
    BlobFetcher, Clock, MachineAction, Membership, PeerAddr, Replica, ReplicaConfig, ReplicaError,
    ReplicatedCore, Transport,
};
use crate::retention::Retention;

use super::releases::Releases;
use super::shared::Shared;
use super::status::write_status;
use super::{CoordinatorError, FINISHED_REASON, execute_one, setup, storage};

/// A replica's place in the group, for `status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplicaStatus {
    /// Its Raft id.
    pub id: u64,
    /// The current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// The highest log index known committed.
    pub commit: u64,
    /// The last index applied to its core.
    pub applied: u64,
    /// The voters.
    pub voters: Vec<u64>,
    /// The learners (added, not voting yet).
    pub learners: Vec<u64>,
    /// On the leader: how far each replica's log is behind the commit index, by id.
    pub lag: BTreeMap<u64, u64>,
    /// Raft message bytes this replica sent its peers since it started.
    pub bytes_sent: u64,
}

/// What [`open_replica`] opened: the Raft log, the core, the core's first actions, and the
/// snapshot blob to pull from a peer before anything applies (when the log starts from one that
/// is not here).
type OpenedReplica = (Replica, Core, Vec<Action>, Option<BlobId>);

/// The replica's Raft log and its core (restored from the snapshot the log starts from, else
/// fresh), with the core's first actions.
fn open_replica(
    cfg: &CoordinatorConfig,
    rep: &ReplicationConfig,
    store: &LocalStore,
    raft_log: &std::path::Path,
) -> Result<OpenedReplica, CoordinatorError> {
    let replica_cfg = ReplicaConfig {
        id: rep.id,
        voters: if rep.join {
            Vec::new()
        } else {
            rep.replicas.iter().map(|r| r.id).collect()
        },
        members: rep.replicas.clone(),
    };
    let log = format!("{}", raft_log.display());
    let replica = Replica::open(&replica_cfg, raft_log).map_err(setup(&log))?;
    let base = match replica.base().map_err(setup(&log))? {
        Some((index, data)) => {
            let what = format!("replica snapshot at log index {index}");
            Some((snapshot_blob(&data).map_err(setup(&what))?, what))
        }
        None => None,
    };
    match base {
        Some((id, what)) if snapshot_at_hand(store, &id) => {
            let snap =
                super::read_snapshot(store, &id).map_err(setup(format!("{what} (blob {id})")))?;
            let core_cfg = cfg.core().map_err(setup("coordinator config"))?;
            let (core, actions) = Core::restore(core_cfg, snap).map_err(setup(&what))?;
            Ok((replica, core, actions, None))
        }
        // A crash cut its pull short: a fresh core stands in until a peer's copy arrives.
        Some((id, what)) => {
            tracing::warn!("{what}: blob {id} is not here; pulling it from a peer");
            let (core, actions) = super::fresh_core(cfg)?;
            Ok((replica, core, actions, Some(id)))
        }
        None => {
            let (core, actions) = super::fresh_core(cfg)?;
            Ok((replica, core, actions, None))
        }
    }
}

/// Whether snapshot `id` and the global state it names are both in `store` (else they are
/// pulled from a peer).
fn snapshot_at_hand(store: &LocalStore, id: &BlobId) -> bool {
    match store.get(id).map(|bytes| Snapshot::state_blob(&bytes)) {
        Ok(Ok(Some(state))) => store.contains(&state),
        Ok(Ok(None)) => true,
        // Unreadable: reading it again reports why.
        Ok(Err(_)) | Err(_) => store.contains(id),
    }
}

/// The replica's machine over its Raft log and its core (scorer added), with the actions to
/// carry out first (the core's, and pulling the snapshot the log starts from when it is not
/// here).
pub(super) fn open_machine(
    cfg: &CoordinatorConfig,
    rep: &ReplicationConfig,
    opened: &super::Opened,
) -> Result<(ReplicatedCore, Vec<MachineAction>), CoordinatorError> {
    let (replica, mut core, initial, missing) =
        open_replica(cfg, rep, &opened.store, &opened.layout.raft_log())?;
    super::add_scorer(cfg, &mut core)?;
    let mut rc = ReplicatedCore::new(replica, core);
    let mut initial: Vec<MachineAction> = initial.into_iter().map(MachineAction::Core).collect();
    if let Some(id) = missing {
        initial.extend(rc.await_snapshot(id));
    }
    Ok((rc, initial))
}

/// Starts the peer transport on this replica's peer port (from its config entry), reaching the
/// replicas the log records: replica certificates only, serving peers the blobs in `store`.
pub(super) fn start_transport(
    rep: &ReplicationConfig,
    members: &[ReplicaEntry],
    identity: &Identity,
    revoked: &Revocations,
    store: &LocalStore,
    max_entry: usize,
) -> Result<Transport, CoordinatorError> {
    let me = rep.me().expect("checked when the config loaded");
    let held = store.clone();
    let locate = Arc::new(move |id: &BlobId| held.contains(id).then(|| held.path(id)));
    Transport::start(
        me.peer,
        identity,
        revoked,
        rep.id,
        &peer_addrs(members),
        locate,
        max_entry,
    )
    .map_err(setup(format!("replica peer port {}", me.peer)))
}

/// The transport's view of the replicas.
fn peer_addrs(members: &[ReplicaEntry]) -> BTreeMap<u64, PeerAddr> {
    members
        .iter()
        .map(|r| {
            (
                r.id,
                PeerAddr {
                    addr: r.peer,
                    name: r.name.clone(),
                },
            )
        })
        .collect()
}

/// A core snapshot pulled from a peer, or why it could not be.
pub(super) type Pulled = Result<Snapshot, String>;

/// What the driver loop needs besides the replica.
pub(super) struct Driver<'a> {
    pub(super) shared: &'a Arc<Shared>,
    /// Every replica's names and addresses, as the log records them.
    pub(super) members: Vec<ReplicaEntry>,
    /// Whether this replica has been a voter (a joining one is not yet).
    pub(super) voted: bool,
    /// It was a voter and is no longer: it stops.
    pub(super) removed: bool,
    /// Membership changes proposed here, answered once committed.
    pub(super) changes: Vec<(Membership, super::Answer)>,
    /// Operator decisions proposed here, answered in order as they apply (dropped, so that the
    /// asker retries, when leadership is lost).
    pub(super) decisions: std::collections::VecDeque<super::Answer>,
    /// The group's releases: proposed, copied here, asked for.
    pub(super) releases: Releases,
    pub(super) transport: Transport,
    pub(super) retention: Retention,
    pub(super) checkpoint: Option<PathBuf>,
    /// Status questions waiting for their read index.
    pub(super) reads: Reads,
    /// The snapshot the Raft log starts from and the global state it names (read once per
    /// snapshot), which retention keeps.
    pub(super) base_blobs: Option<Vec<BlobId>>,
    /// Snapshots pulled from peers, by the tasks that pull them.
    pub(super) snapshots: (
        mpsc::UnboundedSender<Pulled>,
        mpsc::UnboundedReceiver<Pulled>,
    ),
}

/// A question answered as a linearizable read: the coordinator's state (no release named), or
/// a release by name; and where the answer goes.
type Question = (Option<String>, super::Answer);

/// Questions asked as linearizable reads: each waits for its read index, then for the core to
/// have applied it.
#[derive(Default)]
pub(super) struct Reads {
    next: u64,
    asked: BTreeMap<u64, Question>,
    /// (index to have applied, question) of reads confirmed by a quorum.
    ready: Vec<(u64, u64)>,
}

impl Reads {
    /// Keeps `question` and returns the context to ask the read with.
    fn ask(&mut self, question: Question) -> Vec<u8> {
        self.next += 1;
        // Questions whose asker gave up are forgotten.
        self.asked.retain(|_, (_, a)| !a.is_closed());
        self.asked.insert(self.next, question);
        self.next.to_le_bytes().to_vec()
    }

    fn confirmed(&mut self, ctx: &[u8], index: u64) {
        if let Ok(b) = <[u8; 8]>::try_from(ctx) {
            self.ready.push((index, u64::from_le_bytes(b)));
        }
    }

    /// The confirmed reads whose index the core has applied.
    fn applied(&mut self, rc: &ReplicatedCore) -> Vec<Question> {
        let applied = rc.applied_index();
        let (now, later): (Vec<_>, Vec<_>) = self
            .ready
            .drain(..)
            .partition(|(index, _)| *index <= applied);
        self.ready = later;
        now.into_iter()
            .filter_map(|(_, id)| self.asked.remove(&id))
            .collect()
    }
}

/// The clocks now: the wall clock (ms since the Unix epoch: the time a leader logs, within the
/// bounds [`Clock`] describes) and a monotonic one (ms since this process first asked).
pub(super) fn clock() -> Clock {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Clock {
        wall_ms,
        mono_ms: start.elapsed().as_millis() as u64,
    }
}

impl<'a> Driver<'a> {
    /// The driver of replica `rc`, reaching its peers over `transport`.
    pub(super) fn new(
        shared: &'a Arc<Shared>,
        rc: &ReplicatedCore,
        transport: Transport,
        cfg: &CoordinatorConfig,
        layout: &crate::layout::StateLayout,
    ) -> Self {
        let r = rc.replica();
        Driver {
            shared,
            voted: r.voters().contains(&r.id()),
            members: r.members().to_vec(),
            removed: false,
            changes: Vec::new(),
            decisions: std::collections::VecDeque::new(),
            releases: Releases::new(r.releases().to_vec(), cfg.ca_dir.join("ca.crt")),
            transport,
            retention: Retention::new(cfg.retention),
            checkpoint: super::latest_checkpoint(layout),
            snapshots: mpsc::unbounded_channel(),
            base_blobs: None,
            reads: Reads::default(),
        }
    }

    /// One input's actions, carried out. Errors from peers are logged (Raft copes with a lost
    /// message); a storage error stops the replica.
    pub(super) fn carry_out(
        &mut self,
        rc: &mut ReplicatedCore,
        actions: Result<Vec<MachineAction>, ReplicaError>,
    ) -> Result<(), CoordinatorError> {
        let mut todo: std::collections::VecDeque<MachineAction> = match actions {
            Ok(a) => a.into(),
            Err(ReplicaError::Store(e)) => return Err(storage("the Raft log")(e)),
            Err(e) => {
                tracing::warn!("replica: {e}");
                return Ok(());
            }
        };
        let (mut closed, mut changed) = (false, false);
        while let Some(action) = todo.pop_front() {
            match action {
                MachineAction::Peer { to, bytes } => self.transport.send(to, bytes),
                MachineAction::Core(action) => {
                    closed |= matches!(action, Action::RoundClosed(_));
                    execute_one(self.shared, None, &action, &mut self.checkpoint)?;
                    if matches!(action, Action::Operator(_))
                        && rc.replica().is_leader()
                        && let Some(answer) = self.decisions.pop_front()
                    {
                        let s = super::status::coordinator_status(rc.core(), None);
                        let _ = answer.send(ServerMsg::Status(s));
                    }
                }
                MachineAction::StoreSnapshot { index, bytes } => {
                    let stored = self
                        .shared
                        .store
                        .put(&bytes)
                        .map_err(storage("storing the replica snapshot"))?;
                    // Only now that the blob is on disk may the log name it.
                    if let Err(e) = rc.snapshot_stored(index, stored.id) {
                        return Err(storage("the Raft log")(e));
                    }
                }
                MachineAction::ReadReady { ctx, index } => self.reads.confirmed(&ctx, index),
                MachineAction::FetchSnapshot(id) => self.pull_snapshot(rc, id),
                MachineAction::Leadership {
                    leading,
                    leader,
                    term,
                } => {
                    changed = true;
                    if !leading {
                        self.decisions.clear();
                    }
                    self.leadership(leading, leader, term);
                }
                MachineAction::Membership { voters, members } => {
                    changed = true;
                    self.membership(rc.replica().id(), &voters, members);
                }
                MachineAction::Releases(committed) => {
                    self.releases.committed(committed);
                    let (me, mono) = (rc.replica().id(), clock().mono_ms);
                    self.releases
                        .copy_missing(self.shared, &self.members, me, mono);
                }
            }
        }
        if !rc.replica().is_leader() {
            // The leader a follower knows of changes without this one's leadership changing.
            let to = leader_address(&self.members, rc.replica().leader());
            *self.shared.redirect.lock().expect("redirect lock") = Some(to);
        }
        let round = rc.core().round();
        // A snapshot restored moves the round without closing one here.
        changed |= self.shared.round.swap(round, Ordering::Relaxed) != round;
        let mut status = replica_status(rc);
        status.bytes_sent = self.transport.bytes_sent();
        let mono = clock().mono_ms;
        for (release, answer) in self.reads.applied(rc) {
            match release {
                None => {
                    let s = super::status::coordinator_status(rc.core(), Some(&status));
                    let _ = answer.send(ServerMsg::Status(s));
                }
                Some(name) => self.releases.ask(self.shared, &name, answer, mono),
            }
        }
        self.releases.answer_waiting(self.shared, mono);
        self.answer_changes(rc, &status);
        *self.shared.replica.lock().expect("replica lock") = Some(status);
        if closed {
            self.sweep(rc);
            super::observe_round(self.shared, rc.core());
        }
        if closed || changed {
            write_status(self.shared, rc.core(), &self.checkpoint);
        }
        Ok(())
    }

    /// A connection's question: a status or release query becomes a read index, a
    /// membership change a proposal.
    pub(super) fn query(
        &mut self,
        rc: &mut ReplicatedCore,
        query: super::Query,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        let question = match query {
            super::Query::Status(answer) => (None, answer),
            super::Query::Release(name, answer) => (Some(name), answer),
            super::Query::Membership(change, answer) => {
                return self.change_membership(rc, change, answer);
            }
            super::Query::Dashboard(answer) => {
                let s = super::status::status(self.shared, rc.core(), &self.checkpoint);
                let _ = answer.send(Box::new(s));
                return Ok(Vec::new());
            }
            super::Query::Operator(action, answer) => {
                if !rc.replica().is_leader() {
                    let leader = leader_address(&self.members, rc.replica().leader());
                    let _ = answer.send(ServerMsg::Error {
                        code: ErrorCode::NotLeader,
                        message: leader,
                    });
                    return Ok(Vec::new());
                }
                // Revoking a replica's name would cut it off its group: membership changes
                // remove replicas.
                if let crate::core::OperatorAction::Revoke { name } = &action
                    && self.members.iter().any(|m| &m.name == name)
                {
                    let _ = answer.send(ServerMsg::Error {
                        code: ErrorCode::Unexpected,
                        message: format!(
                            "`{name}` is a replica of this group: remove it with `amity \
                             coordinator members remove` instead"
                        ),
                    });
                    return Ok(Vec::new());
                }
                let actions = rc.propose(crate::core::Event::Operator(action), None, clock())?;
                self.decisions.push_back(answer);
                return Ok(actions);
            }
        };
        let ctx = self.reads.ask(question);
        rc.read_index(ctx)
    }

    /// A Raft tick; releases published here are proposed, and those missing here copied.
    pub(super) fn tick(
        &mut self,
        rc: &mut ReplicatedCore,
        now: Clock,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        let mut actions = rc.tick(now)?;
        actions.extend(self.releases.offer(self.shared, rc, now.mono_ms)?);
        let me = rc.replica().id();
        self.releases
            .copy_missing(self.shared, &self.members, me, now.mono_ms);
        Ok(actions)
    }

    /// The group changed: the transport follows, and a replica voted out stops.
    fn membership(&mut self, me: u64, voters: &[u64], members: Vec<ReplicaEntry>) {
        tracing::info!(?voters, "membership changed");
        self.transport.set_peers(&peer_addrs(&members));
        self.members = members;
        if voters.contains(&me) {
            self.voted = true;
        } else if self.voted {
            self.removed = true;
        }
    }

    /// A membership change an operator asked for: proposed on the leader (which hands over
    /// first when it is the one to go), else the operator is sent to the leader. The answer
    /// waits for the change to commit.
    fn change_membership(
        &mut self,
        rc: &mut ReplicatedCore,
        change: MembershipChange,
        answer: super::Answer,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        let refuse = |code, message: String| ServerMsg::Error { code, message };
        let not_leader =
            |leader| refuse(ErrorCode::NotLeader, leader_address(&self.members, leader));
        if !rc.replica().is_leader() {
            let _ = answer.send(not_leader(rc.replica().leader()));
            return Ok(Vec::new());
        }
        let change = match change {
            MembershipChange::Remove { id }
                if id == rc.replica().id() && rc.replica().voters().len() > 1 =>
            {
                let (to, actions) = rc.hand_over()?;
                tracing::info!(?to, "asked to remove this leader: handing over first");
                let _ = answer.send(not_leader(to));
                return Ok(actions);
            }
            MembershipChange::Remove { id } => Membership::Remove(id),
            MembershipChange::Promote { id } => Membership::Promote(id),
            MembershipChange::Add {
                id,
                name,
                peer,
                workers,
            } => match (peer.parse(), workers.parse()) {
                (Ok(peer), Ok(workers)) => Membership::Add(ReplicaEntry {
                    id,
                    name,
                    peer,
                    workers,
                }),
                _ => {
                    let why = format!("addresses `{peer}`, `{workers}` are not host:port");
                    let _ = answer.send(refuse(ErrorCode::Malformed, why));
                    return Ok(Vec::new());
                }
            },
        };
        match rc.change_membership(change.clone()) {
            Ok(actions) => {
                self.changes.push((change, answer));
                Ok(actions)
            }
            Err(e @ (ReplicaError::Membership(_) | ReplicaError::NotCompacted)) => {
                let _ = answer.send(refuse(ErrorCode::Unexpected, e.to_string()));
                Ok(Vec::new())
            }
            Err(e) => {
                let _ = answer.send(refuse(ErrorCode::Internal, e.to_string()));
                Err(e)
            }
        }
    }

    /// Answers the membership changes the voters now show.
    fn answer_changes(&mut self, rc: &ReplicatedCore, status: &ReplicaStatus) {
        let voters = &status.voters;
        let (done, waiting): (Vec<_>, Vec<_>) =
            self.changes.drain(..).partition(|(c, _)| match c {
                Membership::Add(e) => status.learners.contains(&e.id),
                Membership::Promote(id) => voters.contains(id),
                Membership::Remove(id) => !voters.contains(id) && !status.learners.contains(id),
            });
        self.changes = waiting;
        self.changes.retain(|(_, a)| !a.is_closed());
        for (_, answer) in done {
            let s = super::status::coordinator_status(rc.core(), Some(status));
            let _ = answer.send(ServerMsg::Status(s));
        }
    }

    /// Starts pulling core snapshot `id` from the peers (the leader first), unless it is here.
    fn pull_snapshot(&self, rc: &ReplicatedCore, id: BlobId) {
        let tx = self.snapshots.0.clone();
        let store = self.shared.store.clone();
        let fetcher = self.transport.fetcher();
        let leader = rc.replica().leader();
        let part = self
            .shared
            .layout
            .incoming()
            .join(format!("{}.part", id.to_hex()));
        tokio::spawn(async move {
            let got = fetch_snapshot(&fetcher, leader, id, &store, &part).await;
            let _ = tx.send(got);
        });
    }

    /// Leadership changed: workers are served here, or sent to the leader.
    fn leadership(&self, leading: bool, leader: Option<u64>, term: u64) {
        let shared = self.shared;
        if leading {
            tracing::info!(term, "leading: serving workers");
            // Session ids unique across leaders: the term is in them.
            shared.next_worker.store(term << 32 | 1, Ordering::Relaxed);
            *shared.redirect.lock().expect("redirect lock") = None;
        } else {
            let to = leader_address(&self.members, leader);
            tracing::info!(term, ?leader, "following: workers go to {to:?}");
            let was_leading = shared.redirect.lock().expect("redirect lock").is_none();
            *shared.redirect.lock().expect("redirect lock") = Some(to.clone());
            if was_leading {
                shared.tell_everyone(ErrorCode::NotLeader, &to);
            }
        }
    }

    /// Deletes what no longer needs keeping, the snapshot the Raft log starts from (and the
    /// global state it names) kept.
    fn sweep(&mut self, rc: &ReplicatedCore) {
        let base = rc
            .replica()
            .base()
            .ok()
            .flatten()
            .and_then(|(_, data)| snapshot_blob(&data).ok());
        let keep = match base {
            None => Vec::new(),
            Some(id) => match &self.base_blobs {
                Some(kept) if kept[0] == id => kept.clone(),
                _ => {
                    // Read once per base; while it cannot be read (still being pulled), only
                    // its id is kept and the next sweep reads again.
                    let named = self
                        .shared
                        .store
                        .get(&id)
                        .ok()
                        .map(|bytes| Snapshot::state_blob(&bytes).ok().flatten());
                    match named {
                        Some(state) => {
                            let kept: Vec<BlobId> = std::iter::once(id).chain(state).collect();
                            self.base_blobs = Some(kept.clone());
                            kept
                        }
                        None => vec![id],
                    }
                }
            },
        };
        super::sweep(self.shared, &mut self.retention, None, rc.core(), &keep);
    }

    /// After `max_rounds`: workers go home (the leader tells them; followers never held any).
    pub(super) fn finished(&self) {
        self.shared
            .tell_everyone(ErrorCode::Finished, FINISHED_REASON);
    }
}

/// `name@host:port` of replica `leader`'s worker port, or empty when none is known.
fn leader_address(members: &[ReplicaEntry], leader: Option<u64>) -> String {
    leader
        .and_then(|id| members.iter().find(|r| r.id == id))
        .map(|r| format!("{}@{}", r.name, r.workers))
        .unwrap_or_default()
}

fn replica_status(rc: &ReplicatedCore) -> ReplicaStatus {
    let r = rc.replica();
    let commit = r.commit_index();
    ReplicaStatus {
        id: r.id(),
        term: r.term(),
        leader: r.leader(),
        commit,
        applied: rc.applied_index(),
        voters: r.voters(),
        learners: r.learners(),
        lag: r
            .matched()
            .into_iter()
            .map(|(id, m)| (id, commit.saturating_sub(m)))
            .collect(),
        bytes_sent: 0,
    }
}

/// Pulls core snapshot `id` into `store` from the leader, else any peer, with the global-state
/// blob it names, and parses it.
async fn fetch_snapshot(
    fetcher: &BlobFetcher,
    leader: Option<u64>,
    id: BlobId,
    store: &LocalStore,
    part: &std::path::Path,
) -> Result<Snapshot, String> {
    let order: Vec<u64> = leader
        .into_iter()
        .chain(fetcher.peers().into_iter().filter(|p| Some(*p) != leader))
        .collect();
    let what = format!("replica snapshot {id}");
    pull_blob(fetcher, &order, id, store, part, &what).await?;
    let bytes = store.get(&id).map_err(|e| e.to_string())?;
    if let Some(state) = Snapshot::state_blob(&bytes).map_err(|e| format!("{what}: {e}"))? {
        let part = part.with_extension("state.part");
        let state_what = format!("{what}: its global state {state}");
        pull_blob(fetcher, &order, state, store, &part, &state_what).await?;
    }
    Snapshot::read(&bytes, |state| store.get(state).map_err(|e| e.to_string()))
        .map_err(|e| format!("{what}: {e}"))
}

/// Pulls blob `id` into `store` unless it is there: from the peers in `order`, three times
/// round; `what` names it in the error.
async fn pull_blob(
    fetcher: &BlobFetcher,
    order: &[u64],
    id: BlobId,
    store: &LocalStore,
    part: &std::path::Path,
    what: &str,
) -> Result<(), String> {
    if store.contains(&id) {
        return Ok(());
    }
    let mut last = String::from("no peer to pull it from");
    for _attempt in 0..3 {
        for &peer in order {
            match fetcher.fetch(peer, id, part, MAX_SNAPSHOT_BYTES).await {
                Ok(_) => {
                    let bytes =
                        std::fs::read(part).map_err(|e| format!("{}: {e}", part.display()))?;
                    let _ = std::fs::remove_file(part);
                    store
                        .put(&bytes)
                        .map_err(|e| format!("storing {what}: {e}"))?;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("{what}: {last}"))
}

/// The most bytes a core snapshot (or the global state it names) pulled from a peer may have.
const MAX_SNAPSHOT_BYTES: u64 = 16 << 30;
