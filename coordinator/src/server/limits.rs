//! The caps on connections, strangers and slow peers.

use std::time::Duration;

/// Connections of any kind at once. QUIC connections share one UDP socket, but each holds
/// memory and, while it fetches, open files; beyond this, new ones are refused before their
/// handshake.
pub const MAX_CONNECTIONS: usize = 2048;
/// Connections without a certificate (downstream users fetching releases) at once, in all.
pub const MAX_ANONYMOUS: usize = 512;
/// Connections without a certificate at once from one IP address.
pub const MAX_ANONYMOUS_PER_IP: usize = 16;
/// Streams an anonymous peer may have open at once: its control stream and a few fetches.
pub const ANONYMOUS_STREAMS: u32 = 4;
/// The time a peer has to finish its handshake, open its control stream and say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
