//! Retention: what the coordinator keeps on disk, so that a long run does not fill it.
//!
//! Every round stores a global state, a state delta, a snapshot and every update pulled. After
//! each closed round (and once at start-up) the shell keeps
//! - what the core still serves or will aggregate ([`crate::core::Core::live_blobs`]), and what
//!   it served over the last `rounds` rounds (a slow worker may still be fetching those);
//! - what the command log still names, after dropping every entry before its `rounds`-th last
//!   closed round (the snapshots an operator can roll back to, the updates a restart replays);
//! - updates being pulled right now (pinned by the shell until the core has seen them);
//!
//! and deletes every other blob of the store. Checkpoint files (`round-N.safetensors`) beyond the
//! newest `checkpoints` are deleted too when that count is set (releases are copies: never
//! touched).

use std::collections::{BTreeSet, VecDeque};

use amity_shared::store::{BlobId, BlobStore, LocalStore};
use serde::{Deserialize, Serialize};

use crate::journal::Journal;
use crate::layout::StateLayout;

/// The `[retention]` table of `coordinator.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionPolicy {
    /// Rounds whose states, deltas, snapshots, updates and log entries are kept (at least 1).
    pub rounds: u64,
    /// Checkpoint files kept in `checkpoints/` (0: every one, the default; `latest` always).
    pub checkpoints: u64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            rounds: 4,
            checkpoints: 0,
        }
    }
}

/// What retention has removed so far (in `status.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Blobs in the store after the last sweep.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Blobs deleted since start-up.
    pub removed_blobs: u64,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Command-log entries compacted away since start-up.
    pub removed_entries: u64,
    /// Checkpoint files deleted since start-up.
    pub removed_checkpoints: u64,
}

/// Why a sweep stopped (the store or the log could not be read or changed).
#[derive(Debug, thiserror::Error)]
#[error("retention: {0}")]
pub struct RetentionError(String);

/// The sweeper: the recent live sets, and what it has removed.
#[derive(Debug)]
pub struct Retention {
    policy: RetentionPolicy,
    recent: VecDeque<BTreeSet<BlobId>>,
    usage: Usage,
}

impl Retention {
    /// A sweeper with nothing remembered yet.
    pub fn new(policy: RetentionPolicy) -> Self {
        Retention {
            policy,
            recent: VecDeque::new(),
            usage: Usage::default(),
        }
    }

    /// Figures for `status.json`.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// Compacts the journal (a replica has none: its Raft log compacts itself) and deletes every
    /// blob that is neither `live` now, nor live after one of the last rounds, nor named by the
    /// journal, nor `pinned`; then trims old checkpoint files.
    pub fn sweep(
        &mut self,
        live: BTreeSet<BlobId>,
        pinned: &BTreeSet<BlobId>,
        journal: Option<&mut Journal>,
        store: &LocalStore,
        layout: &StateLayout,
    ) -> Result<(), RetentionError> {
        let keep_rounds = self.policy.rounds.max(1) as usize;
        self.recent.push_back(live);
        while self.recent.len() > keep_rounds {
            self.recent.pop_front();
        }
        let err = |e: &dyn std::fmt::Display| RetentionError(e.to_string());
        let mut keep: BTreeSet<BlobId> = self.recent.iter().flatten().copied().collect();
        if let Some(journal) = journal {
            self.usage.removed_entries += journal.compact(keep_rounds).map_err(|e| err(&e))?;
            keep.extend(journal.referenced_blobs().map_err(|e| err(&e))?);
        }
        keep.extend(pinned.iter().copied());

        let (mut blobs, mut bytes) = (0, 0);
        for id in store.list().map_err(|e| err(&e))? {
            let len = store.size(&id).map_err(|e| err(&e))?.unwrap_or(0);
            if keep.contains(&id) {
                blobs += 1;
                bytes += len;
            } else {
                store.remove(&id).map_err(|e| err(&e))?;
                self.usage.removed_blobs += 1;
                self.usage.removed_bytes += len;
            }
        }
        self.usage.blobs = blobs;
        self.usage.bytes = bytes;
        if self.policy.checkpoints > 0 {
            self.usage.removed_checkpoints +=
                trim_checkpoints(layout, self.policy.checkpoints as usize)
                    .map_err(|e| err(&format!("{}: {e}", layout.checkpoints().display())))?;
        }
        Ok(())
    }
}

/// Deletes `round-N.safetensors` files beyond the newest `keep`; returns how many.
fn trim_checkpoints(layout: &StateLayout, keep: usize) -> std::io::Result<u64> {
    let rounds = layout.round_checkpoints()?;
    let excess = rounds.len().saturating_sub(keep);
    for (_, path) in &rounds[..excess] {
        std::fs::remove_file(path)?;
    }
    Ok(excess as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::LogEntry;
    use amity_shared::federated::LossStats;

    /// Fifty rounds of a coordinator's writes (state, delta, snapshot, two updates, one of them
    /// rejected, a checkpoint): the store, the log and the checkpoints stay bounded, and what a
    /// restart needs is still there.
    #[test]
    fn fifty_rounds_leave_a_bounded_store_log_and_checkpoint_folder() {
        let dir = std::env::temp_dir().join(format!("amity-retention-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = LocalStore::open(&dir.join("blobs")).unwrap();
        let mut journal = Journal::open(&dir.join("journal.redb")).unwrap();
        let layout = StateLayout { dir: dir.clone() };
        let checkpoints = layout.checkpoints();
        std::fs::create_dir_all(&checkpoints).unwrap();
        let policy = RetentionPolicy {
            rounds: 3,
            checkpoints: 2,
        };
        let mut retention = Retention::new(policy);
        let blob = |round: u64, what: &str| {
            let bytes = format!("{what} of round {round}").repeat(100);
            store.put(bytes.as_bytes()).unwrap().id
        };
        let (mut last_snapshot, mut pinned_update) = (None, BlobId([0; 32]));
        let mut last_state = BlobId([0; 32]);
        for round in 0..50u64 {
            let state = blob(round, "state");
            let delta = blob(round, "delta");
            let accepted = blob(round, "accepted update");
            let _rejected = blob(round, "rejected update");
            journal
                .append(&LogEntry::UpdateAccepted {
                    round,
                    trained_round: round,
                    from: "a".into(),
                    blob: accepted,
                    bytes: 1,
                    samples: 1,
                    steps: 1,
                    loss: LossStats::default(),
                    shards: vec![],
                })
                .unwrap();
            let snapshot = blob(round, "snapshot");
            journal
                .append(&LogEntry::RoundClosed {
                    round,
                    snapshot,
                    params: BlobId([0; 32]),
                    state: Some(state),
                })
                .unwrap();
            std::fs::write(layout.round_checkpoint(round), b"x").unwrap();
            // An update of the next round is being pulled while the round closes.
            pinned_update = blob(round + 1, "update in flight");
            let pinned = BTreeSet::from([pinned_update]);
            retention
                .sweep(
                    BTreeSet::from([state, delta]),
                    &pinned,
                    Some(&mut journal),
                    &store,
                    &layout,
                )
                .unwrap();
            last_snapshot = Some(snapshot);
            last_state = state;
        }
        // Three rounds of state and delta, three snapshots, the updates accepted after the first
        // of them (named by the log), and the update in flight.
        let left = store.list().unwrap();
        assert_eq!(left.len(), 3 * 2 + 3 + 2 + 1, "{left:?}");
        assert!(store.contains(&pinned_update));
        assert_eq!(journal.entries().unwrap().len(), 3 + 2);
        let point = journal.resume_point().unwrap();
        assert_eq!(point.snapshot, last_snapshot);
        assert!(store.contains(&point.snapshot.unwrap()));
        let mut files: Vec<String> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["round-48.safetensors", "round-49.safetensors"]);
        let usage = retention.usage();
        assert_eq!(usage.blobs, left.len() as u64);
        assert_eq!(usage.removed_checkpoints, 48);
        // A restarted coordinator's first sweep remembers no live set: the global state the
        // last snapshot names for its parameters stays because the log names it.
        Retention::new(policy)
            .sweep(
                BTreeSet::new(),
                &BTreeSet::new(),
                Some(&mut journal),
                &store,
                &layout,
            )
            .unwrap();
        assert!(store.contains(&last_state) && store.contains(&last_snapshot.unwrap()));
        assert_eq!(usage.removed_blobs, 50 * 6 - left.len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
