//! The one id and hash type: [`BlobId`], a 32-byte BLAKE3 digest.
//!
//! A blob's id *is* the hash of its bytes (shards, states, deltas, updates, checkpoints,
//! releases), so whoever hands a blob over, it is verified by hashing it again. A parameter
//! vector's hash (`GlobalParams::hash`, what a worker checks a reconstructed state against) is
//! the same kind of digest and the same type. It is written as 64 lowercase hex digits in
//! files, logs and JSON, and as 32 raw bytes on the wire.

use std::fmt;
use std::str::FromStr;

/// A BLAKE3 digest: the id of a blob (the hash of its bytes), or the hash of a parameter vector.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        BlobId(*blake3::hash(bytes).as_bytes())
    }

    /// The id of `bytes`, hashing on every core (worth it above a few MiB).
    pub fn of_large(bytes: &[u8]) -> Self {
        if bytes.len() < 1 << 22 {
            return Self::of(bytes);
        }
        let mut h = blake3::Hasher::new();
        h.update_rayon(bytes);
        BlobId(*h.finalize().as_bytes())
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.short())
    }
}

/// Text that is not 64 hex digits, where a [`BlobId`] was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a blob id (64 hex digits)")]
pub struct BadBlobId(pub String);

impl FromStr for BlobId {
    type Err = BadBlobId;

    fn from_str(s: &str) -> Result<Self, BadBlobId> {
        let bytes = unhex(s)
            .filter(|b| b.len() == 32 && s.len() == 64)
            .ok_or_else(|| BadBlobId(s.to_owned()))?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(BlobId(out))
    }
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Hex text, or the 32 numbers older coordinator snapshots wrote parameter hashes as.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            Hex(String),
            Bytes([u8; 32]),
        }
        match Written::deserialize(d)? {
            Written::Hex(s) => s.parse().map_err(serde::de::Error::custom),
            Written::Bytes(b) => Ok(BlobId(b)),
        }
    }
}

/// Lowercase hex of `bytes` (ids, keys, signatures): the one hex writer.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hex text (either case, an even number of digits), or `None`.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ids_round_trip_through_hex_json_and_rkyv(bytes in proptest::array::uniform32(any::<u8>())) {
            let id = BlobId(bytes);
            prop_assert_eq!(id.to_hex().parse::<BlobId>(), Ok(id));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<BlobId>(&json).unwrap(), id);
            // The byte-array form of older snapshots still reads.
            let old = serde_json::to_string(&bytes).unwrap();
            prop_assert_eq!(serde_json::from_str::<BlobId>(&old).unwrap(), id);
            let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&id).unwrap();
            let back = rkyv::from_bytes::<BlobId, rkyv::rancor::Error>(&archived).unwrap();
            prop_assert_eq!(back, id);
        }
    }

    #[test]
    fn bad_ids_are_named() {
        for s in [
            "",
            "abc",
            &"g".repeat(64),
            &"a".repeat(63),
            &"é".repeat(32),
            &"+a".repeat(32),
        ] {
            let err = s.parse::<BlobId>().unwrap_err();
            assert_eq!(err, BadBlobId(s.to_owned()));
        }
        assert_eq!(unhex("0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
