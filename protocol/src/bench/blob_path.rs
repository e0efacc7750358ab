//! Our path: a blob served with [`serve_blob_requests`] and fetched with [`fetch_blob`], and
//! the receiver's costs measured one by one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::quic::{QuicPathStats, Setup, connect};
use super::{TransferError, cpu_per_gib, cpu_seconds, gbps, io};
use crate::blob::CHUNK_SIZE;
use crate::conn::{OutboardCache, fetch_blob, serve_blob_requests};
use crate::id::BlobId;
use crate::tls::Identity;

/// What the receiving side of our path spends per GiB on each of its own steps, measured alone
/// on this machine (one thread, data in memory), beside the transfer.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiverCosts {
    /// BLAKE3 of every 1 MiB chunk (the chunk check), ms per GiB.
    pub chunk_hash_ms: f64,
    /// BLAKE3 of the same bytes streamed through one hasher, ms per GiB: the yardstick
    /// `chunk_hash_ms` is read against. The receiver does not pay it: the outboard's chunk
    /// entries add up to the root, which is checked against the blob id before any chunk.
    pub stream_hash_ms: f64,
    /// Joining each chunk from the pieces quinn hands over (~6.4 KB, one packet's payload each)
    /// into one buffer before it is hashed and written, ms per GiB.
    pub framing_ms: f64,
    /// Writing the chunks to the partial file and syncing it, ms per GiB.
    pub file_write_ms: f64,
}

/// A file of `bytes` pseudo-random bytes at `path`, and its blob id.
fn write_blob(path: &Path, bytes: u64) -> Result<BlobId, TransferError> {
    let mut f = std::fs::File::create(path).map_err(io("bench blob"))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for word in buf[..n].chunks_mut(8) {
            // xorshift: incompressible bytes, cheap to make.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).map_err(io("bench blob"))?;
        left -= n as u64;
    }
    Ok(BlobId(*h.finalize().as_bytes()))
}

/// A blob the server holds in its store for [`blob`] to fetch: written once and kept for every
/// repetition, as a coordinator keeps a round's state, so that each fetch writes its partial
/// file into memory the previous repetition freed, as the bare-quinn-to-a-file baseline does.
/// (On a VM whose host reclaims freed guest memory, writing a fresh GiB first, as each fetch
/// once did, made the next file write several times slower: measured 0.35 to 0.75 GB/s for
/// the same code.)
pub(super) struct ServedBlob {
    path: PathBuf,
    id: BlobId,
    bytes: u64,
}

impl ServedBlob {
    /// Writes `bytes` pseudo-random bytes into `dir`.
    pub(super) fn write(dir: &Path, bytes: u64) -> Result<Self, TransferError> {
        let path = dir.join("blob");
        let id = write_blob(&path, bytes)?;
        Ok(ServedBlob { path, id, bytes })
    }
}

impl Drop for ServedBlob {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Moves `served` through our protocol over our endpoint: the server answers the `FetchBlob`
/// request with the header, the outboard (its cache warm, as for a round's state that every
/// worker fetches) and framed 1 MiB chunks read from the file; the client checks each chunk,
/// writes it to a partial file in `dir`, syncs it and checks the whole against the id. GB/s and
/// CPU seconds per GiB from the request to the checked file, and the sender's path.
pub(super) async fn blob(
    served: &ServedBlob,
    server_id: &Identity,
    client_id: &Identity,
    dir: &Path,
) -> Result<(f64, f64, QuicPathStats), TransferError> {
    let (path, id, bytes) = (&served.path, served.id, served.bytes);
    let part = dir.join("blob.part");
    let cache = OutboardCache::new();
    cache
        .outboard(path, &id)
        .map_err(|e| TransferError::Io(e.to_string()))?;
    let pair = connect(Setup::Ours, server_id, client_id).await?;
    let served: PathBuf = path.clone();
    let locate = move |want: &BlobId| (*want == id).then(|| served.clone());
    let server_conn = pair.server.clone();
    tokio::spawn(serve_blob_requests(
        server_conn,
        "bench client".into(),
        cache,
        locate,
    ));
    let conn = pair.client.clone();
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let got = fetch_blob(&conn, "bench server", id, &part, bytes)
        .await
        .map_err(|e| TransferError::Io(e.to_string()))?;
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let stats = QuicPathStats::of(&pair.server);
    conn.close(0u32.into(), b"done");
    let _ = std::fs::remove_file(&part);
    if got != bytes {
        return Err(TransferError::Io(format!("fetched {got} of {bytes} bytes")));
    }
    Ok((gbps(got, secs), cpu_per_gib(cpu, got), stats))
}

/// Times the receiver's own steps on `mib` MiB held in memory (files in `dir`).
pub(super) fn receiver_costs(mib: usize, dir: &Path) -> Result<ReceiverCosts, TransferError> {
    let chunk: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i * 31 % 251) as u8).collect();
    let per_gib = |secs: f64| secs * 1e3 * 1024.0 / mib as f64;
    let t = Instant::now();
    for _ in 0..mib {
        std::hint::black_box(blake3::hash(std::hint::black_box(&chunk)));
    }
    let chunk_hash_ms = per_gib(t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut stream = blake3::Hasher::new();
    for _ in 0..mib {
        stream.update(std::hint::black_box(&chunk));
    }
    std::hint::black_box(stream.finalize());
    let stream_hash_ms = per_gib(t.elapsed().as_secs_f64());
    // A chunk's payload arriving as packet-sized pieces, joined as the receiver joins them.
    let pieces: Vec<bytes::Bytes> = chunk
        .chunks(6400)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let mut joined = Vec::with_capacity(CHUNK_SIZE);
    let t = Instant::now();
    for _ in 0..mib {
        joined.clear();
        for piece in std::hint::black_box(&pieces) {
            joined.extend_from_slice(piece);
        }
        std::hint::black_box(&joined);
    }
    let framing_ms = per_gib(t.elapsed().as_secs_f64());
    let part = dir.join("costs.part");
    let t = Instant::now();
    let mut f = std::fs::File::create(&part).map_err(io("bench file"))?;
    for _ in 0..mib {
        f.write_all(&chunk).map_err(io("bench file"))?;
    }
    f.sync_all().map_err(io("bench file"))?;
    let file_write_ms = per_gib(t.elapsed().as_secs_f64());
    drop(f);
    let _ = std::fs::remove_file(&part);
    Ok(ReceiverCosts {
        chunk_hash_ms,
        stream_hash_ms,
        framing_ms,
        file_write_ms,
    })
}
