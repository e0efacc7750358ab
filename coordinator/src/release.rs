//! Releases on the coordinator: publishing a checkpoint from its state folder, and the index of
//! published releases it serves to downstream clients.
//!
//! Releases live in `<state_dir>/releases/<name>/` as plain folders (see
//! [`amity_shared::release`]): the coordinator serves them over QUIC by BLAKE3 id, and the same
//! folder can be copied to any web server or object store as a mirror.

use std::path::{Path, PathBuf};

use amity_release::card::CorpusInfo;
use amity_release::publish::{PublishOptions, publish};
use amity_release::sign::ReleaseKey;
use amity_release::{MANIFEST, ReleaseError, Signed};
use amity_shared::corpus::manifest::Manifest as CorpusManifest;
use amity_shared::store::BlobId;

use crate::config::CoordinatorConfig;
use crate::layout::StateLayout;

/// A release the coordinator holds.
#[derive(Debug, Clone)]
pub struct Published {
    /// Its manifest and signature.
    pub signed: Signed,
    /// Its folder.
    pub dir: PathBuf,
}

/// The releases in `dir` (one folder each; staging folders and folders that do not parse are
/// skipped with a warning).
pub fn scan(dir: &Path) -> Vec<Published> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() || path.extension().is_some_and(|x| x == "partial") {
            continue;
        }
        match Signed::read(&path) {
            Ok(signed) => out.push(Published { signed, dir: path }),
            Err(e) => tracing::warn!("not serving {}: {e}", path.display()),
        }
    }
    out.sort_by(|a, b| a.signed.manifest.name.cmp(&b.signed.manifest.name));
    out
}

/// The published releases, read once and kept: a request re-reads the folder only when its
/// modification time changed, at most once per [`ReleaseIndex::RECHECK`], and off the runtime
/// threads; so anonymous requests cannot make the coordinator parse every manifest each time
/// (security review M8). Publishing renames a finished folder into place, which changes the
/// folder's time.
#[derive(Debug)]
pub struct ReleaseIndex {
    dir: PathBuf,
    state: std::sync::Mutex<IndexState>,
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct IndexState {
    releases: std::sync::Arc<Vec<Published>>,
    modified: Option<std::time::SystemTime>,
    checked: Option<std::time::Instant>,
}

impl ReleaseIndex {
    /// How stale a listing may be before the folder's time is looked at again.
    pub const RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

    /// An index of `dir` (read on first use).
    pub fn new(dir: PathBuf) -> Self {
        ReleaseIndex {
            dir,
            state: Default::default(),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// The listing as last read (for blob lookups, which follow a query).
    pub fn cached(&self) -> std::sync::Arc<Vec<Published>> {
        self.state.lock().expect("index lock").releases.clone()
    }

    fn fresh(&self) -> Option<std::sync::Arc<Vec<Published>>> {
        let st = self.state.lock().expect("index lock");
        st.checked
            .is_some_and(|t| t.elapsed() < Self::RECHECK)
            .then(|| st.releases.clone())
    }

    /// The listing, re-read first if the folder changed since (one refresh at a time).
    pub async fn current(&self) -> std::sync::Arc<Vec<Published>> {
        if let Some(r) = self.fresh() {
            return r;
        }
        let _one = self.refresh.lock().await;
        if let Some(r) = self.fresh() {
            return r;
        }
        let known = self.state.lock().expect("index lock").modified;
        let dir = self.dir.clone();
        let read = tokio::task::spawn_blocking(move || {
            let modified = std::fs::metadata(&dir).and_then(|m| m.modified()).ok();
            let listing = (modified != known || modified.is_none()).then(|| scan(&dir));
            (modified, listing)
        })
        .await;
        let mut st = self.state.lock().expect("index lock");
        if let Ok((modified, listing)) = read {
            st.modified = modified;
            if let Some(listing) = listing {
                st.releases = std::sync::Arc::new(listing);
            }
        }
        st.checked = Some(std::time::Instant::now());
        st.releases.clone()
    }
}

/// The release called `name`; `latest` is the one of the highest round (then name).
pub fn find<'a>(releases: &'a [Published], name: &str) -> Option<&'a Published> {
    if name == "latest" && !releases.iter().any(|r| r.signed.manifest.name == "latest") {
        return releases
            .iter()
            .max_by_key(|r| (r.signed.manifest.round, r.signed.manifest.name.clone()));
    }
    releases.iter().find(|r| r.signed.manifest.name == name)
}

/// The file of a release whose BLAKE3 is `id` (a manifest or a listed file).
pub fn locate(releases: &[Published], id: &BlobId) -> Option<PathBuf> {
    releases.iter().find_map(|r| {
        if r.signed.manifest_id() == *id {
            return Some(r.dir.join(MANIFEST));
        }
        r.signed
            .manifest
            .files
            .iter()
            .find(|f| f.blake3 == *id)
            .map(|f| r.dir.join(&f.path))
    })
}

/// What `amity release` asks for.
#[derive(Debug, Clone)]
pub struct ReleaseRequest {
    /// Release name.
    pub name: String,
    /// The round's checkpoint (`None`: the latest).
    pub round: Option<u64>,
    /// Videos for the probe evaluation (0 skips it).
    pub probe_videos: usize,
    /// Licence (SPDX id).
    pub licence: String,
    /// Evaluation results measured elsewhere.
    pub evaluation: Vec<amity_release::card::EvalResult>,
}

/// The corpus a coordinator trains on, for the model card.
pub fn corpus_info(store_dir: &Path) -> Result<CorpusInfo, ReleaseError> {
    let path = store_dir.join("manifest.json");
    let bytes = std::fs::read(&path).map_err(|source| ReleaseError::Io {
        path: path.clone(),
        source,
    })?;
    let m = CorpusManifest::load(store_dir).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
    Ok(CorpusInfo {
        manifest_blake3: BlobId::of(&bytes).to_hex(),
        shards: m.shards.len(),
        clips: m.clips,
    })
}

/// Publishes a checkpoint of the coordinator `cfg` describes as
/// `<state_dir>/releases/<name>`, signed with `key`. Works while the coordinator runs: it
/// serves the new release at the next query.
pub fn release_round(
    cfg: &CoordinatorConfig,
    req: &ReleaseRequest,
    key: &ReleaseKey,
) -> Result<(Signed, PathBuf), ReleaseError> {
    let layout = StateLayout {
        dir: cfg.state_dir.clone(),
    };
    let checkpoint = match req.round {
        Some(r) => layout.round_checkpoint(r),
        None => layout.latest_checkpoint(),
    };
    if !checkpoint.exists() {
        let mut have: Vec<String> = std::fs::read_dir(layout.checkpoints())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        have.sort();
        return Err(ReleaseError::Invalid(format!(
            "no checkpoint {} (checkpoints are written every `checkpoint_every` rounds; have: {})",
            checkpoint.display(),
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            }
        )));
    }
    let corpus = match &cfg.corpus {
        Some(dir) => Some(corpus_info(dir)?),
        None => None,
    };
    let opts = PublishOptions {
        name: req.name.clone(),
        publisher: cfg.name.clone(),
        corpus,
        evaluation: req.evaluation.clone(),
        probe_videos: req.probe_videos,
        licence: req.licence.clone(),
    };
    let out = layout.releases().join(&req.name);
    let signed = publish(&checkpoint, &out, &opts, key)?;
    Ok((signed, out))
}
