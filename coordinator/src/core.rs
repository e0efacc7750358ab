//! The coordinator's core: a deterministic, sans-IO state machine (like `quinn-proto` or
//! raft-rs's `RawNode`).
//!
//! The shell feeds it [`Event`]s (a worker joined, an update arrived, time passed) with the
//! current time, and carries out the [`Action`]s it returns, **in order**: store a blob, append
//! to the command log, send a message. Nothing here reads a clock, a socket or a file, so every
//! behaviour (round deadlines, elastic membership, robust aggregation, restarts) is tested
//! directly, and the Raft issue can replicate the command log as it is.
//!
//! Durability: an update is acknowledged only after its [`LogEntry::UpdateAccepted`] (naming
//! the blob already in the content store) is persisted; a closed round is persisted as a
//! [`Snapshot`] blob plus [`LogEntry::RoundClosed`]. Restarting = [`Core::restore`] from the
//! last snapshot, then [`Core::replay_update`] for each accepted update logged after it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use amity_protocol::message::{ErrorCode, Hash, ServerMsg, StateDelta};
use amity_shared::checkpoint::Checkpoint;
use amity_shared::codec;
use amity_shared::federated::{GlobalParams, RoundLoss, RunProgress, TargetPolicy};
use amity_shared::rng::Rng;
use amity_shared::store::BlobId;
use serde::{Deserialize, Serialize};

use crate::aggregate::{self, Candidate, OuterOptimizer};
use crate::config::{CoreConfig, LatePolicy};
use crate::scoring::HeldOutLoss;
use amity_shared::stats::lower_median;

/// A worker's session id, assigned by the shell.
pub type WorkerId = u64;

/// What a worker declared when it joined.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinInfo {
    /// Certificate name (the institution).
    pub name: String,
    /// Backend name.
    pub backend: String,
    /// Measured clips per second.
    pub samples_per_s: f64,
    /// Shards the worker holds itself (its institution's corpus).
    pub local_shards: Vec<ShardInfo>,
}

/// One shard the coordinator schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Content id.
    pub id: BlobId,
    /// Clips in it.
    pub clips: u64,
}

/// An update whose blob is already in the coordinator's content store, decoded and checked for
/// length by the shell.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivedUpdate {
    /// The round the worker trained.
    pub round: u64,
    /// The blob.
    pub blob: BlobId,
    /// Its size on the wire.
    pub bytes: u64,
    /// Clips processed.
    pub samples: u64,
    /// Local steps.
    pub steps: u64,
    /// Loss statistics.
    pub loss: RoundLoss,
    /// The decoded pseudo-gradient (model, then target under the local-EMA policy).
    pub values: Vec<f32>,
}

/// Inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A worker registered.
    Joined {
        /// Session id.
        worker: WorkerId,
        /// What it declared.
        info: JoinInfo,
    },
    /// A worker left (cleanly or its connection was lost).
    Left {
        /// Session id.
        worker: WorkerId,
    },
    /// A worker is alive.
    Heartbeat {
        /// Session id.
        worker: WorkerId,
    },
    /// A worker's update arrived.
    Update {
        /// Session id.
        worker: WorkerId,
        /// The update.
        update: ArrivedUpdate,
    },
    /// A worker's update could not be used (it did not decode, or had the wrong size): the
    /// shell refused it; the core records it as rejected for the round.
    UpdateRefused {
        /// Session id.
        worker: WorkerId,
        /// The round it was for.
        round: u64,
        /// Why.
        reason: String,
    },
    /// Time passed.
    Tick,
}

/// Outputs, to be carried out in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a message to a worker.
    Send {
        /// To whom.
        worker: WorkerId,
        /// What.
        msg: ServerMsg,
    },
    /// Put these bytes into the content store (their id is already referenced by later actions).
    StoreBlob {
        /// What the blob is, for logs.
        what: &'static str,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Append to the command log, durably, before carrying out any later action.
    Persist(LogEntry),
    /// A checkpoint blob was stored: publish it (e.g. link it as `checkpoints/round-N`).
    Checkpoint {
        /// Round it closes.
        round: u64,
        /// The checkpoint blob.
        blob: BlobId,
    },
    /// A round closed.
    RoundClosed(RoundSummary),
    /// The configured number of rounds is done.
    Finished,
}

/// An entry of the command log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LogEntry {
    /// An update was accepted for aggregation (its blob is in the store).
    UpdateAccepted {
        /// Round it counts towards.
        round: u64,
        /// The round it was trained in.
        trained_round: u64,
        /// Sender's certificate name.
        from: String,
        /// Blob.
        blob: BlobId,
        /// Wire bytes.
        bytes: u64,
        /// Clips.
        samples: u64,
        /// Steps.
        steps: u64,
        /// Losses.
        loss: RoundLoss,
        /// Shards it trained on.
        shards: Vec<BlobId>,
    },
    /// A round closed; its resulting state is the snapshot blob.
    RoundClosed {
        /// The round.
        round: u64,
        /// Snapshot blob.
        snapshot: BlobId,
        /// Parameters hash (hex) after the round.
        params: String,
    },
}

/// What a closed round did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Round number.
    pub round: u64,
    /// Updates aggregated.
    pub accepted: Vec<String>,
    /// Updates rejected, with reasons.
    pub rejected: Vec<(String, String)>,
    /// Workers expected but silent.
    pub missing: Vec<String>,
    /// Clips processed in the round.
    pub samples: u64,
    /// Local steps, summed over workers.
    pub steps: u64,
    /// Sample-weighted mean of the workers' mean losses (NaN, `null` in JSON, when no update
    /// was accepted).
    #[serde(deserialize_with = "amity_shared::stats::f64_or_nan")]
    pub loss: f64,
    /// Bytes of updates received.
    pub bytes_up: u64,
    /// Bytes of state sent for this round (delta or full, per worker).
    pub bytes_down: u64,
    /// What dense fp32 synchronisation every local step would have moved (up and down).
    pub dense_bytes: u64,
    /// Parameters hash (hex) after the round.
    pub params: String,
    /// Corpus epoch.
    pub epoch: u64,
    /// Norm of the outer optimiser's step over the norm of the mean pseudo-gradient (model
    /// part): 1 for plain averaging at outer lr 1; Nesterov momentum makes it grow over rounds.
    #[serde(default, deserialize_with = "amity_shared::stats::f64_or_nan")]
    pub outer_step_ratio: f64,
    /// Whether the round was a flush (dense updates both ways, before a checkpoint or the end).
    #[serde(default)]
    pub flush: bool,
    /// The held-out loss of the model before the round's step (contribution scoring on).
    #[serde(default)]
    pub held_out_loss: Option<f64>,
    /// Each scored update's relative change of the held-out loss when applied alone
    /// (negative: it helps).
    #[serde(default)]
    pub scores: Vec<(String, f64)>,
    /// How each update pointed relative to the recent global steps and to the others.
    #[serde(default)]
    pub alignment: Vec<aggregate::Alignment>,
}

/// Per-institution accounting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Clips contributed.
    pub samples: u64,
    /// Local steps contributed.
    pub steps: u64,
    /// Updates accepted.
    pub updates: u64,
    /// Updates rejected.
    pub rejected: u64,
    /// Shard-trainings contributed (a shard trained in two epochs counts twice).
    pub shards: u64,
    /// Updates scored on the held-out clips.
    #[serde(default)]
    pub scored: u64,
    /// Sum of their relative changes of the held-out loss (negative: they helped); over
    /// `scored`, the institution's mean contribution score.
    #[serde(default, deserialize_with = "amity_shared::stats::f64_or_nan")]
    pub loss_change: f64,
}

/// The scheduling of shards over epochs: each shard once per epoch, in a seeded order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// Every shard, with its owner when an institution holds it itself.
    pub shards: BTreeMap<BlobId, (u64, Option<String>)>,
    /// Current epoch.
    pub epoch: u64,
    /// Shards not yet handed out this epoch, in order.
    pub queue: VecDeque<BlobId>,
    /// Shards trained (update accepted) this epoch.
    pub covered: BTreeSet<BlobId>,
    /// Epochs completed.
    pub epochs_done: u64,
}

impl ShardPlan {
    /// Clips in every scheduled shard.
    pub fn clips(&self) -> u64 {
        self.shards.values().map(|(clips, _)| clips).sum()
    }

    /// Clips in the shards trained this epoch.
    pub fn covered_clips(&self) -> u64 {
        self.covered
            .iter()
            .filter_map(|id| self.shards.get(id))
            .map(|(clips, _)| clips)
            .sum()
    }

    fn refill(&mut self, seed: u64) {
        let queued: BTreeSet<&BlobId> = self.queue.iter().collect();
        let mut ids: Vec<BlobId> = self
            .shards
            .keys()
            .filter(|id| !queued.contains(id))
            .copied()
            .collect();
        Rng::derive(seed, &[0x5a4d, self.epoch]).shuffle(&mut ids);
        self.queue.extend(ids);
    }

    /// Puts the `assigned` shards that are not in `trained` back at the front of the queue, in
    /// their order.
    fn requeue(&mut self, assigned: Vec<BlobId>, trained: &BTreeSet<BlobId>) {
        for id in assigned.into_iter().rev() {
            if !trained.contains(&id) {
                self.queue.push_front(id);
            }
        }
    }

    fn may_train(&self, id: &BlobId, name: &str) -> bool {
        match self.shards.get(id) {
            Some((_, None)) => true,
            Some((_, Some(owner))) => owner == name,
            None => false,
        }
    }

    /// Takes up to `n` shards `name` may train, starting a new epoch when this one is used up.
    fn take(&mut self, n: usize, name: &str, seed: u64) -> Vec<BlobId> {
        let mut out = Vec::new();
        // An institution's own shards first: they cost no transfer.
        let mut i = 0;
        while out.len() < n && i < self.queue.len() {
            if matches!(self.shards.get(&self.queue[i]), Some((_, Some(o))) if o == name) {
                out.extend(self.queue.remove(i));
            } else {
                i += 1;
            }
        }
        for pass in 0..2 {
            let mut i = 0;
            while out.len() < n && i < self.queue.len() {
                if self.may_train(&self.queue[i], name) {
                    out.extend(self.queue.remove(i));
                } else {
                    i += 1;
                }
            }
            if out.len() == n || pass == 1 {
                break;
            }
            // This epoch has nothing left for this worker: open the next one (shards still in
            // flight are not queued twice).
            if self.covered.len() + self.queue.len() < self.shards.len() && !self.queue.is_empty() {
                break;
            }
            self.epoch += 1;
            self.epochs_done += (!self.covered.is_empty()) as u64;
            self.covered.clear();
            self.refill(seed);
        }
        out
    }
}

#[derive(Debug, Clone)]
struct WorkerState {
    info: JoinInfo,
    last_seen_ms: u64,
    /// Parameters hash of the state it was last sent.
    holds: Option<Hash>,
    /// Shards of its current assignment.
    assigned: Vec<BlobId>,
}

#[derive(Debug, Clone, PartialEq)]
struct Pending {
    from: String,
    weight: f64,
    update: ArrivedUpdate,
    shards: Vec<BlobId>,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for enough workers.
    Idle,
    /// A round is under way.
    Running {
        deadline_ms: u64,
        expected: BTreeSet<WorkerId>,
        /// Everyone the round was announced to, including workers that left since.
        announced: Vec<String>,
        bytes_down: u64,
    },
    /// `max_rounds` done.
    Finished,
}

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
    pub last_delta: Option<(Hash, BlobId)>,
    /// Size of that delta blob.
    pub last_delta_len: u64,
    /// The target momentum workers apply after that delta (coordinator-EMA policy).
    #[serde(default)]
    pub last_delta_momentum: Option<f32>,
    /// Parameters hash of the seeded initial state.
    pub init_hash: Hash,
    /// Lengths of the vectors that follow.
    pub lens: [u64; 4],
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

/// Why a snapshot blob cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("invalid coordinator snapshot: {0}")]
pub struct SnapshotError(pub String);

impl Snapshot {
    /// `"AMSN" | json length (u64) | JSON metadata | f32 vectors (LE)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.meta).expect("snapshot metadata serialises");
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for v in [
            &self.params.model,
            &self.params.target,
            &self.momentum,
            &self.down_residual,
        ] {
            for x in v.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    /// Parses and checks a snapshot.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
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
        let mut rest = &bytes[12 + n..];
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
        Ok(Snapshot {
            meta,
            params: GlobalParams { model, target },
            momentum,
            down_residual,
        })
    }
}

/// The coordinator's state machine.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    round: u64,
    phase: Phase,
    params: GlobalParams,
    /// `params.hash()`, kept in step with `params` (hashing them is not free).
    params_hash: Hash,
    outer: OuterOptimizer,
    down_residual: Vec<f32>,
    /// Blob id of the checkpoint form of `params` (what workers without a base fetch).
    state_blob: BlobId,
    last_delta: Option<(Hash, BlobId)>,
    /// Under the coordinator-EMA policy, the momentum of the target's EMA step that follows
    /// `last_delta` (both ends compute it; the target is never sent).
    last_delta_momentum: Option<f32>,
    delta_bytes_len: u64,
    workers: BTreeMap<WorkerId, WorkerState>,
    received: Vec<Pending>,
    /// Updates of this round refused before decoding: (sender, reason).
    refused: Vec<(String, String)>,
    plan: ShardPlan,
    norm_history: Vec<f64>,
    provenance: BTreeMap<String, Provenance>,
    history: Vec<RoundSummary>,
    now_ms: u64,
    /// Whether this process has started a round yet.
    started_any: bool,
    /// Parameters hash of the run's seeded initialisation.
    init_hash: Hash,
    /// Measures each update's effect on held-out clips (contribution scoring), when set.
    scorer: Option<Box<dyn HeldOutLoss>>,
}

const NORM_HISTORY: usize = 32;

/// A round's totals over its accepted updates.
#[derive(Debug, Default)]
struct Tally {
    samples: u64,
    steps: u64,
    /// Sum of mean losses weighted by samples.
    loss_sum: f64,
    /// Sum of steps weighted by samples.
    weighted_steps: f64,
}

/// The shards the received updates trained.
fn trained_shards(received: &[Pending]) -> BTreeSet<BlobId> {
    received
        .iter()
        .flat_map(|p| p.shards.iter().copied())
        .collect()
}

/// The most shards one institution may register from its own corpus (at the default 64 MiB a
/// shard, 256 GiB): what bounds the shard plan, which every snapshot holds.
pub const MAX_LOCAL_SHARDS: usize = 4096;

/// A worker's claimed throughput counts for at most this multiple of the median claim when
/// shards are shared out, so that no claim takes every shard.
const SPEED_CAP: f64 = 8.0;

impl Core {
    /// A fresh run from `params` (the run config's seeded initialisation) over the coordinator's
    /// `shards`. Returns the actions that store the initial state.
    pub fn new(cfg: CoreConfig, params: GlobalParams, shards: &[ShardInfo]) -> (Self, Vec<Action>) {
        let mut plan = ShardPlan::default();
        for s in shards {
            plan.shards.insert(s.id, (s.clips, None));
        }
        plan.refill(cfg.run.train.seed);
        let hash = params.hash();
        let mut core = Core {
            outer: OuterOptimizer::new(cfg.outer),
            cfg,
            round: 0,
            phase: Phase::Idle,
            down_residual: Vec::new(),
            state_blob: BlobId([0; 32]),
            last_delta: None,
            last_delta_momentum: None,
            delta_bytes_len: 0,
            workers: BTreeMap::new(),
            received: Vec::new(),
            refused: Vec::new(),
            plan,
            norm_history: Vec::new(),
            provenance: BTreeMap::new(),
            history: Vec::new(),
            init_hash: hash,
            params_hash: hash,
            params,
            now_ms: 0,
            started_any: false,
            scorer: None,
        };
        let mut out = Vec::new();
        core.store_state(&mut out);
        (core, out)
    }

    /// A core resumed from a snapshot (the accepted updates of the open round are then replayed
    /// with [`Core::replay_update`]). Returns the actions that store the state blob again.
    pub fn restore(cfg: CoreConfig, snap: Snapshot) -> Result<(Self, Vec<Action>), SnapshotError> {
        // The snapshot must be of this run config's model: shapes checked before use.
        let (ml, tl) = amity_shared::checkpoint::layouts(&cfg.run);
        let (m, t) = (snap.params.model.len(), snap.params.target.len());
        if (m, t) != (ml.total, tl.total) {
            return Err(SnapshotError(format!(
                "its state has {m} model and {t} target values; the run config's model has {} \
                 and {} (was the run config changed?)",
                ml.total, tl.total
            )));
        }
        if ![0, m].contains(&snap.momentum.len())
            || ![0, m, m + t].contains(&snap.down_residual.len())
        {
            return Err(SnapshotError(
                "its optimiser state does not fit its parameters".into(),
            ));
        }
        let mut outer = OuterOptimizer::new(cfg.outer);
        outer.momentum = snap.momentum;
        let mut core = Core {
            outer,
            cfg,
            round: snap.meta.round,
            phase: Phase::Idle,
            down_residual: snap.down_residual,
            state_blob: BlobId([0; 32]),
            last_delta: snap.meta.last_delta,
            last_delta_momentum: snap.meta.last_delta_momentum,
            delta_bytes_len: snap.meta.last_delta_len,
            workers: BTreeMap::new(),
            received: Vec::new(),
            refused: Vec::new(),
            plan: snap.meta.plan,
            norm_history: snap.meta.norm_history,
            provenance: snap.meta.provenance,
            history: snap.meta.history,
            init_hash: snap.meta.init_hash,
            params_hash: snap.params.hash(),
            params: snap.params,
            now_ms: 0,
            started_any: false,
            scorer: None,
        };
        if core.cfg.rounds.max_rounds > 0 && core.round >= core.cfg.rounds.max_rounds {
            core.phase = Phase::Finished;
        }
        let mut out = Vec::new();
        core.store_state(&mut out);
        Ok((core, out))
    }

    /// Re-adds an update that the log says was accepted before a restart.
    pub fn replay_update(&mut self, entry: &LogEntry, values: Vec<f32>) {
        if let LogEntry::UpdateAccepted {
            round,
            trained_round,
            from,
            blob,
            bytes,
            samples,
            steps,
            loss,
            shards,
        } = entry
            && *round == self.round
        {
            let weight = self.weight(*samples, self.round - trained_round);
            self.received.retain(|p| p.from != *from);
            self.received.push(Pending {
                from: from.clone(),
                weight,
                shards: shards.clone(),
                update: ArrivedUpdate {
                    round: *trained_round,
                    blob: *blob,
                    bytes: *bytes,
                    samples: *samples,
                    steps: *steps,
                    loss: *loss,
                    values,
                },
            });
        }
    }

    /// The current global parameters.
    pub fn params(&self) -> &GlobalParams {
        &self.params
    }

    /// The blobs the core still serves or will aggregate: the global state, the last state
    /// delta and the updates received for the open round. Everything else in the store belongs
    /// to past rounds (see [`crate::retention`]).
    pub fn live_blobs(&self) -> BTreeSet<BlobId> {
        let mut live = BTreeSet::from([self.state_blob]);
        live.extend(self.last_delta.map(|(_, id)| id));
        live.extend(self.received.iter().map(|p| p.update.blob));
        live
    }

    /// `params().hash()`, cached.
    pub fn params_hash(&self) -> Hash {
        self.params_hash
    }

    /// The round under way (or next to run).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Closed rounds.
    pub fn history(&self) -> &[RoundSummary] {
        &self.history
    }

    /// Per-institution accounting.
    pub fn provenance(&self) -> &BTreeMap<String, Provenance> {
        &self.provenance
    }

    /// The shard plan.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The config.
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Whether `max_rounds` are done.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Names of the workers present.
    pub fn workers(&self) -> Vec<(WorkerId, String)> {
        self.workers
            .iter()
            .map(|(id, w)| (*id, w.info.name.clone()))
            .collect()
    }

    /// The parts of a valid update's value vector: the model, then the target under the
    /// local-EMA policy. Updates are encoded part by part (`codec::encode_parts`), so top-k
    /// picks the largest entries of each part and never starves the slowly moving target.
    pub fn update_parts(&self) -> Vec<usize> {
        let mut parts = vec![self.params.model.len()];
        if self.cfg.target_policy == TargetPolicy::LocalEma {
            parts.push(self.params.target.len());
        }
        parts
    }

    /// The length of a valid update's value vector.
    pub fn update_len(&self) -> usize {
        self.params.model.len()
            + match self.cfg.target_policy {
                TargetPolicy::LocalEma => self.params.target.len(),
                TargetPolicy::CoordinatorEma => 0,
            }
    }

    /// Where round `round` sits in the run, as announced to the workers.
    fn progress(&self, round: u64) -> RunProgress {
        RunProgress {
            round,
            planned_rounds: self.cfg.rounds.max_rounds,
        }
    }

    /// Whether round `round` is a flush round: the last of the run, or one after which a
    /// checkpoint is written. Updates and the state delta then go out densely, residuals
    /// included, so that what is saved (and released) holds every step that was trained.
    pub fn is_flush_round(&self, round: u64) -> bool {
        let max = self.cfg.rounds.max_rounds;
        let k = self.cfg.checkpoint_every;
        self.cfg.rounds.flush
            && ((max > 0 && round + 1 == max) || (k > 0 && (round + 1).is_multiple_of(k)))
    }

    /// Handles one event at time `now_ms` (milliseconds on any monotonic clock).
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Vec<Action> {
        self.now_ms = now_ms;
        let mut out = Vec::new();
        match event {
            Event::Joined { worker, info } => self.on_join(worker, info, &mut out),
            Event::Left { worker } => self.on_leave(worker, "left"),
            Event::Heartbeat { worker } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.last_seen_ms = now_ms;
                }
            }
            Event::Update { worker, update } => self.on_update(worker, update, &mut out),
            Event::UpdateRefused {
                worker,
                round,
                reason,
            } => {
                if let Some(w) = self.workers.get(&worker)
                    && round == self.round
                {
                    let name = w.info.name.clone();
                    self.refused.retain(|(n, _)| *n != name);
                    self.refused.push((name, reason));
                }
            }
            Event::Tick => {}
        }
        self.expire_silent();
        self.advance(&mut out);
        out
    }

    fn on_join(&mut self, worker: WorkerId, info: JoinInfo, out: &mut Vec<Action>) {
        let mut owned = self
            .plan
            .shards
            .values()
            .filter(|(_, owner)| owner.as_deref() == Some(info.name.as_str()))
            .count();
        for s in &info.local_shards {
            if owned >= MAX_LOCAL_SHARDS {
                tracing::warn!(
                    worker,
                    name = %info.name,
                    "more than {MAX_LOCAL_SHARDS} local shards: the rest are ignored"
                );
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = self.plan.shards.entry(s.id) {
                // A newly registered corpus joins the current epoch (what it trained of this
                // epoch before it left stays covered).
                e.insert((s.clips, Some(info.name.clone())));
                if !self.plan.covered.contains(&s.id) {
                    self.plan.queue.push_back(s.id);
                }
                owned += 1;
            }
        }
        tracing::info!(
            worker,
            name = %info.name,
            backend = %info.backend,
            samples_per_s = info.samples_per_s,
            local_shards = info.local_shards.len(),
            "worker joined"
        );
        self.workers.insert(
            worker,
            WorkerState {
                info,
                last_seen_ms: self.now_ms,
                // Every worker builds the seeded initial state from the run config itself.
                holds: Some(self.init_hash),
                assigned: Vec::new(),
            },
        );
        out.push(Action::Send {
            worker,
            msg: ServerMsg::Registered {
                worker,
                run: self.cfg.run.to_toml(),
                codec: self.cfg.codec.to_string(),
                target_policy: self.cfg.target_policy.to_string(),
            },
        });
    }

    fn on_leave(&mut self, worker: WorkerId, why: &str) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        tracing::info!(worker, name = %w.info.name, "worker {why}");
        // The shards of its assignment that no received update trained go back to the front
        // of the queue (keyed by shard, not by institution: another session of the same
        // institution may have delivered its own).
        let trained = trained_shards(&self.received);
        self.plan.requeue(w.assigned, &trained);
        if let Phase::Running { expected, .. } = &mut self.phase {
            expected.remove(&worker);
        }
        // An institution's own shards leave the plan with its last session (they come back
        // when it registers again), so that shards of institutions gone do not pile up in it.
        let name = w.info.name;
        if !self.workers.values().any(|o| o.info.name == name) {
            let own: BTreeSet<BlobId> = self
                .plan
                .shards
                .iter()
                .filter(|(_, (_, owner))| owner.as_deref() == Some(name.as_str()))
                .map(|(id, _)| *id)
                .collect();
            if !own.is_empty() {
                self.plan.shards.retain(|id, _| !own.contains(id));
                self.plan.queue.retain(|id| !own.contains(id));
                tracing::info!(name = %name, shards = own.len(), "its own shards leave the plan");
            }
        }
    }

    fn expire_silent(&mut self) {
        let limit = self.cfg.rounds.heartbeat_timeout_ms;
        let silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| self.now_ms.saturating_sub(w.last_seen_ms) > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            self.on_leave(id, "timed out (no heartbeat)");
        }
    }

    fn weight(&self, samples: u64, staleness: u64) -> f64 {
        samples as f64 * self.cfg.rounds.staleness_discount.powi(staleness as i32)
    }

    fn on_update(&mut self, worker: WorkerId, u: ArrivedUpdate, out: &mut Vec<Action>) {
        let want = self.update_len();
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.last_seen_ms = self.now_ms;
        let name = w.info.name.clone();
        let running = matches!(self.phase, Phase::Running { .. });
        // A refused update for the open round is that worker's delivery for it: counted as
        // rejected, so that the round does not wait for it.
        let for_open_round = running && u.round == self.round;
        let refused = &mut self.refused;
        let mut refuse = |out: &mut Vec<Action>, code, message: String| {
            tracing::warn!(worker, %name, "update refused: {message}");
            if for_open_round {
                refused.retain(|(n, _)| *n != name);
                refused.push((name.clone(), message.clone()));
            }
            out.push(Action::Send {
                worker,
                msg: ServerMsg::Error { code, message },
            });
        };
        if u.round > self.round || (u.round == self.round && !running) {
            return refuse(
                out,
                ErrorCode::Unexpected,
                format!("round {} is not open", u.round),
            );
        }
        let staleness = self.round - u.round;
        if staleness > 0 && self.cfg.rounds.late == LatePolicy::Drop {
            return refuse(
                out,
                ErrorCode::Unexpected,
                format!("round {} closed; late updates are dropped", u.round),
            );
        }
        if u.values.len() != want {
            return refuse(
                out,
                ErrorCode::Malformed,
                format!("{} values, expected {want}", u.values.len()),
            );
        }
        // Claims of work are bounded by what the run allows; they set the update's weight.
        let batch = self.cfg.run.train.batch as u64;
        let max_steps = self.cfg.rounds.steps;
        if u.steps == 0 || u.samples > u.steps.saturating_mul(batch) {
            return refuse(
                out,
                ErrorCode::Malformed,
                format!(
                    "claims {} samples in {} steps of batch {batch}",
                    u.samples, u.steps
                ),
            );
        }
        if max_steps > 0 && u.steps > max_steps {
            return refuse(
                out,
                ErrorCode::Malformed,
                format!("claims {} steps in a round of {max_steps}", u.steps),
            );
        }
        let shards = if staleness == 0 {
            w.assigned.clone()
        } else {
            Vec::new()
        };
        let entry = LogEntry::UpdateAccepted {
            round: self.round,
            trained_round: u.round,
            from: name.clone(),
            blob: u.blob,
            bytes: u.bytes,
            samples: u.samples,
            steps: u.steps,
            loss: u.loss,
            shards: shards.clone(),
        };
        out.push(Action::Persist(entry));
        out.push(Action::Send {
            worker,
            msg: ServerMsg::Ack { of: u.round },
        });
        let budget = self.cfg.rounds.budget_ms;
        if staleness == 0 && self.cfg.rounds.steps == 0 && budget > 0 {
            // Time-budgeted: the round itself measures the worker's throughput, which the
            // next assignment follows.
            if let Some(w) = self.workers.get_mut(&worker) {
                w.info.samples_per_s = u.samples as f64 * 1000.0 / budget as f64;
            }
        }
        let weight = self.weight(u.samples, staleness);
        // One update per institution a round: a later one (another session of it) replaces
        // the earlier, whose shards go back to the queue unless the later one trained them.
        let (replaced, kept): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.received)
            .into_iter()
            .partition(|p| p.from == name);
        self.received = kept;
        let trained: BTreeSet<BlobId> = shards.iter().copied().collect();
        for p in replaced {
            self.plan.requeue(p.shards, &trained);
        }
        self.refused.retain(|(n, _)| *n != name);
        self.received.push(Pending {
            from: name,
            weight,
            update: u,
            shards,
        });
    }

    /// Starts or closes rounds as the state allows.
    fn advance(&mut self, out: &mut Vec<Action>) {
        loop {
            match &self.phase {
                Phase::Finished => return,
                Phase::Idle => {
                    // `min_workers` gates the first round this process runs (also after a
                    // restart, so that reconnecting workers are gathered before the open round
                    // resumes); after that, training goes on with whoever is there.
                    let needed = if !self.started_any {
                        self.cfg.rounds.min_workers.max(1)
                    } else {
                        1
                    };
                    if self.workers.len() >= needed {
                        self.start_round(out);
                    }
                    return;
                }
                Phase::Running {
                    deadline_ms,
                    expected,
                    ..
                } => {
                    let all_in = expected.iter().all(|id| {
                        self.workers.get(id).is_some_and(|w| {
                            self.received.iter().any(|p| p.from == w.info.name)
                                || self.refused.iter().any(|(n, _)| *n == w.info.name)
                        })
                    });
                    if self.now_ms >= *deadline_ms || all_in {
                        self.close_round(out);
                        continue;
                    }
                    return;
                }
            }
        }
    }

    fn start_round(&mut self, out: &mut Vec<Action>) {
        self.started_any = true;
        let r = &self.cfg.rounds;
        let deadline_ms = self.now_ms
            + if r.steps > 0 {
                r.grace_ms
            } else {
                r.budget_ms + r.grace_ms
            };
        let params_hash = self.params_hash;
        let claimed: Vec<f64> = self
            .workers
            .values()
            .map(|w| w.info.samples_per_s.max(1e-3))
            .collect();
        let most = SPEED_CAP * lower_median(&claimed);
        let speed = |claim: f64| claim.max(1e-3).min(most);
        let total_speed: f64 = claimed.iter().map(|c| speed(*c)).sum();
        let seed = self.cfg.run.train.seed;
        let state_len = 4 * (self.params.model.len() + self.params.target.len()) as u64;
        let flush = self.is_flush_round(self.round);
        let mut bytes_down = 0;
        let mut expected = BTreeSet::new();
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let w = self.workers.get(&id).expect("listed above");
            let share = speed(w.info.samples_per_s) / total_speed;
            let n = ((r.shards_per_round as f64 * share).round() as usize).max(1);
            let name = w.info.name.clone();
            let holds = w.holds;
            let shards = self.plan.take(n, &name, seed);
            let delta = self
                .last_delta
                .filter(|(base, _)| holds == Some(*base))
                .map(|(base, blob)| StateDelta {
                    base,
                    blob: blob.0,
                    target_momentum: self.last_delta_momentum,
                });
            bytes_down += match delta {
                _ if holds == Some(params_hash) => 0,
                Some(_) => self.delta_bytes_len,
                None => state_len,
            };
            out.push(Action::Send {
                worker: id,
                msg: ServerMsg::RoundAnnounce {
                    round: self.round,
                    state: self.state_blob.0,
                    params: params_hash,
                    delta,
                    budget_ms: r.budget_ms,
                    steps: r.steps,
                    planned_rounds: r.max_rounds,
                    flush,
                },
            });
            out.push(Action::Send {
                worker: id,
                msg: ServerMsg::ShardAssignment {
                    round: self.round,
                    shards: shards.iter().map(|s| s.0).collect(),
                },
            });
            let w = self.workers.get_mut(&id).expect("listed above");
            w.holds = Some(params_hash);
            w.assigned = shards;
            expected.insert(id);
        }
        tracing::info!(
            round = self.round,
            workers = expected.len(),
            "round started"
        );
        let announced = expected
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.info.name.clone())
            .collect();
        self.phase = Phase::Running {
            deadline_ms,
            expected,
            announced,
            bytes_down,
        };
    }

    fn close_round(&mut self, out: &mut Vec<Action>) {
        let Some((expected, announced, bytes_down)) = self.end_running() else {
            return;
        };
        let mut received = std::mem::take(&mut self.received);
        let refused = std::mem::take(&mut self.refused);
        let missing: Vec<String> = announced
            .into_iter()
            .filter(|name| {
                !received.iter().any(|p| p.from == *name) && !refused.iter().any(|r| r.0 == *name)
            })
            .collect();
        // Shards that no received update trained go back to the queue: those of workers that
        // did not deliver, also when another session of the same institution did.
        let trained = trained_shards(&received);
        for id in &expected {
            if let Some(w) = self.workers.get_mut(id) {
                self.plan.requeue(std::mem::take(&mut w.assigned), &trained);
            }
        }
        let bytes_up: u64 = received.iter().map(|p| p.update.bytes).sum();
        // The values move into the candidates; the rest of `received` feeds the statistics.
        let cands: Vec<Candidate> = received
            .iter_mut()
            .map(|p| Candidate {
                from: p.from.clone(),
                values: std::mem::take(&mut p.update.values),
                weight: p.weight,
            })
            .collect();
        // A flush round's updates carry every worker's error-feedback residual, so their norms
        // are compared with each other, not with ordinary rounds (nor recorded among them).
        let flush = self.is_flush_round(self.round);
        let history: &[f64] = if flush { &[] } else { &self.norm_history };
        let (accepted, screened_out, alignment) =
            aggregate::screen(cands, history, &self.outer.momentum, &self.cfg.aggregation);
        // A flush round's updates carry every residual held back over the run: applied alone
        // they are not comparable with a round's work, so they are not scored.
        let (accepted, scored_out, held_out_loss, scores) = if flush {
            (accepted, Vec::new(), None, Vec::new())
        } else {
            self.score(accepted)
        };
        let rejected = self.record_verdicts(&scores, screened_out, scored_out, refused);
        let Tally {
            samples,
            steps,
            loss_sum,
            weighted_steps,
        } = self.count_accepted(&received, &accepted, flush);

        let mut outer_step_ratio = 0.0;
        let mut rejected = rejected;
        let mut accepted_names: Vec<String> = accepted.iter().map(|c| c.from.clone()).collect();
        if !accepted.is_empty() {
            let mean_steps = if samples > 0 {
                weighted_steps / samples as f64
            } else {
                0.0
            };
            match self.step_and_publish(&accepted, mean_steps, flush, out) {
                Ok(ratio) => outer_step_ratio = ratio,
                Err(why) => {
                    // Screening should make this unreachable; if not, the round leaves the
                    // model as it was rather than publish a broken state.
                    tracing::error!(round = self.round, "outer step dropped: {why}");
                    for from in accepted_names.drain(..) {
                        let prov = self.provenance.entry(from.clone()).or_default();
                        prov.updates -= 1;
                        prov.rejected += 1;
                        rejected.push((from, why.clone()));
                    }
                }
            }
        }
        if accepted_names.is_empty() {
            self.last_delta = None;
            self.last_delta_momentum = None;
        }
        let params_hex = hex(&self.params_hash);
        let p = (self.params.model.len() + self.params.target.len()) as u64;
        let summary = RoundSummary {
            round: self.round,
            accepted: accepted_names,
            rejected,
            missing,
            samples,
            steps,
            loss: if samples > 0 {
                loss_sum / samples as f64
            } else {
                f64::NAN
            },
            bytes_up,
            bytes_down,
            dense_bytes: steps.saturating_mul(p * 4 * 2),
            params: params_hex.clone(),
            epoch: self.plan.epoch,
            outer_step_ratio,
            flush,
            held_out_loss,
            scores,
            alignment,
        };
        tracing::info!(
            round = self.round,
            accepted = summary.accepted.len(),
            rejected = summary.rejected.len(),
            missing = summary.missing.len(),
            loss = summary.loss,
            bytes_up,
            "round closed"
        );
        self.publish_round(summary, params_hex, out);
    }

    /// Adds the scores and rejections to the provenance and logs each rejection; returns
    /// every rejected update of the round with its reason.
    fn record_verdicts(
        &mut self,
        scores: &[(String, f64)],
        screened_out: Vec<(Candidate, String)>,
        scored_out: Vec<(Candidate, String)>,
        refused: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        for (from, change) in scores {
            let prov = self.provenance.entry(from.clone()).or_default();
            prov.scored += 1;
            prov.loss_change += change;
        }
        let rejected: Vec<(String, String)> = screened_out
            .into_iter()
            .chain(scored_out)
            .map(|(c, why)| (c.from, why))
            .chain(refused)
            .collect();
        for (from, why) in &rejected {
            tracing::warn!(round = self.round, %from, "update rejected: {why}");
            self.provenance.entry(from.clone()).or_default().rejected += 1;
        }
        rejected
    }

    /// Ends the running phase (Idle until the next round starts): the round's expected workers,
    /// everyone it was announced to and the bytes sent down; `None` when no round runs.
    fn end_running(&mut self) -> Option<(BTreeSet<WorkerId>, Vec<String>, u64)> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Running {
                expected,
                announced,
                bytes_down,
                ..
            } => Some((expected, announced, bytes_down)),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Adds the accepted updates' work to the provenance, their shards to the epoch's coverage
    /// and (in ordinary rounds) their norms to the history; returns the round's totals.
    fn count_accepted(
        &mut self,
        received: &[Pending],
        accepted: &[Candidate],
        flush: bool,
    ) -> Tally {
        let ok: BTreeSet<&str> = accepted.iter().map(|c| c.from.as_str()).collect();
        let mut t = Tally::default();
        // Claimed counts are bounded on arrival; the sums still saturate rather than wrap.
        for p in received.iter().filter(|p| ok.contains(p.from.as_str())) {
            t.samples = p.update.samples.saturating_add(t.samples);
            t.steps = p.update.steps.saturating_add(t.steps);
            t.loss_sum += p.update.loss.mean * p.update.samples as f64;
            t.weighted_steps += p.update.steps as f64 * p.update.samples as f64;
            let prov = self.provenance.entry(p.from.clone()).or_default();
            prov.samples = prov.samples.saturating_add(p.update.samples);
            prov.steps = prov.steps.saturating_add(p.update.steps);
            prov.updates += 1;
            prov.shards += p.shards.len() as u64;
            for s in &p.shards {
                self.plan.covered.insert(*s);
            }
        }
        if !flush {
            for c in accepted {
                self.norm_history.push(aggregate::norm(&c.values));
            }
        }
        let excess = self.norm_history.len().saturating_sub(NORM_HISTORY);
        self.norm_history.drain(..excess);
        t
    }

    /// Records the closed round and emits what follows from it: the next state, the snapshot
    /// and its log entry, a checkpoint when due, the summary, and `Finished` after the last.
    fn publish_round(&mut self, summary: RoundSummary, params_hex: String, out: &mut Vec<Action>) {
        self.history.push(summary.clone());
        self.round += 1;
        self.store_state(out);
        let snapshot = self.snapshot().to_bytes();
        let snap_id = BlobId::of(&snapshot);
        out.push(Action::StoreBlob {
            what: "snapshot",
            bytes: snapshot,
        });
        out.push(Action::Persist(LogEntry::RoundClosed {
            round: self.round - 1,
            snapshot: snap_id,
            params: params_hex,
        }));
        let k = self.cfg.checkpoint_every;
        if k > 0 && self.round.is_multiple_of(k) {
            out.push(Action::Checkpoint {
                round: self.round - 1,
                blob: self.state_blob,
            });
        }
        out.push(Action::RoundClosed(summary));
        let max = self.cfg.rounds.max_rounds;
        if max > 0 && self.round >= max {
            self.phase = Phase::Finished;
            out.push(Action::Finished);
        }
    }

    /// Sets the scorer that measures each update on held-out clips before it is aggregated.
    pub fn set_scorer(&mut self, scorer: Box<dyn HeldOutLoss>) {
        self.scorer = Some(scorer);
    }

    /// Contribution scoring (when a scorer is set): applies each screened update alone to the
    /// model and measures the relative change of the held-out loss. An update that raises it by
    /// more than `score_tolerance` is rejected with the reason; one that raises it by less is
    /// down-weighted in proportion (by up to half). Returns the kept and rejected updates, the
    /// loss before the step and every update's change.
    #[allow(clippy::type_complexity)]
    fn score(
        &mut self,
        accepted: Vec<Candidate>,
    ) -> (
        Vec<Candidate>,
        Vec<(Candidate, String)>,
        Option<f64>,
        Vec<(String, f64)>,
    ) {
        let Some(scorer) = self.scorer.as_mut() else {
            return (accepted, Vec::new(), None, Vec::new());
        };
        let base = scorer.loss(&self.params.model, &self.params.target);
        if !(base.is_finite() && base > 0.0) {
            tracing::warn!(
                round = self.round,
                "held-out loss {base}: updates not scored"
            );
            return (accepted, Vec::new(), None, Vec::new());
        }
        let tol = self.cfg.aggregation.score_tolerance;
        let m = self.params.model.len();
        let mut model = vec![0.0f32; m];
        let (mut kept, mut out, mut scores) = (Vec::new(), Vec::new(), Vec::new());
        for mut c in accepted {
            for ((x, p), d) in model.iter_mut().zip(&self.params.model).zip(&c.values[..m]) {
                *x = p - d;
            }
            let change = (scorer.loss(&model, &self.params.target) - base) / base;
            if change.is_finite() {
                scores.push((c.from.clone(), change));
            }
            // A NaN change is a rejection too.
            if change.is_nan() || change > tol {
                let why = format!(
                    "raises the held-out loss by {:.2}% (limit {:.2}%)",
                    100.0 * change,
                    100.0 * tol
                );
                out.push((c, why));
            } else {
                if change > 0.0 {
                    c.weight *= 1.0 - 0.5 * change / tol;
                }
                kept.push(c);
            }
        }
        (kept, out, Some(base), scores)
    }

    /// Takes the round's outer step, encodes it as the state delta workers will apply (densely
    /// in a flush round; the codec's loss waits in the downlink residual), applies exactly what
    /// was encoded (and, under coordinator EMA, the target's EMA step) and stores the delta.
    /// Returns the outer step's norm over the mean pseudo-gradient's, or why the step was
    /// dropped (not finite), in which case nothing changed.
    fn step_and_publish(
        &mut self,
        accepted: &[Candidate],
        mean_steps: f64,
        flush: bool,
        out: &mut Vec<Action>,
    ) -> Result<f64, String> {
        let base_hash = self.params_hash;
        let (delta, ratio, outer_momentum) = self.outer_update(accepted)?;
        // Under coordinator EMA the delta covers the model only: the target's EMA step is
        // computed on both ends from the applied model.
        let (parts, momentum) = match self.cfg.target_policy {
            TargetPolicy::LocalEma => (self.params.parts().to_vec(), None),
            TargetPolicy::CoordinatorEma => {
                let m = self
                    .progress(self.round)
                    .target_momentum(&self.cfg.run.train, mean_steps);
                (vec![self.params.model.len()], Some(m))
            }
        };
        let spec = if flush {
            self.cfg.downlink_codec.dense()
        } else {
            self.cfg.downlink_codec
        };
        let bytes = codec::encode_parts(&spec, &delta, &parts);
        let sent = codec::decode_parts(&bytes, &parts)
            .map_err(|e| format!("the state delta does not decode: {e}"))?;
        // Checked before anything moves, without copying the state: finite parameters plus a
        // finite delta must stay finite (the coordinator-EMA target step only averages finite
        // values, so the parts the delta covers are all there is to check).
        let state = self.params.model.iter().chain(&self.params.target);
        if state.zip(&sent).any(|(p, d)| !(p + d).is_finite()) {
            return Err("the new parameters would not be finite".into());
        }
        self.params
            .apply_state_delta(&sent, momentum)
            .map_err(|e| format!("the state delta does not apply: {e}"))?;
        self.outer.momentum = outer_momentum;
        self.down_residual = delta.iter().zip(&sent).map(|(d, s)| d - s).collect();
        self.params_hash = self.params.hash();
        self.delta_bytes_len = bytes.len() as u64;
        self.last_delta = Some((base_hash, BlobId::of(&bytes)));
        self.last_delta_momentum = momentum;
        out.push(Action::StoreBlob {
            what: "state delta",
            bytes,
        });
        Ok(ratio)
    }

    /// The round's aggregated outer step plus the downlink residual of earlier rounds, as a
    /// delta over the model (then, under the local-EMA policy, the target), the outer step's
    /// norm over the mean pseudo-gradient's, and the outer momentum buffer to keep if the step
    /// is taken. Fails, changing nothing, when the aggregate or the step is not finite.
    fn outer_update(&self, accepted: &[Candidate]) -> Result<(Vec<f32>, f64, Vec<f32>), String> {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        let m_len = self.params.model.len();
        let g = aggregate::combine_range(accepted, 0..m_len, &self.cfg.aggregation)
            .ok_or("no updates to combine")?;
        if !finite(&g) {
            return Err("the aggregated pseudo-gradient is not finite".into());
        }
        let (step, momentum) = self.outer.propose(&g);
        if !finite(&step) {
            return Err("the outer step is not finite".into());
        }
        let g_norm = aggregate::norm(&g);
        let ratio = if g_norm > 0.0 {
            aggregate::norm(&step) / g_norm
        } else {
            0.0
        };
        let mut delta = step;
        if self.cfg.target_policy == TargetPolicy::LocalEma {
            // The target moves by the mean of the workers' target moves.
            let len = m_len + self.params.target.len();
            let gt = aggregate::combine_range(accepted, m_len..len, &self.cfg.aggregation)
                .ok_or("no updates to combine")?;
            delta.extend(gt.iter().map(|d| -d));
        }
        if self.down_residual.len() == delta.len() {
            for (d, r) in delta.iter_mut().zip(&self.down_residual) {
                *d += r;
            }
        }
        if !finite(&delta) {
            return Err("the state delta is not finite".into());
        }
        Ok((delta, ratio, momentum))
    }

    fn store_state(&mut self, out: &mut Vec<Action>) {
        let mut meta = BTreeMap::new();
        meta.insert("round".to_owned(), self.round.to_string());
        meta.insert("params".to_owned(), hex(&self.params_hash));
        // Who trained this state, for releases' model cards (`amity.provenance`).
        meta.insert(
            "provenance".to_owned(),
            serde_json::to_string(&self.provenance).expect("provenance serialises"),
        );
        let bytes = Checkpoint {
            config: self.cfg.run.clone(),
            model: self.params.model.clone(),
            target: self.params.target.clone(),
            meta,
        }
        .to_bytes();
        self.state_blob = BlobId::of(&bytes);
        out.push(Action::StoreBlob {
            what: "global state",
            bytes,
        });
    }

    /// The durable state as a snapshot.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
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
                    self.params.model.len() as u64,
                    self.params.target.len() as u64,
                    self.outer.momentum.len() as u64,
                    self.down_residual.len() as u64,
                ],
            },
            params: self.params.clone(),
            momentum: self.outer.momentum.clone(),
            down_residual: self.down_residual.clone(),
        }
    }
}

/// Lower-case hex of a hash.
pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use amity_shared::checkpoint::layouts;
    use amity_shared::config::Config;
    use amity_shared::flat::init_params;

    fn setup(policy: TargetPolicy) -> (Core, Vec<ShardInfo>) {
        let run = Config::preset("tiny").unwrap();
        let (ml, tl) = layouts(&run);
        let model = init_params(&ml, 1);
        let target = model[..tl.total].to_vec();
        let mut cfg = CoreConfig::new(run);
        cfg.target_policy = policy;
        cfg.rounds.min_workers = 2;
        cfg.rounds.budget_ms = 1000;
        cfg.rounds.grace_ms = 1000;
        cfg.rounds.shards_per_round = 4;
        cfg.checkpoint_every = 2;
        let shards: Vec<ShardInfo> = (0..6u8)
            .map(|i| ShardInfo {
                id: BlobId([i; 32]),
                clips: 10,
            })
            .collect();
        let (core, actions) = Core::new(cfg, GlobalParams { model, target }, &shards);
        assert!(matches!(
            actions[0],
            Action::StoreBlob {
                what: "global state",
                ..
            }
        ));
        (core, shards)
    }

    fn join(core: &mut Core, id: WorkerId, name: &str, speed: f64, now: u64) -> Vec<Action> {
        core.handle(
            Event::Joined {
                worker: id,
                info: JoinInfo {
                    name: name.into(),
                    backend: "flex".into(),
                    samples_per_s: speed,
                    local_shards: Vec::new(),
                },
            },
            now,
        )
    }

    fn update(core: &Core, round: u64, scale: f32, seed: u64) -> ArrivedUpdate {
        let mut rng = Rng::new(seed);
        let values: Vec<f32> = (0..core.update_len())
            .map(|_| scale * 1e-3 * rng.normal() as f32)
            .collect();
        ArrivedUpdate {
            round,
            blob: BlobId([seed as u8; 32]),
            bytes: 100,
            samples: 32,
            steps: 4,
            loss: RoundLoss {
                mean: 1.0,
                first: 1.1,
                last: 0.9,
            },
            values,
        }
    }

    /// Delivers the seeded update `seed` (values scaled by `scale`) from `worker` for `round`.
    fn send(
        core: &mut Core,
        worker: WorkerId,
        round: u64,
        scale: f32,
        seed: u64,
        now: u64,
    ) -> Vec<Action> {
        let update = update(core, round, scale, seed);
        core.handle(Event::Update { worker, update }, now)
    }

    fn sent_to(actions: &[Action], worker: WorkerId) -> Vec<&ServerMsg> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { worker: w, msg } if *w == worker => Some(msg),
                _ => None,
            })
            .collect()
    }

    /// The snapshot blob the actions store, if any (a round closed).
    fn snapshot_stored(actions: &[Action]) -> Option<Vec<u8>> {
        actions.iter().find_map(|a| match a {
            Action::StoreBlob {
                what: "snapshot",
                bytes,
            } => Some(bytes.clone()),
            _ => None,
        })
    }

    fn assignment(actions: &[Action], worker: WorkerId) -> Vec<Hash> {
        sent_to(actions, worker)
            .into_iter()
            .find_map(|m| match m {
                ServerMsg::ShardAssignment { shards, .. } => Some(shards.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_round_starts_with_enough_workers_and_closes_when_all_updates_are_in() {
        for policy in [TargetPolicy::LocalEma, TargetPolicy::CoordinatorEma] {
            a_round_runs(policy);
        }
    }

    fn a_round_runs(policy: TargetPolicy) {
        let (mut core, _) = setup(policy);
        let a = join(&mut core, 1, "uni-a", 30.0, 0);
        assert!(matches!(sent_to(&a, 1)[0], ServerMsg::Registered { .. }));
        assert_eq!(sent_to(&a, 1).len(), 1, "no round with one worker");
        let b = join(&mut core, 2, "uni-b", 10.0, 5);
        // Both get the announce; shards are split 3:1 by throughput, none twice.
        let (sa, sb) = (assignment(&b, 1), assignment(&b, 2));
        assert_eq!((sa.len(), sb.len()), (3, 1));
        assert!(sa.iter().all(|s| !sb.contains(s)));
        let before = core.params().hash();
        let start = core.params().clone();

        let acts = send(&mut core, 1, 0, 1.0, 1, 50);
        // Persist comes before the acknowledgement.
        assert!(matches!(
            acts[0],
            Action::Persist(LogEntry::UpdateAccepted { .. })
        ));
        assert!(matches!(sent_to(&acts, 1)[0], ServerMsg::Ack { of: 0 }));
        assert_eq!(core.round(), 0);
        let acts = send(&mut core, 2, 0, 1.0, 2, 60);
        assert_eq!(core.round(), 1);
        assert_ne!(core.params().hash(), before);
        let summary = acts
            .iter()
            .find_map(|a| match a {
                Action::RoundClosed(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(summary.accepted.len(), 2);
        assert_eq!(summary.samples, 64);
        // The next round's announce offers the delta from the state both workers hold, and the
        // delta reconstructs the coordinator's parameters bit for bit.
        let (delta_bytes, announce) = (
            acts.iter()
                .find_map(|a| match a {
                    Action::StoreBlob {
                        what: "state delta",
                        bytes,
                    } => Some(bytes.clone()),
                    _ => None,
                })
                .unwrap(),
            sent_to(&acts, 1)
                .into_iter()
                .find_map(|m| match m {
                    ServerMsg::RoundAnnounce {
                        round: 1,
                        delta,
                        params,
                        ..
                    } => Some((*delta, *params)),
                    _ => None,
                })
                .unwrap(),
        );
        let delta = announce.0.expect("delta offered");
        assert_eq!(delta.base, before);
        assert_eq!(BlobId::of(&delta_bytes).0, delta.blob);
        assert_eq!(announce.1, core.params().hash());
        // Under coordinator EMA the target is not in the delta: the worker takes the same EMA
        // step itself and lands on the same hash.
        assert_eq!(
            delta.target_momentum.is_some(),
            policy == TargetPolicy::CoordinatorEma
        );
        let rebuilt = start
            .after_delta(&delta_bytes, delta.target_momentum)
            .unwrap();
        assert_eq!(rebuilt.hash(), announce.1);
        assert!(!acts.iter().any(|a| matches!(a, Action::Checkpoint { .. })));
    }

    #[test]
    fn after_the_final_flush_the_parameters_hold_every_update() {
        use crate::aggregate::OuterConfig;
        use amity_shared::codec::{CodecSpec, ErrorFeedback};
        let run = Config::preset("tiny").unwrap();
        let (ml, tl) = layouts(&run);
        let model = init_params(&ml, 1);
        let target = model[..tl.total].to_vec();
        let start = GlobalParams { model, target };
        let mut cfg = CoreConfig::new(run);
        cfg.target_policy = TargetPolicy::LocalEma;
        // Plain averaging, so that the dense aggregate is a sum of round means.
        cfg.outer = OuterConfig {
            lr: 1.0,
            momentum: 0.0,
            nesterov: false,
        };
        cfg.codec = "topk0.05+int8".parse().unwrap();
        cfg.downlink_codec = "topk0.1+int8".parse().unwrap();
        cfg.rounds.min_workers = 2;
        cfg.rounds.steps = 4;
        cfg.rounds.max_rounds = 4;
        cfg.checkpoint_every = 0;
        let (mut core, _) = Core::new(cfg.clone(), start.clone(), &[]);
        join(&mut core, 1, "uni-a", 1.0, 0);
        let acts = join(&mut core, 2, "uni-b", 1.0, 0);
        let flush_announced = |acts: &[Action]| {
            sent_to(acts, 1).into_iter().find_map(|m| match m {
                ServerMsg::RoundAnnounce { flush, .. } => Some(*flush),
                _ => None,
            })
        };
        assert_eq!(flush_announced(&acts), Some(false));
        let parts = core.update_parts();
        let mut feedback = [ErrorFeedback::new(), ErrorFeedback::new()];
        let mut dense = vec![0.0f64; core.update_len()];
        let mut sent_before_flush = vec![0.0f64; core.update_len()];
        for round in 0..4 {
            let flush = core.is_flush_round(round);
            assert_eq!(flush, round == 3);
            let mut acts = Vec::new();
            for (w, fb) in feedback.iter_mut().enumerate() {
                let mut u = update(&core, round, 1.0, 10 * round + w as u64 + 1);
                for (d, v) in dense.iter_mut().zip(&u.values) {
                    *d += 0.5 * *v as f64;
                }
                let spec: CodecSpec = if flush { cfg.codec.dense() } else { cfg.codec };
                let (wire, sent) = fb.encode_parts(&spec, &u.values, &parts);
                if !flush {
                    for (d, v) in sent_before_flush.iter_mut().zip(&sent) {
                        *d += 0.5 * *v as f64;
                    }
                }
                u.values = codec::decode_parts(&wire, &parts).unwrap();
                let worker = w as u64 + 1;
                acts = core.handle(Event::Update { worker, update: u }, 10 + round);
            }
            if round < 3 {
                assert_eq!(flush_announced(&acts), Some(round + 1 == 3));
            }
        }
        assert!(core.finished());
        let want: Vec<f64> = start
            .concat()
            .iter()
            .zip(&dense)
            .map(|(p, d)| *p as f64 - d)
            .collect();
        let biggest = dense.iter().fold(0.0f64, |m, d| m.max(d.abs()));
        let error = |got: &[f32]| {
            got.iter()
                .zip(&want)
                .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        };
        // Within int8 precision of the dense aggregate ...
        let after = error(&core.params().concat());
        assert!(after < 0.02 * biggest, "error {after:e} of {biggest:e}");
        // ... while top-k alone had delivered only part of it.
        let missing = dense
            .iter()
            .zip(&sent_before_flush)
            .fold(0.0f64, |m, (d, s)| m.max((d - s).abs()));
        assert!(missing > 0.3 * biggest, "{missing:e} of {biggest:e}");
    }

    #[test]
    fn a_silent_worker_does_not_stall_the_round_and_its_shards_return() {
        let (mut core, _) = setup(TargetPolicy::CoordinatorEma);
        join(&mut core, 1, "a", 10.0, 0);
        let acts = join(&mut core, 2, "b", 10.0, 0);
        let lost = assignment(&acts, 2);
        send(&mut core, 1, 0, 1.0, 1, 100);
        // Heartbeats keep both alive; b never delivers.
        core.handle(Event::Heartbeat { worker: 2 }, 1500);
        assert_eq!(core.round(), 0);
        let acts = core.handle(Event::Tick, 2001);
        assert_eq!(core.round(), 1);
        let s = core.history()[0].clone();
        assert_eq!(
            (s.accepted, s.missing),
            (vec!["a".to_string()], vec!["b".to_string()])
        );
        // b's shards are handed out first in the next round.
        let next: Vec<Hash> = [1, 2].iter().flat_map(|w| assignment(&acts, *w)).collect();
        assert!(
            lost.iter().all(|s| next.contains(s)),
            "{lost:?} vs {next:?}"
        );

        // A worker that stops sending heartbeats is dropped and the round closes without it.
        send(&mut core, 1, 1, 1.0, 3, 2100);
        core.handle(Event::Heartbeat { worker: 1 }, 17_000);
        assert_eq!(
            core.round(),
            2,
            "b timed out, a's update completes the round"
        );
        assert_eq!(core.workers(), vec![(1, "a".to_string())]);
    }

    #[test]
    fn poisoned_and_huge_updates_are_rejected_and_leave_the_model_unharmed() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        join(&mut core, 1, "a", 10.0, 0);
        join(&mut core, 2, "b", 10.0, 0);
        join(&mut core, 3, "evil", 10.0, 0);
        // Round 0 had only a and b (min 2 reached at b's join); let it close.
        send(&mut core, 1, 0, 1.0, 1, 10);
        send(&mut core, 2, 0, 1.0, 2, 10);
        assert_eq!(core.round(), 1);
        let mut nan = update(&core, 1, 1.0, 3);
        nan.values[5] = f32::NAN;
        core.handle(
            Event::Update {
                worker: 3,
                update: nan,
            },
            20,
        );
        send(&mut core, 1, 1, 1.0, 4, 20);
        send(&mut core, 2, 1, 1.0, 5, 20);
        let s = core.history()[1].clone();
        assert_eq!(s.accepted, vec!["a", "b"]);
        assert_eq!(s.rejected[0].0, "evil");
        assert!(core.params().model.iter().all(|v| v.is_finite()));
        // A 100x update is rejected too, even when it is the only one besides one honest update.
        send(&mut core, 3, 2, 100.0, 6, 30);
        send(&mut core, 1, 2, 1.0, 7, 30);
        send(&mut core, 2, 2, 1.0, 8, 30);
        let s = core.history()[2].clone();
        assert_eq!(s.rejected.len(), 1);
        // An update the shell could not decode counts as rejected and does not hold the round.
        send(&mut core, 1, 3, 1.0, 9, 40);
        send(&mut core, 2, 3, 1.0, 10, 40);
        assert_eq!(core.round(), 3);
        core.handle(
            Event::UpdateRefused {
                worker: 3,
                round: 3,
                reason: "int8 block scale NaN".into(),
            },
            41,
        );
        assert_eq!(core.round(), 4);
        let s = core.history()[3].clone();
        assert_eq!(
            s.rejected,
            vec![("evil".to_string(), "int8 block scale NaN".to_string())]
        );
        assert!(s.missing.is_empty());
        let huge = &core.history()[2].rejected;
        assert!(huge[0].1.contains("reference"), "{huge:?}");
        assert_eq!(core.provenance()["evil"].rejected, 3);
        assert_eq!(core.provenance()["a"].updates, 4);
    }

    /// Security review H1: with one or two workers, a claimed `u64::MAX` samples and values
    /// near `f32::MAX` neither panic the core nor reach the parameters, also on replay.
    #[test]
    fn one_hostile_worker_of_two_cannot_take_over_or_crash_the_core() {
        let finite = |core: &Core| {
            let p = core.params();
            p.model.iter().chain(&p.target).all(|v| v.is_finite())
        };
        let greedy = |core: &Core| {
            let mut u = update(core, 0, 1.0, 3);
            u.samples = u64::MAX;
            Event::Update {
                worker: 2,
                update: u,
            }
        };
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        join(&mut core, 1, "honest", 10.0, 0);
        join(&mut core, 2, "evil", 10.0, 0);
        // Round 0: the claim is refused, and that refusal is evil's delivery for the round.
        let acts = core.handle(greedy(&core), 5);
        let refusal = sent_to(&acts, 2);
        assert!(
            matches!(refusal[..], [ServerMsg::Error { code: ErrorCode::Malformed, message }]
                if message.contains("samples")),
            "{refusal:?}"
        );
        send(&mut core, 1, 0, 1.0, 1, 10);
        assert_eq!(core.round(), 1);
        let s = &core.history()[0];
        assert_eq!(s.accepted, ["honest"]);
        assert!(s.rejected[0].1.contains("claims"), "{s:?}");
        // Round 1: values near f32::MAX.
        let mut huge = update(&core, 1, 1.0, 4);
        huge.values
            .iter_mut()
            .for_each(|v| *v = 3e38_f32.copysign(*v));
        let journalled = core.handle(
            Event::Update {
                worker: 2,
                update: huge.clone(),
            },
            12,
        );
        send(&mut core, 1, 1, 1.0, 2, 14);
        assert_eq!(core.round(), 2);
        let s = &core.history()[1];
        assert_eq!(s.accepted, ["honest"]);
        assert!(s.rejected[0].1.contains("root-mean-square"), "{s:?}");
        assert!(finite(&core));

        // Replayed after a restart, the logged update is screened out again, without a panic.
        let entry = journalled
            .iter()
            .find_map(|a| match a {
                Action::Persist(e @ LogEntry::UpdateAccepted { .. }) => Some(e.clone()),
                _ => None,
            })
            .expect("the update was journalled");
        let (mut replayed, _) = setup(TargetPolicy::LocalEma);
        join(&mut replayed, 1, "honest", 10.0, 0);
        join(&mut replayed, 2, "evil", 10.0, 0);
        replayed.handle(greedy(&replayed), 5);
        send(&mut replayed, 1, 0, 1.0, 1, 10);
        replayed.replay_update(&entry, huge.values.clone());
        send(&mut replayed, 1, 1, 1.0, 2, 14);
        assert_eq!(replayed.round(), 2);
        assert_eq!(replayed.params_hash(), core.params_hash());

        // With the screens switched off, the outer step itself overflows: it is dropped, the
        // parameters stay as they were and the round still closes.
        let (mut open, _) = setup(TargetPolicy::LocalEma);
        open.cfg.aggregation.max_rms = f64::INFINITY;
        open.cfg.aggregation.reject_ratio = f64::INFINITY;
        join(&mut open, 1, "evil", 10.0, 0);
        join(&mut open, 2, "evil2", 10.0, 0);
        let before = open.params_hash();
        for w in [1, 2] {
            let mut u = update(&open, 0, 1.0, w);
            u.values.iter_mut().for_each(|v| *v = 3e38);
            open.handle(
                Event::Update {
                    worker: w,
                    update: u,
                },
                10,
            );
        }
        assert_eq!(open.round(), 1);
        let s = &open.history()[0];
        assert!(s.accepted.is_empty(), "{s:?}");
        assert!(
            s.rejected.iter().all(|(_, why)| why.contains("not finite")),
            "{s:?}"
        );
        assert_eq!(open.params_hash(), before);
        assert!(finite(&open));
    }

    /// A held-out loss for tests: the squared distance of the model to a goal.
    #[derive(Debug)]
    struct DistanceTo(Vec<f32>);

    impl HeldOutLoss for DistanceTo {
        fn loss(&mut self, model: &[f32], _target: &[f32]) -> f64 {
            let d: f64 = model
                .iter()
                .zip(&self.0)
                .map(|(m, g)| ((m - g) as f64).powi(2))
                .sum();
            d / model.len() as f64 + 1e-9
        }
    }

    /// Contribution scoring: a flipped update at the honest norm passes every norm screen but
    /// raises the held-out loss, and is rejected with the reason; the scores reach the summary
    /// and the provenance.
    #[test]
    fn an_update_that_raises_the_held_out_loss_is_rejected() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        join(&mut core, 1, "honest", 10.0, 0);
        join(&mut core, 2, "flipped", 10.0, 0);
        let honest = update(&core, 0, 30.0, 1);
        let m = core.params().model.len();
        // The goal lies where the honest update leads.
        let goal: Vec<f32> = core
            .params()
            .model
            .iter()
            .zip(&honest.values[..m])
            .map(|(p, d)| p - d)
            .collect();
        core.set_scorer(Box::new(DistanceTo(goal)));
        let mut flipped = honest.clone();
        flipped.values.iter_mut().for_each(|v| *v = -*v);
        core.handle(
            Event::Update {
                worker: 1,
                update: honest,
            },
            10,
        );
        core.handle(
            Event::Update {
                worker: 2,
                update: flipped,
            },
            10,
        );
        assert_eq!(core.round(), 1);
        let s = &core.history()[0];
        assert_eq!(s.accepted, ["honest"]);
        assert_eq!(s.rejected[0].0, "flipped");
        assert!(s.rejected[0].1.contains("held-out loss"), "{s:?}");
        let score = |name: &str| s.scores.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(
            score("honest") < 0.0 && score("flipped") > 0.02,
            "{:?}",
            s.scores
        );
        assert!(s.held_out_loss.is_some_and(|l| l > 0.0));
        assert_eq!(core.provenance()["flipped"].scored, 1);
        assert!(core.provenance()["honest"].loss_change < 0.0);
    }

    #[test]
    fn late_updates_are_dropped_by_default() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        join(&mut core, 1, "a", 10.0, 0);
        join(&mut core, 2, "b", 10.0, 0);
        send(&mut core, 1, 0, 1.0, 1, 10);
        core.handle(Event::Tick, 5000);
        assert_eq!(core.round(), 1);
        let acts = send(&mut core, 2, 0, 1.0, 2, 5001);
        assert!(matches!(
            sent_to(&acts, 2)[0],
            ServerMsg::Error {
                code: ErrorCode::Unexpected,
                ..
            }
        ));
        assert!(!acts.iter().any(|a| matches!(a, Action::Persist(_))));
    }

    #[test]
    fn a_restored_core_resumes_with_the_same_parameters_and_replayed_updates() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        join(&mut core, 1, "a", 10.0, 0);
        join(&mut core, 2, "b", 10.0, 0);
        send(&mut core, 1, 0, 1.0, 1, 10);
        let acts = send(&mut core, 2, 0, 1.0, 2, 10);
        let snap_bytes = snapshot_stored(&acts).unwrap();
        // An update of round 1 was accepted before the crash.
        let acts = send(&mut core, 1, 1, 1.0, 3, 20);
        let Action::Persist(entry) = acts[0].clone() else {
            panic!("{acts:?}")
        };

        let snap = Snapshot::from_bytes(&snap_bytes).unwrap();
        let (mut again, _) = Core::restore(core.config().clone(), snap).unwrap();
        // A snapshot of another model is refused, not restored.
        let mut other = core.config().clone();
        other.run.model.width *= 2;
        let err = Core::restore(other, core.snapshot()).unwrap_err();
        assert!(err.to_string().contains("run config"), "{err}");
        assert_eq!(again.round(), 1);
        assert_eq!(again.params().hash(), core.params().hash());
        again.replay_update(&entry, update(&core, 1, 1.0, 3).values);
        // Both continue identically: b's update closes round 1 with a's replayed one.
        join(&mut again, 11, "a", 10.0, 100);
        join(&mut again, 12, "b", 10.0, 100);
        send(&mut again, 12, 1, 1.0, 4, 120);
        send(&mut core, 2, 1, 1.0, 4, 30);
        assert_eq!(again.round(), 2);
        assert_eq!(again.params().hash(), core.params().hash());

        assert!(Snapshot::from_bytes(&snap_bytes[..snap_bytes.len() - 1]).is_err());
        assert!(Snapshot::from_bytes(b"AMSN").is_err());
    }

    /// A round in which every update was rejected has no loss (NaN: `null` in JSON), and a
    /// worker may report a NaN loss: snapshots and log entries holding them must still restore.
    /// (Found by the storage-fault test: such a snapshot failed the restart.)
    #[test]
    fn snapshots_and_log_entries_with_nan_statistics_restore() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        join(&mut core, 1, "a", 10.0, 0);
        join(&mut core, 2, "b", 10.0, 0);
        let mut acts = Vec::new();
        for (worker, seed) in [(1, 1), (2, 2)] {
            let mut bad = update(&core, 0, 1.0, seed);
            bad.values[0] = f32::NAN;
            bad.loss.mean = f64::NAN;
            acts = core.handle(
                Event::Update {
                    worker,
                    update: bad,
                },
                10,
            );
        }
        let snap = snapshot_stored(&acts).expect("the round closed");
        let snap = Snapshot::from_bytes(&snap).unwrap();
        assert!(snap.meta.history[0].accepted.is_empty());
        assert!(snap.meta.history[0].loss.is_nan());
        let (again, _) = Core::restore(core.config().clone(), snap).unwrap();
        assert_eq!(again.params().hash(), core.params().hash());
        let entry = LogEntry::UpdateAccepted {
            round: 0,
            trained_round: 0,
            from: "a".into(),
            blob: BlobId([1; 32]),
            bytes: 1,
            samples: 1,
            steps: 1,
            loss: RoundLoss {
                mean: f64::NAN,
                first: f64::INFINITY,
                last: 1.0,
            },
            shards: vec![],
        };
        let back: LogEntry = serde_json::from_slice(&serde_json::to_vec(&entry).unwrap()).unwrap();
        let LogEntry::UpdateAccepted { loss, .. } = back else {
            panic!("{back:?}")
        };
        assert!(loss.mean.is_nan() && loss.first.is_nan() && loss.last == 1.0);
    }

    /// Security review M4: registrations cannot grow the shard plan without bound, and a
    /// claimed throughput cannot take every shard of a round.
    #[test]
    fn claims_at_registration_are_bounded() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        core.cfg.rounds.min_workers = 3;
        core.cfg.rounds.shards_per_round = 100;
        let fake = |from: u32| -> Vec<ShardInfo> {
            (from..from + 3000)
                .map(|i| {
                    let mut id = [0u8; 32];
                    id[..4].copy_from_slice(&i.to_le_bytes());
                    id[31] = 0xaa;
                    ShardInfo {
                        id: BlobId(id),
                        clips: 1 << 24,
                    }
                })
                .collect()
        };
        for (worker, from) in [(1, 0), (2, 3000)] {
            core.handle(
                Event::Joined {
                    worker,
                    info: JoinInfo {
                        name: "squatter".into(),
                        backend: "flex".into(),
                        samples_per_s: 1e12,
                        local_shards: fake(from),
                    },
                },
                0,
            );
        }
        let owned = |core: &Core, name: &str| {
            core.plan()
                .shards
                .values()
                .filter(|(_, o)| o.as_deref() == Some(name))
                .count()
        };
        assert_eq!(owned(&core, "squatter"), MAX_LOCAL_SHARDS);
        // Beside two workers that claim 10 clips/s, a claim of 1e12 counts as 80: 80 of the
        // round's 100 shards at most, not all of them.
        core.handle(Event::Left { worker: 2 }, 1);
        join(&mut core, 3, "a", 10.0, 1);
        let acts = join(&mut core, 4, "b", 10.0, 1);
        let greedy = assignment(&acts, 1).len();
        assert!((1..=80).contains(&greedy), "{greedy}");
    }

    #[test]
    fn institutions_own_their_local_shards() {
        let (mut core, _) = setup(TargetPolicy::LocalEma);
        let private = ShardInfo {
            id: BlobId([0xee; 32]),
            clips: 5,
        };
        core.handle(
            Event::Joined {
                worker: 1,
                info: JoinInfo {
                    name: "hospital".into(),
                    backend: "flex".into(),
                    samples_per_s: 1.0,
                    local_shards: vec![private],
                },
            },
            0,
        );
        // Its clips join the corpus's count (six shards of ten, and five).
        assert_eq!(core.plan().clips(), 65);
        let mut seen_by_other = false;
        let mut seen_by_owner = false;
        join(&mut core, 2, "other", 100.0, 0);
        for r in 0..6 {
            // Every round the owner trains one shard; the fast worker gets the rest.
            let acts = core.handle(Event::Tick, 2001 + r * 3000);
            for (w, s) in [(1, &mut seen_by_owner), (2, &mut seen_by_other)] {
                if assignment(&acts, w).contains(&private.id.0) {
                    *s = true;
                }
            }
            core.handle(Event::Heartbeat { worker: 1 }, 2002 + r * 3000);
            core.handle(Event::Heartbeat { worker: 2 }, 2002 + r * 3000);
        }
        assert!(seen_by_owner && !seen_by_other);
        // When the institution leaves, its shard leaves the plan (no squatting across
        // sessions); it is back when the institution registers again.
        core.handle(Event::Left { worker: 1 }, 30_000);
        assert_eq!(core.plan().clips(), 60);
        assert!(!core.plan().queue.contains(&private.id));
        core.handle(
            Event::Joined {
                worker: 3,
                info: JoinInfo {
                    name: "hospital".into(),
                    backend: "flex".into(),
                    samples_per_s: 1.0,
                    local_shards: vec![private],
                },
            },
            30_001,
        );
        assert_eq!(core.plan().clips(), 65);
    }

    /// Two sessions of one institution (review L3): the round counts one update per
    /// institution, and what the other session was assigned goes back to the queue, whether it
    /// sent nothing or its update was replaced by the other's.
    #[test]
    fn shards_of_a_second_session_of_an_institution_are_not_lost() {
        for replaced in [false, true] {
            let (mut core, _) = setup(TargetPolicy::LocalEma);
            core.cfg.rounds.min_workers = 3;
            core.cfg.rounds.shards_per_round = 3;
            join(&mut core, 1, "uni-a", 10.0, 0);
            join(&mut core, 2, "uni-a", 10.0, 1);
            let acts = join(&mut core, 3, "uni-b", 10.0, 2);
            let shards: Vec<Vec<Hash>> = (1..=3).map(|w| assignment(&acts, w)).collect();
            assert!(shards.iter().all(|s| s.len() == 1), "{shards:?}");
            send(&mut core, 1, 0, 1.0, 1, 10);
            if replaced {
                send(&mut core, 2, 0, 1.0, 2, 11);
            }
            let acts = send(&mut core, 3, 0, 1.0, 3, 12);
            assert!(matches!(
                acts.last(),
                Some(Action::Send {
                    msg: ServerMsg::ShardAssignment { round: 1, .. },
                    ..
                })
            ));
            let (lost, trained) = if replaced { (0, 1) } else { (1, 0) };
            // Back in the queue, or already handed out again by the next round.
            let again: Vec<Hash> = (1..=3).flat_map(|w| assignment(&acts, w)).collect();
            let id = shards[lost][0];
            assert!(
                core.plan().queue.contains(&BlobId(id)) || again.contains(&id),
                "replaced: {replaced}"
            );
            assert!(!core.plan().covered.contains(&BlobId(id)));
            for w in [trained, 2] {
                assert!(core.plan().covered.contains(&BlobId(shards[w][0])));
            }
        }
    }
}
