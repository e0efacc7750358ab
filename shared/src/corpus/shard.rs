//! Shards: many clips of one shape in one content-addressed file.
//!
//! ```text
//! offset 0   magic "AMSHARD\0"                      8 bytes
//!        8   format version (u32 LE)                4 bytes
//!       12   reserved, zero                         4 bytes
//!       16   header length H (u64 LE)               8 bytes
//!       24   header: rkyv-archived ShardHeader      H bytes
//!            zero padding up to a multiple of 64
//!        P   payload: clip 0, clip 1, ...           count x frames x size x size x 3 bytes
//! ```
//!
//! A shard's id is the BLAKE3 hash of the whole file (see [`crate::store`]), so its bytes are
//! verified before parsing. Parsing still validates everything (rkyv's bytecheck for the header,
//! then every count, index and length against the file), because a hash proves integrity, not
//! that the producer was sane.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::data::synth::VideoLabels;

/// First bytes of every shard.
pub const MAGIC: &[u8; 8] = b"AMSHARD\0";
/// The layout version this code writes and reads.
pub const FORMAT: u32 = 1;
/// Payload alignment within the file.
const ALIGN: usize = 64;
/// Largest header accepted (a shard of 64 MiB holds a few thousand clip records).
const MAX_HEADER: u64 = 256 << 20;

/// What a shard says about itself.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ShardHeader {
    /// Layout version (also in the fixed prefix; repeated so the header is self-describing).
    pub format: u32,
    /// The preset the clips were cut for (informational).
    pub preset: String,
    /// Frames per clip.
    pub frames: u32,
    /// Clip side in pixels; clips are square RGB.
    pub size: u32,
    /// Frame rate the sources were resampled to.
    pub fps: f32,
    /// Distance between clip frames, in resampled frames.
    pub frame_step: u32,
    /// Source files, relative to the corpus root; clips refer to them by index.
    pub sources: Vec<String>,
    /// One record per clip, in payload order.
    pub clips: Vec<ClipRecord>,
}

/// Where one clip came from.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ClipRecord {
    /// Index into [`ShardHeader::sources`].
    pub source: u32,
    /// The first frame, in resampled frames of the source.
    pub start_frame: u32,
    /// Ground truth for this clip's frames, when the corpus has it (synthetic corpora do):
    /// `labels.frames` holds exactly the clip's frames.
    pub labels: Option<VideoLabels>,
}

impl ShardHeader {
    /// Bytes of one clip.
    pub fn clip_bytes(&self) -> usize {
        self.frames as usize * (self.size as usize).pow(2) * 3
    }
}

/// Why a shard was refused.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Not a shard at all, or a damaged prefix.
    #[error("not an Amity shard: {0}")]
    NotAShard(String),
    /// Written by a newer (or unknown) version.
    #[error("shard format {found} is not supported (this build reads format {FORMAT})")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The header failed validation.
    #[error("invalid shard header: {0}")]
    Header(String),
}

/// A parsed shard over borrowed bytes: the owned header and the payload slice.
#[derive(Debug)]
pub struct ShardView<'a> {
    /// The header.
    pub header: ShardHeader,
    payload: &'a [u8],
}

impl<'a> ShardView<'a> {
    /// Parses and validates `bytes` (already hash-verified by the caller).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ShardError> {
        if bytes.len() < 24 {
            return Err(ShardError::NotAShard(format!(
                "{} bytes, shorter than the fixed prefix",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(ShardError::NotAShard("wrong magic bytes".into()));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let format = u32_at(8);
        if format != FORMAT {
            return Err(ShardError::Version { found: format });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[16..24]);
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || 24 + header_len > bytes.len() as u64 {
            return Err(ShardError::NotAShard(format!(
                "header length {header_len} does not fit in {} bytes",
                bytes.len()
            )));
        }
        let header_end = 24 + header_len as usize;
        // rkyv needs aligned input; the header is small, so copy it.
        let mut aligned = AlignedVec::<16>::with_capacity(header_len as usize);
        aligned.extend_from_slice(&bytes[24..header_end]);
        let header = rkyv::from_bytes::<ShardHeader, rancor::Error>(&aligned)
            .map_err(|e| ShardError::Header(e.to_string()))?;
        validate(&header)?;
        let payload_start = header_end.next_multiple_of(ALIGN);
        let expected = header.clips.len() * header.clip_bytes();
        if bytes.len() < payload_start || bytes.len() - payload_start != expected {
            return Err(ShardError::Header(format!(
                "{} clips of {} bytes need a {expected}-byte payload, the file has {}",
                header.clips.len(),
                header.clip_bytes(),
                bytes.len().saturating_sub(payload_start)
            )));
        }
        Ok(ShardView {
            header,
            payload: &bytes[payload_start..],
        })
    }

    /// Number of clips.
    pub fn len(&self) -> usize {
        self.header.clips.len()
    }

    /// Whether the shard holds no clip.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The RGB bytes of clip `i` (`frames x size x size x 3`).
    pub fn clip(&self, i: usize) -> &'a [u8] {
        let n = self.header.clip_bytes();
        &self.payload[i * n..(i + 1) * n]
    }
}

fn validate(h: &ShardHeader) -> Result<(), ShardError> {
    let bad = |m: String| Err(ShardError::Header(m));
    if h.format != FORMAT {
        return Err(ShardError::Version { found: h.format });
    }
    if h.frames == 0 || h.frames > 1024 || h.size == 0 || h.size > 4096 {
        return bad(format!(
            "implausible clip shape {} x {}px",
            h.frames, h.size
        ));
    }
    if !(h.fps.is_finite() && h.fps > 0.0) || h.frame_step == 0 {
        return bad(format!("fps {} / frame step {}", h.fps, h.frame_step));
    }
    for (i, c) in h.clips.iter().enumerate() {
        if c.source as usize >= h.sources.len() {
            return bad(format!(
                "clip {i} names source {} of {}",
                c.source,
                h.sources.len()
            ));
        }
        if let Some(l) = &c.labels {
            if l.frames.len() != h.frames as usize {
                return bad(format!(
                    "clip {i} has labels for {} frames, not {}",
                    l.frames.len(),
                    h.frames
                ));
            }
            if l.frames.iter().any(|f| f.len() != l.objects.len()) {
                return bad(format!(
                    "clip {i}: per-frame labels disagree with its objects"
                ));
            }
        }
    }
    Ok(())
}

/// Accumulates clips into one shard.
#[derive(Debug)]
pub struct ShardBuilder {
    header: ShardHeader,
    payload: Vec<u8>,
}

impl ShardBuilder {
    /// An empty shard for clips of `frames x size x size x 3`.
    pub fn new(preset: &str, frames: usize, size: usize, fps: f64, frame_step: usize) -> Self {
        ShardBuilder {
            header: ShardHeader {
                format: FORMAT,
                preset: preset.to_owned(),
                frames: frames as u32,
                size: size as u32,
                fps: fps as f32,
                frame_step: frame_step as u32,
                sources: Vec::new(),
                clips: Vec::new(),
            },
            payload: Vec::new(),
        }
    }

    /// Reserves room for `bytes` of payload up front, so a shard packed to a known target
    /// size is one allocation instead of a doubling buffer that ends up to twice as large.
    pub fn with_payload_capacity(mut self, bytes: usize) -> Self {
        self.payload.reserve_exact(bytes);
        self
    }

    /// Clips so far.
    pub fn len(&self) -> usize {
        self.header.clips.len()
    }

    /// Whether no clip was added.
    pub fn is_empty(&self) -> bool {
        self.header.clips.is_empty()
    }

    /// Payload bytes so far (the header adds little).
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }

    /// Adds a clip. `pixels` must be exactly one clip.
    pub fn push(
        &mut self,
        source: &str,
        start_frame: usize,
        pixels: &[u8],
        labels: Option<VideoLabels>,
    ) {
        assert_eq!(pixels.len(), self.header.clip_bytes(), "clip size");
        let index = match self.header.sources.last() {
            Some(last) if last == source => self.header.sources.len() - 1,
            _ => {
                self.header.sources.push(source.to_owned());
                self.header.sources.len() - 1
            }
        };
        self.header.clips.push(ClipRecord {
            source: index as u32,
            start_frame: start_frame as u32,
            labels,
        });
        self.payload.extend_from_slice(pixels);
    }

    /// The finished shard: its prefix (fixed fields, header, padding) and its payload, kept
    /// apart so that a 64 MiB payload is streamed into the store, never copied behind a header.
    pub fn finish(self) -> ShardBytes {
        let header =
            rkyv::to_bytes::<rancor::Error>(&self.header).expect("a shard header always archives");
        let payload_start = (24 + header.len()).next_multiple_of(ALIGN);
        let mut prefix = Vec::with_capacity(payload_start);
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&FORMAT.to_le_bytes());
        prefix.extend_from_slice(&0u32.to_le_bytes());
        prefix.extend_from_slice(&(header.len() as u64).to_le_bytes());
        prefix.extend_from_slice(&header);
        prefix.resize(payload_start, 0);
        ShardBytes {
            prefix,
            payload: self.payload,
        }
    }
}

/// A finished shard's bytes, in two parts: `prefix ++ payload` is the file.
#[derive(Debug)]
pub struct ShardBytes {
    prefix: Vec<u8>,
    payload: Vec<u8>,
}

impl ShardBytes {
    /// The file's length.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.payload.len()
    }

    /// Whether the file is empty (never: the prefix is at least 64 bytes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's bytes as a reader, without joining the parts.
    pub fn reader(&self) -> impl std::io::Read + '_ {
        std::io::Read::chain(&self.prefix[..], &self.payload[..])
    }

    /// The file's bytes joined in memory.
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.prefix[..], &self.payload[..]].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::{SynthConfig, generate};

    fn sample_shard() -> (Vec<u8>, Vec<Vec<u8>>) {
        let cfg = SynthConfig::for_size(16, 4);
        let mut b = ShardBuilder::new("tiny", 4, 16, 10.0, 1);
        let mut clips = Vec::new();
        for seed in 0..3 {
            let v = generate(&cfg, seed);
            b.push(
                &format!("video_{}.mp4", seed / 2),
                seed as usize,
                &v.pixels,
                (seed != 1).then(|| v.labels.clone()),
            );
            clips.push(v.pixels);
        }
        let shard = b.finish();
        let bytes = shard.to_vec();
        assert_eq!(bytes.len(), shard.len());
        (bytes, clips)
    }

    #[test]
    fn round_trip() {
        let (bytes, clips) = sample_shard();
        assert_eq!(&bytes[..8], MAGIC);
        let view = ShardView::parse(&bytes).unwrap();
        assert_eq!(view.len(), 3);
        assert_eq!(view.header.sources, vec!["video_0.mp4", "video_1.mp4"]);
        assert_eq!(view.header.clips[2].source, 1);
        assert_eq!(view.header.clips[2].start_frame, 2);
        assert!(view.header.clips[1].labels.is_none());
        assert_eq!(
            view.header.clips[0].labels.as_ref().unwrap().frames.len(),
            4
        );
        for (i, c) in clips.iter().enumerate() {
            assert_eq!(view.clip(i), c.as_slice());
        }
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let (bytes, _) = sample_shard();
        assert!(matches!(
            ShardView::parse(&bytes[..10]),
            Err(ShardError::NotAShard(_))
        ));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(ShardView::parse(&b).is_err());
        let mut b = bytes.clone();
        b[8] = 9;
        let err = ShardView::parse(&b).unwrap_err().to_string();
        assert!(err.contains("format 9"), "{err}");
        // A truncated payload.
        assert!(ShardView::parse(&bytes[..bytes.len() - 1]).is_err());
        // Every single-byte change in the prefix and header is handled without a panic.
        let header_end = 24 + u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        for i in 0..header_end {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let _ = ShardView::parse(&b);
        }
    }
}
