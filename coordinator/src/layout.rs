//! The coordinator's state folder: every path under it is named here, and only here.
//!
//! ```text
//! state_dir/
//!   blobs/            content store: states, deltas, snapshots, received updates
//!   journal.redb      the command log (a single coordinator)
//!   raft.redb         the replicated command log (a replica)
//!   status.json       what `amity status` and operators read
//!   checkpoints/      round-N.safetensors, latest.safetensors
//!   releases/         published releases, one folder each
//!   incoming/         partial downloads of updates (cleared at start)
//! ```

use std::path::PathBuf;

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
    /// A replica's Raft log (instead of the journal).
    pub fn raft_log(&self) -> PathBuf {
        self.dir.join("raft.redb")
    }
    /// `status.json`.
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    /// Checkpoints (`round-N.safetensors`, `latest.safetensors`).
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    /// The newest checkpoint (`checkpoints/latest.safetensors`).
    pub fn latest_checkpoint(&self) -> PathBuf {
        self.checkpoints().join("latest.safetensors")
    }
    /// The checkpoint file of round `round` (`checkpoints/round-N.safetensors`).
    pub fn round_checkpoint(&self, round: u64) -> PathBuf {
        self.checkpoints()
            .join(format!("round-{round}.safetensors"))
    }
    /// The round checkpoint files present, oldest first.
    pub fn round_checkpoints(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut rounds: Vec<(u64, PathBuf)> = std::fs::read_dir(self.checkpoints())?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let round = name
                    .strip_prefix("round-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((round, e.path()))
            })
            .collect();
        rounds.sort();
        Ok(rounds)
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
