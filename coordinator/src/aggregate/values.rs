//! [`UpdateValues`]: an update's values, held or read back from the store on demand.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use amity_shared::federated::codec::{self, Entries};
use amity_shared::store::{BlobId, BlobStore, LocalStore};

/// Reads one update's values from wherever the shell keeps it (the coordinator's content
/// store), as often as aggregation asks. Every read returns the same values: the update is
/// content-addressed, so a replica that reads it again computes bit for bit what it did.
pub trait ReadUpdate: Send + Sync + fmt::Debug {
    /// The update's length in values.
    fn len(&self) -> usize;
    /// Whether the update has no values.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads and decodes it, or says why it cannot.
    fn read(&self) -> Result<Entries, String>;
}

/// An update's values as the core holds them between its arrival and its round's close.
#[derive(Clone)]
pub enum UpdateValues {
    /// In memory, as decoded (tests, the in-process bench harness, replicas that received the
    /// update inside a log entry).
    Held(Entries),
    /// Read back and decoded on every pass: nothing of the update stays in memory.
    Stored(Arc<dyn ReadUpdate>),
}

impl UpdateValues {
    /// The update's length in values.
    pub fn len(&self) -> usize {
        match self {
            UpdateValues::Held(e) => e.len(),
            UpdateValues::Stored(r) => r.len(),
        }
    }

    /// Whether the update has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values (borrowed when held, read back when stored).
    pub fn read(&self) -> Result<Cow<'_, Entries>, String> {
        match self {
            UpdateValues::Held(e) => Ok(Cow::Borrowed(e)),
            UpdateValues::Stored(r) => {
                let e = r.read()?;
                if e.len() != r.len() {
                    return Err(format!("read {} values, expected {}", e.len(), r.len()));
                }
                Ok(Cow::Owned(e))
            }
        }
    }

    /// Every value, zeros where the codec sent none.
    pub fn to_dense(&self) -> Result<Vec<f32>, String> {
        Ok(self.read()?.to_dense())
    }

    /// The values of a dense update held in memory, to change in place (tests, and the bench's
    /// simulated attacks); `None` otherwise.
    pub fn held_mut(&mut self) -> Option<&mut [f32]> {
        match self {
            UpdateValues::Held(e) => e.dense_values_mut(),
            UpdateValues::Stored(_) => None,
        }
    }
}

impl From<Vec<f32>> for UpdateValues {
    fn from(values: Vec<f32>) -> Self {
        UpdateValues::Held(Entries::dense(values))
    }
}

impl From<Entries> for UpdateValues {
    fn from(entries: Entries) -> Self {
        UpdateValues::Held(entries)
    }
}

impl fmt::Debug for UpdateValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateValues::Held(e) => write!(f, "Held({} of {} values)", e.kept(), e.len()),
            UpdateValues::Stored(r) => write!(f, "Stored({r:?})"),
        }
    }
}

/// Held values compare by content; stored ones are equal when they are the same handle.
impl PartialEq for UpdateValues {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (UpdateValues::Held(a), UpdateValues::Held(b)) => a == b,
            (UpdateValues::Stored(a), UpdateValues::Stored(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// An update in a content store: read (its hash verified) and decoded on every [`ReadUpdate::read`].
/// What the coordinator's shell hands the core for each update it pulled and stored.
#[derive(Debug, Clone)]
pub struct StoredUpdate {
    store: LocalStore,
    blob: BlobId,
    parts: Arc<[usize]>,
}

impl StoredUpdate {
    /// Blob `blob` of `store`, an update of parts of lengths `parts` (it was decoded once on
    /// arrival, so a later failure is the store's, not the sender's).
    pub fn new(store: LocalStore, blob: BlobId, parts: Arc<[usize]>) -> Self {
        StoredUpdate { store, blob, parts }
    }

    /// As [`UpdateValues`].
    pub fn into_values(self) -> UpdateValues {
        UpdateValues::Stored(Arc::new(self))
    }
}

impl ReadUpdate for StoredUpdate {
    fn len(&self) -> usize {
        self.parts.iter().sum()
    }

    fn read(&self) -> Result<Entries, String> {
        let bytes = self.store.get(&self.blob).map_err(|e| e.to_string())?;
        codec::decode_parts_entries(&bytes, &self.parts)
            .map_err(|e| format!("blob {}: {e}", self.blob))
    }
}
