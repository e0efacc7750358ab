//! Checkpoints: safetensors files with human-readable tensor names and the config as metadata.
//!
//! Tensor names are the flat view's dotted paths: the trainable model as `encoder.*` and
//! `predictor.*`, the EMA target encoder as `target_encoder.*` (same names as `encoder.*`).
//! Values are little-endian `f32` in the flat view's shapes. The safetensors metadata holds
//! `amity.config` (the run's [`Config`] as JSON) plus free-form `amity.*` entries (round,
//! samples seen, ...). Loading checks every tensor's presence, dtype and shape against the
//! config and names the first that does not match.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::Device;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::Config;
use crate::model::flat::ParamLayout;
use crate::model::{Encoder, Jepa};

/// Prefix of the target encoder's tensors.
pub const TARGET_PREFIX: &str = "target_encoder.";
/// Metadata key of the config.
pub const CONFIG_KEY: &str = "amity.config";

/// Errors reading or writing checkpoints; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Filesystem error.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid safetensors file.
    #[error("checkpoint {path} is not a valid safetensors file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The config metadata is missing or invalid.
    #[error("checkpoint {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A tensor is missing, extra, or of the wrong dtype or shape for the config.
    #[error("checkpoint {path} does not match its config: tensor `{tensor}` {reason}")]
    Mismatch {
        /// The file.
        path: String,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
}

/// A model at a point of training: config, trainable parameters, EMA target.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The run's config (model shape and recipe).
    pub config: Config,
    /// Encoder + predictor, [`Jepa`] flat layout.
    pub model: Vec<f32>,
    /// EMA target encoder, [`Encoder`] flat layout.
    pub target: Vec<f32>,
    /// Extra metadata (`amity.` is prefixed on disk).
    pub meta: BTreeMap<String, String>,
}

/// The layouts of a config's model and target encoder (no weights are allocated: burn
/// parameters are initialised lazily).
pub fn layouts(config: &Config) -> (ParamLayout, ParamLayout) {
    let device = Device::flex();
    (
        ParamLayout::of(&Jepa::new(&config.model, &device)),
        ParamLayout::of(&Encoder::new(&config.model, &device)),
    )
}

impl Checkpoint {
    /// Serialises to safetensors bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        Checkpoint::bytes_of(&self.config, &self.model, &self.target, &self.meta)
    }

    /// The bytes [`Checkpoint::to_bytes`] writes for a checkpoint of these parts, without
    /// gathering them into a `Checkpoint` first: the tensors are viewed in place (on a
    /// little-endian machine, where an `f32` slice already is its safetensors bytes), so the
    /// only model-sized buffer is the result.
    pub fn bytes_of(
        config: &Config,
        model: &[f32],
        target: &[f32],
        meta: &BTreeMap<String, String>,
    ) -> Vec<u8> {
        let (model_layout, target_layout) = layouts(config);
        let mut tensors: Vec<(String, Vec<usize>, Cow<'_, [u8]>)> = Vec::new();
        for (layout, values, prefix) in [
            (&model_layout, model, ""),
            (&target_layout, target, TARGET_PREFIX),
        ] {
            for p in &layout.params {
                let slice = &values[p.offset..p.offset + p.len()];
                tensors.push((
                    format!("{prefix}{}", p.name),
                    p.shape.clone(),
                    le_bytes(slice),
                ));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, shape, raw)| {
                let view = TensorView::new(Dtype::F32, shape.clone(), raw)
                    .expect("shape and byte length agree by construction");
                (name.clone(), view)
            })
            .collect();
        let mut meta: BTreeMap<String, String> = meta
            .iter()
            .map(|(k, v)| (format!("amity.{k}"), v.clone()))
            .collect();
        meta.insert(
            CONFIG_KEY.into(),
            serde_json::to_string(config).expect("a Config always serialises"),
        );
        let hashed: HashMap<String, String> = meta.clone().into_iter().collect();
        let bytes = safetensors::serialize(views, Some(hashed)).expect("in-memory serialisation");
        canonical_metadata(bytes, &meta)
    }

    /// Writes the checkpoint to `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("safetensors.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&self.to_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and validates a checkpoint file.
    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses and validates checkpoint bytes; `origin` names them in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Checkpoint, CheckpointError> {
        let path = origin.to_owned();
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let meta_map = header.metadata().clone().unwrap_or_default();
        let config_json = meta_map
            .get(CONFIG_KEY)
            .ok_or_else(|| CheckpointError::Config {
                path: path.clone(),
                reason: format!("metadata has no `{CONFIG_KEY}`"),
            })?;
        let config: Config =
            serde_json::from_str(config_json).map_err(|e| CheckpointError::Config {
                path: path.clone(),
                reason: format!("invalid `{CONFIG_KEY}`: {e}"),
            })?;
        config.validate().map_err(|e| CheckpointError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let (model_layout, target_layout) = layouts(&config);
        let mismatch = |tensor: &str, reason: String| CheckpointError::Mismatch {
            path: path.clone(),
            tensor: tensor.to_owned(),
            reason,
        };
        let read = |layout: &ParamLayout, prefix: &str| -> Result<Vec<f32>, CheckpointError> {
            let mut flat = Vec::with_capacity(layout.total);
            for p in &layout.params {
                let name = format!("{prefix}{}", p.name);
                let view = tensors
                    .tensor(&name)
                    .map_err(|_| mismatch(&name, "is missing".into()))?;
                if view.dtype() != Dtype::F32 {
                    return Err(mismatch(
                        &name,
                        format!("has dtype {:?}, expected F32", view.dtype()),
                    ));
                }
                if view.shape() != p.shape.as_slice() {
                    return Err(mismatch(
                        &name,
                        format!(
                            "has shape {:?}, the config needs {:?}",
                            view.shape(),
                            p.shape
                        ),
                    ));
                }
                flat.extend(
                    view.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            Ok(flat)
        };
        let model = read(&model_layout, "")?;
        let target = read(&target_layout, TARGET_PREFIX)?;
        let expected = model_layout.params.len() + target_layout.params.len();
        if tensors.len() != expected {
            let known: std::collections::HashSet<String> = model_layout
                .params
                .iter()
                .map(|p| p.name.clone())
                .chain(
                    target_layout
                        .params
                        .iter()
                        .map(|p| format!("{TARGET_PREFIX}{}", p.name)),
                )
                .collect();
            let extra = tensors
                .names()
                .into_iter()
                .find(|n| !known.contains(*n))
                .map(str::to_owned)
                .unwrap_or_default();
            return Err(mismatch(&extra, "is not part of this model".into()));
        }
        let meta = meta_map
            .iter()
            .filter(|(k, _)| k.as_str() != CONFIG_KEY)
            .filter_map(|(k, v)| k.strip_prefix("amity.").map(|k| (k.to_owned(), v.clone())))
            .collect();
        Ok(Checkpoint {
            config,
            model,
            target,
            meta,
        })
    }
}

/// safetensors writes its metadata map in hash-map order, so one checkpoint could get different
/// bytes, and a different content id, from one serialisation to the next (two replicas of a
/// coordinator, or one restarted, would disagree on a state's blob id). The map is rewritten in
/// key order: the same length and meaning, one byte sequence.
/// `values` as little-endian bytes: borrowed where that is how they lie in memory.
fn le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

fn canonical_metadata(mut bytes: Vec<u8>, meta: &BTreeMap<String, String>) -> Vec<u8> {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let canon = serde_json::to_vec(meta).expect("strings serialise");
    let start = 8 + PREFIX.len();
    let end = start + canon.len();
    if bytes.len() >= end && bytes[8..start] == *PREFIX {
        let written: Option<BTreeMap<String, String>> =
            serde_json::from_slice(&bytes[start..end]).ok();
        if written.as_ref() == Some(meta) {
            bytes[start..end].copy_from_slice(&canon);
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ClipBatch;
    use crate::train::Trainer;

    fn tiny_trainer() -> Trainer {
        Trainer::new(Config::preset("tiny").unwrap(), &Device::flex())
    }

    fn checkpoint_of(t: &Trainer) -> Checkpoint {
        Checkpoint {
            config: t.config().clone(),
            model: t.model_flat(),
            target: t.target_flat(),
            meta: BTreeMap::from([("round".to_owned(), "3".to_owned())]),
        }
    }

    /// A checkpoint's bytes, and so its content id, do not depend on hash-map order.
    #[test]
    fn a_checkpoint_serialises_to_one_byte_sequence() {
        let mut c = checkpoint_of(&tiny_trainer());
        for k in ["params", "provenance", "corpus", "a", "z"] {
            c.meta.insert(k.to_owned(), format!("value of {k}"));
        }
        let first = c.to_bytes();
        assert!((0..20).all(|_| c.to_bytes() == first));
        let back = Checkpoint::from_bytes(&first, "test").unwrap();
        assert_eq!(back.meta, c.meta);
    }

    #[test]
    fn round_trip_gives_bit_identical_outputs() {
        let t = tiny_trainer();
        let ckpt = checkpoint_of(&t);
        let dir = std::env::temp_dir().join(format!("amity-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        ckpt.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, ckpt);
        let restored = Trainer::from_flat(
            back.config.clone(),
            &back.model,
            Some(&back.target),
            &Device::flex(),
        )
        .unwrap();
        let video =
            crate::data::synth::generate(&crate::data::synth::SynthConfig::for_size(32, 8), 1);
        let batch = ClipBatch::from_clips([video.pixels.as_slice()], &ckpt.config.model);
        assert_eq!(t.pooled_features(&batch), restored.pooled_features(&batch));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mismatching_tensor_is_named() {
        let t = tiny_trainer();
        let ckpt = checkpoint_of(&t);
        // Same tensors, but a config with a narrower MLP: fc1 no longer fits.
        let mut config = ckpt.config.clone();
        config.model.mlp_ratio = 2;
        let bytes = ckpt.to_bytes();
        let json = serde_json::to_string(&config).unwrap();
        // Re-serialise the original tensors under the altered config.
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let views: Vec<(String, TensorView<'_>)> = tensors.tensors().into_iter().collect();
        let meta = HashMap::from([(CONFIG_KEY.to_owned(), json)]);
        let altered = safetensors::serialize(views, Some(meta)).unwrap();
        let err = Checkpoint::from_bytes(&altered, "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("encoder.blocks.0.fc1.weight"), "{err}");
        assert!(err.contains("x.safetensors"), "{err}");
        let err = Checkpoint::from_bytes(b"garbage", "y.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("y.safetensors"), "{err}");
    }
}
