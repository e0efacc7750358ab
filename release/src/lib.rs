//! Releases: a trained model as a signed, self-describing folder anyone can mirror and verify.
//!
//! ```text
//! <release>/manifest.json   every other file with its size and BLAKE3 hash, the publisher and its key
//! <release>/manifest.sig    Ed25519 signature of manifest.json (hex), see [`sign`]
//! <release>/model.safetensors  the checkpoint: target_encoder.* (the feature extractor),
//!                              encoder.* and predictor.* (context encoder and predictor)
//! <release>/config.json     the run's config (model shape and recipe)
//! <release>/README.md       the model card (YAML front matter + text), see [`card`]
//! ```
//!
//! A release folder is written to `<dir>.partial` and renamed when complete, and a download is
//! staged the same way ([`Staging`]): a folder named like a release is always a whole, verified
//! release. The manifest is untrusted input until its signature verified: [`Manifest::parse`]
//! checks every field (format, names, paths that cannot leave the folder, sizes).

pub mod card;
pub mod fetch;
pub mod known;
pub mod publish;
pub mod sign;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use amity_shared::checkpoint::{Checkpoint, CheckpointError};
use amity_shared::store::BlobId;
use known::{Trust, TrustOutcome};
use sign::{PublicKey, ReleaseKey, SignError};

/// The manifest format this code writes and reads.
pub const FORMAT: &str = "amity-release/1";
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The signature's file name.
pub const SIGNATURE: &str = "manifest.sig";
/// The weights' file name.
pub const MODEL: &str = "model.safetensors";
/// The config's file name.
pub const CONFIG: &str = "config.json";
/// The model card's file name.
pub const CARD: &str = "README.md";
/// Largest manifest accepted (bytes).
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Largest file a manifest may list (bytes).
pub const MAX_FILE_BYTES: u64 = 1 << 40;

/// Errors of writing, reading, verifying and fetching releases; each names the file or release.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A manifest that is not valid.
    #[error("release manifest from {origin} is invalid: {reason}")]
    Manifest {
        /// Where it came from.
        origin: String,
        /// Why.
        reason: String,
    },
    /// A signature problem.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// A listed file is absent.
    #[error("release `{release}`: file `{file}` listed in the manifest is missing from {origin}")]
    Missing {
        /// The release.
        release: String,
        /// The file.
        file: String,
        /// Where it was looked for.
        origin: String,
    },
    /// A file does not match the manifest.
    #[error("release `{release}`: file `{file}` does not match the signed manifest: {reason}")]
    Tampered {
        /// The release.
        release: String,
        /// The file.
        file: String,
        /// What differs.
        reason: String,
    },
    /// The output already exists.
    #[error("{0} already exists and is not this release; choose another --out or remove it")]
    Exists(PathBuf),
    /// The release's model does not load.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Anything else (bad arguments).
    #[error("{0}")]
    Invalid(String),
}

/// Loads a release folder's model after checking every file against its manifest (the
/// signature is checked when the release is fetched; see [`Signed::verify`]).
pub fn load_model(dir: &Path) -> Result<Checkpoint, ReleaseError> {
    let signed = Signed::read(dir)?;
    verify_files(dir, &signed.manifest)?;
    Ok(Checkpoint::load(&dir.join(MODEL))?)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One file of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the release folder.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// BLAKE3 of the contents (also its blob id on the wire).
    pub blake3: BlobId,
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The release's name.
    pub name: String,
    /// Who published it (the coordinator's name).
    pub publisher: String,
    /// The publisher's Ed25519 public key (hex) the signature verifies with.
    pub public_key: String,
    /// The training round the weights are from.
    pub round: u64,
    /// Every file but the manifest and its signature, sorted by path.
    pub files: Vec<FileEntry>,
}

/// Whether `name` is usable as a release or file name: 1-100 of `[A-Za-z0-9._-]`, not starting
/// with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Manifest {
    /// Parses and validates untrusted manifest bytes.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, ReleaseError> {
        let bad = |reason: String| ReleaseError::Manifest {
            origin: origin.to_owned(),
            reason,
        };
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{} bytes (at most {MAX_MANIFEST_BYTES})",
                bytes.len()
            )));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format {:?}, this amity reads {FORMAT:?}",
                m.format
            )));
        }
        if !valid_name(&m.name) {
            return Err(bad(format!("release name {:?}", m.name)));
        }
        if m.publisher.is_empty()
            || m.publisher.len() > 200
            || m.publisher.contains(char::is_whitespace)
        {
            return Err(bad(format!("publisher {:?}", m.publisher)));
        }
        if PublicKey::from_hex(&m.public_key).is_none() {
            return Err(bad(
                "public_key is not an Ed25519 key (64 hex digits)".into()
            ));
        }
        if m.files.is_empty() || m.files.len() > 1000 {
            return Err(bad(format!("{} files", m.files.len())));
        }
        for (i, f) in m.files.iter().enumerate() {
            if !valid_name(&f.path) || f.path == MANIFEST || f.path == SIGNATURE {
                return Err(bad(format!("file name {:?}", f.path)));
            }
            if f.bytes > MAX_FILE_BYTES {
                return Err(bad(format!("{}: {} bytes", f.path, f.bytes)));
            }
            if i > 0 && m.files[i - 1].path >= f.path {
                return Err(bad("files are not sorted by name, or a name repeats".into()));
            }
        }
        Ok(m)
    }

    /// The manifest's bytes as written (pretty JSON, newline-terminated).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        b.push(b'\n');
        b
    }

    /// The stated public key (validated by [`Manifest::parse`]).
    pub fn key(&self) -> PublicKey {
        PublicKey::from_hex(&self.public_key).unwrap_or(PublicKey([0; 32]))
    }

    /// The entry of `path`.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Total bytes of the listed files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// A manifest with its exact bytes and signature.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Parsed.
    pub manifest: Manifest,
    /// Exactly as signed.
    pub bytes: Vec<u8>,
    /// The 64-byte Ed25519 signature.
    pub signature: Vec<u8>,
}

impl Signed {
    /// Parses untrusted manifest bytes and signature (nothing is trusted yet: see
    /// [`Signed::verify`]).
    pub fn parse(bytes: Vec<u8>, signature: Vec<u8>, origin: &str) -> Result<Self, ReleaseError> {
        let manifest = Manifest::parse(&bytes, origin)?;
        if signature.len() != 64 {
            return Err(ReleaseError::Manifest {
                origin: origin.to_owned(),
                reason: format!("signature of {} bytes (Ed25519: 64)", signature.len()),
            });
        }
        Ok(Signed {
            manifest,
            bytes,
            signature,
        })
    }

    /// The manifest's blob id (BLAKE3 of its bytes): how it travels over the protocol.
    pub fn manifest_id(&self) -> BlobId {
        BlobId::of(&self.bytes)
    }

    /// Reads `manifest.json` and `manifest.sig` from a release folder.
    pub fn read(dir: &Path) -> Result<Self, ReleaseError> {
        let mpath = dir.join(MANIFEST);
        let spath = dir.join(SIGNATURE);
        let bytes = std::fs::read(&mpath).map_err(io(&mpath))?;
        let text = std::fs::read_to_string(&spath).map_err(io(&spath))?;
        let signature = sign::parse_signature(&text).ok_or_else(|| ReleaseError::Manifest {
            origin: spath.display().to_string(),
            reason: "not an Ed25519 signature (128 hex digits)".into(),
        })?;
        Self::parse(bytes, signature, &mpath.display().to_string())
    }

    /// Checks the signature under `trust`.
    pub fn verify(&self, trust: &Trust) -> Result<TrustOutcome, ReleaseError> {
        let m = &self.manifest;
        Ok(trust.check(&self.bytes, &self.signature, &m.name, &m.publisher, m.key())?)
    }
}

/// BLAKE3 and length of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(BlobId, u64), ReleaseError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((BlobId(*h.finalize().as_bytes()), n))
}

/// Checks one file against its entry.
pub fn check_file(path: &Path, entry: &FileEntry, release: &str) -> Result<(), ReleaseError> {
    let (id, len) = match hash_file(path) {
        Ok(x) => x,
        Err(ReleaseError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReleaseError::Missing {
                release: release.to_owned(),
                file: entry.path.clone(),
                origin: path.parent().unwrap_or(path).display().to_string(),
            });
        }
        Err(e) => return Err(e),
    };
    let tampered = |reason| ReleaseError::Tampered {
        release: release.to_owned(),
        file: entry.path.clone(),
        reason,
    };
    if len != entry.bytes {
        return Err(tampered(format!(
            "{len} bytes, the manifest says {}",
            entry.bytes
        )));
    }
    if id != entry.blake3 {
        return Err(tampered(format!(
            "BLAKE3 {}, the manifest says {}",
            id.short(),
            entry.blake3.short()
        )));
    }
    Ok(())
}

/// Checks every listed file of a release folder (the signature is the caller's business).
pub fn verify_files(dir: &Path, manifest: &Manifest) -> Result<(), ReleaseError> {
    for f in &manifest.files {
        check_file(&dir.join(&f.path), f, &manifest.name)?;
    }
    Ok(())
}

fn partial_of(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes a signed release of `files` (name, bytes) into `out` (which must not exist).
pub fn write_release(
    out: &Path,
    name: &str,
    publisher: &str,
    round: u64,
    files: &[(&str, &[u8])],
    key: &ReleaseKey,
) -> Result<Signed, ReleaseError> {
    if !valid_name(name) {
        return Err(ReleaseError::Invalid(format!(
            "release name {name:?}: use letters, digits, '.', '_' and '-'"
        )));
    }
    if out.exists() {
        return Err(ReleaseError::Exists(out.to_owned()));
    }
    let mut entries: Vec<FileEntry> = files
        .iter()
        .map(|(path, bytes)| FileEntry {
            path: (*path).to_owned(),
            bytes: bytes.len() as u64,
            blake3: BlobId::of_large(bytes),
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest {
        format: FORMAT.into(),
        name: name.into(),
        publisher: publisher.into(),
        public_key: key.public().to_hex(),
        round,
        files: entries,
    };
    let bytes = manifest.to_bytes();
    // Validate what we are about to publish as any reader will.
    Manifest::parse(&bytes, "the new release")?;
    let signature = key.sign(&bytes);
    let staging = partial_of(out);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    for (path, data) in files {
        write_synced(&staging.join(path), data)?;
    }
    write_synced(&staging.join(MANIFEST), &bytes)?;
    write_synced(
        &staging.join(SIGNATURE),
        sign::signature_text(&signature).as_bytes(),
    )?;
    std::fs::rename(&staging, out).map_err(io(out))?;
    Ok(Signed {
        manifest,
        bytes,
        signature,
    })
}

/// A download in progress: files land in `<out>.partial`, verified one by one; the folder is
/// renamed to `out` only when every file verified. An interrupted download keeps its verified
/// files and partial files for the next attempt.
#[derive(Debug)]
pub struct Staging {
    out: PathBuf,
    dir: PathBuf,
    signed: Signed,
    /// Files already checked in place (by `is_done` or `accept`): `finish` does not hash them
    /// again.
    verified: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Whether a fetch had anything to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// Files remain to download.
    Staging,
    /// `out` already holds exactly this release, verified.
    AlreadyPresent,
}

impl Staging {
    /// Starts (or resumes) staging `signed` (already verified) for `out`.
    pub fn begin(out: &Path, signed: Signed) -> Result<(Staging, Begun), ReleaseError> {
        let dir = partial_of(out);
        let staging = Staging {
            out: out.to_owned(),
            dir,
            signed,
            verified: Default::default(),
        };
        if out.exists() {
            let same = Signed::read(out)
                .map(|s| s.bytes == staging.signed.bytes)
                .unwrap_or(false);
            if same && verify_files(out, &staging.signed.manifest).is_ok() {
                return Ok((staging, Begun::AlreadyPresent));
            }
            return Err(ReleaseError::Exists(out.to_owned()));
        }
        // A staging folder of another release is stale: start over.
        let stale = staging.dir.exists()
            && std::fs::read(staging.dir.join(MANIFEST)).ok().as_deref()
                != Some(staging.signed.bytes.as_slice());
        if stale {
            std::fs::remove_dir_all(&staging.dir).map_err(io(&staging.dir))?;
        }
        // A staging folder that is a link, and links or folders planted inside one, are never
        // followed: writing a part through a link would write wherever it points.
        if staging
            .dir
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            std::fs::remove_file(&staging.dir).map_err(io(&staging.dir))?;
        }
        std::fs::create_dir_all(&staging.dir).map_err(io(&staging.dir))?;
        for entry in std::fs::read_dir(&staging.dir).map_err(io(&staging.dir))? {
            let path = entry.map_err(io(&staging.dir))?.path();
            let kind = path.symlink_metadata().map_err(io(&path))?.file_type();
            if kind.is_symlink() {
                std::fs::remove_file(&path).map_err(io(&path))?;
            } else if kind.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
        write_synced(&staging.dir.join(MANIFEST), &staging.signed.bytes)?;
        Ok((staging, Begun::Staging))
    }

    /// The release being fetched.
    pub fn manifest(&self) -> &Manifest {
        &self.signed.manifest
    }

    /// The signed manifest being fetched.
    pub fn signed(&self) -> &Signed {
        &self.signed
    }

    /// Where the partial download of `entry` goes.
    pub fn part_path(&self, entry: &FileEntry) -> PathBuf {
        self.dir.join(format!("{}.part", entry.path))
    }

    /// Whether `entry` is already staged and verified.
    pub fn is_done(&self, entry: &FileEntry) -> bool {
        let name = &self.signed.manifest.name;
        let ok = check_file(&self.dir.join(&entry.path), entry, name).is_ok();
        if ok {
            self.mark_verified(entry);
        }
        ok
    }

    fn mark_verified(&self, entry: &FileEntry) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry.path.clone());
    }

    /// Verifies the finished partial file of `entry` and moves it into place. A file that does
    /// not match is deleted (so the next attempt starts it over) and reported.
    pub fn accept(&self, entry: &FileEntry) -> Result<(), ReleaseError> {
        let part = self.part_path(entry);
        if let Err(e) = check_file(&part, entry, &self.signed.manifest.name) {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let done = self.dir.join(&entry.path);
        std::fs::rename(&part, &done).map_err(io(&done))?;
        self.mark_verified(entry);
        Ok(())
    }

    /// Checks every file not yet verified in place, writes the signature and renames the
    /// folder to `out`.
    pub fn finish(self) -> Result<PathBuf, ReleaseError> {
        let verified = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for f in &self.signed.manifest.files {
            if !verified.contains(&f.path) {
                check_file(&self.dir.join(&f.path), f, &self.signed.manifest.name)?;
            }
        }
        write_synced(
            &self.dir.join(SIGNATURE),
            sign::signature_text(&self.signed.signature).as_bytes(),
        )?;
        std::fs::rename(&self.dir, &self.out).map_err(io(&self.out))?;
        Ok(self.out)
    }
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// The release.
    pub manifest: Manifest,
    /// Where it is now.
    pub out: PathBuf,
    /// Bytes transferred in this run.
    pub transferred: u64,
    /// How the signing key was trusted.
    pub trust: TrustOutcome,
    /// Nothing to do: `out` already held it.
    pub already_present: bool,
}

/// Fetches the release in folder `src` (a mirror) into `out`: signature under `trust` first,
/// then every file copied and verified. `progress` gets the bytes copied so far.
pub fn fetch_folder(
    src: &Path,
    out: &Path,
    trust: &Trust,
    progress: &mut dyn FnMut(u64),
) -> Result<FetchReport, ReleaseError> {
    let signed = Signed::read(src)?;
    let outcome = signed.verify(trust)?;
    let manifest = signed.manifest.clone();
    let (staging, begun) = Staging::begin(out, signed)?;
    if begun == Begun::AlreadyPresent {
        return Ok(FetchReport {
            manifest,
            out: out.to_owned(),
            transferred: 0,
            trust: outcome,
            already_present: true,
        });
    }
    let mut copied = 0u64;
    for entry in &manifest.files {
        if staging.is_done(entry) {
            copied += entry.bytes;
            progress(copied);
            continue;
        }
        let from = src.join(&entry.path);
        let mut input = match std::fs::File::open(&from) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReleaseError::Missing {
                    release: manifest.name.clone(),
                    file: entry.path.clone(),
                    origin: src.display().to_string(),
                });
            }
            Err(e) => return Err(io(&from)(e)),
        };
        let part = staging.part_path(entry);
        let mut output = std::fs::File::create(&part).map_err(io(&part))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = input.read(&mut buf).map_err(io(&from))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > entry.bytes {
                break; // longer than signed: `accept` reports it
            }
            std::io::Write::write_all(&mut output, &buf[..k]).map_err(io(&part))?;
            progress(copied + n);
        }
        output.sync_all().map_err(io(&part))?;
        if n > entry.bytes {
            let _ = std::fs::remove_file(&part);
            return Err(ReleaseError::Tampered {
                release: manifest.name.clone(),
                file: entry.path.clone(),
                reason: format!("longer than the {} bytes the manifest says", entry.bytes),
            });
        }
        staging.accept(entry)?;
        copied += entry.bytes;
    }
    let out = staging.finish()?;
    Ok(FetchReport {
        manifest,
        out,
        transferred: copied,
        trust: outcome,
        already_present: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("amity-release-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn release(d: &Path) -> (PathBuf, ReleaseKey) {
        let key = ReleaseKey::generate(&d.join("keys")).unwrap().0;
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let src = d.join("src");
        write_release(
            &src,
            "v1",
            "coordinator",
            4,
            &[("model.safetensors", &big), ("README.md", b"card")],
            &key,
        )
        .unwrap();
        (src, key)
    }

    #[test]
    fn fetch_from_a_folder_round_trips_and_refuses_tampering() {
        let d = dir("folder");
        let (src, key) = release(&d);
        let trust = Trust::key(key.public());
        let out = d.join("out");
        let r = fetch_folder(&src, &out, &trust, &mut |_| {}).unwrap();
        assert!(!r.already_present);
        assert_eq!(r.transferred, 3_000_004);
        assert_eq!(
            std::fs::read(out.join("README.md")).unwrap(),
            b"card".to_vec()
        );
        let again = fetch_folder(&src, &out, &trust, &mut |_| {}).unwrap();
        assert!(again.already_present);

        // A flipped byte.
        let model = src.join("model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[1_500_000] ^= 1;
        std::fs::write(&model, &bytes).unwrap();
        let out2 = d.join("out2");
        let e = fetch_folder(&src, &out2, &trust, &mut |_| {}).unwrap_err();
        assert!(matches!(e, ReleaseError::Tampered { .. }), "{e}");
        assert!(
            !out2.exists(),
            "a failed fetch is not presented as a release"
        );
        bytes[1_500_000] ^= 1;
        std::fs::write(&model, &bytes).unwrap();

        // A missing file (into a fresh folder: out2's staging already holds a verified card).
        std::fs::rename(src.join("README.md"), d.join("card")).unwrap();
        let out3 = d.join("out3");
        let e = fetch_folder(&src, &out3, &trust, &mut |_| {}).unwrap_err();
        assert!(matches!(e, ReleaseError::Missing { .. }), "{e}");
        std::fs::rename(d.join("card"), src.join("README.md")).unwrap();

        // A manifest edited to match a replaced file: the signature no longer verifies.
        let mut m = Manifest::parse(&std::fs::read(src.join(MANIFEST)).unwrap(), "t").unwrap();
        m.files[0].blake3 = BlobId::of(b"evil");
        m.files[0].bytes = 4;
        std::fs::write(src.join(MANIFEST), m.to_bytes()).unwrap();
        std::fs::write(src.join("README.md"), b"evil").unwrap();
        let e = fetch_folder(&src, &out3, &trust, &mut |_| {}).unwrap_err();
        assert!(
            matches!(e, ReleaseError::Sign(SignError::BadSignature { .. })),
            "{e}"
        );
        // A wrong key.
        let other = ReleaseKey::generate(&d.join("other")).unwrap().0;
        let e = fetch_folder(&out, &out2, &Trust::key(other.public()), &mut |_| {}).unwrap_err();
        assert!(
            matches!(e, ReleaseError::Sign(SignError::UntrustedKey { .. })),
            "{e}"
        );
        for o in [&out2, &out3] {
            assert!(
                !o.exists(),
                "a failed fetch is never presented as a release"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Security review L5: a link planted in a staging folder is removed, never written through.
    #[cfg(unix)]
    #[test]
    fn staging_never_writes_through_a_planted_link() {
        let d = dir("links");
        let (src, key) = release(&d);
        let out = d.join("out");
        let staging = partial_of(&out);
        std::fs::create_dir_all(&staging).unwrap();
        // The same manifest, so the folder is not stale and would be resumed.
        std::fs::copy(src.join(MANIFEST), staging.join(MANIFEST)).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        for name in ["README.md.part", "README.md", "model.safetensors.part"] {
            std::os::unix::fs::symlink(&victim, staging.join(name)).unwrap();
        }
        fetch_folder(&src, &out, &Trust::key(key.public()), &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"card");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let ok = Manifest {
            format: FORMAT.into(),
            name: "v1".into(),
            publisher: "c".into(),
            public_key: "00".repeat(32),
            round: 1,
            files: vec![FileEntry {
                path: "a".into(),
                bytes: 1,
                blake3: BlobId::of(b"a"),
            }],
        };
        assert!(Manifest::parse(&ok.to_bytes(), "t").is_ok());
        for path in [
            "../etc/passwd",
            "/abs",
            "a/b",
            ".hidden",
            "manifest.sig",
            "",
        ] {
            let mut m = ok.clone();
            m.files[0].path = path.into();
            assert!(Manifest::parse(&m.to_bytes(), "t").is_err(), "{path}");
        }
        let mut m = ok.clone();
        m.files.push(m.files[0].clone());
        assert!(
            Manifest::parse(&m.to_bytes(), "t").is_err(),
            "repeated name"
        );
        let mut m = ok.clone();
        m.format = "amity-release/9".into();
        assert!(Manifest::parse(&m.to_bytes(), "t").is_err());
        assert!(Manifest::parse(b"{not json", "t").is_err());
    }
}
