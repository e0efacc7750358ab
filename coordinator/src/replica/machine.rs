//! One replica of the coordinator, sans-IO: its Raft log ([`Replica`]) and the core it feeds.
//!
//! The leader turns what its connections report into [`Command`]s and proposes them; every
//! replica applies the committed commands in log order to its own [`Core`], so all compute the
//! same state. Only the leader talks to workers: the core's `Send` actions reach the leader's
//! shell alone, and since a command is applied only once committed, a worker's update is
//! acknowledged only after its command is durable on a quorum. An update's encoded bytes travel
//! in its log entry ([`Command::to_entry`]): a follower decodes them with the one codec, checked
//! against the blob id the leader named; the leader keeps the values it decoded itself. After a
//! round closes, each replica compacts its log into a snapshot of its core
//! ([`Core::replica_snapshot`]), stored as a blob whose id is the Raft snapshot's data; a replica
//! that receives such a snapshot asks for that blob ([`MachineAction::FetchSnapshot`]).

use std::collections::{BTreeMap, VecDeque};

use amity_shared::store::BlobId;

use super::{Membership, ReleaseRecord, Replica, ReplicaError};
use crate::config::{CoreConfig, ReplicaEntry};
use crate::core::{
    Action, Command, Core, Event, LoggedEvent, Snapshot, UpdateRef, UpdateValues, WorkerId,
};
use amity_shared::federated::codec;

/// How often the leader logs the time (the core's deadlines run on logged time only).
pub const LOGGED_TICK_MS: u64 = 1000;

/// What logged time may run ahead of the bound that the leader's monotonic clock sets (see
/// [`Clock`]), for the latency between logging a time and applying it.
const CLOCK_SLACK_MS: u64 = 250;

/// A reading of the shell's two clocks. Logged time follows the leader's wall clock while that
/// runs at between half and twice the speed of its monotonic clock since the last command
/// applied (plus [`CLOCK_SLACK_MS`] ahead), and never goes back: a wall clock that jumps (NTP
/// stepping it, an operator setting it, a leader whose clock is far off the last one's) moves
/// logged time at most twice as fast as real time and never stops it for long, so deadlines and
/// heartbeat timeouts keep their meaning. A jump, or a restart after downtime, is absorbed at
/// that rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Milliseconds since the Unix epoch, as this machine believes.
    pub wall_ms: u64,
    /// Milliseconds of a monotonic clock (this process's; only differences matter).
    pub mono_ms: u64,
}

/// What the shell is asked to do, in order.
// Each action is made once and carried out once; boxing the large one would allocate for each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum MachineAction {
    /// Send bytes to peer replica `to`.
    Peer {
        /// The peer's Raft id.
        to: u64,
        /// The message.
        bytes: Vec<u8>,
    },
    /// Carry out a core action. `Send`s only reach the leader's shell.
    Core(Action),
    /// Store this core snapshot durably as a blob, then call [`ReplicatedCore::snapshot_stored`]:
    /// the log is compacted into a snapshot naming the blob only once the blob is on disk, so
    /// that a crash in between never leaves a log that names a blob nobody stored.
    StoreSnapshot {
        /// The log index the core's state is at.
        index: u64,
        /// The core snapshot ([`Core::replica_snapshot_bytes`]: it names the global-state blob
        /// stored before it).
        bytes: Vec<u8>,
    },
    /// A read asked with [`ReplicatedCore::read_index`] may be answered once the core has
    /// applied `index` ([`ReplicatedCore::applied_index`]): it then reflects every command
    /// committed before the question.
    ReadReady {
        /// The context the read was asked with.
        ctx: Vec<u8>,
        /// The index to have applied first.
        index: u64,
    },
    /// Pull core snapshot blob `id` from a peer and hand it to [`ReplicatedCore::restore`].
    FetchSnapshot(BlobId),
    /// The membership changed: the voters now, and where every replica is (the shell's
    /// transport follows the list; a replica no longer among the voters stops).
    Membership {
        /// The voters' ids.
        voters: Vec<u64>,
        /// Every replica's names and addresses.
        members: Vec<ReplicaEntry>,
    },
    /// The releases committed changed: every one of them, in log order (the shell copies the
    /// ones it does not hold from a replica that does).
    Releases(Vec<ReleaseRecord>),
    /// This replica started or stopped leading. A shell that stops leading closes its workers'
    /// connections (they reconnect to the new leader).
    Leadership {
        /// Whether it leads now.
        leading: bool,
        /// The leader it knows of.
        leader: Option<u64>,
        /// The term.
        term: u64,
    },
}

/// A replica of the coordinator (see the module docs).
pub struct ReplicatedCore {
    replica: Replica,
    core: Core,
    cfg: CoreConfig,
    /// Committed commands not applied yet (while a snapshot is restored).
    waiting: VecDeque<(u64, Command)>,
    /// The values of updates this leader proposed, by blob id, until their command is applied
    /// (no need to decode what it decoded already).
    values: BTreeMap<BlobId, UpdateValues>,
    /// A Raft snapshot whose core snapshot blob is awaited.
    restoring: Option<BlobId>,
    leading: bool,
    /// When this leader last logged the time.
    last_logged_ms: Option<u64>,
    /// The log index of the last command applied, and the monotonic time it was applied at.
    applied_index: u64,
    applied_mono: u64,
    /// The latest monotonic time the shell gave.
    mono: u64,
    sessions: u64,
}

impl std::fmt::Debug for ReplicatedCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedCore")
            .field("replica", &self.replica)
            .field("round", &self.core.round())
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl ReplicatedCore {
    /// A replica over `replica`'s log and `core`: a fresh core, or the one restored from the
    /// snapshot blob that [`Replica::base`] names ([`snapshot_blob`] reads its id).
    pub fn new(replica: Replica, core: Core) -> Self {
        let cfg = core.config().clone();
        ReplicatedCore {
            replica,
            core,
            cfg,
            waiting: VecDeque::new(),
            values: BTreeMap::new(),
            restoring: None,
            leading: false,
            last_logged_ms: None,
            applied_index: 0,
            applied_mono: 0,
            mono: 0,
            sessions: 0,
        }
    }

    /// The core.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The Raft replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The log index of the last command applied to the core.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Asks for a linearizable read ([`Replica::read_index`]), answered by
    /// [`MachineAction::ReadReady`] with `ctx`.
    pub fn read_index(&mut self, ctx: Vec<u8>) -> Result<Vec<MachineAction>, ReplicaError> {
        self.replica.read_index(ctx);
        self.step()
    }

    /// A new session id for a worker that registers with this leader: unique across leaders,
    /// since the term is part of it.
    pub fn new_session(&mut self) -> WorkerId {
        self.sessions += 1;
        WorkerId(self.replica.term() << 32 | self.sessions)
    }

    /// Time passed: one Raft tick (call every [`super::TICK`]); the leader logs the time every
    /// [`LOGGED_TICK_MS`] of its monotonic clock.
    pub fn tick(&mut self, clock: Clock) -> Result<Vec<MachineAction>, ReplicaError> {
        self.mono = self.mono.max(clock.mono_ms);
        self.replica.tick();
        if self.replica.is_leader()
            && self
                .last_logged_ms
                .is_none_or(|t| self.mono >= t + LOGGED_TICK_MS)
        {
            self.last_logged_ms = Some(self.mono);
            let at = self.logged_time(clock);
            self.replica.propose(&Command::of(&Event::Tick, at))?;
        }
        self.step()
    }

    /// The time to log now (see [`Clock`]): the wall clock, kept within what the monotonic
    /// clock allows since the last command applied, and never before it.
    fn logged_time(&self, clock: Clock) -> u64 {
        let last = self.core.now_ms();
        if last == 0 {
            // Nothing logged yet: nothing to measure the clock against.
            return clock.wall_ms;
        }
        let dt = self.mono.saturating_sub(self.applied_mono);
        let low = last + dt / 2;
        let high = last + 2 * dt + CLOCK_SLACK_MS;
        clock.wall_ms.clamp(low, high)
    }

    /// A message from peer replica `from` (authenticated by the transport).
    pub fn peer(&mut self, from: u64, bytes: &[u8]) -> Result<Vec<MachineAction>, ReplicaError> {
        self.replica.step(from, bytes)?;
        self.step()
    }

    /// What a worker connection reported, on the leader: logged, and applied once committed.
    /// An update goes with `encoded`, the bytes its values were decoded from (the blob it names),
    /// which its log entry carries to every replica; the leader keeps the values.
    pub fn propose(
        &mut self,
        event: Event,
        encoded: Option<Vec<u8>>,
        clock: Clock,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        self.mono = self.mono.max(clock.mono_ms);
        let mut cmd = Command::of(&event, self.logged_time(clock));
        if let LoggedEvent::Update { update, .. } = &mut cmd.event {
            update.encoded = encoded;
        }
        self.replica.propose(&cmd)?;
        // The values move into the map: no copy of a model-sized vector per update.
        if let Event::Update { update, .. } = event {
            self.values.insert(update.blob, update.values);
        }
        self.step()
    }

    /// Proposes a membership change (on the leader; see [`Replica::change_membership`]).
    pub fn change_membership(
        &mut self,
        change: Membership,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        self.replica.change_membership(change)?;
        self.step()
    }

    /// Proposes a release found published here ([`Replica::propose_release`]).
    pub fn propose_release(
        &mut self,
        release: &ReleaseRecord,
    ) -> Result<Vec<MachineAction>, ReplicaError> {
        self.replica.propose_release(release)?;
        self.step()
    }

    /// On the leader: hands leadership to the most up-to-date other voter
    /// ([`Replica::hand_over`]).
    pub fn hand_over(&mut self) -> Result<(Option<u64>, Vec<MachineAction>), ReplicaError> {
        let to = self.replica.hand_over();
        Ok((to, self.step()?))
    }

    /// The core snapshot a Raft snapshot named, pulled by the shell: the core restarts from it
    /// and the commands after it apply.
    pub fn restore(&mut self, snap: Snapshot) -> Result<Vec<MachineAction>, ReplicaError> {
        let (core, actions) = Core::restore(self.cfg.clone(), snap)
            .map_err(|e| ReplicaError::Snapshot(e.to_string()))?;
        self.core = core;
        self.restoring = None;
        let mut out: Vec<MachineAction> = actions.into_iter().map(MachineAction::Core).collect();
        out.extend(self.step()?);
        Ok(out)
    }

    /// Handles what Raft has ready, then applies what can be applied.
    fn step(&mut self) -> Result<Vec<MachineAction>, ReplicaError> {
        let mut out = Vec::new();
        let ready = self.replica.ready()?;
        out.extend(
            ready
                .messages
                .into_iter()
                .map(|(to, bytes)| MachineAction::Peer { to, bytes }),
        );
        out.extend(
            ready
                .reads
                .into_iter()
                .map(|(ctx, index)| MachineAction::ReadReady { ctx, index }),
        );
        if let Some((index, data)) = ready.snapshot {
            let id = snapshot_blob(&data)?;
            tracing::info!(index, blob = %id.short(), "the leader sent a snapshot");
            // Everything before the snapshot is in it.
            self.waiting.clear();
            self.restoring = Some(id);
            out.push(MachineAction::FetchSnapshot(id));
        }
        if ready.membership_changed {
            out.push(MachineAction::Membership {
                voters: self.replica.voters(),
                members: self.replica.members().to_vec(),
            });
        }
        if ready.releases_changed {
            out.push(MachineAction::Releases(self.replica.releases().to_vec()));
        }
        self.waiting.extend(ready.committed);
        self.apply(&mut out)?;
        if self.replica.is_leader() != self.leading {
            self.leading = self.replica.is_leader();
            out.push(MachineAction::Leadership {
                leading: self.leading,
                leader: self.replica.leader(),
                term: self.replica.term(),
            });
            if self.leading {
                // The sessions of earlier leaders lost their connections: their workers register
                // again here, under new sessions that an open round is announced to again. The
                // old sessions stay until their heartbeats time out (logged time), so that the
                // open round waits that long for workers still on their way back.
                self.last_logged_ms = None;
            }
        }
        Ok(out)
    }

    /// Applies the committed commands in order (none while a snapshot is being restored).
    fn apply(&mut self, out: &mut Vec<MachineAction>) -> Result<(), ReplicaError> {
        if self.restoring.is_some() {
            return Ok(());
        }
        while let Some((index, cmd)) = self.waiting.pop_front() {
            let (values, core) = (&mut self.values, &self.core);
            let (event, at) = cmd
                .into_event(|u| match values.remove(&u.blob) {
                    Some(v) => Ok(v),
                    None => decode_update(u, &core.update_parts()),
                })
                .map_err(|why| ReplicaError::BadUpdate { index, why })?;
            let mut closed = false;
            self.applied_mono = self.mono;
            // Logged time never goes back (the leader logs no earlier time; this holds it for
            // a log written otherwise).
            let at = at.max(self.core.now_ms());
            for action in self.core.handle(event, at) {
                match action {
                    Action::Send { .. } if !self.leading => {}
                    Action::RoundClosed(_) => {
                        closed = true;
                        out.push(MachineAction::Core(action));
                    }
                    other => out.push(MachineAction::Core(other)),
                }
            }
            self.applied_index = index;
            if closed {
                self.compact(out)?;
            }
        }
        // A replica added since the last snapshot needs a newer one (see `Replica::wants_snapshot`).
        if self.replica.wants_snapshot() && self.applied_index > 0 {
            self.compact(out)?;
        }
        Ok(())
    }

    /// Asks the shell to store a snapshot of the core at the last applied command, after which
    /// the log is compacted there (none while an update is pending: a later command will do).
    fn compact(&mut self, out: &mut Vec<MachineAction>) -> Result<(), ReplicaError> {
        let Some(bytes) = self.core.replica_snapshot_bytes() else {
            return Ok(());
        };
        out.push(MachineAction::StoreSnapshot {
            index: self.applied_index,
            bytes,
        });
        Ok(())
    }

    /// The core snapshot of [`MachineAction::StoreSnapshot`] is stored as blob `id`: the log is
    /// compacted up to `index` into a Raft snapshot naming it (nothing happens when a newer
    /// snapshot replaced the log meanwhile).
    pub fn snapshot_stored(&mut self, index: u64, id: BlobId) -> Result<(), ReplicaError> {
        tracing::debug!(index, blob = %id.short(), "log compacted");
        self.replica.compact(index, id.to_hex().into_bytes())
    }

    /// The log starts from a snapshot whose core blob is not at hand (a crash cut its pull
    /// short): nothing is applied until the shell has pulled it from a peer and handed it to
    /// [`ReplicatedCore::restore`].
    pub fn await_snapshot(&mut self, id: BlobId) -> Vec<MachineAction> {
        self.restoring = Some(id);
        vec![MachineAction::FetchSnapshot(id)]
    }
}

/// The values of a committed update, from the encoded bytes its entry carries: they must be the
/// blob it names and decode to the model's shape (the leader checked both before proposing).
/// An update a follower received in a log entry: checked against the blob it names and held as
/// the codec sent it (sparse: a fraction of the model's size).
fn decode_update(update: &UpdateRef, parts: &[usize]) -> Result<UpdateValues, String> {
    let bytes = update
        .encoded
        .as_deref()
        .ok_or("an update entry without its bytes")?;
    if BlobId::of(bytes) != update.blob {
        return Err(format!("the bytes are not blob {}", update.blob));
    }
    codec::decode_parts_entries(bytes, parts)
        .map(UpdateValues::from)
        .map_err(|e| e.to_string())
}

/// The core snapshot blob a Raft snapshot's data names (its hex id).
pub fn snapshot_blob(data: &[u8]) -> Result<BlobId, ReplicaError> {
    String::from_utf8_lossy(data)
        .parse()
        .map_err(|_| ReplicaError::Snapshot("a Raft snapshot that names no core snapshot".into()))
}
