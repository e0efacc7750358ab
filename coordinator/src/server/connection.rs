//! One task per connection: admission under the caps, the Hello, then a downstream client's
//! release queries or a member's worker session.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use amity_protocol::PROTOCOL_VERSION;
use amity_protocol::conn::{ConnError, MsgStream, serve_blob_requests};
use amity_protocol::message::{Capabilities, ClientMsg, ErrorCode, ServerMsg, brief};
use amity_protocol::tls::{CertRole, peer_name, peer_role};
use amity_shared::store::BlobId;
use tokio::sync::mpsc;

use crate::core::{Event, JoinInfo, ShardInfo, WorkerId};
use crate::release;

use super::limits::{ANONYMOUS_STREAMS, HELLO_TIMEOUT, MAX_CONNECTIONS};
use super::pull::offer_update;
use super::shared::{AnonymousSlot, Shared};

/// Accepts connections until the endpoint closes: over [`MAX_CONNECTIONS`] refused, unvalidated
/// addresses sent a Retry first, the handshake given [`HELLO_TIMEOUT`], then one task each.
pub(super) async fn accept_connections(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if endpoint.open_connections() >= MAX_CONNECTIONS {
            tracing::warn!(
                from = %incoming.remote_address(),
                "connection refused: {MAX_CONNECTIONS} connections open"
            );
            shared.count(|d| d.connections_refused += 1);
            incoming.refuse();
            continue;
        }
        // Address validation (a Retry round trip) before any handshake work, so that a spoofed
        // source address cannot make us spend or send on its behalf.
        let incoming = if incoming.remote_address_validated() {
            incoming
        } else {
            match incoming.retry() {
                Ok(()) => continue,
                Err(e) => e.into_incoming(),
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => serve_connection(shared, conn).await,
                Ok(Err(e)) => tracing::warn!(%from, "handshake refused: {e}"),
                Err(_) => {
                    tracing::warn!(%from, "handshake not finished in {HELLO_TIMEOUT:?}");
                    shared.count(|d| d.hello_timeouts += 1);
                }
            }
        });
    }
}

/// Aborts a task when dropped (when the connection task that started it ends, however).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes `conn` (with [`ErrorCode::Revoked`]) once `peer`'s name is revoked.
fn watch_revocation(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &str,
) -> tokio::task::JoinHandle<()> {
    let mut changed = shared.revocations_changed.subscribe();
    let revoked = shared.revoked.clone();
    let (conn, peer) = (conn.clone(), peer.to_owned());
    tokio::spawn(async move {
        while changed.changed().await.is_ok() {
            if revoked.contains(&peer) {
                tracing::warn!(%peer, "certificate revoked: closing its connection");
                conn.close(
                    amity_protocol::conn::quic_code(ErrorCode::Revoked),
                    b"certificate revoked",
                );
                return;
            }
        }
    })
}

/// A stranger gets a place under the caps and a few streams, or is sent away (`None`); a member
/// always gets in (`Some(None)`).
fn admit(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &str,
    anonymous: bool,
) -> Option<Option<AnonymousSlot>> {
    if !anonymous {
        // The handshake refuses revoked names; this holds even if a revocation came between
        // the handshake's check and here.
        if shared.revoked.contains(peer) {
            tracing::warn!(%peer, "closed: certificate revoked");
            conn.close(
                amity_protocol::conn::quic_code(ErrorCode::Revoked),
                b"certificate revoked",
            );
            return None;
        }
        return Some(None);
    }
    let Some(slot) = shared.anonymous_slot(conn.remote_address().ip()) else {
        tracing::warn!(%peer, "closed: too many anonymous connections");
        shared.count(|d| d.anonymous_over_cap += 1);
        conn.close(
            amity_protocol::conn::quic_code(ErrorCode::Unexpected),
            b"too many connections without a certificate; try again later",
        );
        return None;
    };
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(ANONYMOUS_STREAMS));
    conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Some(Some(slot))
}

/// The peer's control stream and Hello, within [`HELLO_TIMEOUT`], answered with Welcome: the
/// control stream, or `None` when the peer is gone, late, of another protocol version or not
/// making sense (each said in the log or to the peer).
async fn greet(shared: &Shared, conn: &quinn::Connection, peer: &str) -> Option<MsgStream> {
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let mut control = MsgStream::accept(conn, peer).await?;
        let hello = match &mut control {
            Some(c) => Some(c.recv::<ClientMsg>().await),
            None => None,
        };
        Ok::<_, ConnError>((control, hello))
    })
    .await;
    let (mut control, hello) = match opened {
        Ok(Ok((Some(control), Some(hello)))) => (control, hello),
        Ok(Ok(_)) => return None,
        Ok(Err(e)) => {
            tracing::warn!("{e}");
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, "no Hello within {HELLO_TIMEOUT:?}: closing");
            shared.count(|d| d.hello_timeouts += 1);
            conn.close(
                amity_protocol::conn::quic_code(ErrorCode::Unexpected),
                b"no Hello in time",
            );
            return None;
        }
    };
    match hello {
        Ok(Some(ClientMsg::Hello { protocol, .. })) if protocol == PROTOCOL_VERSION => {}
        Ok(Some(ClientMsg::Hello { protocol, .. })) => {
            let message =
                format!("protocol {protocol}, this coordinator speaks {PROTOCOL_VERSION}");
            let _ = control
                .send(&ServerMsg::Error {
                    code: ErrorCode::VersionMismatch,
                    message,
                })
                .await;
            return None;
        }
        other => {
            let got = brief(&format!("{other:?}"), 200);
            tracing::warn!(%peer, "expected Hello, got {got}");
            return None;
        }
    }
    let welcome = ServerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        identity: peer.to_owned(),
        time_ms: amity_protocol::conn::unix_ms(),
    };
    control.send(&welcome).await.ok()?;
    Some(control)
}

/// One connection's life: admission, Hello, then a downstream client's release queries or a
/// member's worker session.
async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    // A peer without a certificate is a downstream user: releases only.
    let named = peer_name(&conn);
    let anonymous = named.is_none();
    let peer = named.unwrap_or_else(|| format!("anonymous client {}", conn.remote_address()));
    let Some(_slot) = admit(&shared, &conn, &peer, anonymous) else {
        return;
    };
    let Some(mut control) = greet(&shared, &conn, &peer).await else {
        return;
    };
    // A member whose name is revoked while connected is cut off at once.
    let _cut_off = (!anonymous).then(|| AbortOnDrop(watch_revocation(&shared, &conn, &peer)));
    let blobs = serve_blobs(&shared, &conn, &peer, anonymous);
    match registration(&shared, &conn, &mut control, &peer, anonymous).await {
        Registration::Worker(caps) => {
            worker_session(&shared, &conn, control, &peer, caps).await;
            blobs.abort();
        }
        // A downstream client: it fetches blobs until it closes the connection.
        Registration::Downstream => {
            let _ = blobs.await;
        }
        Registration::Gone => blobs.abort(),
    }
}

/// Serves blob requests on the connection's further streams: members get training blobs and
/// releases, anonymous peers releases only (never shards or states).
fn serve_blobs(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &str,
    anonymous: bool,
) -> tokio::task::JoinHandle<()> {
    let located = shared.clone();
    tokio::spawn(serve_blob_requests(
        conn.clone(),
        peer.to_owned(),
        shared.outboards.clone(),
        move |id: &BlobId| {
            let training = if anonymous {
                None
            } else {
                located.blob_path(id)
            };
            training.or_else(|| release::locate(&located.releases.cached(), id))
        },
    ))
}

/// How a connection's control stream went before any round.
enum Registration {
    /// A member registered to train, with these capabilities.
    Worker(Capabilities),
    /// A downstream client said goodbye or closed its control stream; it may still fetch.
    Downstream,
    /// The peer is gone, was refused, or made no sense.
    Gone,
}

/// Answers release queries until the peer registers (members only), leaves or breaks off.
async fn registration(
    shared: &Shared,
    conn: &quinn::Connection,
    control: &mut MsgStream,
    peer: &str,
    anonymous: bool,
) -> Registration {
    loop {
        match control.recv::<ClientMsg>().await {
            Ok(Some(ClientMsg::Register(_))) if anonymous => {
                let message = "training needs an institution certificate from the operator's CA \
                               (amity ca issue); without one you may only fetch releases"
                    .to_owned();
                let _ = control
                    .send(&ServerMsg::Error {
                        code: ErrorCode::Unexpected,
                        message,
                    })
                    .await;
                tracing::warn!(%peer, "refused registration without a certificate");
                shared.count(|d| d.registrations_refused += 1);
                // Let the peer read the refusal before the connection goes.
                control.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
                return Registration::Gone;
            }
            Ok(Some(ClientMsg::Register(c))) => {
                let Some(leader) = shared.redirect_to() else {
                    return Registration::Worker(c);
                };
                tracing::info!(%peer, "sent to the leader `{leader}`");
                let _ = control
                    .send(&ServerMsg::Error {
                        code: ErrorCode::NotLeader,
                        message: leader,
                    })
                    .await;
                control.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
                return Registration::Gone;
            }
            Ok(Some(ClientMsg::StatusQuery)) => {
                let answer = status_answer(shared, anonymous).await;
                if control.send(&answer).await.is_err() {
                    return Registration::Gone;
                }
            }
            Ok(Some(ClientMsg::ChangeMembership(change))) => {
                let operator = peer_role(conn) == Some(CertRole::Operator);
                let answer = membership_answer(shared, change, operator, peer).await;
                if control.send(&answer).await.is_err() {
                    return Registration::Gone;
                }
            }
            Ok(Some(ClientMsg::ReleaseQuery { name })) => {
                let answer = release_answer(shared, &name).await;
                if control.send(&answer).await.is_err() {
                    return Registration::Gone;
                }
            }
            Ok(Some(ClientMsg::Goodbye)) | Ok(None) => return Registration::Downstream,
            Err(ConnError::Connection { .. }) => {
                // A downstream client that fetched what it wanted and closed.
                tracing::debug!(%peer, "connection closed");
                return Registration::Gone;
            }
            other => {
                let got = brief(&format!("{other:?}"), 200);
                tracing::warn!(%peer, "expected Register or ReleaseQuery, got {got}");
                return Registration::Gone;
            }
        }
    }
}

/// The answer to a status question: the driver's, or why there is none (no certificate; a
/// replica that reaches no leader cannot answer linearizably).
async fn status_answer(shared: &Shared, anonymous: bool) -> ServerMsg {
    if anonymous {
        return ServerMsg::Error {
            code: ErrorCode::Unexpected,
            message: "the coordinator's status is for certificate holders (operators, \
                      institutions)"
                .into(),
        };
    }
    let late = "no answer within 5 s: this replica reaches no leader (a read must be confirmed \
                by a majority); ask another replica";
    ask_driver(shared, super::Query::Status, STATUS_TIMEOUT, late).await
}

/// The answer to a membership change: the status once it is committed, or why not.
async fn membership_answer(
    shared: &Shared,
    change: amity_protocol::message::MembershipChange,
    operator: bool,
    peer: &str,
) -> ServerMsg {
    if !operator {
        tracing::warn!(%peer, "refused a membership change: not an operator certificate");
        return ServerMsg::Error {
            code: ErrorCode::Unexpected,
            message: "membership changes need an operator certificate (amity ca issue --role \
                      operator)"
                .into(),
        };
    }
    tracing::info!(%peer, ?change, "membership change asked");
    let late = "not committed within 20 s (no quorum, or another change still in flight): see \
                `amity coordinator status` before asking again";
    let query = |answer| super::Query::Membership(change, answer);
    ask_driver(shared, query, MEMBERSHIP_TIMEOUT, late).await
}

/// Puts a question to the driver (`query` wraps where its answer goes) and waits `wait` for the
/// answer; `late` says why none came.
async fn ask_driver(
    shared: &Shared,
    query: impl FnOnce(super::Answer) -> super::Query,
    wait: std::time::Duration,
    late: &str,
) -> ServerMsg {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if shared.queries.send(query(tx)).is_err() {
        return ServerMsg::Error {
            code: ErrorCode::ShuttingDown,
            message: "the coordinator is stopping".into(),
        };
    }
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(answer)) => answer,
        _ => ServerMsg::Error {
            code: ErrorCode::Internal,
            message: late.to_owned(),
        },
    }
}

/// How long a membership change waits to be committed.
const MEMBERSHIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a status question waits for its answer.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The answer to a query for release `name`: its manifest, or which releases there are. A
/// replica answers from the releases its group committed, after a read index (see
/// `releases.rs`).
async fn release_answer(shared: &Shared, name: &str) -> ServerMsg {
    if shared.replica.lock().expect("replica lock").is_some() {
        let wait = STATUS_TIMEOUT + std::time::Duration::from_millis(super::releases::COPY_WAIT_MS);
        let late = "no answer: this replica reaches no leader (a read must be confirmed by a \
                    majority); ask another replica";
        let query = |answer| super::Query::Release(name.to_owned(), answer);
        return ask_driver(shared, query, wait, late).await;
    }
    let releases = shared.releases.current().await;
    if let Some(r) = release::find(&releases, name) {
        return ServerMsg::ReleaseInfo {
            name: r.signed.manifest.name.clone(),
            manifest: r.signed.manifest_id(),
            signature: r.signed.signature.clone(),
        };
    }
    let names: Vec<&str> = releases
        .iter()
        .map(|r| r.signed.manifest.name.as_str())
        .collect();
    super::releases::not_found(name, &names)
}

/// A registered worker's session: joins the core, then relays the core's messages to the worker
/// and the worker's heartbeats and update offers to the core, until either side leaves.
async fn worker_session(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut control: MsgStream,
    peer: &str,
    caps: Capabilities,
) {
    let worker = WorkerId(shared.next_worker.fetch_add(1, Ordering::Relaxed));
    let (tx, mut outbox) = mpsc::unbounded_channel();
    shared
        .outboxes
        .lock()
        .expect("outbox lock")
        .insert(worker, tx);
    let local_shards = caps
        .local_shards
        .iter()
        .map(|s| ShardInfo {
            id: s.id,
            clips: s.clips,
        })
        .collect();
    let info = JoinInfo {
        name: peer.to_owned(),
        backend: caps.backend.clone(),
        samples_per_s: caps.samples_per_s as f64,
        local_shards,
    };
    let _ = shared.events.send(Event::Joined { worker, info });
    loop {
        tokio::select! {
            msg = outbox.recv() => {
                let Some(msg) = msg else { break };
                let last = matches!(
                    msg,
                    ServerMsg::Error {
                        code: ErrorCode::ShuttingDown | ErrorCode::Finished | ErrorCode::NotLeader,
                        ..
                    }
                );
                if control.send(&msg).await.is_err() {
                    break;
                }
                if last {
                    // Let the worker read it and close first.
                    control.finish();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        conn.closed(),
                    )
                    .await;
                    break;
                }
            }
            msg = control.recv::<ClientMsg>() => match msg {
                Ok(Some(ClientMsg::Heartbeat { .. })) => {
                    let _ = shared.events.send(Event::Heartbeat { worker });
                }
                Ok(Some(header @ ClientMsg::UpdateHeader { .. })) => {
                    offer_update(shared, conn, peer, worker, header);
                }
                Ok(Some(ClientMsg::Goodbye)) | Ok(None) => break,
                Ok(Some(other)) => {
                    let got = brief(&format!("{other:?}"), 200);
                    tracing::warn!(%peer, "unexpected {got} on the control stream");
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    break;
                }
            }
        }
    }
    shared.outboxes.lock().expect("outbox lock").remove(&worker);
    let _ = shared.events.send(Event::Left { worker });
}
