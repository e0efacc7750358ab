//! `amity bench transfer`: bulk throughput over loopback of our blob protocol on QUIC beside
//! bare quinn, TCP with TLS 1.3 (tokio-rustls: the fair baseline, since both encrypt) and plain
//! TCP, in one run, with where our path loses.
//!
//! - **Ours** (`quic_gbps`): a blob fetched as workers and the coordinator fetch states and
//!   updates ([`crate::conn::fetch_blob`] against [`crate::conn::serve_blob_requests`]): header,
//!   outboard, framed 1 MiB chunks, each checked and written to the partial file, the file
//!   synced and checked whole against the id. Files live in memory (`/dev/shm` where there is
//!   one) so that a disk's speed is not what is measured.
//! - **Bare quinn** (`bare_quinn_gbps`): one stream of raw bytes with quinn's defaults, 4 MiB
//!   UDP buffers and packets up to [`crate::endpoint::MAX_MTU`], reading without copies.
//! - **Bare quinn to a file** (`bare_to_file_gbps`): the same, its receiver handing what it
//!   reads to a thread that writes it to a file beside ours and syncs it: the ceiling for any
//!   receiver that keeps the bytes. On a VM whose fresh memory pages are slow to fault in, the
//!   file write alone costs bare quinn a third to a half of its throughput (measured: 1.67 ->
//!   1.00 and 1.24 -> 0.67 GB/s); `ratio_bare_to_file` is what our protocol costs on top.
//!   The blob ours fetches is written once, before the repetitions, so that both receivers
//!   write into memory freed by the run before theirs.
//! - **Our endpoint, raw**: the same raw stream with our endpoint settings (one stream and
//!   four), which separates the settings from the protocol.
//! - **CPU seconds per GiB** (`quic_cpu_s_per_gib`, `bare_cpu_s_per_gib`,
//!   `bare_to_file_cpu_s_per_gib`): both ends together,
//!   over the timed window; where the two ends share the cores, GB/s is cores over this.
//! - **TCP + TLS 1.3** and **TCP**, from a 1 MiB buffer.
//!
//! The time runs from the first request or write to the receiver having the last byte. The
//! receiver's own steps (chunk hashing beside one streamed hash, joining packet pieces, file writes) are timed
//! alone and printed per GiB beside the transfer.

mod blob_path;
mod quic;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use blob_path::ReceiverCosts;
pub use quic::QuicPathStats;

use crate::tls::{Identity, TlsError, client_tls, init_ca, issue, server_tls};

/// The bench's figures; the last stdout line.
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    /// Always `transfer`.
    pub bench: &'static str,
    /// Bytes moved per transport.
    pub bytes: u64,
    /// Our blob protocol over our endpoint, GB/s (median of three).
    pub quic_gbps: f64,
    /// Bare quinn, one raw stream, GB/s (median of three).
    pub bare_quinn_gbps: f64,
    /// `quic_gbps / bare_quinn_gbps`.
    pub ratio_bare: f64,
    /// CPU seconds (user + system, both ends together: they share this process) per GiB moved
    /// by our path (median of three). Unlike GB/s this does not depend on how the two ends
    /// share the cores: on a machine where they cannot run side by side, throughput is cores
    /// over this.
    pub quic_cpu_s_per_gib: f64,
    /// The same for bare quinn.
    pub bare_cpu_s_per_gib: f64,
    /// Bare quinn whose receiver writes what it reads to a file in the same place as ours and
    /// syncs it (a writer thread, no protocol of ours): the ceiling for any receiver that keeps
    /// the bytes on this machine (median of three).
    pub bare_to_file_gbps: f64,
    /// CPU seconds per GiB of the same (both ends), median of three: compare with
    /// `quic_cpu_s_per_gib` for our protocol's own work (the sender's file read, the chunk
    /// hashes, one copy).
    pub bare_to_file_cpu_s_per_gib: f64,
    /// `quic_gbps / bare_to_file_gbps`: what our protocol itself costs.
    pub ratio_bare_to_file: f64,
    /// Our endpoint settings, one raw stream (median of three).
    pub quic_raw_1_stream_gbps: f64,
    /// Our endpoint settings, four raw streams on one connection.
    pub quic_raw_4_streams_gbps: f64,
    /// TCP + TLS 1.3, GB/s.
    pub tls_gbps: f64,
    /// Plain TCP, GB/s.
    pub tcp_gbps: f64,
    /// `quic_gbps / tls_gbps`.
    pub ratio: f64,
    /// The sender's path during our first blob transfer.
    pub quic_path: QuicPathStats,
    /// The sender's path during the first bare quinn transfer.
    pub bare_path: QuicPathStats,
    /// The receiver's own steps, per GiB.
    pub receiver_costs: ReceiverCosts,
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

/// CPU time (user + system) this process has used, in seconds (NaN off Linux).
fn cpu_seconds() -> f64 {
    #[cfg(target_os = "linux")]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points
        // at one; on failure (impossible for RUSAGE_SELF) the zeroed value is read.
        let usage = unsafe {
            libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
            usage.assume_init()
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        secs(usage.ru_utime) + secs(usage.ru_stime)
    }
    #[cfg(not(target_os = "linux"))]
    {
        f64::NAN
    }
}

fn cpu_per_gib(cpu_seconds: f64, bytes: u64) -> f64 {
    cpu_seconds * (1u64 << 30) as f64 / bytes.max(1) as f64
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Runs every transfer of `bytes`; certificates and files are made in `scratch` (files in
/// `/dev/shm` where there is one).
pub async fn transfer(bytes: u64, scratch: &Path) -> Result<TransferReport, TransferError> {
    let _ = std::fs::remove_dir_all(scratch);
    init_ca(scratch, "bench")?;
    issue(scratch, "coordinator", &["127.0.0.1".into()])?;
    issue(scratch, "client", &[])?;
    let server_id = Identity::load_from_ca_dir(scratch, "coordinator")?;
    let client_id = Identity::load_from_ca_dir(scratch, "client")?;
    let shm = Path::new("/dev/shm");
    let files = if shm.is_dir() {
        shm.join(scratch.file_name().unwrap_or("amity-bench".as_ref()))
    } else {
        scratch.join("files")
    };
    std::fs::create_dir_all(&files).map_err(io("bench files"))?;
    let result = run_all(bytes, &server_id, &client_id, &files).await;
    let _ = std::fs::remove_dir_all(&files);
    let _ = std::fs::remove_dir_all(scratch);
    result
}

async fn run_all(
    bytes: u64,
    server_id: &Identity,
    client_id: &Identity,
    files: &Path,
) -> Result<TransferReport, TransferError> {
    use quic::Setup;
    // Loopback throughput on a shared machine varies by 2x from one run to the next: each of
    // the compared transfers runs three times, interleaved, and the medians are reported.
    let (mut ours, mut bare, mut raw_1) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_cpu, mut bare_cpu, mut to_file) = (Vec::new(), Vec::new(), Vec::new());
    let mut to_file_cpu = Vec::new();
    let (mut quic_path, mut bare_path) = (None, None);
    let served = blob_path::ServedBlob::write(files, bytes)?;
    for rep in 1..=3 {
        let (g, cpu, path) = blob_path::blob(&served, server_id, client_id, files).await?;
        eprintln!(
            "[{rep}/3] ours (blob protocol):  {g:.2} GB/s, {cpu:.2} CPU s/GiB ({})",
            path.describe()
        );
        ours.push(g);
        ours_cpu.push(cpu);
        quic_path.get_or_insert(path);
        let (g, cpu, path) = quic::raw(Setup::Bare, bytes, 1, server_id, client_id, None).await?;
        eprintln!(
            "[{rep}/3] bare quinn, 1 stream:  {g:.2} GB/s, {cpu:.2} CPU s/GiB ({})",
            path.describe()
        );
        bare.push(g);
        bare_cpu.push(cpu);
        bare_path.get_or_insert(path);
        let sink = Some(files.join("bare"));
        let (g, cpu, _) =
            quic::raw(Setup::Bare, bytes, 1, server_id, client_id, sink.as_deref()).await?;
        eprintln!("[{rep}/3] bare quinn to a file:  {g:.2} GB/s, {cpu:.2} CPU s/GiB");
        to_file.push(g);
        to_file_cpu.push(cpu);
        let (g, _, path) = quic::raw(Setup::Ours, bytes, 1, server_id, client_id, None).await?;
        eprintln!(
            "[{rep}/3] our endpoint, raw:     {g:.2} GB/s ({})",
            path.describe()
        );
        raw_1.push(g);
    }
    drop(served);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours, bare, raw_1) = (median(&mut ours), median(&mut bare), median(&mut raw_1));
    let (ours_cpu, bare_cpu) = (median(&mut ours_cpu), median(&mut bare_cpu));
    let (to_file, to_file_cpu) = (median(&mut to_file), median(&mut to_file_cpu));
    let (quic_path, bare_path) = (
        quic_path.expect("three runs"),
        bare_path.expect("three runs"),
    );
    let (raw_4, _, _) = quic::raw(Setup::Ours, bytes, 4, server_id, client_id, None).await?;
    eprintln!("our endpoint, 4 raw streams: {raw_4:.2} GB/s");
    let tls = tcp(bytes, Some((server_id, client_id))).await?;
    eprintln!("TCP + TLS 1.3:         {tls:.2} GB/s");
    let plain = tcp(bytes, None).await?;
    eprintln!("TCP:                   {plain:.2} GB/s");
    let costs = blob_path::receiver_costs(256, files)?;
    eprintln!(
        "our receiver per GiB, alone: chunk hashes {:.0} ms (one streamed hash: {:.0} ms), joining \
         packet pieces {:.0} ms, file write and sync {:.0} ms; the transfer itself (bare quinn) \
         {:.0} ms",
        costs.chunk_hash_ms,
        costs.stream_hash_ms,
        costs.framing_ms,
        costs.file_write_ms,
        (1u64 << 30) as f64 / (bare * 1e9) * 1e3
    );
    Ok(TransferReport {
        bench: "transfer",
        bytes,
        quic_gbps: ours,
        bare_quinn_gbps: bare,
        ratio_bare: ours / bare,
        quic_cpu_s_per_gib: ours_cpu,
        bare_cpu_s_per_gib: bare_cpu,
        bare_to_file_gbps: to_file,
        bare_to_file_cpu_s_per_gib: to_file_cpu,
        ratio_bare_to_file: ours / to_file,
        quic_raw_1_stream_gbps: raw_1,
        quic_raw_4_streams_gbps: raw_4,
        tls_gbps: tls,
        tcp_gbps: plain,
        ratio: ours / tls,
        quic_path,
        bare_path,
        receiver_costs: costs,
    })
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
