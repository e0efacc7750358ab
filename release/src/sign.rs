//! Release signatures: Ed25519 keys, signing a manifest, and deciding which key to trust.
//!
//! The signed message is a fixed domain tag followed by the exact bytes of `manifest.json`, so a
//! signature made for a release can never be replayed as a signature of anything else. Keys are
//! files of hex digits: `release.key` holds the PKCS#8 document (kept private, mode 0600),
//! `release.pub` the 32-byte public key. Trust follows SSH's known hosts: a key given on the
//! command line must match; otherwise the key pinned for the publisher at that origin in the
//! known-publishers file ([`crate::known`]) must, and a first use is pinned only when allowed.

use std::path::{Path, PathBuf};

use amity_protocol::id::{hex, unhex};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Prefix of every signed message.
pub const SIGNING_DOMAIN: &[u8] = b"amity-release-manifest-v1\0";

/// Errors of keys, signatures and trust.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Filesystem error on a key or known-publishers file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file or key string that is not what it should be.
    #[error("{what}: {reason}")]
    BadKey {
        /// The file or argument.
        what: String,
        /// Why.
        reason: String,
    },
    /// The signature does not verify with the trusted key.
    #[error(
        "the signature of release `{release}` does not verify with key {key}: the manifest was \
         changed after signing, or it was signed by another key"
    )]
    BadSignature {
        /// The release.
        release: String,
        /// The key tried (hex).
        key: String,
    },
    /// The release names a different key than the one trusted.
    #[error(
        "release `{release}` is signed by key {found}, but {trusted_from} trusts {expected} for \
         publisher `{publisher}`; if the publisher really changed its key, remove the old entry"
    )]
    UntrustedKey {
        /// The release.
        release: String,
        /// Its publisher.
        publisher: String,
        /// The key in the manifest.
        found: String,
        /// The key trusted.
        expected: String,
        /// Where the trusted key came from.
        trusted_from: String,
    },
    /// First release of a publisher from an origin, and pinning it was not allowed.
    #[error(
        "release from publisher `{publisher}` at {origin}, signed by key {key}, which nothing \
         here trusts yet. Check that key with the publisher, then pass `--key {key}` (or \
         `--accept-new` to pin it from now on, or `--ca` to authenticate the coordinator)"
    )]
    UnknownPublisher {
        /// The publisher named by the manifest.
        publisher: String,
        /// Where the release came from.
        origin: String,
        /// The key the manifest states (hex).
        key: String,
    },
    /// `latest` answered with an older release than one already fetched from there.
    #[error(
        "{origin} answered `latest` with release `{release}` of round {round}, but round \
         {highest} was fetched from it before ({recorded_in}): refusing a rollback; ask for a \
         release by name to fetch an older one"
    )]
    Rollback {
        /// The release offered.
        release: String,
        /// Its round.
        round: u64,
        /// The highest round seen before.
        highest: u64,
        /// Where it came from.
        origin: String,
        /// Where the highest round is recorded.
        recorded_in: String,
    },
}

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// From 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        unhex(s.trim())?.try_into().ok().map(PublicKey)
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A key given on the command line: 64 hex digits, or the path of a `release.pub` file.
    pub fn parse_arg(arg: &str) -> Result<Self, SignError> {
        if let Some(k) = Self::from_hex(arg) {
            return Ok(k);
        }
        let path = Path::new(arg);
        let text = std::fs::read_to_string(path).map_err(|source| SignError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_hex(&text).ok_or_else(|| SignError::BadKey {
            what: arg.to_owned(),
            reason: "not an Ed25519 public key (64 hex digits)".into(),
        })
    }

    /// Whether `signature` signs `manifest` (the bytes of `manifest.json`) under this key.
    pub fn verifies(&self, manifest: &[u8], signature: &[u8]) -> bool {
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(manifest);
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&msg, signature)
            .is_ok()
    }
}

/// A release signing key (private).
pub struct ReleaseKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleaseKey({})", self.public().to_hex())
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

impl ReleaseKey {
    /// Generates a key pair and writes `<dir>/release.key` and `<dir>/release.pub`; an
    /// existing key is never overwritten.
    pub fn generate(dir: &Path) -> Result<(ReleaseKey, PathBuf, PathBuf), SignError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SignError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (key_path, pub_path) = (dir.join("release.key"), dir.join("release.pub"));
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| SignError::BadKey {
            what: key_path.display().to_string(),
            reason: format!("key generation failed: {e}"),
        })?;
        let key = Self::from_pkcs8(doc.as_ref(), &key_path.display().to_string())?;
        write_private(&key_path, &format!("{}\n", hex(doc.as_ref()))).map_err(io(&key_path))?;
        std::fs::write(&pub_path, format!("{}\n", key.public().to_hex())).map_err(io(&pub_path))?;
        Ok((key, key_path, pub_path))
    }

    fn from_pkcs8(doc: &[u8], what: &str) -> Result<Self, SignError> {
        let pair = Ed25519KeyPair::from_pkcs8(doc).map_err(|e| SignError::BadKey {
            what: what.to_owned(),
            reason: format!("not an Ed25519 PKCS#8 key: {e}"),
        })?;
        Ok(ReleaseKey { pair })
    }

    /// Loads a `release.key` file.
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignError::Io {
            path: path.to_owned(),
            source,
        })?;
        let doc = unhex(text.trim()).ok_or_else(|| SignError::BadKey {
            what: path.display().to_string(),
            reason: "not hex digits".into(),
        })?;
        Self::from_pkcs8(&doc, &path.display().to_string())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs the bytes of `manifest.json`; the 64-byte signature.
    pub fn sign(&self, manifest: &[u8]) -> Vec<u8> {
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(manifest);
        self.pair.sign(&msg).as_ref().to_vec()
    }
}

/// Signature file contents (hex + newline) to bytes.
pub fn parse_signature(text: &str) -> Option<Vec<u8>> {
    unhex(text.trim()).filter(|s| s.len() == 64)
}

/// Signature bytes as the contents of `manifest.sig`.
pub fn signature_text(sig: &[u8]) -> String {
    format!("{}\n", hex(sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::known::{KnownPublishers, Trust, TrustOutcome};

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("amity-sign-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn keys_round_trip_and_signatures_verify_only_unchanged() {
        let d = dir("keys");
        let (key, key_path, pub_path) = ReleaseKey::generate(&d).unwrap();
        assert!(ReleaseKey::generate(&d).is_err(), "never overwrites a key");
        let loaded = ReleaseKey::load(&key_path).unwrap();
        assert_eq!(loaded.public(), key.public());
        let public = PublicKey::parse_arg(pub_path.to_str().unwrap()).unwrap();
        assert_eq!(public, key.public());
        let sig = key.sign(b"{\"a\":1}");
        assert!(public.verifies(b"{\"a\":1}", &sig));
        assert!(!public.verifies(b"{\"a\":2}", &sig));
        let other = ReleaseKey::generate(&d.join("other")).unwrap().0;
        assert!(!other.public().verifies(b"{\"a\":1}", &sig));
        assert_eq!(parse_signature(&signature_text(&sig)), Some(sig));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn first_use_pins_only_when_allowed_and_a_changed_key_is_refused() {
        let d = dir("tofu");
        let a = ReleaseKey::generate(&d.join("a")).unwrap().0;
        let b = ReleaseKey::generate(&d.join("b")).unwrap().0;
        let known = KnownPublishers::new(d.join("known"));
        let mut trust = Trust {
            key: None,
            known: Some(known.clone()),
            origin: "coord.example:7700".into(),
            accept_new: false,
        };
        let m = b"manifest";
        // Not interactive, no key: refused, naming the key to check (review M3).
        let err = trust
            .check(m, &a.sign(m), "r", "uni", a.public())
            .unwrap_err();
        assert!(matches!(err, SignError::UnknownPublisher { .. }), "{err}");
        assert!(err.to_string().contains(&a.public().to_hex()), "{err}");
        assert!(!d.join("known").exists(), "nothing pinned");
        trust.accept_new = true;
        let out = trust.check(m, &a.sign(m), "r", "uni", a.public()).unwrap();
        assert!(matches!(out, TrustOutcome::PinnedNew(_)));
        let out = trust.check(m, &a.sign(m), "r", "uni", a.public()).unwrap();
        assert_eq!(out, TrustOutcome::Trusted);
        let err = trust
            .check(m, &b.sign(m), "r", "uni", b.public())
            .unwrap_err();
        assert!(matches!(err, SignError::UntrustedKey { .. }), "{err}");
        // A bad signature is never pinned.
        let err = trust
            .check(m, &a.sign(m), "r", "other", b.public())
            .unwrap_err();
        assert!(matches!(err, SignError::BadSignature { .. }), "{err}");
        // Pins are per origin: the same publisher name elsewhere is another publisher.
        let elsewhere = Trust {
            origin: "other.example:7700".into(),
            accept_new: false,
            ..trust.clone()
        };
        let err = elsewhere
            .check(m, &b.sign(m), "r", "uni", b.public())
            .unwrap_err();
        assert!(matches!(err, SignError::UnknownPublisher { .. }), "{err}");
        let err = Trust::key(b.public())
            .check(m, &a.sign(m), "r", "uni", a.public())
            .unwrap_err();
        assert!(matches!(err, SignError::UntrustedKey { .. }), "{err}");

        // Rollback of `latest` (review M2).
        trust.check_fresh("v5", "uni", 5).unwrap();
        trust.remember("uni", a.public(), 5).unwrap();
        trust.check_fresh("v5", "uni", 5).unwrap();
        let err = trust.check_fresh("v3", "uni", 3).unwrap_err();
        assert!(
            matches!(err, SignError::Rollback { highest: 5, .. }),
            "{err}"
        );
        elsewhere.check_fresh("v3", "uni", 3).unwrap();
        Trust::key(a.public()).check_fresh("v3", "uni", 3).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
