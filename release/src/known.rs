//! The known-publishers file: the key each publisher signs with, pinned per *origin* (the
//! coordinator or mirror folder a release came from), like SSH's known hosts; and the highest
//! round fetched from each, so that a server cannot roll `latest` back to an older release.
//!
//! One line per (origin, publisher): `<origin> <publisher> <key hex> [<highest round>]`. Lines
//! of the older form `<publisher> <key hex>` (before origins were recorded) hold for every
//! origin. Whitespace in an origin is written as `%20`-style escapes.

use std::path::{Path, PathBuf};

use crate::sign::{PublicKey, SignError};

/// A known-publishers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownPublishers {
    file: PathBuf,
}

/// What the file says about one (origin, publisher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The pinned key.
    pub key: PublicKey,
    /// The highest round fetched from this origin (if recorded).
    pub highest_round: Option<u64>,
    /// Where it is written, for messages (`file (line n)`).
    pub source: String,
}

/// One parsed line.
struct Line {
    /// Escaped, as in the file.
    origin: Option<String>,
    publisher: String,
    key: PublicKey,
    round: Option<u64>,
}

impl Line {
    fn render(&self) -> String {
        let mut out = match &self.origin {
            Some(o) => format!("{o} {} {}", self.publisher, self.key.to_hex()),
            None => format!("{} {}", self.publisher, self.key.to_hex()),
        };
        if let Some(r) = self.round {
            out.push_str(&format!(" {r}"));
        }
        out
    }
}

/// `origin` with whitespace and `%` escaped, so that it is one word.
fn escape(origin: &str) -> String {
    let mut out = String::new();
    for c in origin.chars() {
        if c.is_whitespace() || c == '%' {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl KnownPublishers {
    /// The file at `file` (it need not exist yet).
    pub fn new(file: PathBuf) -> Self {
        KnownPublishers { file }
    }

    /// `$AMITY_KNOWN_PUBLISHERS`, else `~/.amity/known_publishers`.
    pub fn default_file() -> PathBuf {
        if let Some(p) = std::env::var_os("AMITY_KNOWN_PUBLISHERS") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".amity").join("known_publishers")
    }

    /// The file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> SignError + '_ {
        |source| SignError::Io {
            path: self.file.clone(),
            source,
        }
    }

    /// Every line, parsed (comments and blank lines are kept as `None`, in place).
    fn read(&self) -> Result<Vec<(String, Option<Line>)>, SignError> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.io()(e)),
        };
        let mut out = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let bad = |reason: &str| SignError::BadKey {
                what: format!("{} line {}", self.file.display(), n + 1),
                reason: reason.to_owned(),
            };
            let words: Vec<&str> = raw.split_whitespace().collect();
            if words.is_empty() || words[0].starts_with('#') {
                out.push((raw.to_owned(), None));
                continue;
            }
            let (origin, publisher, key, round) = match words.as_slice() {
                [p, k] => (None, *p, *k, None),
                [o, p, k] => (Some(*o), *p, *k, None),
                [o, p, k, r] => (Some(*o), *p, *k, Some(*r)),
                _ => return Err(bad("expected `<origin> <publisher> <key> [<round>]`")),
            };
            let key = PublicKey::from_hex(key).ok_or_else(|| bad("not an Ed25519 public key"))?;
            let round = match round {
                Some(r) => Some(r.parse().map_err(|_| bad("the round is not a number"))?),
                None => None,
            };
            let line = Line {
                origin: origin.map(str::to_owned),
                publisher: publisher.to_owned(),
                key,
                round,
            };
            out.push((raw.to_owned(), Some(line)));
        }
        Ok(out)
    }

    fn write(&self, lines: &[(String, Option<Line>)]) -> Result<(), SignError> {
        if let Some(parent) = self.file.parent() {
            std::fs::create_dir_all(parent).map_err(self.io())?;
        }
        let mut text = String::new();
        for (raw, line) in lines {
            text.push_str(&line.as_ref().map_or_else(|| raw.clone(), Line::render));
            text.push('\n');
        }
        // Whole or not at all: a temporary file renamed over the old one.
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(self.io())?;
        std::fs::rename(&tmp, &self.file).map_err(self.io())
    }

    /// Index of the line for (origin, publisher): the origin's own line, else an old
    /// origin-less line for the publisher.
    fn position(lines: &[(String, Option<Line>)], origin: &str, publisher: &str) -> Option<usize> {
        Self::line_of(lines, Some(&escape(origin)), publisher)
            .or_else(|| Self::line_of(lines, None, publisher))
    }

    /// Index of the line for exactly this (escaped) origin, or the origin-less one for `None`.
    fn line_of(
        lines: &[(String, Option<Line>)],
        origin: Option<&str>,
        publisher: &str,
    ) -> Option<usize> {
        lines.iter().position(|(_, l)| {
            l.as_ref()
                .is_some_and(|l| l.publisher == publisher && l.origin.as_deref() == origin)
        })
    }

    /// What is known about `publisher` at `origin`.
    pub fn lookup(&self, origin: &str, publisher: &str) -> Result<Option<Known>, SignError> {
        let lines = self.read()?;
        Ok(Self::position(&lines, origin, publisher).map(|i| {
            let line = lines[i].1.as_ref().expect("position finds parsed lines");
            Known {
                key: line.key,
                highest_round: line.round,
                source: format!("{} (line {})", self.file.display(), i + 1),
            }
        }))
    }

    /// Pins `key` for `publisher` at `origin` (a new line).
    pub fn pin(&self, origin: &str, publisher: &str, key: PublicKey) -> Result<(), SignError> {
        if publisher.is_empty() || publisher.chars().any(char::is_whitespace) {
            return Err(SignError::BadKey {
                what: format!("publisher {publisher:?}"),
                reason: "a publisher name with spaces cannot be pinned".into(),
            });
        }
        let mut lines = self.read()?;
        lines.push((
            String::new(),
            Some(Line {
                origin: Some(escape(origin)),
                publisher: publisher.to_owned(),
                key,
                round: None,
            }),
        ));
        self.write(&lines)
    }

    /// Raises the highest round recorded for `publisher` at `origin` to `round` (a publisher
    /// trusted through `--key` gets a line of its own for this).
    pub fn record_round(
        &self,
        origin: &str,
        publisher: &str,
        key: PublicKey,
        round: u64,
    ) -> Result<(), SignError> {
        let mut lines = self.read()?;
        let origin = escape(origin);
        match Self::line_of(&lines, Some(&origin), publisher) {
            Some(i) => {
                let line = lines[i].1.as_mut().expect("parsed");
                if line.round.is_some_and(|r| r >= round) {
                    return Ok(());
                }
                line.round = Some(round);
            }
            None => lines.push((
                String::new(),
                Some(Line {
                    origin: Some(origin),
                    publisher: publisher.to_owned(),
                    key,
                    round: Some(round),
                }),
            )),
        }
        self.write(&lines)
    }
}

/// Which key a release must be signed with, and what is remembered about where it came from.
#[derive(Debug, Clone)]
pub struct Trust {
    /// A key given on the command line: the release must be signed with exactly this key.
    pub key: Option<PublicKey>,
    /// The known-publishers file: the pins used when no key is given, and the highest round
    /// fetched from each origin.
    pub known: Option<KnownPublishers>,
    /// Where releases come from: a coordinator's address or a mirror folder.
    pub origin: String,
    /// Pin an unknown publisher's key on first use without asking (`--accept-new`, or a
    /// coordinator authenticated by its operator's CA). Otherwise first use is refused with
    /// the key to check.
    pub accept_new: bool,
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
    /// Exactly `key`, nothing remembered.
    pub fn key(key: PublicKey) -> Self {
        Trust {
            key: Some(key),
            known: None,
            origin: String::new(),
            accept_new: false,
        }
    }

    /// Checks that `manifest` (its bytes, release name, publisher and stated key) is signed by
    /// `signature` under the trusted key. Pins the key on first use of a publisher at this
    /// origin, only after the signature verified and only if `accept_new`.
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
        let trusted = |k: PublicKey, from: String| {
            if k != stated {
                return Err(mismatch(k, from));
            }
            if !k.verifies(manifest, signature) {
                return Err(bad_sig(k));
            }
            Ok(TrustOutcome::Trusted)
        };
        if let Some(k) = self.key {
            return trusted(k, "the key given".into());
        }
        let Some(known) = &self.known else {
            return Err(SignError::BadKey {
                what: format!("release `{release}`"),
                reason: "no key given and no known-publishers file to trust one from".into(),
            });
        };
        if let Some(pinned) = known.lookup(&self.origin, publisher)? {
            return trusted(pinned.key, pinned.source);
        }
        if !stated.verifies(manifest, signature) {
            return Err(bad_sig(stated));
        }
        if !self.accept_new {
            return Err(SignError::UnknownPublisher {
                publisher: publisher.to_owned(),
                origin: self.origin.clone(),
                key: stated.to_hex(),
            });
        }
        known.pin(&self.origin, publisher, stated)?;
        Ok(TrustOutcome::PinnedNew(known.file().to_owned()))
    }

    /// Refuses a `latest` answer older than the newest release already fetched from this origin
    /// and publisher (a server rolling `latest` back). Without a known-publishers file nothing
    /// is remembered, so nothing is refused.
    pub fn check_fresh(&self, release: &str, publisher: &str, round: u64) -> Result<(), SignError> {
        let Some(known) = &self.known else {
            return Ok(());
        };
        match known.lookup(&self.origin, publisher)? {
            Some(Known {
                highest_round: Some(highest),
                source,
                ..
            }) if round < highest => Err(SignError::Rollback {
                release: release.to_owned(),
                round,
                highest,
                origin: self.origin.clone(),
                recorded_in: source,
            }),
            _ => Ok(()),
        }
    }

    /// Records that round `round` of `publisher` was fetched from this origin.
    pub fn remember(&self, publisher: &str, key: PublicKey, round: u64) -> Result<(), SignError> {
        match &self.known {
            Some(known) => known.record_round(&self.origin, publisher, key, round),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::ReleaseKey;

    #[test]
    fn pins_are_per_origin_and_rounds_only_rise() {
        let d = std::env::temp_dir().join(format!("amity-known-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let a = ReleaseKey::generate(&d.join("a")).unwrap().0.public();
        let b = ReleaseKey::generate(&d.join("b")).unwrap().0.public();
        let file = d.join("known");
        // An older file: one origin-less pin, a comment.
        std::fs::write(&file, format!("# mine\nold-lab {}\n", a.to_hex())).unwrap();
        let known = KnownPublishers::new(file.clone());
        let old = known.lookup("anywhere:7700", "old-lab").unwrap().unwrap();
        assert_eq!((old.key, old.highest_round), (a, None));
        assert!(known.lookup("x:1", "uni").unwrap().is_none());

        known.pin("x:1", "uni", a).unwrap();
        known.pin("/mirror with space", "uni", b).unwrap();
        assert_eq!(known.lookup("x:1", "uni").unwrap().unwrap().key, a);
        assert_eq!(
            known
                .lookup("/mirror with space", "uni")
                .unwrap()
                .unwrap()
                .key,
            b
        );
        assert!(known.lookup("y:1", "uni").unwrap().is_none(), "per origin");

        known.record_round("x:1", "uni", a, 5).unwrap();
        known.record_round("x:1", "uni", a, 3).unwrap();
        assert_eq!(
            known.lookup("x:1", "uni").unwrap().unwrap().highest_round,
            Some(5)
        );
        // The old pin gets a line of its own for the origin, keeping the old line.
        known.record_round("z:1", "old-lab", a, 2).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# mine\n"), "{text}");
        assert!(text.contains("/mirror%20with%20space uni "), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
        let z = known.lookup("z:1", "old-lab").unwrap().unwrap();
        assert_eq!(z.highest_round, Some(2));
        assert!(z.source.ends_with("(line 5)"), "{}", z.source);

        std::fs::write(&file, "uni notakey\n").unwrap();
        let err = known.lookup("x:1", "uni").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("Ed25519"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
