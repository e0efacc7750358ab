//! Raft messages between replicas as bytes: protobuf (raft-rs's own encoding), checked before
//! protobuf parses them.
//!
//! The protobuf 2.x parser that raft's offline-buildable codec uses recurses without bound on
//! nested groups (RUSTSEC-2024-0437). Raft's schema has no groups and at most four levels of
//! messages (`Message` > `Snapshot` > `SnapshotMetadata` > `ConfState`), so [`check`] walks the
//! wire format along that schema first and refuses any group, any truncated field and any length
//! that overruns its message. Only what passes reaches the parser.

use protobuf::Message as _;
use raft::prelude::Message;

/// Why a replica's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The protobuf framing is broken or uses what raft's schema never does.
    #[error("raft message refused before parsing: {0}")]
    Malformed(&'static str),
    /// Well-framed bytes that protobuf still refused.
    #[error("raft message does not parse: {0}")]
    Parse(String),
}

/// The nested messages of raft's schema, by (message, field number).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Schema {
    Message,
    Entry,
    Snapshot,
    SnapshotMetadata,
    ConfState,
}

impl Schema {
    /// The message type of field `field`, when it is a nested message.
    fn nested(self, field: u64) -> Option<Schema> {
        match (self, field) {
            (Schema::Message, 7) => Some(Schema::Entry),
            (Schema::Message, 9) => Some(Schema::Snapshot),
            (Schema::Snapshot, 2) => Some(Schema::SnapshotMetadata),
            (Schema::SnapshotMetadata, 1) => Some(Schema::ConfState),
            _ => None,
        }
    }
}

/// Reads a base-128 varint at `*at`.
fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes
            .get(*at)
            .ok_or(WireError::Malformed("truncated varint"))?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Malformed("varint longer than 10 bytes"))
}

/// Walks one message of type `schema` (see the module docs).
fn walk(bytes: &[u8], schema: Schema) -> Result<(), WireError> {
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        let (field, wire_type) = (key >> 3, key & 7);
        if field == 0 {
            return Err(WireError::Malformed("field number 0"));
        }
        match wire_type {
            0 => {
                varint(bytes, &mut at)?;
            }
            1 | 5 => {
                at += if wire_type == 1 { 8 } else { 4 };
                if at > bytes.len() {
                    return Err(WireError::Malformed("truncated fixed-width field"));
                }
            }
            2 => {
                let len = varint(bytes, &mut at)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| at.checked_add(l))
                    .filter(|&e| e <= bytes.len())
                    .ok_or(WireError::Malformed("length past the end of its message"))?;
                if let Some(inner) = schema.nested(field) {
                    walk(&bytes[at..end], inner)?;
                }
                at = end;
            }
            3 | 4 => return Err(WireError::Malformed("group (raft's schema has none)")),
            _ => return Err(WireError::Malformed("unknown wire type")),
        }
    }
    Ok(())
}

/// Checks `bytes` as a raft `Message` without parsing it (see the module docs).
pub fn check(bytes: &[u8]) -> Result<(), WireError> {
    walk(bytes, Schema::Message)
}

/// A raft message as bytes for a peer.
pub fn encode(msg: &Message) -> Vec<u8> {
    msg.write_to_bytes().expect("a raft message always encodes")
}

/// A raft message from a peer's bytes: checked, then parsed.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    check(bytes)?;
    Message::parse_from_bytes(bytes).map_err(|e| WireError::Parse(e.to_string()))
}

// protobuf messages have private fields: no struct literal, fields are set one by one.
#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::prelude::{ConfState, Entry, MessageType, Snapshot};

    fn sample() -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.term = 7;
        let mut e = Entry::default();
        e.index = 5;
        e.term = 7;
        // JSON in an entry's data starts with `{`, which reads as a group tag: data is not walked.
        e.set_data(b"{\"at_ms\":1}".to_vec().into());
        m.mut_entries().push(e);
        let mut snap = Snapshot::default();
        snap.mut_metadata()
            .set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        m.set_snapshot(snap);
        m
    }

    #[test]
    fn raft_messages_round_trip_and_groups_are_refused() {
        let m = sample();
        assert_eq!(decode(&encode(&m)).unwrap(), m);
        // A group nested in an entry (field 7 holds `0x0b` = field 1, start group).
        let hostile = [0x3a, 0x02, 0x0b, 0x0c];
        assert_eq!(
            decode(&hostile),
            Err(WireError::Malformed("group (raft's schema has none)"))
        );
        // Deep nesting of groups never reaches the parser.
        let deep: Vec<u8> = std::iter::repeat_n(0x0b, 100_000).collect();
        assert!(decode(&deep).is_err());
        assert!(decode(&[0x3a, 0x05, 0x00]).is_err(), "length past the end");
    }

    proptest! {
        #[test]
        fn any_bytes_are_refused_or_parsed_never_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_encoded_message_passes_the_check(from in 1u64..9, term in 0u64..1000, n in 0usize..4, data in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut m = sample();
            m.from = from;
            m.term = term;
            for i in 0..n {
                let mut e = Entry::default();
                e.index = 6 + i as u64;
                e.set_data(data.clone().into());
                m.mut_entries().push(e);
            }
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }
}
