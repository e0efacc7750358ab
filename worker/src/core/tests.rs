//! The worker's behaviours, driven input by input without sockets or training.

use super::*;
use amity_protocol::conn::TlsAlert;
use amity_shared::federated::LossStats;

/// A worker core for the tiny preset, and the run's `Registered` message.
fn setup(fault: Option<Fault>) -> (WorkerCore, Config, ServerMsg) {
    let (core, first) = WorkerCore::new(CoreOptions {
        backend: "flex".into(),
        local_shards: Vec::new(),
        slowdown: 1.0,
        fault,
        progress: false,
    });
    assert!(matches!(first[..], [WorkerAction::Connect]));
    let run = Config::preset("tiny").unwrap();
    let registered = ServerMsg::Registered {
        worker: 7,
        run: toml::to_string(&run).unwrap(),
        codec: "topk0.01+int8".into(),
        target_policy: "coordinator-ema".into(),
    };
    (core, run, registered)
}

fn welcome() -> ServerMsg {
    ServerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        identity: "uni-a".into(),
        time_ms: 0,
    }
}

/// Connects and registers; returns the actions of the registration.
fn register(core: &mut WorkerCore, registered: &ServerMsg) -> Vec<WorkerAction> {
    let hello = core.handle(Input::Connected, 0);
    assert!(matches!(
        hello[..],
        [WorkerAction::Send(ClientMsg::Hello { .. })]
    ));
    let mut acts = core.handle(Input::Message(welcome()), 0);
    if let [WorkerAction::MeasureThroughput(_)] = acts[..] {
        acts = core.handle(Input::Throughput(3.5), 0);
    }
    assert!(
        matches!(acts[..], [WorkerAction::Send(ClientMsg::Register(_))]),
        "{acts:?}"
    );
    core.handle(Input::Message(registered.clone()), 0)
}

/// Announces round `round` starting from `params` (no delta), with no shards.
fn announce(core: &mut WorkerCore, round: u64, params: BlobId, now: u64) -> Vec<WorkerAction> {
    let a = core.handle(
        Input::Message(ServerMsg::RoundAnnounce(RoundAnnounce {
            round,
            state: BlobId([9; 32]),
            params,
            delta: None,
            budget_ms: 10_000,
            steps: 5,
            planned_rounds: 10,
            flush: false,
        })),
        now,
    );
    assert!(a.is_empty(), "{a:?}");
    core.handle(
        Input::Message(ServerMsg::ShardAssignment {
            round,
            shards: Vec::new(),
        }),
        now,
    )
}

/// A pseudo-gradient of the tiny model's length, seeded.
fn update(run: &Config, seed: u64) -> LocalUpdate {
    let n = GlobalParams::seeded(run).model.len();
    let mut rng = amity_shared::rng::Rng::new(seed);
    LocalUpdate {
        model_delta: (0..n).map(|_| rng.normal() as f32 * 1e-3).collect(),
        target_delta: None,
        samples: 40,
        steps: 5,
        loss: LossStats {
            mean: 0.5,
            first: 0.6,
            last: 0.4,
            baseline: 0.7,
        },
    }
}

fn train_job(acts: &[WorkerAction]) -> &TrainJob {
    match acts {
        [.., WorkerAction::Train(job)] => job,
        other => panic!("expected a training job, got {other:?}"),
    }
}

fn header(acts: &[WorkerAction]) -> (u64, BlobId, u64) {
    let stored = acts.iter().find_map(|a| match a {
        WorkerAction::StoreUpdate(b) => Some(b),
        _ => None,
    });
    let sent = acts.iter().find_map(|a| match a {
        WorkerAction::Send(ClientMsg::UpdateHeader {
            round, blob, bytes, ..
        }) => Some((*round, *blob, *bytes)),
        _ => None,
    });
    let (stored, sent) = (stored.expect("update stored"), sent.expect("header sent"));
    assert_eq!(
        BlobId::of(stored),
        sent.1,
        "the header names the stored blob"
    );
    sent
}

#[test]
fn registration_makes_a_trainer_and_round_zero_needs_no_download() {
    let (mut core, run, registered) = setup(None);
    let acts = register(&mut core, &registered);
    assert!(matches!(&acts[..], [WorkerAction::NewTrainer(c)] if **c == run));
    let init = GlobalParams::seeded(&run).hash();
    let acts = announce(&mut core, 0, init, 100);
    // Held already (the seeded state): straight to training, no fetch.
    let job = train_job(&acts);
    assert_eq!(acts.len(), 1);
    assert_eq!(job.round, 0);
    assert_eq!(job.options.worker, 7, "the worker's id reaches its seeds");
    // Both budgets were announced: the worker stops at whichever runs out first.
    assert_eq!(job.options.budget.steps, Some(5));
    assert!(
        job.options
            .budget
            .time
            .is_some_and(|t| t <= std::time::Duration::from_secs(10)),
        "{:?}",
        job.options.budget
    );
    assert_eq!(job.options.progress.planned_rounds, 10);
    assert_eq!(job.options.policy, TargetPolicy::CoordinatorEma);
}

#[test]
fn reconnect_keeps_optimiser_state_and_residual() {
    let (mut core, run, registered) = setup(None);
    register(&mut core, &registered);
    let init = GlobalParams::seeded(&run).hash();
    announce(&mut core, 0, init, 0);
    let acts = core.handle(Input::Trained(Ok(update(&run, 1))), 500);
    let (round, _, _) = header(&acts);
    assert_eq!(round, 0);
    let residual = core.residual().to_vec();
    assert!(
        residual.iter().any(|v| *v != 0.0),
        "top-k holds most of the update back"
    );

    // The connection drops; the core backs off, then reconnects.
    let acts = core.handle(Input::Lost(Disconnect::lost("reset")), 600);
    assert!(
        matches!(acts[..], [WorkerAction::Disconnect, WorkerAction::ConnectAfter(d)] if d == FIRST_BACKOFF),
        "{acts:?}"
    );
    // Registering into the same run: the trainer (AdamW state) is kept, and our measured
    // throughput is announced.
    let acts = register(&mut core, &registered);
    assert!(acts.is_empty(), "no new trainer on a reconnect: {acts:?}");
    assert_eq!(core.residual(), &residual[..], "residual kept");

    // The next round starts where this worker's training stands: the state less what its
    // residual still holds back; the update then carries the residual: it differs from one
    // encoded without it.
    let acts = announce(&mut core, 1, init, 1000);
    let start = &train_job(&acts).start;
    let seeded = GlobalParams::seeded(&run);
    assert_eq!(
        start.target, seeded.target,
        "coordinator EMA: no target residual"
    );
    assert!(
        start
            .model
            .iter()
            .zip(&seeded.model)
            .zip(&residual)
            .all(|((s, g), r)| *s == *g - *r)
    );
    let next = update(&run, 2);
    let acts = core.handle(Input::Trained(Ok(next.clone())), 1500);
    let (_, blob, _) = header(&acts);
    let spec: CodecSpec = "topk0.01+int8".parse().unwrap();
    let (fresh, _) =
        ErrorFeedback::new().encode_parts(&spec, next.wire_values(), &next.wire_parts());
    assert_ne!(
        BlobId::of(&fresh),
        blob,
        "the residual went into the update"
    );
    assert_eq!(core.summary().steps, 10);
}

#[test]
fn backoff_doubles_up_to_its_cap_and_starts_over_once_connected() {
    let (mut core, _, _) = setup(None);
    let mut waits = Vec::new();
    for _ in 0..8 {
        let acts = core.handle(Input::Lost(Disconnect::lost("refused")), 0);
        match acts[..] {
            [WorkerAction::ConnectAfter(d)] => waits.push(d.as_millis()),
            _ => panic!("{acts:?}"),
        }
    }
    assert_eq!(waits, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
    core.handle(Input::Connected, 0);
    let acts = core.handle(Input::Lost(Disconnect::lost("reset")), 0);
    assert!(
        matches!(acts[..], [WorkerAction::Disconnect, WorkerAction::ConnectAfter(d)] if d == FIRST_BACKOFF)
    );
}

#[test]
fn a_refused_certificate_stops_retries() {
    for refusal in [
        HandshakeRefusal::ByPeer(TlsAlert(48)),
        HandshakeRefusal::ByUs(TlsAlert(42)),
    ] {
        let (mut core, _, _) = setup(None);
        let acts = core.handle(
            Input::Lost(Disconnect::Refused {
                refusal,
                detail: "127.0.0.1:4433: aborted by peer".into(),
            }),
            0,
        );
        match &acts[..] {
            [WorkerAction::Finish(Err(WorkerError::Handshake(why)))] => {
                assert!(why.contains("not retrying"), "{why}");
                assert!(why.contains("127.0.0.1:4433"), "{why}");
            }
            other => panic!("expected to give up, got {other:?}"),
        }
        assert!(core.finished());
        assert!(
            core.handle(Input::Tick, 0).is_empty(),
            "nothing after the end"
        );
    }
}

#[test]
fn a_finished_run_ends_the_worker() {
    // Told on the control stream.
    let (mut core, _, registered) = setup(None);
    register(&mut core, &registered);
    let acts = core.handle(
        Input::Message(ServerMsg::Error {
            code: ErrorCode::Finished,
            message: "training finished".into(),
        }),
        0,
    );
    assert!(
        matches!(
            acts[..],
            [
                WorkerAction::Send(ClientMsg::Goodbye),
                WorkerAction::Disconnect,
                WorkerAction::Finish(Ok(()))
            ]
        ),
        "{acts:?}"
    );
    // Or only by the connection's close code (the message was lost).
    let (mut core, _, registered) = setup(None);
    register(&mut core, &registered);
    let acts = core.handle(
        Input::Lost(Disconnect::Lost {
            why: "closed by peer: training finished".into(),
            code: Some(ErrorCode::Finished),
        }),
        0,
    );
    assert!(
        matches!(acts[..], [WorkerAction::Finish(Ok(()))]),
        "{acts:?}"
    );
    // A coordinator that shuts down before the end is waited for instead.
    let (mut core, _, registered) = setup(None);
    register(&mut core, &registered);
    let acts = core.handle(
        Input::Message(ServerMsg::Error {
            code: ErrorCode::ShuttingDown,
            message: "coordinator shutting down".into(),
        }),
        0,
    );
    assert!(matches!(
        acts[..],
        [WorkerAction::Disconnect, WorkerAction::ConnectAfter(_)]
    ));
    assert!(!core.finished());
}

#[test]
fn a_round_abandoned_on_ctrl_c_says_goodbye() {
    let (mut core, run, registered) = setup(None);
    register(&mut core, &registered);
    let init = GlobalParams::seeded(&run).hash();
    train_job(&announce(&mut core, 0, init, 0));
    // Ctrl-C while the job trains: nothing until it returns (it sees the stop flag).
    assert!(core.handle(Input::Stop, 10).is_empty());
    let acts = core.handle(Input::Trained(Ok(update(&run, 1))), 20);
    assert!(
        matches!(
            acts[..],
            [
                WorkerAction::Send(ClientMsg::Goodbye),
                WorkerAction::Disconnect,
                WorkerAction::Finish(Ok(()))
            ]
        ),
        "no upload, a goodbye: {acts:?}"
    );
    assert_eq!(core.summary().steps, 5, "the steps taken still count");
    // Ctrl-C between rounds leaves at once.
    let (mut core, _, registered) = setup(None);
    register(&mut core, &registered);
    let acts = core.handle(Input::Stop, 0);
    assert!(matches!(
        acts[..],
        [
            WorkerAction::Send(ClientMsg::Goodbye),
            WorkerAction::Disconnect,
            WorkerAction::Finish(Ok(()))
        ]
    ));
}

#[test]
fn a_refusal_at_registration_is_final_and_a_bad_run_config_is_named() {
    let (mut core, _, _) = setup(None);
    core.handle(Input::Connected, 0);
    let acts = core.handle(
        Input::Message(ServerMsg::Error {
            code: ErrorCode::VersionMismatch,
            message: "speaks 5".into(),
        }),
        0,
    );
    assert!(
        matches!(&acts[..], [WorkerAction::Finish(Err(WorkerError::Refused(m)))] if m.contains("speaks 5"))
    );

    let (mut core, _, _) = setup(None);
    let bad = ServerMsg::Registered {
        worker: 1,
        run: "not = [toml".into(),
        codec: "fp32".into(),
        target_policy: "local-ema".into(),
    };
    let acts = register(&mut core, &bad);
    assert!(
        matches!(&acts[..], [WorkerAction::Finish(Err(WorkerError::Refused(m)))] if m.contains("run config")),
        "{acts:?}"
    );

    let (mut core, run, _) = setup(None);
    let bad = ServerMsg::Registered {
        worker: 1,
        run: toml::to_string(&run).unwrap(),
        codec: "fp32".into(),
        target_policy: "global-ema".into(),
    };
    let acts = register(&mut core, &bad);
    assert!(
        matches!(&acts[..], [WorkerAction::Finish(Err(WorkerError::Refused(m)))] if m.contains("global-ema")),
        "{acts:?}"
    );
}

#[test]
fn a_state_not_held_is_fetched_and_checked_against_its_hash() {
    let (mut core, run, registered) = setup(None);
    register(&mut core, &registered);
    let other = GlobalParams {
        model: vec![0.5; GlobalParams::seeded(&run).model.len()],
        target: vec![0.25; GlobalParams::seeded(&run).target.len()],
    };
    let hash = other.hash();
    let acts = announce(&mut core, 3, hash, 0);
    let WorkerAction::Fetch { id, .. } = acts[0] else {
        panic!("{acts:?}")
    };
    assert_eq!(id, BlobId([9; 32]), "the announced state blob");
    // Bytes that are no checkpoint: the state is not trusted, the session restarts.
    let acts = core.handle(
        Input::Fetched {
            id,
            bytes: b"junk".to_vec(),
            downloaded: 4,
        },
        10,
    );
    assert!(
        matches!(
            acts[..],
            [WorkerAction::Disconnect, WorkerAction::ConnectAfter(_)]
        ),
        "{acts:?}"
    );
    assert_eq!(core.summary().bytes_down, 4);
}

#[test]
fn updates_are_faulted_only_when_asked_and_replays_sent_twice() {
    let (mut core, run, registered) = setup(Some(Fault::Replay));
    register(&mut core, &registered);
    let init = GlobalParams::seeded(&run).hash();
    announce(&mut core, 0, init, 0);
    let acts = core.handle(Input::Trained(Ok(update(&run, 1))), 10);
    let headers = acts
        .iter()
        .filter(|a| matches!(a, WorkerAction::Send(ClientMsg::UpdateHeader { .. })))
        .count();
    assert_eq!(headers, 2);

    let (mut core, run, registered) = setup(Some(Fault::Oversize));
    register(&mut core, &registered);
    announce(&mut core, 0, init, 0);
    let acts = core.handle(Input::Trained(Ok(update(&run, 1))), 10);
    let stored = acts.iter().find_map(|a| match a {
        WorkerAction::StoreUpdate(b) => Some(b.len() as u64),
        _ => None,
    });
    let (_, _, announced) = header(&acts);
    assert_eq!(Some(announced + 1), stored, "announced one byte short");

    // A huge update goes out, but the residual (where the next round starts) is the honest one.
    let (mut core, run, registered) = setup(Some(Fault::Huge));
    register(&mut core, &registered);
    announce(&mut core, 0, init, 0);
    let honest = update(&run, 1);
    let acts = core.handle(Input::Trained(Ok(honest.clone())), 10);
    let (_, blob, _) = header(&acts);
    let spec: CodecSpec = "topk0.01+int8".parse().unwrap();
    let mut feedback = ErrorFeedback::new();
    let (fair, _) = feedback.encode_parts(&spec, honest.wire_values(), &honest.wire_parts());
    assert_ne!(BlobId::of(&fair), blob, "the fault reached the wire");
    assert_eq!(
        core.residual(),
        feedback.residual(),
        "the honest residual kept"
    );
}

#[test]
fn an_assignment_while_training_waits_for_the_round_to_end() {
    let (mut core, run, registered) = setup(None);
    register(&mut core, &registered);
    let init = GlobalParams::seeded(&run).hash();
    train_job(&announce(&mut core, 0, init, 0));
    // The next round is announced before this one's job returns (a slow worker).
    assert!(announce(&mut core, 1, init, 50).is_empty());
    let acts = core.handle(Input::Trained(Ok(update(&run, 1))), 100);
    header(&acts);
    assert_eq!(train_job(&acts).round, 1, "the queued round starts");
    // Heartbeats count up whatever the round.
    let beats: Vec<u64> = (0..3)
        .flat_map(|_| core.handle(Input::Tick, 200))
        .map(|a| match a {
            WorkerAction::Send(ClientMsg::Heartbeat { seq }) => seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(beats, [1, 2, 3]);
}

/// A coordinator replica that does not lead sends the worker to the leader it names (or, when it
/// knows none, to the next address); after a failover the update the old leader never
/// acknowledged is offered again for the same round instead of training it twice, and an
/// acknowledged one is not.
#[test]
fn a_failover_redirects_and_offers_the_unacknowledged_update_again() {
    let (mut core, run, registered) = setup(None);
    let hello = core.handle(Input::Connected, 0);
    assert!(matches!(
        hello[..],
        [WorkerAction::Send(ClientMsg::Hello { .. })]
    ));
    core.handle(Input::Message(welcome()), 0);
    let not_leader = |leader: &str| {
        Input::Message(ServerMsg::Error {
            code: ErrorCode::NotLeader,
            message: leader.into(),
        })
    };
    let acts = core.handle(not_leader("coord-2@10.0.0.2:7700"), 10);
    assert!(
        matches!(&acts[..], [WorkerAction::Redirect(Some(l)), WorkerAction::Disconnect, WorkerAction::ConnectAfter(d)]
            if l == "coord-2@10.0.0.2:7700" && *d == FIRST_BACKOFF),
        "{acts:?}"
    );
    assert!(!core.finished(), "a redirect is not a refusal");

    register(&mut core, &registered);
    let init = GlobalParams::seeded(&run).hash();
    announce(&mut core, 0, init, 0);
    let acts = core.handle(Input::Trained(Ok(update(&run, 1))), 500);
    let (round, blob, _) = header(&acts);
    // The leader dies before acknowledging; the next replica knows no leader yet.
    core.handle(Input::Lost(Disconnect::lost("reset")), 600);
    let hello = core.handle(Input::Connected, 700);
    assert!(matches!(
        hello[..],
        [WorkerAction::Send(ClientMsg::Hello { .. })]
    ));
    core.handle(Input::Message(welcome()), 700);
    let acts = core.handle(not_leader(""), 710);
    assert!(matches!(acts[0], WorkerAction::Redirect(None)), "{acts:?}");
    // The new leader announces round 0 again: the same update is offered, nothing trains.
    register(&mut core, &registered);
    let acts = announce(&mut core, round, init, 800);
    assert!(
        matches!(&acts[..], [WorkerAction::Send(ClientMsg::UpdateHeader { round: 0, blob: b, .. })] if *b == blob),
        "{acts:?}"
    );
    core.handle(Input::Message(ServerMsg::Ack { of: 0 }), 900);
    // Round 1 trains as usual; acknowledged, it is not offered again on a later failover.
    let acts = announce(&mut core, 1, init, 1000);
    train_job(&acts);
    let acts = core.handle(Input::Trained(Ok(update(&run, 2))), 1500);
    header(&acts);
    core.handle(Input::Message(ServerMsg::Ack { of: 1 }), 1600);
    core.handle(Input::Lost(Disconnect::lost("reset")), 1700);
    register(&mut core, &registered);
    let acts = announce(&mut core, 1, init, 1800);
    train_job(&acts);
}
