//! Pulling a worker's update: offered on the control stream, fetched on a stream of its own,
//! verified and decoded before the core sees it.

use std::sync::Arc;

use amity_protocol::conn::{ConnError, fetch_blob_bytes};
use amity_protocol::message::{ClientMsg, ErrorCode, ServerMsg};
use amity_shared::federated::codec;
use amity_shared::store::{BlobId, BlobStore};

use crate::aggregate::{StoredUpdate, UpdateValues};
use crate::core::{ArrivedUpdate, Event, WorkerId};

use super::shared::Shared;

/// A worker offers its update (`header` is its `UpdateHeader`): refused at once when its round is
/// not open or it was offered before, else pulled, decoded and handed to the core on a task of
/// its own (a failed pull is the worker's delivery for the round, refused with the reason).
pub(super) fn offer_update(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: &str,
    worker: WorkerId,
    header: ClientMsg,
) {
    let ClientMsg::UpdateHeader {
        round,
        blob,
        bytes,
        samples,
        steps,
        loss,
    } = header
    else {
        return;
    };
    // Checked before a byte is fetched: the round, and one pull per round.
    if let Err(why) = shared.claim_pull(peer, round) {
        tracing::warn!(%peer, round, "update refused unfetched: {why}");
        shared.count_refused_update(peer);
        shared.tell(
            worker,
            ServerMsg::Error {
                code: ErrorCode::Unexpected,
                message: format!("update for round {round}: {why}"),
            },
        );
        return;
    }
    let (shared, conn, peer) = (shared.clone(), conn.clone(), peer.to_owned());
    tokio::spawn(async move {
        // Pinned from before it is stored until the core has handled it (the driver unpins).
        shared.pin(blob);
        let pulled = pull_update(&shared, &conn, &peer, blob, bytes).await;
        shared.end_pull(&peer, round, pulled.is_ok());
        if pulled.is_err() {
            shared.unpin(&blob);
        }
        match pulled {
            Ok(values) => {
                let update = ArrivedUpdate {
                    round,
                    blob,
                    bytes,
                    samples,
                    steps,
                    loss,
                    values,
                };
                let _ = shared.events.send(Event::Update { worker, update });
            }
            Err(PullError::Storage(e)) => {
                // Not the worker's fault: counted as a storage fault, not against it. The
                // update is dropped unacknowledged (the worker sends the next round's), and the
                // round goes on without it.
                tracing::error!(%peer, round, "cannot store the update: {e}");
                shared.count(|d| {
                    d.storage_faults += 1;
                    d.storage_error = Some(e.clone());
                });
                shared.tell(
                    worker,
                    ServerMsg::Error {
                        code: ErrorCode::Internal,
                        message: format!("update for round {round} not stored here: {e}"),
                    },
                );
            }
            Err(PullError::Peer(e)) => {
                tracing::warn!(%peer, round, "update refused: {e}");
                shared.count_refused_update(&peer);
                let reason = format!("refused on arrival: {e}");
                let _ = shared.events.send(Event::UpdateRefused {
                    worker,
                    round,
                    reason,
                });
                shared.tell(
                    worker,
                    ServerMsg::Error {
                        code: ErrorCode::Malformed,
                        message: format!("update for round {round}: {e}"),
                    },
                );
            }
        }
    });
}

/// Why an update could not be pulled: the worker's doing, or our own disk's.
#[derive(Debug)]
enum PullError {
    /// What the worker sent (or did not) is refused.
    Peer(String),
    /// Storing it failed here (a full disk): not the worker's fault.
    Storage(String),
}

impl From<String> for PullError {
    fn from(e: String) -> Self {
        PullError::Peer(e)
    }
}

/// Fetches an update from its worker into the store and decodes it (validated in full).
async fn pull_update(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: &str,
    id: BlobId,
    announced: u64,
) -> Result<UpdateValues, PullError> {
    let limit = super::update_limit(&shared.update_parts);
    if announced > limit {
        return Err(PullError::Peer(format!(
            "{announced} bytes announced, at most {limit} allowed"
        )));
    }
    // Decoded once here to validate it; the core reads it back from the store when the round
    // closes (it holds no update in memory meanwhile).
    let decode = |bytes: &[u8]| codec::decode_parts_entries(bytes, &shared.update_parts);
    let stored =
        || StoredUpdate::new(shared.store.clone(), id, shared.update_parts.clone()).into_values();
    if shared.store.contains(&id) {
        let bytes = shared
            .store
            .get(&id)
            .map_err(|e| PullError::Storage(e.to_string()))?;
        decode(&bytes).map_err(|e| e.to_string())?;
        return Ok(stored());
    }
    let part = shared
        .layout
        .incoming()
        .join(format!("{}.part", id.to_hex()));
    // The served length must be the announced one (the blob id fixes the content).
    let bytes = fetch_blob_bytes(conn, peer, id, &part, announced)
        .await
        .map_err(|e: ConnError| match e {
            ConnError::Io { .. } => PullError::Storage(e.to_string()),
            other => PullError::Peer(other.to_string()),
        })?;
    // Only what decodes is stored.
    decode(&bytes).map_err(|e| e.to_string())?;
    shared
        .store
        .put(&bytes)
        .map_err(|e| PullError::Storage(e.to_string()))?;
    Ok(stored())
}
