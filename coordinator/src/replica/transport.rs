//! Raft messages between replicas over QUIC: mutual TLS under
//! [`RAFT_ALPN`](amity_protocol::RAFT_ALPN), each peer holding a
//! *replica* certificate from the operator's CA whose name is one of the group's replicas (the
//! list follows membership changes: [`Transport::set_peers`]).
//!
//! One unidirectional stream per message (Raft messages are few and small; a lost one is sent
//! again by Raft itself), so no framing is needed beyond the stream's end, and a slow peer never
//! holds up another. Each peer has a sender task with its own queue: it connects on demand, and
//! drops messages while the peer is unreachable rather than queueing them without bound.
//!
//! The same connections serve blobs to peers on bidirectional streams (the protocol's verified,
//! resumable blob fetch): a replica that receives a Raft snapshot pulls the core snapshot it
//! names from a peer with a [`BlobFetcher`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use amity_protocol::conn::{ConnError, OutboardCache, fetch_blob, serve_blob_requests};
use amity_shared::store::BlobId;

use amity_protocol::tls::{
    CertRole, Identity, Revocations, TlsError, peer_name, peer_role, quic_replica_configs,
};
use tokio::sync::mpsc;

/// The most bytes one Raft message may have besides its largest entry (entries are batched up
/// to 1 MiB per message; one larger entry, an update carrying its bytes, goes alone).
pub const MAX_RAFT_MESSAGE: usize = 4 << 20;

/// Messages queued for one peer before new ones are dropped (Raft resends).
const QUEUE: usize = 1024;

/// Where a replica listens for its peers, and the name on its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// Its peer address.
    pub addr: SocketAddr,
    /// The name on its replica certificate.
    pub name: String,
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket.
    #[error("replica peer port {addr}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where a replica finds a blob a peer asks for (its content store), if it holds it.
pub type Locate = Arc<dyn Fn(&BlobId) -> Option<PathBuf> + Send + Sync>;

/// The peers by Raft id, shared by the sender, the acceptor and the blob fetchers.
type Peers = Arc<RwLock<BTreeMap<u64, PeerAddr>>>;

/// A replica's connections to its peers.
#[derive(Debug)]
pub struct Transport {
    endpoint: quinn::Endpoint,
    me: u64,
    /// Raft message bytes written to peers so far.
    sent: Arc<std::sync::atomic::AtomicU64>,
    peers: Peers,
    outboxes: BTreeMap<u64, mpsc::Sender<Vec<u8>>>,
    inbox: mpsc::Receiver<(u64, Vec<u8>)>,
}

/// Pulls blobs from peer replicas (cloned into the tasks that fetch).
#[derive(Debug, Clone)]
pub struct BlobFetcher {
    endpoint: quinn::Endpoint,
    peers: Peers,
}

/// Why a blob could not be pulled from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not a configured peer.
    #[error("replica {0} is not a configured peer")]
    UnknownPeer(u64),
    /// It could not be reached.
    #[error("replica {peer}: {why}")]
    Unreachable {
        /// The peer.
        peer: u64,
        /// Why.
        why: String,
    },
    /// The transfer (refused, cut, not matching its id).
    #[error(transparent)]
    Transfer(#[from] ConnError),
}

impl BlobFetcher {
    /// Fetches blob `id` (at most `max_len` bytes) from replica `from` into `part`, verified
    /// against its id and resumed from what `part` holds. Returns its length.
    pub async fn fetch(
        &self,
        from: u64,
        id: BlobId,
        part: &Path,
        max_len: u64,
    ) -> Result<u64, FetchError> {
        let peer = self
            .peers
            .read()
            .expect("peers lock")
            .get(&from)
            .cloned()
            .ok_or(FetchError::UnknownPeer(from))?;
        let conn = connect(&self.endpoint, &peer)
            .await
            .map_err(|e| FetchError::Unreachable {
                peer: from,
                why: e.to_string(),
            })?;
        let got = fetch_blob(&conn, &peer.name, id, part, max_len).await;
        conn.close(0u32.into(), b"done");
        Ok(got?)
    }

    /// The peers' ids.
    pub fn peers(&self) -> Vec<u64> {
        self.peers
            .read()
            .expect("peers lock")
            .keys()
            .copied()
            .collect()
    }
}

impl Transport {
    /// Listens on `listen` as replica `identity` and reaches `peers` (by Raft id; this
    /// replica's own entry, if present, is ignored); serves peers the blobs `locate` finds.
    /// Messages over `max_entry` + [`MAX_RAFT_MESSAGE`] bytes are dropped. Call inside a tokio
    /// runtime.
    pub fn start(
        listen: SocketAddr,
        identity: &Identity,
        revoked: &Revocations,
        me: u64,
        peers: &BTreeMap<u64, PeerAddr>,
        locate: Locate,
        max_entry: usize,
    ) -> Result<Self, TransportError> {
        let (server, client) = quic_replica_configs(identity, revoked)?;
        let mut endpoint = amity_protocol::endpoint::server(listen, server).map_err(|source| {
            TransportError::Socket {
                addr: listen,
                source,
            }
        })?;
        endpoint.set_default_client_config(client);
        let (tx, inbox) = mpsc::channel(QUEUE);
        let shared: Peers = Arc::default();
        let limit = MAX_RAFT_MESSAGE + max_entry;
        tokio::spawn(accept(endpoint.clone(), shared.clone(), tx, locate, limit));
        let mut transport = Transport {
            endpoint,
            me,
            sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            peers: shared,
            outboxes: BTreeMap::new(),
            inbox,
        };
        transport.set_peers(peers);
        Ok(transport)
    }

    /// The group changed: from now on reach and accept exactly `peers` (this replica's own
    /// entry, if present, is ignored). A peer whose address changed is reconnected.
    pub fn set_peers(&mut self, peers: &BTreeMap<u64, PeerAddr>) {
        let peers: BTreeMap<u64, PeerAddr> = peers
            .iter()
            .filter(|(id, _)| **id != self.me)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut known = self.peers.write().expect("peers lock");
        // Dropping a sender's queue ends its task.
        self.outboxes
            .retain(|id, _| known.get(id).is_some_and(|p| peers.get(id) == Some(p)));
        for (&id, peer) in &peers {
            if self.outboxes.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            let sender = send_to(
                self.endpoint.clone(),
                id,
                peer.clone(),
                rx,
                self.sent.clone(),
            );
            tokio::spawn(sender);
            self.outboxes.insert(id, tx);
        }
        *known = peers;
    }

    /// A handle that pulls blobs from the peers.
    pub fn fetcher(&self) -> BlobFetcher {
        BlobFetcher {
            endpoint: self.endpoint.clone(),
            peers: self.peers.clone(),
        }
    }

    /// Raft message bytes written to peers so far (the cost of replication on the wire, before
    /// QUIC's framing; snapshot blobs pulled by peers are not counted).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Queues `bytes` for replica `to` (dropped when `to` is unknown or its queue is full).
    pub fn send(&self, to: u64, bytes: Vec<u8>) {
        if let Some(tx) = self.outboxes.get(&to) {
            let _ = tx.try_send(bytes);
        }
    }

    /// The next message from a peer: (its Raft id, bytes).
    pub async fn recv(&mut self) -> Option<(u64, Vec<u8>)> {
        self.inbox.recv().await
    }

    /// Closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"replica stopping");
    }
}

/// Accepts peers: only replica certificates whose name is one of `peers`; each
/// unidirectional stream is one message, handed on with the peer's id, and each bidirectional
/// one a blob request.
async fn accept(
    endpoint: quinn::Endpoint,
    peers: Peers,
    tx: mpsc::Sender<(u64, Vec<u8>)>,
    locate: Locate,
    limit: usize,
) {
    let outboards = OutboardCache::new();
    while let Some(incoming) = endpoint.accept().await {
        let (peers, tx) = (peers.clone(), tx.clone());
        let (locate, outboards) = (locate.clone(), outboards.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let name = peer_name(&conn).unwrap_or_default();
            let known = peers
                .read()
                .expect("peers lock")
                .iter()
                .find(|(_, p)| p.name == name)
                .map(|(id, _)| *id);
            let id = match (peer_role(&conn), known) {
                (Some(CertRole::Replica), Some(id)) => id,
                (role, _) => {
                    tracing::warn!(%name, ?role, "refused a Raft peer: not a configured replica");
                    conn.close(1u32.into(), b"not a replica of this coordinator");
                    return;
                }
            };
            let serving = tokio::spawn(serve_blob_requests(
                conn.clone(),
                name,
                outboards,
                move |id: &BlobId| locate(id),
            ));
            while let Ok(mut stream) = conn.accept_uni().await {
                match stream.read_to_end(limit).await {
                    Ok(bytes) => {
                        if tx.send((id, bytes)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(replica = id, "raft message dropped: {e}"),
                }
            }
            serving.abort();
        });
    }
}

/// Sends `rx`'s messages to `peer`, connecting on demand; while it is unreachable, what arrives
/// is dropped (Raft sends it again).
async fn send_to(
    endpoint: quinn::Endpoint,
    id: u64,
    peer: PeerAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut conn: Option<quinn::Connection> = None;
    let mut retry_at = tokio::time::Instant::now();
    while let Some(bytes) = rx.recv().await {
        if conn.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            conn = None;
        }
        if conn.is_none() {
            if tokio::time::Instant::now() < retry_at {
                continue;
            }
            match connect(&endpoint, &peer).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!(replica = id, "unreachable: {e}");
                    retry_at = tokio::time::Instant::now() + Duration::from_millis(200);
                    // What queued up while the attempt lasted is stale: Raft sends again what
                    // still matters once the peer answers.
                    while rx.try_recv().is_ok() {}
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let written = async {
            let mut s = c.open_uni().await?;
            s.write_all(&bytes).await?;
            s.finish()?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        match written.await {
            Ok(()) => {
                sent.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(replica = id, "send failed: {e}");
                conn = None;
            }
        }
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    peer: &PeerAddr,
) -> Result<quinn::Connection, Box<dyn std::error::Error + Send + Sync>> {
    let conn = endpoint.connect(peer.addr, &peer.name)?.await?;
    // The peer's certificate chained to the CA and names the peer; it must be a replica's too.
    if peer_role(&conn) != Some(CertRole::Replica) {
        conn.close(1u32.into(), b"not a replica");
        return Err(format!("{} holds no replica certificate", peer.name).into());
    }
    Ok(conn)
}
