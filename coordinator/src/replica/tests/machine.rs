//! Replicated cores ([`ReplicatedCore`]) over the simulated network, with the shell's duties
//! played here: a blob store every replica can pull from, and the workers' messages recorded.

use super::*;
use crate::config::CoreConfig;
use crate::core::{Action, Core, Event, Snapshot, WorkerId};
use amity_protocol::message::ServerMsg;
use amity_shared::federated::GlobalParams;
use amity_shared::store::BlobId;

struct Machines {
    dir: PathBuf,
    cfg: CoreConfig,
    nodes: BTreeMap<u64, Option<ReplicatedCore>>,
    /// Blobs stored by any replica (snapshots), and every update's values (what the leader
    /// pulled; followers fetch them from it).
    blobs: BTreeMap<BlobId, Vec<u8>>,
    values: BTreeMap<BlobId, Vec<f32>>,
    /// Messages to workers, by the replica whose shell was asked to send them.
    sent: BTreeMap<u64, Vec<ServerMsg>>,
    now_ms: u64,
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
            values: BTreeMap::new(),
            sent: BTreeMap::new(),
            now_ms: 0,
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
        };
        let replica = Replica::open(&cfg, &self.dir.join(format!("raft-{id}.redb"))).unwrap();
        let core = match replica.base() {
            Some((_, data)) => {
                let blob = super::super::machine::snapshot_blob(&data).unwrap();
                let snap = Snapshot::from_bytes(&self.blobs[&blob]).unwrap();
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
                MachineAction::Core(_) | MachineAction::Leadership { .. } => {}
                MachineAction::Fetch(blob) => {
                    let v = self.values[&blob].clone();
                    todo.extend(self.node(id).update_values(blob, v).unwrap());
                }
                MachineAction::FetchSnapshot(blob) => {
                    let snap = Snapshot::from_bytes(&self.blobs[&blob]).unwrap();
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
            let mut queue = VecDeque::new();
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                if let Some(Some(node)) = self.nodes.get_mut(&id) {
                    let actions = node.tick(self.now_ms).unwrap();
                    self.shell(id, actions, &mut queue);
                }
            }
            self.deliver(queue);
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

    /// What the leader's connections report: proposed, then ticks until it is everywhere.
    fn report(&mut self, event: Event) {
        if let Event::Update { update, .. } = &event {
            self.values.insert(update.blob, update.values.clone());
        }
        let l = self.leader();
        let now = self.now_ms;
        let actions = self.node(l).propose(event, now).unwrap();
        let mut queue = VecDeque::new();
        self.shell(l, actions, &mut queue);
        self.deliver(queue);
        self.tick(3);
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The replicated coordinator's round trip: three workers join the leader, two updates are
/// committed (followers pull their values by blob), the leader dies; the new leader drops the
/// old sessions, the workers join it again, and every replica closes round 0 with the two
/// committed updates, on the same parameters hash. Only leaders ever spoke to workers, and the
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
    // The workers register again with the new leader; round 0 closed without the silent third.
    for i in 0..3 {
        let worker = m.node(second).new_session();
        m.report(Event::Joined {
            worker,
            info: join_info(&format!("uni-{i}")),
        });
    }
    m.tick(10);
    let core = m.node(second).core();
    let s = &core.history()[0];
    let mut accepted = s.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, ["uni-0", "uni-1"], "{s:?}");
    let hash = core.params().hash();
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
