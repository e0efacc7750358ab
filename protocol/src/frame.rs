//! Length-prefixed frames on QUIC streams, sans-IO.
//!
//! ```text
//! kind (u8) | length (u32 LE) | payload (length bytes)
//! ```
//!
//! Every kind has a hard maximum, checked as soon as the 5-byte prefix arrives, before any
//! payload is buffered: an oversized frame costs the receiver five bytes, not its memory.
//! [`FrameDecoder`] is fed whatever bytes the stream delivers and hands out whole frames.

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// An encoded [`crate::message`] (control messages, blob headers).
    Message = 1,
    /// A blob's chunk-hash list ([`crate::blob::Outboard`]).
    Outboard = 2,
    /// Raw bytes of one blob chunk.
    Chunk = 3,
}

impl FrameKind {
    /// The largest payload accepted for this kind.
    pub const fn max_len(self) -> usize {
        match self {
            FrameKind::Message => 1 << 20,
            // 32 bytes per 1 MiB chunk: enough for a 1 TiB blob.
            FrameKind::Outboard => 32 << 20,
            FrameKind::Chunk => crate::blob::CHUNK_SIZE,
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(FrameKind::Message),
            2 => Some(FrameKind::Outboard),
            3 => Some(FrameKind::Chunk),
            _ => None,
        }
    }
}

/// Why a stream's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A kind byte this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than its kind allows.
    #[error("{kind:?} frame of {len} bytes exceeds the {max}-byte maximum")]
    TooLarge {
        /// The kind.
        kind: FrameKind,
        /// Announced length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

/// Encodes one frame.
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= kind.max_len(), "frame over its maximum");
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The 5-byte prefix of a frame (for writing a payload without copying it).
pub fn frame_prefix(kind: FrameKind, len: usize) -> [u8; 5] {
    assert!(len <= kind.max_len(), "frame over its maximum");
    let l = (len as u32).to_le_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// Reassembles frames from arbitrary pieces of a stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out (compacted lazily).
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// How many more bytes the frame in progress needs (at least 1 when none is complete).
    pub fn wanted(&self) -> usize {
        let avail = &self.buf[self.start..];
        if avail.len() < 5 {
            return 5 - avail.len();
        }
        let len = u32::from_le_bytes([avail[1], avail[2], avail[3], avail[4]]) as usize;
        (5 + len).saturating_sub(avail.len()).max(1)
    }

    /// The kind of the frame in progress, as soon as its 5-byte prefix is buffered (before its
    /// payload is), so that a receiver can refuse a kind it does not expect at once.
    pub fn next_kind(&self) -> Result<Option<FrameKind>, FrameError> {
        match self.buf.get(self.start) {
            Some(&b) if self.buffered() >= 5 => FrameKind::from_u8(b)
                .map(Some)
                .ok_or(FrameError::UnknownKind(b)),
            _ => Ok(None),
        }
    }

    /// The next whole frame, if one is buffered. Errors are final for the stream.
    pub fn next_frame(&mut self) -> Result<Option<(FrameKind, Vec<u8>)>, FrameError> {
        let Some((kind, len)) = self.prefix()? else {
            return Ok(None);
        };
        let avail = &self.buf[self.start..];
        if avail.len() < 5 + len {
            return Ok(None);
        }
        let payload = avail[5..5 + len].to_vec();
        self.start += 5 + len;
        if self.start > (1 << 20) && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some((kind, payload)))
    }

    /// When exactly a frame's 5-byte prefix is buffered (nothing of its payload): consumes it
    /// and returns the frame's kind and payload length, so that the caller reads the payload
    /// straight from the stream into its own buffer (one copy fewer per byte for 1 MiB blob
    /// chunks). `None` otherwise; an unknown kind or a length over the kind's maximum is an
    /// error, as in [`FrameDecoder::next_frame`].
    pub fn take_prefix(&mut self) -> Result<Option<(FrameKind, usize)>, FrameError> {
        if self.buffered() != 5 {
            return Ok(None);
        }
        let prefix = self.prefix()?;
        self.buf.clear();
        self.start = 0;
        Ok(prefix)
    }

    /// The buffered frame's kind and payload length, checked against the kind's maximum, once
    /// its 5-byte prefix is buffered.
    fn prefix(&self) -> Result<Option<(FrameKind, usize)>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 5 {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(avail[0]).ok_or(FrameError::UnknownKind(avail[0]))?;
        let len = u32::from_le_bytes([avail[1], avail[2], avail[3], avail[4]]) as usize;
        if len > kind.max_len() {
            return Err(FrameError::TooLarge {
                kind,
                len,
                max: kind.max_len(),
            });
        }
        Ok(Some((kind, len)))
    }

    /// Called at the end of the stream: leftover bytes mean a cut-off frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_lone_prefix_can_be_taken_and_the_payload_read_elsewhere() {
        let mut d = FrameDecoder::new();
        let frame = encode_frame(FrameKind::Chunk, &[7u8; 300]);
        d.push(&frame[..3]);
        assert_eq!(d.take_prefix().unwrap(), None);
        d.push(&frame[3..5]);
        assert_eq!(d.take_prefix().unwrap(), Some((FrameKind::Chunk, 300)));
        assert_eq!(d.buffered(), 0);
        // With payload bytes buffered behind it, the prefix stays for `next_frame`.
        d.push(&frame[..6]);
        assert_eq!(d.take_prefix().unwrap(), None);
        let mut big = vec![FrameKind::Message as u8];
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut d = FrameDecoder::new();
        d.push(&big);
        assert!(matches!(d.take_prefix(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn the_kind_is_known_from_the_prefix_alone() {
        let mut d = FrameDecoder::new();
        d.push(&[FrameKind::Outboard as u8, 0, 0]);
        assert_eq!(d.next_kind(), Ok(None));
        d.push(&[0, 2]);
        assert_eq!(d.next_kind(), Ok(Some(FrameKind::Outboard)));
        assert_eq!(d.next_frame(), Ok(None), "the payload is still missing");
        let mut d = FrameDecoder::new();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_kind(), Err(FrameError::UnknownKind(9)));
    }

    proptest! {
        #[test]
        fn frames_survive_any_split(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..8),
            cuts in prop::collection::vec(1usize..64, 1..50),
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend(encode_frame(FrameKind::Message, p));
            }
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                d.push(&rest[..n]);
                rest = &rest[n..];
                i += 1;
                while let Some((k, p)) = d.next_frame().unwrap() {
                    prop_assert_eq!(k, FrameKind::Message);
                    got.push(p);
                }
            }
            d.finish().unwrap();
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
            let _ = d.finish();
        }
    }

    #[test]
    fn oversized_unknown_and_truncated_frames_are_refused_early() {
        let mut d = FrameDecoder::new();
        // Only the prefix of a 2 MiB message: refused before the payload arrives.
        d.push(&[1, 0, 0, 0x20, 0]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                kind: FrameKind::Message,
                len: 2 << 20,
                max: 1 << 20
            })
        );
        let mut d = FrameDecoder::new();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(9)));
        let mut d = FrameDecoder::new();
        d.push(&encode_frame(FrameKind::Chunk, b"abcdef")[..8]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.wanted(), 3);
        assert_eq!(d.finish(), Err(FrameError::Truncated(8)));
    }
}
