//! Replicated cores ([`ReplicatedCore`]) over the simulated network, with the shell's duties
//! played here: a blob store every replica can pull snapshots from, and the workers' messages
//! recorded.

use super::*;
use crate::config::CoreConfig;
use crate::core::{Action, Core, Event, Snapshot, WorkerId};
use amity_protocol::message::ServerMsg;
use amity_shared::federated::GlobalParams;
use amity_shared::federated::codec::{self, CodecSpec};
use amity_shared::store::BlobId;

struct Machines {
    dir: PathBuf,
    cfg: CoreConfig,
    nodes: BTreeMap<u64, Option<ReplicatedCore>>,
    /// Blobs stored by any replica (snapshots).
    blobs: BTreeMap<BlobId, Vec<u8>>,
    /// Messages to workers, by the replica whose shell was asked to send them.
    sent: BTreeMap<u64, Vec<ServerMsg>>,
    /// Every replica's wall clock (tests set it to jump) and monotonic clock.
    now_ms: u64,
    mono_ms: u64,
}

impl Machines {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("amity-machines-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = core_config();
        let mut m = Machines {
            dir,
            cfg,
            nodes: BTreeMap::new(),
            blobs: BTreeMap::new(),
            sent: BTreeMap::new(),
            now_ms: 0,
            mono_ms: 0,
        };
        for id in 1..=3 {
            m.start(id);
        }
        m
    }

    fn start(&mut self, id: u64) {
        let cfg = ReplicaConfig {
            id,
            voters: vec![1, 2, 3],
            members: (1..=3).map(super::entry).collect(),
        };
        let replica = Replica::open(&cfg, &self.dir.join(format!("raft-{id}.redb"))).unwrap();
        let core = match replica.base().unwrap() {
            Some((_, data)) => {
                let blob = super::super::machine::snapshot_blob(&data).unwrap();
                let snap = read_snapshot(&self.blobs, blob);
                Core::restore(self.cfg.clone(), snap).unwrap().0
            }
            None => {
                let start = GlobalParams::seeded(&self.cfg.run);
                Core::new(self.cfg.clone(), start, &[]).0
            }
        };
        self.nodes
            .insert(id, Some(ReplicatedCore::new(replica, core)));
    }

    fn node(&mut self, id: u64) -> &mut ReplicatedCore {
        self.nodes.get_mut(&id).unwrap().as_mut().unwrap()
    }

    /// Carries out replica `id`'s actions; returns the peer messages and follow-up work.
    fn shell(
        &mut self,
        id: u64,
        actions: Vec<MachineAction>,
        queue: &mut VecDeque<(u64, u64, Vec<u8>)>,
    ) {
        let mut todo: VecDeque<MachineAction> = actions.into();
        while let Some(a) = todo.pop_front() {
            match a {
                MachineAction::Peer { to, bytes } => queue.push_back((id, to, bytes)),
                MachineAction::Core(Action::Send { msg, .. }) => {
                    self.sent.entry(id).or_default().push(msg)
                }
                MachineAction::Core(Action::StoreBlob { bytes, .. }) => {
                    self.blobs.insert(BlobId::of(&bytes), bytes);
                }
                MachineAction::Core(_)
                | MachineAction::Leadership { .. }
                | MachineAction::Membership { .. }
                | MachineAction::Releases(_)
                | MachineAction::ReadReady { .. } => {}
                MachineAction::StoreSnapshot { index, bytes } => {
                    let blob = BlobId::of(&bytes);
                    self.blobs.insert(blob, bytes);
                    self.node(id).snapshot_stored(index, blob).unwrap();
                }
                MachineAction::FetchSnapshot(blob) => {
                    let snap = read_snapshot(&self.blobs, blob);
                    todo.extend(self.node(id).restore(snap).unwrap());
                }
            }
        }
    }

    /// Delivers messages until nothing moves.
    fn deliver(&mut self, mut queue: VecDeque<(u64, u64, Vec<u8>)>) {
        while let Some((from, to, bytes)) = queue.pop_front() {
            let Some(Some(node)) = self.nodes.get_mut(&to) else {
                continue;
            };
            let actions = node.peer(from, &bytes).unwrap();
            self.shell(to, actions, &mut queue);
        }
    }

    fn tick(&mut self, n: usize) {
        for _ in 0..n {
            self.now_ms += 100;
            self.mono_ms += 100;
            let mut queue = VecDeque::new();
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            let clock = self.clock();
            for id in ids {
                if let Some(Some(node)) = self.nodes.get_mut(&id) {
                    let actions = node.tick(clock).unwrap();
                    self.shell(id, actions, &mut queue);
                }
            }
            self.deliver(queue);
        }
    }

    fn clock(&self) -> Clock {
        Clock {
            wall_ms: self.now_ms,
            mono_ms: self.mono_ms,
        }
    }

    fn leader(&mut self) -> u64 {
        for _ in 0..200 {
            let found = self
                .nodes
                .iter()
                .find_map(|(&id, n)| n.as_ref().filter(|n| n.replica().is_leader()).map(|_| id));
            if let Some(id) = found {
                return id;
            }
            self.tick(1);
        }
        panic!("no leader");
    }

    /// What the leader's connections report: proposed, then ticks until it is everywhere. An
    /// update goes with its encoded bytes (dense fp32 here; its values and blob are set from
    /// them, as the leader's pull decodes).
    fn report(&mut self, mut event: Event) {
        let l = self.leader();
        let encoded = match &mut event {
            Event::Update { update, .. } => {
                let parts = self.node(l).core().update_parts();
                let values = update.values.to_dense().unwrap();
                let bytes = codec::encode_parts(&CodecSpec::FP32, &values, &parts);
                update.blob = BlobId::of(&bytes);
                update.values = codec::decode_parts(&bytes, &parts).unwrap().into();
                Some(bytes)
            }
            _ => None,
        };
        let now = self.clock();
        let actions = self.node(l).propose(event, encoded, now).unwrap();
        let mut queue = VecDeque::new();
        self.shell(l, actions, &mut queue);
        self.deliver(queue);
        self.tick(3);
    }
}

/// Snapshot `blob` read as a shell reads it: with the global-state blob it names.
fn read_snapshot(blobs: &BTreeMap<BlobId, Vec<u8>>, blob: BlobId) -> Snapshot {
    Snapshot::read(&blobs[&blob], |s| {
        blobs.get(s).cloned().ok_or_else(|| "not stored".into())
    })
    .unwrap()
}

impl Drop for Machines {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The replicated coordinator's round trip: three workers join the leader, two updates are
/// committed (their bytes travel in their log entries), the leader dies; the workers join the new
/// leader, the one that had not delivered is announced the open
/// round and delivers, and every replica closes round 0 with the three updates, on the same
/// parameters hash. Only leaders ever spoke to workers, and the
/// restarted old leader replays to the same state.
#[test]
fn a_round_goes_on_through_a_leader_death_with_every_committed_update() {
    let mut m = Machines::new("failover");
    let first = m.leader();
    let sessions: Vec<WorkerId> = (0..3).map(|_| m.node(first).new_session()).collect();
    for (i, &worker) in sessions.iter().enumerate() {
        m.report(Event::Joined {
            worker,
            info: join_info(&format!("uni-{i}")),
        });
    }
    let len = m.node(first).core().update_len();
    for (i, &worker) in sessions.iter().take(2).enumerate() {
        let update = honest_update(len, 0, i as u64 + 1);
        m.report(Event::Update { worker, update });
    }
    // Acknowledged: the leader's shell was asked to ack both updates.
    let acks = m.sent[&first]
        .iter()
        .filter(|msg| matches!(msg, ServerMsg::Ack { of: 0 }))
        .count();
    assert_eq!(acks, 2);
    *m.nodes.get_mut(&first).unwrap() = None;
    let second = m.leader();
    assert_ne!(second, first);
    m.tick(10);
    // The workers register again with the new leader. The two that delivered wait for the next
    // round; the third is announced the open round 0 again and delivers now.
    let mut third = None;
    for i in 0..3 {
        let worker = m.node(second).new_session();
        m.report(Event::Joined {
            worker,
            info: join_info(&format!("uni-{i}")),
        });
        third = Some(worker);
    }
    let announced = m.sent[&second]
        .iter()
        .filter(|msg| matches!(msg, ServerMsg::RoundAnnounce(a) if a.round == 0))
        .count();
    assert_eq!(
        announced, 1,
        "round 0 is announced to the returning third alone"
    );
    m.tick(10);
    assert!(
        m.node(second).core().history().is_empty(),
        "round 0 waits for it"
    );
    let update = honest_update(len, 0, 3);
    m.report(Event::Update {
        worker: third.unwrap(),
        update,
    });
    m.tick(10);
    let core = m.node(second).core();
    let s = &core.history()[0];
    let mut accepted = s.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, ["uni-0", "uni-1", "uni-2"], "{s:?}");
    let hash = core.params().hash();
    // Each replica compacted its log into a snapshot of the core when the round closed.
    for id in 1..=3 {
        if let Some(Some(n)) = m.nodes.get(&id) {
            let base = n.replica().base().unwrap().map(|(i, _)| i);
            assert!(base.is_some_and(|i| i > 0), "replica {id}: {base:?}");
        }
    }
    let followers: Vec<u64> = (1..=3).filter(|&i| i != first && i != second).collect();
    for &f in &followers {
        assert_eq!(m.node(f).core().params().hash(), hash, "replica {f}");
        assert!(
            m.sent.get(&f).is_none_or(Vec::is_empty),
            "a follower spoke to workers"
        );
    }
    m.start(first);
    m.tick(20);
    assert_eq!(
        m.node(first).core().params().hash(),
        m.node(second).core().params().hash()
    );
    assert_eq!(
        m.node(first).core().history().len(),
        m.node(second).core().history().len()
    );
}

/// Clock jumps on the leader: logged time never goes back, and runs at most twice as fast as
/// real time. A new leader whose clock is an hour behind the old one's slows the cores' time
/// (to half speed: no deadline passes early, the open round stays open); its clock jumping two
/// minutes ahead then moves logged time at twice real time until it has caught up, so the round
/// closes only once logged time has honestly passed its deadline, on every replica alike.
#[test]
fn leader_clock_jumps_never_turn_logged_time_back_nor_rush_it() {
    let mut m = Machines::new("clock");
    m.now_ms = 5_000_000;
    let first = m.leader();
    for i in 0..3 {
        let worker = m.node(first).new_session();
        m.report(Event::Joined {
            worker,
            info: join_info(&format!("uni-{i}")),
        });
    }
    assert_eq!(m.node(first).core().round(), 0);
    let before = m.node(first).core().now_ms();
    assert!(before >= 5_000_000, "{before}");
    *m.nodes.get_mut(&first).unwrap() = None;
    // The next leader's clock is more than an hour behind.
    m.now_ms = 1_000;
    let second = m.leader();
    let (t0, mono0) = (m.node(second).core().now_ms(), m.mono_ms);
    m.tick(40);
    for id in (1..=3).filter(|&i| i != first) {
        let real = m.mono_ms - mono0;
        let core = m.node(id).core();
        let passed = core.now_ms() - t0;
        assert!(
            passed + 1_000 >= real / 2 && passed <= 2 * real + 1_000,
            "replica {id}: logged time moved {passed} ms in {real} ms"
        );
        assert!(
            core.history().is_empty(),
            "replica {id} closed a round on a clock jump"
        );
    }
    // Its clock jumps past the round's deadline (and the silent workers' heartbeats).
    m.now_ms = before + 120_000;
    let (t1, mono1) = (m.node(second).core().now_ms(), m.mono_ms);
    m.tick(20);
    let passed = m.node(second).core().now_ms() - t1;
    assert!(
        passed <= 2 * (m.mono_ms - mono1) + 1_000,
        "logged time rushed {passed} ms in {} ms",
        m.mono_ms - mono1
    );
    // Twice as fast until it caught up with the (now steady) wall clock.
    let mut waited = 0;
    while m.node(second).core().now_ms() + 1_000 < m.now_ms {
        m.tick(10);
        waited += 1;
        assert!(waited < 200, "logged time never caught up");
    }
    let closed = m.node(second).core().history().len();
    assert_eq!(
        closed, 1,
        "the round closes once logged time passes its deadline"
    );
    for id in (1..=3).filter(|&i| i != first) {
        assert_eq!(m.node(id).core().history().len(), closed, "replica {id}");
    }
}
