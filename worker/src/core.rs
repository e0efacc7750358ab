//! The worker's decisions, without I/O (like `quinn-proto`, and like the coordinator's core).
//!
//! [`WorkerCore::handle`] takes an [`Input`] (the connection came up, a message arrived, a
//! fetch or a training job finished, the heartbeat timer fired, Ctrl-C) with the time, and
//! returns the [`WorkerAction`]s to carry out **in order**: connect, send a message, fetch a
//! blob, train, store an update, finish. The async shell (`run.rs`) only moves bytes and runs
//! the training job; every behaviour (registration, reconnecting with the optimiser state and
//! the error-feedback residual kept, delta reconstruction, faults, Ctrl-C) is tested here
//! without sockets.
//!
//! Some actions are requests the shell answers with one input: [`WorkerAction::Fetch`] with
//! [`Input::Fetched`], [`WorkerAction::PrepareShards`] with [`Input::ShardsReady`],
//! [`WorkerAction::MeasureThroughput`] with [`Input::Throughput`] and [`WorkerAction::Train`]
//! with [`Input::Trained`]. When the shell cannot carry an action out (the connection drops, a
//! cache write fails), it drops the actions after it and answers [`Input::Lost`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::conn::HandshakeRefusal;
use amity_protocol::message::{
    Capabilities, ClientMsg, ErrorCode, LocalShard, RoundAnnounce, ServerMsg,
};
use amity_shared::checkpoint::Checkpoint;
use amity_shared::config::Config;
use amity_shared::federated::codec::{CodecSpec, ErrorFeedback};
use amity_shared::federated::{
    GlobalParams, LocalRoundOptions, LocalUpdate, RoundBudget, RunProgress, TargetPolicy,
};
use amity_shared::store::BlobId;

mod io;
mod report;

pub use io::{Disconnect, Input, TrainJob, WorkerAction};
pub use report::{WorkerGauges, WorkerSummary, human};

/// The first wait before reconnecting; it doubles on each failed attempt up to
/// [`MAX_BACKOFF`], and starts over once a connection is up.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// How often the shell feeds [`Input::Tick`] (the heartbeat period).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// The most bytes a shard may have: ingest cuts shards at 64 MiB by default; this bound only
/// keeps a broken or hostile server from filling the disk.
pub const MAX_SHARD_BYTES: u64 = 16 << 30;

/// What the core needs to know about this worker.
#[derive(Debug, Clone)]
pub struct CoreOptions {
    /// The compute backend's name (`flex`, `cuda`, ...), announced at registration.
    pub backend: String,
    /// The institution's own shards (id, clips), announced at registration.
    pub local_shards: Vec<(BlobId, u64)>,
    /// Step time multiplier standing in for slower hardware (demo and tests).
    pub slowdown: f64,
    /// Deliberate misbehaviour (tests only).
    pub fault: Option<Fault>,
    /// Report a line per round.
    pub progress: bool,
}

/// What registration settled for the session.
#[derive(Debug, Clone, Copy)]
struct Session {
    codec: CodecSpec,
    policy: TargetPolicy,
    /// The worker's id in the run (mixed into its batch and mask seeds).
    worker: u64,
}

/// A round from its announce to its upload.
#[derive(Debug)]
struct Round {
    /// What the coordinator announced.
    announce: RoundAnnounce,
    shards: Vec<BlobId>,
    /// When its shard assignment arrived (the time budget counts from there).
    started_ms: u64,
    /// The state it starts from, once held.
    start: Option<Arc<GlobalParams>>,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not connected (a connect is asked for or pending).
    Down,
    /// Hello sent, waiting for Welcome.
    Hello,
    /// Registering (throughput being measured, or Register sent).
    Registering,
    /// Registered: rounds come.
    Up,
}

/// Where the current round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Fetching the delta (then the full state if it does not reproduce the announced hash).
    Delta,
    /// Fetching the full state.
    State,
    /// Making the shards local.
    Shards,
    /// The training job runs.
    Training,
}

/// The worker's state machine.
#[derive(Debug)]
pub struct WorkerCore {
    opts: CoreOptions,
    link: Link,
    backoff: Duration,
    /// The run's config, from the first registration on (kept across reconnects).
    run: Option<Config>,
    session: Option<Session>,
    /// The global state held, and its parameters hash.
    params: Option<(Arc<GlobalParams>, BlobId)>,
    feedback: ErrorFeedback,
    summary: WorkerSummary,
    /// The announce waiting for its shard assignment.
    announced: Option<Round>,
    /// The round under way, and its step.
    current: Option<(Round, Step)>,
    /// A complete round (announce and shards) that arrived while the previous one was still
    /// training: it starts when that one ends.
    queued: Option<Round>,
    /// The last update offered and not acknowledged yet (its header; the blob stays in the
    /// cache): offered again when a new session (another coordinator replica, after a failover)
    /// announces the same round, since an update the old leader had not committed is not there.
    unacked: Option<ClientMsg>,
    /// Ctrl-C came while a training job ran: leave once it returns.
    stopping: bool,
    /// Heartbeat sequence number (increases over the worker's life).
    seq: u64,
    /// Throughput measured at the last registration.
    throughput: f32,
    /// When the running training job started, and the clips per second of the last one.
    training: (u64, Option<f32>),
    /// Blobs in the cache that belong to one round (states, deltas, our updates), by round:
    /// deleted two rounds on, so that a long run does not fill the disk. Shards stay (every
    /// epoch trains them again).
    transient: VecDeque<(u64, Vec<BlobId>)>,
    finished: bool,
}

impl WorkerCore {
    /// A worker that has not connected yet, and the action that connects it.
    pub fn new(opts: CoreOptions) -> (Self, Vec<WorkerAction>) {
        let core = WorkerCore {
            opts,
            link: Link::Down,
            backoff: FIRST_BACKOFF,
            run: None,
            session: None,
            params: None,
            feedback: ErrorFeedback::new(),
            summary: WorkerSummary::default(),
            announced: None,
            current: None,
            queued: None,
            unacked: None,
            stopping: false,
            seq: 0,
            throughput: 0.0,
            training: (0, None),
            transient: VecDeque::new(),
            finished: false,
        };
        (core, vec![WorkerAction::Connect])
    }

    /// What the worker did so far.
    pub fn summary(&self) -> &WorkerSummary {
        &self.summary
    }

    /// Where the worker stands now.
    pub fn gauges(&self) -> WorkerGauges {
        WorkerGauges {
            registered: self.link == Link::Up,
            round: self.current.as_ref().map(|(r, _)| r.announce.round),
            samples_per_s: self.training.1.unwrap_or(self.throughput),
        }
    }

    /// The error-feedback residual: what compression held back from the updates sent so far.
    pub fn residual(&self) -> &[f32] {
        self.feedback.residual()
    }

    /// Whether the core has asked to finish.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Handles one input at `now_ms` (milliseconds on any monotonic clock) and returns what to
    /// do, in order.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<WorkerAction> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match input {
            Input::Connected => {
                self.link = Link::Hello;
                self.backoff = FIRST_BACKOFF;
                out.push(WorkerAction::Send(ClientMsg::Hello {
                    protocol: PROTOCOL_VERSION,
                    software: format!("amity {}", env!("CARGO_PKG_VERSION")),
                }));
            }
            Input::Lost(d) => self.on_lost(d, &mut out),
            Input::Message(msg) => self.on_message(msg, now_ms, &mut out),
            Input::Throughput(clips_per_s) => {
                self.throughput = clips_per_s;
                if self.link == Link::Registering {
                    out.push(self.register());
                }
            }
            Input::Fetched {
                id,
                bytes,
                downloaded,
            } => {
                self.summary.bytes_down += downloaded;
                self.on_fetched(id, &bytes, now_ms, &mut out);
            }
            Input::ShardsReady { downloaded } => {
                self.summary.bytes_down += downloaded;
                if let Some((round, Step::Shards)) = self.current.take() {
                    self.training.0 = now_ms;
                    out.push(WorkerAction::Train(self.train_job(&round, now_ms)));
                    self.current = Some((round, Step::Training));
                }
            }
            Input::Trained(result) => self.on_trained(result, now_ms, &mut out),
            Input::Tick => {
                if self.link == Link::Up {
                    self.seq += 1;
                    out.push(WorkerAction::Send(ClientMsg::Heartbeat { seq: self.seq }));
                }
            }
            Input::Stop => {
                if matches!(self.current, Some((_, Step::Training))) {
                    // The job sees the stop flag between steps; we say goodbye when it returns.
                    self.stopping = true;
                } else {
                    self.leave(&mut out);
                }
            }
        }
        out
    }

    /// Says goodbye (when connected) and finishes.
    fn leave(&mut self, out: &mut Vec<WorkerAction>) {
        if self.link != Link::Down {
            out.push(WorkerAction::Send(ClientMsg::Goodbye));
            out.push(WorkerAction::Disconnect);
        }
        self.finish(Ok(()), out);
    }

    fn finish(&mut self, result: Result<(), WorkerError>, out: &mut Vec<WorkerAction>) {
        self.finished = true;
        out.push(WorkerAction::Finish(result));
    }

    fn on_lost(&mut self, d: Disconnect, out: &mut Vec<WorkerAction>) {
        let was_up = self.link != Link::Down;
        self.link = Link::Down;
        self.session = None;
        self.announced = None;
        self.queued = None;
        // A round that was fetching is abandoned; a training job runs on and its result is
        // dropped when it returns (its round went with the session).
        if !matches!(self.current, Some((_, Step::Training))) {
            self.current = None;
        }
        match d {
            Disconnect::Refused { refusal, detail } => {
                let why = refusal_text(refusal, &detail);
                self.finish(Err(WorkerError::Handshake(why)), out);
            }
            Disconnect::Lost {
                code: Some(ErrorCode::Finished),
                ..
            } => {
                tracing::info!("coordinator: training finished");
                self.finish(Ok(()), out);
            }
            Disconnect::Lost { why, .. } => {
                if self.stopping {
                    return self.finish(Ok(()), out);
                }
                tracing::warn!("connection lost: {why}; retrying in {:?}", self.backoff);
                if was_up {
                    out.push(WorkerAction::Disconnect);
                }
                out.push(WorkerAction::ConnectAfter(self.backoff));
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn register(&self) -> WorkerAction {
        WorkerAction::Send(ClientMsg::Register(Capabilities {
            backend: self.opts.backend.clone(),
            samples_per_s: self.throughput,
            local_shards: self
                .opts
                .local_shards
                .iter()
                .map(|&(id, clips)| LocalShard { id, clips })
                .collect(),
        }))
    }

    fn on_message(&mut self, msg: ServerMsg, now_ms: u64, out: &mut Vec<WorkerAction>) {
        match (self.link, msg) {
            (_, ServerMsg::Error { code, message }) => self.on_error(code, message, out),
            (Link::Hello, ServerMsg::Welcome { identity, .. }) => {
                tracing::info!(%identity, "connected");
                self.link = Link::Registering;
                match (&self.run, &self.current) {
                    // Not while a job trains: it would compete for the machine. The last
                    // measurement stands.
                    (Some(run), None) => {
                        out.push(WorkerAction::MeasureThroughput(Box::new(run.clone())))
                    }
                    // Until the run's config arrives, the first round measures us.
                    _ => out.push(self.register()),
                }
            }
            (
                Link::Registering,
                ServerMsg::Registered {
                    worker,
                    run,
                    codec,
                    target_policy,
                },
            ) => match settle(&run, &codec, &target_policy) {
                Ok((run, codec, policy)) => {
                    tracing::info!(worker, %codec, %policy, preset = %run.preset, "registered");
                    self.link = Link::Up;
                    self.session = Some(Session {
                        codec,
                        policy,
                        worker,
                    });
                    if self.run.as_ref() != Some(&run) {
                        // A new run: a fresh trainer, and its seeded initialisation is round
                        // 0's state, with no download.
                        let init = GlobalParams::seeded(&run);
                        let hash = init.hash();
                        self.params = Some((Arc::new(init), hash));
                        self.feedback = ErrorFeedback::new();
                        out.push(WorkerAction::NewTrainer(Box::new(run.clone())));
                        self.run = Some(run);
                    }
                }
                Err(why) => self.finish(Err(WorkerError::Refused(why)), out),
            },
            (Link::Hello | Link::Registering, other) => {
                let expected = if self.link == Link::Hello {
                    "Welcome"
                } else {
                    "Registered"
                };
                self.on_lost(
                    Disconnect::lost(format!("expected {expected}, got {other:?}")),
                    out,
                );
            }
            (Link::Up, msg) => self.on_round_message(msg, now_ms, out),
            (Link::Down, msg) => tracing::debug!("dropped {msg:?} after the connection ended"),
        }
    }

    fn on_error(&mut self, code: ErrorCode, message: String, out: &mut Vec<WorkerAction>) {
        match (self.link, code) {
            (_, ErrorCode::Finished) => {
                tracing::info!("coordinator: {message}");
                self.leave(out);
            }
            (_, ErrorCode::ShuttingDown) => {
                tracing::info!("coordinator: {message}");
                self.on_lost(
                    Disconnect::Lost {
                        why: message,
                        code: Some(code),
                    },
                    out,
                );
            }
            // A replica that does not lead: to the leader it names (or the next address).
            (_, ErrorCode::NotLeader) => {
                let leader = (!message.is_empty()).then_some(message);
                tracing::info!("coordinator replica does not lead; leader: {leader:?}");
                let why = format!(
                    "not the leader (leader: {})",
                    leader.as_deref().unwrap_or("?")
                );
                out.push(WorkerAction::Redirect(leader));
                self.backoff = FIRST_BACKOFF;
                self.on_lost(
                    Disconnect::Lost {
                        why,
                        code: Some(code),
                    },
                    out,
                );
            }
            // Refused before registration (version, revoked, bad capabilities): for good.
            (Link::Hello | Link::Registering, _) => self.finish(
                Err(WorkerError::Refused(format!("{code:?}: {message}"))),
                out,
            ),
            _ => tracing::warn!(?code, "coordinator: {message}"),
        }
    }

    fn on_round_message(&mut self, msg: ServerMsg, now_ms: u64, out: &mut Vec<WorkerAction>) {
        match msg {
            ServerMsg::RoundAnnounce(announce) => {
                self.announced = Some(Round {
                    announce,
                    shards: Vec::new(),
                    started_ms: now_ms,
                    start: None,
                });
            }
            ServerMsg::ShardAssignment { round, shards } => {
                let Some(mut r) = self.announced.take().filter(|a| a.announce.round == round)
                else {
                    tracing::warn!(round, "shard assignment without its announce");
                    return;
                };
                r.shards = shards;
                r.started_ms = now_ms;
                if self.offer_again(round, out) {
                    return;
                }
                if self.current.is_some() {
                    self.queued = Some(r);
                } else {
                    self.begin(r, now_ms, out);
                }
            }
            ServerMsg::Ack { of } => {
                if matches!(self.unacked, Some(ClientMsg::UpdateHeader { round, .. }) if round == of)
                {
                    self.unacked = None;
                }
                self.summary.rounds += 1;
                tracing::debug!(round = of, "update acknowledged");
                if self.opts.progress {
                    out.push(WorkerAction::Report(format!("round {of} acknowledged")));
                }
            }
            other => tracing::warn!("unexpected {other:?}"),
        }
    }

    /// A round announced again (to a new session, after a failover) for which an update was
    /// offered and not acknowledged: offered again instead of training the round twice. An
    /// unacknowledged update of an earlier round is dropped (its round closed without it).
    fn offer_again(&mut self, round: u64, out: &mut Vec<WorkerAction>) -> bool {
        match &self.unacked {
            Some(header @ ClientMsg::UpdateHeader { round: r, .. }) if *r == round => {
                tracing::info!(round, "offering the unacknowledged update again");
                out.push(WorkerAction::Send(header.clone()));
                true
            }
            Some(_) => {
                self.unacked = None;
                false
            }
            None => false,
        }
    }

    /// Starts round `r`: the state first (held, from a delta, or in full).
    fn begin(&mut self, mut r: Round, now_ms: u64, out: &mut Vec<WorkerAction>) {
        self.forget_rounds_before(r.announce.round, out);
        let held = self.params.clone();
        if let Some((p, _)) = held.as_ref().filter(|(_, h)| *h == r.announce.params) {
            // We hold it (the seeded initial state, or one sent before).
            r.start = Some(p.clone());
            return self.after_state(r, now_ms, out);
        }
        match (r.announce.delta, held) {
            (Some(d), Some((p, h))) if h == d.base => {
                out.push(WorkerAction::Fetch {
                    id: d.blob,
                    max_len: state_bytes_limit(&p),
                });
                self.current = Some((r, Step::Delta));
            }
            (_, held) => {
                out.push(WorkerAction::Fetch {
                    id: r.announce.state,
                    max_len: held.map_or(MAX_SHARD_BYTES, |(p, _)| state_bytes_limit(&p)),
                });
                self.current = Some((r, Step::State));
            }
        }
    }

    fn on_fetched(&mut self, id: BlobId, bytes: &[u8], now_ms: u64, out: &mut Vec<WorkerAction>) {
        let Some((mut r, step)) = self.current.take() else {
            return;
        };
        self.round_blob(r.announce.round, id);
        match step {
            Step::Delta => {
                let base = self.params.as_ref().map(|(p, _)| p.clone());
                let momentum = r.announce.delta.and_then(|d| d.target_momentum);
                match base.map(|p| p.after_delta(bytes, momentum)) {
                    Some(Ok(next)) if next.hash() == r.announce.params => {
                        r.start = Some(Arc::new(next));
                        self.after_state(r, now_ms, out);
                    }
                    other => {
                        match other {
                            Some(Err(e)) => {
                                tracing::warn!(round = r.announce.round, "bad delta: {e}")
                            }
                            _ => tracing::warn!(
                                round = r.announce.round,
                                "delta did not give the announced state"
                            ),
                        }
                        // The full state, then.
                        out.push(WorkerAction::Fetch {
                            id: r.announce.state,
                            max_len: self
                                .params
                                .as_ref()
                                .map_or(MAX_SHARD_BYTES, |(p, _)| state_bytes_limit(p)),
                        });
                        self.current = Some((r, Step::State));
                    }
                }
            }
            Step::State => {
                let checked = Checkpoint::from_bytes(bytes, "global state from coordinator")
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        let p = GlobalParams {
                            model: c.model,
                            target: c.target,
                        };
                        if p.hash() == r.announce.params {
                            Ok(p)
                        } else {
                            Err("global state does not match its hash".into())
                        }
                    });
                match checked {
                    Ok(p) => {
                        r.start = Some(Arc::new(p));
                        self.after_state(r, now_ms, out);
                    }
                    Err(why) => self.on_lost(Disconnect::lost(why), out),
                }
            }
            Step::Shards | Step::Training => self.current = Some((r, step)),
        }
    }

    /// The state is held: keep it, then the shards.
    fn after_state(&mut self, r: Round, now_ms: u64, out: &mut Vec<WorkerAction>) {
        if let Some(start) = &r.start {
            self.params = Some((start.clone(), r.announce.params));
        }
        if r.shards.is_empty() {
            self.training.0 = now_ms;
            let job = self.train_job(&r, now_ms);
            out.push(WorkerAction::Train(job));
            self.current = Some((r, Step::Training));
        } else {
            out.push(WorkerAction::PrepareShards(r.shards.clone()));
            self.current = Some((r, Step::Shards));
        }
    }

    fn train_job(&self, r: &Round, now_ms: u64) -> TrainJob {
        let session = self
            .session
            .expect("rounds come only to a registered worker");
        let seed = self.run.as_ref().map_or(0, |c| c.train.seed);
        // Either budget, or both (the worker stops at whichever runs out first); the time
        // already spent fetching the state and shards counts against the time budget.
        let spent = now_ms.saturating_sub(r.started_ms);
        let budget = RoundBudget {
            steps: (r.announce.steps > 0).then_some(r.announce.steps),
            time: (r.announce.budget_ms > 0 || r.announce.steps == 0)
                .then(|| Duration::from_millis(r.announce.budget_ms.saturating_sub(spent))),
        };
        // From where this worker's own training stands, not from the global state: see
        // `GlobalParams::ahead_by` for why and what it measured.
        let held = r.start.clone().expect("the state is held before training");
        TrainJob {
            round: r.announce.round,
            start: held.ahead_by(self.feedback.residual()),
            shards: r.shards.clone(),
            options: LocalRoundOptions {
                budget,
                policy: session.policy,
                seed: seed ^ r.announce.round.rotate_left(17),
                worker: session.worker,
                progress: RunProgress {
                    round: r.announce.round,
                    planned_rounds: r.announce.planned_rounds,
                },
                slowdown: self.opts.slowdown,
            },
        }
    }

    fn on_trained(
        &mut self,
        result: Result<LocalUpdate, String>,
        now_ms: u64,
        out: &mut Vec<WorkerAction>,
    ) {
        let Some((r, Step::Training)) = self.current.take() else {
            return;
        };
        if let Ok(u) = &result {
            self.summary.steps += u.steps;
            self.summary.samples += u.samples;
            self.summary.last_loss = u.loss.mean;
            let secs = now_ms.saturating_sub(self.training.0) as f32 / 1000.0;
            if secs > 0.0 && u.samples > 0 {
                self.training.1 = Some(u.samples as f32 / secs);
            }
        }
        if self.stopping {
            // Ctrl-C: the round's upload is abandoned.
            return self.leave(out);
        }
        let update = match result {
            Ok(u) => u,
            Err(why) => return self.on_lost(Disconnect::lost(why), out),
        };
        match (self.link, self.session) {
            (Link::Up, Some(session)) => {
                self.offer(r.announce.round, r.announce.flush, update, session, out)
            }
            // The connection dropped while we trained: the round went with it.
            _ => tracing::info!(
                r.announce.round,
                "update dropped: the connection ended while training"
            ),
        }
        if let Some(next) = self.queued.take() {
            self.begin(next, now_ms, out);
        }
    }

    /// Compresses the update (error feedback keeps what top-k and int8 drop) and offers it. A
    /// flush round goes out densely, so the residual is delivered before a checkpoint or the
    /// end.
    fn offer(
        &mut self,
        round: u64,
        flush: bool,
        mut update: LocalUpdate,
        session: Session,
        out: &mut Vec<WorkerAction>,
    ) {
        let spec = if flush {
            session.codec.dense()
        } else {
            session.codec
        };
        let bytes = match self.opts.fault {
            None => {
                self.feedback
                    .encode_parts(&spec, update.wire_values(), &update.wire_parts())
                    .0
            }
            // A fault stands for a peer that lies on the wire and goes on training honestly:
            // what it sends is the fault applied to what an honest worker would send (update
            // plus residual), while its residual (and so where its next round starts,
            // `GlobalParams::ahead_by`) is the one the honest update leaves. A huge fault kept
            // in the residual would wreck its own training, and a flip kept out of it would
            // send an honest residual in the flush.
            Some(_) => {
                let lying = self.with_residual(&update);
                self.feedback
                    .encode_parts(&spec, update.wire_values(), &update.wire_parts());
                update = lying;
                apply_fault(self.opts.fault, round, &mut update);
                ErrorFeedback::new()
                    .encode_parts(&spec, update.wire_values(), &update.wire_parts())
                    .0
            }
        };
        let id = BlobId::of(&bytes);
        let len = bytes.len() as u64;
        self.round_blob(round, id);
        self.summary.bytes_up += len;
        out.push(WorkerAction::StoreUpdate(bytes));
        let header = ClientMsg::UpdateHeader {
            round,
            blob: id,
            bytes: len - u64::from(self.opts.fault == Some(Fault::Oversize)),
            samples: update.samples,
            steps: update.steps,
            loss: update.loss,
        };
        if self.opts.fault == Some(Fault::Replay) {
            out.push(WorkerAction::Send(header.clone()));
        }
        self.unacked = Some(header.clone());
        out.push(WorkerAction::Send(header));
        if self.opts.progress {
            out.push(WorkerAction::Report(format!(
                "round {round} done: {} steps, {} clips, loss {:.4} -> {:.4} (predicting the \
                 mean: {:.4}), update {} ({}), up {} down {}",
                update.steps,
                update.samples,
                update.loss.first,
                update.loss.last,
                update.loss.baseline,
                human(len),
                session.codec,
                human(self.summary.bytes_up),
                human(self.summary.bytes_down)
            )));
        }
    }

    /// `update` with the error-feedback residual added: what an honest worker encodes.
    fn with_residual(&self, update: &LocalUpdate) -> LocalUpdate {
        let mut out = update.clone();
        let residual = self.feedback.residual();
        if residual.len() == update.wire_parts().iter().sum::<usize>() {
            let (model, target) = residual.split_at(out.model_delta.len());
            out.model_delta
                .iter_mut()
                .zip(model)
                .for_each(|(v, r)| *v += r);
            if let Some(t) = &mut out.target_delta {
                t.iter_mut().zip(target).for_each(|(v, r)| *v += r);
            }
        }
        out
    }

    /// Notes that `id` in the cache belongs to round `round` only.
    fn round_blob(&mut self, round: u64, id: BlobId) {
        match self.transient.back_mut() {
            Some((r, ids)) if *r == round => ids.push(id),
            _ => self.transient.push_back((round, vec![id])),
        }
    }

    /// Forgets the round blobs of rounds before `round - 1` (the previous round's update may
    /// still be asked for).
    fn forget_rounds_before(&mut self, round: u64, out: &mut Vec<WorkerAction>) {
        let mut gone = Vec::new();
        while let Some((r, ids)) = self.transient.pop_front() {
            if r + 1 >= round {
                self.transient.push_front((r, ids));
                break;
            }
            gone.extend(ids);
        }
        if !gone.is_empty() {
            out.push(WorkerAction::Forget(gone));
        }
    }
}

/// Reads what `Registered` settled: the run's config, codec and target policy.
fn settle(
    run: &str,
    codec: &str,
    policy: &str,
) -> Result<(Config, CodecSpec, TargetPolicy), String> {
    let run: Config =
        toml::from_str(run).map_err(|e| format!("run config from coordinator: {e}"))?;
    run.validate().map_err(|e| format!("run config: {e}"))?;
    let codec: CodecSpec = codec.parse().map_err(|e| format!("{e}"))?;
    let policy: TargetPolicy = policy.parse().map_err(|e| format!("{e}"))?;
    Ok((run, codec, policy))
}

/// Plays the deliberate misbehaviour `fault` on round `round`'s update (tests only).
fn apply_fault(fault: Option<Fault>, round: u64, update: &mut LocalUpdate) {
    match fault {
        Some(Fault::Nan) => update.model_delta[0] = f32::NAN,
        Some(Fault::Scale(f)) => update.model_delta.iter_mut().for_each(|v| *v *= f),
        Some(Fault::Huge) => update.model_delta.iter_mut().for_each(|v| *v = 3e38),
        Some(Fault::Flip) => update.model_delta.iter_mut().for_each(|v| *v = -*v),
        Some(Fault::Noise(sigma)) => {
            let mut rng = amity_shared::rng::Rng::new(round);
            for v in &mut update.model_delta {
                *v = sigma * rng.normal() as f32;
            }
        }
        Some(Fault::Claim(k)) => {
            update.samples = update.samples.saturating_mul(k);
            update.steps = update.steps.saturating_mul(k);
        }
        Some(Fault::Oversize | Fault::Replay) | None => {}
    }
}

/// The most bytes a global state or state delta for `params` may have: dense fp32 values plus
/// room for the checkpoint's config and metadata.
fn state_bytes_limit(params: &GlobalParams) -> u64 {
    4 * (params.model.len() + params.target.len()) as u64 + (16 << 20)
}

/// What to tell the operator when a TLS handshake refused a certificate (`detail`: the error).
fn refusal_text(r: HandshakeRefusal, detail: &str) -> String {
    match r {
        HandshakeRefusal::ByPeer(alert) => format!(
            "{detail}\nthe coordinator refused this worker's certificate at the TLS handshake \
             ({alert}): it must be issued by the coordinator's CA (`amity ca issue` in the \
             coordinator's CA folder) and not be listed in its `revoked` names; not retrying"
        ),
        HandshakeRefusal::ByUs(alert) => format!(
            "{detail}\nthis worker refused the coordinator's certificate at the TLS handshake \
             ({alert}): check --ca (the CA certificate that issued the coordinator's) and \
             --server-name (a name on the coordinator's certificate); not retrying"
        ),
    }
}

/// A deliberate misbehaviour, for the fault-injection and hostile-peer tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Upload a pseudo-gradient containing NaN.
    Nan,
    /// Upload the pseudo-gradient multiplied by this factor.
    Scale(f32),
    /// Upload values near `f32::MAX` (finite, but an outer step over them overflows).
    Huge,
    /// Upload the negated pseudo-gradient.
    Flip,
    /// Upload Gaussian noise of this standard deviation instead of the pseudo-gradient.
    Noise(f32),
    /// Claim this many times the samples and steps done (to buy weight).
    Claim(u64),
    /// Announce the update one byte shorter than it is (the served blob is longer).
    Oversize,
    /// Offer the same update twice in a round.
    Replay,
}

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Local set-up failed (a device, the cache, the corpus, the TLS config, the address).
    #[error("{what}")]
    Setup {
        /// What could not be set up.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The coordinator refused us for good.
    #[error("coordinator refused: {0}")]
    Refused(String),
    /// A TLS handshake failed over certificates: reconnecting cannot mend it.
    #[error("{0}")]
    Handshake(String),
}

#[cfg(test)]
mod tests;
