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

mod command;
mod log;
mod operator;
mod round;
mod shard_plan;
mod snapshot;
#[cfg(test)]
mod tests;
mod view;

pub use command::{BadCommand, Command, LoggedEvent, UpdateRef};
pub use log::{DETAIL_ENTRIES, DETAIL_ROUNDS, LogEntry, Provenance, RoundSummary, ThinnedCounts};
pub use operator::{OperatorAction, OperatorState};
pub use shard_plan::ShardPlan;
pub use snapshot::{LiveState, Snapshot, SnapshotError, SnapshotMeta};
pub use view::SessionView;

use std::collections::{BTreeMap, BTreeSet};

use amity_protocol::message::{ErrorCode, RoundAnnounce, ServerMsg, StateDelta};
use amity_shared::checkpoint::Checkpoint;
use amity_shared::federated::codec::ErrorFeedback;
use amity_shared::federated::{GlobalParams, LossStats, RunProgress, TargetPolicy};
use amity_shared::store::BlobId;
use serde::{Deserialize, Serialize};

use crate::aggregate::{self, Candidate, OuterOptimizer};
pub use crate::aggregate::{ReadUpdate, UpdateValues};
use crate::config::{CoreConfig, LatePolicy};
use crate::scoring::HeldOutLoss;
use amity_shared::stats::lower_median;

/// A worker's session id, assigned by the shell (one per connection that registered; a worker
/// that reconnects gets a new one). It is also the worker's id in the run, which `Registered`
/// tells it and its batch and mask seeds mix in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// What a worker declared when it joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub loss: LossStats,
    /// The pseudo-gradient (model, then target under the local-EMA policy), decoded and
    /// validated by the shell: held, or read back from its store when the round closes.
    pub values: UpdateValues,
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
    /// An operator decided something ([`OperatorAction`]).
    Operator(OperatorAction),
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
    /// The operator's decisions changed (or, at start-up, are these): apply what the shell
    /// enforces (revoked names).
    Operator(OperatorState),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WorkerState {
    info: JoinInfo,
    last_seen_ms: u64,
    /// Parameters hash of the state it was last sent.
    holds: Option<BlobId>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// The coordinator's state machine.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    round: u64,
    phase: Phase,
    params: GlobalParams,
    /// `params.hash()`, kept in step with `params` (hashing them is not free).
    params_hash: BlobId,
    outer: OuterOptimizer,
    /// Error feedback of the state deltas: what the downlink codec held back so far.
    downlink: ErrorFeedback,
    /// Blob id of the checkpoint form of `params` (what workers without a base fetch).
    state_blob: BlobId,
    last_delta: Option<(BlobId, BlobId)>,
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
    init_hash: BlobId,
    /// Measures each update's effect on held-out clips (contribution scoring), when set.
    scorer: Option<Box<dyn HeldOutLoss>>,
    /// The operator's standing decisions (pause, revoked names).
    operator: OperatorState,
}

const NORM_HISTORY: usize = 32;

/// What the coordinator says (with [`ErrorCode::Finished`], in an error message and as the
/// connection close reason) when `max_rounds` are done: workers exit instead of reconnecting.
pub const FINISHED_REASON: &str = "training finished";

/// A round's totals over its accepted updates.
#[derive(Debug, Default)]
struct Tally {
    samples: u64,
    steps: u64,
    /// Sum of mean losses weighted by samples.
    loss_sum: f64,
    /// Sum of mean predict-the-mean baselines weighted by samples.
    baseline_sum: f64,
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
            downlink: ErrorFeedback::new(),
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
            operator: OperatorState::default(),
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
            downlink: ErrorFeedback::with_residual(snap.down_residual),
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
            operator: snap.meta.operator,
        };
        if core.cfg.rounds.max_rounds > 0 && core.round >= core.cfg.rounds.max_rounds {
            core.phase = Phase::Finished;
        }
        if let Some(live) = snap.meta.live {
            core.workers = live.workers.into_iter().collect();
            core.phase = live.phase;
            core.refused = live.refused;
            core.now_ms = live.now_ms;
            core.started_any = live.started_any;
        }
        let mut out = Vec::new();
        core.store_state(&mut out);
        out.push(Action::Operator(core.operator.clone()));
        Ok((core, out))
    }

    /// Re-adds an update that the log says was accepted before a restart.
    pub fn replay_update(&mut self, entry: &LogEntry, values: impl Into<UpdateValues>) {
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
                    values: values.into(),
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
    pub fn params_hash(&self) -> BlobId {
        self.params_hash
    }

    /// The time of the last event it handled (ms; logged time on a replica).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
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
            Event::Joined { worker, info } => {
                self.on_join(worker, info, &mut out);
                self.rejoin_round(worker, &mut out);
            }
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
            Event::Operator(action) => self.on_operator(action, &mut out),
            Event::Tick => {}
        }
        self.expire_silent();
        self.advance(&mut out);
        out
    }

    fn on_join(&mut self, worker: WorkerId, info: JoinInfo, out: &mut Vec<Action>) {
        // The shell tells the sessions open when the run ends that it has; one that joins
        // later (a worker that lost its connection, or followed a redirect to a new leader,
        // as the run ended) would otherwise be registered and wait for a round that never
        // comes.
        if self.finished() {
            out.push(Action::Send {
                worker,
                msg: ServerMsg::Error {
                    code: ErrorCode::Finished,
                    message: FINISHED_REASON.into(),
                },
            });
            return;
        }
        // The shell refuses revoked names at the handshake; one that registered before the
        // revocation reached it is turned away here.
        if self.operator.revoked.contains(&info.name) {
            out.push(Action::Send {
                worker,
                msg: ServerMsg::Error {
                    code: ErrorCode::Revoked,
                    message: format!("{} is revoked by the operator", info.name),
                },
            });
            return;
        }
        let mut owned = self
            .plan
            .shards
            .values()
            .filter(|(_, owner)| owner.as_deref() == Some(info.name.as_str()))
            .count();
        for s in &info.local_shards {
            if owned >= MAX_LOCAL_SHARDS {
                tracing::warn!(
                    worker = worker.0,
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
            worker = worker.0,
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
                worker: worker.0,
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
        tracing::info!(worker = worker.0, name = %w.info.name, "worker {why}");
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
            tracing::warn!(worker = worker.0, %name, "update refused: {message}");
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
        if self.cfg.journal {
            out.push(Action::Persist(entry));
        }
        out.push(Action::Send {
            worker,
            msg: ServerMsg::Ack { of: u.round },
        });
        let budget = self.cfg.rounds.time_budget_ms();
        if staleness == 0 && budget > 0 {
            // Time-budgeted: the round itself measures what the worker delivers per second
            // (capped at the step budget, if any), which the next assignment follows.
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
                Phase::Idle if self.operator.paused => return,
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
                    // With every session gone, the round waits for its deadline: they may join
                    // again (a lost connection, a new coordinator replica leading) and deliver.
                    // (A set, not a scan per session: with a thousand workers the scans made
                    // every arrival cost O(workers^2).)
                    let delivered: BTreeSet<&str> = (self.received.iter().map(|p| p.from.as_str()))
                        .chain(self.refused.iter().map(|(n, _)| n.as_str()))
                        .collect();
                    let all_in = !expected.is_empty()
                        && expected.iter().all(|id| {
                            self.workers
                                .get(id)
                                .is_some_and(|w| delivered.contains(w.info.name.as_str()))
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

    /// A snapshot that also holds the sessions and the round under way ([`LiveState`]), so a
    /// replica restored from it applies the next commands exactly as the others do. `None` while
    /// an update of the open round is pending (its values would not fit a small snapshot): the
    /// replica's shell tries again after a later command.
    pub fn replica_snapshot(&self) -> Option<Snapshot> {
        let live = self.live_state()?;
        let mut snap = self.snapshot();
        snap.meta.live = Some(live);
        Some(snap)
    }

    /// [`Core::replica_snapshot`]'s bytes, naming the global-state blob for the parameters as
    /// [`Core::snapshot_bytes`] does (a replica that pulls it pulls that blob too).
    pub fn replica_snapshot_bytes(&self) -> Option<Vec<u8>> {
        Some(self.named_snapshot_bytes(Some(self.live_state()?)))
    }

    /// The sessions and phase, or `None` while an update is pending.
    fn live_state(&self) -> Option<LiveState> {
        if !self.received.is_empty() {
            return None;
        }
        Some(LiveState {
            workers: self.workers.iter().map(|(k, v)| (*k, v.clone())).collect(),
            phase: self.phase.clone(),
            refused: self.refused.clone(),
            now_ms: self.now_ms,
            started_any: self.started_any,
        })
    }
}
