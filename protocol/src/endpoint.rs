//! QUIC endpoints tuned for long fat links between continents.
//!
//! - **Windows**: 64 MiB per connection and 16 MiB per stream, so one stream can fill a
//!   1 Gbit/s link with 130 ms round trips (bandwidth-delay product ~16 MiB).
//! - **Socket buffers**: 8 MiB UDP send/receive buffers. Default Linux buffers (208 KiB) drop
//!   thousands of packets per GiB even on loopback (measured: 0.84 GB/s with defaults).
//! - **MTU**: path MTU discovery on, starting from 1452 bytes (fits IPv6 over typical Ethernet)
//!   and probing up to 6500 ([`MAX_MTU`] says why not more); loopback and data-centre links
//!   discover larger packets, which is most of QUIC's per-byte cost (one encryption per
//!   packet). Both sides also accept payloads that large ([`endpoint_config`]): quinn's default
//!   of 1472 silently caps discovery, which is what kept our QUIC at 1200-1452-byte packets and
//!   at 0.4x of TCP+TLS.
//! - **Liveness**: keep-alive every 5 s, idle timeout 60 s, so a NAT does not drop a quiet
//!   worker and a vanished one is noticed within a minute.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{EndpointConfig, TokioRuntime, TransportConfig, VarInt};

/// The largest UDP payload MTU discovery probes for, and the largest accepted from peers.
///
/// Not jumbo frames' 8952: quinn sends up to 10 packets per call with segmentation offload
/// (GSO), and a GSO batch must fit one 64 KiB UDP datagram, so 10 x 8952 bytes is refused by
/// the kernel and every batch is lost (measured on loopback: 35k of 95k packets lost, throughput
/// near zero). 10 x 6500 fits.
pub const MAX_MTU: u16 = 6500;

/// UDP socket buffer size asked of the OS.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// How long a connection may hear nothing from its peer before it counts as lost (also the
/// limit on a handshake with a peer that does not answer).
pub const IDLE_TIMEOUT_MS: u32 = 10_000;

/// The transport settings every Amity endpoint uses.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.receive_window(VarInt::from_u32(64 << 20));
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(256));
    t.max_concurrent_uni_streams(VarInt::from_u32(256));
    // A peer that vanishes (a coordinator replica killed) is noticed within 10 s, so that its
    // workers move on to the next replica; keep-alives hold a quiet connection open meanwhile.
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    t.initial_mtu(1452);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    // Probe up to jumbo frames: on an ordinary internet path the probes are lost and the
    // packet size stays near 1452; on loopback and data-centre links it grows.
    mtu.upper_bound(MAX_MTU);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The endpoint settings: it accepts UDP payloads up to [`MAX_MTU`] from peers. quinn's
/// default (1472) also caps what MTU discovery may probe for, since a peer never sends more
/// than the other side advertises, so without this the transport settings' upper bound has no
/// effect.
pub fn endpoint_config() -> EndpointConfig {
    let mut e = EndpointConfig::default();
    e.max_udp_payload_size(MAX_MTU)
        .expect("MAX_MTU is within QUIC's 1200..=65527");
    e
}

/// A UDP socket with large buffers (the OS may grant less; that is logged, not fatal).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    for (what, r) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = r {
            tracing::warn!("cannot set the UDP {what} buffer to {SOCKET_BUFFER} bytes: {e}");
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The UDP buffer sizes the OS grants a socket that asks for [`SOCKET_BUFFER`]: (receive,
/// send) in bytes. Linux caps them at `net.core.rmem_max` / `wmem_max`.
pub fn granted_buffers() -> std::io::Result<(usize, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice what it grants (the other half is its own bookkeeping).
    let halve = |n: usize| if cfg!(target_os = "linux") { n / 2 } else { n };
    Ok((
        halve(socket.recv_buffer_size()?),
        halve(socket.send_buffer_size()?),
    ))
}

/// The path MTU towards `to` as the kernel knows it now (the route's interface MTU until
/// path-MTU discovery learns a smaller one), in bytes of IP packet. Linux only.
#[cfg(target_os = "linux")]
pub fn path_mtu(to: SocketAddr) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().expect("address")
    } else {
        "0.0.0.0:0".parse().expect("address")
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(to)?;
    let (level, name) = if to.is_ipv6() {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, an int it is given the size of.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mtu as u32)
}

/// A server endpoint on `addr` (port 0 picks a free port).
pub fn server(addr: SocketAddr, config: quinn::ServerConfig) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        endpoint_config(),
        Some(config),
        udp_socket(addr)?,
        Arc::new(TokioRuntime),
    )
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client(server: SocketAddr, config: quinn::ClientConfig) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().expect("address")
    } else {
        "0.0.0.0:0".parse().expect("address")
    };
    let mut ep = quinn::Endpoint::new(
        endpoint_config(),
        None,
        udp_socket(bind)?,
        Arc::new(TokioRuntime),
    )?;
    ep.set_default_client_config(config);
    Ok(ep)
}
