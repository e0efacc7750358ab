//! Identity and trust: the operator's CA, institution certificates, mutual TLS configs.
//!
//! The operator runs `amity ca init` once (a self-signed CA, `ca.crt` + `ca.key`), then
//! `amity ca issue --name <institution>` for each worker and `--name coordinator --host ...`
//! for each coordinator. Both sides of every connection present a certificate signed by that
//! CA (mutual TLS 1.3); a worker's identity is its certificate's name. The coordinator refuses
//! revoked names during the handshake, so a revoked peer never gets a connection.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use crate::{ALPN, RAFT_ALPN};

/// Errors of certificate handling; each names the file where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that is not the PEM it should be.
    #[error("{path}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Refusing to overwrite.
    #[error("{0} exists already; refusing to overwrite it")]
    Exists(PathBuf),
    /// A name that cannot be a certificate name.
    #[error("{0:?} is not a usable name (letters, digits, '-', '_', '.'; 1-64 characters)")]
    BadName(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Whether `name` is a usable certificate name: 1-64 of `A-Z a-z 0-9 - _ .`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_name(name: &str) -> Result<(), TlsError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(TlsError::BadName(name.to_owned()))
    }
}

/// The files of a CA folder.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The folder.
    pub dir: PathBuf,
}

impl CaFiles {
    /// The CA certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The CA private key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// The certificate of `name`.
    pub fn cert_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }
    /// The private key of `name`.
    pub fn key_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

/// Creates a CA in `dir` (`ca.crt`, `ca.key`); refuses to overwrite one.
pub fn init_ca(dir: &Path, operator: &str) -> Result<CaFiles, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let files = CaFiles {
        dir: dir.to_owned(),
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{operator} Amity CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&files.key(), &key.serialize_pem(), true)?;
    write_new(&files.cert(), &cert.pem(), false)?;
    Ok(files)
}

/// What the holder of a certificate from the operator's CA is: an institution (a worker, or a
/// single coordinator), a replica of a replicated coordinator, or the operator. A replica
/// certificate carries the organisational unit [`REPLICA_UNIT`] (only such certificates may
/// speak Raft), an operator's [`OPERATOR_UNIT`] (only such may change the coordinator, as
/// `amity coordinator members` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    /// An institution's worker, or a single coordinator.
    Member,
    /// A coordinator replica.
    Replica,
    /// The operator running the coordinator.
    Operator,
}

/// The organisational unit that marks a replica certificate.
pub const REPLICA_UNIT: &str = "amity-replica";

/// The organisational unit that marks an operator certificate.
pub const OPERATOR_UNIT: &str = "amity-operator";

/// Issues a certificate for `name` signed by the CA in `dir`: usable as a client (worker,
/// fetcher) and, with `hosts`, as a server reachable under those DNS names or IP addresses.
pub fn issue(dir: &Path, name: &str, hosts: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    issue_as(dir, name, hosts, CertRole::Member)
}

/// [`issue`] for a certificate of role `role`.
pub fn issue_as(
    dir: &Path,
    name: &str,
    hosts: &[String],
    role: CertRole,
) -> Result<(PathBuf, PathBuf), TlsError> {
    check_name(name)?;
    let files = CaFiles {
        dir: dir.to_owned(),
    };
    let ca_key_pem = String::from_utf8_lossy(&read(&files.key())?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::BadPem {
        path: files.key(),
        reason: e.to_string(),
    })?;
    let ca_pem = String::from_utf8_lossy(&read(&files.cert())?).into_owned();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::BadPem {
        path: files.cert(),
        reason: e.to_string(),
    })?;
    let mut sans = vec![name.to_owned()];
    sans.extend(hosts.iter().cloned());
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    match role {
        CertRole::Replica => dn.push(DnType::OrganizationalUnitName, REPLICA_UNIT),
        CertRole::Operator => dn.push(DnType::OrganizationalUnitName, OPERATOR_UNIT),
        CertRole::Member => {}
    }
    params.distinguished_name = dn;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (files.cert_of(name), files.key_of(name));
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

/// A certificate chain and key loaded from PEM files, plus the CA to trust.
#[derive(Debug)]
pub struct Identity {
    /// Our certificate (chain).
    pub chain: Vec<CertificateDer<'static>>,
    /// Our key.
    pub key: PrivateKeyDer<'static>,
    /// The CA certificate peers must chain to.
    pub ca: CertificateDer<'static>,
    /// Our name (the certificate's common name).
    pub name: String,
}

impl Identity {
    /// Loads `cert`, `key` and the CA certificate `ca`.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let bad = |path: &Path, reason: String| TlsError::BadPem {
            path: path.to_owned(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        let Some(first) = chain.first() else {
            return Err(bad(cert, "no certificate in the file".into()));
        };
        let name = cert_name(first).ok_or_else(|| bad(cert, "certificate has no name".into()))?;
        let key_der =
            PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| bad(key, e.to_string()))?;
        let ca_der =
            CertificateDer::from_pem_slice(&read(ca)?).map_err(|e| bad(ca, e.to_string()))?;
        Ok(Identity {
            chain,
            key: key_der,
            ca: ca_der,
            name,
        })
    }

    /// Loads `<dir>/<name>.crt`, `<dir>/<name>.key` and `<dir>/ca.crt`.
    pub fn load_from_ca_dir(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let f = CaFiles {
            dir: dir.to_owned(),
        };
        Self::load(&f.cert_of(name), &f.key_of(name), &f.cert())
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        Ok(roots)
    }
}

/// The common name (else the first DNS name) of a certificate.
pub fn cert_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    if let Some(cn) = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    })
}

/// A certificate's validity window (not before, not after), seconds since the Unix epoch.
pub fn cert_validity(cert: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = x509.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Whether `cert` is issued by `ca`: it names `ca`'s subject as its issuer and its signature
/// verifies with `ca`'s key.
pub fn issued_by(cert: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> bool {
    match (
        x509_parser::parse_x509_certificate(cert),
        x509_parser::parse_x509_certificate(ca),
    ) {
        (Ok((_, c)), Ok((_, a))) => {
            c.issuer().as_raw() == a.subject().as_raw()
                && c.verify_signature(Some(a.public_key())).is_ok()
        }
        _ => false,
    }
}

/// The role a certificate marks (see [`CertRole`]).
pub fn cert_role(cert: &CertificateDer<'_>) -> CertRole {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert) else {
        return CertRole::Member;
    };
    let unit = |unit: &str| {
        x509.subject()
            .iter_organizational_unit()
            .any(|ou| ou.as_str() == Ok(unit))
    };
    if unit(REPLICA_UNIT) {
        CertRole::Replica
    } else if unit(OPERATOR_UNIT) {
        CertRole::Operator
    } else {
        CertRole::Member
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate names a server refuses, shared with its handshakes: replacing the list takes
/// effect at the next handshake, without a restart.
#[derive(Debug, Clone, Default)]
pub struct Revocations(Arc<std::sync::RwLock<BTreeSet<String>>>);

impl Revocations {
    /// A list holding `names`.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Revocations(Arc::new(std::sync::RwLock::new(
            names.into_iter().collect(),
        )))
    }

    /// Whether `name` is revoked.
    pub fn contains(&self, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(name)
    }

    /// The names on the list.
    pub fn names(&self) -> BTreeSet<String> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the list; returns the names newly revoked.
    pub fn replace(&self, names: impl IntoIterator<Item = String>) -> Vec<String> {
        let new: BTreeSet<String> = names.into_iter().collect();
        let mut list = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let added = new.difference(&list).cloned().collect();
        *list = new;
        added
    }
}

/// Verifies clients against the CA, then refuses revoked names.
#[derive(Debug)]
struct RevocationCheck {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revocations,
}

impl ClientCertVerifier for RevocationCheck {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let name = cert_name(end_entity).unwrap_or_default();
        if self.revoked.contains(&name) {
            tracing::warn!("refused revoked certificate {name:?}");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client presents a certificate from the CA (workers, replicas).
    Required,
    /// Clients may come without a certificate (downstream users fetching releases); a
    /// certificate that is presented must still chain to the CA and not be revoked. The server
    /// decides what an anonymous peer may do ([`peer_name`] is `None` for it).
    Optional,
}

/// A rustls server config requiring client certificates from the CA, minus `revoked` names.
pub fn server_tls(
    id: &Identity,
    revoked: &Revocations,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    server_tls_with(id, revoked, alpn, ClientAuth::Required)
}

fn server_tls_with(
    id: &Identity,
    revoked: &Revocations,
    alpn: &[u8],
    auth: ClientAuth,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(id.roots()?), provider());
    let builder = match auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let inner = builder
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(RevocationCheck {
        inner,
        revoked: revoked.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    // No session resumption: a resumed session skips the client-certificate check, and so
    // would let a certificate revoked since its first handshake back in. Peers keep long-lived
    // connections, so resumption would save little.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// A rustls client config trusting the CA and presenting our certificate.
pub fn client_tls(id: &Identity, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The quinn server config for Amity: mutual TLS, every client with a certificate.
pub fn quic_server_config(
    id: &Identity,
    revoked: &Revocations,
) -> Result<quinn::ServerConfig, TlsError> {
    quic_server_config_with(id, revoked, ClientAuth::Required)
}

/// The quinn server config for Amity with the given client authentication.
pub fn quic_server_config_with(
    id: &Identity,
    revoked: &Revocations,
    auth: ClientAuth,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_tls_with(id, revoked, ALPN, auth)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(crate::endpoint::transport_config()));
    Ok(cfg)
}

/// The quinn client config for Amity.
pub fn quic_client_config(id: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    quic_client(client_tls(id, ALPN)?)
}

/// The quinn configs between coordinator replicas: mutual TLS under [`RAFT_ALPN`], every peer
/// with a certificate from the CA (its role is checked after the handshake, [`peer_role`]).
pub fn quic_replica_configs(
    id: &Identity,
    revoked: &Revocations,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let tls = server_tls_with(id, revoked, RAFT_ALPN, ClientAuth::Required)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(crate::endpoint::transport_config()));
    Ok((server, quic_client(client_tls(id, RAFT_ALPN)?)?))
}

/// A rustls client config as quinn's, with Amity's transport settings.
fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(crate::endpoint::transport_config()));
    Ok(cfg)
}

/// Accepts any server certificate, still checking that the server holds its key (the handshake
/// signature). For downloads whose content is authenticated otherwise (signed releases).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The quinn client config of a downstream client without a certificate. With `server_ca`, the
/// server must chain to that CA; without, any server is accepted: the transport is encrypted
/// but not authenticated, which is enough only for content that carries its own signature.
pub fn quic_anonymous_client_config(
    server_ca: Option<&Path>,
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = match server_ca {
        Some(path) => {
            let der =
                CertificateDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::BadPem {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(der)
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quic_client(tls)
}

/// The certificate name of a connection's peer.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    peer_cert(conn).as_ref().and_then(cert_name)
}

/// The role of a connection's peer (`None` without a certificate).
pub fn peer_role(conn: &quinn::Connection) -> Option<CertRole> {
    peer_cert(conn).as_ref().map(cert_role)
}

fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_issued_by_its_own_ca_only_and_reads_its_validity() {
        let root = std::env::temp_dir().join(format!("amity-tls-issued-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        for dir in [&a, &b] {
            let _ = std::fs::remove_dir_all(dir);
            // Same operator name: same subject, different keys.
            init_ca(dir, "Example Consortium").unwrap();
        }
        issue(&a, "uni-a", &[]).unwrap();
        let id = Identity::load_from_ca_dir(&a, "uni-a").unwrap();
        let other = Identity::load(
            &a.join("uni-a.crt"),
            &a.join("uni-a.key"),
            &b.join("ca.crt"),
        )
        .unwrap();
        assert!(issued_by(&id.chain[0], &id.ca));
        assert!(!issued_by(&other.chain[0], &other.ca));
        let (from, until) = cert_validity(&id.chain[0]).unwrap();
        assert!(from < until);
        let _ = std::fs::remove_dir_all(&root);
    }
}
