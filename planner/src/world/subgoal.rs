//! The learnt high level of a two-level plan: a goal-conditioned subgoal proposer trained from
//! the collected trajectories by hindsight relabelling, in place of a hand-written contact rule.
//!
//! Every later position a trajectory's object reached is a goal that trajectory reached
//! (hindsight, as in goal-conditioned imitation): from the agent's and the object's positions
//! at `t` and the object's at a later `t + g`, the model regresses where the agent was
//! [`SubgoalConfig::lookahead`] environment steps after `t`. Only windows in which the object
//! really moved count, since a window where it stayed put says nothing about how to move it.
//! At planning time the inputs are what the planner reads without the simulator (the agent's
//! proprioception, the object probe on the encoded frame and on the goal image), the same as
//! the rule's, and the output is the waypoint the low level's position term aims at.
//!
//! The data are the world model's own collection (scripted, smoothed random and held random
//! actions taking turns): nothing tells the model which behaviour produced a window.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use amity_shared::config::TrainConfig;
use amity_shared::model::flat::{ParamLayout, init_params, load_flat};
use amity_shared::model::host_f32;
use amity_shared::rng::Rng;
use amity_shared::train::{AdamW, Schedule};

use super::data::Trajectory;
use crate::env::ARENA;

/// Input features: the three positions, the object-to-target and object-to-agent offsets.
pub const FEATURES: usize = 10;
/// Scale of the regressed displacement (arena units): outputs of order one.
const OUTPUT_SCALE: f32 = 2.0;

/// The proposer's shape, data selection and training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubgoalConfig {
    /// Hidden width of the two hidden layers.
    pub hidden: usize,
    /// Environment steps ahead whose agent position the network regresses: the heading.
    pub lookahead: usize,
    /// How far along that heading (arena units) the waypoint is placed.
    pub reach: f32,
    /// Longest hindsight horizon (environment steps from `t` to the relabelled goal).
    pub max_goal_steps: usize,
    /// How far (arena units) the object must have moved between `t` and the goal for the
    /// window to count.
    pub min_object_move: f32,
    /// Standard deviation (arena units) of the noise added to the object's positions in
    /// training: at planning time they are a probe's readings, not the simulator's.
    pub input_noise: f32,
    /// Optimiser steps.
    pub steps: u64,
    /// Samples per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of initialisation, noise and sampling.
    pub seed: u64,
}

impl Default for SubgoalConfig {
    fn default() -> Self {
        SubgoalConfig {
            hidden: 64,
            lookahead: 3,
            reach: 2.5,
            max_goal_steps: 20,
            min_object_move: 0.6,
            input_noise: 0.15,
            steps: 3000,
            batch: 256,
            lr: 3e-3,
            seed: 0,
        }
    }
}

impl SubgoalConfig {
    /// Why this config cannot make a working proposer (one read from a file), if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.hidden == 0 || self.lookahead == 0 {
            return Err("subgoal proposer: hidden width and lookahead must be at least 1".into());
        }
        if !(self.reach.is_finite() && self.reach > 0.0) {
            return Err(format!(
                "subgoal proposer: reach {} is not a positive distance",
                self.reach
            ));
        }
        Ok(())
    }
}

/// The network: features → two ReLU layers → the agent's displacement / [`OUTPUT_SCALE`].
#[derive(Module, Debug)]
pub struct SubgoalNet {
    /// Features → hidden.
    pub input: Linear,
    /// Hidden → hidden.
    pub hidden: Linear,
    /// Hidden → displacement.
    pub output: Linear,
}

impl SubgoalNet {
    /// An untrained network of `cfg`'s shape (zeros until loaded or initialised).
    pub fn new(cfg: &SubgoalConfig, device: &Device) -> Self {
        SubgoalNet {
            input: LinearConfig::new(FEATURES, cfg.hidden).init(device),
            hidden: LinearConfig::new(cfg.hidden, cfg.hidden).init(device),
            output: LinearConfig::new(cfg.hidden, 2).init(device),
        }
    }

    /// `[B, FEATURES]` → `[B, 2]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = relu(self.input.forward(x));
        let h = relu(self.hidden.forward(h));
        self.output.forward(h)
    }
}

/// The features of one query (arena units in, roughly unit scale out).
fn features(agent: [f32; 2], object: [f32; 2], target: [f32; 2]) -> [f32; FEATURES] {
    let c = |v: f32| v / ARENA * 2.0 - 1.0;
    let d = |a: f32, b: f32| (a - b) / ARENA * 4.0;
    [
        c(agent[0]),
        c(agent[1]),
        c(object[0]),
        c(object[1]),
        c(target[0]),
        c(target[1]),
        d(target[0], object[0]),
        d(target[1], object[1]),
        d(agent[0], object[0]),
        d(agent[1], object[1]),
    ]
}

/// The trained proposer: [`SubgoalModel::waypoint`] is the high level.
#[derive(Debug)]
pub struct SubgoalModel {
    /// The network (inference).
    pub net: SubgoalNet,
    /// Its config.
    pub config: SubgoalConfig,
}

/// What training measured on held-out episodes' windows.
#[derive(Debug, Clone, PartialEq)]
pub struct SubgoalReport {
    /// Windows trained on (after selection).
    pub train_windows: usize,
    /// Held-out windows.
    pub held_windows: usize,
    /// Mean distance (arena units) from the proposed to the reached subgoal, held out.
    pub error: f64,
    /// The same for "the agent stays where it is" (the baseline the model must beat).
    pub still_error: f64,
}

/// One training example: features and the displacement / [`OUTPUT_SCALE`].
type Example = ([f32; FEATURES], [f32; 2]);

/// Hindsight examples of `trajs` (with the noise drawn from `rng`).
fn examples<'t>(
    trajs: impl Iterator<Item = &'t Trajectory>,
    cfg: &SubgoalConfig,
    rng: &mut Rng,
) -> Vec<Example> {
    let mut out = Vec::new();
    for tr in trajs {
        let (agent, object) = (&tr.agent, &tr.object);
        if object.len() != agent.len() {
            continue;
        }
        let (last, look) = (agent.len().saturating_sub(1), cfg.lookahead.max(1));
        for t in 0..last.saturating_sub(look - 1) {
            let ahead = agent[t + look];
            for g in look..=cfg.max_goal_steps.min(last - t) {
                let goal = object[t + g];
                let moved = (goal[0] - object[t][0]).hypot(goal[1] - object[t][1]);
                if moved < cfg.min_object_move {
                    continue;
                }
                let mut noisy = |p: [f32; 2]| {
                    let s = cfg.input_noise;
                    [
                        p[0] + s * rng.normal() as f32,
                        p[1] + s * rng.normal() as f32,
                    ]
                };
                let x = features(agent[t], noisy(object[t]), noisy(goal));
                let y = [
                    (ahead[0] - agent[t][0]) / OUTPUT_SCALE,
                    (ahead[1] - agent[t][1]) / OUTPUT_SCALE,
                ];
                out.push((x, y));
            }
        }
    }
    out
}

fn batch_tensors(batch: &[&Example], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let x: Vec<f32> = batch.iter().flat_map(|e| e.0).collect();
    let y: Vec<f32> = batch.iter().flat_map(|e| e.1).collect();
    (
        Tensor::from_data(TensorData::new(x, [batch.len(), FEATURES]), device),
        Tensor::from_data(TensorData::new(y, [batch.len(), 2]), device),
    )
}

impl SubgoalModel {
    /// Trains a proposer on `trajs` (every tenth episode held out for the report), or `None`
    /// when the trajectories record no object or no window moved it. `log` gets (step, loss).
    pub fn fit(
        trajs: &[Trajectory],
        config: SubgoalConfig,
        device: &Device,
        log: &mut dyn FnMut(u64, f64),
    ) -> Option<(SubgoalModel, SubgoalReport)> {
        let mut rng = Rng::derive(config.seed, &[0x5ab9]);
        let held_out = |i: usize| i % 10 == 9;
        let pick = |held: bool| {
            let keep = move |(i, _): &(usize, &Trajectory)| held_out(*i) == held;
            trajs.iter().enumerate().filter(keep).map(|(_, t)| t)
        };
        let train_set = examples(pick(false), &config, &mut rng);
        let held_set = examples(pick(true), &config, &mut rng);
        if train_set.is_empty() {
            return None;
        }
        let ad = device.clone().autodiff();
        let shell = SubgoalNet::new(&config, &ad);
        let flat = init_params(&ParamLayout::of(&shell), config.seed);
        let mut net = load_flat(shell, &flat).expect("layout from the same shell");
        let mut recipe = TrainConfig::vjepa(config.steps, config.batch);
        recipe.lr = config.lr;
        recipe.start_lr = config.lr * 0.1;
        recipe.final_lr = config.lr * 0.02;
        recipe.warmup = (config.steps / 20).max(1);
        recipe.weight_decay = 1e-4;
        recipe.weight_decay_end = 1e-4;
        recipe.clip_grad = 1.0;
        let mut optim = AdamW::new(&recipe);
        for step in 0..config.steps {
            let picks: Vec<&Example> = (0..config.batch)
                .map(|_| &train_set[rng.below(train_set.len())])
                .collect();
            let (x, y) = batch_tensors(&picks, &ad);
            let loss = (net.forward(x) - y).powi_scalar(2).mean();
            let value: f32 = loss.clone().inner().into_scalar();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(net, grads, Schedule::at(&recipe, step)).0;
            log(step, value as f64);
        }
        let model = SubgoalModel {
            net: net.valid(),
            config,
        };
        let (mut error, mut still) = (0.0, 0.0);
        for chunk in held_set.chunks(1024) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (x, _) = batch_tensors(&refs, device);
            let pred = host_f32(model.net.forward(x));
            for (e, p) in chunk.iter().zip(pred.chunks_exact(2)) {
                let (dx, dy) = (
                    (p[0] - e.1[0]) * OUTPUT_SCALE,
                    (p[1] - e.1[1]) * OUTPUT_SCALE,
                );
                error += dx.hypot(dy) as f64;
                still += (e.1[0] * OUTPUT_SCALE).hypot(e.1[1] * OUTPUT_SCALE) as f64;
            }
        }
        let n = held_set.len().max(1) as f64;
        let report = SubgoalReport {
            train_windows: train_set.len(),
            held_windows: held_set.len(),
            error: error / n,
            still_error: still / n,
        };
        Some((model, report))
    }

    /// Where the agent at `agent` should head to move the object at `object` towards `target`
    /// (arena units): [`SubgoalConfig::reach`] along the heading to the position the network
    /// proposes [`SubgoalConfig::lookahead`] steps ahead, kept inside the arena.
    ///
    /// The heading, not the position itself: a waypoint only a few steps ahead is a carrot too
    /// near, and an agent that reaches it every step slows down. Measured with the true state
    /// and a proportional controller (40 PushBlock episodes, the bench's seeds; the contact
    /// rule: 40): the regressed position itself reached 20-30 goals, twice the displacement
    /// 31-37, the heading at a reach of 2.5 37-40 (lookahead 2-4 steps, windows where the
    /// block moved at least 0.6 or 1.0, goals up to 20 steps on); longer lookaheads cut the
    /// corner round the block (8 steps: 4 goals).
    pub fn waypoint(&self, agent: [f32; 2], object: [f32; 2], target: [f32; 2]) -> [f32; 2] {
        let device = self.net.output.weight.device();
        let x = Tensor::from_data(
            TensorData::new(features(agent, object, target).to_vec(), [1, FEATURES]),
            &device,
        );
        let d = host_f32(self.net.forward(x));
        let n = d[0].hypot(d[1]);
        if !n.is_finite() || n < 1e-6 {
            return agent;
        }
        let (r, inside) = (self.config.reach / n, |v: f32| v.clamp(0.0, ARENA));
        [inside(agent[0] + d[0] * r), inside(agent[1] + d[1] * r)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::pushblock::push_waypoint;
    use crate::env::{EnvKind, clamp_action, make};
    use crate::world::data::collect;

    /// A trajectory with no frames: the agent walks right, the object moves only from step 3.
    fn walk() -> Trajectory {
        let agent: Vec<[f32; 2]> = (0..9).map(|t| [1.0 + t as f32 * 0.5, 5.0]).collect();
        let object: Vec<[f32; 2]> = (0..9)
            .map(|t| [5.0 + (t as f32 - 3.0).max(0.0) * 0.2, 5.0])
            .collect();
        Trajectory {
            seed: 0,
            frames: Vec::new(),
            actions: vec![[1.0, 0.0]; 8],
            proprio: vec![[0.0; 4]; 9],
            agent,
            object,
        }
    }

    #[test]
    fn hindsight_keeps_windows_where_the_object_moved_and_labels_the_agents_way() {
        let cfg = SubgoalConfig {
            lookahead: 2,
            max_goal_steps: 4,
            min_object_move: 0.3,
            input_noise: 0.0,
            ..SubgoalConfig::default()
        };
        let tr = walk();
        let ex = examples(std::iter::once(&tr), &cfg, &mut Rng::new(0));
        // From t, goals t+2..=t+4 count where the object moved >= 0.3 by then, i.e. at least
        // two steps past step 3: (t=1,g=4), (t=2,g=3), (t=2,g=4), (t=3..=4, g=2..=4),
        // (t=5, g=2..=3), (t=6, g=2).
        let want = 1 + 2 + 3 + 3 + 2 + 1;
        assert_eq!(ex.len(), want);
        for (x, y) in &ex {
            // The agent moves 0.5 a step: 1.0 in two, scaled.
            assert!(
                (y[0] - 1.0 / OUTPUT_SCALE).abs() < 1e-6 && y[1] == 0.0,
                "{y:?}"
            );
            // The goal is ahead of the object (features 6: target - object, scaled).
            assert!(x[6] > 0.0, "{x:?}");
        }
        // No object recorded: nothing to learn from.
        let mut bare = walk();
        bare.object.clear();
        assert!(examples(std::iter::once(&bare), &cfg, &mut Rng::new(0)).is_empty());
    }

    /// Goals reached in 40 PushBlock episodes (the bench's seeds) by an agent steered at
    /// `high`'s waypoints on the true state, with a proportional controller.
    fn pushes(high: &dyn Fn([f32; 2], [f32; 2], [f32; 2]) -> [f32; 2]) -> usize {
        let mut env = make(EnvKind::PushBlock, 8);
        let mut wins = 0;
        for e in 0..40 {
            env.reset(900_000 + e);
            for _ in 0..40 {
                let state = env.state();
                let (p, pad) = (env.agent(), [state[12], state[13]]);
                let w = high(p, env.object().expect("a block"), pad);
                let to = |i: usize| 0.8 * (w[i] - p[i]) - 0.3 * state[3 + i];
                env.step(clamp_action([to(0), to(1)]));
                if env.success() {
                    wins += 1;
                    break;
                }
            }
        }
        wins
    }

    #[test]
    fn the_learnt_proposer_pushes_the_block_home_as_the_rule_does() {
        // Positions only: the proposer never looks at frames, so small frames will do.
        let trajs = collect(EnvKind::PushBlock, 8, 600, 20, 11);
        let (model, report) = SubgoalModel::fit(
            &trajs,
            SubgoalConfig::default(),
            &Device::flex(),
            &mut |_, _| {},
        )
        .expect("pushes in the data");
        let (learnt, rule) = (
            pushes(&|a, b, t| model.waypoint(a, b, t)),
            pushes(&push_waypoint),
        );
        eprintln!("{report:?}; goals: learnt {learnt}/40, rule {rule}/40");
        assert!(report.held_windows > 100, "{report:?}");
        assert!(report.error < 0.7 * report.still_error, "{report:?}");
        // The rule reaches all 40 this way; a model that had learnt nothing, none.
        assert!(rule >= 38, "the rule: {rule}/40");
        assert!(learnt >= 32, "the learnt proposer: {learnt}/40");
    }
}
