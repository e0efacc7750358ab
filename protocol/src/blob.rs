//! Verified, resumable blob transfer, sans-IO.
//!
//! A blob (shard, model state, compressed update, checkpoint) is named by the BLAKE3 hash of
//! its bytes. It travels in 1 MiB chunks on a stream of its own, preceded by its **outboard**:
//! for every chunk, the BLAKE3 chaining value of its 1 MiB subtree (BLAKE3 is a tree hash;
//! a chunk at a 1 MiB boundary is one of its subtrees), or for a blob of one chunk the root
//! hash itself. The outboard is not trusted: the receiver merges its chaining values up the
//! tree (`blake3::hazmat`) and refuses it unless they add up to the id it asked for, before
//! any chunk arrives. Each chunk is then checked against its chaining value as it arrives (a
//! corrupted chunk is caught at once, not after a gigabyte) and only verified chunks are kept,
//! so a broken connection resumes from the last verified chunk boundary. Every byte is hashed
//! once on each side (measured in `amity bench transfer`: a second, whole-blob hash cost the
//! receiver as much as the chunk checks). A sender computes the outboard by reading the blob
//! once and refuses to serve it if it does not add up to the id.

use std::io::Read;

use blake3::hazmat::{
    HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::id::{BlobId, hex};

/// Bytes per chunk.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The chunk hashes of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    /// Blob length in bytes.
    pub len: u64,
    /// Each chunk's BLAKE3 chaining value, in order (a blob of one chunk: its root hash).
    pub chunks: Vec<[u8; 32]>,
}

/// Chunk `index`'s entry in the outboard of a blob of `count` chunks: the chaining value of the
/// chunk's subtree at its offset, or, when the chunk is the whole blob, the root hash.
fn chunk_entry(chunk: &[u8], index: u64, count: u64) -> [u8; 32] {
    if count == 1 {
        return *blake3::hash(chunk).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * CHUNK_SIZE as u64);
    h.update(chunk);
    h.finalize_non_root()
}

/// The chaining value of the subtree made of `entries` (chunk chaining values) over `len` bytes.
fn subtree(entries: &[[u8; 32]], len: u64) -> [u8; 32] {
    if entries.len() <= 1 {
        return entries.first().copied().unwrap_or_default();
    }
    // BLAKE3's tree is left-balanced: the left subtree is the largest power of two of 1 KiB
    // chunks below `len`; beyond one 1 MiB chunk that is a whole number of our chunks.
    let left = left_subtree_len(len);
    let k = (left / CHUNK_SIZE as u64) as usize;
    merge_subtrees_non_root(
        &subtree(&entries[..k], left),
        &subtree(&entries[k..], len - left),
        Mode::Hash,
    )
}

/// Why a transfer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The outboard's bytes are malformed.
    #[error("malformed outboard: {0}")]
    BadOutboard(String),
    /// A chunk does not match its outboard hash.
    #[error(
        "chunk {index} (bytes {start}..) does not match its hash: corrupted in transit or at the sender"
    )]
    ChunkMismatch {
        /// Chunk index.
        index: u64,
        /// Its first byte.
        start: u64,
    },
    /// More bytes than the blob has, or a chunk of the wrong size.
    #[error("chunk {index} has {got} bytes, expected {expected}")]
    ChunkSize {
        /// Chunk index.
        index: u64,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The outboard's chaining values do not add up to the blob's id.
    #[error("the outboard adds up to {actual}, not to the id asked for")]
    RootMismatch {
        /// What it hashes to (hex).
        actual: String,
    },
    /// The sender's own copy is damaged.
    #[error("the stored copy hashes to {actual}, not to its id; not serving it")]
    SenderCorrupt {
        /// What it hashes to (hex).
        actual: String,
    },
    /// Reading the blob failed.
    #[error("reading the blob: {0}")]
    Io(String),
}

/// Number of chunks of a blob of `len` bytes.
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK_SIZE as u64)
}

/// The length of chunk `index` of a blob of `len` bytes.
pub fn chunk_len(len: u64, index: u64) -> usize {
    let start = index * CHUNK_SIZE as u64;
    (len.saturating_sub(start)).min(CHUNK_SIZE as u64) as usize
}

impl Outboard {
    /// Reads a blob once: its outboard, checked against `id`.
    pub fn compute(reader: &mut dyn Read, id: &BlobId) -> Result<Self, BlobError> {
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut len = 0u64;
        // A blob of one chunk has its root hash as its entry; the first chunk is hashed both
        // ways (one extra MiB per blob) until a second one shows.
        let mut first_root = [0u8; 32];
        loop {
            let mut filled = 0;
            while filled < CHUNK_SIZE {
                let n = reader
                    .read(&mut buf[filled..])
                    .map_err(|e| BlobError::Io(e.to_string()))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            let index = chunks.len() as u64;
            if index == 0 {
                first_root = *blake3::hash(&buf[..filled]).as_bytes();
            }
            chunks.push(chunk_entry(&buf[..filled], index, 2));
            len += filled as u64;
            if filled < CHUNK_SIZE {
                break;
            }
        }
        if let [only] = chunks.as_mut_slice() {
            *only = first_root;
        }
        let outboard = Outboard { len, chunks };
        let actual = outboard.root();
        if actual != id.0 {
            return Err(BlobError::SenderCorrupt {
                actual: hex(&actual),
            });
        }
        Ok(outboard)
    }

    /// The root hash the entries add up to: the blob's id when they are right.
    pub fn root(&self) -> [u8; 32] {
        match self.chunks.as_slice() {
            [] => *blake3::hash(b"").as_bytes(),
            [only] => *only,
            entries => {
                let left = left_subtree_len(self.len);
                let k = (left / CHUNK_SIZE as u64) as usize;
                let l = subtree(&entries[..k.min(entries.len())], left);
                let r = subtree(&entries[k.min(entries.len())..], self.len - left);
                *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
            }
        }
    }

    /// Wire form: `len (u64 LE) | chunk hashes`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.chunks.len());
        out.extend_from_slice(&self.len.to_le_bytes());
        for h in &self.chunks {
            out.extend_from_slice(h);
        }
        out
    }

    /// Parses the wire form, checking the hash count against the length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BlobError> {
        if bytes.len() < 8 || !(bytes.len() - 8).is_multiple_of(32) {
            return Err(BlobError::BadOutboard(format!("{} bytes", bytes.len())));
        }
        let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let chunks: Vec<[u8; 32]> = bytes[8..]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        if chunks.len() as u64 != chunk_count(len) {
            return Err(BlobError::BadOutboard(format!(
                "{} chunk hashes for {len} bytes",
                chunks.len()
            )));
        }
        Ok(Outboard { len, chunks })
    }
}

/// The receiving side's state: the outboard, checked against the id, and which chunk comes
/// next.
#[derive(Debug)]
pub struct BlobReceiver {
    outboard: Outboard,
    next: u64,
}

impl BlobReceiver {
    /// Expects the chunks of blob `id` from byte `offset` on (a chunk boundary), once `outboard`
    /// adds up to `id`. `prefix` yields the `offset` bytes kept from an earlier attempt; they
    /// are checked against the outboard.
    pub fn new(
        outboard: Outboard,
        id: &BlobId,
        offset: u64,
        prefix: &mut dyn Read,
    ) -> Result<Self, BlobError> {
        let actual = outboard.root();
        if actual != id.0 {
            return Err(BlobError::RootMismatch {
                actual: hex(&actual),
            });
        }
        if !offset.is_multiple_of(CHUNK_SIZE as u64) || offset > outboard.len {
            return Err(BlobError::BadOutboard(format!(
                "resume offset {offset} is not a chunk boundary within {} bytes",
                outboard.len
            )));
        }
        let mut r = BlobReceiver { next: 0, outboard };
        let mut buf = vec![0u8; CHUNK_SIZE];
        for index in 0..offset / CHUNK_SIZE as u64 {
            let n = chunk_len(r.outboard.len, index);
            prefix
                .read_exact(&mut buf[..n])
                .map_err(|e| BlobError::Io(format!("the kept prefix: {e}")))?;
            r.accept(&buf[..n])?;
        }
        Ok(r)
    }

    /// The blob's length.
    pub fn len(&self) -> u64 {
        self.outboard.len
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.outboard.len == 0
    }

    /// Bytes verified so far (including the resumed prefix).
    pub fn verified(&self) -> u64 {
        (self.next * CHUNK_SIZE as u64).min(self.outboard.len)
    }

    /// Whether every chunk arrived.
    pub fn done(&self) -> bool {
        self.next >= chunk_count(self.outboard.len)
    }

    /// Checks the next chunk (hashing it once); on success the caller may keep its bytes.
    pub fn accept(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        let index = self.next;
        let expected = chunk_len(self.outboard.len, index);
        if self.done() || chunk.len() != expected {
            return Err(BlobError::ChunkSize {
                index,
                got: chunk.len(),
                expected,
            });
        }
        let count = self.outboard.chunks.len() as u64;
        if chunk_entry(chunk, index, count) != self.outboard.chunks[index as usize] {
            return Err(BlobError::ChunkMismatch {
                index,
                start: index * CHUNK_SIZE as u64,
            });
        }
        self.next += 1;
        Ok(())
    }

    /// After the last chunk: the blob is whole (every chunk matched an outboard that adds up
    /// to the id).
    pub fn finish(&self) -> Result<(), BlobError> {
        if !self.done() {
            return Err(BlobError::ChunkSize {
                index: self.next,
                got: 0,
                expected: chunk_len(self.outboard.len, self.next),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: usize) -> (Vec<u8>, BlobId) {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        (bytes.clone(), BlobId::of(&bytes))
    }

    #[test]
    fn chunks_verify_resume_and_corruption_is_named() {
        let (bytes, id) = blob(2 * CHUNK_SIZE + 123);
        let ob = Outboard::compute(&mut &bytes[..], &id).unwrap();
        assert_eq!(ob.chunks.len(), 3);
        assert_eq!(Outboard::from_bytes(&ob.to_bytes()).unwrap(), ob);
        assert!(Outboard::from_bytes(&ob.to_bytes()[..40]).is_err());

        let mut r = BlobReceiver::new(ob.clone(), &id, 0, &mut std::io::empty()).unwrap();
        r.accept(&bytes[..CHUNK_SIZE]).unwrap();
        assert_eq!(r.verified(), CHUNK_SIZE as u64);
        let mut bad = bytes[CHUNK_SIZE..2 * CHUNK_SIZE].to_vec();
        bad[10] ^= 1;
        assert_eq!(
            r.accept(&bad),
            Err(BlobError::ChunkMismatch {
                index: 1,
                start: CHUNK_SIZE as u64
            })
        );
        // Resume from the verified prefix.
        let mut r = BlobReceiver::new(
            ob.clone(),
            &id,
            CHUNK_SIZE as u64,
            &mut &bytes[..CHUNK_SIZE],
        )
        .unwrap();
        r.accept(&bytes[CHUNK_SIZE..2 * CHUNK_SIZE]).unwrap();
        r.accept(&bytes[2 * CHUNK_SIZE..]).unwrap();
        assert!(r.done());
        r.finish().unwrap();
        assert!(r.accept(b"more").is_err());
        assert!(BlobReceiver::new(ob.clone(), &id, 5, &mut std::io::empty()).is_err());
        // An outboard for other bytes, or for another id, is refused before any chunk.
        assert!(matches!(
            BlobReceiver::new(ob.clone(), &BlobId([0; 32]), 0, &mut std::io::empty()),
            Err(BlobError::RootMismatch { .. })
        ));
        let mut forged = ob.clone();
        forged.chunks[1][0] ^= 1;
        assert!(matches!(
            BlobReceiver::new(forged, &id, 0, &mut std::io::empty()),
            Err(BlobError::RootMismatch { .. })
        ));
        // A kept prefix that does not match the outboard is caught on resume.
        let mut other_prefix = bytes[..CHUNK_SIZE].to_vec();
        other_prefix[0] ^= 1;
        assert!(matches!(
            BlobReceiver::new(ob, &id, CHUNK_SIZE as u64, &mut &other_prefix[..]),
            Err(BlobError::ChunkMismatch { index: 0, .. })
        ));

        let mut other = bytes.clone();
        other[0] ^= 1;
        assert!(matches!(
            Outboard::compute(&mut &other[..], &id),
            Err(BlobError::SenderCorrupt { .. })
        ));
        let (empty, eid) = blob(0);
        let ob = Outboard::compute(&mut &empty[..], &eid).unwrap();
        let r = BlobReceiver::new(ob, &eid, 0, &mut std::io::empty()).unwrap();
        assert!(r.done());
        r.finish().unwrap();
    }

    /// The outboard's entries add up to BLAKE3 of the whole blob at every shape of BLAKE3's
    /// tree over our chunks: one chunk, a power of two, one byte past it, a partial last chunk.
    #[test]
    fn outboards_add_up_to_the_blake3_of_the_blob() {
        for n in [
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            2 * CHUNK_SIZE,
            3 * CHUNK_SIZE + 777,
            4 * CHUNK_SIZE,
            5 * CHUNK_SIZE - 3,
        ] {
            let (bytes, id) = blob(n);
            let ob = Outboard::compute(&mut &bytes[..], &id).unwrap();
            assert_eq!(ob.root(), id.0, "{n} bytes");
            let mut r = BlobReceiver::new(ob, &id, 0, &mut std::io::empty()).unwrap();
            for c in bytes.chunks(CHUNK_SIZE) {
                r.accept(c).unwrap();
            }
            r.finish().unwrap();
        }
    }
}
