//! Compression codecs for pseudo-gradients and state deltas, and error feedback.
//!
//! One codec is a [`CodecSpec`]: optional top-k sparsification (keep the `k` entries of largest
//! magnitude, `k = ceil(fraction * len)`, over the whole vector or, *chunked*, in every chunk
//! of `C` values), then a value coding of what is kept: `fp32`, `fp16`, `bf16`, blockwise `int8`
//! (one `f32` absmax scale per block) or blockwise `int2` (four levels, `±s` and `±s/3`).
//! Written `fp32`, `bf16`, `int8`, `int8/256` (block size), `topk0.01+int8`,
//! `topk0.015625/4096+int2` (chunked), ... ([`CodecSpec::from_str`]). `sparseloco` names
//! SparseLoCo's recipe (Sarfi et al. 2025): 64 of every 4096 values (1/64), 2-bit values.
//!
//! Lossy codecs lose information every round; [`ErrorFeedback`] keeps what was not sent (the
//! residual) on the sender and adds it to the next update, so that the sum of what was sent
//! tracks the sum of the true updates (tested below).
//!
//! Wire format (little-endian), validated in full by [`decode`] before use, since updates come
//! from the network:
//!
//! ```text
//! "AMUP" | format 1 (u8) | value kind (u8) | sparse (u8) | 0 (u8) | len (u64) | block (u32) | k (u64)
//! [sparse 1: k index gaps as LEB128 varints; the first is the index itself]
//! [sparse 2 (chunked): chunk size C (u32), then per chunk of C values (the last may be
//!  shorter): kept count (u16), then that many u16 offsets in the chunk, strictly increasing]
//! values: fp32 k*4 | fp16/bf16 k*2 | int8: ceil(k/block) f32 scales, then k i8
//!         | int2: ceil(k/block) f32 scales, then k 2-bit codes, four to a byte, low bits first
//! ```

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

mod entries;
pub use entries::Entries;

const MAGIC: &[u8; 4] = b"AMUP";
const FORMAT: u8 = 1;
const HEADER: usize = 4 + 4 + 8 + 4 + 8;

/// How kept values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueCoding {
    /// 4 bytes each, exact.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (f32's exponent range, 8 bits of mantissa).
    Bf16,
    /// Signed bytes scaled by each block's absolute maximum / 127.
    Int8 {
        /// Values per scale.
        block: u32,
    },
    /// Two bits a value: `-s, -s/3, s/3, s` with `s` each block's absolute maximum.
    Int2 {
        /// Values per scale.
        block: u32,
    },
}

impl ValueCoding {
    fn kind(self) -> u8 {
        match self {
            ValueCoding::F32 => 0,
            ValueCoding::F16 => 1,
            ValueCoding::Bf16 => 2,
            ValueCoding::Int8 { .. } => 3,
            ValueCoding::Int2 { .. } => 4,
        }
    }

    fn block(self) -> u32 {
        match self {
            ValueCoding::Int8 { block } | ValueCoding::Int2 { block } => block,
            _ => 0,
        }
    }
}

/// Default int2 block: 64 values share one scale (one chunk's kept values in `sparseloco`).
pub const DEFAULT_INT2_BLOCK: u32 = 64;

/// The largest top-k chunk (offsets and counts are `u16`).
pub const MAX_CHUNK: u32 = 65_535;

/// Default int8 block: 256 values share one scale (1.6% overhead).
pub const DEFAULT_INT8_BLOCK: u32 = 256;

/// A codec: optional top-k, then a value coding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecSpec {
    /// Fraction of entries kept by top-k (`None`: dense).
    pub topk: Option<f32>,
    /// Top-k within every chunk of this many values instead of over the whole vector (only
    /// with `topk`): the kept entries spread over the vector, and each index costs 2 bytes.
    pub chunk: Option<u32>,
    /// How the kept values are written.
    pub values: ValueCoding,
}

impl CodecSpec {
    /// Dense fp32: exact, the uncompressed reference.
    pub const FP32: CodecSpec = CodecSpec {
        topk: None,
        chunk: None,
        values: ValueCoding::F32,
    };

    /// SparseLoCo's recipe: top 64 of every 4096 values, 2-bit values (`sparseloco`).
    pub const SPARSELOCO: CodecSpec = CodecSpec {
        topk: Some(1.0 / 64.0),
        chunk: Some(4096),
        values: ValueCoding::Int2 {
            block: DEFAULT_INT2_BLOCK,
        },
    };

    /// The same value coding without top-k (2-bit values become int8): what a flush sends, so
    /// that no error-feedback residual is left behind beyond int8 rounding.
    pub fn dense(&self) -> CodecSpec {
        CodecSpec {
            topk: None,
            chunk: None,
            values: match self.values {
                ValueCoding::Int2 { .. } => ValueCoding::Int8 {
                    block: DEFAULT_INT8_BLOCK,
                },
                v => v,
            },
        }
    }

    /// Entries kept out of `len`.
    pub fn kept(&self, len: usize) -> usize {
        match self.topk {
            None => len,
            Some(f) => {
                // `f` is an f32 (0.1 is 0.100000001): within a hair of an integer, take it.
                let x = f as f64 * len as f64;
                let k = if (x - x.round()).abs() < 1e-3 {
                    x.round()
                } else {
                    x.ceil()
                };
                (k as usize).clamp(len.min(1), len)
            }
        }
    }
}

/// A codec name that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown codec `{0}`: expected fp32, fp16, bf16, int8, int8/<block>, int2 or int2/<block>, \
     optionally after topk<fraction>+ or topk<fraction>/<chunk>+ (e.g. topk0.01+int8, \
     topk0.015625/4096+int2), or sparseloco"
)]
pub struct BadCodecName(pub String);

impl FromStr for CodecSpec {
    type Err = BadCodecName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCodecName(s.to_owned());
        if s == "sparseloco" {
            return Ok(CodecSpec::SPARSELOCO);
        }
        let (topk, chunk, values) = match s.split_once('+') {
            Some((k, v)) => {
                let k = k.strip_prefix("topk").ok_or_else(bad)?;
                let (f, chunk) = match k.split_once('/') {
                    Some((f, c)) => {
                        let c: u32 = c
                            .parse()
                            .ok()
                            .filter(|c| (1..=MAX_CHUNK).contains(c))
                            .ok_or_else(bad)?;
                        (f, Some(c))
                    }
                    None => (k, None),
                };
                let f: f32 = f.parse().map_err(|_| bad())?;
                if !(f > 0.0 && f <= 1.0) {
                    return Err(bad());
                }
                (Some(f), chunk, v)
            }
            None => (None, None, s),
        };
        let block = |prefix: &str, default: u32| -> Option<u32> {
            match values.strip_prefix(prefix)? {
                "" => Some(default),
                b => b.strip_prefix('/')?.parse().ok().filter(|&b| b > 0),
            }
        };
        let values = match values {
            "fp32" => ValueCoding::F32,
            "fp16" => ValueCoding::F16,
            "bf16" => ValueCoding::Bf16,
            _ => {
                if let Some(block) = block("int8", DEFAULT_INT8_BLOCK) {
                    ValueCoding::Int8 { block }
                } else if let Some(block) = block("int2", DEFAULT_INT2_BLOCK) {
                    ValueCoding::Int2 { block }
                } else {
                    return Err(bad());
                }
            }
        };
        Ok(CodecSpec {
            topk,
            chunk,
            values,
        })
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == CodecSpec::SPARSELOCO {
            return write!(f, "sparseloco");
        }
        if let Some(k) = self.topk {
            write!(f, "topk{k}")?;
            if let Some(c) = self.chunk {
                write!(f, "/{c}")?;
            }
            write!(f, "+")?;
        }
        match self.values {
            ValueCoding::F32 => write!(f, "fp32"),
            ValueCoding::F16 => write!(f, "fp16"),
            ValueCoding::Bf16 => write!(f, "bf16"),
            ValueCoding::Int8 { block } if block == DEFAULT_INT8_BLOCK => write!(f, "int8"),
            ValueCoding::Int8 { block } => write!(f, "int8/{block}"),
            ValueCoding::Int2 { block } if block == DEFAULT_INT2_BLOCK => write!(f, "int2"),
            ValueCoding::Int2 { block } => write!(f, "int2/{block}"),
        }
    }
}

impl Serialize for CodecSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CodecSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why bytes are not a valid encoded update.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The header is wrong.
    #[error("not an Amity update: {0}")]
    Header(String),
    /// The update has another length than the model.
    #[error("update has {got} values, the model has {want}")]
    Length {
        /// Values expected.
        want: usize,
        /// Values in the update.
        got: u64,
    },
    /// The body does not match the header.
    #[error("malformed update body: {0}")]
    Body(String),
}

/// Encodes `values` with `spec`.
pub fn encode(spec: &CodecSpec, values: &[f32]) -> Vec<u8> {
    let len = values.len();
    let block = spec.values.block();
    let sparse = match (spec.topk, spec.chunk) {
        (None, _) => 0u8,
        (Some(_), None) => 1,
        (Some(_), Some(_)) => 2,
    };
    if let (Some(_), Some(c)) = (spec.topk, spec.chunk) {
        // Chunked: every chunk keeps its own top entries, indices as u16 offsets.
        let c = c as usize;
        let mut counts_and_offsets = Vec::new();
        let mut kept = Vec::new();
        for (n, part) in values.chunks(c).enumerate() {
            let idx = top_k_indices(part, spec.kept(part.len()));
            counts_and_offsets.extend_from_slice(&(idx.len() as u16).to_le_bytes());
            for &i in &idx {
                counts_and_offsets.extend_from_slice(&(i as u16).to_le_bytes());
                kept.push(values[n * c + i as usize]);
            }
        }
        let mut out = Vec::with_capacity(HEADER + 4 + counts_and_offsets.len() + kept.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[FORMAT, spec.values.kind(), sparse, 0]);
        out.extend_from_slice(&(len as u64).to_le_bytes());
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(&(kept.len() as u64).to_le_bytes());
        out.extend_from_slice(&(c as u32).to_le_bytes());
        out.extend_from_slice(&counts_and_offsets);
        write_values(&mut out, spec.values, &kept);
        return out;
    }
    let k = spec.kept(len);
    let mut out = Vec::with_capacity(HEADER + k * 5);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[FORMAT, spec.values.kind(), sparse, 0]);
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&(k as u64).to_le_bytes());
    let kept: Vec<f32>;
    let kept_values: &[f32] = if spec.topk.is_some() {
        let idx = top_k_indices(values, k);
        let mut prev = 0u64;
        for (n, &i) in idx.iter().enumerate() {
            let gap = if n == 0 { i as u64 } else { i as u64 - prev };
            write_varint(&mut out, gap);
            prev = i as u64;
        }
        kept = idx.iter().map(|&i| values[i as usize]).collect();
        &kept
    } else {
        values
    };
    write_values(&mut out, spec.values, kept_values);
    out
}

/// Decodes an update of `want` values, validating every byte: header, lengths, index order and
/// range, finite scales, no trailing bytes.
pub fn decode(bytes: &[u8], want: usize) -> Result<Vec<f32>, CodecError> {
    let (indices, kept) = decode_kept(bytes, want)?;
    let Some(indices) = indices else {
        return Ok(kept);
    };
    let mut dense = vec![0.0f32; want];
    for (i, v) in indices.into_iter().zip(kept) {
        dense[i as usize] = v;
    }
    Ok(dense)
}

/// [`decode`] without densifying: the kept values and, for a sparse update, their indices
/// (ascending, each below `want`).
fn decode_kept(bytes: &[u8], want: usize) -> Result<(Option<Vec<u32>>, Vec<f32>), CodecError> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return Err(CodecError::Header("missing magic bytes".into()));
    }
    if bytes[4] != FORMAT {
        return Err(CodecError::Header(format!(
            "format {} (this build reads 1)",
            bytes[4]
        )));
    }
    let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let len = le64(8);
    let block = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let k = le64(20);
    if len != want as u64 {
        return Err(CodecError::Length { want, got: len });
    }
    if k > len {
        return Err(CodecError::Header(format!("{k} kept values of {len}")));
    }
    let values = match bytes[5] {
        0 => ValueCoding::F32,
        1 => ValueCoding::F16,
        2 => ValueCoding::Bf16,
        3 if block > 0 => ValueCoding::Int8 { block },
        4 if block > 0 => ValueCoding::Int2 { block },
        other => {
            return Err(CodecError::Header(format!(
                "value coding {other} (block {block})"
            )));
        }
    };
    let sparse = match bytes[6] {
        0 if k == len => false,
        0 => return Err(CodecError::Header("dense update with k != len".into())),
        1 | 2 => true,
        other => return Err(CodecError::Header(format!("sparse flag {other}"))),
    };
    let k = k as usize;
    let mut at = HEADER;
    let mut indices = Vec::new();
    if bytes[6] == 2 {
        indices = read_chunked_indices(bytes, &mut at, want, k)?;
    } else if sparse {
        indices.reserve(k);
        let mut prev: u64 = 0;
        for n in 0..k {
            let gap = read_varint(bytes, &mut at)?;
            let i = if n == 0 {
                gap
            } else {
                if gap == 0 {
                    return Err(CodecError::Body("repeated index".into()));
                }
                prev.checked_add(gap)
                    .ok_or_else(|| CodecError::Body("index overflow".into()))?
            };
            if i >= len {
                return Err(CodecError::Body(format!("index {i} past length {len}")));
            }
            indices.push(i as u32);
            prev = i;
        }
    }
    let kept = read_values(bytes, &mut at, values, k)?;
    if at != bytes.len() {
        return Err(CodecError::Body(format!(
            "{} trailing bytes",
            bytes.len() - at
        )));
    }
    Ok((sparse.then_some(indices), kept))
}

/// Encodes a vector made of `parts` (lengths summing to `values.len()`), each part on its own
/// with `spec`: top-k then picks the largest entries *of each part*, so a part whose values are
/// small (the slowly moving EMA target next to the model) is not starved. Layout:
/// `part count (u32) | per part: byte length (u64), encoding`.
pub fn encode_parts(spec: &CodecSpec, values: &[f32], parts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    let mut at = 0;
    for &n in parts {
        let enc = encode(spec, &values[at..at + n]);
        out.extend_from_slice(&(enc.len() as u64).to_le_bytes());
        out.extend_from_slice(&enc);
        at += n;
    }
    assert_eq!(at, values.len(), "parts cover the vector");
    out
}

/// Decodes [`encode_parts`] output for parts of the given lengths, validating everything.
/// Each part is written into the result as it is decoded (no second copy of the update).
pub fn decode_parts(bytes: &[u8], parts: &[usize]) -> Result<Vec<f32>, CodecError> {
    let mut dense = Vec::with_capacity(parts.iter().sum());
    for_each_part(bytes, parts, |n, indices, kept| match indices {
        None => dense.extend_from_slice(&kept),
        Some(indices) => {
            let start = dense.len();
            dense.resize(start + n, 0.0);
            for (i, v) in indices.into_iter().zip(kept) {
                dense[start + i as usize] = v;
            }
        }
    })?;
    Ok(dense)
}

/// [`decode_parts`] without densifying: what was sent of each part, validated the same way.
pub fn decode_parts_entries(bytes: &[u8], parts: &[usize]) -> Result<Entries, CodecError> {
    let mut out = Entries::new();
    for_each_part(bytes, parts, |n, indices, kept| {
        out.push_part(n, indices, kept)
    })?;
    Ok(out)
}

/// Decodes [`encode_parts`] output part by part, handing each to `f` (its length, the kept
/// indices or `None` when dense, the values) as soon as it is validated; fails on the first
/// part or header that does not check out.
fn for_each_part(
    bytes: &[u8],
    parts: &[usize],
    mut f: impl FnMut(usize, Option<Vec<u32>>, Vec<f32>),
) -> Result<(), CodecError> {
    if bytes.len() < 4 {
        return Err(CodecError::Header("missing part count".into()));
    }
    let count = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    if count != parts.len() {
        return Err(CodecError::Header(format!(
            "{count} parts, expected {}",
            parts.len()
        )));
    }
    let mut at = 4;
    for &n in parts {
        let len = bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| CodecError::Body("truncated part header".into()))?;
        at += 8;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| CodecError::Body("part runs past the end".into()))?;
        let (indices, kept) = decode_kept(&bytes[at..end], n)?;
        f(n, indices, kept);
        at = end;
    }
    if at != bytes.len() {
        return Err(CodecError::Body(format!(
            "{} trailing bytes",
            bytes.len() - at
        )));
    }
    Ok(())
}

/// Indices of the `k` entries of largest magnitude, ascending. NaN counts as largest, so a
/// poisoned update is never silently hidden by sparsification.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if k < values.len() {
        let mag = |i: &u32| {
            let v = values[*i as usize].abs();
            if v.is_nan() { f32::INFINITY } else { v }
        };
        idx.select_nth_unstable_by(k, |a, b| mag(b).total_cmp(&mag(a)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// The indices of a chunked update (sparse flag 2), validated: a chunk size in
/// `1..=MAX_CHUNK`, per chunk a count no larger than the chunk and strictly increasing offsets
/// inside it, and `k` kept values in all.
fn read_chunked_indices(
    bytes: &[u8],
    at: &mut usize,
    len: usize,
    k: usize,
) -> Result<Vec<u32>, CodecError> {
    let u16_at = |at: &mut usize| -> Result<u16, CodecError> {
        let b = bytes
            .get(*at..*at + 2)
            .ok_or_else(|| CodecError::Body("truncated chunk index list".into()))?;
        *at += 2;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    let c = bytes
        .get(*at..*at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| CodecError::Body("missing chunk size".into()))?;
    *at += 4;
    if !(1..=MAX_CHUNK).contains(&c) {
        return Err(CodecError::Header(format!(
            "chunk size {c} (1 to {MAX_CHUNK})"
        )));
    }
    let c = c as usize;
    let mut indices = Vec::with_capacity(k);
    for start in (0..len).step_by(c) {
        let chunk_len = c.min(len - start);
        let count = u16_at(at)? as usize;
        if count > chunk_len || indices.len() + count > k {
            return Err(CodecError::Body(format!(
                "chunk at {start} keeps {count} of {chunk_len} values ({k} in all)"
            )));
        }
        let mut prev: Option<u16> = None;
        for _ in 0..count {
            let i = u16_at(at)?;
            if prev.is_some_and(|p| i <= p) || i as usize >= chunk_len {
                return Err(CodecError::Body(format!(
                    "chunk at {start}: offset {i} out of order or past {chunk_len}"
                )));
            }
            prev = Some(i);
            indices.push((start + i as usize) as u32);
        }
    }
    if indices.len() != k {
        return Err(CodecError::Body(format!(
            "chunks keep {} values, the header says {k}",
            indices.len()
        )));
    }
    Ok(indices)
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u64, CodecError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *bytes
            .get(*at)
            .ok_or_else(|| CodecError::Body("truncated index list".into()))?;
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::Body("index varint longer than 64 bits".into()))
}

fn write_values(out: &mut Vec<u8>, coding: ValueCoding, values: &[f32]) {
    match coding {
        ValueCoding::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        ValueCoding::F16 => {
            for v in values {
                out.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        ValueCoding::Bf16 => {
            for v in values {
                out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        ValueCoding::Int8 { block } => {
            let scales: Vec<f32> = block_absmax(values, block)
                .into_iter()
                .map(|m| m / 127.0)
                .collect();
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            for (b, s) in values.chunks(block as usize).zip(&scales) {
                for v in b {
                    let q = if *s > 0.0 {
                        (v / s).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    out.push(q as i8 as u8);
                }
            }
        }
        ValueCoding::Int2 { block } => {
            let scales = block_absmax(values, block);
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            let codes: Vec<u8> = values
                .chunks(block as usize)
                .zip(&scales)
                .flat_map(|(b, s)| {
                    b.iter().map(move |v| {
                        // Levels -s, -s/3, s/3, s are codes 0..=3.
                        if *s > 0.0 {
                            (v / s * 1.5 + 1.5).round().clamp(0.0, 3.0) as u8
                        } else {
                            1
                        }
                    })
                })
                .collect();
            for four in codes.chunks(4) {
                out.push(
                    four.iter()
                        .enumerate()
                        .fold(0u8, |byte, (i, c)| byte | (c << (2 * i))),
                );
            }
        }
    }
}

/// Each block's largest magnitude; NaN for a block with a non-finite value, so that the
/// receiver refuses it.
fn block_absmax(values: &[f32], block: u32) -> Vec<f32> {
    values
        .chunks(block as usize)
        .map(|b| {
            if b.iter().any(|v| !v.is_finite()) {
                return f32::NAN;
            }
            b.iter().fold(0.0f32, |m, v| m.max(v.abs()))
        })
        .collect()
}

/// The value of 2-bit `code` (0..=3) at scale `s`.
fn int2_level(code: u8, s: f32) -> f32 {
    if s == 0.0 {
        return 0.0;
    }
    (code as f32 - 1.5) / 1.5 * s
}

fn read_values(
    bytes: &[u8],
    at: &mut usize,
    coding: ValueCoding,
    k: usize,
) -> Result<Vec<f32>, CodecError> {
    let take = |at: &mut usize, n: usize| -> Result<&[u8], CodecError> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| CodecError::Body(format!("truncated: {n} value bytes missing")))?;
        let s = &bytes[*at..end];
        *at = end;
        Ok(s)
    };
    // One f32 scale per block of `block` values, each finite and not negative.
    let read_scales = |at: &mut usize, block: u32, what: &str| {
        let blocks = k.div_ceil(block as usize);
        let scales: Vec<f32> = take(at, blocks.saturating_mul(4))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        match scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            Some(s) => Err(CodecError::Body(format!("{what} block scale {s}"))),
            None => Ok(scales),
        }
    };
    Ok(match coding {
        ValueCoding::F32 => take(at, k.saturating_mul(4))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        ValueCoding::F16 => take(at, k.saturating_mul(2))?
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        ValueCoding::Bf16 => take(at, k.saturating_mul(2))?
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        ValueCoding::Int8 { block } => {
            let scales = read_scales(at, block, "int8")?;
            let q = take(at, k)?;
            q.chunks(block as usize)
                .zip(&scales)
                .flat_map(|(b, s)| b.iter().map(move |&q| q as i8 as f32 * s))
                .collect()
        }
        ValueCoding::Int2 { block } => {
            let scales = read_scales(at, block, "int2")?;
            let packed = take(at, k.div_ceil(4))?;
            if !k.is_multiple_of(4) && packed.last().is_some_and(|b| b >> (2 * (k % 4)) != 0) {
                return Err(CodecError::Body("int2 padding bits set".into()));
            }
            (0..k)
                .map(|i| {
                    let code = (packed[i / 4] >> (2 * (i % 4))) & 3;
                    int2_level(code, scales[i / block as usize])
                })
                .collect()
        }
    })
}

/// Error feedback: what a lossy codec did not send is remembered and sent later.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// No residual yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Error feedback that carries `residual` (one saved with [`ErrorFeedback::residual`]) into
    /// the next update.
    pub fn with_residual(residual: Vec<f32>) -> Self {
        ErrorFeedback { residual }
    }

    /// The residual carried to the next update.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes `update + residual` with `spec` and keeps the part that was lost. Returns the
    /// bytes to send ([`encode`] format) and the values the receiver will decode. The update is
    /// taken by value: the residual is added into its buffer, which becomes the next residual
    /// (no copy of a model-sized vector; at the coordinator's close that is a model state of
    /// peak memory).
    pub fn encode(&mut self, spec: &CodecSpec, update: Vec<f32>) -> (Vec<u8>, Vec<f32>) {
        let codec = |v: &[f32]| {
            let bytes = encode(spec, v);
            let sent = decode(&bytes, v.len());
            (bytes, sent)
        };
        infallible(self.encode_if(update, codec, |_| Ok(())))
    }

    /// [`ErrorFeedback::encode`] part by part: the bytes are in the [`encode_parts`] format.
    pub fn encode_parts(
        &mut self,
        spec: &CodecSpec,
        update: Vec<f32>,
        parts: &[usize],
    ) -> (Vec<u8>, Vec<f32>) {
        infallible(self.encode_parts_if(spec, update, parts, |_| Ok(())))
    }

    /// [`ErrorFeedback::encode_parts`], kept only if `accept` takes the values the receiver will
    /// decode: when it refuses, the residual stays as it was and its error is returned (the
    /// coordinator's downlink, where a dropped state step must leave no trace).
    pub fn encode_parts_if<E>(
        &mut self,
        spec: &CodecSpec,
        update: Vec<f32>,
        parts: &[usize],
        accept: impl FnOnce(&[f32]) -> Result<(), E>,
    ) -> Result<(Vec<u8>, Vec<f32>), E> {
        let codec = |v: &[f32]| {
            let bytes = encode_parts(spec, v, parts);
            let sent = decode_parts(&bytes, parts);
            (bytes, sent)
        };
        self.encode_if(update, codec, accept)
    }

    fn encode_if<E>(
        &mut self,
        update: Vec<f32>,
        codec: impl FnOnce(&[f32]) -> (Vec<u8>, Result<Vec<f32>, CodecError>),
        accept: impl FnOnce(&[f32]) -> Result<(), E>,
    ) -> Result<(Vec<u8>, Vec<f32>), E> {
        let mut corrected = update;
        // A residual of another length (the first update, another model) counts as zeros.
        if self.residual.len() == corrected.len() {
            for (u, r) in corrected.iter_mut().zip(&self.residual) {
                *u += r;
            }
        }
        match codec(&corrected) {
            (bytes, Ok(sent)) => {
                accept(&sent)?;
                self.residual = corrected;
                for (r, s) in self.residual.iter_mut().zip(&sent) {
                    *r -= s;
                }
                Ok((bytes, sent))
            }
            // A non-finite update (training diverged): it goes out as it is, for the receiver
            // to reject, and the residual restarts rather than carry the poison forward.
            (bytes, Err(_)) => {
                accept(&corrected)?;
                self.residual = vec![0.0; corrected.len()];
                Ok((bytes, corrected))
            }
        }
    }
}

/// The value of a result that cannot fail.
fn infallible<T>(r: Result<T, std::convert::Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests;
