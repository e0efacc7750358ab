//! The end of a run: a worker that joins after it is told so instead of waiting for a round.

use super::*;

/// Measured under CI load (the replicated fault test): a worker that followed a "not the
/// leader" redirect as the run ended joined the new leader after it had told every open
/// session, was registered and waited for a round that never came.
#[test]
fn a_worker_that_joins_after_the_run_finished_is_told_so_and_not_registered() {
    let run = Config::preset("tiny").unwrap();
    let start = GlobalParams::seeded(&run);
    let mut cfg = CoreConfig::new(run);
    cfg.rounds.min_workers = 1;
    cfg.rounds.steps = 4;
    cfg.rounds.max_rounds = 1;
    cfg.checkpoint_every = 0;
    let (mut core, _) = Core::new(cfg, start, &[]);
    join(&mut core, 1, "uni-a", 1.0, 0);
    let acts = send(&mut core, 1, 0, 1.0, 1, 10);
    assert!(
        acts.iter().any(|a| matches!(a, Action::Finished)),
        "{acts:?}"
    );
    assert!(core.finished());

    let acts = join(&mut core, 2, "uni-b", 1.0, 20);
    match &sent_to(&acts, 2)[..] {
        [ServerMsg::Error { code, message }] => {
            assert_eq!(*code, ErrorCode::Finished);
            assert_eq!(message, FINISHED_REASON);
        }
        other => panic!("uni-b was sent {other:?}"),
    }
    let names: Vec<String> = core.workers().into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["uni-a"], "uni-b must not be registered");
    // Nothing else happens: no round starts for it.
    assert!(
        !acts.iter().any(|a| matches!(
            a,
            Action::Send {
                msg: ServerMsg::RoundAnnounce(_),
                ..
            }
        )),
        "{acts:?}"
    );
}
