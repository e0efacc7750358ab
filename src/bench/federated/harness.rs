//! A federation in one process: the real coordinator core and one real worker core per
//! institution, wired by a message queue in place of QUIC, with training run inline.
//!
//! Like raft-rs's test harness, it plays both shells: it carries out each core's actions (a
//! message becomes the other side's input, a stored blob lands in a map both sides read) and
//! feeds the answers back, in a fixed order, so a run is reproducible from its seeds. What the
//! bench measures is therefore what a deployment runs: registration, state deltas, schedules
//! from the announced progress, error feedback, flush rounds and the coordinator's screens. The
//! only thing not real is the network; a hostile worker 0 is played here, on its decoded
//! update, as a man in the middle would.

use std::collections::{HashMap, VecDeque};

use amity_coordinator::config::CoreConfig;
use amity_coordinator::core::{
    Action, ArrivedUpdate, Core, Event, JoinInfo, RoundSummary, WorkerId,
};
use amity_coordinator::scoring::HeldOut;
use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::message::{ClientMsg, ServerMsg};
use amity_shared::data::ClipSource;
use amity_shared::federated::codec;
use amity_shared::federated::{GlobalParams, local_round};
use amity_shared::store::BlobId;
use amity_shared::train::Trainer;
use amity_worker::core::{CoreOptions, Input, WorkerAction, WorkerCore};
use burn::tensor::Device;

use super::variant::Attack;

/// One institution: its worker core, the trainer its shell would hold, its clips and the cache
/// its updates wait in until the coordinator pulls them.
struct Member {
    core: WorkerCore,
    trainer: Option<Trainer>,
    source: ClipSource,
    cache: HashMap<BlobId, Vec<u8>>,
}

/// What a finished federation reports.
pub struct Outcome {
    /// The coordinator's parameters after the last round.
    pub params: GlobalParams,
    /// Every round's summary.
    pub history: Vec<RoundSummary>,
    /// Bytes up and down over every round, as the coordinator counted them.
    pub bytes: u64,
    /// The largest outer step relative to the mean pseudo-gradient.
    pub max_outer_step_ratio: f64,
    /// How far the last round moved the model (encoder and predictor) over how far the whole
    /// run moved it, when the last round was a flush (NaN otherwise). Without compression the
    /// last of R rounds takes about its share of the run; with error feedback the flush also
    /// delivers every residual held back, so a large share means the run's ordinary rounds
    /// delivered little of what the workers trained.
    pub flush_share: f64,
}

/// The coordinator core and its members.
pub struct Federation {
    core: Core,
    members: Vec<Member>,
    /// The coordinator's content store (states, deltas), which workers fetch from.
    store: HashMap<BlobId, Vec<u8>>,
    /// Inputs not yet handed to a worker core, in the order they arose.
    inbox: VecDeque<(usize, Input)>,
    parts: Vec<usize>,
    attack: Attack,
    device: Device,
    now_ms: u64,
    bytes: u64,
    max_ratio: f64,
    /// The model at the start, and after the last ordinary (not flush) round.
    start_model: Vec<f32>,
    before_flush: Vec<f32>,
}

impl Federation {
    /// A coordinator core configured by `cfg` (held-out scoring on `held_out` clips, 0: off) and
    /// one worker per source, worker 0 playing `attack` on its updates.
    pub fn new(cfg: CoreConfig, sources: Vec<ClipSource>, held_out: usize, attack: Attack) -> Self {
        let run = cfg.run.clone();
        let start = GlobalParams::seeded(&run);
        let start_model = start.model.clone();
        let (mut core, actions) = Core::new(cfg, start, &[]);
        if held_out > 0 {
            // Held-out clips like the coordinator's: synthetic, from a stream no worker draws.
            let source = ClipSource::synthetic(&run.model);
            core.set_scorer(Box::new(HeldOut::new(&run, &source, held_out)));
        }
        let parts = core.update_parts();
        let mut members = Vec::new();
        let mut inbox = VecDeque::new();
        for (w, source) in sources.into_iter().enumerate() {
            let (worker, first) = WorkerCore::new(CoreOptions {
                backend: "flex".into(),
                local_shards: Vec::new(),
                slowdown: 1.0,
                fault: None,
                progress: false,
            });
            members.push(Member {
                core: worker,
                trainer: None,
                source,
                cache: HashMap::new(),
            });
            inbox.extend(
                first
                    .into_iter()
                    .filter_map(|a| connect_answer(&a).map(|i| (w, i))),
            );
        }
        let mut fed = Federation {
            core,
            members,
            store: HashMap::new(),
            inbox,
            parts,
            attack,
            device: Device::flex(),
            now_ms: 0,
            bytes: 0,
            max_ratio: 0.0,
            before_flush: start_model.clone(),
            start_model,
        };
        fed.coordinator_actions(actions);
        fed
    }

    /// Runs until the coordinator finishes its planned rounds (or nothing is left to do).
    pub fn run(mut self) -> Outcome {
        while let Some((w, input)) = self.inbox.pop_front() {
            self.now_ms += 1;
            let actions = self.members[w].core.handle(input, self.now_ms);
            for a in actions {
                self.worker_action(w, a);
            }
        }
        assert!(
            self.core.finished(),
            "the federation stalled at round {} before its planned end",
            self.core.round()
        );
        let params = self.core.params().clone();
        let history = self.core.history().to_vec();
        let flush_share = if history.last().is_some_and(|s| s.flush) {
            let dist = |from: &[f32]| {
                (params.model.iter().zip(from))
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum::<f64>()
                    .sqrt()
            };
            dist(&self.before_flush) / dist(&self.start_model)
        } else {
            f64::NAN
        };
        Outcome {
            params,
            history,
            bytes: self.bytes,
            max_outer_step_ratio: self.max_ratio,
            flush_share,
        }
    }

    /// Carries out what the coordinator core asks.
    fn coordinator_actions(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { worker, msg } => self
                    .inbox
                    .push_back((worker.0 as usize, Input::Message(msg))),
                Action::StoreBlob { bytes, .. } => {
                    self.store.insert(BlobId::of(&bytes), bytes);
                }
                Action::RoundClosed(s) => {
                    self.bytes += s.bytes_up + s.bytes_down;
                    self.max_ratio = self.max_ratio.max(s.outer_step_ratio);
                    if !s.flush {
                        self.before_flush.clone_from(&self.core.params().model);
                    }
                }
                Action::Persist(_)
                | Action::Checkpoint { .. }
                | Action::Finished
                | Action::Operator(_) => {}
            }
        }
    }

    fn tell_coordinator(&mut self, event: Event) {
        self.now_ms += 1;
        let actions = self.core.handle(event, self.now_ms);
        self.coordinator_actions(actions);
    }

    /// Carries out what worker `w`'s core asks, as its shell and the coordinator's would.
    fn worker_action(&mut self, w: usize, action: WorkerAction) {
        let worker = WorkerId(w as u64);
        let m = &mut self.members[w];
        match action {
            WorkerAction::Connect | WorkerAction::ConnectAfter(_) => {
                self.inbox.push_back((w, Input::Connected))
            }
            WorkerAction::Send(ClientMsg::Hello { .. }) => {
                let welcome = ServerMsg::Welcome {
                    protocol: PROTOCOL_VERSION,
                    identity: format!("w{w}"),
                    time_ms: 0,
                };
                self.inbox.push_back((w, Input::Message(welcome)));
            }
            WorkerAction::MeasureThroughput(_) => self.inbox.push_back((w, Input::Throughput(1.0))),
            WorkerAction::Send(ClientMsg::Register(caps)) => {
                let info = JoinInfo {
                    name: format!("w{w}"),
                    backend: caps.backend,
                    samples_per_s: caps.samples_per_s as f64,
                    local_shards: Vec::new(),
                };
                self.tell_coordinator(Event::Joined { worker, info });
            }
            WorkerAction::Send(ClientMsg::Heartbeat { .. }) => {
                self.tell_coordinator(Event::Heartbeat { worker })
            }
            // One coordinator here: never a replica that does not lead.
            WorkerAction::Send(ClientMsg::Goodbye)
            | WorkerAction::Disconnect
            | WorkerAction::Redirect(_) => {}
            WorkerAction::Send(ClientMsg::UpdateHeader {
                round,
                blob,
                bytes,
                samples,
                steps,
                loss,
            }) => {
                let wire = m
                    .cache
                    .get(&blob)
                    .expect("the worker stored its update first");
                let mut values =
                    codec::decode_parts(wire, &self.parts).expect("a worker core's own encoding");
                if w == 0 {
                    self.attack.apply(&mut values, round);
                }
                let update = ArrivedUpdate {
                    round,
                    blob,
                    bytes,
                    samples,
                    steps,
                    loss,
                    values: values.into(),
                };
                self.tell_coordinator(Event::Update { worker, update });
            }
            WorkerAction::Send(other) => panic!("worker {w} sent {other:?} mid-run"),
            WorkerAction::NewTrainer(run) => m.trainer = Some(Trainer::new(*run, &self.device)),
            WorkerAction::Fetch { id, .. } => {
                let bytes = self
                    .store
                    .get(&id)
                    .expect("the coordinator stored it")
                    .clone();
                let downloaded = bytes.len() as u64;
                self.inbox.push_back((
                    w,
                    Input::Fetched {
                        id,
                        bytes,
                        downloaded,
                    },
                ));
            }
            WorkerAction::PrepareShards(_) => self
                .inbox
                .push_back((w, Input::ShardsReady { downloaded: 0 })),
            WorkerAction::Train(job) => {
                let trainer = m.trainer.as_mut().expect("registration made the trainer");
                let r = local_round(
                    trainer,
                    &job.start,
                    &m.source,
                    &job.options,
                    |_, _| {},
                    || false,
                );
                self.inbox
                    .push_back((w, Input::Trained(r.map_err(|e| e.to_string()))));
            }
            WorkerAction::StoreUpdate(bytes) => {
                m.cache.insert(BlobId::of(&bytes), bytes);
            }
            WorkerAction::Forget(ids) => ids.iter().for_each(|id| {
                m.cache.remove(id);
            }),
            WorkerAction::Report(_) => {}
            WorkerAction::Finish(r) => {
                if let Err(e) = r {
                    panic!("worker {w} ended with an error: {e}");
                }
            }
        }
    }
}

/// The shell's answer to a connect: the link is up at once.
fn connect_answer(a: &WorkerAction) -> Option<Input> {
    matches!(a, WorkerAction::Connect | WorkerAction::ConnectAfter(_)).then_some(Input::Connected)
}

/// The config of a bench run's coordinator: `base` with `rounds` rounds of `h` steps and
/// `workers` needed to start one, no checkpoints.
pub fn bench_config(mut cfg: CoreConfig, workers: usize, h: u64, rounds: u64) -> CoreConfig {
    cfg.rounds.steps = h;
    cfg.rounds.min_workers = workers;
    cfg.rounds.max_rounds = rounds;
    cfg.checkpoint_every = 0;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use amity_shared::config::Config;
    use amity_shared::federated::TargetPolicy;
    use amity_shared::federated::codec::CodecSpec;

    /// Two workers over three rounds of two steps through the real cores: every round closes
    /// with both updates, the worker cores decode deltas to the coordinator's parameters, and a
    /// rerun lands on the same parameters hash.
    #[test]
    fn a_federation_runs_its_planned_rounds_reproducibly() {
        let mut run = Config::preset("tiny").unwrap();
        run.train.batch = 2;
        let go = || {
            let mut cfg = bench_config(CoreConfig::new(run.clone()), 2, 2, 3);
            cfg.codec = "topk0.1+int8".parse::<CodecSpec>().unwrap();
            cfg.target_policy = TargetPolicy::CoordinatorEma;
            let sources = (0..2).map(|_| ClipSource::synthetic(&run.model)).collect();
            Federation::new(cfg, sources, 0, Attack::None).run()
        };
        let a = go();
        assert_eq!(a.history.len(), 3);
        assert!(
            a.history.iter().all(|s| s.accepted.len() == 2),
            "{:?}",
            a.history
        );
        assert!(a.bytes > 0);
        // The last round flushes, and moved the model part of the way the run did.
        assert!(a.history.last().is_some_and(|s| s.flush));
        assert!(
            a.flush_share > 0.0 && a.flush_share.is_finite(),
            "{}",
            a.flush_share
        );
        assert_ne!(a.params.hash(), GlobalParams::seeded(&run).hash());
        assert_eq!(go().params.hash(), a.params.hash());
    }
}
