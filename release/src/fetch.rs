//! Fetching a release over QUIC: a downstream client of a coordinator, without a certificate.
//!
//! It asks for the release by name, gets the manifest's blob id and signature, downloads and
//! verifies the manifest, checks the signature under the trusted key **before** downloading
//! anything else, then pulls every file by its BLAKE3 id into the staging folder. A broken
//! connection reconnects and resumes each file from its verified prefix; the release appears
//! under `--out` only once every file verified (see [`Staging`](crate::Staging)).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::known::Trust;
use crate::{Begun, FetchReport, MAX_MANIFEST_BYTES, ReleaseError, Signed, Staging};
use amity_protocol::conn::{ConnError, MsgStream, fetch_blob_bytes, fetch_blob_until, hello};
use amity_protocol::message::{ClientMsg, ErrorCode, ServerMsg};
use amity_protocol::tls::{TlsError, quic_anonymous_client_config};
use amity_shared::store::BlobId;

/// Where and how to fetch from a coordinator.
#[derive(Debug, Clone)]
pub struct QuicSource {
    /// The coordinator's address.
    pub addr: SocketAddr,
    /// Its certificate name.
    pub server_name: String,
    /// The operator CA to check the coordinator against (`None`: any server; the release
    /// signature is what is trusted).
    pub server_ca: Option<PathBuf>,
    /// Fault injection for tests: drop the connection once this many bytes of files arrived.
    pub drop_after_bytes: Option<u64>,
}

/// Consecutive attempts without progress before giving up.
const ATTEMPTS: u32 = 6;

/// A failure that retrying cannot fix.
fn fatal(e: &ConnError) -> bool {
    matches!(
        e,
        ConnError::Remote {
            code: ErrorCode::NotFound | ErrorCode::VersionMismatch | ErrorCode::Unexpected,
            ..
        }
    )
}

async fn open_session(
    endpoint: &quinn::Endpoint,
    src: &QuicSource,
) -> Result<(quinn::Connection, MsgStream, String), ConnError> {
    let peer = format!("coordinator {}", src.addr);
    let conn = endpoint
        .connect(src.addr, &src.server_name)
        .map_err(|e| ConnError::Unexpected {
            peer: peer.clone(),
            what: e.to_string(),
        })?
        .await
        .map_err(|source| ConnError::Connection {
            peer: peer.clone(),
            source,
        })?;
    let software = format!("amity fetch {}", env!("CARGO_PKG_VERSION"));
    let (control, _) = hello(&conn, &peer, &software).await?;
    Ok((conn, control, peer))
}

/// Asks for release `name`: its manifest id and signature.
async fn query(
    control: &mut MsgStream,
    name: &str,
) -> Result<(BlobId, Vec<u8>, String), ConnError> {
    control
        .send(&ClientMsg::ReleaseQuery { name: name.into() })
        .await?;
    let peer = control.peer().to_owned();
    match control.recv::<ServerMsg>().await? {
        Some(ServerMsg::ReleaseInfo {
            name,
            manifest,
            signature,
        }) => Ok((manifest, signature, name)),
        other => Err(ConnError::unexpected_answer(&peer, other, "ReleaseInfo")),
    }
}

/// Checks that the release a server answered with is the one asked for: the signed manifest's
/// name must be the server's answer, and, unless `latest` was asked for, the name asked for. A
/// server cannot hand out an older signed release under a newer name (security review M2).
fn check_release_name(asked: &str, answered: &str, signed: &str) -> Result<(), String> {
    if signed != answered {
        return Err(format!("manifest of `{signed}` for release `{answered}`"));
    }
    if asked != "latest" && signed != asked {
        return Err(format!(
            "asked for release `{asked}`, the server sent the signed release `{signed}`"
        ));
    }
    Ok(())
}

fn part_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Why a fetch stopped.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The client's TLS configuration could not be made (a bad `--ca` file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No UDP socket for the client.
    #[error("client endpoint for {addr}")]
    Endpoint {
        /// The coordinator's address.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: std::io::Error,
    },
    /// The release itself is refused (signature, trust, manifest, files), or could not be staged.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The coordinator refused in a way retrying cannot change (no such release, another
    /// protocol version).
    #[error(transparent)]
    Refused(ConnError),
    /// The connection kept failing without progress.
    #[error("giving up after {attempts} attempts without progress")]
    GaveUp {
        /// Attempts made in a row without a byte of progress.
        attempts: u32,
        /// The last failure.
        #[source]
        last: ConnError,
    },
}

/// Fetches release `name` from a coordinator into `out`, resuming across reconnects;
/// `progress` follows the file bytes verified or partly received.
pub async fn fetch_quic(
    src: &QuicSource,
    name: &str,
    out: &Path,
    trust: &Trust,
    progress: Arc<AtomicU64>,
) -> Result<FetchReport, FetchError> {
    let cfg = quic_anonymous_client_config(src.server_ca.as_deref())?;
    let endpoint =
        amity_protocol::endpoint::client(src.addr, cfg).map_err(|source| FetchError::Endpoint {
            addr: src.addr,
            source,
        })?;
    let mut staging: Option<(Staging, crate::known::TrustOutcome)> = None;
    let mut resolved = name.to_owned();
    let mut failures = 0u32;
    let dropped = Arc::new(AtomicBool::new(false));
    let report = loop {
        let attempt = async {
            let (conn, mut control, peer) = open_session(&endpoint, src).await?;
            let (manifest_id, signature, real_name) = query(&mut control, &resolved).await?;
            if staging.is_none() {
                let tmp = out.with_extension("manifest.part");
                let most = MAX_MANIFEST_BYTES as u64;
                let bytes = fetch_blob_bytes(&conn, &peer, manifest_id, &tmp, most).await?;
                let signed = Signed::parse(bytes, signature, &peer).map_err(Failure::release)?;
                if let Err(what) = check_release_name(name, &real_name, &signed.manifest.name) {
                    return Err(Failure::Conn(ConnError::Unexpected {
                        peer: peer.clone(),
                        what,
                    }));
                }
                // Nothing but the manifest is downloaded before the signature verified.
                let outcome = signed.verify(trust).map_err(Failure::release)?;
                if name == "latest" {
                    let m = &signed.manifest;
                    trust
                        .check_fresh(&m.name, &m.publisher, m.round)
                        .map_err(|e| Failure::release(e.into()))?;
                }
                let (s, begun) = Staging::begin(out, signed).map_err(Failure::release)?;
                if begun == Begun::AlreadyPresent {
                    conn.close(0u32.into(), b"done");
                    return Ok(Some((s, outcome, true)));
                }
                resolved = real_name;
                staging = Some((s, outcome));
            }
            let (s, _) = staging.as_ref().expect("set above");
            if s.signed().manifest_id() != manifest_id {
                return Err(Failure::Conn(ConnError::Unexpected {
                    peer,
                    what: format!("release `{resolved}` changed during the download; fetch again"),
                }));
            }
            download_files(&conn, &peer, s, src, &dropped, &progress).await?;
            conn.close(0u32.into(), b"done");
            Ok::<_, Failure>(None)
        };
        let before = progress.load(Ordering::Relaxed);
        match attempt.await {
            Ok(Some((s, outcome, _))) => {
                break FetchReport {
                    manifest: s.manifest().clone(),
                    out: out.to_owned(),
                    transferred: 0,
                    trust: outcome,
                    already_present: true,
                };
            }
            Ok(None) => {
                let (s, outcome) = staging.take().expect("staged");
                let manifest = s.manifest().clone();
                let out = s.finish()?;
                break FetchReport {
                    transferred: manifest.total_bytes(),
                    manifest,
                    out,
                    trust: outcome,
                    already_present: false,
                };
            }
            Err(Failure::Release(e)) => return Err(e.into()),
            Err(Failure::Conn(e)) if fatal(&e) => return Err(FetchError::Refused(e)),
            Err(Failure::Conn(e)) => {
                let progressed = progress.load(Ordering::Relaxed) > before;
                failures = if progressed { 1 } else { failures + 1 };
                if failures >= ATTEMPTS {
                    return Err(FetchError::GaveUp {
                        attempts: ATTEMPTS,
                        last: e,
                    });
                }
                let wait = Duration::from_millis(200 << failures.min(5));
                tracing::warn!("{e}; reconnecting in {wait:?} and resuming");
                tokio::time::sleep(wait).await;
            }
        }
    };
    endpoint.wait_idle().await;
    let m = &report.manifest;
    if let Err(e) = trust.remember(&m.publisher, m.key(), m.round) {
        tracing::warn!("cannot record round {} of `{}`: {e}", m.round, m.publisher);
    }
    Ok(report)
}

/// Downloads the staged release's files that an earlier attempt did not verify (resuming
/// partial ones), verifying each, while `progress` follows the bytes.
async fn download_files(
    conn: &quinn::Connection,
    peer: &str,
    s: &Staging,
    src: &QuicSource,
    dropped: &AtomicBool,
    progress: &Arc<AtomicU64>,
) -> Result<(), Failure> {
    // Files verified by an earlier attempt are hashed once here, not again below.
    let (done, todo): (Vec<_>, Vec<_>) = s
        .manifest()
        .files
        .iter()
        .cloned()
        .partition(|f| s.is_done(f));
    let done_before: u64 = done.iter().map(|f| f.bytes).sum();
    // Progress watches the partial files grow.
    let watcher = {
        let parts: Vec<PathBuf> = todo.iter().map(|f| s.part_path(f)).collect();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let partial: u64 = parts.iter().map(|p| part_size(p)).sum();
                progress.store(done_before + partial, Ordering::Relaxed);
            }
        })
    };
    let mut result = Ok(());
    let mut done = done_before;
    for f in &todo {
        let part = s.part_path(f);
        let have = part_size(&part);
        if have > 0 {
            tracing::info!("resuming {} at byte {have} of {}", f.path, f.bytes);
        }
        // Fault injection (tests): the first transfer that reaches the limit is cut
        // and the connection dropped.
        let stop_at = match src.drop_after_bytes {
            Some(limit) if !dropped.load(Ordering::Relaxed) && f.bytes > limit => Some(limit),
            _ => None,
        };
        if let Err(e) = fetch_blob_until(conn, peer, f.blake3, &part, f.bytes, stop_at).await {
            if let ConnError::Stopped { bytes, .. } = &e {
                dropped.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "fault injection: dropping the connection after {bytes} bytes of {}",
                    f.path
                );
                conn.close(0u32.into(), b"fault injection");
            }
            result = Err(e);
            break;
        }
        s.accept(f).map_err(Failure::release)?;
        done += f.bytes;
        progress.store(done, Ordering::Relaxed);
    }
    watcher.abort();
    result.map_err(Failure::Conn)
}

/// Why an attempt failed: the connection (retry and resume) or the release itself (stop).
enum Failure {
    Conn(ConnError),
    Release(ReleaseError),
}

impl From<ConnError> for Failure {
    fn from(e: ConnError) -> Self {
        Failure::Conn(e)
    }
}

impl Failure {
    fn release(e: ReleaseError) -> Self {
        Failure::Release(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_asked_for_by_name_must_be_that_release() {
        assert!(check_release_name("v2", "v2", "v2").is_ok());
        assert!(check_release_name("latest", "v7", "v7").is_ok());
        let err = check_release_name("v2", "v1", "v1").unwrap_err();
        assert!(err.contains("asked for release `v2`"), "{err}");
        assert!(check_release_name("v2", "v2", "v1").is_err());
    }
}
