//! Blobs over a connection: serving one on a stream (the outboard first, then verified chunks,
//! giving up on a stalled reader), receiving and fetching one into a file with resume, and the
//! task that answers a peer's blob requests. Both roles serve blobs through
//! [`serve_blob_requests`].

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use quinn::Connection;

use super::{ConnError, MsgStream};
use crate::blob::{BlobError, BlobReceiver, CHUNK_SIZE, Outboard, chunk_count, chunk_len};
use crate::frame::{FrameKind, encode_frame, frame_prefix};
use crate::id::BlobId;
use crate::message::{ClientMsg, ErrorCode, ServerMsg, brief};

/// Fault injection for tests and the fault suite: what a serving side does wrong on purpose.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeFaults {
    /// Flip a byte of this chunk after the outboard was computed.
    pub corrupt_chunk: Option<u64>,
    /// Drop the connection after sending this many chunks.
    pub stop_after_chunks: Option<u64>,
    /// Claim this offset in the header instead of the requested one (a hostile server).
    pub forge_offset: Option<u64>,
    /// Give a stalled reader up after this instead of [`STALL_TIMEOUT`] (tests).
    pub stall_timeout: Option<std::time::Duration>,
}

fn file_io(path: &Path) -> impl FnOnce(std::io::Error) -> ConnError + '_ {
    move |source| ConnError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Outboards of the blobs a server has hashed, so that a blob many peers fetch (each round's
/// state delta, a popular shard) is read and hashed once, not once per request. Requests for the
/// same blob that arrive together (every worker fetching the round's delta at once) wait for
/// one hashing instead of each doing it. An entry is used only while the file at its path keeps
/// the length and modification time it had when it was hashed; a replaced file is hashed again.
/// Clones share the cache. Receivers verify every chunk against the outboard and the outboard
/// against the blob id whatever the cache holds.
#[derive(Debug, Clone, Default)]
pub struct OutboardCache {
    inner: std::sync::Arc<std::sync::Mutex<CacheInner>>,
}

/// One blob's place in the cache: locked while its file is being hashed, so that concurrent
/// requests for it wait rather than hash it again.
type Slot = std::sync::Arc<std::sync::Mutex<Option<CachedOutboard>>>;

#[derive(Debug, Default)]
struct CacheInner {
    slots: std::collections::HashMap<BlobId, Slot>,
    /// Chunk hashes stored per id (kept here, so that accounting never locks a slot while
    /// this lock is held: a slot's holder may be waiting for this lock).
    sizes: std::collections::HashMap<BlobId, usize>,
    /// Ids in the order their outboards were stored, for evicting the oldest.
    order: std::collections::VecDeque<BlobId>,
    /// Chunk hashes held, over all entries.
    chunks: usize,
    /// Stored files read and hashed so far.
    hashed: u64,
}

#[derive(Debug)]
struct CachedOutboard {
    path: PathBuf,
    stamp: (u64, Option<std::time::SystemTime>),
    outboard: std::sync::Arc<Outboard>,
}

/// Chunk hashes an [`OutboardCache`] holds at most (32 MiB of hashes, outboards of 1 TiB of
/// blobs); the oldest entries go first.
pub const OUTBOARD_CACHE_CHUNKS: usize = 1 << 20;

/// Locks `m`, also after a panic elsewhere: every update under these locks is a single
/// insert, remove or assignment, so the data stays consistent.
fn lock_anyway<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OutboardCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stored files read and hashed so far (requests the cache could not answer).
    pub fn hashed(&self) -> u64 {
        lock_anyway(&self.inner).hashed
    }

    /// The outboard of blob `id` stored at `path`: from the cache when the file is unchanged,
    /// else read and hashed (blocking; a concurrent request for the same blob waits for it),
    /// refused when the file does not hash to `id`.
    pub fn outboard(
        &self,
        path: &Path,
        id: &BlobId,
    ) -> Result<std::sync::Arc<Outboard>, ConnError> {
        let meta = std::fs::metadata(path).map_err(file_io(path))?;
        let stamp = (meta.len(), meta.modified().ok());
        let slot = lock_anyway(&self.inner)
            .slots
            .entry(*id)
            .or_default()
            .clone();
        let mut entry = lock_anyway(&slot);
        if let Some(c) = entry.as_ref()
            && c.path == path
            && c.stamp == stamp
        {
            return Ok(c.outboard.clone());
        }
        let mut f = std::fs::File::open(path).map_err(file_io(path))?;
        lock_anyway(&self.inner).hashed += 1;
        let outboard = Outboard::compute(&mut f, id).map_err(|source| ConnError::Blob {
            peer: "local store".into(),
            id: id.to_hex(),
            source,
        })?;
        let outboard = std::sync::Arc::new(outboard);
        *entry = Some(CachedOutboard {
            path: path.to_owned(),
            stamp,
            outboard: outboard.clone(),
        });
        drop(entry);
        // Account for it; evict the oldest while over the bound (a request holding an evicted
        // slot still gets its outboard).
        let mut inner = lock_anyway(&self.inner);
        let n = outboard.chunks.len();
        if let Some(old) = inner.sizes.insert(*id, n) {
            inner.chunks -= old;
            inner.order.retain(|x| x != id);
        }
        inner.chunks += n;
        inner.order.push_back(*id);
        while inner.chunks > OUTBOARD_CACHE_CHUNKS {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.slots.remove(&oldest);
            if let Some(gone) = inner.sizes.remove(&oldest) {
                inner.chunks -= gone;
            }
        }
        Ok(outboard)
    }
}

/// How long a blob being served may wait for the peer to take more (to grant flow-control
/// credit) before the stream is given up: a peer that stops reading cannot hold a file and a
/// buffer forever. A 1 MiB chunk takes 8 s at 1 Mbit/s.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes `bytes` (copied by quinn, or handed over whole), or gives the stream up when the
/// peer takes nothing for `limit`.
async fn write_or_stall(
    stream: &mut MsgStream,
    bytes: Outgoing<'_>,
    limit: std::time::Duration,
) -> Result<(), ConnError> {
    let write = async {
        match bytes {
            Outgoing::Slice(b) => stream.write_raw(b).await,
            Outgoing::Owned(b) => stream.write_bytes(b).await,
        }
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r,
        Err(_) => {
            let secs = limit.as_secs();
            stream.refuse(ErrorCode::Unexpected, &format!("stalled for {secs} s"));
            Err(ConnError::Stalled {
                peer: stream.peer.clone(),
                secs,
            })
        }
    }
}

/// Bytes to write on a stream.
enum Outgoing<'a> {
    /// Borrowed: quinn copies them.
    Slice(&'a [u8]),
    /// A buffer quinn keeps as it is.
    Owned(bytes::Bytes),
}

/// Reads chunk `index` of a blob of `len` bytes from `file` (positioned at its start) into one
/// buffer behind its frame prefix, which quinn then sends as it is (no further copy).
fn read_chunk_frame(
    file: &mut std::fs::File,
    len: u64,
    index: u64,
    faults: ServeFaults,
) -> std::io::Result<bytes::Bytes> {
    let n = chunk_len(len, index);
    let mut frame = Vec::with_capacity(5 + n);
    frame.extend_from_slice(&frame_prefix(FrameKind::Chunk, n));
    let got = file.take(n as u64).read_to_end(&mut frame)?;
    if got != n {
        let why = format!("chunk {index}: {got} of {n} bytes (the file shrank)");
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why));
    }
    if faults.corrupt_chunk == Some(index) {
        frame[5 + n / 2] ^= 0x40;
    }
    Ok(bytes::Bytes::from(frame))
}

/// The chunk read in flight: the file comes back with the frame.
type ChunkRead = tokio::task::JoinHandle<(std::fs::File, std::io::Result<bytes::Bytes>)>;

/// Starts reading chunk `index` on a blocking thread, off the runtime. Each read holds its
/// thread for one chunk only: a reader that never takes the chunk (a stalled peer) holds no
/// thread while it stalls.
fn start_chunk_read(
    mut file: std::fs::File,
    len: u64,
    index: u64,
    faults: ServeFaults,
) -> ChunkRead {
    tokio::task::spawn_blocking(move || {
        let frame = read_chunk_frame(&mut file, len, index, faults);
        (file, frame)
    })
}

/// Serves blob `id` stored at `path` on `stream`, from byte `offset` (a chunk boundary):
/// `BlobHeader`, the outboard (from `cache` when the file was hashed before), then the chunks.
/// A stored copy that does not hash to `id` is refused with an error message instead.
pub async fn serve_blob(
    stream: &mut MsgStream,
    path: &Path,
    id: BlobId,
    offset: u64,
    faults: ServeFaults,
    cache: &OutboardCache,
) -> Result<(), ConnError> {
    let p = path.to_owned();
    let c = cache.clone();
    let outboard = tokio::task::spawn_blocking(move || c.outboard(&p, &id))
        .await
        .map_err(|e| ConnError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
    let outboard = match outboard {
        Ok(o) => o,
        Err(e) => {
            let (code, message) = match &e {
                ConnError::Io { .. } => (
                    ErrorCode::NotFound,
                    format!("blob {}: not here", id.to_hex()),
                ),
                other => (ErrorCode::Internal, other.to_string()),
            };
            stream.send(&ServerMsg::Error { code, message }).await?;
            stream.finish();
            return Err(e);
        }
    };
    if !offset.is_multiple_of(CHUNK_SIZE as u64) || offset > outboard.len {
        let message = format!(
            "offset {offset} is not a chunk boundary within {}",
            outboard.len
        );
        stream
            .send(&ServerMsg::Error {
                code: ErrorCode::Unexpected,
                message,
            })
            .await?;
        stream.finish();
        return Ok(());
    }
    stream
        .send(&ServerMsg::BlobHeader {
            id,
            len: outboard.len,
            offset: faults.forge_offset.unwrap_or(offset),
        })
        .await?;
    let stall = faults.stall_timeout.unwrap_or(STALL_TIMEOUT);
    let outboard_frame = encode_frame(FrameKind::Outboard, &outboard.to_bytes());
    write_or_stall(stream, Outgoing::Slice(&outboard_frame), stall).await?;
    let mut file = std::fs::File::open(path).map_err(file_io(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(file_io(path))?;
    let first = offset / CHUNK_SIZE as u64;
    // Where `stop_after_chunks` ends the stream early, as a dropped connection would leave the
    // receiver: with the chunks sent so far delivered (a reset could discard them).
    let end = match faults.stop_after_chunks {
        Some(n) => chunk_count(outboard.len).min(first + n),
        None => chunk_count(outboard.len),
    };
    // The next chunk is read while this one is sent.
    let mut reading = (first < end).then(|| start_chunk_read(file, outboard.len, first, faults));
    let mut index = first;
    while let Some(read) = reading.take() {
        let (file, frame) = read.await.map_err(|e| ConnError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        let frame = frame.map_err(file_io(path))?;
        index += 1;
        if index < end {
            reading = Some(start_chunk_read(file, outboard.len, index, faults));
        }
        write_or_stall(stream, Outgoing::Owned(frame), stall).await?;
    }
    stream.finish();
    Ok(())
}

/// Receives the blob `id` that follows on `stream` into `part` (a partial file: its verified
/// prefix is kept across attempts), sent from byte `offset` as requested. Returns the blob's
/// length once the whole file hashes to `id`; on any error the verified prefix stays for the
/// next attempt. A header announcing more than `max_len` bytes or another offset than the one
/// asked for is refused before anything is written.
pub async fn receive_blob(
    stream: &mut MsgStream,
    id: BlobId,
    part: &Path,
    offset: u64,
    max_len: u64,
) -> Result<u64, ConnError> {
    receive_blob_until(stream, id, part, offset, max_len, None).await
}

/// [`receive_blob`], but with `stop_at`, stops once that many bytes are verified in `part`
/// (returning [`ConnError::Stopped`]), as a connection lost mid-transfer would: fault injection
/// for resume tests.
async fn receive_blob_until(
    stream: &mut MsgStream,
    id: BlobId,
    part: &Path,
    requested: u64,
    max_len: u64,
    stop_at: Option<u64>,
) -> Result<u64, ConnError> {
    let peer = stream.peer().to_owned();
    let blob_err = |source| ConnError::Blob {
        peer: peer.clone(),
        id: id.to_hex(),
        source,
    };
    let (len, offset) = match stream.recv::<ServerMsg>().await? {
        Some(ServerMsg::BlobHeader {
            id: got,
            len,
            offset,
        }) if got == id => (len, offset),
        Some(ServerMsg::Error { code, message }) => {
            return Err(ConnError::Remote {
                peer,
                code,
                message,
            });
        }
        other => {
            return Err(ConnError::Unexpected {
                peer,
                what: format!(
                    "{} instead of the blob header",
                    brief(&format!("{other:?}"), 200)
                ),
            });
        }
    };
    let refused = |what: String| ConnError::Refused {
        peer: peer.clone(),
        id: id.to_hex(),
        what,
    };
    if len > max_len {
        return Err(refused(format!(
            "{len} bytes announced, at most {max_len} accepted"
        )));
    }
    if offset != requested {
        return Err(refused(format!(
            "sent from byte {offset}, byte {requested} was asked for"
        )));
    }
    let outboard = match stream.recv_frame_of(&[FrameKind::Outboard]).await? {
        Some((FrameKind::Outboard, bytes)) => Outboard::from_bytes(&bytes).map_err(blob_err)?,
        other => {
            return Err(ConnError::Unexpected {
                peer,
                what: format!("{:?} instead of the outboard", other.map(|f| f.0)),
            });
        }
    };
    if outboard.len != len {
        return Err(blob_err(BlobError::BadOutboard(format!(
            "outboard for {} bytes, header says {len}",
            outboard.len
        ))));
    }
    // A link planted where the partial file goes is removed, never written through.
    if part
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        std::fs::remove_file(part).map_err(file_io(part))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(file_io(part))?;
    file.set_len(offset).map_err(file_io(part))?;
    // Reading the kept prefix leaves the file positioned at `offset`.
    // An outboard that does not add up to `id` is refused here, before any chunk.
    let receiver = BlobReceiver::new(outboard, &id, offset, &mut file).map_err(blob_err)?;
    let chunks = chunk_count(len) - receiver.verified().div_ceil(CHUNK_SIZE as u64);
    // Chunks to take before stopping on purpose (fault injection), counted from `offset`.
    let take = match stop_at {
        Some(s) if s < len => s
            .saturating_sub(offset)
            .div_ceil(CHUNK_SIZE as u64)
            .clamp(1, chunks.max(1)),
        _ => chunks,
    };
    let (receiver, file) = receive_chunks(stream, &id, receiver, file, part, take).await?;
    if !receiver.done() {
        file.sync_all().map_err(file_io(part))?;
        return Err(ConnError::Stopped {
            peer,
            bytes: receiver.verified(),
        });
    }
    file.sync_all().map_err(file_io(part))?;
    receiver.finish().map_err(blob_err)?;
    Ok(len)
}

/// Why checking and writing a chunk failed.
enum WriteFailure {
    Blob(BlobError),
    Io(std::io::Error),
}

/// What checking and writing chunks carries from one chunk to the next: the receiver, the
/// partial file, and the buffer a chunk's pieces are joined in.
struct ChunkSink {
    receiver: BlobReceiver,
    file: std::fs::File,
    joined: Vec<u8>,
}

impl ChunkSink {
    /// Joins one chunk's pieces (one copy, into a buffer that stays in cache: hashing the
    /// pieces one by one as quinn hands them over, ~6 KB each, runs BLAKE3 at 2 GB/s against
    /// 7 GB/s for whole chunks on this machine), checks it against the outboard and appends it
    /// to the file.
    fn write(&mut self, pieces: Vec<bytes::Bytes>) -> Result<(), WriteFailure> {
        self.joined.clear();
        for p in pieces {
            self.joined.extend_from_slice(&p);
        }
        self.receiver
            .accept(&self.joined)
            .map_err(WriteFailure::Blob)?;
        self.file.write_all(&self.joined).map_err(WriteFailure::Io)
    }
}

/// The next chunk frame's payload on `stream`, as quinn's pieces; the end of the stream here is
/// an error.
async fn next_chunk(stream: &mut MsgStream) -> Result<Vec<bytes::Bytes>, ConnError> {
    let mut pieces = Vec::new();
    if stream
        .recv_payload_pieces(FrameKind::Chunk, &mut pieces)
        .await?
    {
        Ok(pieces)
    } else {
        Err(ConnError::Unexpected {
            peer: stream.peer().to_owned(),
            what: "the end of the stream before the last chunk".into(),
        })
    }
}

/// Receives `take` chunk frames from `stream`, each checked by `receiver` and appended to
/// `file` on a blocking thread while this task reads the next one: hashing and writing a chunk
/// in the task that reads the connection held the runtime up, the UDP buffer overflowed and
/// the congestion window collapsed (measured in `amity bench transfer`: losses and RTTs several
/// times those of a bare quinn stream). Each chunk holds a blocking thread only while it is
/// written, so a peer that trickles its bytes holds none. Only verified chunks reach the file;
/// a chunk that fails its check is reported before a read error that followed it. Returns
/// both, for the caller to finish.
async fn receive_chunks(
    stream: &mut MsgStream,
    id: &BlobId,
    receiver: BlobReceiver,
    file: std::fs::File,
    part: &Path,
    take: u64,
) -> Result<(BlobReceiver, std::fs::File), ConnError> {
    let peer = stream.peer().to_owned();
    let failed = |failure| match failure {
        WriteFailure::Blob(source) => ConnError::Blob {
            peer: peer.clone(),
            id: id.to_hex(),
            source,
        },
        WriteFailure::Io(source) => ConnError::Io {
            path: part.to_owned(),
            source,
        },
    };
    let mut sink = ChunkSink {
        receiver,
        file,
        joined: Vec::with_capacity(CHUNK_SIZE),
    };
    let mut left = take;
    let mut next = if left > 0 {
        Some(next_chunk(stream).await)
    } else {
        None
    };
    while let Some(read) = next.take() {
        let pieces = read?;
        left -= 1;
        let mut busy = sink;
        let write = tokio::task::spawn_blocking(move || {
            let result = busy.write(pieces);
            (busy, result)
        });
        // The next chunk comes in while this one is checked and written.
        if left > 0 {
            next = Some(next_chunk(stream).await);
        }
        let (done, result) = write.await.map_err(|e| ConnError::Io {
            path: part.to_owned(),
            source: std::io::Error::other(e),
        })?;
        result.map_err(&failed)?;
        sink = done;
    }
    Ok((sink.receiver, sink.file))
}

/// Fetches blob `id` (at most `max_len` bytes) from the peer on a new stream into `part`,
/// resuming from the verified prefix already in `part`.
pub async fn fetch_blob(
    conn: &Connection,
    peer: &str,
    id: BlobId,
    part: &Path,
    max_len: u64,
) -> Result<u64, ConnError> {
    fetch_blob_until(conn, peer, id, part, max_len, None).await
}

/// [`fetch_blob`] that gives up with [`ConnError::Stopped`] once `stop_at` bytes of the blob
/// are verified in `part` (`None`: never): fault injection for resume tests.
pub async fn fetch_blob_until(
    conn: &Connection,
    peer: &str,
    id: BlobId,
    part: &Path,
    max_len: u64,
    stop_at: Option<u64>,
) -> Result<u64, ConnError> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let offset = have - have % CHUNK_SIZE as u64;
    let mut stream = MsgStream::open(conn, peer).await?;
    stream.send(&ClientMsg::FetchBlob { id, offset }).await?;
    stream.finish();
    receive_blob_until(&mut stream, id, part, offset, max_len, stop_at).await
}

/// [`fetch_blob`], then the verified bytes in memory (the partial file is removed): for blobs
/// the caller uses at once and stores itself.
pub async fn fetch_blob_bytes(
    conn: &Connection,
    peer: &str,
    id: BlobId,
    part: &Path,
    max_len: u64,
) -> Result<Vec<u8>, ConnError> {
    fetch_blob(conn, peer, id, part, max_len).await?;
    let bytes = std::fs::read(part).map_err(file_io(part))?;
    let _ = std::fs::remove_file(part);
    Ok(bytes)
}

/// Answers the `FetchBlob` requests on the streams the peer opens on `conn` until the connection
/// ends, serving each blob from the file `locate` names (`None`: not held here, answered with
/// `NotFound`), with outboards from `cache` (share one across connections). Anything else on
/// such a stream is refused.
pub async fn serve_blob_requests<F>(conn: Connection, peer: String, cache: OutboardCache, locate: F)
where
    F: Fn(&BlobId) -> Option<PathBuf> + Send + Sync + 'static,
{
    let locate = std::sync::Arc::new(locate);
    while let Ok(Some(mut stream)) = MsgStream::accept(&conn, &peer).await {
        let locate = locate.clone();
        let cache = cache.clone();
        tokio::spawn(async move {
            match stream.recv::<ClientMsg>().await {
                Ok(Some(ClientMsg::FetchBlob { id, offset })) => {
                    let result = match locate(&id) {
                        Some(path) => {
                            let faults = ServeFaults::default();
                            serve_blob(&mut stream, &path, id, offset, faults, &cache).await
                        }
                        None => {
                            let message = format!("blob {}: not here", id.to_hex());
                            let code = ErrorCode::NotFound;
                            let sent = stream.send(&ServerMsg::Error { code, message }).await;
                            stream.finish();
                            sent
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!("serving {}: {e}", id.to_hex());
                    }
                }
                Ok(other) => {
                    stream.refuse(ErrorCode::Unexpected, &brief(&format!("{other:?}"), 200))
                }
                Err(e) => tracing::debug!("{e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests;
