//! Release signatures: Ed25519 keys, signing a manifest, and deciding which key to trust.
//!
//! The signed message is a fixed domain tag followed by the exact bytes of `manifest.json`, so a
//! signature made for a release can never be replayed as a signature of anything else. Keys are
//! files of hex digits: `release.key` holds the PKCS#8 document (kept private, mode 0600),
//! `release.pub` the 32-byte public key. Trust follows SSH's known hosts: a key given on the
//! command line must match; otherwise the first key seen for a publisher is pinned in a known
//! publishers file and any later, different key for that publisher is refused.

use std::path::{Path, PathBuf};

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
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// From 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        unhex(s)?.try_into().ok().map(PublicKey)
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
        let doc = unhex(&text).ok_or_else(|| SignError::BadKey {
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
    unhex(text).filter(|s| s.len() == 64)
}

/// Signature bytes as the contents of `manifest.sig`.
pub fn signature_text(sig: &[u8]) -> String {
    format!("{}\n", hex(sig))
}

/// Which key a release must be signed with.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly this key (given on the command line).
    Key(PublicKey),
    /// The key pinned for the publisher in this known-publishers file; pinned on first use.
    KnownPublishers(PathBuf),
}

/// What trust decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustOutcome {
    /// The key matched the one given or pinned.
    Trusted,
    /// First use: the publisher's key was pinned in the file.
    PinnedNew(PathBuf),
}

impl Trust {
    /// The default known-publishers file: `$AMITY_KNOWN_PUBLISHERS`, else
    /// `~/.amity/known_publishers`.
    pub fn default_file() -> PathBuf {
        if let Some(p) = std::env::var_os("AMITY_KNOWN_PUBLISHERS") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".amity").join("known_publishers")
    }

    /// Checks that `manifest` (its bytes, release name, publisher and stated key) is signed by
    /// `signature` under the trusted key. Pins the key on first use of a publisher, only after
    /// the signature verified.
    pub fn check(
        &self,
        manifest: &[u8],
        signature: &[u8],
        release: &str,
        publisher: &str,
        stated: PublicKey,
    ) -> Result<TrustOutcome, SignError> {
        let bad_sig = |k: PublicKey| SignError::BadSignature {
            release: release.to_owned(),
            key: k.to_hex(),
        };
        let mismatch = |expected: PublicKey, from: String| SignError::UntrustedKey {
            release: release.to_owned(),
            publisher: publisher.to_owned(),
            found: stated.to_hex(),
            expected: expected.to_hex(),
            trusted_from: from,
        };
        match self {
            Trust::Key(k) => {
                if *k != stated {
                    return Err(mismatch(*k, "the key given".into()));
                }
                if !k.verifies(manifest, signature) {
                    return Err(bad_sig(*k));
                }
                Ok(TrustOutcome::Trusted)
            }
            Trust::KnownPublishers(file) => {
                let io = |source| SignError::Io {
                    path: file.clone(),
                    source,
                };
                let text = match std::fs::read_to_string(file) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(io(e)),
                };
                for (n, line) in text.lines().enumerate() {
                    let mut words = line.split_whitespace();
                    let (Some(name), Some(key)) = (words.next(), words.next()) else {
                        continue;
                    };
                    if name != publisher {
                        continue;
                    }
                    let pinned = PublicKey::from_hex(key).ok_or_else(|| SignError::BadKey {
                        what: format!("{} line {}", file.display(), n + 1),
                        reason: "not an Ed25519 public key".into(),
                    })?;
                    if pinned != stated {
                        return Err(mismatch(
                            pinned,
                            format!("{} (line {})", file.display(), n + 1),
                        ));
                    }
                    if !pinned.verifies(manifest, signature) {
                        return Err(bad_sig(pinned));
                    }
                    return Ok(TrustOutcome::Trusted);
                }
                if !stated.verifies(manifest, signature) {
                    return Err(bad_sig(stated));
                }
                if publisher.chars().any(char::is_whitespace) || publisher.is_empty() {
                    return Err(SignError::BadKey {
                        what: format!("release `{release}`"),
                        reason: format!("publisher name {publisher:?} cannot be pinned"),
                    });
                }
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                let mut all = text;
                if !all.is_empty() && !all.ends_with('\n') {
                    all.push('\n');
                }
                all.push_str(&format!("{publisher} {}\n", stated.to_hex()));
                std::fs::write(file, all).map_err(io)?;
                Ok(TrustOutcome::PinnedNew(file.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn first_use_pins_and_a_changed_key_is_refused() {
        let d = dir("tofu");
        let a = ReleaseKey::generate(&d.join("a")).unwrap().0;
        let b = ReleaseKey::generate(&d.join("b")).unwrap().0;
        let trust = Trust::KnownPublishers(d.join("known"));
        let m = b"manifest";
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
        let known = std::fs::read_to_string(d.join("known")).unwrap();
        assert_eq!(known.lines().count(), 1);
        let err = Trust::Key(b.public())
            .check(m, &a.sign(m), "r", "uni", a.public())
            .unwrap_err();
        assert!(matches!(err, SignError::UntrustedKey { .. }), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
