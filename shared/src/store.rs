//! The content store: blobs addressed by the BLAKE3 hash of their bytes.
//!
//! Shards, checkpoints and releases are all blobs. A blob's id *is* its hash, so a blob is
//! verified by hashing it again, whoever handed it over. [`BlobStore`] is the interface; the
//! local disk ([`LocalStore`]) is the only backend so far, and an S3-compatible object store can
//! implement the same trait later (put/get/contains/size/list map directly onto object calls).
//!
//! Writes are atomic: a blob is written to a temporary file in the store, flushed with `fsync`,
//! then renamed into place, so a crash never leaves a half-written blob under a valid id.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use amity_protocol::id::BlobId;

/// Errors of the content store; each names the blob and, for the disk, the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes stored under an id do not hash to it.
    #[error("{path}: blob {id} is corrupt: its bytes hash to {actual}")]
    Corrupt {
        /// The id asked for.
        id: BlobId,
        /// The file.
        path: PathBuf,
        /// What the bytes hash to.
        actual: BlobId,
    },
    /// No blob with this id.
    #[error("{path}: blob {id} is not in the store")]
    Missing {
        /// The id asked for.
        id: BlobId,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Bytes handed over for an expected id hash to something else.
    #[error("received bytes for blob {expected} hash to {actual}; refused")]
    Mismatch {
        /// The id the sender promised.
        expected: BlobId,
        /// What the bytes hash to.
        actual: BlobId,
    },
}

/// What storing a blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The blob's id.
    pub id: BlobId,
    /// Its length in bytes.
    pub len: u64,
    /// Whether it was not in the store before.
    pub new: bool,
}

/// Blobs addressed by BLAKE3. Every read is verified against the id.
pub trait BlobStore: Send + Sync {
    /// Stores `bytes`. Storing a blob that is already present is a no-op.
    fn put(&self, bytes: &[u8]) -> Result<Stored, StoreError>;

    /// Streams a blob in from `reader`, hashing as it goes (the bytes are read once).
    /// With `expected`, bytes that hash to anything else are discarded and refused.
    fn put_reader(
        &self,
        reader: &mut dyn Read,
        expected: Option<BlobId>,
    ) -> Result<Stored, StoreError>;

    /// The verified bytes of a blob.
    fn get(&self, id: &BlobId) -> Result<Vec<u8>, StoreError>;

    /// Whether the blob is present (not verified).
    fn contains(&self, id: &BlobId) -> bool;

    /// The blob's length in bytes, if present.
    fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError>;

    /// Every id in the store, sorted.
    fn list(&self) -> Result<Vec<BlobId>, StoreError>;

    /// Deletes a blob (no error if absent).
    fn remove(&self, id: &BlobId) -> Result<(), StoreError>;
}

/// A content store in a folder: blob `ab12…` lives at `<root>/ab/ab12…`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join("tmp")).map_err(|source| StoreError::Io {
            path: root.to_owned(),
            source,
        })?;
        Ok(LocalStore {
            root: root.to_owned(),
        })
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `id` lives (whether or not it is present).
    pub fn path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Maps a blob into memory and verifies it once; the OS page cache, not the heap, holds it.
    pub fn map_verified(&self, id: &BlobId) -> Result<memmap2::Mmap, StoreError> {
        let path = self.path(id);
        let file = File::open(&path).map_err(|source| missing_or_io(*id, &path, source))?;
        // SAFETY: blobs are immutable once renamed into place; the store never writes to a
        // published blob file, and a concurrent writer would replace it by rename, which leaves
        // this mapping's inode intact.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        verify(id, &path, &map)?;
        Ok(map)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn temp_path(&self) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        self.root
            .join("tmp")
            .join(format!("{}-{n}-{nanos}.part", std::process::id()))
    }

    /// Moves a finished temporary file into place under `id`, durably.
    fn publish(&self, temp: &Path, id: &BlobId) -> Result<(), StoreError> {
        let dest = self.path(id);
        let dir = dest.parent().unwrap_or(&self.root).to_owned();
        std::fs::create_dir_all(&dir).map_err(Self::io(&dir))?;
        std::fs::rename(temp, &dest).map_err(Self::io(&dest))?;
        // Make the rename itself durable.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&dir))
    }

    /// Whether blob `id` is present with length `len` and its bytes hash to `id` (a blob
    /// damaged on disk is rewritten by the next `put` of the same bytes, not kept).
    fn holds_intact(&self, id: &BlobId, len: u64) -> Result<bool, StoreError> {
        Ok(self.size(id)? == Some(len) && self.map_verified(id).is_ok())
    }

    /// Deletes the temporary files of writes that never finished (a crash, a full disk). Call
    /// it only while nothing writes to the store, e.g. at start-up.
    pub fn clear_temp(&self) -> Result<u64, StoreError> {
        let dir = self.root.join("tmp");
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).map_err(Self::io(&dir))? {
            let path = entry.map_err(Self::io(&dir))?.path();
            std::fs::remove_file(&path).map_err(Self::io(&path))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Checks that `bytes`, read from `path`, hash to `id`.
fn verify(id: &BlobId, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let actual = BlobId::of_large(bytes);
    if actual != *id {
        return Err(StoreError::Corrupt {
            id: *id,
            path: path.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn missing_or_io(id: BlobId, path: &Path, source: std::io::Error) -> StoreError {
    if source.kind() == std::io::ErrorKind::NotFound {
        StoreError::Missing {
            id,
            path: path.to_owned(),
        }
    } else {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl BlobStore for LocalStore {
    fn put(&self, bytes: &[u8]) -> Result<Stored, StoreError> {
        let id = BlobId::of_large(bytes);
        let len = bytes.len() as u64;
        if self.holds_intact(&id, len)? {
            return Ok(Stored {
                id,
                len,
                new: false,
            });
        }
        let temp = self.temp_path();
        let result = (|| {
            let mut f = File::create(&temp).map_err(Self::io(&temp))?;
            f.write_all(bytes).map_err(Self::io(&temp))?;
            f.sync_all().map_err(Self::io(&temp))?;
            self.publish(&temp, &id)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.map(|()| Stored { id, len, new: true })
    }

    fn put_reader(
        &self,
        reader: &mut dyn Read,
        expected: Option<BlobId>,
    ) -> Result<Stored, StoreError> {
        let temp = self.temp_path();
        let result = (|| {
            let mut f = File::create(&temp).map_err(Self::io(&temp))?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut len = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(Self::io(&temp))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(Self::io(&temp))?;
                len += n as u64;
            }
            let id = BlobId(*hasher.finalize().as_bytes());
            if let Some(expected) = expected
                && expected != id
            {
                return Err(StoreError::Mismatch {
                    expected,
                    actual: id,
                });
            }
            if self.holds_intact(&id, len)? {
                drop(f);
                let _ = std::fs::remove_file(&temp);
                return Ok(Stored {
                    id,
                    len,
                    new: false,
                });
            }
            f.sync_all().map_err(Self::io(&temp))?;
            self.publish(&temp, &id)?;
            Ok(Stored { id, len, new: true })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    fn get(&self, id: &BlobId) -> Result<Vec<u8>, StoreError> {
        let path = self.path(id);
        let bytes = std::fs::read(&path).map_err(|source| missing_or_io(*id, &path, source))?;
        verify(id, &path, &bytes)?;
        Ok(bytes)
    }

    fn contains(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError> {
        let path = self.path(id);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn list(&self) -> Result<Vec<BlobId>, StoreError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(Self::io(&self.root))?;
        for dir in entries {
            let dir = dir.map_err(Self::io(&self.root))?.path();
            let is_prefix = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 2);
            if !is_prefix || !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).map_err(Self::io(&dir))? {
                let f = f.map_err(Self::io(&dir))?.path();
                if let Some(id) = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse().ok())
                {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, id: &BlobId) -> Result<(), StoreError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(tag: &str) -> (PathBuf, LocalStore) {
        let dir = std::env::temp_dir().join(format!("amity-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = LocalStore::open(&dir).unwrap();
        (dir, store)
    }

    #[test]
    fn ids_parse_and_print_as_hex() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.to_hex().parse::<BlobId>().unwrap(), id);
        assert_eq!(
            id.to_hex(),
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        assert!("zz".parse::<BlobId>().is_err());
        assert!("g".repeat(64).parse::<BlobId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<BlobId>(&json).unwrap(), id);
        // Large inputs hash the same on every core.
        let big = vec![7u8; 5 << 20];
        assert_eq!(BlobId::of_large(&big), BlobId::of(&big));
    }

    #[test]
    fn put_get_list_remove_and_idempotence() {
        let (dir, store) = temp_store("basic");
        let a = store.put(b"alpha").unwrap().id;
        let again = store.put(b"alpha").unwrap();
        assert_eq!(again.id, a);
        assert!(!again.new, "a second put stores nothing");
        let Stored { id: b, len, .. } = store.put_reader(&mut &b"beta!"[..], None).unwrap();
        assert_eq!(len, 5);
        assert_eq!(store.get(&a).unwrap(), b"alpha");
        assert_eq!(store.get(&b).unwrap(), b"beta!");
        assert_eq!(&store.map_verified(&b).unwrap()[..], b"beta!");
        let mut ids = vec![a, b];
        ids.sort();
        assert_eq!(store.list().unwrap(), ids);
        assert_eq!(store.size(&a).unwrap(), Some(5));
        store.remove(&a).unwrap();
        assert!(!store.contains(&a));
        let err = store.get(&a).unwrap_err().to_string();
        assert!(err.contains("not in the store"), "{err}");
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corruption_and_mismatches_are_refused() {
        let (dir, store) = temp_store("corrupt");
        let id = store.put(b"precious bytes").unwrap().id;
        let path = store.path(&id);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = store.get(&id).unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains(&id.to_hex()),
            "{err}"
        );
        assert!(matches!(
            store.map_verified(&id),
            Err(StoreError::Corrupt { .. })
        ));
        // Storing the same bytes again repairs the damaged copy (review L7), by either path.
        let again = store.put(b"precious bytes").unwrap();
        assert!(again.new, "a damaged copy is not taken for the blob");
        assert_eq!(store.get(&id).unwrap(), b"precious bytes");
        std::fs::write(&path, &bytes).unwrap();
        store
            .put_reader(&mut &b"precious bytes"[..], Some(id))
            .unwrap();
        assert_eq!(store.get(&id).unwrap(), b"precious bytes");
        // Leftovers of interrupted writes are cleared.
        std::fs::write(dir.join("tmp").join("1-2-3.part"), b"half").unwrap();
        assert_eq!(store.clear_temp().unwrap(), 1);
        assert_eq!(store.clear_temp().unwrap(), 0);

        let promised = BlobId::of(b"something else");
        let err = store
            .put_reader(&mut &b"actual"[..], Some(promised))
            .unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        assert!(!store.contains(&BlobId::of(b"actual")));
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
