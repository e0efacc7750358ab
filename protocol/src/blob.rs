//! Verified, resumable blob transfer, sans-IO.
//!
//! A blob (shard, model state, compressed update, checkpoint) is named by the BLAKE3 hash of
//! its bytes. It travels in 1 MiB chunks on a stream of its own, preceded by its **outboard**:
//! the BLAKE3 hash of every chunk. The receiver checks each chunk against the outboard as it
//! arrives (so a corrupted chunk is caught at once, not after a gigabyte) and keeps only
//! verified chunks, so a broken connection resumes from the last verified chunk boundary.
//! The outboard itself is not trusted: at the end, the receiver hashes the whole blob and
//! accepts it only if that equals the id it asked for. A sender computes the outboard by
//! reading the blob once and refuses to serve it if that read does not hash to the id.

use std::io::Read;

use crate::id::{BlobId, hex};

/// Bytes per chunk.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The chunk hashes of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    /// Blob length in bytes.
    pub len: u64,
    /// BLAKE3 of each chunk, in order.
    pub chunks: Vec<[u8; 32]>,
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
    /// The whole blob hashes to something other than its id.
    #[error("the blob hashes to {actual}, not to the id asked for")]
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
    /// Reads a blob once: its outboard, and its root hash checked against `id`.
    pub fn compute(reader: &mut dyn Read, id: &BlobId) -> Result<Self, BlobError> {
        let mut root = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut len = 0u64;
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
            root.update(&buf[..filled]);
            chunks.push(*blake3::hash(&buf[..filled]).as_bytes());
            len += filled as u64;
            if filled < CHUNK_SIZE {
                break;
            }
        }
        let actual = *root.finalize().as_bytes();
        if actual != id.0 {
            return Err(BlobError::SenderCorrupt {
                actual: hex(&actual),
            });
        }
        Ok(Outboard { len, chunks })
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

/// The receiving side's state: which chunk comes next, whether it is right, and the hash of
/// everything accepted so far (so the whole is checked without reading it back).
#[derive(Debug)]
pub struct BlobReceiver {
    outboard: Outboard,
    next: u64,
    root: blake3::Hasher,
}

impl BlobReceiver {
    /// Expects chunks from byte `offset` on (a chunk boundary). `prefix` yields the `offset`
    /// bytes kept from an earlier attempt; they are checked against this outboard and hashed.
    pub fn new(outboard: Outboard, offset: u64, prefix: &mut dyn Read) -> Result<Self, BlobError> {
        if !offset.is_multiple_of(CHUNK_SIZE as u64) || offset > outboard.len {
            return Err(BlobError::BadOutboard(format!(
                "resume offset {offset} is not a chunk boundary within {} bytes",
                outboard.len
            )));
        }
        let mut r = BlobReceiver {
            next: 0,
            outboard,
            root: blake3::Hasher::new(),
        };
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

    /// Checks the next chunk; on success the caller may keep its bytes.
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
        if blake3::hash(chunk).as_bytes() != &self.outboard.chunks[index as usize] {
            return Err(BlobError::ChunkMismatch {
                index,
                start: index * CHUNK_SIZE as u64,
            });
        }
        self.root.update(chunk);
        self.next += 1;
        Ok(())
    }

    /// After the last chunk: accepts the blob only if the whole hashes to `id`.
    pub fn finish(&self, id: &BlobId) -> Result<(), BlobError> {
        let actual = *self.root.finalize().as_bytes();
        if !self.done() || actual != id.0 {
            return Err(BlobError::RootMismatch {
                actual: hex(&actual),
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

        let mut r = BlobReceiver::new(ob.clone(), 0, &mut std::io::empty()).unwrap();
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
        let mut r =
            BlobReceiver::new(ob.clone(), CHUNK_SIZE as u64, &mut &bytes[..CHUNK_SIZE]).unwrap();
        r.accept(&bytes[CHUNK_SIZE..2 * CHUNK_SIZE]).unwrap();
        r.accept(&bytes[2 * CHUNK_SIZE..]).unwrap();
        assert!(r.done());
        r.finish(&id).unwrap();
        assert!(r.finish(&BlobId([0; 32])).is_err());
        assert!(r.accept(b"more").is_err());
        assert!(BlobReceiver::new(ob.clone(), 5, &mut std::io::empty()).is_err());
        // A kept prefix that does not match the outboard is caught on resume.
        let mut other_prefix = bytes[..CHUNK_SIZE].to_vec();
        other_prefix[0] ^= 1;
        assert!(matches!(
            BlobReceiver::new(ob, CHUNK_SIZE as u64, &mut &other_prefix[..]),
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
        let r = BlobReceiver::new(ob, 0, &mut std::io::empty()).unwrap();
        assert!(r.done());
        r.finish(&eid).unwrap();
    }
}
