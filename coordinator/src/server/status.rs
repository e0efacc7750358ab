//! What `status.json` holds, and how it is written after every round.

use std::path::PathBuf;

use amity_shared::store::BlobId;
use serde::Serialize;

use crate::core::{Core, OperatorState, Provenance, RoundSummary, SessionView};
use crate::retention::Usage;

use super::shared::{Defence, Shared};
use super::telemetry::RoundTelemetry;

/// What `status.json` holds: the operator's view, rewritten after every round.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Next round to run.
    pub round: u64,
    /// Parameters hash (hex in the file).
    pub params: BlobId,
    /// Whether `max_rounds` are done.
    pub finished: bool,
    /// Whether a round is under way.
    pub running: bool,
    /// The operator's standing decisions: paused, names revoked while running.
    pub operator: OperatorState,
    /// Connected workers.
    pub workers: Vec<SessionView>,
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
    /// A replica's place in its group (term, leader, commit, applied, lag); `None` for a single
    /// coordinator.
    pub replica: Option<super::ReplicaStatus>,
    /// The target encoder's collapse telemetry after each round this process saw (with `[http]`).
    pub telemetry: Vec<RoundTelemetry>,
    /// The releases published here.
    pub releases: Vec<ReleaseView>,
}

/// A published release, as `status.json` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseView {
    /// Its name.
    pub name: String,
    /// The round its weights are from.
    pub round: u64,
    /// BLAKE3 of its signed manifest (hex in the file).
    pub manifest: BlobId,
    /// The publisher's Ed25519 public key, hex.
    pub key: String,
}

pub(super) fn status(shared: &Shared, core: &Core, checkpoint: &Option<PathBuf>) -> Status {
    Status {
        round: core.round(),
        params: core.params_hash(),
        finished: core.finished(),
        running: core.running(),
        operator: core.operator().clone(),
        workers: core.sessions(),
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
        replica: shared.replica.lock().expect("replica lock").clone(),
        telemetry: shared
            .telemetry
            .get()
            .map(|p| p.results())
            .unwrap_or_default(),
        releases: shared
            .releases
            .cached()
            .iter()
            .map(|p| ReleaseView {
                name: p.signed.manifest.name.clone(),
                round: p.signed.manifest.round,
                manifest: p.signed.manifest_id(),
                key: p.signed.manifest.key().to_hex(),
            })
            .collect(),
    }
}

/// What a [`ClientMsg::StatusQuery`](amity_protocol::message::ClientMsg::StatusQuery) is
/// answered with.
pub(super) fn coordinator_status(
    core: &Core,
    replica: Option<&super::ReplicaStatus>,
) -> amity_protocol::message::CoordinatorStatus {
    amity_protocol::message::CoordinatorStatus {
        round: core.round(),
        closed: core.history().len() as u64,
        params: core.params_hash(),
        finished: core.finished(),
        workers: core.workers().len() as u32,
        replica: replica.map(|r| amity_protocol::message::ReplicaState {
            id: r.id,
            term: r.term,
            leader: r.leader.unwrap_or(0),
            commit: r.commit,
            applied: r.applied,
            voters: r.voters.clone(),
            learners: r.learners.clone(),
            lag: r.lag.iter().map(|(k, v)| (*k, *v)).collect(),
        }),
    }
}

pub(super) fn write_status(shared: &Shared, core: &Core, checkpoint: &Option<PathBuf>) {
    let layout = &shared.layout;
    let s = status(shared, core, checkpoint);
    let tmp = layout.dir.join("status.json.tmp");
    let json = serde_json::to_vec_pretty(&s).expect("status serialises");
    if let Err(e) = std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, layout.status()))
    {
        tracing::warn!("cannot write {}: {e}", layout.status().display());
    }
}
