//! Compression codecs for pseudo-gradients and state deltas, and error feedback.
//!
//! One codec is a [`CodecSpec`]: optional top-k sparsification (keep the `k` entries of largest
//! magnitude, `k = ceil(fraction * len)`), then a value coding of what is kept: `fp32`, `fp16`,
//! `bf16` or blockwise `int8` (one `f32` absmax scale per block). Written `fp32`, `bf16`,
//! `int8`, `int8/256` (block size), `topk0.01+int8`, ... ([`CodecSpec::from_str`]).
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
//! [sparse: k index gaps as LEB128 varints; the first is the index itself]
//! values: fp32 k*4 | fp16/bf16 k*2 | int8: ceil(k/block) f32 scales, then k i8
//! ```

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

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
}

impl ValueCoding {
    fn kind(self) -> u8 {
        match self {
            ValueCoding::F32 => 0,
            ValueCoding::F16 => 1,
            ValueCoding::Bf16 => 2,
            ValueCoding::Int8 { .. } => 3,
        }
    }
}

/// Default int8 block: 256 values share one scale (1.6% overhead).
pub const DEFAULT_INT8_BLOCK: u32 = 256;

/// A codec: optional top-k, then a value coding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecSpec {
    /// Fraction of entries kept by top-k (`None`: dense).
    pub topk: Option<f32>,
    /// How the kept values are written.
    pub values: ValueCoding,
}

impl CodecSpec {
    /// Dense fp32: exact, the uncompressed reference.
    pub const FP32: CodecSpec = CodecSpec {
        topk: None,
        values: ValueCoding::F32,
    };

    /// Whether decoding gives back exactly what was encoded.
    pub fn is_lossless(&self) -> bool {
        self.topk.is_none() && self.values == ValueCoding::F32
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
    "unknown codec `{0}`: expected fp32, fp16, bf16, int8 or int8/<block>, optionally after \
     topk<fraction>+ (e.g. topk0.01+int8)"
)]
pub struct BadCodecName(pub String);

impl FromStr for CodecSpec {
    type Err = BadCodecName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCodecName(s.to_owned());
        let (topk, values) = match s.split_once('+') {
            Some((k, v)) => {
                let f: f32 = k
                    .strip_prefix("topk")
                    .and_then(|f| f.parse().ok())
                    .ok_or_else(bad)?;
                if !(f > 0.0 && f <= 1.0) {
                    return Err(bad());
                }
                (Some(f), v)
            }
            None => (None, s),
        };
        let values = match values {
            "fp32" => ValueCoding::F32,
            "fp16" => ValueCoding::F16,
            "bf16" => ValueCoding::Bf16,
            "int8" => ValueCoding::Int8 {
                block: DEFAULT_INT8_BLOCK,
            },
            other => {
                let block: u32 = other
                    .strip_prefix("int8/")
                    .and_then(|b| b.parse().ok())
                    .filter(|&b| b > 0)
                    .ok_or_else(bad)?;
                ValueCoding::Int8 { block }
            }
        };
        Ok(CodecSpec { topk, values })
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(k) = self.topk {
            write!(f, "topk{k}+")?;
        }
        match self.values {
            ValueCoding::F32 => write!(f, "fp32"),
            ValueCoding::F16 => write!(f, "fp16"),
            ValueCoding::Bf16 => write!(f, "bf16"),
            ValueCoding::Int8 { block } if block == DEFAULT_INT8_BLOCK => write!(f, "int8"),
            ValueCoding::Int8 { block } => write!(f, "int8/{block}"),
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
    let k = spec.kept(len);
    let block = match spec.values {
        ValueCoding::Int8 { block } => block,
        _ => 0,
    };
    let mut out = Vec::with_capacity(HEADER + k * 5);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[FORMAT, spec.values.kind(), spec.topk.is_some() as u8, 0]);
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
        other => {
            return Err(CodecError::Header(format!(
                "value coding {other} (block {block})"
            )));
        }
    };
    let sparse = match bytes[6] {
        0 if k == len => false,
        0 => return Err(CodecError::Header("dense update with k != len".into())),
        1 => true,
        other => return Err(CodecError::Header(format!("sparse flag {other}"))),
    };
    let k = k as usize;
    let mut at = HEADER;
    let mut indices = Vec::new();
    if sparse {
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
    if !sparse {
        return Ok(kept);
    }
    let mut dense = vec![0.0f32; want];
    for (i, v) in indices.into_iter().zip(kept) {
        dense[i as usize] = v;
    }
    Ok(dense)
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
pub fn decode_parts(bytes: &[u8], parts: &[usize]) -> Result<Vec<f32>, CodecError> {
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
    let mut out = Vec::with_capacity(parts.iter().sum());
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
        out.extend(decode(&bytes[at..end], n)?);
        at = end;
    }
    if at != bytes.len() {
        return Err(CodecError::Body(format!(
            "{} trailing bytes",
            bytes.len() - at
        )));
    }
    Ok(out)
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
            let scales: Vec<f32> = values
                .chunks(block as usize)
                .map(|b| {
                    // A non-finite block gets a NaN scale so that the receiver refuses it.
                    if b.iter().any(|v| !v.is_finite()) {
                        return f32::NAN;
                    }
                    b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0
                })
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
    }
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
            let blocks = k.div_ceil(block as usize);
            let scales: Vec<f32> = take(at, blocks.saturating_mul(4))?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
                return Err(CodecError::Body(format!("int8 block scale {s}")));
            }
            let q = take(at, k)?;
            q.chunks(block as usize)
                .zip(&scales)
                .flat_map(|(b, s)| b.iter().map(move |&q| q as i8 as f32 * s))
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

    /// The residual carried to the next update.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes `update + residual` with `spec` and keeps the part that was lost. Returns the
    /// bytes to send ([`encode`] format) and the values the receiver will decode.
    pub fn encode(&mut self, spec: &CodecSpec, update: &[f32]) -> (Vec<u8>, Vec<f32>) {
        self.encode_with(update, |v| {
            let bytes = encode(spec, v);
            let sent = decode(&bytes, v.len());
            (bytes, sent)
        })
    }

    /// [`ErrorFeedback::encode`] part by part: the bytes are in the [`encode_parts`] format.
    pub fn encode_parts(
        &mut self,
        spec: &CodecSpec,
        update: &[f32],
        parts: &[usize],
    ) -> (Vec<u8>, Vec<f32>) {
        self.encode_with(update, |v| {
            let bytes = encode_parts(spec, v, parts);
            let sent = decode_parts(&bytes, parts);
            (bytes, sent)
        })
    }

    fn encode_with(
        &mut self,
        update: &[f32],
        codec: impl FnOnce(&[f32]) -> (Vec<u8>, Result<Vec<f32>, CodecError>),
    ) -> (Vec<u8>, Vec<f32>) {
        if self.residual.len() != update.len() {
            self.residual = vec![0.0; update.len()];
        }
        let corrected: Vec<f32> = update
            .iter()
            .zip(&self.residual)
            .map(|(u, r)| u + r)
            .collect();
        match codec(&corrected) {
            (bytes, Ok(sent)) => {
                for ((r, c), s) in self.residual.iter_mut().zip(&corrected).zip(&sent) {
                    *r = c - s;
                }
                (bytes, sent)
            }
            // A non-finite update (training diverged): it goes out as it is, for the receiver
            // to reject, and the residual restarts rather than carry the poison forward.
            (bytes, Err(_)) => {
                self.residual.iter_mut().for_each(|r| *r = 0.0);
                (bytes, corrected)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32 * 0.01).collect()
    }

    fn all_specs() -> Vec<CodecSpec> {
        [
            "fp32",
            "fp16",
            "bf16",
            "int8",
            "int8/64",
            "topk0.01+fp32",
            "topk0.1+int8",
            "topk0.05+bf16",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
    }

    #[test]
    fn names_round_trip_and_bad_names_are_explained() {
        for spec in all_specs() {
            assert_eq!(spec.to_string().parse::<CodecSpec>().unwrap(), spec);
        }
        for bad in [
            "",
            "int4",
            "topk+int8",
            "topk2+int8",
            "int8/0",
            "topk0+fp16",
        ] {
            let err = bad.parse::<CodecSpec>().unwrap_err().to_string();
            assert!(err.contains("topk0.01+int8"), "{err}");
        }
    }

    #[test]
    fn fp32_is_exact_and_half_floats_are_close() {
        let v = gaussian(1000, 1);
        assert_eq!(decode(&encode(&CodecSpec::FP32, &v), 1000).unwrap(), v);
        for (name, rel) in [("fp16", 1e-3), ("bf16", 8e-3)] {
            let spec: CodecSpec = name.parse().unwrap();
            let bytes = encode(&spec, &v);
            assert_eq!(bytes.len(), HEADER + 2000);
            for (a, b) in v.iter().zip(decode(&bytes, 1000).unwrap()) {
                assert!((a - b).abs() <= rel * a.abs() + 1e-7, "{name}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn int8_error_is_within_half_a_step_of_each_blocks_scale() {
        let mut v = gaussian(1000, 2);
        v[10] = 0.5; // one outlier: only its block's resolution suffers
        let spec: CodecSpec = "int8/100".parse().unwrap();
        let out = decode(&encode(&spec, &v), 1000).unwrap();
        for (block, (a, b)) in v.chunks(100).zip(out.chunks(100)).enumerate() {
            let step = a.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= step * 0.5 + 1e-9,
                    "block {block}: {x} vs {y}"
                );
            }
            if block > 0 {
                assert!(step < 0.001, "outlier leaked into block {block}");
            }
        }
    }

    #[test]
    fn top_k_keeps_exactly_k_of_the_largest() {
        let v = gaussian(10_000, 3);
        let spec: CodecSpec = "topk0.01+fp32".parse().unwrap();
        let out = decode(&encode(&spec, &v), v.len()).unwrap();
        let kept: Vec<usize> = (0..v.len()).filter(|&i| out[i] != 0.0).collect();
        assert_eq!(kept.len(), 100);
        let smallest_kept = kept.iter().map(|&i| v[i].abs()).fold(f32::MAX, f32::min);
        let largest_dropped = (0..v.len())
            .filter(|i| out[*i] == 0.0)
            .map(|i| v[i].abs())
            .fold(0.0, f32::max);
        assert!(smallest_kept >= largest_dropped);
        for &i in &kept {
            assert_eq!(out[i], v[i]);
        }
        // Ties (all equal) still keep exactly k.
        assert_eq!(top_k_indices(&[1.0; 50], 7).len(), 7);
    }

    #[test]
    fn error_feedback_makes_the_sent_sum_track_the_true_sum() {
        let spec: CodecSpec = "topk0.01+int8".parse().unwrap();
        let mut ef = ErrorFeedback::new();
        let n = 2000;
        let mut true_sum = vec![0.0f64; n];
        let mut sent_sum = vec![0.0f64; n];
        let mut gaps = Vec::new();
        for round in 0..400u64 {
            // A consistent drift plus noise, as pseudo-gradients are.
            let noise = gaussian(n, 100 + round);
            let update: Vec<f32> = noise
                .iter()
                .enumerate()
                .map(|(i, z)| z + 0.001 * ((i % 7) as f32 - 3.0))
                .collect();
            let (_, sent) = ef.encode(&spec, &update);
            for i in 0..n {
                true_sum[i] += update[i] as f64;
                sent_sum[i] += sent[i] as f64;
            }
            let gap: f64 = true_sum
                .iter()
                .zip(&sent_sum)
                .map(|(t, s)| (t - s).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = true_sum.iter().map(|t| t * t).sum::<f64>().sqrt();
            gaps.push(gap / norm);
            // The gap is exactly the residual: nothing is lost, only delayed.
            let r: f64 = ef
                .residual()
                .iter()
                .map(|r| (*r as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((r - gap).abs() <= 1e-3 * norm.max(1.0), "{r} vs {gap}");
        }
        // Relative gap shrinks as the sums grow (the residual stays bounded).
        assert!(gaps[399] < 0.5 * gaps[20], "{} vs {}", gaps[399], gaps[20]);
        assert!(gaps[399] < 0.15, "{}", gaps[399]);

        // Without feedback, top-k alone loses most of the sum for good.
        let mut lost_sum = vec![0.0f64; n];
        for round in 0..50u64 {
            let u = gaussian(n, 100 + round);
            let sent = decode(&encode(&spec, &u), n).unwrap();
            for i in 0..n {
                lost_sum[i] += (u[i] - sent[i]) as f64;
            }
        }
        assert!(lost_sum.iter().map(|x| x * x).sum::<f64>() > 0.0);
    }

    #[test]
    fn compressed_sizes_are_what_the_format_says() {
        let v = gaussian(100_000, 4);
        let dense = encode(&CodecSpec::FP32, &v).len();
        let sparse = encode(&"topk0.01+int8".parse().unwrap(), &v).len();
        // 1000 values: about 1-2 bytes of index gap + 1 byte + 4 scale bytes per 256.
        assert!(sparse < 3200, "{sparse}");
        assert!(dense / sparse > 120, "{dense} / {sparse}");
    }

    #[test]
    fn error_feedback_passes_poison_on_without_keeping_it() {
        let mut ef = ErrorFeedback::new();
        let spec: CodecSpec = "topk0.1+int8".parse().unwrap();
        let mut v = gaussian(100, 8);
        v[0] = f32::NAN;
        let (bytes, _) = ef.encode(&spec, &v);
        assert!(decode(&bytes, 100).is_err());
        assert!(ef.residual().iter().all(|r| *r == 0.0));
    }

    #[test]
    fn poisoned_updates_stay_poisoned() {
        let mut v = gaussian(1000, 5);
        v[3] = f32::NAN;
        for spec in all_specs() {
            match decode(&encode(&spec, &v), 1000) {
                Ok(out) => assert!(out.iter().any(|x| !x.is_finite()), "{spec} hid a NaN"),
                Err(CodecError::Body(_)) => {} // int8: NaN scale refused at decode
                Err(e) => panic!("{spec}: {e}"),
            }
        }
    }

    #[test]
    fn wrong_lengths_and_headers_are_refused() {
        let v = gaussian(100, 6);
        let bytes = encode(&"topk0.1+int8".parse().unwrap(), &v);
        assert_eq!(
            decode(&bytes, 99).unwrap_err(),
            CodecError::Length { want: 99, got: 100 }
        );
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], 100),
            Err(CodecError::Body(_))
        ));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(decode(&extra, 100), Err(CodecError::Body(_))));
        assert!(matches!(decode(b"nope", 100), Err(CodecError::Header(_))));
    }

    #[test]
    fn parts_are_sparsified_separately() {
        let mut v = gaussian(2000, 9);
        // The second part is 1000x smaller: a joint top-k would never pick it.
        for x in &mut v[1000..] {
            *x *= 1e-3;
        }
        let spec: CodecSpec = "topk0.1+fp32".parse().unwrap();
        let out = decode_parts(&encode_parts(&spec, &v, &[1000, 1000]), &[1000, 1000]).unwrap();
        assert_eq!(out[..1000].iter().filter(|x| **x != 0.0).count(), 100);
        assert_eq!(out[1000..].iter().filter(|x| **x != 0.0).count(), 100);
        let bytes = encode_parts(&spec, &v, &[1000, 1000]);
        assert!(decode_parts(&bytes, &[1000, 999]).is_err());
        assert!(decode_parts(&bytes, &[2000]).is_err());
        assert!(decode_parts(&bytes[..bytes.len() - 3], &[1000, 1000]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_as_parts(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_parts(&bytes, &[10, 20]);
        }

        #[test]
        fn every_codec_round_trips_within_its_bound(
            v in prop::collection::vec(-10.0f32..10.0, 1..600),
            which in 0usize..8,
        ) {
            let spec = all_specs()[which];
            let out = decode(&encode(&spec, &v), v.len()).unwrap();
            prop_assert_eq!(out.len(), v.len());
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (a, b) in v.iter().zip(&out) {
                if *b != 0.0 || spec.topk.is_none() {
                    prop_assert!((a - b).abs() <= max / 100.0 + 1e-6, "{} {} {}", spec, a, b);
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), want in 0usize..64) {
            let _ = decode(&bytes, want);
        }

        #[test]
        fn mutated_updates_never_panic(flip in 0usize..400, bit in 0u8..8, which in 0usize..8) {
            let v = gaussian(300, 7);
            let mut bytes = encode(&all_specs()[which], &v);
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            let _ = decode(&bytes, 300);
        }
    }
}
