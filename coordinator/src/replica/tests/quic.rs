//! Replicas over real loopback QUIC.

use super::*;

/// Drives one replica over its transport until `stop`: ticks, peers' messages, proposals
/// (dropped unless it leads), and every committed command reported as (replica, index, at_ms).
async fn drive(
    mut replica: Replica,
    mut net: Transport,
    mut proposals: tokio::sync::broadcast::Receiver<u64>,
    committed: tokio::sync::mpsc::UnboundedSender<(u64, u64, u64)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    let id = replica.id();
    loop {
        tokio::select! {
            _ = tick.tick() => replica.tick(),
            Some((from, bytes)) = net.recv() => {
                if let Err(e) = replica.step(from, &bytes) {
                    panic!("replica {id}: {e}");
                }
            }
            Ok(i) = proposals.recv() => { let _ = replica.propose(&cmd(i)); }
            _ = stop.changed() => break,
        }
        let out = replica.ready().unwrap();
        for (to, bytes) in out.messages {
            net.send(to, bytes);
        }
        for (index, c) in out.committed {
            let _ = committed.send((id, index, c.at_ms));
        }
    }
    net.close();
}

/// Three replicas on loopback QUIC with replica certificates elect a leader and commit the same
/// commands in the same order; a member (institution) certificate is refused at the peer port;
/// a replica pulls a blob from a peer, verified against its id, and one the peer lacks fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_over_quic_commit_in_order_and_refuse_a_member() {
    use amity_protocol::tls::{CertRole, Identity, Revocations, init_ca, issue, issue_as};
    let dir = std::env::temp_dir().join(format!("amity-replica-quic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = dir.join("ca");
    init_ca(&ca, "test").unwrap();
    let local = vec!["127.0.0.1".to_owned()];
    for id in 1..=3 {
        issue_as(&ca, &format!("replica-{id}"), &local, CertRole::Replica).unwrap();
    }
    issue(&ca, "uni-a", &local).unwrap();
    // Ports first (bind, read the address, close), then every replica knows the others.
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let peers: BTreeMap<u64, PeerAddr> = (1..=3u64)
        .map(|id| {
            let addr = format!("127.0.0.1:{}", ports[id as usize - 1])
                .parse()
                .unwrap();
            (
                id,
                PeerAddr {
                    addr,
                    name: format!("replica-{id}"),
                },
            )
        })
        .collect();
    let (propose, _) = tokio::sync::broadcast::channel(64);
    let (committed_tx, mut committed) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut fetchers = BTreeMap::new();
    // Replica 1 holds one blob (a file named by its id).
    let blob = vec![7u8; 300_000];
    let blob_id = amity_shared::store::BlobId::of(&blob);
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(dir.join("blobs").join(blob_id.to_hex()), &blob).unwrap();
    for id in 1..=3u64 {
        let held = dir.join("blobs");
        let locate: super::super::transport::Locate = std::sync::Arc::new(move |b| {
            let p = held.join(b.to_hex());
            (id == 1 && p.exists()).then_some(p)
        });
        let identity = Identity::load_from_ca_dir(&ca, &format!("replica-{id}")).unwrap();
        let net = Transport::start(
            peers[&id].addr,
            &identity,
            &Revocations::default(),
            id,
            &peers,
            locate,
            0,
        )
        .unwrap();
        fetchers.insert(id, net.fetcher());
        let cfg = ReplicaConfig {
            id,
            voters: vec![1, 2, 3],
            members: Vec::new(),
        };
        let replica = Replica::open(&cfg, &dir.join(format!("raft-{id}.redb"))).unwrap();
        tasks.push(tokio::spawn(drive(
            replica,
            net,
            propose.subscribe(),
            committed_tx.clone(),
            stop.clone(),
        )));
    }
    // A member certificate at a replica's peer port: the handshake completes (same CA), then
    // the replica closes the connection.
    let member = Identity::load_from_ca_dir(&ca, "uni-a").unwrap();
    let (_, client) =
        amity_protocol::tls::quic_replica_configs(&member, &Revocations::default()).unwrap();
    let ep = amity_protocol::endpoint::client(peers[&1].addr, client).unwrap();
    let conn = ep
        .connect(peers[&1].addr, "replica-1")
        .unwrap()
        .await
        .unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed())
        .await
        .expect("the replica closes a member's connection");
    assert!(format!("{closed}").contains("not a replica"), "{closed}");

    // Proposals go to everyone; only the leader takes them. Retry until all ten are in on every
    // replica: ten distinct commands, not ten entries (a retried proposal can commit twice, and
    // counting entries ended the wait before the last command committed: seen once in CI).
    let mut seen: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut next = 0u64;
    let all_in = |seen: &BTreeMap<u64, Vec<(u64, u64)>>| {
        seen.len() == 3
            && seen.values().all(|s| {
                let ats: std::collections::BTreeSet<u64> = s.iter().map(|(_, at)| *at).collect();
                (0..10).all(|i| ats.contains(&i))
            })
    };
    while !all_in(&seen) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not committed in time: {seen:?}"
        );
        let done: std::collections::BTreeSet<u64> =
            seen.values().flatten().map(|(_, at)| *at).collect();
        if next < 10 && !done.contains(&next) {
            let _ = propose.send(next);
        } else if next < 10 {
            next += 1;
        }
        while let Ok(Ok(Some((id, index, at)))) =
            tokio::time::timeout(std::time::Duration::from_millis(50), async {
                Ok::<_, ()>(committed.recv().await)
            })
            .await
        {
            seen.entry(id).or_default().push((index, at));
        }
    }
    let part = dir.join("pulled.part");
    let len = fetchers[&3]
        .fetch(1, blob_id, &part, 1 << 20)
        .await
        .unwrap();
    assert_eq!(len, blob.len() as u64);
    assert_eq!(std::fs::read(&part).unwrap(), blob);
    let missing = fetchers[&3]
        .fetch(2, blob_id, &dir.join("missing.part"), 1 << 20)
        .await;
    assert!(missing.is_err(), "{missing:?}");
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.unwrap();
    }
    // The same commands at the same indices everywhere (a proposal retried may commit twice,
    // at two indices: the log, not the proposer, decides).
    let first = &seen[&1];
    assert!(seen.values().all(|s| s == first), "{seen:?}");
    let ats: std::collections::BTreeSet<u64> = first.iter().map(|(_, at)| *at).collect();
    assert!((0..10).all(|i| ats.contains(&i)), "{first:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
