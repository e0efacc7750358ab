//! `amity bench transfer`: bulk throughput over loopback QUIC (our tuned endpoint), TCP with
//! TLS 1.3 (tokio-rustls: the fair baseline, since both encrypt) and plain TCP, in one run.
//!
//! Each transport moves the same bytes from a 1 MiB buffer, client to server; the time runs
//! from the first write to the server having read the last byte. QUIC is measured with one
//! stream and with four streams on one connection (the figure reported is the better).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::endpoint;
use crate::tls::{
    Identity, TlsError, client_tls, init_ca, issue, quic_client_config, quic_server_config,
    server_tls,
};

/// The bench's figures; the last stdout line.
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    /// Always `transfer`.
    pub bench: &'static str,
    /// Bytes moved per transport.
    pub bytes: u64,
    /// QUIC, the better of one and four streams, GB/s.
    pub quic_gbps: f64,
    /// QUIC with one stream.
    pub quic_1_stream_gbps: f64,
    /// QUIC with four streams on one connection.
    pub quic_4_streams_gbps: f64,
    /// TCP + TLS 1.3, GB/s.
    pub tls_gbps: f64,
    /// Plain TCP, GB/s.
    pub tcp_gbps: f64,
    /// `quic_gbps / tls_gbps`.
    pub ratio: f64,
    /// Where QUIC's time goes, from the sender's connection statistics (one-stream run).
    pub quic_path: QuicPathStats,
}

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

/// Errors of the bench.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Sockets and streams.
    #[error("{0}")]
    Io(String),
}

fn io<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TransferError {
    move |e| TransferError::Io(format!("{what}: {e}"))
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Runs the three transfers of `bytes` each; certificates are made in `scratch`.
pub async fn transfer(bytes: u64, scratch: &Path) -> Result<TransferReport, TransferError> {
    let _ = std::fs::remove_dir_all(scratch);
    init_ca(scratch, "bench")?;
    issue(scratch, "coordinator", &["127.0.0.1".into()])?;
    issue(scratch, "client", &[])?;
    let server_id = Identity::load_from_ca_dir(scratch, "coordinator")?;
    let client_id = Identity::load_from_ca_dir(scratch, "client")?;

    let (quic_1, path) = quic(bytes, 1, &server_id, &client_id).await?;
    eprintln!(
        "QUIC, 1 stream:  {quic_1:.2} GB/s (MTU {}, {} packets, {} lost, {} congestion events, \
         {:.1} datagrams per send call, RTT {} us, MTU probes {:?} sent/lost, {} black holes)",
        path.mtu,
        path.sent_packets,
        path.lost_packets,
        path.congestion_events,
        path.datagrams_per_send,
        path.rtt_us,
        path.mtu_probes,
        path.black_holes
    );
    let (quic_4, _) = quic(bytes, 4, &server_id, &client_id).await?;
    eprintln!("QUIC, 4 streams: {quic_4:.2} GB/s");
    let tls = tcp(bytes, Some((&server_id, &client_id))).await?;
    eprintln!("TCP + TLS 1.3:   {tls:.2} GB/s");
    let plain = tcp(bytes, None).await?;
    eprintln!("TCP:             {plain:.2} GB/s");
    let _ = std::fs::remove_dir_all(scratch);
    let best = quic_1.max(quic_4);
    Ok(TransferReport {
        bench: "transfer",
        bytes,
        quic_gbps: best,
        quic_1_stream_gbps: quic_1,
        quic_4_streams_gbps: quic_4,
        tls_gbps: tls,
        tcp_gbps: plain,
        ratio: best / tls,
        quic_path: path,
    })
}

async fn quic(
    bytes: u64,
    streams: u64,
    server_id: &Identity,
    client_id: &Identity,
) -> Result<(f64, QuicPathStats), TransferError> {
    let server = endpoint::server(
        "127.0.0.1:0".parse().expect("address"),
        quic_server_config(server_id, &Default::default())?,
    )
    .map_err(io("QUIC server"))?;
    let addr = server.local_addr().map_err(io("QUIC server"))?;
    let per_stream = bytes / streams;
    let receiver = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .ok_or("no connection")?
            .await
            .map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                while let Some(k) = recv.read(&mut buf).await.map_err(|e| e.to_string())? {
                    n += k as u64;
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
    let client =
        endpoint::client(addr, quic_client_config(client_id)?).map_err(io("QUIC client"))?;
    let conn = client
        .connect(addr, "coordinator")
        .map_err(io("QUIC connect"))?
        .await
        .map_err(io("QUIC handshake"))?;
    let start = Instant::now();
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
    let st = conn.stats();
    conn.close(0u32.into(), b"done");
    if got != per_stream * streams {
        return Err(TransferError::Io(format!(
            "QUIC moved {got} of {bytes} bytes"
        )));
    }
    let path = QuicPathStats {
        mtu: st.path.current_mtu,
        sent_packets: st.path.sent_packets,
        lost_packets: st.path.lost_packets,
        congestion_events: st.path.congestion_events,
        mtu_probes: (st.path.sent_plpmtud_probes, st.path.lost_plpmtud_probes),
        black_holes: st.path.black_holes_detected,
        datagrams_per_send: st.udp_tx.datagrams as f64 / st.udp_tx.ios.max(1) as f64,
        rtt_us: st.path.rtt.as_micros() as u64,
    };
    Ok((gbps(got, (end - start).as_secs_f64()), path))
}

async fn tcp(bytes: u64, tls: Option<(&Identity, &Identity)>) -> Result<f64, TransferError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("TCP listen"))?;
    let addr: SocketAddr = listener.local_addr().map_err(io("TCP listen"))?;
    let acceptor = match tls {
        Some((server_id, _)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(
            server_id,
            &Default::default(),
            b"amity-bench",
        )?))),
        None => None,
    };
    let receiver = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let n = match acceptor {
            Some(a) => drain(a.accept(sock).await.map_err(|e| e.to_string())?).await,
            None => drain(sock).await,
        }
        .map_err(|e| e.to_string())?;
        Ok::<(u64, Instant), String>((n, Instant::now()))
    });
    let sock = TcpStream::connect(addr).await.map_err(io("TCP connect"))?;
    let start = match tls {
        Some((_, client_id)) => {
            let connector =
                tokio_rustls::TlsConnector::from(Arc::new(client_tls(client_id, b"amity-bench")?));
            let name = rustls::pki_types::ServerName::try_from("coordinator")
                .map_err(io("server name"))?;
            let s = connector
                .connect(name, sock)
                .await
                .map_err(io("TLS handshake"))?;
            let start = Instant::now();
            fill(s, bytes).await.map_err(io("TLS write"))?;
            start
        }
        None => {
            let start = Instant::now();
            fill(sock, bytes).await.map_err(io("TCP write"))?;
            start
        }
    };
    let (got, end) = receiver
        .await
        .map_err(io("TCP receiver"))?
        .map_err(io("TCP receive"))?;
    if got != bytes {
        return Err(TransferError::Io(format!(
            "TCP moved {got} of {bytes} bytes"
        )));
    }
    Ok(gbps(got, (end - start).as_secs_f64()))
}

/// Writes `bytes` from a 1 MiB buffer, shuts the sending side down, then reads until the
/// peer closes. (Closing a socket with unread input, such as TLS 1.3 session tickets, sends a
/// reset that can reach the receiver before the last bytes are read.)
async fn fill<S: AsyncRead + AsyncWrite + Unpin>(mut w: S, bytes: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    // The peer closes without a TLS close_notify once it has everything: an error here only
    // says how it closed.
    let _ = drain(w).await;
    Ok(())
}

/// Reads to the end; returns the byte count.
async fn drain<R: AsyncRead + Unpin>(mut r: R) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf).await? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}
