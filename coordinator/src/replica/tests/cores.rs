//! Cores on replicas: each applies the committed commands to its own core.

use super::*;
use crate::core::UpdateValues;

/// The replicated coordinator in miniature: three replicas each apply the committed commands to
/// their own core. The leader dies inside a round's upload window, after two of three updates
/// were committed; the new leader takes the third, the round closes with all three, and every
/// replica holds the same parameters hash at every index it applied.
#[test]
fn cores_on_three_replicas_agree_through_a_leader_death_mid_round() {
    use crate::core::{Core, Event, WorkerId};
    use amity_shared::federated::GlobalParams;
    use amity_shared::store::BlobId;

    let cfg = core_config();
    let start = GlobalParams::seeded(&cfg.run);
    let new_core = || Core::new(cfg.clone(), start.clone(), &[]).0;
    let mut c = Cluster::new("cores", 3);
    let mut cores: BTreeMap<u64, (Core, usize)> = (1..=3).map(|id| (id, (new_core(), 0))).collect();
    // Every update's values, by blob id: what replicas pull from each other.
    let mut blobs: BTreeMap<BlobId, UpdateValues> = BTreeMap::new();
    // (index, params hash) each replica reached.
    let mut hashes: BTreeMap<u64, BlobId> = BTreeMap::new();
    let mut apply = |c: &Cluster,
                     cores: &mut BTreeMap<u64, (Core, usize)>,
                     blobs: &BTreeMap<BlobId, UpdateValues>| {
        for (&id, node) in &c.nodes {
            let (core, done) = cores.get_mut(&id).unwrap();
            for (index, cmd) in &node.applied[*done..] {
                let (event, at) = cmd
                    .clone()
                    .into_event(|u| blobs.get(&u.blob).cloned().ok_or("blob not pulled"))
                    .unwrap();
                core.handle(event, at);
                let h = core.params().hash();
                assert_eq!(
                    *hashes.entry(*index).or_insert(h),
                    h,
                    "replica {id} at {index}"
                );
            }
            *done = node.applied.len();
        }
    };
    let mut at = 0;
    let mut propose = |c: &mut Cluster, event: &Event| {
        at += 10;
        let l = c.leader();
        let r = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
        r.propose(&Command::of(event, at)).unwrap();
        c.pump();
        c.tick(3);
    };
    for w in 1..=3u64 {
        let info = join_info(&format!("uni-{w}"));
        propose(
            &mut c,
            &Event::Joined {
                worker: WorkerId(w),
                info,
            },
        );
    }
    apply(&c, &mut cores, &blobs);
    let len = cores[&1].0.update_len();
    let update = |w: u64| honest_update(len, 0, w);
    for w in 1..=2u64 {
        let u = update(w);
        blobs.insert(u.blob, u.values.clone());
        propose(
            &mut c,
            &Event::Update {
                worker: WorkerId(w),
                update: u,
            },
        );
    }
    apply(&c, &mut cores, &blobs);
    let old = c.leader();
    assert_eq!(
        cores[&old].0.round(),
        0,
        "the round waits for the third update"
    );
    c.kill(old);
    let u = update(3);
    blobs.insert(u.blob, u.values.clone());
    propose(
        &mut c,
        &Event::Update {
            worker: WorkerId(3),
            update: u,
        },
    );
    apply(&c, &mut cores, &blobs);
    let new = c.leader();
    assert_ne!(new, old);
    let core = &cores[&new].0;
    assert_eq!(core.round(), 1, "the round closed on the new leader");
    let s = &core.history()[0];
    assert!(s.missing.is_empty(), "{s:?}");
    let mut accepted = s.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, ["uni-1", "uni-2", "uni-3"]);
    // The dead leader, restarted, replays the log to the same state.
    c.start(old);
    cores.insert(old, (new_core(), 0));
    c.tick(10);
    apply(&c, &mut cores, &blobs);
    assert_eq!(cores[&old].0.params().hash(), cores[&new].0.params().hash());
    assert_eq!(cores[&old].0.round(), 1);
}

/// A replica cut off while a round closed catches up by a Raft snapshot whose data names a core
/// snapshot blob with the sessions and the open round ([`Core::replica_snapshot`]): restored
/// from it, its core takes the next round's updates in step with the others.
#[test]
fn a_core_restored_from_a_replica_snapshot_goes_on_in_step() {
    use crate::core::{Core, Event, Snapshot, WorkerId};
    use amity_shared::federated::GlobalParams;
    use amity_shared::store::BlobId;

    let cfg = core_config();
    let start = GlobalParams::seeded(&cfg.run);
    let mut c = Cluster::new("core-snapshot", 3);
    // Per replica: its core, the commands applied to it, and the snapshot index it restored.
    let mut cores: BTreeMap<u64, (Core, usize, u64)> = (1..=3)
        .map(|id| (id, (Core::new(cfg.clone(), start.clone(), &[]).0, 0, 0)))
        .collect();
    let mut values: BTreeMap<BlobId, UpdateValues> = BTreeMap::new();
    let mut snapshots: BTreeMap<BlobId, Vec<u8>> = BTreeMap::new();
    let apply = |c: &Cluster,
                 cores: &mut BTreeMap<u64, (Core, usize, u64)>,
                 values: &BTreeMap<BlobId, UpdateValues>,
                 snapshots: &BTreeMap<BlobId, Vec<u8>>| {
        for (&id, node) in &c.nodes {
            let (core, done, restored) = cores.get_mut(&id).unwrap();
            if let Some((index, data)) = &node.base
                && *index != *restored
            {
                let blob: BlobId = String::from_utf8_lossy(data).parse().unwrap();
                let snap = Snapshot::from_bytes(&snapshots[&blob]).unwrap();
                *core = Core::restore(cfg.clone(), snap).unwrap().0;
                (*done, *restored) = (0, *index);
            }
            for (_, cmd) in &node.applied[*done..] {
                let (event, at) = cmd
                    .clone()
                    .into_event(|u| values.get(&u.blob).cloned().ok_or("not pulled"))
                    .unwrap();
                core.handle(event, at);
            }
            *done = node.applied.len();
        }
    };
    let mut at = 0;
    let mut propose = |c: &mut Cluster, event: &Event| {
        at += 10;
        let l = c.leader();
        let r = c.nodes.get_mut(&l).unwrap().replica.as_mut().unwrap();
        r.propose(&Command::of(event, at)).unwrap();
        c.pump();
        c.tick(3);
    };
    for w in 1..=3u64 {
        let info = join_info(&format!("uni-{w}"));
        propose(
            &mut c,
            &Event::Joined {
                worker: WorkerId(w),
                info,
            },
        );
    }
    let len = cores[&1].0.update_len();
    let update = |w: u64, round: u64| honest_update(len, round, w + 10 * round);
    let l = c.leader();
    let lagging = (1..=3).find(|&i| i != l).unwrap();
    c.cut.insert(lagging);
    for w in 1..=3u64 {
        let u = update(w, 0);
        values.insert(u.blob, u.values.clone());
        propose(
            &mut c,
            &Event::Update {
                worker: WorkerId(w),
                update: u,
            },
        );
    }
    apply(&c, &mut cores, &values, &snapshots);
    assert_eq!(cores[&l].0.round(), 1);
    // The connected replicas compact at what they applied, into a snapshot blob of their core.
    for id in (1..=3).filter(|&i| i != lagging) {
        let snap = cores[&id].0.replica_snapshot().expect("no update pending");
        let bytes = snap.to_bytes();
        let blob = BlobId::of(&bytes);
        snapshots.insert(blob, bytes);
        let node = c.nodes.get_mut(&id).unwrap();
        let (index, _) = *node.applied.last().unwrap();
        let r = node.replica.as_mut().unwrap();
        r.compact(index, blob.to_hex().into_bytes()).unwrap();
    }
    assert_eq!(snapshots.len(), 1, "both replicas' snapshots are one blob");
    c.cut.clear();
    c.tick(10);
    apply(&c, &mut cores, &values, &snapshots);
    assert_ne!(
        cores[&lagging].2, 0,
        "the lagging replica restored a snapshot"
    );
    // Round 1 through all three, the restored one included.
    for w in 1..=3u64 {
        let u = update(w, 1);
        values.insert(u.blob, u.values.clone());
        propose(
            &mut c,
            &Event::Update {
                worker: WorkerId(w),
                update: u,
            },
        );
    }
    apply(&c, &mut cores, &values, &snapshots);
    let leader = &cores[&c.leader()].0;
    let restored = &cores[&lagging].0;
    assert_eq!(restored.round(), 2);
    assert_eq!(restored.params().hash(), leader.params().hash());
    assert_eq!(restored.workers(), leader.workers());
    assert_eq!(restored.history(), leader.history());
}
