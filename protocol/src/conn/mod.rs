//! The thin async shell over quinn: framed messages on a stream, and blob transfer.
//!
//! Control messages travel on one long-lived bidirectional stream; each blob on a stream of its
//! own, so a gigabyte upload never delays a heartbeat. Everything that decides (framing limits,
//! message validation, chunk verification) is in the sans-IO modules; this one only moves bytes.
//! Here: errors, the client's hello and [`MsgStream`]; in `blobs`, blob serving and fetching.

mod blobs;

pub use blobs::{
    OUTBOARD_CACHE_CHUNKS, OutboardCache, STALL_TIMEOUT, ServeFaults, fetch_blob, fetch_blob_bytes,
    fetch_blob_until, receive_blob, serve_blob, serve_blob_requests,
};

use std::path::PathBuf;

use quinn::{Connection, RecvStream, SendStream, VarInt};

use crate::blob::BlobError;
use crate::frame::{FrameDecoder, FrameError, FrameKind, encode_frame};
use crate::message::{ClientMsg, DecodeError, ErrorCode, Message, ServerMsg, brief};

/// Errors on a connection; each names the peer.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The connection failed or was closed.
    #[error("{peer}: connection: {source}")]
    Connection {
        /// The peer.
        peer: String,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// Writing to a stream failed.
    #[error("{peer}: write: {source}")]
    Write {
        /// The peer.
        peer: String,
        /// Why.
        source: quinn::WriteError,
    },
    /// Reading a stream failed.
    #[error("{peer}: read: {source}")]
    Read {
        /// The peer.
        peer: String,
        /// Why.
        source: quinn::ReadError,
    },
    /// The peer's bytes broke the framing.
    #[error("{peer}: {source}")]
    Frame {
        /// The peer.
        peer: String,
        /// Why.
        source: FrameError,
    },
    /// The peer's bytes are not a valid message.
    #[error("{peer}: {source}")]
    Decode {
        /// The peer.
        peer: String,
        /// Why.
        source: DecodeError,
    },
    /// A blob failed verification.
    #[error("{peer}: blob {id}: {source}")]
    Blob {
        /// The peer.
        peer: String,
        /// The blob (hex).
        id: String,
        /// Why.
        source: BlobError,
    },
    /// The peer answered with an error.
    #[error("{peer} refused: {code:?}: {message}")]
    Remote {
        /// The peer.
        peer: String,
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// A message that makes no sense here.
    #[error("{peer}: unexpected {what}")]
    Unexpected {
        /// The peer.
        peer: String,
        /// What arrived.
        what: String,
    },
    /// The peer's blob header broke what was asked for: a blob longer than the receiver
    /// accepts, or an offset other than the one requested. Refused before any byte is stored.
    #[error("{peer}: blob {id}: {what}")]
    Refused {
        /// The peer.
        peer: String,
        /// The blob (hex).
        id: String,
        /// What was wrong.
        what: String,
    },
    /// A transfer stopped on purpose (fault injection) after `bytes` verified bytes.
    #[error("{peer}: transfer stopped after {bytes} bytes (fault injection)")]
    Stopped {
        /// The peer.
        peer: String,
        /// Verified bytes kept.
        bytes: u64,
    },
    /// The peer took no data for [`STALL_TIMEOUT`] (it grants no flow-control credit).
    #[error("{peer}: stalled: took nothing for {secs} s")]
    Stalled {
        /// The peer.
        peer: String,
        /// Seconds waited.
        secs: u64,
    },
    /// A local file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Which side's TLS refused a connection during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The peer refused our certificate (untrusted issuer, revoked, expired...).
    ByPeer(TlsAlert),
    /// We refused the peer's certificate (wrong CA file, wrong server name...).
    ByUs(TlsAlert),
}

/// A TLS alert number (RFC 8446 §6), as QUIC carries it in a transport error code
/// `0x100 + alert` (RFC 9001 §4.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsAlert(pub u8);

impl std::fmt::Display for TlsAlert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            40 => "handshake failure",
            42 => "bad certificate",
            43 => "unsupported certificate",
            44 => "certificate revoked",
            45 => "certificate expired",
            46 => "certificate unknown",
            48 => "unknown CA",
            // What a certificate from another CA of the same name gets.
            51 => "bad signature",
            116 => "certificate required",
            120 => "no application protocol",
            _ => "TLS alert",
        };
        write!(f, "{name} (alert {})", self.0)
    }
}

impl HandshakeRefusal {
    /// Why `e` ended a connection, when the reason is a TLS refusal: a certificate or protocol
    /// mismatch that reconnecting cannot mend (unlike a timeout or a reset).
    pub fn of(e: &quinn::ConnectionError) -> Option<HandshakeRefusal> {
        let alert = |code: quinn::TransportErrorCode| {
            let v = u64::from(code);
            (0x100..0x200)
                .contains(&v)
                .then_some(TlsAlert((v & 0xff) as u8))
        };
        match e {
            quinn::ConnectionError::ConnectionClosed(c) => {
                alert(c.error_code).map(HandshakeRefusal::ByPeer)
            }
            quinn::ConnectionError::TransportError(t) => alert(t.code).map(HandshakeRefusal::ByUs),
            // A certificate revoked while connected: the server closes the connection with
            // this code, and the next handshake would be refused with alert 44 anyway.
            quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == quic_code(ErrorCode::Revoked) =>
            {
                Some(HandshakeRefusal::ByPeer(TlsAlert(44)))
            }
            _ => None,
        }
    }
}

/// The application code the peer closed connection `e` with, when it closed it on purpose
/// (for example [`ErrorCode::Finished`] at the end of a run).
pub fn closed_with(e: &quinn::ConnectionError) -> Option<ErrorCode> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => u16::try_from(c.error_code.into_inner())
            .ok()
            .and_then(ErrorCode::from_u16),
        _ => None,
    }
}

impl ConnError {
    /// The TLS refusal behind this error, if the connection ended because a side's TLS refused
    /// the other's certificate (see [`HandshakeRefusal::of`]).
    pub fn handshake_refusal(&self) -> Option<HandshakeRefusal> {
        self.connection_error().and_then(HandshakeRefusal::of)
    }

    /// The application code the peer closed the connection with, if it did (see
    /// [`closed_with`]).
    pub fn closed_with(&self) -> Option<ErrorCode> {
        self.connection_error().and_then(closed_with)
    }

    /// The connection's end behind this error, when the error is the connection ending.
    fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        let connection = match self {
            ConnError::Connection { source, .. } => source,
            ConnError::Read {
                source: quinn::ReadError::ConnectionLost(c),
                ..
            } => c,
            ConnError::Write {
                source: quinn::WriteError::ConnectionLost(c),
                ..
            } => c,
            _ => return None,
        };
        Some(connection)
    }
}

impl ConnError {
    /// The error for an answer that is not the one `expected`: the peer's own error when it sent
    /// one, else what came instead.
    pub fn unexpected_answer(peer: &str, got: Option<ServerMsg>, expected: &str) -> Self {
        match got {
            Some(ServerMsg::Error { code, message }) => ConnError::Remote {
                peer: peer.to_owned(),
                code,
                message,
            },
            other => ConnError::Unexpected {
                peer: peer.to_owned(),
                what: brief(&format!("{other:?} instead of {expected}"), 300),
            },
        }
    }
}

/// What a server's `Welcome` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    /// The client's identity as the server sees it (its certificate name, or `anonymous`).
    pub identity: String,
    /// The server's wall clock when it answered, milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// Now on the wall clock, milliseconds since the Unix epoch (0 before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A client's first exchange on a fresh connection: opens the control stream, says `Hello` as
/// `software`, and returns the stream with what the server's `Welcome` said. A refusal (another
/// protocol version, a revoked certificate) is the server's [`ConnError::Remote`].
pub async fn hello(
    conn: &Connection,
    peer: &str,
    software: &str,
) -> Result<(MsgStream, Welcomed), ConnError> {
    let mut control = MsgStream::open(conn, peer).await?;
    control
        .send(&ClientMsg::Hello {
            protocol: crate::PROTOCOL_VERSION,
            software: software.to_owned(),
        })
        .await?;
    match control.recv::<ServerMsg>().await? {
        Some(ServerMsg::Welcome {
            identity, time_ms, ..
        }) => Ok((control, Welcomed { identity, time_ms })),
        other => Err(ConnError::unexpected_answer(peer, other, "Welcome")),
    }
}

/// Application error codes on QUIC stream resets and connection closes.
pub fn quic_code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(code as u16 as u32)
}

/// A framed bidirectional stream to a named peer.
#[derive(Debug)]
pub struct MsgStream {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    peer: String,
}

impl MsgStream {
    /// Wraps an opened or accepted stream.
    pub fn new(send: SendStream, recv: RecvStream, peer: &str) -> Self {
        MsgStream {
            send,
            recv,
            decoder: FrameDecoder::new(),
            peer: peer.to_owned(),
        }
    }

    /// Opens a new stream on `conn`.
    pub async fn open(conn: &Connection, peer: &str) -> Result<Self, ConnError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|source| ConnError::Connection {
                peer: peer.to_owned(),
                source,
            })?;
        Ok(Self::new(send, recv, peer))
    }

    /// Accepts the peer's next stream on `conn` (`None` when the connection closed cleanly).
    pub async fn accept(conn: &Connection, peer: &str) -> Result<Option<Self>, ConnError> {
        match conn.accept_bi().await {
            Ok((send, recv)) => Ok(Some(Self::new(send, recv, peer))),
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => Ok(None),
            Err(source) => Err(ConnError::Connection {
                peer: peer.to_owned(),
                source,
            }),
        }
    }

    /// The peer's name.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Writes raw bytes (framing already applied).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|source| self.write_error(source))
    }

    /// Writes one buffer of raw bytes (framing already applied) without copying it: quinn
    /// keeps the buffer until the peer acknowledges it, where [`MsgStream::write_raw`] copies
    /// the slice first.
    pub async fn write_bytes(&mut self, bytes: bytes::Bytes) -> Result<(), ConnError> {
        self.send
            .write_chunk(bytes)
            .await
            .map_err(|source| self.write_error(source))
    }

    /// Sends one message.
    pub async fn send<T: Message>(&mut self, msg: &T) -> Result<(), ConnError> {
        let frame = encode_frame(FrameKind::Message, &msg.to_wire());
        self.write_raw(&frame).await
    }

    /// Finishes our side of the stream.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Refuses the stream with `code` (both directions) and logs why, naming the peer.
    pub fn refuse(&mut self, code: ErrorCode, why: &dyn std::fmt::Display) {
        tracing::warn!(peer = %self.peer, ?code, "closing stream: {why}");
        let _ = self.send.reset(quic_code(code));
        let _ = self.recv.stop(quic_code(code));
    }

    /// The next frame, which must be of one of the `allowed` kinds: another kind is refused
    /// (stream reset) from its 5-byte prefix, before its payload is buffered.
    pub async fn recv_frame_of(
        &mut self,
        allowed: &[FrameKind],
    ) -> Result<Option<(FrameKind, Vec<u8>)>, ConnError> {
        loop {
            if let Ok(Some(kind)) = self.decoder.next_kind()
                && !allowed.contains(&kind)
            {
                return Err(self.unexpected_kind(kind, allowed));
            }
            match self.decoder.next_frame() {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(source) => return Err(self.frame_error(source)),
            }
            let want = self.decoder.wanted();
            if !self.fill(want).await? {
                return self.ended().map(|()| None);
            }
        }
    }

    /// Reads up to `want` bytes of the stream into the frame decoder, as quinn hands them over
    /// (no staging buffer); `false` at the end of the stream.
    async fn fill(&mut self, want: usize) -> Result<bool, ConnError> {
        match self.recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                self.decoder.push(&chunk.bytes);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(source) => Err(self.read_error(source)),
        }
    }

    /// At the end of the stream: clean, or a frame was cut off.
    fn ended(&self) -> Result<(), ConnError> {
        self.decoder.finish().map_err(|source| ConnError::Frame {
            peer: self.peer.clone(),
            source,
        })
    }

    fn write_error(&self, source: quinn::WriteError) -> ConnError {
        match source {
            quinn::WriteError::ConnectionLost(source) => ConnError::Connection {
                peer: self.peer.clone(),
                source,
            },
            source => ConnError::Write {
                peer: self.peer.clone(),
                source,
            },
        }
    }

    fn read_error(&self, source: quinn::ReadError) -> ConnError {
        match source {
            quinn::ReadError::ConnectionLost(source) => ConnError::Connection {
                peer: self.peer.clone(),
                source,
            },
            source => ConnError::Read {
                peer: self.peer.clone(),
                source,
            },
        }
    }

    /// The next frame, which must be of kind `kind`, its payload as the pieces quinn hands
    /// over (`pieces` cleared first; their lengths add up to the frame's): no copy here, where
    /// [`MsgStream::recv_frame_of`] makes two (the 1 MiB chunks of a blob go this way, and
    /// the thread that checks and stores them joins the pieces). A frame of another kind is
    /// refused from its prefix, as there. `false` at a clean end of the stream.
    pub async fn recv_payload_pieces(
        &mut self,
        kind: FrameKind,
        pieces: &mut Vec<bytes::Bytes>,
    ) -> Result<bool, ConnError> {
        pieces.clear();
        loop {
            let prefix = match self.decoder.take_prefix() {
                Ok(p) => p,
                Err(source) => return Err(self.frame_error(source)),
            };
            if let Some((got, len)) = prefix {
                if got != kind {
                    return Err(self.unexpected_kind(got, &[kind]));
                }
                let mut have = 0;
                while have < len {
                    match self.recv.read_chunk(len - have, true).await {
                        Ok(Some(chunk)) => {
                            have += chunk.bytes.len();
                            pieces.push(chunk.bytes);
                        }
                        Ok(None) => {
                            let source = FrameError::Truncated(5 + have);
                            return Err(ConnError::Frame {
                                peer: self.peer.clone(),
                                source,
                            });
                        }
                        Err(source) => return Err(self.read_error(source)),
                    }
                }
                return Ok(true);
            }
            if self.decoder.buffered() >= 5 {
                // Part of the payload is buffered already: the frame decoder's way.
                return Ok(match self.recv_frame_of(&[kind]).await? {
                    Some((_, payload)) => {
                        pieces.push(payload.into());
                        true
                    }
                    None => false,
                });
            }
            let want = self.decoder.wanted();
            if !self.fill(want).await? {
                return self.ended().map(|()| false);
            }
        }
    }

    /// Resets the stream over a malformed frame and says why.
    fn frame_error(&mut self, source: FrameError) -> ConnError {
        let code = match source {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::Malformed,
        };
        self.refuse(code, &source);
        ConnError::Frame {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Resets the stream over a frame of a kind not `allowed` here and says why.
    fn unexpected_kind(&mut self, kind: FrameKind, allowed: &[FrameKind]) -> ConnError {
        self.refuse(ErrorCode::Unexpected, &format!("{kind:?} frame"));
        ConnError::Unexpected {
            peer: self.peer.clone(),
            what: format!("{kind:?} frame where {allowed:?} belongs"),
        }
    }

    /// The next message (`None` at a clean end of stream). Invalid bytes reset the stream.
    pub async fn recv<T: Message>(&mut self) -> Result<Option<T>, ConnError> {
        let Some((_, payload)) = self.recv_frame_of(&[FrameKind::Message]).await? else {
            return Ok(None);
        };
        match T::from_wire(&payload) {
            Ok(m) => Ok(Some(m)),
            Err(source) => {
                let code = match source {
                    DecodeError::Version { .. } => ErrorCode::VersionMismatch,
                    _ => ErrorCode::Malformed,
                };
                self.refuse(code, &source);
                Err(ConnError::Decode {
                    peer: self.peer.clone(),
                    source,
                })
            }
        }
    }
}
