//! Operator decisions: pause and resume, revoke and reinstate; journalled, and kept by snapshots.

use super::*;

fn op(core: &mut Core, action: OperatorAction, now: u64) -> Vec<Action> {
    core.handle(Event::Operator(action), now)
}

#[test]
fn a_pause_lets_the_round_under_way_close_and_starts_no_other_until_resumed() {
    let (mut core, _) = setup(TargetPolicy::LocalEma);
    join(&mut core, 1, "uni-a", 30.0, 0);
    join(&mut core, 2, "uni-b", 10.0, 5);
    assert!(core.running());
    let acts = op(&mut core, OperatorAction::Pause, 10);
    assert!(matches!(
        acts[0],
        Action::Persist(LogEntry::Operator(OperatorAction::Pause))
    ));
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Operator(s) if s.paused))
    );
    send(&mut core, 1, 0, 1.0, 1, 50);
    let acts = send(&mut core, 2, 0, 1.0, 2, 60);
    assert!(acts.iter().any(|a| matches!(a, Action::RoundClosed(_))));
    assert_eq!(core.round(), 1);
    assert!(!core.running(), "paused: no round 1");
    assert!(core.handle(Event::Tick, 5_000).is_empty());
    assert!(!core.running());
    let acts = op(&mut core, OperatorAction::Resume, 6_000);
    assert!(core.running(), "resumed: round 1 starts");
    assert!(
        sent_to(&acts, 1)
            .iter()
            .any(|m| matches!(m, ServerMsg::RoundAnnounce(a) if a.round == 1))
    );
}

#[test]
fn a_revoked_institution_loses_its_sessions_and_its_pending_update_and_cannot_rejoin() {
    let (mut core, _) = setup(TargetPolicy::LocalEma);
    join(&mut core, 1, "uni-a", 30.0, 0);
    join(&mut core, 2, "uni-b", 10.0, 5);
    join(&mut core, 3, "uni-c", 10.0, 6);
    send(&mut core, 2, 0, 1.0, 2, 50);
    let acts = op(
        &mut core,
        OperatorAction::Revoke {
            name: "uni-b".into(),
        },
        60,
    );
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Operator(s) if s.revoked.contains("uni-b") && !s.paused))
    );
    let names: Vec<String> = core.workers().into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["uni-a", "uni-c"]);
    // A new session of the revoked name is turned away.
    let acts = join(&mut core, 4, "uni-b", 10.0, 70);
    assert!(matches!(
        sent_to(&acts, 4)[..],
        [ServerMsg::Error {
            code: ErrorCode::Revoked,
            ..
        }]
    ));
    assert_eq!(core.workers().len(), 2);
    // The round (announced to uni-a and uni-b) closes on uni-a's update alone.
    let acts = send(&mut core, 1, 0, 1.0, 1, 80);
    let summary = acts
        .iter()
        .find_map(|a| match a {
            Action::RoundClosed(s) => Some(s.clone()),
            _ => None,
        })
        .expect("round closed");
    assert_eq!(summary.accepted, ["uni-a"]);
    assert!(summary.missing.is_empty(), "{:?}", summary.missing);
    // Reinstated, it may join again.
    op(
        &mut core,
        OperatorAction::Reinstate {
            name: "uni-b".into(),
        },
        100,
    );
    let acts = join(&mut core, 5, "uni-b", 10.0, 110);
    assert!(matches!(sent_to(&acts, 5)[0], ServerMsg::Registered { .. }));
}

#[test]
fn operator_decisions_survive_a_snapshot_and_a_journal_replay() {
    let (mut core, _) = setup(TargetPolicy::LocalEma);
    op(&mut core, OperatorAction::Pause, 0);
    op(
        &mut core,
        OperatorAction::Revoke {
            name: "uni-x".into(),
        },
        1,
    );
    let snap = core.snapshot();
    let bytes = snap.to_bytes();
    let (restored, acts) =
        Core::restore(core.config().clone(), Snapshot::from_bytes(&bytes).unwrap()).unwrap();
    assert_eq!(restored.operator(), core.operator());
    // The shell learns the restored decisions (it refuses revoked names at the handshake).
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Operator(s) if s.revoked.contains("uni-x")))
    );
    // Replayed from the journal onto an older snapshot: the same state.
    let (fresh, _) = setup(TargetPolicy::LocalEma);
    let mut replayed = fresh;
    replayed.replay_operator(&OperatorAction::Pause);
    replayed.replay_operator(&OperatorAction::Revoke {
        name: "uni-x".into(),
    });
    assert_eq!(replayed.operator(), core.operator());
    // A paused core does not start its first round however many join.
    join(&mut replayed, 1, "uni-a", 1.0, 0);
    join(&mut replayed, 2, "uni-b", 1.0, 0);
    assert!(!replayed.running());
}
