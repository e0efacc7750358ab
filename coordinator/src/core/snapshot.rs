//! The snapshot format: what a restart resumes from, as a content-addressed blob.
//!
//! A snapshot the core writes names the round's global-state blob (the checkpoint of model and
//! target it stored just before) instead of repeating those values: a round then writes the
//! parameters once, not twice, and its close holds one copy of them in bytes, not two. Reading
//! such a snapshot takes that blob too ([`Snapshot::read`]); a snapshot with the parameters
//! embedded ([`Snapshot::to_bytes`]) reads on its own.

use std::collections::BTreeMap;

use amity_shared::checkpoint::Checkpoint;
use amity_shared::federated::GlobalParams;
use amity_shared::store::BlobId;
use serde::{Deserialize, Serialize};

use super::log::{Provenance, RoundSummary};
use super::shard_plan::ShardPlan;
use super::{Core, Phase, WorkerId, WorkerState};

/// The durable part of the core's state: what a restart resumes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The next round to run.
    pub round: u64,
    /// Shard scheduling.
    pub plan: ShardPlan,
    /// Norms of recently accepted updates.
    pub norm_history: Vec<f64>,
    /// Per-institution accounting.
    pub provenance: BTreeMap<String, Provenance>,
    /// Every closed round.
    pub history: Vec<RoundSummary>,
    /// Blob of the previous state's delta (for workers holding it), and the base it applies to.
    pub last_delta: Option<(BlobId, BlobId)>,
    /// Size of that delta blob.
    pub last_delta_len: u64,
    /// The target momentum workers apply after that delta (coordinator-EMA policy).
    #[serde(default)]
    pub last_delta_momentum: Option<f32>,
    /// Parameters hash of the seeded initial state.
    pub init_hash: BlobId,
    /// Lengths of the vectors that follow (model, target, outer momentum, downlink residual).
    pub lens: [u64; 4],
    /// The global-state blob (a checkpoint) holding the model and target, when they are not
    /// embedded: `lens[0]` and `lens[1]` are then 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BlobId>,
    /// The sessions and the round under way, for a replica that restores this snapshot and
    /// goes on applying the replicated log exactly where the others are
    /// ([`Core::replica_snapshot`](super::Core::replica_snapshot)). A restarted single
    /// coordinator's snapshot has none: its workers reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveState>,
    /// The operator's standing decisions (pause, revoked names).
    #[serde(default)]
    pub operator: super::OperatorState,
}

/// The soft state of a core between two commands: its worker sessions and its phase. It holds
/// no pending update (a replica snapshot is only taken when none is pending).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// Every session, by id.
    pub(super) workers: Vec<(WorkerId, WorkerState)>,
    pub(super) phase: Phase,
    /// Updates of the open round refused before decoding: (sender, reason).
    pub(super) refused: Vec<(String, String)>,
    pub(super) now_ms: u64,
    pub(super) started_any: bool,
}

/// A snapshot: metadata plus model, target, outer momentum and downlink residual.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Metadata.
    pub meta: SnapshotMeta,
    /// Global parameters.
    pub params: GlobalParams,
    /// Outer momentum.
    pub momentum: Vec<f32>,
    /// Downlink error-feedback residual.
    pub down_residual: Vec<f32>,
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"AMSN";

/// The bytes of a snapshot of `meta` and the four vectors (model, target, outer momentum,
/// downlink residual), written from where they are (no copy of the state first), into a buffer
/// of exactly the right size.
pub(super) fn write(meta: &SnapshotMeta, vectors: [&[f32]; 4]) -> Vec<u8> {
    let json = serde_json::to_vec(meta).expect("snapshot metadata serialises");
    let values: usize = vectors.iter().map(|v| v.len()).sum();
    let mut out = Vec::with_capacity(12 + json.len() + 4 * values);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in vectors {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Why a snapshot blob cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("invalid coordinator snapshot: {0}")]
pub struct SnapshotError(pub String);

impl Snapshot {
    /// `"AMSN" | json length (u64) | JSON metadata | f32 vectors (LE)`, with the parameters
    /// embedded: these bytes read on their own.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut meta = self.meta.clone();
        meta.state = None;
        meta.lens = [
            self.params.model.len() as u64,
            self.params.target.len() as u64,
            self.momentum.len() as u64,
            self.down_residual.len() as u64,
        ];
        write(
            &meta,
            [
                &self.params.model,
                &self.params.target,
                &self.momentum,
                &self.down_residual,
            ],
        )
    }

    /// Parses and checks a snapshot that embeds its parameters (one that names a global-state
    /// blob needs [`Snapshot::read`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
        Self::read(bytes, |id| {
            Err(format!(
                "its parameters are in global-state blob {id}, which was not given"
            ))
        })
    }

    /// The global-state blob a snapshot's bytes name for their parameters (`None` when they
    /// embed them): what must be at hand before [`Snapshot::read`].
    pub fn state_blob(bytes: &[u8]) -> Result<Option<BlobId>, SnapshotError> {
        Ok(split(bytes)?.0.state)
    }

    /// Parses and checks a snapshot; `state` gives the bytes of the global-state blob it names,
    /// if it names one (parsed as a checkpoint, its id checked).
    pub fn read(
        bytes: &[u8],
        state: impl FnOnce(&BlobId) -> Result<Vec<u8>, String>,
    ) -> Result<Self, SnapshotError> {
        let bad = |m: &str| SnapshotError(m.to_owned());
        let (meta, mut rest) = split(bytes)?;
        let total = meta
            .lens
            .iter()
            .try_fold(0u64, |sum, len| sum.checked_add(*len))
            .and_then(|t| t.checked_mul(4));
        if total != Some(rest.len() as u64) {
            return Err(bad("vector bytes do not match the recorded lengths"));
        }
        let mut take = |len: u64| {
            let (a, b) = rest.split_at(len as usize * 4);
            rest = b;
            a.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect::<Vec<f32>>()
        };
        let [a, b, c, d] = meta.lens;
        let (model, target, momentum, down_residual) = (take(a), take(b), take(c), take(d));
        let mut meta = meta;
        let params = match meta.state {
            None => GlobalParams { model, target },
            Some(id) => {
                if a != 0 || b != 0 {
                    return Err(bad(
                        "it both embeds parameters and names a global-state blob",
                    ));
                }
                let state_bytes =
                    state(&id).map_err(|e| SnapshotError(format!("global state {id}: {e}")))?;
                if BlobId::of(&state_bytes) != id {
                    return Err(SnapshotError(format!(
                        "the bytes given for global state {id} have another hash"
                    )));
                }
                let checkpoint =
                    Checkpoint::from_bytes(&state_bytes, &format!("global state {id}"))
                        .map_err(|e| SnapshotError(e.to_string()))?;
                // The lengths now describe what was read (`to_bytes` embeds them).
                meta.lens[0] = checkpoint.model.len() as u64;
                meta.lens[1] = checkpoint.target.len() as u64;
                GlobalParams {
                    model: checkpoint.model,
                    target: checkpoint.target,
                }
            }
        };
        Ok(Snapshot {
            meta,
            params,
            momentum,
            down_residual,
        })
    }
}

/// A snapshot's metadata and the vector bytes after it.
fn split(bytes: &[u8]) -> Result<(SnapshotMeta, &[u8]), SnapshotError> {
    let bad = |m: &str| SnapshotError(m.to_owned());
    if bytes.len() < 12 || &bytes[..4] != SNAPSHOT_MAGIC {
        return Err(bad("missing magic bytes"));
    }
    let n = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes")) as usize;
    let json = bytes
        .get(12..12usize.saturating_add(n))
        .ok_or_else(|| bad("truncated metadata"))?;
    let meta: SnapshotMeta =
        serde_json::from_slice(json).map_err(|e| SnapshotError(e.to_string()))?;
    Ok((meta, &bytes[12 + n..]))
}

impl Core {
    /// The durable state as a snapshot, parameters embedded: what a restart resumes from.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            meta: self.snapshot_meta(false, None),
            params: self.params.clone(),
            momentum: self.outer.momentum.clone(),
            down_residual: self.downlink.residual().to_vec(),
        }
    }

    /// [`Core::snapshot`]'s bytes, but naming the global-state blob stored at the last close,
    /// start or restore for the parameters; the rest is written from the core's own vectors.
    pub fn snapshot_bytes(&self) -> Vec<u8> {
        self.named_snapshot_bytes(None)
    }

    /// The bytes of a snapshot naming the global-state blob, with `live` (a replica's).
    pub(super) fn named_snapshot_bytes(&self, live: Option<LiveState>) -> Vec<u8> {
        write(
            &self.snapshot_meta(true, live),
            [&[], &[], &self.outer.momentum, self.downlink.residual()],
        )
    }

    /// A snapshot's metadata: parameters in the global-state blob (`named`) or embedded.
    fn snapshot_meta(&self, named: bool, live: Option<LiveState>) -> SnapshotMeta {
        let embedded = |len: usize| if named { 0 } else { len as u64 };
        SnapshotMeta {
            round: self.round,
            plan: self.plan.clone(),
            norm_history: self.norm_history.clone(),
            provenance: self.provenance.clone(),
            history: self.history.clone(),
            last_delta: self.last_delta,
            last_delta_len: self.delta_bytes_len,
            last_delta_momentum: self.last_delta_momentum,
            init_hash: self.init_hash,
            lens: [
                embedded(self.params.model.len()),
                embedded(self.params.target.len()),
                self.outer.momentum.len() as u64,
                self.downlink.residual().len() as u64,
            ],
            state: named.then_some(self.state_blob),
            live,
            operator: self.operator.clone(),
        }
    }
}
