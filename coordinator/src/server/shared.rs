//! What the driver and the connection tasks share: the store, the outboxes, the pulls under
//! way, the caps on strangers and the defence counters.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amity_protocol::conn::OutboardCache;
use amity_protocol::message::{ErrorCode, ServerMsg};
use amity_protocol::tls::Revocations;
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use tokio::sync::mpsc;

use crate::core::{Core, Event, WorkerId};
use crate::layout::StateLayout;
use crate::release;
use crate::retention::Usage;

use super::limits::{MAX_ANONYMOUS, MAX_ANONYMOUS_PER_IP};

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

pub(super) type Outboxes = Arc<Mutex<HashMap<WorkerId, mpsc::UnboundedSender<ServerMsg>>>>;

pub(super) struct Shared {
    pub(super) store: LocalStore,
    pub(super) corpus: Option<LocalStore>,
    pub(super) layout: StateLayout,
    pub(super) update_parts: Arc<[usize]>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    /// Status questions for the driver, each with where to send its answer.
    pub(super) queries: mpsc::UnboundedSender<super::Query>,
    pub(super) outboxes: Outboxes,
    pub(super) next_worker: AtomicU64,
    /// Outboards of served blobs: each round's state delta is hashed once, not per worker.
    pub(super) outboards: OutboardCache,
    /// The round the core has open (or will open next), for checks made before a transfer.
    pub(super) round: AtomicU64,
    /// Whether updates for closed rounds are dropped (then they are refused unfetched).
    pub(super) late_dropped: bool,
    /// Update pulls under way or done, by (worker name, round): one per worker and round.
    pub(super) pulls: Mutex<HashMap<(String, u64), PullState>>,
    /// Updates being pulled, or pulled and not yet handled by the core: retention keeps them.
    pub(super) pinned: Mutex<BTreeMap<BlobId, usize>>,
    /// The last retention sweep's figures.
    pub(super) storage: Mutex<Usage>,
    /// The published releases.
    pub(super) releases: release::ReleaseIndex,
    /// Certificate names refused at the handshake (replaced while running).
    pub(super) revoked: Revocations,
    /// What `revoked` is the union of: the config file's list and the operator's decisions.
    pub(super) revoked_by: Mutex<RevokedBy>,
    /// Bumped when `revoked` changes, so that connections of newly revoked names close.
    pub(super) revocations_changed: tokio::sync::watch::Sender<u64>,
    /// Anonymous connections open, per IP address.
    pub(super) anonymous: Mutex<HashMap<IpAddr, usize>>,
    /// What was turned away.
    pub(super) defence: Mutex<Defence>,
    /// A replica that does not lead: where registering workers are sent (the leader's
    /// `name@host:port`, empty while none is known). `None`: workers are served here.
    pub(super) redirect: Mutex<Option<String>>,
    /// A replica's place in its group, for `status.json`.
    pub(super) replica: Mutex<Option<super::ReplicaStatus>>,
    /// Collapse telemetry after each round (started with `[http]`).
    pub(super) telemetry: std::sync::OnceLock<super::telemetry::Probe>,
}

/// Where the revoked names come from.
pub(super) struct RevokedBy {
    /// `revoked` in `coordinator.toml` (re-read on SIGHUP).
    pub(super) config: BTreeSet<String>,
    /// Revoked by an operator while running (the core's [`crate::core::OperatorState`]).
    pub(super) operator: BTreeSet<String>,
}

/// An anonymous connection's place under the caps; dropping it frees the place.
pub(super) struct AnonymousSlot {
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
pub(super) enum PullState {
    /// Being fetched.
    Pulling,
    /// Fetched and handed to the core.
    Done,
}

impl Shared {
    /// The shell's shared state over `store`, with the store's unfinished writes and the
    /// partial updates of an earlier run cleared (workers send afresh).
    pub(super) fn open(
        store: LocalStore,
        corpus: Option<LocalStore>,
        layout: &StateLayout,
        core: &Core,
        events_tx: mpsc::UnboundedSender<Event>,
        queries: mpsc::UnboundedSender<super::Query>,
        revoked: Revocations,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            store,
            corpus,
            layout: layout.clone(),
            update_parts: core.update_parts().into(),
            events: events_tx,
            queries,
            outboxes: Arc::new(Mutex::new(HashMap::new())),
            next_worker: AtomicU64::new(1),
            outboards: OutboardCache::new(),
            round: AtomicU64::new(core.round()),
            late_dropped: core.config().rounds.late == crate::config::LatePolicy::Drop,
            pulls: Mutex::new(HashMap::new()),
            pinned: Mutex::new(BTreeMap::new()),
            storage: Mutex::new(Usage::default()),
            releases: release::ReleaseIndex::new(layout.releases()),
            revoked_by: Mutex::new(RevokedBy {
                config: revoked.names(),
                operator: BTreeSet::new(),
            }),
            revoked,
            revocations_changed: tokio::sync::watch::Sender::new(0),
            anonymous: Mutex::new(HashMap::new()),
            defence: Mutex::new(Defence::default()),
            redirect: Mutex::new(None),
            replica: Mutex::new(None),
            telemetry: std::sync::OnceLock::new(),
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
    /// Replaces one source of revoked names (`config` or `operator`, whichever is given): the
    /// handshake refuses the union from now on, and open connections of names newly on it close.
    pub(super) fn set_revoked(
        &self,
        config: Option<BTreeSet<String>>,
        operator: Option<BTreeSet<String>>,
    ) {
        let mut by = self.revoked_by.lock().expect("revoked lock");
        if let Some(c) = config {
            by.config = c;
        }
        if let Some(o) = operator {
            by.operator = o;
        }
        let all: Vec<String> = by.config.union(&by.operator).cloned().collect();
        let count = all.len();
        let added = self.revoked.replace(all);
        tracing::info!(revoked = count, added = ?added, "revocation list changed");
        if !added.is_empty() {
            self.revocations_changed.send_modify(|n| *n += 1);
        }
    }

    /// A place for an anonymous connection from `ip`, or `None` over the caps.
    pub(super) fn anonymous_slot(self: &Arc<Self>, ip: IpAddr) -> Option<AnonymousSlot> {
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
    pub(super) fn count(&self, record: impl FnOnce(&mut Defence)) {
        record(&mut self.defence.lock().expect("defence lock"));
    }

    /// Counts a refused update from `from`.
    pub(super) fn count_refused_update(&self, from: &str) {
        self.count(|d| *d.updates_refused.entry(from.to_owned()).or_default() += 1);
    }

    /// Claims the pull of `from`'s update for `round`, or says why it may not happen: the round
    /// is not open, or this worker's update for it is already being fetched or was fetched.
    pub(super) fn claim_pull(&self, from: &str, round: u64) -> Result<(), String> {
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
    pub(super) fn end_pull(&self, from: &str, round: u64, done: bool) {
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
    pub(super) fn tell_everyone(&self, code: ErrorCode, message: &str) {
        let msg = ServerMsg::Error {
            code,
            message: message.into(),
        };
        for tx in self.outboxes.lock().expect("outbox lock").values() {
            let _ = tx.send(msg.clone());
        }
    }

    /// Where registering workers are sent, on a replica that does not lead.
    pub(super) fn redirect_to(&self) -> Option<String> {
        self.redirect.lock().expect("redirect lock").clone()
    }

    /// Keeps blob `id` from retention until [`Shared::unpin`].
    pub(super) fn pin(&self, id: BlobId) {
        *self.pinned.lock().expect("pin lock").entry(id).or_default() += 1;
    }

    /// Undoes one [`Shared::pin`].
    pub(super) fn unpin(&self, id: &BlobId) {
        let mut pinned = self.pinned.lock().expect("pin lock");
        if let Some(n) = pinned.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                pinned.remove(id);
            }
        }
    }

    /// Queues `msg` for `worker`'s connection, if it is still connected.
    pub(super) fn tell(&self, worker: WorkerId, msg: ServerMsg) {
        if let Some(tx) = self.outboxes.lock().expect("outbox lock").get(&worker) {
            let _ = tx.send(msg);
        }
    }

    /// Where blob `id` lives, if the coordinator holds it.
    pub(super) fn blob_path(&self, id: &BlobId) -> Option<PathBuf> {
        if self.store.contains(id) {
            return Some(self.store.path(id));
        }
        self.corpus
            .as_ref()
            .filter(|c| c.contains(id))
            .map(|c| c.path(id))
    }
}
