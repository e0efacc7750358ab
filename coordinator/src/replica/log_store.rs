//! One replica's Raft state on disk, in redb: the log entries, the hard state (term, vote,
//! commit), the membership (voter ids, and each replica's names and addresses) and the latest
//! snapshot. Every write is a committed (fsynced)
//! transaction, so by the time [`Replica`](super::Replica) sends a message that depends on it, it
//! survives a crash.
//!
//! The log holds entries `first..=last`; everything before `first` was compacted into the
//! snapshot, whose index is `first - 1` (0, and empty, on a fresh replica).
//!
//! A snapshot's data carries the replicas' addresses and the releases committed beside the
//! state machine's state ([`frame`]), so that a replica that joins from a snapshot learns where
//! its peers are and what it is to serve.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Group, ReleaseRecord};
use crate::config::ReplicaEntry;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";
const GROUP: &str = "group";

/// A failure of the Raft log's database; names the file.
#[derive(Debug, thiserror::Error)]
#[error("raft log {path}")]
pub struct LogStoreError {
    /// The database file.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// The Raft log of one replica (see the module docs).
pub struct LogStore {
    db: Database,
    path: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    /// Every replica's names and addresses (voters, and replicas configured but not added),
    /// and the releases committed.
    group: Group,
    snapshot: Snapshot,
    first: u64,
    last: u64,
    /// Raft asked for a snapshot the stored one cannot serve (it predates the asking
    /// replica's membership): the shell should compact now ([`LogStore::take_snapshot_wanted`]).
    snapshot_wanted: std::cell::Cell<bool>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.path)
            .field("first", &self.first)
            .field("last", &self.last)
            .field("commit", &self.hard_state.commit)
            .finish()
    }
}

impl LogStore {
    /// Opens the log at `path`, creating it with membership `voters` and the replicas'
    /// addresses `members` when it is new (every replica of a new cluster must start from the
    /// same voters). A log that exists keeps what it recorded.
    pub fn open(
        path: &Path,
        voters: &[u64],
        members: &[ReplicaEntry],
    ) -> Result<Self, LogStoreError> {
        let db = Database::create(path).map_err(error(path))?;
        let tx = db.begin_write().map_err(error(path))?;
        let (hard_state, conf_state, group, snapshot, first, last) = {
            let state = tx.open_table(STATE).map_err(error(path))?;
            let read = |key: &str| -> Result<Option<Vec<u8>>, LogStoreError> {
                Ok(state
                    .get(key)
                    .map_err(error(path))?
                    .map(|v| v.value().to_vec()))
            };
            let hard_state = match read(HARD_STATE)? {
                Some(b) => HardState::parse_from_bytes(&b).map_err(error(path))?,
                None => HardState::default(),
            };
            let conf_state = match read(CONF_STATE)? {
                Some(b) => ConfState::parse_from_bytes(&b).map_err(error(path))?,
                None => ConfState::from((voters.to_vec(), Vec::new())),
            };
            let group = match read(GROUP)? {
                Some(b) => serde_json::from_slice(&b).map_err(error(path))?,
                None => Group {
                    members: members.to_vec(),
                    releases: Vec::new(),
                },
            };
            let snapshot = match read(SNAPSHOT)? {
                Some(b) => Snapshot::parse_from_bytes(&b).map_err(error(path))?,
                None => Snapshot::default(),
            };
            let entries = tx.open_table(ENTRIES).map_err(error(path))?;
            let snap_index = snapshot.get_metadata().index;
            let first = entries
                .first()
                .map_err(error(path))?
                .map_or(snap_index + 1, |(k, _)| k.value());
            let last = entries
                .last()
                .map_err(error(path))?
                .map_or(snap_index, |(k, _)| k.value());
            (hard_state, conf_state, group, snapshot, first, last)
        };
        tx.commit().map_err(error(path))?;
        let mut store = LogStore {
            db,
            path: path.to_owned(),
            hard_state,
            conf_state,
            group,
            snapshot,
            first,
            last,
            snapshot_wanted: std::cell::Cell::new(false),
        };
        // A new log records its starting membership at once.
        let (cs, members) = (store.conf_state.clone(), store.group.members.clone());
        store.set_membership(&cs, members)?;
        Ok(store)
    }

    /// Writes `puts` into the state table and `entries` into the log (after deleting the entries
    /// from `truncate_from` on), in one durable transaction.
    fn write(
        &self,
        puts: &[(&str, Vec<u8>)],
        truncate: Option<std::ops::Range<u64>>,
        entries: &[Entry],
    ) -> Result<(), LogStoreError> {
        let tx = self.db.begin_write().map_err(error(&self.path))?;
        {
            let mut state = tx.open_table(STATE).map_err(error(&self.path))?;
            for (k, v) in puts {
                state.insert(*k, v.as_slice()).map_err(error(&self.path))?;
            }
            let mut log = tx.open_table(ENTRIES).map_err(error(&self.path))?;
            if let Some(range) = truncate {
                log.retain_in(range, |_, _| false)
                    .map_err(error(&self.path))?;
            }
            for e in entries {
                let bytes = e.write_to_bytes().map_err(error(&self.path))?;
                log.insert(e.index, bytes.as_slice())
                    .map_err(error(&self.path))?;
            }
        }
        tx.commit().map_err(error(&self.path))
    }

    /// Appends `entries` (a leader's, or a follower's from its leader), replacing any entries
    /// from the first one's index on that disagree.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogStoreError> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        assert!(
            head.index >= self.first && head.index <= self.last + 1,
            "raft appended entry {} outside {}..={}",
            head.index,
            self.first,
            self.last + 1
        );
        let truncate = (head.index <= self.last).then(|| head.index..self.last + 1);
        self.write(&[], truncate, entries)?;
        self.last = entries.last().map_or(self.last, |e| e.index);
        Ok(())
    }

    /// Records the hard state (term, vote, commit).
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), LogStoreError> {
        let bytes = hs.write_to_bytes().map_err(self.error_of())?;
        self.write(&[(HARD_STATE, bytes)], None, &[])?;
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Records the commit index alone.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), LogStoreError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Records the membership: the voters, and every replica's addresses.
    pub fn set_membership(
        &mut self,
        cs: &ConfState,
        members: Vec<ReplicaEntry>,
    ) -> Result<(), LogStoreError> {
        let bytes = cs.write_to_bytes().map_err(self.error_of())?;
        let group = Group {
            members,
            releases: self.group.releases.clone(),
        };
        let listed = serde_json::to_vec(&group).map_err(error(&self.path))?;
        self.write(&[(CONF_STATE, bytes), (GROUP, listed)], None, &[])?;
        self.conf_state = cs.clone();
        self.group = group;
        Ok(())
    }

    /// Records a committed release.
    pub fn add_release(&mut self, release: ReleaseRecord) -> Result<(), LogStoreError> {
        let mut group = self.group.clone();
        group.releases.push(release);
        let listed = serde_json::to_vec(&group).map_err(error(&self.path))?;
        self.write(&[(GROUP, listed)], None, &[])?;
        self.group = group;
        Ok(())
    }

    /// Replaces the log by a snapshot from the leader: every entry goes, the membership and the
    /// commit index come from the snapshot. Returns the state machine's part of its data.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<Vec<u8>, LogStoreError> {
        let (group, state) = unframe(snap.get_data()).map_err(error(&self.path))?;
        let meta = snap.get_metadata();
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let puts = [
            (SNAPSHOT, snap.write_to_bytes().map_err(self.error_of())?),
            (
                CONF_STATE,
                meta.get_conf_state()
                    .write_to_bytes()
                    .map_err(self.error_of())?,
            ),
            (HARD_STATE, hs.write_to_bytes().map_err(self.error_of())?),
            (
                GROUP,
                serde_json::to_vec(&group).map_err(error(&self.path))?,
            ),
        ];
        self.write(&puts, Some(0..u64::MAX), &[])?;
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.group = group;
        self.snapshot = snap.clone();
        self.first = meta.index + 1;
        self.last = meta.index;
        Ok(state)
    }

    /// Compacts the log up to `index` (applied by the state machine, whose state there is
    /// `data`): a snapshot of it replaces entries `..=index`.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), LogStoreError> {
        if index < self.first || index > self.last {
            return Ok(());
        }
        let term = self.term(index).map_err(|e| LogStoreError {
            path: self.path.clone(),
            source: Box::new(e),
        })?;
        let mut snap = Snapshot::default();
        snap.set_data(frame(&self.group, &data).into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        let bytes = snap.write_to_bytes().map_err(self.error_of())?;
        self.write(&[(SNAPSHOT, bytes)], Some(0..index + 1), &[])?;
        self.snapshot = snap;
        self.first = index + 1;
        Ok(())
    }

    /// The index of the latest snapshot (0 on a log that starts at the beginning).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The latest snapshot's index and the state machine's state there (`None` on a log that
    /// starts at the beginning).
    pub fn base(&self) -> Result<Option<(u64, Vec<u8>)>, LogStoreError> {
        let index = self.snapshot_index();
        if index == 0 {
            return Ok(None);
        }
        let (_, state) = unframe(self.snapshot.get_data()).map_err(error(&self.path))?;
        Ok(Some((index, state)))
    }

    /// Every replica's names and addresses, and the releases committed, as recorded.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Whether Raft asked for a newer snapshot than the stored one since the last call.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The recorded membership.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The recorded hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    fn error_of(&self) -> impl FnOnce(protobuf::ProtobufError) -> LogStoreError + '_ {
        move |e| LogStoreError {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    fn read_entry(&self, index: u64) -> raft::Result<Entry> {
        let unavailable = || raft::Error::Store(StorageError::Unavailable);
        let tx = self.db.begin_read().map_err(|_| unavailable())?;
        let log = tx.open_table(ENTRIES).map_err(|_| unavailable())?;
        let bytes = log
            .get(index)
            .map_err(|_| unavailable())?
            .ok_or_else(unavailable)?;
        Entry::parse_from_bytes(bytes.value()).map_err(|_| unavailable())
    }
}

/// A snapshot's data: the length of the [`Group`] as JSON (u32, little-endian), the group,
/// then the state machine's state.
fn frame(group: &Group, state: &[u8]) -> Vec<u8> {
    let listed = serde_json::to_vec(group).expect("a group serialises");
    let mut out = Vec::with_capacity(4 + listed.len() + state.len());
    out.extend_from_slice(&(listed.len() as u32).to_le_bytes());
    out.extend_from_slice(&listed);
    out.extend_from_slice(state);
    out
}

/// Splits a snapshot's data made by [`frame`] (it came from a peer: checked).
fn unframe(data: &[u8]) -> Result<(Group, Vec<u8>), String> {
    let bad = || "a snapshot whose data does not start with the replicas' group".to_owned();
    let len = data
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(bad)?;
    let listed = data.get(4..4 + len).ok_or_else(bad)?;
    let group = serde_json::from_slice(listed).map_err(|e| format!("{}: {e}", bad()))?;
    Ok((group, data[4 + len..].to_vec()))
}

/// The error for a database failure on `path`.
fn error<E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>>(
    path: &Path,
) -> impl FnOnce(E) -> LogStoreError + '_ {
    move |e| LogStoreError {
        path: path.to_owned(),
        source: e.into(),
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let unavailable = |_| raft::Error::Store(StorageError::Unavailable);
        let tx = self.db.begin_read().map_err(unavailable)?;
        let log = tx
            .open_table(ENTRIES)
            .map_err(|_| raft::Error::Store(StorageError::Unavailable))?;
        let mut out = Vec::new();
        for item in log
            .range(low..high)
            .map_err(|_| raft::Error::Store(StorageError::Unavailable))?
        {
            let (_, v) = item.map_err(|_| raft::Error::Store(StorageError::Unavailable))?;
            out.push(
                Entry::parse_from_bytes(v.value())
                    .map_err(|_| raft::Error::Store(StorageError::Unavailable))?,
            );
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < self.first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.read_entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        let members = meta.get_conf_state();
        // A replica added after the snapshot was taken would refuse it (it is not in its
        // membership): a newer one is made on demand.
        let knows = members.voters.contains(&to) || members.learners.contains(&to);
        if meta.index < request_index || !knows {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}
