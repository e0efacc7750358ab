//! The one configuration type of a JEPA run: model shape and training recipe, with presets.
//!
//! Configs are TOML on disk (`Config::from_toml_file`) and JSON inside checkpoints. A run is
//! reproducible from its config: every random choice draws from `train.seed`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Reads TOML file `path` as a `T`, naming the file in any error: the one way Amity reads a
/// config file (the run config, `coordinator.toml`, `worker.toml`).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        source: Box::new(e),
    })
}

/// Takes each relative path in `paths` from the folder of config file `file`.
pub fn relative_to<'a>(file: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    let base = file.parent().unwrap_or(Path::new("."));
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// Errors loading or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The preset name is not known.
    #[error("unknown preset `{0}`; presets: tiny, small, vit-l")]
    UnknownPreset(String),
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this type.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and column.
        source: Box<toml::de::Error>,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Shape of the V-JEPA encoder and predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Frames per clip.
    pub frames: usize,
    /// Clip side in pixels (clips are square, RGB).
    pub image_size: usize,
    /// Tubelet length in frames.
    pub tubelet: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Encoder width.
    pub width: usize,
    /// Encoder blocks.
    pub depth: usize,
    /// Encoder attention heads.
    pub heads: usize,
    /// MLP hidden width as a multiple of the block width.
    pub mlp_ratio: usize,
    /// Predictor width.
    pub pred_width: usize,
    /// Predictor blocks.
    pub pred_depth: usize,
    /// Predictor attention heads.
    pub pred_heads: usize,
}

impl ModelConfig {
    /// The token grid of one clip.
    pub fn grid(&self) -> TokenGrid {
        TokenGrid {
            frames: self.frames / self.tubelet,
            height: self.image_size / self.patch,
            width: self.image_size / self.patch,
        }
    }

    /// Tokens per clip.
    pub fn tokens(&self) -> usize {
        self.grid().len()
    }

    /// Values in one flattened tubelet patch: `3 * tubelet * patch * patch`.
    pub fn patch_dim(&self) -> usize {
        3 * self.tubelet * self.patch * self.patch
    }

    /// Checks divisibility and head splits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.frames == 0 || self.tubelet == 0 || !self.frames.is_multiple_of(self.tubelet) {
            return bad(format!(
                "frames ({}) must be a positive multiple of tubelet ({})",
                self.frames, self.tubelet
            ));
        }
        if self.patch == 0 || self.image_size == 0 || !self.image_size.is_multiple_of(self.patch) {
            return bad(format!(
                "image_size ({}) must be a positive multiple of patch ({})",
                self.image_size, self.patch
            ));
        }
        for (what, width, heads) in [
            ("encoder", self.width, self.heads),
            ("predictor", self.pred_width, self.pred_heads),
        ] {
            if heads == 0 || width == 0 || width % heads != 0 {
                return bad(format!(
                    "{what} width ({width}) must be a positive multiple of its heads ({heads})"
                ));
            }
        }
        if self.depth == 0 || self.pred_depth == 0 || self.mlp_ratio == 0 {
            return bad("depths and mlp_ratio must be positive".into());
        }
        Ok(())
    }
}

/// What keeps the representation from collapsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// V-JEPA: predict an EMA target encoder's layer-normed features (L1).
    Ema,
    /// Predict the online encoder's own (stop-gradient) features, regularised by VICReg on the
    /// pooled context features of two masked views. No EMA.
    Vicreg,
    /// LeJEPA: predict the online encoder's own features (no teacher, no stop-gradient),
    /// regularised by SIGReg, which pushes the pooled context embeddings of every mask set
    /// towards an isotropic Gaussian. No EMA, so nothing for a federation to keep in sync.
    Sigreg,
}

/// The training recipe: optimiser, schedules, EMA, masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Anti-collapse objective.
    pub objective: Objective,
    /// Clips per step.
    pub batch: usize,
    /// Total optimiser steps the schedules are laid out over.
    pub steps: u64,
    /// Learning rate at the start of warm-up.
    pub start_lr: f64,
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub final_lr: f64,
    /// Warm-up steps (linear).
    pub warmup: u64,
    /// Weight decay at the start (cosine schedule to `weight_decay_end`).
    pub weight_decay: f64,
    /// Weight decay at the end.
    pub weight_decay_end: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip_grad: f64,
    /// EMA momentum at step 0, ramped linearly towards `ema_end` (V-JEPA: 0.998 -> 1.0).
    pub ema_start: f64,
    /// EMA momentum at `schedule_stretch` times the run, so never quite reached.
    pub ema_end: f64,
    /// The learning-rate, weight-decay and EMA schedules are laid out over this many times the
    /// run (V-JEPA's `ipe_scale`, 1.25), so the run ends before the learning rate bottoms out
    /// and before the EMA momentum reaches `ema_end` (at 1.0 the target would stop following
    /// the encoder). 1.0 ends every schedule exactly at the last step.
    #[serde(default = "default_schedule_stretch")]
    pub schedule_stretch: f64,
    /// The mask sets, one predictor pass each.
    pub masks: Vec<MaskSetConfig>,
    /// VICReg weights (invariance, variance, covariance); used by the `vicreg` objective.
    pub vicreg: [f64; 3],
    /// SIGReg's weight λ in `(1 - λ) · prediction + λ · SIGReg` and its number of random
    /// slices per step; used by the `sigreg` objective (LeJEPA: λ = 0.05).
    #[serde(default = "default_sigreg")]
    pub sigreg: (f64, usize),
    /// Seed of every random choice of the run.
    pub seed: u64,
}

fn default_sigreg() -> (f64, usize) {
    (0.05, 64)
}

fn default_schedule_stretch() -> f64 {
    1.25
}

impl TrainConfig {
    /// V-JEPA's recipe scaled to a short run of `steps`.
    pub fn vjepa(steps: u64, batch: usize) -> Self {
        TrainConfig {
            objective: Objective::Ema,
            batch,
            steps,
            start_lr: 2e-4,
            lr: 6.25e-4,
            final_lr: 1e-6,
            warmup: (steps / 12).max(1),
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad: 10.0,
            ema_start: 0.998,
            ema_end: 1.0,
            schedule_stretch: default_schedule_stretch(),
            masks: vec![MaskSetConfig::short_range(), MaskSetConfig::long_range()],
            vicreg: [25.0, 25.0, 1.0],
            sigreg: default_sigreg(),
            seed: 0,
        }
    }
}

/// How videos become clips: the frame rate every source is resampled to, and how clips are cut.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Frames per second every video is resampled to before clips are cut.
    pub fps: f64,
    /// Distance between consecutive clip frames, in resampled frames (V-JEPA: 4 at 30 fps).
    pub frame_step: usize,
    /// Clips cut from each video (fewer when it is short).
    pub clips_per_video: usize,
    /// Frames decoded per video at most (bounds ingest memory; later frames are not used).
    pub max_frames: usize,
}

impl Default for DataConfig {
    /// The CPU presets' sampling: 10 fps, consecutive frames, 4 clips per video.
    fn default() -> Self {
        DataConfig {
            fps: 10.0,
            frame_step: 1,
            clips_per_video: 4,
            max_frames: 3000,
        }
    }
}

impl DataConfig {
    /// V-JEPA's sampling: 30 fps, every 4th frame.
    pub fn vjepa() -> Self {
        DataConfig {
            fps: 30.0,
            frame_step: 4,
            clips_per_video: 8,
            max_frames: 9000,
        }
    }
}

/// A whole run: model and recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The preset this config started from (informational).
    pub preset: String,
    /// Model shape.
    pub model: ModelConfig,
    /// Training recipe.
    pub train: TrainConfig,
    /// Video sampling (absent in older config files: the CPU presets' default).
    #[serde(default)]
    pub data: DataConfig,
}

impl Config {
    /// A named preset: `tiny` (CPU), `small`, `vit-l` (the paper's ViT-L/16).
    pub fn preset(name: &str) -> Result<Config, ConfigError> {
        let model = match name {
            "tiny" => ModelConfig {
                frames: 8,
                image_size: 32,
                tubelet: 2,
                patch: 8,
                width: 64,
                depth: 4,
                heads: 4,
                mlp_ratio: 4,
                pred_width: 32,
                pred_depth: 2,
                pred_heads: 4,
            },
            "small" => ModelConfig {
                frames: 8,
                image_size: 64,
                tubelet: 2,
                patch: 8,
                width: 192,
                depth: 6,
                heads: 3,
                mlp_ratio: 4,
                pred_width: 96,
                pred_depth: 4,
                pred_heads: 3,
            },
            "vit-l" => ModelConfig {
                frames: 16,
                image_size: 224,
                tubelet: 2,
                patch: 16,
                width: 1024,
                depth: 24,
                heads: 16,
                mlp_ratio: 4,
                pred_width: 384,
                pred_depth: 12,
                pred_heads: 12,
            },
            other => return Err(ConfigError::UnknownPreset(other.to_owned())),
        };
        let train = match name {
            // Short CPU runs need a faster EMA than the paper's 0.998 (0.99 collapsed in our
            // measurements; 0.996 did not) and a higher peak learning rate.
            "tiny" => TrainConfig {
                ema_start: 0.996,
                lr: 1e-3,
                warmup: 100,
                ..TrainConfig::vjepa(2000, 32)
            },
            "small" => TrainConfig::vjepa(20_000, 32),
            _ => TrainConfig::vjepa(90_000, 3072),
        };
        let data = match name {
            "vit-l" => DataConfig::vjepa(),
            _ => DataConfig::default(),
        };
        Ok(Config {
            preset: name.to_owned(),
            model,
            train,
            data,
        })
    }

    /// Reads a TOML config, naming the file in every error.
    pub fn from_toml_file(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = read_toml(path)?;
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serialises")
    }

    /// Checks the model shape and the recipe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        let t = &self.train;
        if t.batch == 0 || t.steps == 0 {
            return Err(ConfigError::Invalid(
                "batch and steps must be positive".into(),
            ));
        }
        if t.masks.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one mask set is needed".into(),
            ));
        }
        let d = &self.data;
        if !(d.fps.is_finite() && d.fps > 0.0) || d.frame_step == 0 || d.max_frames == 0 {
            return Err(ConfigError::Invalid(
                "data: fps, frame_step and max_frames must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&t.ema_start) || !(0.0..=1.0).contains(&t.ema_end) {
            return Err(ConfigError::Invalid(
                "EMA momenta must lie in [0, 1]".into(),
            ));
        }
        if !(0.0..1.0).contains(&t.sigreg.0) || t.sigreg.1 == 0 {
            return Err(ConfigError::Invalid(format!(
                "train.sigreg is {:?}: the weight must lie in [0, 1) and the slices be positive",
                t.sigreg
            )));
        }
        if !(t.schedule_stretch.is_finite() && t.schedule_stretch >= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "train.schedule_stretch is {}: it must be at least 1 (1.25 in V-JEPA)",
                t.schedule_stretch
            )));
        }
        Ok(())
    }
}

/// The token grid of a clip: `frames` tubelets in time, `height x width` patches in space.
/// Token index = `(t * height + h) * width + w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrid {
    /// Number of tubelets along time (clip frames / tubelet length).
    pub frames: usize,
    /// Patches along the height.
    pub height: usize,
    /// Patches along the width.
    pub width: usize,
}

impl TokenGrid {
    /// Total number of tokens.
    pub fn len(&self) -> usize {
        self.frames * self.height * self.width
    }

    /// Whether the grid has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One mask set: how many blocks and how large. Defaults are V-JEPA's short-range set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskSetConfig {
    /// Blocks whose union is the target.
    pub num_blocks: usize,
    /// Fraction of the spatial grid one block covers, sampled uniformly in this range.
    pub spatial_scale: (f64, f64),
    /// Fraction of the tubelets one block spans, sampled uniformly in this range (1.0 = tube).
    pub temporal_scale: (f64, f64),
    /// Block aspect ratio (height / width), sampled uniformly in this range.
    pub aspect_ratio: (f64, f64),
}

impl MaskSetConfig {
    /// V-JEPA's short-range set: 8 tube blocks at spatial scale 0.15.
    pub fn short_range() -> Self {
        MaskSetConfig {
            num_blocks: 8,
            spatial_scale: (0.15, 0.15),
            temporal_scale: (1.0, 1.0),
            aspect_ratio: (0.75, 1.5),
        }
    }

    /// V-JEPA's long-range set: 2 tube blocks at spatial scale 0.7.
    pub fn long_range() -> Self {
        MaskSetConfig {
            num_blocks: 2,
            spatial_scale: (0.7, 0.7),
            temporal_scale: (1.0, 1.0),
            aspect_ratio: (0.75, 1.5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_token_counts() {
        assert_eq!(Config::preset("tiny").unwrap().model.tokens(), 64);
        assert_eq!(Config::preset("small").unwrap().model.tokens(), 256);
        assert_eq!(Config::preset("vit-l").unwrap().model.tokens(), 1568);
        for p in ["tiny", "small", "vit-l"] {
            Config::preset(p).unwrap().validate().unwrap();
        }
        assert!(Config::preset("huge").is_err());
    }

    #[test]
    fn toml_round_trip_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("amity-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        let config = Config::preset("tiny").unwrap();
        std::fs::write(&path, config.to_toml()).unwrap();
        assert_eq!(Config::from_toml_file(&path).unwrap(), config);

        std::fs::write(&path, "preset = 3").unwrap();
        let err = Config::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains("run.toml"), "{err}");

        let mut bad = config.clone();
        bad.model.heads = 3;
        std::fs::write(&path, bad.to_toml()).unwrap();
        let err = Config::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains("multiple of its heads"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
