use super::*;
use amity_shared::checkpoint::layouts;
use amity_shared::config::Config;
use amity_shared::federated::codec::{self, CodecSpec, ErrorFeedback};
use amity_shared::model::flat::init_params;
use amity_shared::rng::Rng;

fn setup(policy: TargetPolicy) -> (Core, Vec<ShardInfo>) {
    let run = Config::preset("tiny").unwrap();
    let (ml, tl) = layouts(&run);
    let model = init_params(&ml, 1);
    let target = model[..tl.total].to_vec();
    let mut cfg = CoreConfig::new(run);
    cfg.target_policy = policy;
    cfg.rounds.min_workers = 2;
    cfg.rounds.budget_ms = Some(1000);
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

/// Test workers are named by their number.
fn join(core: &mut Core, id: u64, name: &str, speed: f64, now: u64) -> Vec<Action> {
    let id = WorkerId(id);
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
        loss: LossStats {
            mean: 1.0,
            first: 1.1,
            last: 0.9,
            baseline: 1.2,
        },
        values: values.into(),
    }
}

/// Delivers the seeded update `seed` (values scaled by `scale`) from `worker` for `round`.
fn send(core: &mut Core, worker: u64, round: u64, scale: f32, seed: u64, now: u64) -> Vec<Action> {
    let update = update(core, round, scale, seed);
    core.handle(
        Event::Update {
            worker: WorkerId(worker),
            update,
        },
        now,
    )
}

fn sent_to(actions: &[Action], worker: u64) -> Vec<&ServerMsg> {
    let worker = WorkerId(worker);
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

/// The global-state blob among `actions`.
fn state_stored(actions: &[Action]) -> &[u8] {
    actions
        .iter()
        .find_map(|a| match a {
            Action::StoreBlob {
                what: "global state",
                bytes,
            } => Some(bytes.as_slice()),
            _ => None,
        })
        .expect("a global state stored")
}

/// Reads snapshot `bytes` with the global-state blob it names, looked for among `actions`'
/// stored blobs.
fn read_snapshot(bytes: &[u8], actions: &[Action]) -> Result<Snapshot, SnapshotError> {
    Snapshot::read(bytes, |id| {
        actions
            .iter()
            .find_map(|a| match a {
                Action::StoreBlob { bytes, .. } if BlobId::of(bytes) == *id => Some(bytes.clone()),
                _ => None,
            })
            .ok_or_else(|| "not among the blobs stored".to_owned())
    })
}

fn assignment(actions: &[Action], worker: u64) -> Vec<BlobId> {
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
                ServerMsg::RoundAnnounce(RoundAnnounce {
                    round: 1,
                    delta,
                    params,
                    ..
                }) => Some((*delta, *params)),
                _ => None,
            })
            .unwrap(),
    );
    let delta = announce.0.expect("delta offered");
    assert_eq!(delta.base, before);
    assert_eq!(BlobId::of(&delta_bytes), delta.blob);
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
            ServerMsg::RoundAnnounce(RoundAnnounce { flush, .. }) => Some(*flush),
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
            let values = u.values.to_dense().unwrap();
            for (d, v) in dense.iter_mut().zip(&values) {
                *d += 0.5 * *v as f64;
            }
            let spec: CodecSpec = if flush { cfg.codec.dense() } else { cfg.codec };
            let (wire, sent) = fb.encode_parts(&spec, values.clone(), &parts);
            if !flush {
                for (d, v) in sent_before_flush.iter_mut().zip(&sent) {
                    *d += 0.5 * *v as f64;
                }
            }
            u.values = codec::decode_parts_entries(&wire, &parts).unwrap().into();
            let worker = WorkerId(w as u64 + 1);
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
    core.handle(
        Event::Heartbeat {
            worker: WorkerId(2),
        },
        1500,
    );
    assert_eq!(core.round(), 0);
    let acts = core.handle(Event::Tick, 2001);
    assert_eq!(core.round(), 1);
    let s = core.history()[0].clone();
    assert_eq!(
        (s.accepted, s.missing),
        (vec!["a".to_string()], vec!["b".to_string()])
    );
    // b's shards are handed out first in the next round.
    let next: Vec<BlobId> = [1, 2].iter().flat_map(|w| assignment(&acts, *w)).collect();
    assert!(
        lost.iter().all(|s| next.contains(s)),
        "{lost:?} vs {next:?}"
    );

    // A worker that stops sending heartbeats is dropped and the round closes without it.
    send(&mut core, 1, 1, 1.0, 3, 2100);
    core.handle(
        Event::Heartbeat {
            worker: WorkerId(1),
        },
        17_000,
    );
    assert_eq!(
        core.round(),
        2,
        "b timed out, a's update completes the round"
    );
    assert_eq!(core.workers(), vec![(WorkerId(1), "a".to_string())]);
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
    nan.values.held_mut().unwrap()[5] = f32::NAN;
    core.handle(
        Event::Update {
            worker: WorkerId(3),
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
            worker: WorkerId(3),
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
            worker: WorkerId(2),
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
        .held_mut()
        .unwrap()
        .iter_mut()
        .for_each(|v| *v = 3e38_f32.copysign(*v));
    let journalled = core.handle(
        Event::Update {
            worker: WorkerId(2),
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
        u.values
            .held_mut()
            .unwrap()
            .iter_mut()
            .for_each(|v| *v = 3e38);
        open.handle(
            Event::Update {
                worker: WorkerId(w),
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
        .zip(&honest.values.to_dense().unwrap()[..m])
        .map(|(p, d)| p - d)
        .collect();
    core.set_scorer(Box::new(DistanceTo(goal)));
    let mut flipped = honest.clone();
    flipped
        .values
        .held_mut()
        .unwrap()
        .iter_mut()
        .for_each(|v| *v = -*v);
    core.handle(
        Event::Update {
            worker: WorkerId(1),
            update: honest,
        },
        10,
    );
    core.handle(
        Event::Update {
            worker: WorkerId(2),
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
    let closing = send(&mut core, 2, 0, 1.0, 2, 10);
    let snap_bytes = snapshot_stored(&closing).unwrap();
    // An update of round 1 was accepted before the crash.
    let acts = send(&mut core, 1, 1, 1.0, 3, 20);
    let Action::Persist(entry) = acts[0].clone() else {
        panic!("{acts:?}")
    };

    // The snapshot names the global state stored just before it for its parameters: it reads
    // with that blob, not without it, and holds the core's parameters.
    let err = Snapshot::from_bytes(&snap_bytes).unwrap_err();
    assert!(err.to_string().contains("global-state blob"), "{err}");
    let snap = read_snapshot(&snap_bytes, &closing).unwrap();
    assert_eq!(snap.params.hash(), core.params().hash());
    assert_eq!(
        Snapshot::state_blob(&snap_bytes).unwrap(),
        Some(BlobId::of(state_stored(&closing)))
    );
    let params_bytes = 4 * (snap.params.model.len() + snap.params.target.len());
    let saved = snap.to_bytes().len() as i64 - snap_bytes.len() as i64;
    assert!(
        (saved - params_bytes as i64).abs() < 200,
        "{saved} vs {params_bytes}"
    );
    let wrong = Snapshot::read(&snap_bytes, |_| Ok(b"not the state".to_vec())).unwrap_err();
    assert!(wrong.to_string().contains("another hash"), "{wrong}");
    // Embedded parameters (a snapshot's own bytes) read alone, the same.
    let embedded = Snapshot::from_bytes(&snap.to_bytes()).unwrap();
    assert_eq!(embedded.meta.state, None);
    assert_eq!(embedded.meta.lens, snap.meta.lens);
    assert_eq!(
        (
            &embedded.params,
            &embedded.momentum,
            &embedded.down_residual
        ),
        (&snap.params, &snap.momentum, &snap.down_residual)
    );
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
        bad.values.held_mut().unwrap()[0] = f32::NAN;
        bad.loss.mean = f32::NAN;
        acts = core.handle(
            Event::Update {
                worker: WorkerId(worker),
                update: bad,
            },
            10,
        );
    }
    let snap = snapshot_stored(&acts).expect("the round closed");
    let snap = read_snapshot(&snap, &acts).unwrap();
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
        loss: LossStats {
            mean: f32::NAN,
            first: f32::INFINITY,
            last: 1.0,
            baseline: f32::NAN,
        },
        shards: vec![],
    };
    let back: LogEntry = serde_json::from_slice(&serde_json::to_vec(&entry).unwrap()).unwrap();
    let LogEntry::UpdateAccepted { loss, .. } = back else {
        panic!("{back:?}")
    };
    assert!(
        loss.mean.is_nan() && loss.first.is_nan() && loss.last == 1.0 && loss.baseline.is_nan()
    );
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
                worker: WorkerId(worker),
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
    core.handle(
        Event::Left {
            worker: WorkerId(2),
        },
        1,
    );
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
            worker: WorkerId(1),
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
            if assignment(&acts, w).contains(&private.id) {
                *s = true;
            }
        }
        core.handle(
            Event::Heartbeat {
                worker: WorkerId(1),
            },
            2002 + r * 3000,
        );
        core.handle(
            Event::Heartbeat {
                worker: WorkerId(2),
            },
            2002 + r * 3000,
        );
    }
    assert!(seen_by_owner && !seen_by_other);
    // When the institution leaves, its shard leaves the plan (no squatting across
    // sessions); it is back when the institution registers again.
    core.handle(
        Event::Left {
            worker: WorkerId(1),
        },
        30_000,
    );
    assert_eq!(core.plan().clips(), 60);
    assert!(!core.plan().queue.contains(&private.id));
    core.handle(
        Event::Joined {
            worker: WorkerId(3),
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
        let shards: Vec<Vec<BlobId>> = (1..=3).map(|w| assignment(&acts, w)).collect();
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
        let again: Vec<BlobId> = (1..=3).flat_map(|w| assignment(&acts, w)).collect();
        let id = shards[lost][0];
        assert!(
            core.plan().queue.contains(&id) || again.contains(&id),
            "replaced: {replaced}"
        );
        assert!(!core.plan().covered.contains(&id));
        for w in [trained, 2] {
            assert!(core.plan().covered.contains(&shards[w][0]));
        }
    }
}

mod budget;
mod finish;
mod history;
mod operator;
mod replay;
