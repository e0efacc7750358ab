//! The command log: the core's [`LogEntry`]s in an embedded redb database, appended durably
//! (each append is a committed transaction) before the action that depends on it.
//!
//! This is the log the Raft issue replicates: entries are plain data, replayed in order by
//! [`Journal::resume_point`] on a restart.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::core::LogEntry;
use amity_shared::store::BlobId;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

/// Errors of the journal; each names the file.
#[derive(Debug, thiserror::Error)]
#[error("command log {path}: {reason}")]
pub struct JournalError {
    /// The database file.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

/// The coordinator's durable command log.
#[derive(Debug)]
pub struct Journal {
    db: Database,
    path: PathBuf,
    next: u64,
}

/// Where a restarted coordinator picks up.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumePoint {
    /// The snapshot of the last closed round (`None`: no round closed yet).
    pub snapshot: Option<BlobId>,
    /// What was logged after it, in order: accepted updates and operator decisions.
    pub after: Vec<LogEntry>,
}

impl Journal {
    /// Opens (creating) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let err = |e: &dyn std::fmt::Display| JournalError {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        let next = {
            let table = tx.open_table(LOG).map_err(|e| err(&e))?;
            let last = table.last().map_err(|e| err(&e))?;
            last.map(|(k, _)| k.value() + 1).unwrap_or(0)
        };
        tx.commit().map_err(|e| err(&e))?;
        Ok(Journal {
            db,
            path: path.to_owned(),
            next,
        })
    }

    fn err(&self, e: &dyn std::fmt::Display) -> JournalError {
        JournalError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Appends an entry durably.
    pub fn append(&mut self, entry: &LogEntry) -> Result<u64, JournalError> {
        let bytes = serde_json::to_vec(entry).map_err(|e| self.err(&e))?;
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| self.err(&e))?;
            table
                .insert(self.next, bytes.as_slice())
                .map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))?;
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Every entry, in order.
    pub fn entries(&self) -> Result<Vec<LogEntry>, JournalError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        let table = tx.open_table(LOG).map_err(|e| self.err(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(&e))? {
            let (k, v) = row.map_err(|e| self.err(&e))?;
            let entry: LogEntry = serde_json::from_slice(v.value())
                .map_err(|e| self.err(&format!("entry {}: {e}", k.value())))?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Drops every entry before the `keep_rounds`-th last `RoundClosed` (at least one is kept,
    /// so [`Journal::resume_point`] is unchanged). Returns how many entries were removed.
    pub fn compact(&mut self, keep_rounds: usize) -> Result<u64, JournalError> {
        let closed: Vec<u64> = {
            let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
            let table = tx.open_table(LOG).map_err(|e| self.err(&e))?;
            let mut keys = Vec::new();
            for row in table.iter().map_err(|e| self.err(&e))? {
                let (k, v) = row.map_err(|e| self.err(&e))?;
                let entry: LogEntry = serde_json::from_slice(v.value())
                    .map_err(|e| self.err(&format!("entry {}: {e}", k.value())))?;
                if matches!(entry, LogEntry::RoundClosed { .. }) {
                    keys.push(k.value());
                }
            }
            keys
        };
        let keep = keep_rounds.max(1);
        let Some(&cutoff) = closed.len().checked_sub(keep).map(|i| &closed[i]) else {
            return Ok(0);
        };
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        let mut removed = 0;
        {
            let mut table = tx.open_table(LOG).map_err(|e| self.err(&e))?;
            table
                .retain_in(..cutoff, |_, _| {
                    removed += 1;
                    false
                })
                .map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))?;
        Ok(removed)
    }

    /// Every blob the log still names: the snapshots of its closed rounds and the updates it
    /// accepted (what a restart or an operator's rollback needs).
    pub fn referenced_blobs(&self) -> Result<Vec<BlobId>, JournalError> {
        Ok(self
            .entries()?
            .into_iter()
            .flat_map(|entry| match entry {
                LogEntry::RoundClosed {
                    snapshot, state, ..
                } => vec![Some(snapshot), state],
                LogEntry::UpdateAccepted { blob, .. } => vec![Some(blob)],
                LogEntry::Operator(_) => Vec::new(),
            })
            .flatten()
            .collect())
    }

    /// The last closed round's snapshot and what was logged after it.
    pub fn resume_point(&self) -> Result<ResumePoint, JournalError> {
        let mut point = ResumePoint {
            snapshot: None,
            after: Vec::new(),
        };
        for entry in self.entries()? {
            match entry {
                LogEntry::RoundClosed { snapshot, .. } => {
                    point.snapshot = Some(snapshot);
                    point.after.clear();
                }
                later => point.after.push(later),
            }
        }
        Ok(point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amity_shared::federated::LossStats;

    /// An update of `round` accepted from "a".
    fn accepted(round: u64) -> LogEntry {
        LogEntry::UpdateAccepted {
            round,
            trained_round: round,
            from: "a".into(),
            blob: BlobId([round as u8; 32]),
            bytes: 1,
            samples: 2,
            steps: 3,
            loss: LossStats::default(),
            shards: vec![],
        }
    }

    #[test]
    fn entries_survive_reopening_and_the_resume_point_follows_the_last_round() {
        let dir = std::env::temp_dir().join(format!("amity-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.redb");
        {
            let mut j = Journal::open(&path).unwrap();
            assert_eq!(j.resume_point().unwrap().snapshot, None);
            j.append(&accepted(0)).unwrap();
            j.append(&LogEntry::RoundClosed {
                round: 0,
                snapshot: BlobId([9; 32]),
                params: BlobId([0xab; 32]),
                state: None,
            })
            .unwrap();
            j.append(&accepted(1)).unwrap();
        }
        let mut j = Journal::open(&path).unwrap();
        let p = j.resume_point().unwrap();
        assert_eq!(p.snapshot, Some(BlobId([9; 32])));
        assert_eq!(p.after, vec![accepted(1)]);
        assert_eq!(j.append(&accepted(1)).unwrap(), 3);
        assert_eq!(j.entries().unwrap().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_keeps_the_last_rounds_and_the_resume_point() {
        let dir = std::env::temp_dir().join(format!("amity-journal-c-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.redb");
        let closed = |round: u64| LogEntry::RoundClosed {
            round,
            snapshot: BlobId([100 + round as u8; 32]),
            params: BlobId([0xab; 32]),
            state: Some(BlobId([200 + round as u8; 32])),
        };
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.compact(2).unwrap(), 0, "nothing closed yet");
        for round in 0..10 {
            j.append(&accepted(round)).unwrap();
            j.append(&accepted(round)).unwrap();
            j.append(&closed(round)).unwrap();
        }
        j.append(&accepted(10)).unwrap();
        let before = j.resume_point().unwrap();
        // Rounds 0..=7 go, except round 7's RoundClosed, which the kept round 8 builds on.
        assert_eq!(j.compact(3).unwrap(), 23);
        assert_eq!(j.resume_point().unwrap(), before);
        let left = j.entries().unwrap();
        assert_eq!(left.first(), Some(&closed(7)));
        assert_eq!(left.len(), 1 + 3 * 2 + 1);
        // The updates, and the snapshot and global state of each close.
        let referenced = j.referenced_blobs().unwrap();
        assert_eq!(referenced.len(), left.len() + 3);
        assert!(
            [7, 8, 9]
                .iter()
                .all(|r| referenced.contains(&BlobId([200 + r; 32])))
        );
        assert_eq!(j.compact(3).unwrap(), 0, "compaction is idempotent");
        // Appends go on after the last key, and a reopened log sees the same.
        let next = j.append(&accepted(10)).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.entries().unwrap().len(), left.len() + 1);
        assert_eq!(next, 31);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
