//! Amity's wire protocol.
//!
//! Coordinators, workers, coordinator replicas and downstream `amity fetch` all speak it over
//! QUIC with mutual TLS (downstream clients may connect without a certificate and only
//! download releases). Like `quinn-proto`, the message codec and framing state are plain,
//! socket-free code; the async shell over quinn is thin.

/// The protocol version this build speaks. A peer announcing another version is refused with
/// an error that names both versions.
pub const PROTOCOL_VERSION: u32 = 11;

/// The QUIC ALPN token, so an Amity endpoint never mistakes another protocol's peer for its own.
pub const ALPN: &[u8] = b"amity/1";

/// The ALPN token between coordinator replicas (Raft traffic): a worker cannot reach a replica's
/// peer port, nor a replica a worker's.
pub const RAFT_ALPN: &[u8] = b"amity-raft/1";

pub mod bench;
pub mod blob;
pub mod conn;
pub mod endpoint;
pub mod frame;
pub mod id;
pub mod message;
pub mod metrics;
pub mod tls;

pub use id::BlobId;
