//! Raw QUIC streams, no protocol of ours: with our endpoint settings, and bare quinn.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use quinn::{EndpointConfig, TokioRuntime, TransportConfig};
use serde::Serialize;

use super::{TransferError, cpu_per_gib, cpu_seconds, gbps, io};
use crate::endpoint::{self, MAX_MTU};
use crate::tls::{Identity, quic_client_config, quic_server_config};

/// Which QUIC settings a raw transfer runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// [`crate::endpoint`]'s: our windows, buffers, MTU discovery and keep-alives.
    Ours,
    /// quinn's defaults but for what the baseline tuned: 4 MiB UDP buffers and packets
    /// up to [`MAX_MTU`] (endpoint and MTU discovery), as a bare quinn pair would be set up.
    Bare,
}

/// UDP buffers of the bare setup.
const BARE_BUFFER: usize = 4 << 20;

/// The sending connection's view of a QUIC transfer.
#[derive(Debug, Clone, Serialize)]
pub struct QuicPathStats {
    /// UDP payload size at the end (after MTU discovery).
    pub mtu: u16,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost (each one a retransmission and a congestion-window cut).
    pub lost_packets: u64,
    /// Congestion events.
    pub congestion_events: u64,
    /// MTU probes sent and lost.
    pub mtu_probes: (u64, u64),
    /// Black holes detected (bursts of lost large packets that reset the MTU to 1200).
    pub black_holes: u64,
    /// Datagrams per send system call (above 1 when segmentation offload batches them).
    pub datagrams_per_send: f64,
    /// Smoothed round-trip time at the end, microseconds.
    pub rtt_us: u64,
}

impl QuicPathStats {
    /// The figures of `conn`'s path so far.
    pub fn of(conn: &quinn::Connection) -> Self {
        let st = conn.stats();
        QuicPathStats {
            mtu: st.path.current_mtu,
            sent_packets: st.path.sent_packets,
            lost_packets: st.path.lost_packets,
            congestion_events: st.path.congestion_events,
            mtu_probes: (st.path.sent_plpmtud_probes, st.path.lost_plpmtud_probes),
            black_holes: st.path.black_holes_detected,
            datagrams_per_send: st.udp_tx.datagrams as f64 / st.udp_tx.ios.max(1) as f64,
            rtt_us: st.path.rtt.as_micros() as u64,
        }
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        format!(
            "MTU {}, {} packets, {} lost, {} congestion events, {:.1} datagrams per send call, \
             RTT {} us, MTU probes {:?} sent/lost, {} black holes",
            self.mtu,
            self.sent_packets,
            self.lost_packets,
            self.congestion_events,
            self.datagrams_per_send,
            self.rtt_us,
            self.mtu_probes,
            self.black_holes
        )
    }
}

fn bare_transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_MTU);
    t.mtu_discovery_config(Some(mtu));
    t
}

fn bare_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(BARE_BUFFER)?;
    socket.set_send_buffer_size(BARE_BUFFER)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Both ends of a connection with `setup`'s settings, and the endpoints that carry it (kept
/// alive while it is used).
pub(super) struct Pair {
    /// The server's side.
    pub server: quinn::Connection,
    /// The client's side.
    pub client: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

/// A connected pair of endpoints with `setup`'s settings.
pub(super) async fn connect(
    setup: Setup,
    server_id: &Identity,
    client_id: &Identity,
) -> Result<Pair, TransferError> {
    let local: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let mut server_cfg = quic_server_config(server_id, &Default::default())?;
    let mut client_cfg = quic_client_config(client_id)?;
    let (server, client) = match setup {
        Setup::Ours => {
            let server = endpoint::server(local, server_cfg).map_err(io("QUIC server"))?;
            let addr = server.local_addr().map_err(io("QUIC server"))?;
            let client = endpoint::client(addr, client_cfg).map_err(io("QUIC client"))?;
            (server, client)
        }
        Setup::Bare => {
            let t = Arc::new(bare_transport());
            server_cfg.transport_config(t.clone());
            client_cfg.transport_config(t);
            let mut e = EndpointConfig::default();
            e.max_udp_payload_size(MAX_MTU)
                .expect("MAX_MTU is within QUIC's limits");
            let server = quinn::Endpoint::new(
                e.clone(),
                Some(server_cfg),
                bare_socket(local).map_err(io("QUIC server"))?,
                Arc::new(TokioRuntime),
            )
            .map_err(io("QUIC server"))?;
            let mut client = quinn::Endpoint::new(
                e,
                None,
                bare_socket(local).map_err(io("QUIC client"))?,
                Arc::new(TokioRuntime),
            )
            .map_err(io("QUIC client"))?;
            client.set_default_client_config(client_cfg);
            (server, client)
        }
    };
    let addr = server.local_addr().map_err(io("QUIC server"))?;
    let accepting = server.clone();
    let accept = tokio::spawn(async move {
        accepting
            .accept()
            .await
            .ok_or("no connection")?
            .await
            .map_err(|e| e.to_string())
    });
    let conn = client
        .connect(addr, "coordinator")
        .map_err(io("QUIC connect"))?
        .await
        .map_err(io("QUIC handshake"))?;
    let server_conn = accept
        .await
        .map_err(io("QUIC accept"))?
        .map_err(io("QUIC accept"))?;
    Ok(Pair {
        server: server_conn,
        client: conn,
        _endpoints: (server, client),
    })
}

/// Moves `bytes` over `streams` unidirectional streams of one connection with `setup`'s
/// settings: writes from a 1 MiB buffer, reads without copying (`read_chunk`). GB/s and the
/// CPU seconds per GiB (both ends) from the first write to the last byte read, and the
/// sender's path figures.
pub(super) async fn raw(
    setup: Setup,
    bytes: u64,
    streams: u64,
    server_id: &Identity,
    client_id: &Identity,
    sink: Option<&Path>,
) -> Result<(f64, f64, QuicPathStats), TransferError> {
    let pair = connect(setup, server_id, client_id).await?;
    let files: Vec<std::path::PathBuf> = (0..streams)
        .filter_map(|i| sink.map(|p| p.with_extension(format!("{i}"))))
        .collect();
    let sink_files = files.clone();
    let conn = pair.client.clone();
    let per_stream = bytes / streams;
    let server_conn = pair.server.clone();
    let receiver = tokio::spawn(async move {
        let conn = server_conn;
        let mut tasks = Vec::new();
        for i in 0..streams {
            let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
            let file = sink_files.get(i as usize).cloned();
            tasks.push(tokio::spawn(async move {
                let (tx, writer) = match file {
                    Some(path) => {
                        let (tx, rx) = tokio::sync::mpsc::channel(64);
                        (
                            Some(tx),
                            Some(tokio::task::spawn_blocking(|| write_all(path, rx))),
                        )
                    }
                    None => (None, None),
                };
                let mut n = 0u64;
                while let Some(c) = recv
                    .read_chunk(usize::MAX, true)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    n += c.bytes.len() as u64;
                    if let Some(tx) = &tx {
                        tx.send(c.bytes).await.map_err(|e| e.to_string())?;
                    }
                }
                drop(tx);
                if let Some(w) = writer {
                    w.await.map_err(|e| e.to_string())??;
                }
                Ok::<u64, String>(n)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.map_err(|e| e.to_string())??;
        }
        Ok::<(u64, Instant), String>((total, Instant::now()))
    });
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let mut senders = Vec::new();
    for _ in 0..streams {
        let mut send = conn.open_uni().await.map_err(io("QUIC stream"))?;
        senders.push(tokio::spawn(async move {
            let buf = vec![0x5au8; 1 << 20];
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                send.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
                left -= n as u64;
            }
            send.finish().map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }));
    }
    for s in senders {
        s.await
            .map_err(io("QUIC sender"))?
            .map_err(io("QUIC send"))?;
    }
    let (got, end) = receiver
        .await
        .map_err(io("QUIC receiver"))?
        .map_err(io("QUIC receive"))?;
    let cpu = cpu_seconds() - cpu;
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let path = QuicPathStats::of(&conn);
    conn.close(0u32.into(), b"done");
    if got != per_stream * streams {
        return Err(TransferError::Io(format!(
            "QUIC moved {got} of {bytes} bytes"
        )));
    }
    let secs = (end - start).as_secs_f64();
    Ok((gbps(got, secs), cpu_per_gib(cpu, got), path))
}

/// Writes what arrives on `rx` to a new file at `path` and syncs it: what any receiver that
/// keeps the bytes pays the machine, with no protocol of ours. The caller removes the file
/// after the clock stops, as ours removes its partial file.
fn write_all(
    path: std::path::PathBuf,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    while let Some(b) = rx.blocking_recv() {
        f.write_all(&b)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}
