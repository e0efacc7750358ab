//! The protocol over real quinn endpoints on loopback: mutual TLS accept and reject, version
//! mismatch, oversized frames, and blob transfer with resume and corruption detection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use amity_protocol::BlobId;
use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::blob::CHUNK_SIZE;
use amity_protocol::conn::{
    ConnError, HandshakeRefusal, MsgStream, OutboardCache, ServeFaults, TlsAlert, fetch_blob,
    serve_blob,
};
use amity_protocol::frame::{FrameKind, frame_prefix};
use amity_protocol::message::{self, ClientMsg, ErrorCode, ServerMsg};
use amity_protocol::tls::{
    Identity, Revocations, init_ca, issue, peer_name, quic_client_config, quic_server_config,
};
use amity_protocol::{blob::BlobError, endpoint};

/// No length limit on a fetch (the tests' own server).
const MAX: u64 = u64::MAX;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("amity-proto-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two CAs: the operator's (coordinator, uni-a, uni-b) and a rogue one (uni-x).
fn pki(dir: &Path) -> (PathBuf, PathBuf) {
    let ca = dir.join("ca");
    let rogue = dir.join("rogue");
    init_ca(&ca, "test operator").unwrap();
    init_ca(&rogue, "rogue").unwrap();
    issue(
        &ca,
        "coordinator",
        &["localhost".into(), "127.0.0.1".into()],
    )
    .unwrap();
    issue(&ca, "uni-a", &[]).unwrap();
    issue(&ca, "uni-b", &[]).unwrap();
    issue(&rogue, "uni-x", &[]).unwrap();
    assert!(init_ca(&ca, "again").is_err(), "never overwrites a CA");
    (ca, rogue)
}

struct Server {
    addr: SocketAddr,
    revoked: Revocations,
    /// What serving blobs ended with, when it failed.
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    faults: Arc<std::sync::Mutex<ServeFaults>>,
    outboards: OutboardCache,
}

/// A minimal coordinator: answers Hello with the peer's certificate name, serves blobs.
fn start_server(ca: &Path, revoked: &[&str], blobs: HashMap<BlobId, PathBuf>) -> Server {
    let id = Identity::load_from_ca_dir(ca, "coordinator").unwrap();
    let revoked = Revocations::new(revoked.iter().map(|s| s.to_string()));
    let cfg = quic_server_config(&id, &revoked).unwrap();
    let ep = endpoint::server("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = ep.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(std::sync::Mutex::new(ServeFaults::default()));
    let (acc, fl) = (accepted.clone(), faults.clone());
    let blobs = Arc::new(blobs);
    let outboards = OutboardCache::new();
    let served = outboards.clone();
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed = failures.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            acc.fetch_add(1, Ordering::SeqCst);
            let name = peer_name(&conn).unwrap_or_default();
            let (blobs, fl, served) = (blobs.clone(), fl.clone(), served.clone());
            let failed = failed.clone();
            tokio::spawn(async move {
                while let Ok(Some(mut s)) = MsgStream::accept(&conn, &name).await {
                    let (blobs, faults) = (blobs.clone(), *fl.lock().unwrap());
                    let served = served.clone();
                    let name = name.clone();
                    let failed = failed.clone();
                    tokio::spawn(async move {
                        match s.recv::<ClientMsg>().await {
                            Ok(Some(ClientMsg::Hello { .. })) => {
                                let _ = s
                                    .send(&ServerMsg::Welcome {
                                        protocol: PROTOCOL_VERSION,
                                        identity: name,
                                        time_ms: 0,
                                    })
                                    .await;
                                s.finish();
                            }
                            Ok(Some(ClientMsg::FetchBlob { id, offset })) => {
                                let path = blobs.get(&id).cloned().unwrap_or_default();
                                let served =
                                    serve_blob(&mut s, &path, id, offset, faults, &served).await;
                                if let Err(e) = served {
                                    failed.lock().unwrap().push(e.to_string());
                                }
                            }
                            Ok(_) => {}
                            Err(e) => eprintln!("server: {e}"),
                        }
                    });
                }
            });
        }
    });
    Server {
        addr,
        revoked,
        failures,
        accepted,
        faults,
        outboards,
    }
}

async fn connect(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let id = Identity::load_from_ca_dir(dir, name).unwrap();
    let ep = endpoint::client(addr, quic_client_config(&id).unwrap()).unwrap();
    ep.connect(addr, "coordinator")
        .expect("a valid client config")
        .await
}

async fn hello(conn: &quinn::Connection) -> Result<ServerMsg, ConnError> {
    let mut s = MsgStream::open(conn, "coordinator").await?;
    s.send(&ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        software: "test".into(),
    })
    .await?;
    s.finish();
    Ok(s.recv::<ServerMsg>().await?.expect("an answer"))
}

#[tokio::test]
async fn mutual_tls_accepts_members_and_refuses_strangers_and_revoked_names() {
    let dir = scratch("mtls");
    let (ca, rogue) = pki(&dir);
    let server = start_server(&ca, &["uni-b"], HashMap::new());

    let conn = connect(&ca, "uni-a", server.addr).await.unwrap();
    assert_eq!(peer_name(&conn).as_deref(), Some("coordinator"));
    match hello(&conn).await.unwrap() {
        ServerMsg::Welcome {
            identity, protocol, ..
        } => {
            assert_eq!(
                identity, "uni-a",
                "the worker's identity is its certificate name"
            );
            assert_eq!(protocol, PROTOCOL_VERSION);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);

    // A certificate from another CA, and a revoked name: refused at the handshake.
    // Either way as a TLS alert that a worker can tell from a network failure (and stop
    // retrying): uni-x trusts only the rogue CA, so it refuses the coordinator's certificate
    // itself (at the connect); uni-b's refusal comes from the coordinator, at the connect or,
    // when the client finished its side of the handshake before the server checked its
    // certificate, on the first stream.
    let cases = [
        (&rogue, "uni-x", HandshakeRefusal::ByUs(TlsAlert(48))),
        (&ca, "uni-b", HandshakeRefusal::ByPeer(TlsAlert(44))),
    ];
    for (ca_dir, name, expected) in cases {
        let (refused, refusal) = match connect(ca_dir, name, server.addr).await {
            Err(e) => (e.to_string(), HandshakeRefusal::of(&e)),
            Ok(conn) => {
                let e = hello(&conn).await.expect_err("refused");
                (e.to_string(), e.handshake_refusal())
            }
        };
        eprintln!("{name} refused: {refused}");
        let why = if name == "uni-b" {
            "Revoked"
        } else {
            "UnknownIssuer"
        };
        assert!(refused.contains(why), "{name}: {refused}");
        assert_eq!(refusal, Some(expected), "{name}");
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "no refused peer got a connection"
    );
    // Revocations change while the server runs: uni-a is refused from its next handshake on,
    // also through the endpoint it connected with before (which holds a session it could
    // resume, skipping the certificate check, if the server allowed resumption); uni-b is let
    // back in.
    let id = Identity::load_from_ca_dir(&ca, "uni-a").unwrap();
    let ep = endpoint::client(server.addr, quic_client_config(&id).unwrap()).unwrap();
    let first = ep
        .connect(server.addr, "coordinator")
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(hello(&first).await, Ok(ServerMsg::Welcome { .. })));
    first.close(0u32.into(), b"bye");
    assert_eq!(server.revoked.replace(["uni-a".to_string()]), ["uni-a"]);
    let refused = match ep.connect(server.addr, "coordinator").unwrap().await {
        Err(e) => e.to_string(),
        Ok(conn) => hello(&conn).await.expect_err("refused").to_string(),
    };
    assert!(refused.contains("Revoked"), "{refused}");
    let conn = connect(&ca, "uni-b", server.addr).await.unwrap();
    assert!(matches!(hello(&conn).await, Ok(ServerMsg::Welcome { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn another_version_and_oversized_frames_close_the_stream_with_a_code() {
    let dir = scratch("limits");
    let (ca, _) = pki(&dir);
    let server = start_server(&ca, &[], HashMap::new());
    let conn = connect(&ca, "uni-a", server.addr).await.unwrap();

    // A Hello from protocol version 99.
    let mut bytes = message::encode(&ClientMsg::Hello {
        protocol: 99,
        software: "future".into(),
    });
    bytes[4..8].copy_from_slice(&99u32.to_le_bytes());
    let mut s = MsgStream::open(&conn, "coordinator").await.unwrap();
    let mut frame = frame_prefix(FrameKind::Message, bytes.len()).to_vec();
    frame.extend_from_slice(&bytes);
    s.write_raw(&frame).await.unwrap();
    let err = s.recv::<ServerMsg>().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}", ErrorCode::VersionMismatch as u16)),
        "{err}"
    );

    // The prefix of a 16 MiB message: refused from its first five bytes.
    let mut s = MsgStream::open(&conn, "coordinator").await.unwrap();
    s.write_raw(&[FrameKind::Message as u8, 0, 0, 0, 1])
        .await
        .unwrap();
    let err = s.recv::<ServerMsg>().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}", ErrorCode::FrameTooLarge as u16)),
        "{err}"
    );

    // The prefix of a 32 MiB outboard where a message belongs: refused from the prefix, not
    // after buffering (the stream would otherwise wait for 32 MiB that never come).
    let mut s = MsgStream::open(&conn, "coordinator").await.unwrap();
    s.write_raw(&frame_prefix(FrameKind::Outboard, 32 << 20))
        .await
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), s.recv::<ServerMsg>())
        .await
        .expect("refused at once");
    let err = answer.unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}", ErrorCode::Unexpected as u16)),
        "{err}"
    );

    // The connection itself is still usable.
    assert!(matches!(
        hello(&conn).await.unwrap(),
        ServerMsg::Welcome { .. }
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn blobs_resume_after_a_cut_and_corrupt_chunks_are_caught() {
    let dir = scratch("blobs");
    let (ca, _) = pki(&dir);
    let data: Vec<u8> = (0..3 * CHUNK_SIZE + 777).map(|i| (i % 253) as u8).collect();
    let id = BlobId::of(&data);
    let stored = dir.join("blob.bin");
    std::fs::write(&stored, &data).unwrap();
    let server = start_server(&ca, &[], HashMap::from([(id, stored.clone())]));
    let conn = connect(&ca, "uni-a", server.addr).await.unwrap();
    let part = dir.join("blob.part");

    // Cut after one chunk: the verified chunk stays.
    server.faults.lock().unwrap().stop_after_chunks = Some(1);
    assert!(
        fetch_blob(&conn, "coordinator", id, &part, MAX)
            .await
            .is_err()
    );
    assert_eq!(std::fs::metadata(&part).unwrap().len(), CHUNK_SIZE as u64);

    // A corrupted chunk 2: caught at that chunk; chunk 1 (verified) is kept.
    *server.faults.lock().unwrap() = ServeFaults {
        corrupt_chunk: Some(2),
        ..Default::default()
    };
    let err = fetch_blob(&conn, "coordinator", id, &part, MAX)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnError::Blob {
                source: BlobError::ChunkMismatch { index: 2, .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&part).unwrap().len(),
        2 * CHUNK_SIZE as u64
    );

    // A clean attempt resumes from byte 2 MiB and completes.
    *server.faults.lock().unwrap() = ServeFaults::default();
    let len = fetch_blob(&conn, "coordinator", id, &part, MAX)
        .await
        .unwrap();
    assert_eq!(len, data.len() as u64);
    assert_eq!(std::fs::read(&part).unwrap(), data);
    // Three requests for the blob, one hashing of the stored file.
    assert_eq!(server.outboards.hashed(), 1);

    // A blob the server does not have, and a server copy that rotted on disk.
    let missing = BlobId([7u8; 32]);
    let err = fetch_blob(&conn, "coordinator", missing, &dir.join("m.part"), MAX)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnError::Remote {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{err}"
    );
    let mut rotten = data.clone();
    rotten[5] ^= 1;
    std::fs::write(&stored, &rotten).unwrap();
    let err = fetch_blob(&conn, "coordinator", id, &dir.join("r.part"), MAX)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not to its id"), "{err}");
    assert_eq!(
        server.outboards.hashed(),
        2,
        "a rewritten file is hashed again"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Security review H2: a peer serving a blob longer than the receiver accepts, or from another
/// offset than the one asked for, is refused at the header, before a byte is written.
#[tokio::test]
async fn an_oversized_or_misplaced_blob_is_refused_before_it_is_stored() {
    let dir = scratch("hostile-blobs");
    let (ca, _) = pki(&dir);
    let data: Vec<u8> = (0..2 * CHUNK_SIZE + 5).map(|i| (i % 251) as u8).collect();
    let id = BlobId::of(&data);
    let stored = dir.join("blob.bin");
    std::fs::write(&stored, &data).unwrap();
    let server = start_server(&ca, &[], HashMap::from([(id, stored)]));
    let conn = connect(&ca, "uni-a", server.addr).await.unwrap();

    let part = dir.join("small.part");
    let err = fetch_blob(&conn, "coordinator", id, &part, 1000)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("at most 1000"), "{err}");
    assert!(!part.exists(), "nothing was written");

    // Asked from byte 0, told "from 1 MiB": the receiver would have taken a megabyte of zeros
    // as its verified prefix (an offset past the length is refused by message validation).
    server.faults.lock().unwrap().forge_offset = Some(CHUNK_SIZE as u64);
    let part = dir.join("forged.part");
    let err = fetch_blob(&conn, "coordinator", id, &part, MAX)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("byte 0 was asked for"), "{err}");
    assert!(!part.exists());
    *server.faults.lock().unwrap() = ServeFaults::default();
    let len = fetch_blob(&conn, "coordinator", id, &part, data.len() as u64)
        .await
        .unwrap();
    assert_eq!(len, data.len() as u64);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A reader that asks for a blob and then takes nothing (grants no flow-control credit) holds a
/// file and a buffer only until the stall timeout: the server gives the stream up, says why,
/// and serves the next request on the same connection.
#[tokio::test]
async fn a_reader_that_takes_nothing_is_cut_off_after_the_stall_timeout() {
    let dir = scratch("stall");
    let (ca, _) = pki(&dir);
    // Larger than the 16 MiB a stream may buffer, so the server's writes block.
    let data: Vec<u8> = (0..20 * CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
    let id = BlobId::of(&data);
    let stored = dir.join("big.bin");
    std::fs::write(&stored, &data).unwrap();
    let server = start_server(&ca, &[], HashMap::from([(id, stored)]));
    server.faults.lock().unwrap().stall_timeout = Some(std::time::Duration::from_secs(1));
    let conn = connect(&ca, "uni-a", server.addr).await.unwrap();
    let mut stalled = MsgStream::open(&conn, "coordinator").await.unwrap();
    stalled
        .send(&ClientMsg::FetchBlob { id, offset: 0 })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let failure = loop {
        if let Some(f) = server.failures.lock().unwrap().first().cloned() {
            break f;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the stalled stream was never given up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(failure.contains("stalled"), "{failure}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    // The connection itself is fine: the next fetch completes.
    let part = dir.join("big.part");
    fetch_blob(&conn, "coordinator", id, &part, MAX)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), data);
    drop(stalled);
    std::fs::remove_dir_all(&dir).unwrap();
}
