//! Round budgets: local training time, local steps, or both (a capped timed round).

use super::*;
use crate::config::RoundPolicy;

/// The round announcement `actions` send to `worker`.
fn announced(actions: &[Action], worker: u64) -> RoundAnnounce {
    sent_to(actions, worker)
        .into_iter()
        .find_map(|m| match m {
            ServerMsg::RoundAnnounce(a) => Some(a.clone()),
            _ => None,
        })
        .expect("a round was announced")
}

/// A heartbeat from `worker` at `now`.
fn heartbeat(core: &mut Core, worker: u64, now: u64) {
    core.handle(
        Event::Heartbeat {
            worker: WorkerId(worker),
        },
        now,
    );
}

/// The throughput the core holds for `worker`.
fn speed(core: &Core, worker: u64) -> f64 {
    core.workers[&WorkerId(worker)].info.samples_per_s
}

#[test]
fn an_unset_time_budget_is_ten_seconds_without_steps_and_none_with_them() {
    let timed: RoundPolicy = toml::from_str("min_workers = 2").unwrap();
    assert_eq!(timed.time_budget_ms(), RoundPolicy::DEFAULT_BUDGET_MS);
    // A config that sets only `steps` keeps step-budgeted rounds, with no time limit.
    let stepped: RoundPolicy = toml::from_str("steps = 4").unwrap();
    assert_eq!((stepped.steps, stepped.time_budget_ms()), (4, 0));
    let capped: RoundPolicy = toml::from_str("steps = 80\nbudget_ms = 8000").unwrap();
    assert_eq!((capped.steps, capped.time_budget_ms()), (80, 8000));
}

#[test]
fn a_round_capped_in_steps_and_time_announces_both_and_closes_at_its_deadline() {
    let (mut core, _) = setup(TargetPolicy::CoordinatorEma);
    // setup: budget_ms 1000, grace_ms 1000.
    core.cfg.rounds.steps = 4;
    join(&mut core, 1, "a", 10.0, 0);
    let acts = join(&mut core, 2, "b", 10.0, 0);
    let a = announced(&acts, 1);
    assert_eq!((a.budget_ms, a.steps), (1000, 4));

    // A claim beyond the step cap is refused; one within it is taken, and sets the worker's
    // throughput as what it delivered over the time budget (32 clips in 1 s).
    let mut greedy = update(&core, 0, 1.0, 2);
    greedy.steps = 5;
    greedy.samples = 5;
    let acts = core.handle(
        Event::Update {
            worker: WorkerId(2),
            update: greedy,
        },
        50,
    );
    assert!(
        matches!(&sent_to(&acts, 2)[..], [ServerMsg::Error { code: ErrorCode::Malformed, message }]
            if message.contains("round of 4")),
        "{acts:?}"
    );
    send(&mut core, 1, 0, 1.0, 1, 100);
    assert_eq!(speed(&core, 1), 32.0);
    // b's refusal was its delivery, so the round closed with a's update alone.
    assert_eq!(core.round(), 1);

    // Round 1: b never delivers; the round lasts its time budget and its grace.
    send(&mut core, 1, 1, 1.0, 3, 200);
    heartbeat(&mut core, 2, 1500);
    core.handle(Event::Tick, 1999);
    assert_eq!(core.round(), 1, "within the budget and the grace");
    heartbeat(&mut core, 2, 2050);
    core.handle(Event::Tick, 2101);
    assert_eq!(core.round(), 2, "closed at 100 + 1000 + 1000 ms");
}

#[test]
fn a_step_budgeted_round_announces_no_time_and_waits_its_grace() {
    let (mut core, _) = setup(TargetPolicy::CoordinatorEma);
    core.cfg.rounds.steps = 4;
    core.cfg.rounds.budget_ms = None;
    join(&mut core, 1, "a", 10.0, 0);
    let acts = join(&mut core, 2, "b", 10.0, 0);
    let a = announced(&acts, 2);
    assert_eq!((a.budget_ms, a.steps), (0, 4));
    send(&mut core, 1, 0, 1.0, 1, 100);
    assert_eq!(
        speed(&core, 1),
        10.0,
        "no time budget: the claimed speed stays"
    );
    core.handle(Event::Tick, 999);
    assert_eq!(core.round(), 0);
    core.handle(Event::Tick, 1001);
    assert_eq!(core.round(), 1, "closed at the grace, without b");
}
