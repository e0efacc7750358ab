//! The world model: a frozen encoder, an action-conditioned predictor trained on its latents,
//! and a position probe (fitted once on the latents, then frozen) for guardrails.
//!
//! Files: [`encode`] (frames → latents), [`predictor`] (the model), [`data`] (trajectories),
//! [`train`] (the training loop), [`subgoal`] (the learnt high level for tasks that move an
//! object), and here the config, the assembled model and its file.

pub mod data;
pub mod encode;
pub mod predictor;
pub mod subgoal;
pub mod train;

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use amity_shared::checkpoint::Checkpoint;
use amity_shared::eval::Ridge;
use amity_shared::model::flat::{ParamLayout, load_flat, to_flat};

use crate::PlannerError;
use crate::env::ARENA;
use data::{Latents, Trajectory};
use encode::FrameEncoder;
use predictor::ActionPredictor;
use subgoal::{SubgoalConfig, SubgoalModel, SubgoalReport};

/// The predictor's shape and training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldModelConfig {
    /// Predictor width.
    pub width: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width as a multiple of `width`.
    pub mlp_ratio: usize,
    /// Longest sequence of time steps the predictor accepts (its time embedding's length).
    pub max_steps: usize,
    /// Time steps of history the planner feeds back while rolling out (cost grows with it).
    pub rollout_history: usize,
    /// Environment steps per predictor time step (DINO-WM's frameskip): the predictor sees
    /// every `frameskip`-th frame and, as its action, the `frameskip` actions in between
    /// concatenated; the planner holds each planned action that long. A plan of `horizon`
    /// steps then looks `horizon * frameskip` actions ahead for the cost of `horizon`.
    #[serde(default = "one")]
    pub frameskip: usize,
    /// Time steps per training window (teacher forcing over all of them).
    pub window: usize,
    /// Steps of the autoregressive rollout in the training loss (V-JEPA 2-AC: 2), each
    /// prediction fed back as the next input; the window grows to hold them. Longer rollouts
    /// train the predictor on its own outputs as far as the planner feeds them back. Measured
    /// on PushBlock (800 steps): 5 instead of 2 left the open-loop drift over 5 steps as it was
    /// (agent 0.46 -> 2.00 arena units, block 0.19 -> 0.48) at twice the training time. On
    /// PointMaze (`amity bench plan --rollout-steps 6`, 20 episodes) it left latent success
    /// within noise (0.25 against 0.20) and the predicted energies' Spearman with the true
    /// distance fell from 0.18 to -0.19.
    #[serde(default = "two")]
    pub rollout_steps: usize,
    /// Optimiser steps.
    pub steps: u64,
    /// Windows per step.
    pub batch: usize,
    /// Peak learning rate (AdamW, warm-up then cosine).
    pub lr: f64,
    /// Weight of the state-prediction loss.
    pub state_weight: f64,
    /// Weight of the read-out loss: the frozen position probes applied to the predicted latents
    /// against the true positions (see [`train::Readouts`]); 0 trains on latents alone.
    #[serde(default)]
    pub readout_weight: f64,
    /// How much more a read-out error counts where the position read changed over the step:
    /// weight `1 + min(change / 0.1 arena units, readout_motion)`, normalised over the batch.
    /// A pushed block is a few windows in a hundred, and a predictor that keeps every block
    /// still scores well without it; 0 weighs every window alike (files written before this
    /// existed).
    #[serde(default)]
    pub readout_motion: f64,
    /// Weight of the energy-consistency loss: at the rollout's last step, the planner's latent
    /// energy (L2 between token maps smoothed as [`crate::plan::LatentEnergy`]'s default) of
    /// the prediction to another window's real frame, against the same energy of the real
    /// frame, relative to the batch's mean energy. The L1 losses leave predictions off the
    /// encoder's manifold in ways the energy reads (stop 47 measured predicted energies that
    /// rank the action's size, not where it leads); this term trains the energy's own figure.
    /// Measured on PointMaze (`amity bench plan --energy-weight 1`, one encoder, 20 episodes):
    /// the predicted energies' Spearman with the true distance went 0.18 -> 0.68 (the encoder's
    /// own on reached frames: 0.70), per predictor step 0.23 -> 0.96 at the first and
    /// 0.18 -> 0.68 at the eighth. Latent-energy success went 0.20 -> 0.10 on 20 episodes and
    /// 0.10 -> 0.24 on 50 (one thread; a standard error of about 0.075 on the difference), far
    /// from the goal and on one encoder, so it stays off by default until more encoders and
    /// PushBlock are measured. 0 turns it off (files written before this existed).
    #[serde(default)]
    pub energy_weight: f64,
    /// Seed of initialisation and window sampling.
    pub seed: u64,
}

impl Default for WorldModelConfig {
    fn default() -> Self {
        WorldModelConfig {
            width: 64,
            depth: 3,
            heads: 4,
            mlp_ratio: 4,
            max_steps: 8,
            rollout_history: 2,
            frameskip: 3,
            window: 3,
            rollout_steps: 2,
            steps: 1500,
            batch: 32,
            lr: 1e-3,
            state_weight: 0.5,
            readout_weight: 1.0,
            readout_motion: 10.0,
            energy_weight: 0.0,
            seed: 0,
        }
    }
}

fn one() -> usize {
    1
}

fn two() -> usize {
    2
}

impl WorldModelConfig {
    /// Steps of history a rollout feeds back: `rollout_history`, within what the predictor's
    /// time embedding accepts.
    pub fn history(&self) -> usize {
        self.rollout_history.clamp(1, self.max_steps)
    }
}

/// Features the position probe reads: a frame's latents, flattened.
pub fn probe_features(z: &[f32]) -> Vec<f64> {
    z.iter().map(|&v| v as f64).collect()
}

/// Fits the position probe (latents → agent position in arena units / ARENA) on up to
/// `limit` frames; returns it and its R² on held-out frames.
pub fn fit_position_probe(lat: &Latents, agents: &[Vec<[f32; 2]>], limit: usize) -> (Ridge, f64) {
    let d = lat.tokens * lat.width;
    let mut rows: Vec<(usize, usize)> = Vec::new();
    for e in 0..lat.episodes {
        for t in 0..lat.frames {
            rows.push((e, t));
        }
    }
    let stride = (rows.len() / limit.max(1)).max(1);
    let picked: Vec<(usize, usize)> = rows.into_iter().step_by(stride).collect();
    let split = picked.len() * 4 / 5;
    let build = |set: &[(usize, usize)]| {
        let mut x = Vec::with_capacity(set.len() * d);
        let mut y = Vec::with_capacity(set.len() * 2);
        for &(e, t) in set {
            x.extend(probe_features(lat.frame(e, t)));
            y.extend(agents[e][t].iter().map(|v| (*v / ARENA) as f64));
        }
        (x, y)
    };
    let (xa, ya) = build(&picked[..split]);
    let (xb, yb) = build(&picked[split..]);
    let ridge = Ridge::fit(&xa, &ya, split, d, 2, 10.0);
    let pred = ridge.predict(&xb, picked.len() - split);
    let r2 = amity_shared::eval::r2(&pred, &yb, picked.len() - split);
    (ridge, r2)
}

/// Everything planning needs.
pub struct WorldModel {
    /// The frozen encoder.
    pub encoder: FrameEncoder,
    /// The predictor (inference).
    pub predictor: ActionPredictor,
    /// Latents → agent position / ARENA.
    pub probe: Ridge,
    /// Latents → the task object's position / ARENA, for environments with one
    /// ([`crate::env::Env::object`]).
    pub object_probe: Option<Ridge>,
    /// The learnt high level (where the agent should head to move the object towards a
    /// target), for environments with an object.
    pub subgoals: Option<SubgoalModel>,
    /// Its config.
    pub config: WorldModelConfig,
}

/// What [`WorldModel::fit`] measured.
#[derive(Debug, Clone)]
pub struct FitReport {
    /// Held-out R² of the agent-position probe.
    pub probe_r2: f64,
    /// The same for the object-position probe, when there is one.
    pub object_probe_r2: Option<f64>,
    /// The predictor's training.
    pub train: train::TrainReport,
    /// The subgoal proposer's training, when there is one.
    pub subgoal: Option<SubgoalReport>,
}

/// Metadata key of the world model's config.
const CONFIG_KEY: &str = "amity.world_model";
/// Metadata key of the subgoal proposer's config (absent: no proposer).
const SUBGOAL_KEY: &str = "amity.subgoal";

impl WorldModel {
    /// Builds a world model on the frozen `encoder` from trajectories: encodes them, fits the
    /// position probes (agent, and the task object when the trajectories record one) on up to
    /// `probe_frames` frames, then trains the predictor (`log` gets step, teacher-forcing and
    /// rollout losses) and, where there is an object, the subgoal proposer.
    pub fn fit(
        encoder: FrameEncoder,
        config: WorldModelConfig,
        trajs: &[Trajectory],
        probe_frames: usize,
        log: &mut dyn FnMut(u64, f64, f64),
    ) -> (WorldModel, FitReport) {
        let device = encoder.device();
        let lat = Latents::of(&encoder, trajs);
        let agents: Vec<Vec<[f32; 2]>> = trajs.iter().map(|t| t.agent.clone()).collect();
        let (probe, probe_r2) = fit_position_probe(&lat, &agents, probe_frames);
        let object_truth: Option<Vec<Vec<[f32; 2]>>> = trajs
            .iter()
            .all(|t| !t.object.is_empty())
            .then(|| trajs.iter().map(|t| t.object.clone()).collect());
        let objects = object_truth
            .as_ref()
            .map(|truth| fit_position_probe(&lat, truth, probe_frames));
        let mut read: Vec<(&Ridge, &[Vec<[f32; 2]>])> = vec![(&probe, &agents)];
        if let (Some((object_probe, _)), Some(truth)) = (&objects, &object_truth) {
            read.push((object_probe, truth));
        }
        let readouts = train::Readouts::new(&read);
        let (predictor, train) = train::train(&config, &lat, trajs, Some(&readouts), &device, log);
        let subgoal_config = SubgoalConfig {
            seed: config.seed,
            ..SubgoalConfig::default()
        };
        let subgoals = object_truth
            .is_some()
            .then(|| SubgoalModel::fit(trajs, subgoal_config, &device, &mut |_, _| {}))
            .flatten();
        let report = FitReport {
            probe_r2,
            object_probe_r2: objects.as_ref().map(|o| o.1),
            train,
            subgoal: subgoals.as_ref().map(|s| s.1.clone()),
        };
        let wm = WorldModel {
            encoder,
            predictor,
            probe,
            object_probe: objects.map(|o| o.0),
            subgoals: subgoals.map(|s| s.0),
            config,
        };
        (wm, report)
    }

    /// Where the position probe puts the agent (arena units) in each of the frames whose
    /// latents are `latents` (frames one after another, `tokens x width` each).
    pub fn probe_positions(&self, latents: &[f32]) -> Vec<[f32; 2]> {
        self.read_positions(&self.probe, latents)
    }

    /// Where the object probe puts the task's object (arena units) in each frame of
    /// `latents`, for a world model of an environment with one.
    pub fn object_positions(&self, latents: &[f32]) -> Option<Vec<[f32; 2]>> {
        let probe = self.object_probe.as_ref()?;
        Some(self.read_positions(probe, latents))
    }

    fn read_positions(&self, probe: &Ridge, latents: &[f32]) -> Vec<[f32; 2]> {
        let per_frame = self.encoder.tokens() * self.encoder.width();
        let n = latents.len() / per_frame.max(1);
        let feats: Vec<f64> = latents
            .chunks_exact(per_frame)
            .flat_map(probe_features)
            .collect();
        probe
            .predict(&feats, n)
            .chunks_exact(2)
            .map(|v| [v[0] as f32 * ARENA, v[1] as f32 * ARENA])
            .collect()
    }

    /// Writes the predictor, the probes and the subgoal proposer as safetensors (the encoder
    /// stays in its checkpoint).
    pub fn save(&self, path: &Path) -> Result<(), PlannerError> {
        let mut owned = module_tensors("predictor", &self.predictor);
        if let Some(s) = &self.subgoals {
            owned.extend(module_tensors("subgoal", &s.net));
        }
        let probes = std::iter::once(("probe", &self.probe))
            .chain(self.object_probe.as_ref().map(|p| ("object_probe", p)));
        for (prefix, probe) in probes {
            let (mean, scale, weights) = probe.parts();
            for (name, v) in [("mean", mean), ("scale", scale), ("weights", weights)] {
                let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                owned.push((format!("{prefix}.{name}"), vec![v.len()], raw));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, shape, raw)| {
                let dtype = if n.contains("probe.") {
                    Dtype::F64
                } else {
                    Dtype::F32
                };
                let view = TensorView::new(dtype, shape.clone(), raw)
                    .expect("shape and length agree by construction");
                (n.clone(), view)
            })
            .collect();
        let mut meta: HashMap<String, String> = [(
            CONFIG_KEY.to_owned(),
            serde_json::to_string(&self.config).expect("a config serialises"),
        )]
        .into();
        if let Some(s) = &self.subgoals {
            let config = serde_json::to_string(&s.config).expect("a config serialises");
            meta.insert(SUBGOAL_KEY.to_owned(), config);
        }
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| PlannerError::Invalid(e.to_string()))?;
        std::fs::write(path, bytes).map_err(PlannerError::io(path))
    }

    /// Loads a world model saved by [`WorldModel::save`] on top of the encoder of `ckpt`.
    pub fn load(path: &Path, ckpt: &Checkpoint, device: &Device) -> Result<Self, PlannerError> {
        let name = path.display().to_string();
        let bad = |r: String| PlannerError::Invalid(format!("{name}: {r}"));
        let bytes = std::fs::read(path).map_err(PlannerError::io(path))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let config: WorldModelConfig = meta
            .get(CONFIG_KEY)
            .ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata")))
            .and_then(|j| serde_json::from_str(j).map_err(|e| bad(e.to_string())))?;
        let subgoal_config: Option<SubgoalConfig> = meta
            .get(SUBGOAL_KEY)
            .map(|j| serde_json::from_str(j).map_err(|e| bad(format!("{SUBGOAL_KEY}: {e}"))))
            .transpose()?;
        if let Some(c) = &subgoal_config {
            c.check().map_err(bad)?;
        }
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let encoder = FrameEncoder::new(ckpt, device).map_err(|e| bad(e.to_string()))?;
        let shell = ActionPredictor::new(&config, encoder.tokens(), encoder.width(), device);
        let predictor = load_module(&tensors, "predictor", shell).map_err(bad)?;
        let subgoals = match subgoal_config {
            Some(config) => {
                let shell = subgoal::SubgoalNet::new(&config, device);
                let net = load_module(&tensors, "subgoal", shell).map_err(bad)?;
                Some(SubgoalModel { net, config })
            }
            None => None,
        };
        let f64s = |n: &str| -> Result<Vec<f64>, PlannerError> {
            let t = tensors
                .tensor(n)
                .map_err(|_| bad(format!("tensor {n} is missing")))?;
            if t.dtype() != Dtype::F64 {
                return Err(bad(format!("tensor {n} is not F64")));
            }
            Ok(t.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect())
        };
        let ridge = |prefix: &str| -> Result<Ridge, PlannerError> {
            Ridge::from_parts(
                f64s(&format!("{prefix}.mean"))?,
                f64s(&format!("{prefix}.scale"))?,
                f64s(&format!("{prefix}.weights"))?,
            )
            .ok_or_else(|| bad(format!("{prefix} tensors of inconsistent lengths")))
        };
        let probe = ridge("probe")?;
        let has_object = tensors
            .names()
            .iter()
            .any(|n| n.starts_with("object_probe."));
        let object_probe = if has_object {
            Some(ridge("object_probe")?)
        } else {
            None
        };
        Ok(WorldModel {
            encoder,
            predictor,
            probe,
            object_probe,
            subgoals,
            config,
        })
    }
}

/// A module's parameters as `(prefix.name, shape, little-endian f32 bytes)`.
fn module_tensors<M: burn::module::Module>(
    prefix: &str,
    m: &M,
) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let layout = ParamLayout::of(m);
    let flat = to_flat(m);
    layout
        .params
        .iter()
        .map(|p| {
            let raw = flat[p.offset..p.offset + p.len()]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (format!("{prefix}.{}", p.name), p.shape.clone(), raw)
        })
        .collect()
}

/// Loads the tensors `prefix.*` written by [`module_tensors`] into `shell`, checking every
/// dtype and shape.
fn load_module<M: burn::module::Module>(
    tensors: &SafeTensors<'_>,
    prefix: &str,
    shell: M,
) -> Result<M, String> {
    let layout = ParamLayout::of(&shell);
    let mut flat = Vec::with_capacity(layout.total);
    for p in &layout.params {
        let t = tensors
            .tensor(&format!("{prefix}.{}", p.name))
            .map_err(|_| format!("tensor {prefix}.{} is missing", p.name))?;
        if t.dtype() != Dtype::F32 || t.shape() != p.shape.as_slice() {
            return Err(format!(
                "tensor {prefix}.{} is {:?} {:?}, expected F32 {:?} (a world model for another encoder?)",
                p.name,
                t.dtype(),
                t.shape(),
                p.shape
            ));
        }
        flat.extend(
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    load_flat(shell, &flat).map_err(|e| e.to_string())
}

/// A randomly initialised (seeded) checkpoint of a preset: the encoder baseline every planning
/// and surprise number is read against.
pub fn random_checkpoint(preset: &str, seed: u64) -> Result<Checkpoint, PlannerError> {
    let mut config = amity_shared::config::Config::preset(preset).map_err(PlannerError::other)?;
    config.train.seed = seed;
    Ok(seeded_checkpoint(config))
}

/// A checkpoint of `config` at its seeded initialisation (`config.train.seed`).
pub fn seeded_checkpoint(config: amity_shared::config::Config) -> Checkpoint {
    let init = amity_shared::federated::GlobalParams::seeded(&config);
    Checkpoint {
        model: init.model,
        target: init.target,
        config,
        meta: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::EnvKind;

    #[test]
    fn training_reduces_the_rollout_error_and_the_model_round_trips() {
        let device = Device::flex();
        let ckpt = random_checkpoint("tiny", 0).unwrap();
        let encoder = FrameEncoder::new(&ckpt, &device).unwrap();
        // PushBlock: the world model also gets an object probe, which must survive the file.
        let trajs = data::collect(EnvKind::PushBlock, encoder.size(), 24, 12, 1);
        let cfg = WorldModelConfig {
            steps: 150,
            batch: 16,
            ..WorldModelConfig::default()
        };
        let t0 = std::time::Instant::now();
        let (wm, report) = WorldModel::fit(encoder, cfg, &trajs, 400, &mut |_, _, _| {});
        eprintln!("{report:?} in {:?}", t0.elapsed());
        // The residual predictor starts as "nothing changes" (copy the present), so this also
        // says the trained model beats copying by a wide margin.
        let t = &report.train;
        assert!(t.rollout_after < 0.5 * t.rollout_before, "{report:?}");
        assert!(report.object_probe_r2.is_some() && wm.object_probe.is_some());
        let path =
            std::env::temp_dir().join(format!("amity-wm-{}.safetensors", std::process::id()));
        wm.save(&path).unwrap();
        let back = WorldModel::load(&path, &ckpt, &device).unwrap();
        assert_eq!(
            amity_shared::model::flat::to_flat(&back.predictor),
            amity_shared::model::flat::to_flat(&wm.predictor)
        );
        assert_eq!(back.probe.parts().2, wm.probe.parts().2);
        assert_eq!(
            back.object_probe.as_ref().map(|p| p.parts().2.to_vec()),
            wm.object_probe.as_ref().map(|p| p.parts().2.to_vec())
        );
        // The learnt high level too, with its config.
        let (a, b) = (wm.subgoals.as_ref(), back.subgoals.as_ref());
        let (a, b) = (a.expect("a subgoal proposer"), b.expect("kept in the file"));
        assert_eq!(a.config, b.config);
        assert_eq!(
            amity_shared::model::flat::to_flat(&a.net),
            amity_shared::model::flat::to_flat(&b.net)
        );
        std::fs::remove_file(&path).unwrap();
    }
}
