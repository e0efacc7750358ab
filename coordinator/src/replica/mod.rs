//! The coordinator's command log replicated with Raft (tikv's `raft`), sans-IO like the core:
//! [`Replica`] takes ticks, proposals and peers' messages, and hands back what to send and the
//! committed [`Command`]s to apply, in log order, to the replica's own [`Core`](crate::core::Core).
//!
//! Driving it, as raft-rs requires: call [`Replica::tick`] every [`TICK`], feed every message
//! from a peer to [`Replica::step`], propose on the leader, and after each of these call
//! [`Replica::ready`], then send what it returns and apply what it committed. `ready` has already
//! made durable (in the [`LogStore`]) every entry and vote the messages it returns depend on.
//!
//! Between replicas, [`Transport`] carries the bytes over QUIC with mutual TLS (replica
//! certificates only).
//!
//! [`ReplicatedCore`] puts a [`Core`](crate::core::Core) on top: the coordinator's server drives
//! one in replicated mode.

mod log_store;
pub mod machine;
mod transport;
pub mod wire;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use raft::prelude::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};

pub use log_store::{LogStore, LogStoreError};
pub use machine::{Clock, MachineAction, ReplicatedCore};
pub use transport::{
    BlobFetcher, FetchError, Locate, MAX_RAFT_MESSAGE, PeerAddr, Transport, TransportError,
};
pub use wire::WireError;

use amity_shared::store::BlobId;
use serde::{Deserialize, Serialize};

use crate::config::ReplicaEntry;
use crate::core::{BadCommand, Command};

/// The context that marks a log entry as a [`ReleaseRecord`] (other entries hold commands).
const RELEASE_ENTRY: &[u8] = b"release";

/// What the group holds besides the core: where every replica is, and the releases committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Every replica's names and addresses (voters, and replicas configured but not added).
    pub members: Vec<ReplicaEntry>,
    /// The releases committed, in log order (one per name: the first committed wins).
    #[serde(default)]
    pub releases: Vec<ReleaseRecord>,
}

/// A release committed to the group: a replica found it published in its state folder
/// (`amity release`) and proposed it; every replica copies it from there and serves it, and
/// release queries are answered from these records (linearizably, after a read index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// Its name.
    pub name: String,
    /// The round of its checkpoint (`latest` is the highest).
    pub round: u64,
    /// The blob id of its manifest.
    pub manifest: BlobId,
    /// The manifest's Ed25519 signature.
    pub signature: Vec<u8>,
    /// The publisher's public key (hex), which the copies are checked against.
    pub key: String,
    /// The replica that holds it first.
    pub from: u64,
}

/// How often [`Replica::tick`] is to be called. An election starts after 10 ticks without a
/// leader (1 s), heartbeats go every 3.
pub const TICK: Duration = Duration::from_millis(100);

/// Who a replica is and who its peers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Its Raft id (not 0).
    pub id: u64,
    /// Every voter's id, its own included: the membership a new cluster starts with. Empty for
    /// a replica joining a running cluster: it waits until the leader adds it
    /// ([`Replica::change_membership`]) and sends it a snapshot.
    pub voters: Vec<u64>,
    /// Where the replicas it knows of are (a joining replica lists the running group's, to
    /// accept their messages). A log that exists keeps the list it recorded.
    pub members: Vec<ReplicaEntry>,
}

/// One membership change (Raft's one-at-a-time changes: never two in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Add this replica as a learner (it gets the log, it does not vote, the quorum stays);
    /// every replica learns its addresses with the change.
    Add(ReplicaEntry),
    /// Make this learner a voter.
    Promote(u64),
    /// Remove this replica.
    Remove(u64),
}

/// What a replica can fail at.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Its log on disk.
    #[error(transparent)]
    Store(#[from] LogStoreError),
    /// Raft refused (a bad config, a message for another group).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A peer's bytes.
    #[error("from replica {peer}: {source}")]
    Wire {
        /// The peer, as its certificate says.
        peer: u64,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// A peer sent a message in another replica's name.
    #[error("replica {peer} sent a message as replica {claimed}")]
    Impersonation {
        /// The authenticated peer.
        peer: u64,
        /// The sender the message names.
        claimed: u64,
    },
    /// A replica can only be added once the leader's log is compacted (its first entries are
    /// gone), so that the new replica starts from a snapshot that holds the membership.
    #[error(
        "compact the log before adding a replica (it would replay entries without the membership they started from)"
    )]
    NotCompacted,
    /// A membership change that cannot be made as asked.
    #[error("membership: {0}")]
    Membership(String),
    /// Proposed on a replica that is not the leader.
    #[error("not the leader (the leader is {leader:?})")]
    NotLeader {
        /// The leader this replica knows of, if any.
        leader: Option<u64>,
    },
    /// A core snapshot that a Raft snapshot names cannot be used.
    #[error("replica snapshot: {0}")]
    Snapshot(String),
    /// A committed update whose bytes are missing, not the blob it names, or undecodable: the
    /// log is corrupt.
    #[error("log entry {index}: {why}")]
    BadUpdate {
        /// Its index.
        index: u64,
        /// What is wrong.
        why: String,
    },
    /// A committed entry that is not a command: the log is corrupt.
    #[error("log entry {index}: {source}")]
    BadEntry {
        /// Its index.
        index: u64,
        /// Why.
        #[source]
        source: BadCommand,
    },
}

/// What [`Replica::ready`] asks the shell to do, in this order: restore the state machine from
/// `snapshot` if there is one, apply `committed`, send `messages`.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages for peers: (replica id, bytes).
    pub messages: Vec<(u64, Vec<u8>)>,
    /// A snapshot from the leader replaced the log: the state machine's state at `index`.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// Commands committed since the last call, with their log index, in log order.
    pub committed: Vec<(u64, Command)>,
    /// Answers to [`Replica::read_index`]: (the request's context, the index to have applied
    /// before reading). A read served once the state machine applied that index is linearizable.
    pub reads: Vec<(Vec<u8>, u64)>,
    /// The membership changed (a change committed, or a snapshot replaced it): see
    /// [`Replica::voters`] and [`Replica::members`].
    pub membership_changed: bool,
    /// A release was committed, or a snapshot replaced the list: see [`Replica::releases`].
    pub releases_changed: bool,
}

/// One replica of the coordinator's command log.
pub struct Replica {
    node: RawNode<LogStore>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.node.raft.id)
            .field("term", &self.node.raft.term)
            .field("leader", &self.leader())
            .finish()
    }
}

impl Replica {
    /// Opens replica `cfg.id` with its log at `path` (created with `cfg.voters` when new). A
    /// reopened replica rebuilds its state machine from the log alone: [`Replica::base`], then every
    /// committed command after it, which [`Replica::ready`] hands back again.
    pub fn open(cfg: &ReplicaConfig, path: &Path) -> Result<Self, ReplicaError> {
        let store = LogStore::open(path, &cfg.voters, &cfg.members)?;
        let config = raft::Config {
            id: cfg.id,
            election_tick: 10,
            heartbeat_tick: 3,
            // The snapshot is handed back as applied; entries after it are applied again.
            applied: 0,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..raft::Config::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&config, store, &logger)?;
        Ok(Replica { node })
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.node.raft.id
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        Some(self.node.raft.leader_id).filter(|&l| l != raft::INVALID_ID)
    }

    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The highest index known committed.
    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// The snapshot the log starts from: (index, the state machine's state there), or `None`
    /// when the log starts at the beginning. A reopened replica restores its state machine from
    /// it, then applies what [`Replica::ready`] hands back as committed.
    pub fn base(&self) -> Result<Option<(u64, Vec<u8>)>, ReplicaError> {
        Ok(self.node.store().base()?)
    }

    /// Advances Raft's clock by one [`TICK`].
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Proposes `cmd` for the log, with the encoded update it carries, if any. Only the leader
    /// accepts: a follower answers [`ReplicaError::NotLeader`] with the leader it knows, for the
    /// caller to redirect to.
    pub fn propose(&mut self, cmd: &Command) -> Result<(), ReplicaError> {
        if !self.is_leader() {
            return Err(ReplicaError::NotLeader {
                leader: self.leader(),
            });
        }
        Ok(self.node.propose(Vec::new(), cmd.to_entry())?)
    }

    /// Proposes a release for the group (on any replica: a follower forwards it to the
    /// leader). Raft may drop it (no leader known, a leader change): propose again until
    /// [`Replica::releases`] holds it.
    pub fn propose_release(&mut self, release: &ReleaseRecord) -> Result<(), ReplicaError> {
        let data = serde_json::to_vec(release).expect("a release record serialises");
        Ok(self.node.propose(RELEASE_ENTRY.to_vec(), data)?)
    }

    /// The releases committed, in log order.
    pub fn releases(&self) -> &[ReleaseRecord] {
        &self.node.store().group().releases
    }

    /// Takes a message that authenticated peer `peer` sent: checked, parsed, and refused unless
    /// it is in `peer`'s own name and for this replica.
    pub fn step(&mut self, peer: u64, bytes: &[u8]) -> Result<(), ReplicaError> {
        let msg: Message =
            wire::decode(bytes).map_err(|source| ReplicaError::Wire { peer, source })?;
        if msg.from != peer {
            return Err(ReplicaError::Impersonation {
                peer,
                claimed: msg.from,
            });
        }
        if msg.to != self.id() {
            return Err(ReplicaError::Wire {
                peer,
                source: WireError::Malformed("message for another replica"),
            });
        }
        match self.node.step(msg) {
            // From a replica removed from the group (it has not heard yet): dropped.
            Err(raft::Error::StepPeerNotFound) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Proposes a membership change (on the leader). It takes effect on each replica when
    /// committed; [`Replica::voters`] then shows it (Raft drops a change proposed while another
    /// is in flight: check the voters). The leader does not remove itself: it hands leadership
    /// over first ([`Replica::hand_over`]).
    pub fn change_membership(&mut self, change: Membership) -> Result<(), ReplicaError> {
        if !self.is_leader() {
            return Err(ReplicaError::NotLeader {
                leader: self.leader(),
            });
        }
        let voters = self.voters();
        let refuse = |why: String| Err(ReplicaError::Membership(why));
        let mut cc = ConfChange::default();
        match change {
            Membership::Add(entry) => {
                if entry.id == 0
                    || voters.contains(&entry.id)
                    || self.learners().contains(&entry.id)
                {
                    return refuse(format!("replica {} is 0 or in the group already", entry.id));
                }
                let taken = self
                    .members()
                    .iter()
                    .any(|m| m.name == entry.name && voters.contains(&m.id));
                if taken {
                    return refuse(format!("a voter is named `{}` already", entry.name));
                }
                if self.node.store().snapshot_index() == 0 {
                    return Err(ReplicaError::NotCompacted);
                }
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = entry.id;
                cc.context = serde_json::to_vec(&entry)
                    .expect("a replica entry serialises")
                    .into();
            }
            Membership::Promote(id) => {
                if !self.learners().contains(&id) {
                    return refuse(format!("replica {id} is not a learner (add it first)"));
                }
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
            }
            Membership::Remove(id) => {
                if !voters.contains(&id) && !self.learners().contains(&id) {
                    return refuse(format!(
                        "replica {id} is not in the group (voters: {voters:?}, learners: {:?})",
                        self.learners()
                    ));
                }
                if voters == [id] {
                    return refuse("the last voter cannot be removed".into());
                }
                if id == self.id() {
                    return refuse(format!("replica {id} leads: hand over first"));
                }
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
            }
        }
        Ok(self.node.propose_conf_change(Vec::new(), cc)?)
    }

    /// On the leader: hands leadership to the voter whose log is furthest along, other than
    /// itself (before it is removed). Returns that voter, or `None` when there is none.
    pub fn hand_over(&mut self) -> Option<u64> {
        let me = self.id();
        let voters = self.voters();
        let to = self
            .matched()
            .into_iter()
            .filter(|(id, _)| *id != me && voters.contains(id))
            .max_by_key(|(_, m)| *m)
            .map(|(id, _)| id)?;
        self.node.transfer_leader(to);
        Some(to)
    }

    /// On the leader, each replica's highest log index known to be stored there, by id (its lag
    /// is the commit index minus this); empty on a follower, which cannot know.
    pub fn matched(&self) -> Vec<(u64, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut m: Vec<(u64, u64)> = self
            .node
            .raft
            .prs()
            .iter()
            .map(|(id, p)| (*id, p.matched))
            .collect();
        m.sort_unstable();
        m
    }

    /// The voters as this replica knows them.
    pub fn voters(&self) -> Vec<u64> {
        let mut v = self.node.store().conf_state().voters.clone();
        v.sort_unstable();
        v
    }

    /// The learners (added, not voting yet) as this replica knows them.
    pub fn learners(&self) -> Vec<u64> {
        let mut v = self.node.store().conf_state().learners.clone();
        v.sort_unstable();
        v
    }

    /// Every replica's names and addresses as this replica knows them: the voters', and
    /// replicas configured but not (or no longer) voting.
    pub fn members(&self) -> &[ReplicaEntry] {
        &self.node.store().group().members
    }

    /// Asks for a linearizable read (a status or a release listing): once a quorum confirmed
    /// this replica's leader still leads, [`Output::reads`] gives `ctx` back with the index the
    /// state machine must have applied before answering. Works on followers (the leader is
    /// asked); a leader cut off from its quorum never answers (it steps down instead).
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.node.read_index(ctx);
    }

    /// Whether a peer needs a snapshot newer than the stored one (a replica added since): the
    /// shell should [`Replica::compact`] at what its state machine applied.
    pub fn wants_snapshot(&self) -> bool {
        self.node.store().take_snapshot_wanted()
    }

    /// Compacts the log up to `index`, which the state machine has applied and whose state
    /// there is `data`: a lagging replica gets that snapshot instead of the entries.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), ReplicaError> {
        Ok(self.node.mut_store().compact(index, data)?)
    }

    /// What to do now (see [`Output`]); everything the returned messages depend on is durable.
    pub fn ready(&mut self) -> Result<Output, ReplicaError> {
        let mut out = Output::default();
        if !self.node.has_ready() {
            return Ok(out);
        }
        let mut rd = self.node.ready();
        out.reads = rd
            .take_read_states()
            .into_iter()
            .map(|r| (r.request_ctx, r.index))
            .collect();
        // A leader's messages may go before its own entries are durable (raft-rs allows the
        // leader to write in parallel with its followers); followers' wait below.
        out.push(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let state = self.node.mut_store().apply_snapshot(&snap)?;
            out.snapshot = Some((snap.get_metadata().index, state));
            out.membership_changed = true;
            out.releases_changed = true;
        }
        self.collect(rd.take_committed_entries(), &mut out)?;
        if !rd.entries().is_empty() {
            self.node.mut_store().append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.node.mut_store().set_hard_state(hs)?;
        }
        out.push(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit)?;
        }
        out.push(light.take_messages());
        self.collect(light.take_committed_entries(), &mut out)?;
        self.node.advance_apply();
        Ok(out)
    }

    /// Turns committed entries into commands (membership changes are applied here; a leader's
    /// empty entry after its election carries nothing).
    fn collect(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), ReplicaError> {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if e.get_data().is_empty() => {}
                EntryType::EntryNormal if e.get_context() == RELEASE_ENTRY => {
                    let release: ReleaseRecord =
                        serde_json::from_slice(e.get_data()).map_err(|err| {
                            ReplicaError::BadEntry {
                                index: e.index,
                                source: BadCommand::Json(err),
                            }
                        })?;
                    // Proposed again while the first was on its way: the first stands.
                    if !self.releases().iter().any(|r| r.name == release.name) {
                        self.node.mut_store().add_release(release)?;
                        out.releases_changed = true;
                    }
                }
                EntryType::EntryNormal => {
                    let cmd = Command::from_entry(e.get_data()).map_err(|source| {
                        ReplicaError::BadEntry {
                            index: e.index,
                            source,
                        }
                    })?;
                    out.committed.push((e.index, cmd));
                }
                EntryType::EntryConfChange => {
                    let cc: ConfChange = protobuf::Message::parse_from_bytes(e.get_data())
                        .map_err(|err| ReplicaError::Raft(raft::Error::CodecError(err)))?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    let mut members = self.members().to_vec();
                    if cc.get_change_type() == ConfChangeType::AddLearnerNode {
                        // The added replica's addresses ride in the change (a later entry for
                        // the same id replaces an earlier one).
                        let entry: ReplicaEntry =
                            serde_json::from_slice(&cc.context).map_err(|err| {
                                ReplicaError::BadEntry {
                                    index: e.index,
                                    source: BadCommand::Json(err),
                                }
                            })?;
                        members.retain(|m| m.id != entry.id && m.name != entry.name);
                        members.push(entry);
                    }
                    self.node.mut_store().set_membership(&cs, members)?;
                    out.membership_changed = true;
                }
                EntryType::EntryConfChangeV2 => {
                    // Never proposed here (changes go one at a time); applied as Raft says.
                    let cc: ConfChangeV2 = protobuf::Message::parse_from_bytes(e.get_data())
                        .map_err(|err| ReplicaError::Raft(raft::Error::CodecError(err)))?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    let members = self.members().to_vec();
                    self.node.mut_store().set_membership(&cs, members)?;
                    out.membership_changed = true;
                }
            }
        }
        Ok(())
    }
}

impl Output {
    fn push(&mut self, msgs: Vec<Message>) {
        self.messages
            .extend(msgs.iter().map(|m| (m.to, wire::encode(m))));
    }
}
