//! Trajectories for the world model: collected with random and noisy scripted actions, stored
//! as content-addressed shards (one episode's frames per clip) plus a JSON index of actions and
//! states, and encoded once into latents by the frozen encoder.

use std::path::Path;

use serde::{Deserialize, Serialize};

use amity_shared::corpus::shard::{ShardBuilder, ShardView};
use amity_shared::rng::Rng;
use amity_shared::store::{BlobId, BlobStore, LocalStore};

use crate::PlannerError;
use crate::env::{Action, EnvKind, clamp_action, make};
use crate::world::encode::FrameEncoder;

/// One episode.
#[derive(Debug, Clone, PartialEq)]
pub struct Trajectory {
    /// Its seed.
    pub seed: u64,
    /// `steps + 1` frames, contiguous RGB.
    pub frames: Vec<u8>,
    /// `steps` actions.
    pub actions: Vec<Action>,
    /// `steps + 1` proprioceptive states.
    pub proprio: Vec<[f32; 4]>,
    /// `steps + 1` agent positions.
    pub agent: Vec<[f32; 2]>,
    /// `steps + 1` positions of the task's object ([`crate::env::Env::object`]), or none
    /// when the environment has no such object.
    pub object: Vec<[f32; 2]>,
}

impl Trajectory {
    /// Actions taken.
    pub fn steps(&self) -> usize {
        self.actions.len()
    }

    /// Frame `t`.
    pub fn frame(&self, t: usize, size: usize) -> &[u8] {
        let n = size * size * 3;
        &self.frames[t * n..(t + 1) * n]
    }
}

/// Collects `episodes` episodes of `steps` actions at `size` pixels, taking turns between three
/// behaviours: the environment's scripted policy with Gaussian noise (it reaches goals, pushes
/// blocks), smoothed random actions (they explore), and random actions each held for 2 to 6
/// steps (uniform in the bounds). The last is what a planner asks the world model about: it
/// holds each action for the frameskip and often saturates it, which drives the agent into
/// walls and corners; a predictor that never saw that extrapolates through the walls, and the
/// planner exploits the error. Everything is seeded.
pub fn collect(
    kind: EnvKind,
    size: usize,
    episodes: usize,
    steps: usize,
    seed: u64,
) -> Vec<Trajectory> {
    (0..episodes)
        .map(|e| {
            let ep_seed = seed.wrapping_mul(1_000_003).wrapping_add(e as u64);
            let mut env = make(kind, size);
            env.reset(ep_seed);
            let mut rng = Rng::derive(ep_seed, &[0xc011]);
            let behaviour = e % 3;
            let mut t = Trajectory {
                seed: ep_seed,
                frames: env.render(),
                actions: Vec::with_capacity(steps),
                proprio: vec![env.proprio()],
                agent: vec![env.agent()],
                object: env.object().into_iter().collect(),
            };
            let mut prev = [0.0f32; 2];
            let mut held_for = 0usize;
            for _ in 0..steps {
                let noise = [rng.normal() as f32 * 0.4, rng.normal() as f32 * 0.4];
                let a = match behaviour {
                    0 => env.scripted_action(noise),
                    1 => clamp_action([
                        0.6 * prev[0] + 0.8 * rng.normal() as f32,
                        0.6 * prev[1] + 0.8 * rng.normal() as f32,
                    ]),
                    _ if held_for > 0 => {
                        held_for -= 1;
                        prev
                    }
                    _ => {
                        held_for = 1 + rng.below(5);
                        let u = |rng: &mut Rng| (2.0 * rng.uniform() - 1.0) as f32;
                        [u(&mut rng), u(&mut rng)]
                    }
                };
                prev = a;
                env.step(a);
                t.actions.push(a);
                t.frames.extend(env.render());
                t.proprio.push(env.proprio());
                t.agent.push(env.agent());
                t.object.extend(env.object());
            }
            t
        })
        .collect()
}

/// One stored episode: seed, actions, proprioception, agent positions.
pub type EpisodeRecord = (u64, Vec<Action>, Vec<[f32; 4]>, Vec<[f32; 2]>);

/// The JSON index of a stored dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetIndex {
    /// The environment.
    pub env: String,
    /// Frame side.
    pub size: usize,
    /// Actions per episode.
    pub steps: usize,
    /// The shards holding the frames (one clip of `steps + 1` frames per episode, in order).
    pub shards: Vec<BlobId>,
    /// Per episode: seed, actions, proprioception, agent positions.
    pub episodes: Vec<EpisodeRecord>,
    /// Per episode, the object's positions (absent for environments without one, and in
    /// datasets written before objects were recorded).
    #[serde(default)]
    pub objects: Vec<Vec<[f32; 2]>>,
}

/// Writes trajectories into `dir` (a content store plus `dataset.json`).
pub fn save(
    dir: &Path,
    kind: EnvKind,
    size: usize,
    trajs: &[Trajectory],
) -> Result<DatasetIndex, PlannerError> {
    let store = LocalStore::open(&dir.join("blobs")).map_err(PlannerError::other)?;
    let steps = trajs.first().map_or(0, Trajectory::steps);
    let mut shards = Vec::new();
    for chunk in trajs.chunks(64) {
        let mut b = ShardBuilder::new(
            &kind.to_string(),
            steps + 1,
            size,
            1.0 / crate::env::ACTION_SECONDS as f64,
            1,
        );
        for t in chunk {
            b.push(&format!("{kind}/episode-{}", t.seed), 0, &t.frames, None);
        }
        let bytes = b.finish().to_vec();
        shards.push(store.put(&bytes).map_err(PlannerError::other)?.id);
    }
    let index = DatasetIndex {
        env: kind.to_string(),
        size,
        steps,
        shards,
        episodes: trajs
            .iter()
            .map(|t| {
                (
                    t.seed,
                    t.actions.clone(),
                    t.proprio.clone(),
                    t.agent.clone(),
                )
            })
            .collect(),
        objects: if trajs.iter().all(|t| t.object.is_empty()) {
            Vec::new()
        } else {
            trajs.iter().map(|t| t.object.clone()).collect()
        },
    };
    let path = dir.join("dataset.json");
    let json = serde_json::to_vec(&index).map_err(PlannerError::other)?;
    std::fs::write(&path, json).map_err(PlannerError::io(&path))?;
    Ok(index)
}

/// Reads a dataset written by [`save`], verifying every shard.
pub fn load(dir: &Path) -> Result<(EnvKind, usize, Vec<Trajectory>), PlannerError> {
    let path = dir.join("dataset.json");
    let text = std::fs::read(&path).map_err(PlannerError::io(&path))?;
    let index: DatasetIndex = serde_json::from_slice(&text)
        .map_err(|e| PlannerError::Invalid(format!("{}: {e}", path.display())))?;
    let kind: EnvKind = index.env.parse()?;
    let store = LocalStore::open(&dir.join("blobs")).map_err(PlannerError::other)?;
    let mut frames = Vec::new();
    for id in &index.shards {
        let bytes = store.get(id).map_err(PlannerError::other)?;
        let view = ShardView::parse(&bytes).map_err(PlannerError::other)?;
        for i in 0..view.len() {
            frames.push(view.clip(i).to_vec());
        }
    }
    if frames.len() != index.episodes.len() {
        return Err(PlannerError::Invalid(format!(
            "{}: {} episodes listed, {} stored",
            path.display(),
            index.episodes.len(),
            frames.len()
        )));
    }
    if !index.objects.is_empty() && index.objects.len() != index.episodes.len() {
        return Err(PlannerError::Invalid(format!(
            "{}: {} episodes listed but object positions for {}",
            path.display(),
            index.episodes.len(),
            index.objects.len()
        )));
    }
    let want = (index.steps + 1) * index.size * index.size * 3;
    let mut objects = index.objects.into_iter();
    let mut trajs = Vec::new();
    for ((seed, actions, proprio, agent), frames) in index.episodes.into_iter().zip(frames) {
        let object = objects.next().unwrap_or_default();
        if frames.len() != want
            || actions.len() != index.steps
            || proprio.len() != index.steps + 1
            || agent.len() != index.steps + 1
            || !(object.is_empty() || object.len() == index.steps + 1)
        {
            return Err(PlannerError::Invalid(format!(
                "{}: episode {seed} has the wrong length",
                path.display()
            )));
        }
        trajs.push(Trajectory {
            seed,
            frames,
            actions,
            proprio,
            agent,
            object,
        });
    }
    Ok((kind, index.size, trajs))
}

/// Every frame of every trajectory through the frozen encoder.
#[derive(Debug, Clone)]
pub struct Latents {
    /// Trajectories.
    pub episodes: usize,
    /// Frames per trajectory.
    pub frames: usize,
    /// Tokens per frame.
    pub tokens: usize,
    /// Feature width.
    pub width: usize,
    /// `episodes x frames x tokens x width`.
    pub z: Vec<f32>,
}

impl Latents {
    /// Encodes `trajs`.
    pub fn of(encoder: &FrameEncoder, trajs: &[Trajectory]) -> Self {
        let size = encoder.size();
        let frames = trajs.first().map_or(0, |t| t.steps() + 1);
        let mut z = Vec::new();
        for t in trajs {
            let fs: Vec<&[u8]> = (0..=t.steps()).map(|i| t.frame(i, size)).collect();
            z.extend(encoder.encode_host(&fs));
        }
        Latents {
            episodes: trajs.len(),
            frames,
            tokens: encoder.tokens(),
            width: encoder.width(),
            z,
        }
    }

    /// The latents of frame `t` of episode `e`.
    pub fn frame(&self, e: usize, t: usize) -> &[f32] {
        let n = self.tokens * self.width;
        let i = (e * self.frames + t) * n;
        &self.z[i..i + n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_round_trips_with_its_object_positions_and_refuses_bad_ones() {
        let dir = std::env::temp_dir().join(format!("amity-dataset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let trajs = collect(EnvKind::PushBlock, 32, 3, 4, 2);
        assert!(trajs.iter().all(|t| t.object.len() == 5));
        save(&dir, EnvKind::PushBlock, 32, &trajs).unwrap();
        let (kind, size, back) = load(&dir).unwrap();
        assert_eq!((kind, size), (EnvKind::PushBlock, 32));
        assert_eq!(back, trajs);
        // One object position too few: refused, naming the file.
        let path = dir.join("dataset.json");
        let mut index: DatasetIndex =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        index.objects[1].pop();
        std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("dataset.json") && err.contains("wrong length"),
            "{err}"
        );
        // PointMaze has no object: nothing is recorded.
        assert!(
            collect(EnvKind::PointMaze, 32, 1, 2, 2)[0]
                .object
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_third_episode_holds_its_random_actions_for_two_to_six_steps() {
        let trajs = collect(EnvKind::PointMaze, 32, 6, 40, 4);
        for (e, t) in trajs.iter().enumerate().filter(|(e, _)| e % 3 == 2) {
            // Runs of one repeated action.
            let mut runs = vec![1usize];
            for w in t.actions.windows(2) {
                if w[0] == w[1] {
                    *runs.last_mut().unwrap() += 1;
                } else {
                    runs.push(1);
                }
            }
            let complete = &runs[..runs.len() - 1];
            assert!(
                complete.iter().all(|r| (2..=6).contains(r)),
                "{e}: {runs:?}"
            );
            // The last run may be cut short by the episode's end.
            assert!(runs.last().is_some_and(|r| (1..=6).contains(r)), "{e}");
            assert!(runs.len() >= 40 / 6, "{e}: {runs:?}");
        }
    }
}
