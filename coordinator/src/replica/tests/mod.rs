//! Replicas in one process over a simulated network that can drop a replica or cut it off:
//! election, ordering, a leader's death, a restart from disk, and catching up by snapshot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use super::*;
use crate::core::LoggedEvent;
use raft::prelude::Entry;

struct Node {
    replica: Option<Replica>,
    /// What the state machine holds: the snapshot it restored (index, data) and the commands
    /// applied after it.
    base: Option<(u64, Vec<u8>)>,
    applied: Vec<(u64, Command)>,
    /// Read-index answers: (context, index).
    reads: Vec<(Vec<u8>, u64)>,
}

struct Cluster {
    dir: PathBuf,
    voters: Vec<u64>,
    nodes: BTreeMap<u64, Node>,
    /// Replicas whose messages, both ways, are dropped.
    cut: BTreeSet<u64>,
    /// The leader seen in each term: never two.
    leaders: BTreeMap<u64, u64>,
}

/// Replica `id`'s entry in the group's list (addresses are never dialled here).
pub(super) fn entry(id: u64) -> ReplicaEntry {
    ReplicaEntry {
        id,
        name: format!("replica-{id}"),
        peer: format!("10.0.0.{id}:7701").parse().unwrap(),
        workers: format!("10.0.0.{id}:7700").parse().unwrap(),
    }
}

fn cmd(i: u64) -> Command {
    Command {
        at_ms: i,
        event: LoggedEvent::Tick,
    }
}

impl Cluster {
    fn new(name: &str, n: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("amity-replica-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let voters: Vec<u64> = (1..=n).collect();
        let mut c = Cluster {
            dir,
            voters: voters.clone(),
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            leaders: BTreeMap::new(),
        };
        for id in voters {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: u64) {
        self.start_with(id, self.voters.clone());
    }

    fn start_with(&mut self, id: u64, voters: Vec<u64>) {
        let ids: BTreeSet<u64> = voters.iter().copied().chain([id]).collect();
        let members = ids.into_iter().map(entry).collect();
        let cfg = ReplicaConfig {
            id,
            voters,
            members,
        };
        let replica = Replica::open(&cfg, &self.dir.join(format!("raft-{id}.redb"))).unwrap();
        let base = replica.base().unwrap();
        self.nodes.insert(
            id,
            Node {
                replica: Some(replica),
                base,
                applied: Vec::new(),
                reads: Vec::new(),
            },
        );
    }

    fn kill(&mut self, id: u64) {
        self.nodes.get_mut(&id).unwrap().replica = None;
    }

    /// Handles every replica's ready output and delivers messages until nothing moves.
    fn pump(&mut self) {
        let mut queue: VecDeque<(u64, u64, Vec<u8>)> = VecDeque::new();
        loop {
            for (&id, node) in self.nodes.iter_mut() {
                let Some(r) = node.replica.as_mut() else {
                    continue;
                };
                let out = r.ready().unwrap();
                if let Some(snap) = out.snapshot {
                    node.base = Some(snap);
                    node.applied.clear();
                }
                node.applied.extend(out.committed);
                node.reads.extend(out.reads);
                if r.wants_snapshot()
                    && let Some(&(index, _)) = node.applied.last()
                {
                    r.compact(index, format!("state at {index}").into_bytes())
                        .unwrap();
                }
                queue.extend(out.messages.into_iter().map(|(to, b)| (id, to, b)));
                if r.is_leader() {
                    let seen = *self.leaders.entry(r.term()).or_insert(id);
                    assert_eq!(seen, id, "two leaders in term {}", r.term());
                }
            }
            if queue.is_empty() {
                return;
            }
            while let Some((from, to, bytes)) = queue.pop_front() {
                if self.cut.contains(&from) || self.cut.contains(&to) {
                    continue;
                }
                if let Some(r) = self.nodes.get_mut(&to).and_then(|n| n.replica.as_mut()) {
                    r.step(from, &bytes).unwrap();
                }
            }
        }
    }

    fn tick(&mut self, n: usize) {
        for _ in 0..n {
            for node in self.nodes.values_mut() {
                if let Some(r) = node.replica.as_mut() {
                    r.tick();
                }
            }
            self.pump();
        }
    }

    /// The live, connected leader, after ticking until there is one.
    fn leader(&mut self) -> u64 {
        for _ in 0..200 {
            let found = self.nodes.iter().find_map(|(&id, n)| {
                n.replica
                    .as_ref()
                    .filter(|r| r.is_leader() && !self.cut.contains(&id))
                    .map(|_| id)
            });
            if let Some(id) = found {
                return id;
            }
            self.tick(1);
        }
        panic!("no leader after 200 ticks");
    }

    fn propose(&mut self, range: std::ops::Range<u64>) {
        let l = self.leader();
        for i in range {
            self.nodes
                .get_mut(&l)
                .unwrap()
                .replica
                .as_mut()
                .unwrap()
                .propose(&cmd(i))
                .unwrap();
        }
        self.pump();
        // A heartbeat round tells followers the new commit index.
        self.tick(3);
    }

    fn commands(&self, id: u64) -> Vec<u64> {
        self.nodes[&id]
            .applied
            .iter()
            .map(|(_, c)| c.at_ms)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn three_replicas_commit_the_same_commands_in_the_same_order() {
    let mut c = Cluster::new("order", 3);
    c.propose(0..10);
    let want: Vec<u64> = (0..10).collect();
    for id in 1..=3 {
        assert_eq!(c.commands(id), want, "replica {id}");
    }
    // A follower refuses a proposal and names the leader.
    let l = c.leader();
    let f = (1..=3).find(|&i| i != l).unwrap();
    let err = c
        .nodes
        .get_mut(&f)
        .unwrap()
        .replica
        .as_mut()
        .unwrap()
        .propose(&cmd(99));
    assert!(
        matches!(err, Err(ReplicaError::NotLeader { leader: Some(x) }) if x == l),
        "{err:?}"
    );
}

#[test]
fn a_dead_leader_loses_nothing_committed_and_its_restart_catches_up() {
    let mut c = Cluster::new("failover", 3);
    c.propose(0..5);
    let old = c.leader();
    c.kill(old);
    c.propose(5..10);
    let new = c.leader();
    assert_ne!(new, old);
    let want: Vec<u64> = (0..10).collect();
    for id in (1..=3).filter(|&i| i != old) {
        assert_eq!(c.commands(id), want, "replica {id}");
    }
    // Restarted from its redb file alone, it replays its own log and receives the rest.
    c.start(old);
    c.tick(10);
    assert_eq!(c.commands(old), want);
    assert!(c.nodes[&old].replica.as_ref().unwrap().term() >= 2);
}

#[test]
fn a_replica_cut_off_past_a_compaction_catches_up_by_snapshot() {
    let mut c = Cluster::new("snapshot", 3);
    c.propose(0..4);
    let l = c.leader();
    let lagging = (1..=3).find(|&i| i != l).unwrap();
    c.cut.insert(lagging);
    c.propose(4..20);
    // Every connected replica compacts what it applied; its state there is a marker.
    for (&id, node) in c.nodes.iter_mut() {
        if id == lagging {
            continue;
        }
        let (index, _) = *node.applied.last().unwrap();
        let r = node.replica.as_mut().unwrap();
        r.compact(index, format!("state at {index}").into_bytes())
            .unwrap();
    }
    c.cut.clear();
    c.propose(20..22);
    c.tick(10);
    let node = &c.nodes[&lagging];
    let (index, data) = node.base.clone().expect("caught up by snapshot");
    assert_eq!(data, format!("state at {index}").into_bytes());
    // After the snapshot, the commands that followed it, and nothing twice.
    assert_eq!(c.commands(lagging), vec![20, 21]);
    // And restarted, it starts from that snapshot.
    c.kill(lagging);
    c.start(lagging);
    assert_eq!(c.nodes[&lagging].base.as_ref().map(|b| b.0), Some(index));
    c.tick(5);
    assert_eq!(c.commands(lagging), vec![20, 21]);
}

#[test]
fn a_message_in_another_replicas_name_is_refused() {
    let mut c = Cluster::new("impersonation", 3);
    c.leader();
    let mut m = Message::default();
    m.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    m.from = 3;
    m.to = 1;
    m.term = 99;
    let bytes = wire::encode(&m);
    let r = c.nodes.get_mut(&1).unwrap().replica.as_mut().unwrap();
    let err = r.step(2, &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            ReplicaError::Impersonation {
                peer: 2,
                claimed: 3
            }
        ),
        "{err}"
    );
    assert!(r.step(2, b"\x0b\x0b\x0b").is_err());
}

/// The running state of a replica's state machine at each index it applied: a hash chain over
/// the commands, continued from the snapshot it restored (whose data is the chain's value).
fn states(node: &Node) -> Vec<(u64, u64)> {
    let (mut index, mut h) = match &node.base {
        Some((i, data)) => (*i, String::from_utf8_lossy(data).parse::<u64>().unwrap()),
        None => (0, 0),
    };
    let mut out = vec![(index, h)];
    for (i, c) in &node.applied {
        assert!(*i > index, "index {i} applied after {index}");
        h = h.wrapping_mul(0x100000001b3).wrapping_add(c.at_ms + 1);
        index = *i;
        out.push((index, h));
    }
    out
}

/// Kills, restarts, partitions, heals and compactions at random points (the schedule fixed by
/// the seed; raft's own election timeouts are random), checking after every step: at most one
/// leader per term (in `pump`), every replica's state equal to every other's at equal index
/// and one command per index (so a committed entry never changes), and at the end, with everyone
/// back and connected, every replica at the same index and state, and every command a leader
/// applied (what a worker would have been acknowledged for) in the committed sequence.
#[test]
fn random_faults_never_fork_or_lose_the_committed_log() {
    for seed in 0..8u64 {
        let mut rng = amity_shared::rng::Rng::new(seed);
        let mut c = Cluster::new(&format!("random-{seed}"), 3);
        let mut agreed: BTreeMap<u64, u64> = BTreeMap::new();
        // The one committed sequence: index -> command, from whichever replica applied it.
        let mut commands: BTreeMap<u64, u64> = BTreeMap::new();
        let mut acked: Vec<u64> = Vec::new();
        let mut next = 0u64;
        for step in 0..400 {
            let live: Vec<u64> = c
                .nodes
                .iter()
                .filter(|(_, n)| n.replica.is_some())
                .map(|(&id, _)| id)
                .collect();
            let dead: Vec<u64> = (1..=3).filter(|i| !live.contains(i)).collect();
            let pick = |rng: &mut amity_shared::rng::Rng, v: &[u64]| v[rng.below(v.len())];
            match rng.below(10) {
                0 if live.len() == 3 => c.kill(pick(&mut rng, &live)),
                1 if !dead.is_empty() => c.start(pick(&mut rng, &dead)),
                2 if c.cut.is_empty() => {
                    c.cut.insert(1 + rng.below(3) as u64);
                }
                3 => c.cut.clear(),
                4 => {
                    let id = pick(&mut rng, &live);
                    let node = c.nodes.get_mut(&id).unwrap();
                    if let Some(&(index, h)) = states(node).last().filter(|s| s.0 > 0) {
                        let r = node.replica.as_mut().unwrap();
                        r.compact(index, h.to_string().into_bytes()).unwrap();
                    }
                }
                5..=7 => {
                    // Propose on whoever leads now, if anyone does; acknowledged once the
                    // leader applied it.
                    let leader = c.nodes.iter_mut().find(|(id, n)| {
                        !c.cut.contains(id) && n.replica.as_ref().is_some_and(|r| r.is_leader())
                    });
                    if let Some((_, n)) = leader {
                        n.replica.as_mut().unwrap().propose(&cmd(next)).unwrap();
                        next += 1;
                    }
                    c.pump();
                }
                _ => c.tick(1 + rng.below(4)),
            }
            for (&id, node) in &c.nodes {
                for (index, h) in states(node) {
                    let seen = *agreed.entry(index).or_insert(h);
                    assert_eq!(seen, h, "seed {seed} step {step}: replica {id} at {index}");
                }
                for (index, cmd) in &node.applied {
                    let seen = *commands.entry(*index).or_insert(cmd.at_ms);
                    assert_eq!(seen, cmd.at_ms, "seed {seed} step {step}: index {index}");
                }
                // What a live leader applied is acknowledged.
                if node.replica.as_ref().is_some_and(|r| r.is_leader()) {
                    for (_, cmd) in &node.applied {
                        if !acked.contains(&cmd.at_ms) {
                            acked.push(cmd.at_ms);
                        }
                    }
                }
            }
        }
        c.cut.clear();
        for id in 1..=3 {
            if c.nodes[&id].replica.is_none() {
                c.start(id);
            }
        }
        c.leader();
        c.propose(10_000..10_001);
        let last: Vec<u64> = (1..=3)
            .map(|id| states(&c.nodes[&id]).last().unwrap().0)
            .collect();
        assert!(last.iter().all(|&l| l == last[0]), "seed {seed}: {last:?}");
        for (&id, node) in &c.nodes {
            for (index, h) in states(node) {
                let seen = *agreed.entry(index).or_insert(h);
                assert_eq!(seen, h, "seed {seed} at the end: replica {id} at {index}");
            }
            for (index, cmd) in &node.applied {
                assert_eq!(*commands.entry(*index).or_insert(cmd.at_ms), cmd.at_ms);
            }
        }
        // Every command a leader applied is in the one committed sequence, at one index.
        let committed: BTreeSet<u64> = commands.values().copied().collect();
        let lost: Vec<&u64> = acked.iter().filter(|a| !committed.contains(a)).collect();
        assert!(
            lost.is_empty(),
            "seed {seed}: acknowledged but lost: {lost:?}"
        );
        assert!(committed.contains(&10_000));
        eprintln!(
            "seed {seed}: {} committed, {} terms, {} acknowledged",
            committed.len(),
            c.leaders.len(),
            acked.len()
        );
        assert!(
            committed.len() > 10,
            "seed {seed}: only {} committed",
            committed.len()
        );
    }
}

/// A follower's log overwritten by a new leader's shorter one keeps nothing of the old tail,
/// also after a restart; the hard state and membership survive it too.
#[test]
#[allow(clippy::field_reassign_with_default)]
fn an_overwritten_tail_is_gone_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("amity-logstore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("raft.redb");
    let entry = |index: u64, term: u64| {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e
    };
    {
        let mut s = LogStore::open(&path, &[1, 2, 3], &[]).unwrap();
        s.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        s.append(&[entry(3, 2)]).unwrap();
        let mut hs = raft::prelude::HardState::default();
        hs.term = 2;
        hs.vote = 3;
        hs.commit = 2;
        s.set_hard_state(&hs).unwrap();
    }
    let s = LogStore::open(&path, &[], &[]).unwrap();
    use raft::Storage;
    assert_eq!(s.last_index().unwrap(), 3);
    assert_eq!(s.term(3).unwrap(), 2);
    let state = s.initial_state().unwrap();
    assert_eq!((state.hard_state.term, state.hard_state.vote), (2, 3));
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The core config the replicated-core tests run: the tiny preset, three workers to start a
/// run, two local steps a round, no journal.
fn core_config() -> crate::config::CoreConfig {
    let run = amity_shared::config::Config::preset("tiny").unwrap();
    let mut cfg = crate::config::CoreConfig::new(run);
    cfg.rounds.min_workers = 3;
    cfg.rounds.steps = 2;
    // As in a replica: the Raft log stands in for the journal.
    cfg.journal = false;
    cfg
}

/// What institution `name` declares when it joins.
fn join_info(name: &str) -> crate::core::JoinInfo {
    crate::core::JoinInfo {
        name: name.into(),
        backend: "flex".into(),
        samples_per_s: 1.0,
        local_shards: Vec::new(),
    }
}

/// An honest update of `len` values for `round` (blob and noise seeded by `seed`): one shared
/// direction plus its own noise, as honest workers' updates look (the screens pass them).
fn honest_update(len: usize, round: u64, seed: u64) -> crate::core::ArrivedUpdate {
    use amity_shared::rng::Rng;
    let mut common = Rng::new(0);
    let mut noise = Rng::new(seed);
    crate::core::ArrivedUpdate {
        round,
        blob: amity_shared::store::BlobId::of(&seed.to_le_bytes()),
        bytes: 100,
        samples: 64,
        steps: 2,
        loss: amity_shared::federated::LossStats {
            mean: 0.5,
            first: 0.6,
            last: 0.4,
            baseline: 0.7,
        },
        values: (0..len)
            .map(|_| 1e-3 * common.normal() as f32 + 3e-4 * noise.normal() as f32)
            .collect::<Vec<f32>>()
            .into(),
    }
}

mod cores;
mod machine;
mod quic;

/// Read index: a leader and a follower both get an index at least the last commit, and a leader
/// cut off from its quorum answers nothing (a stale read is never served).
#[test]
fn reads_are_linearizable_and_a_cut_off_leader_serves_none() {
    let mut c = Cluster::new("read-index", 3);
    c.propose(0..5);
    let l = c.leader();
    let f = (1..=3).find(|&i| i != l).unwrap();
    let commit = c.nodes[&l].replica.as_ref().unwrap().commit_index();
    for id in [l, f] {
        let r = c.nodes.get_mut(&id).unwrap().replica.as_mut().unwrap();
        r.read_index(format!("status from {id}").into_bytes());
    }
    c.tick(3);
    for id in [l, f] {
        let want = format!("status from {id}").into_bytes();
        let got: Vec<u64> = c.nodes[&id]
            .reads
            .iter()
            .filter(|(ctx, _)| *ctx == want)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(got.len(), 1, "replica {id}: {:?}", c.nodes[&id].reads);
        assert!(
            got[0] >= commit,
            "replica {id}: read at {} < commit {commit}",
            got[0]
        );
    }
    // The leader, cut off, is asked: no answer, while the others elect a new leader.
    c.cut.insert(l);
    let r = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
    r.read_index(b"stale?".to_vec());
    c.tick(30);
    assert!(
        c.nodes[&l].reads.iter().all(|(ctx, _)| ctx != b"stale?"),
        "a leader without its quorum answered a read"
    );
    assert!(
        !c.nodes[&l].replica.as_ref().unwrap().is_leader(),
        "it stepped down"
    );
}

/// Membership one change at a time: a fourth replica, started empty, is added as a learner once
/// the log is compacted, catches up by snapshot and is promoted to voter; then a first one is
/// removed, and the three left commit.
#[test]
fn a_replica_is_added_from_a_snapshot_and_another_removed() {
    let mut c = Cluster::new("membership", 3);
    c.propose(0..4);
    let l = c.leader();
    // A release proposed on a follower (forwarded to the leader), twice: committed once.
    let release = ReleaseRecord {
        name: "r1".into(),
        round: 3,
        manifest: BlobId::of(b"manifest"),
        signature: vec![7; 64],
        key: "00".repeat(32),
        from: (1..=3).find(|&i| i != l).unwrap(),
    };
    for _ in 0..2 {
        let follower = c.nodes.get_mut(&release.from).unwrap().replica.as_mut();
        follower.unwrap().propose_release(&release).unwrap();
        c.pump();
    }
    c.propose(4..5);
    let leader = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
    assert!(matches!(
        leader.change_membership(Membership::Add(entry(4))),
        Err(ReplicaError::NotCompacted)
    ));
    for node in c.nodes.values_mut() {
        let (index, _) = *node.applied.last().unwrap();
        let r = node.replica.as_mut().unwrap();
        r.compact(index, format!("state at {index}").into_bytes())
            .unwrap();
    }
    // It knows the group's addresses (from its config), not yet its vote.
    c.start_with(4, Vec::new());
    let mut added = entry(4);
    added.name = "replica-4-renamed".into();
    let leader = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
    for refused in [
        Membership::Add(entry(l)),
        Membership::Remove(l),
        Membership::Remove(9),
    ] {
        assert!(
            matches!(
                leader.change_membership(refused.clone()),
                Err(ReplicaError::Membership(_))
            ),
            "{refused:?}"
        );
    }
    leader
        .change_membership(Membership::Add(added.clone()))
        .unwrap();
    c.pump();
    c.tick(10);
    c.propose(5..6);
    // A learner first: it gets the log, the quorum stays three voters.
    let r4 = c.nodes[&4].replica.as_ref().unwrap();
    assert_eq!((r4.voters(), r4.learners()), (vec![1, 2, 3], vec![4]));
    assert!(c.nodes[&4].base.is_some(), "joined from a snapshot");
    let leader = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
    assert!(matches!(
        leader.change_membership(Membership::Promote(9)),
        Err(ReplicaError::Membership(_))
    ));
    leader.change_membership(Membership::Promote(4)).unwrap();
    c.pump();
    c.tick(3);
    let r4 = c.nodes[&4].replica.as_ref().unwrap();
    assert_eq!((r4.voters(), r4.learners()), (vec![1, 2, 3, 4], vec![]));
    // Every replica learnt the new one's addresses from the change (the new one from the
    // snapshot and the change after it), replacing what it was configured with.
    for id in 1..=4 {
        let members = c.nodes[&id].replica.as_ref().unwrap().members().to_vec();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names.iter().filter(|n| n.starts_with("replica-4")).count(),
            1,
            "replica {id}: {names:?}"
        );
        assert!(members.contains(&added), "replica {id}: {names:?}");
        assert_eq!(members.len(), 4, "replica {id}: {names:?}");
        // The release too (the new one learnt it from the snapshot).
        let releases = c.nodes[&id].replica.as_ref().unwrap().releases().to_vec();
        assert_eq!(releases, vec![release.clone()], "replica {id}");
    }
    // Its state (the snapshot, then what followed) is at the leader's index.
    let at = |n: &Node| {
        n.applied
            .last()
            .map_or_else(|| n.base.as_ref().unwrap().0, |a| a.0)
    };
    assert_eq!(at(&c.nodes[&4]), at(&c.nodes[&l]));
    // Remove a follower that is not the new one.
    let gone = (1..=3).find(|&i| i != l).unwrap();
    let leader = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
    leader.change_membership(Membership::Remove(gone)).unwrap();
    c.pump();
    c.tick(3);
    c.kill(gone);
    c.propose(6..8);
    for id in (1..=4).filter(|&i| i != gone) {
        let r = c.nodes[&id].replica.as_ref().unwrap();
        assert_eq!(r.voters().len(), 3, "replica {id}");
        assert_eq!(c.commands(id).last(), Some(&7), "replica {id}");
    }
}
