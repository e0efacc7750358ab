//! The core replayed from its logged commands.

use super::*;

/// The Raft issue's premise: the core is a function of its inputs. A second core fed the first
/// one's inputs as logged commands (bytes, updates by blob id, the logged time only) emits the
/// same actions and lands on the same parameters hash, through joins, a refusal, a silent
/// worker timed out, a NaN update screened out, a leave and a rejoin.
#[test]
fn a_core_replaying_the_logged_commands_computes_the_same_state() {
    let (mut leader, _) = setup(TargetPolicy::CoordinatorEma);
    let (mut replica, _) = setup(TargetPolicy::CoordinatorEma);
    let mut blobs: std::collections::HashMap<BlobId, UpdateValues> = Default::default();
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut step = |leader: &mut Core, event: Event, now: u64| {
        if let Event::Update { update, .. } = &event {
            blobs.insert(update.blob, update.values.clone());
        }
        log.push(Command::of(&event, now).to_bytes());
        let theirs = {
            let cmd = Command::from_bytes(log.last().unwrap()).unwrap();
            let (event, at) = cmd
                .into_event(|u| {
                    blobs
                        .get(&u.blob)
                        .cloned()
                        .ok_or_else(|| format!("blob {} missing", u.blob))
                })
                .unwrap();
            replica.handle(event, at)
        };
        let ours = leader.handle(event, now);
        // Compared as text: a NaN loss is equal to itself there.
        assert_eq!(format!("{ours:?}"), format!("{theirs:?}"), "at {now} ms");
        assert_eq!(leader.params().hash(), replica.params().hash());
    };
    let joined = |id: u64, name: &str| Event::Joined {
        worker: WorkerId(id),
        info: JoinInfo {
            name: name.into(),
            backend: "flex".into(),
            samples_per_s: 10.0,
            local_shards: Vec::new(),
        },
    };
    step(&mut leader, joined(1, "a"), 0);
    step(&mut leader, joined(2, "b"), 5);
    let u = update(&leader, 0, 1.0, 1);
    step(
        &mut leader,
        Event::Update {
            worker: WorkerId(1),
            update: u,
        },
        100,
    );
    step(
        &mut leader,
        Event::UpdateRefused {
            worker: WorkerId(2),
            round: 0,
            reason: "did not decode".into(),
        },
        150,
    );
    step(&mut leader, Event::Tick, 2001);
    assert_eq!(leader.round(), 1);
    let mut bad = update(&leader, 1, 1.0, 2);
    bad.values.held_mut().unwrap()[3] = f32::NAN;
    bad.loss.mean = f32::NAN;
    step(
        &mut leader,
        Event::Update {
            worker: WorkerId(2),
            update: bad,
        },
        2100,
    );
    let u = update(&leader, 1, 1.0, 3);
    step(
        &mut leader,
        Event::Update {
            worker: WorkerId(1),
            update: u,
        },
        2200,
    );
    assert_eq!(leader.round(), 2);
    step(
        &mut leader,
        Event::Heartbeat {
            worker: WorkerId(1),
        },
        2300,
    );
    step(
        &mut leader,
        Event::Left {
            worker: WorkerId(2),
        },
        2400,
    );
    step(&mut leader, joined(3, "b"), 2500);
    step(&mut leader, Event::Tick, 30_000);
    assert!(leader.round() >= 3, "round {}", leader.round());
    // Each entry is small whatever the model's size: the values stay in their blobs.
    assert!(
        log.iter().all(|e| e.len() < 1024),
        "{:?}",
        log.iter().map(Vec::len).max()
    );
    assert!(Command::from_bytes(b"{\"at_ms\":1}").is_err());
}

/// A Raft entry carries an update's encoded bytes after the command's JSON, and gives them back;
/// bytes after any other command are refused.
#[test]
fn raft_entries_carry_the_encoded_update() {
    use crate::core::{LoggedEvent, UpdateRef};
    let update = UpdateRef {
        encoded: Some(vec![0, 1, 2, 255, 0]),
        round: 3,
        blob: amity_shared::store::BlobId::of(&[0, 1, 2, 255, 0]),
        bytes: 5,
        samples: 8,
        steps: 2,
        loss: amity_shared::federated::LossStats {
            mean: f32::NAN,
            first: 1.0,
            last: 0.5,
            baseline: 2.0,
        },
    };
    let cmd = Command {
        at_ms: 1234,
        event: LoggedEvent::Update {
            worker: WorkerId(7),
            update,
        },
    };
    let back = Command::from_entry(&cmd.to_entry()).unwrap();
    let (LoggedEvent::Update { update: a, .. }, LoggedEvent::Update { update: b, .. }) =
        (&back.event, &cmd.event)
    else {
        panic!("{back:?}");
    };
    assert_eq!(a.encoded, b.encoded);
    assert_eq!((a.blob, a.round, back.at_ms), (b.blob, b.round, 1234));
    // The journal's form leaves the bytes out.
    assert!(!cmd.to_bytes().contains(&0));
    let tick = Command::of(&Event::Tick, 5);
    assert_eq!(Command::from_entry(&tick.to_entry()).unwrap(), tick);
    let mut trailing = tick.to_entry();
    trailing.extend_from_slice(&[0, 9]);
    assert!(matches!(
        Command::from_entry(&trailing),
        Err(crate::core::BadCommand::Trailing)
    ));
}
