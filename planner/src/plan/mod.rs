//! Model-predictive control: at every step, search the action sequence whose outcome is closest
//! to the goal, execute its first action, and replan (receding horizon). Each planned action is
//! held for the world model's frameskip (DINO-WM style), so a plan of 8 steps looks 24
//! environment steps ahead and the planner thinks once every 3 actions.
//!
//! - [`LatentPlanner`]: the outcome is predicted by the world model in latent space; the energy
//!   is the [`LatentEnergy`]: the distance (L2 or L1) between the predicted final latents and
//!   the goal image's latents, both token maps smoothed over the token grid so that away from
//!   the goal the energy still has a slope; optionally plus a position term (the
//!   distance between the agent positions the predictor's state output reaches, averaged over
//!   the plan's steps, and where the frozen probe puts the agent in the goal image), an object
//!   term (the same for the task's object), an arena term (predicted positions outside the
//!   arena: extrapolation the search must not exploit), plus **guardrails** no goal can
//!   outweigh: actions are clamped to their bounds, and a sequence whose predicted way (the
//!   probe on the predicted latents, and the predictor's own state output, each checked along
//!   the segments between steps) enters a forbidden zone costs [`FORBIDDEN`] per point of its
//!   way inside.
//!   The actions can also be optimised by gradient descent through the predictor
//!   ([`LatentPlanner::descend`], `Method::Gd`). On two levels
//!   ([`LatentPlanner::two_level`]), a [`HighLevel`] (the world model's learnt subgoal
//!   proposer, or a task's hand-written contact rule) picks the agent's waypoint from the
//!   probes' readings before each search and the position term aims there.
//! - [`OraclePlanner`]: the same search on the true simulator (the ceiling), its energy the
//!   true goal distance averaged over the plan's steps (the position term's stage cost).
//! - [`RandomPolicy`]: uniform random actions (the floor).

mod energy;
mod high_level;
pub mod optimise;

pub use energy::{LatentEnergy, Metric, blur_matrix};
pub use high_level::HighLevel;

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};

use amity_shared::model::host_f32;
use amity_shared::rng::Rng;

use crate::env::{Action, Env, Zone, clamp_action, proprio_position};
use crate::world::WorldModel;
use energy::latent_distance;
use optimise::{Method, Plan, SearchConfig, search, shift};

/// Weights (per arena unit) of the read-out terms the latent planner adds to its latent energy
/// (see [`LatentPlanner::with_position_weight`], [`LatentPlanner::with_object_weight`],
/// [`LatentPlanner::with_arena_weight`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadoutWeights {
    /// The agent's predicted position against the goal image's.
    pub position: f32,
    /// The task object's predicted position against the goal image's.
    pub object: f32,
    /// Predicted positions outside the arena.
    pub arena: f32,
}

impl ReadoutWeights {
    /// The weights `amity bench plan`, `amity plan run` and the demo use per environment, each
    /// measured:
    ///
    /// - PointMaze: position 0.5 (16 episodes, 800 predictor steps, the term then on the last
    ///   step only: 0.05 reached 11 goals, 0.5 reached 14, 2.0 fewer); no arena term (same
    ///   model and episodes: 13 goals without, 9 with weight 1).
    /// - PushBlock: no position term (the agent must go round behind the block, away from where
    ///   the goal image shows it: on scripted successes its distance rose 1.4 -> 3.9 before it
    ///   fell, a trap), object 2, arena 1 (800 predictor steps, 8 episodes: 0 goals without
    ///   the arena term, every agent in a corner; 2 with it. `amity bench plan` at 1500 steps,
    ///   16 episodes: 0 with it, so it cuts the corner runs but no success rate is shown yet).
    pub fn default_for(kind: crate::env::EnvKind) -> ReadoutWeights {
        match kind {
            crate::env::EnvKind::PointMaze => ReadoutWeights {
                position: 0.5,
                object: 0.0,
                arena: 0.0,
            },
            crate::env::EnvKind::PushBlock => ReadoutWeights {
                position: 0.0,
                object: 2.0,
                arena: 1.0,
            },
        }
    }

    /// The environment's weights ([`ReadoutWeights::default_for`]) with each one given replaced:
    /// how `amity plan run` and `amity bench plan` read their `--*-weight` flags.
    pub fn default_with(
        kind: crate::env::EnvKind,
        position: Option<f32>,
        object: Option<f32>,
        arena: Option<f32>,
    ) -> ReadoutWeights {
        let d = ReadoutWeights::default_for(kind);
        ReadoutWeights {
            position: position.unwrap_or(d.position),
            object: object.unwrap_or(d.object),
            arena: arena.unwrap_or(d.arena),
        }
    }

    /// Whether any term is on.
    pub fn any(&self) -> bool {
        self.position > 0.0 || self.object > 0.0 || self.arena > 0.0
    }
}

/// The settings of the two-level plan ([`LatentPlanner::two_level`]), each measured on the
/// first 16 PushBlock bench episodes (one world model, CEM, 40 actions per episode; a model
/// trained on data collected before the rule's last revision, so the goals counted here are
/// comparable with each other, not with the bench's):
///
/// - read-out weights position 3, object 0, arena 1: the position term aims at the rule's
///   waypoint and must outweigh the latent distance to the goal image, whose agent stands
///   elsewhere (position 1: 3 goals, final block distance 1.21 on average; 3: 3 goals, 0.45);
///   no object term (the world model invents block motion for pushes that miss, and the rule
///   already says where the block should go);
/// - a search after every environment step rather than after every held action (7 goals at
///   1043 ms per action against 3 at 373 ms: the agent's speed near a waypoint is the margin
///   between passing behind the block and knocking it), with half the candidates
///   (7 goals again, at 490 ms per action);
/// - the previous plan shifted by one predictor step as the warm start, as when replanning
///   after the whole held action (the plan unshifted, its first action still under way: 3
///   goals);
/// - a horizon of [`TWO_LEVEL_HORIZON`] predictor steps with the default 96 candidates rather
///   than 8 steps with 48 (same cost; the rule's push point 1.5 past the block's centre: **12**
///   goals against 8, final block distance 0.16 against 0.55 on average). A waypoint is near
///   and replaced at the next step, so only the first steps of a plan matter, and those are the
///   ones the world model predicts well (the agent's predicted position is off by ~0.6 arena
///   units after one step, 1.7 after four, 3.7 after eight on held-out episodes). The elite mean
///   instead of the best candidate as the plan: 6 goals (one fewer than the best, at 8 steps).
///
/// `amity bench plan --env pushblock --episodes 50` with these settings: 0.82 at 368 ms per
/// action (pretrained encoder; 0.90 with a random one), against 0.00 and 0.04 for the flat
/// latent planner without and with the read-out terms. With the learnt subgoal proposer on
/// top instead of the rule ([`HighLevel::Learnt`], same settings): 0.88 against the rule's 0.84
/// in the same run.
pub const TWO_LEVEL_WEIGHTS: ReadoutWeights = ReadoutWeights {
    position: 3.0,
    object: 0.0,
    arena: 1.0,
};

/// Predictor steps per plan of the two-level planner (see [`TWO_LEVEL_WEIGHTS`]).
pub const TWO_LEVEL_HORIZON: usize = 4;

/// The two-level planner's settings in words, for logs and the command line.
pub fn two_level_settings() -> String {
    format!(
        "position {}, arena {}, a search every step over {} predictor steps",
        TWO_LEVEL_WEIGHTS.position, TWO_LEVEL_WEIGHTS.arena, TWO_LEVEL_HORIZON
    )
}

/// How close to the arena's edge (arena units) a body's centre can be: the smallest agent radius
/// of the bundled environments. The arena term counts only predictions beyond it.
pub const ARENA_MARGIN: f32 = 0.8;

/// How far `p` lies outside the arena shrunk by [`ARENA_MARGIN`] (L1 over the axes; 0 inside).
fn outside_arena(p: [f32; 2]) -> f32 {
    let (lo, hi) = (ARENA_MARGIN, crate::env::ARENA - ARENA_MARGIN);
    p.iter()
        .map(|v| (lo - v).max(0.0) + (v - hi).max(0.0))
        .sum()
}

/// The energy of a sequence that enters a forbidden zone.
pub const FORBIDDEN: f32 = 1.0e6;

/// What acts in an environment.
pub trait Policy {
    /// Starts an episode in `env`.
    fn begin(&mut self, env: &dyn Env);
    /// The next action.
    fn act(&mut self, env: &dyn Env) -> Action;
    /// Agent positions the policy expects over its current plan (for pictures), if it has any.
    fn expected_path(&self) -> Vec<[f32; 2]> {
        Vec::new()
    }
}

/// How many points of the way from `a` to `b` (straight, sampled every quarter arena unit,
/// `a` itself excluded) lie within `margin` of `zone`. A count rather than a yes/no: when every
/// candidate is refused (the agent already inside the margin), the one that leaves soonest wins.
fn crossings(zone: &Zone, a: [f32; 2], b: [f32; 2], margin: f32) -> usize {
    let n = (crate::env::dist(a, b) / 0.25).ceil().max(1.0) as usize;
    (1..=n)
        .filter(|&k| {
            let t = k as f32 / n as f32;
            zone.contains([a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])], margin)
        })
        .count()
}

/// What [`LatentPlanner::energy_parts`] computes per candidate.
#[derive(Debug, Clone)]
pub struct EnergyParts {
    /// Latent distance to the goal (plus the position, object and arena terms when weighted).
    pub goal: Vec<f32>,
    /// Predicted points (probe and state readings, along each step) inside a forbidden zone.
    pub violations: Vec<usize>,
    /// The probe's agent path (arena units, one point per predictor step).
    pub paths: Vec<Vec<[f32; 2]>>,
    /// The predicted latents of every step, `[N, H, P, D]` (the last step's distance to the goal
    /// is the latent part of `goal`); kept so that a caller can measure any step without the
    /// search paying for it.
    pub predicted: Tensor<4>,
}

/// Plans in latent space with the world model.
pub struct LatentPlanner<'a> {
    wm: &'a WorldModel,
    method: Method,
    cfg: SearchConfig,
    energy: LatentEnergy,
    /// Zones grown by this margin (arena units) before checking, against probe error.
    margin: f32,
    /// `[P, P]` spatial smoothing of token maps ([`LatentEnergy::blur`]).
    blur: Option<Tensor<2>>,
    /// The predictor on an autodiff device, built on first use by gradient descent.
    ad_predictor: Option<crate::world::predictor::ActionPredictor>,
    zones: Vec<Zone>,
    /// Weight of the position term (0: the energy is the latent distance alone).
    position_weight: f32,
    goal: Option<Tensor<3>>,
    /// Where the probe puts the agent in the goal image (arena units).
    goal_position: [f32; 2],
    /// Weight of the object term (0: none).
    object_weight: f32,
    /// Where the object probe puts the task's object in the goal image (arena units).
    goal_object: Option<[f32; 2]>,
    /// Weight of the arena term (0: none).
    arena_weight: f32,
    /// The high level of a two-level plan: each replan aims the position term at the waypoint
    /// it picks from the probes' readings (none: at the goal image's agent).
    waypoints: Option<HighLevel<'a>>,
    /// Environment steps taken from each plan before the next search (none: the whole first
    /// action, held for the frameskip).
    replan_every: Option<usize>,
    warm: Option<Vec<Action>>,
    /// Environment actions chosen but not yet taken: the plan's first action, held for the
    /// world model's frameskip.
    queue: Vec<Action>,
    rng: Rng,
    path: Vec<[f32; 2]>,
}

impl<'a> LatentPlanner<'a> {
    /// A planner over `wm`.
    pub fn new(
        wm: &'a WorldModel,
        method: Method,
        cfg: SearchConfig,
        energy: LatentEnergy,
        seed: u64,
    ) -> Self {
        let grid = wm.encoder.grid();
        let sigma = energy.blur * grid.1 as f32;
        LatentPlanner {
            wm,
            method,
            cfg,
            energy,
            margin: 1.0,
            blur: blur_matrix(grid, sigma, &wm.encoder.device()),
            ad_predictor: None,
            zones: Vec::new(),
            position_weight: 0.0,
            goal: None,
            goal_position: [0.0; 2],
            object_weight: 0.0,
            goal_object: None,
            arena_weight: 0.0,
            waypoints: None,
            replan_every: None,
            warm: None,
            queue: Vec::new(),
            rng: Rng::new(seed),
            path: Vec::new(),
        }
    }

    /// Adds `weight` times the distance (arena units) between the agent position the predictor's
    /// state output reaches and where the frozen position probe puts the agent in the goal
    /// image's latents (DINO-WM adds a proprioceptive distance to its latent one the same way),
    /// averaged over every predicted step of the plan: a stage cost, as model-predictive
    /// control usually has, rather than the last step's distance alone, so that of two plans
    /// ending equally close the one that gets there sooner wins. Measured on PointMaze (one
    /// world model, the same 16 episodes): the last step alone reached 13 goals in 431 actions
    /// in all, the mean over the steps 14 in 289. Far from the goal, where patch latents no
    /// longer overlap and the latent distance is flat, it keeps a slope. The state output is
    /// the reading used: it was the steadier one when this was measured (`amity bench plan`'s
    /// drift line; without the read-out loss the probe on the predicted latents drifted by ~3
    /// arena units over 5 predictor steps, with it the two are within ~0.1 of each other).
    pub fn with_position_weight(mut self, weight: f32) -> Self {
        self.position_weight = weight;
        self
    }

    /// Adds `weight` times the distance (arena units) between where the frozen object probe
    /// puts the task's object (PushBlock's block) in the predicted final latents and in the
    /// goal image's latents: the latent distance read through a fixed linear map that keeps
    /// what matters for the task, since the plain distance on a tiny encoder weighs every token
    /// alike and the block is one token of sixteen. Unlike the agent, the object has no
    /// proprioception: this term rests on the predicted latents alone. No effect on a world
    /// model without an object probe.
    pub fn with_object_weight(mut self, weight: f32) -> Self {
        self.object_weight = weight;
        self
    }

    /// Adds `weight` times how far (arena units) the predicted positions lie outside the arena:
    /// the probe's agent at every predictor step, the predicted state at the end, and the
    /// object at the end. Nothing can be there, so such a prediction is the world model
    /// extrapolating beyond its data (a held full-force action into a wall), and a planner that
    /// minimises through it exploits the error. A soft cost, not a guardrail: it steers the
    /// search back to what the model knows.
    pub fn with_arena_weight(mut self, weight: f32) -> Self {
        self.arena_weight = weight;
        self
    }

    /// Plans on two levels: before each search, `high` picks a waypoint for the agent from the
    /// agent's position (proprioception), where the frozen object probe reads the task's
    /// object in the encoded frame, and where it reads it in the goal image; the position term
    /// then measures the predicted agent against that waypoint instead of against the goal
    /// image's agent. The predictor is trusted with what it predicts well (the agent's own
    /// motion), the high level with what it predicts badly (which contact moves the object
    /// where). No effect on a world model without an object probe.
    pub fn with_waypoints(mut self, high: HighLevel<'a>) -> Self {
        self.waypoints = Some(high);
        self
    }

    /// Searches again after `steps` environment steps (at least 1, at most the frameskip)
    /// instead of after the whole first action: closer control for the price of more searches
    /// per action. The plans themselves still hold each action for the frameskip, as the world
    /// model was trained.
    pub fn with_replan_every(mut self, steps: usize) -> Self {
        self.replan_every = Some(steps);
        self
    }

    /// The two-level planner: `high` picks the agent's waypoints from the probes' readings
    /// ([`LatentPlanner::with_waypoints`]) and the latent planner reaches them, with the
    /// measured weights [`TWO_LEVEL_WEIGHTS`], a search after every environment step and a
    /// horizon of [`TWO_LEVEL_HORIZON`] predictor steps (so that an action still takes well
    /// under a second).
    pub fn two_level(
        wm: &'a WorldModel,
        method: Method,
        cfg: &SearchConfig,
        energy: LatentEnergy,
        seed: u64,
        high: HighLevel<'a>,
    ) -> Self {
        let cfg = SearchConfig {
            horizon: TWO_LEVEL_HORIZON,
            ..cfg.clone()
        };
        LatentPlanner::new(wm, method, cfg, energy, seed)
            .with_readout_weights(TWO_LEVEL_WEIGHTS)
            .with_waypoints(high)
            .with_replan_every(1)
    }

    /// Sets all three read-out terms' weights.
    pub fn with_readout_weights(self, w: ReadoutWeights) -> Self {
        self.with_position_weight(w.position)
            .with_object_weight(w.object)
            .with_arena_weight(w.arena)
    }

    /// Points of the way from `a` to `b` inside any forbidden zone grown by the margin.
    fn inside_zones(&self, a: [f32; 2], b: [f32; 2]) -> usize {
        self.zones
            .iter()
            .map(|zone| crossings(zone, a, b, self.margin))
            .sum()
    }

    /// Environment steps each planned action is held for (the world model's frameskip).
    pub fn hold(&self) -> usize {
        self.wm.config.frameskip.max(1)
    }

    /// Energies of candidate sequences from latents `z0 [1, P, D]` and state `s0`, and the
    /// probe's agent path of each (arena units, one point per predictor step). Each action of a
    /// candidate is held for [`LatentPlanner::hold`] environment steps.
    pub fn energies(
        &self,
        z0: &Tensor<3>,
        s0: [f32; 4],
        cands: &[Vec<Action>],
    ) -> (Vec<f32>, Vec<Vec<[f32; 2]>>) {
        let parts = self.energy_parts(z0, s0, cands);
        let e = parts
            .goal
            .iter()
            .zip(&parts.violations)
            .map(|(g, v)| g + FORBIDDEN * *v as f32)
            .collect();
        (e, parts.paths)
    }

    /// [`LatentPlanner::energies`] in parts: the goal energy (latent distance, position, object
    /// and arena terms) and the guardrail's count of predicted points inside a zone, kept apart
    /// so that the energy landscape can be measured without the guardrails.
    pub fn energy_parts(&self, z0: &Tensor<3>, s0: [f32; 4], cands: &[Vec<Action>]) -> EnergyParts {
        let n = cands.len();
        let h = cands[0].len();
        let [_, p, d] = z0.dims();
        let device = z0.device();
        let history = self.wm.config.history();
        let mut z = z0.clone().unsqueeze_dim::<4>(1).expand([n, 1, p, d]);
        let mut s = Tensor::<3>::from_data(TensorData::new(s0.to_vec(), [1, 1, 4]), &device)
            .expand([n, 1, 4]);
        let hold = self.hold();
        let acts: Vec<f32> = cands
            .iter()
            .flat_map(|c| {
                c.iter()
                    .flat_map(|a| std::iter::repeat_n(*a, hold).flatten())
            })
            .collect();
        let acts = Tensor::<3>::from_data(TensorData::new(acts, [n, h, 2 * hold]), &device);
        let mut paths = vec![Vec::with_capacity(h); n];
        let mut bad = vec![0usize; n];
        // The agent's present position (proprioception is centred and scaled by half the arena).
        let here = proprio_position(&s0);
        let mut prev = vec![here; n];
        let mut prev_state = vec![here; n];
        // Sum over the predicted steps of the state's distance to the goal position.
        let mut to_goal = vec![0f32; n];
        // The last predicted latents on the host (read again by the object term).
        let mut host = Vec::new();
        for _ in 0..h {
            let (zn, sn) = self
                .wm
                .predictor
                .next_step(history, z.clone(), s.clone(), acts.clone());
            // Guardrail: where does the probe put the agent?
            host = host_f32(zn.clone().reshape([n, p * d]));
            let pos = self.wm.probe_positions(&host);
            let states = host_f32(sn.clone().reshape([n, 4]));
            for i in 0..n {
                // The predictor's own state output is a second, independent reading of where the
                // agent will be: a sequence is refused if either puts it in a zone.
                let st = proprio_position(&states[4 * i..4 * i + 4]);
                // A predictor step spans `hold` environment steps: check the way between the
                // predicted points, not only the points.
                bad[i] += self.inside_zones(prev_state[i], st) + self.inside_zones(prev[i], pos[i]);
                prev_state[i] = st;
                to_goal[i] += crate::env::dist(st, self.goal_position);
                prev[i] = pos[i];
                paths[i].push(pos[i]);
            }
            z = Tensor::cat(vec![z, zn], 1);
            s = Tensor::cat(vec![s, sn], 1);
        }
        let objects = match self.goal_object {
            Some(_) if self.object_weight > 0.0 || self.arena_weight > 0.0 => {
                self.wm.object_positions(&host)
            }
            _ => None,
        };
        let predicted = z.narrow(1, 1, h);
        // The goal energy reads the last step (a stage cost over every step was measured and
        // did not help: the predictor ranks no step's distances as the encoder does).
        let mut goal = self.goal_distance(predicted.clone().narrow(1, h - 1, 1).reshape([n, p, d]));
        if let (Some(objects), Some(target)) = (&objects, self.goal_object) {
            for (g, o) in goal.iter_mut().zip(objects) {
                *g += self.object_weight * crate::env::dist(*o, target);
            }
        }
        if self.arena_weight > 0.0 {
            for (i, g) in goal.iter_mut().enumerate() {
                let mut out: f32 = paths[i].iter().map(|p| outside_arena(*p)).sum();
                out += outside_arena(prev_state[i]);
                if let Some(objects) = &objects {
                    out += outside_arena(objects[i]);
                }
                *g += self.arena_weight * out;
            }
        }
        if self.position_weight > 0.0 {
            for (g, sum) in goal.iter_mut().zip(&to_goal) {
                *g += self.position_weight * sum / h as f32;
            }
        }
        EnergyParts {
            goal,
            violations: bad,
            paths,
            predicted,
        }
    }

    /// The latent part of the energy: the [`LatentEnergy`] distance of each of `fin [N, P, D]`
    /// to the goal's latents.
    pub fn goal_distance(&self, fin: Tensor<3>) -> Vec<f32> {
        let goal = self.goal.clone().expect("begin() sets the goal");
        host_f32(latent_distance(
            fin,
            goal,
            self.blur.clone(),
            self.energy.metric,
        ))
    }

    /// Gradient descent on the actions: the latent distance of the rollout's
    /// final latents to the goal is differentiated through the predictor with respect to the
    /// actions; each step moves every action against its gradient (normalised to `step` at the
    /// largest component) and clamps it to the bounds. A fixed step can overshoot, so the result
    /// is the better (by the full energy) of the last iterate and the best one seen, the start
    /// included: descent never returns a plan worse than it began with. The guardrails are not differentiable:
    /// the result is scored by [`LatentPlanner::energies`] like any plan, and a plan that enters
    /// a forbidden zone is replaced by standing still.
    pub fn descend(
        &mut self,
        z0: &Tensor<3>,
        s0: [f32; 4],
        start: Vec<Action>,
        steps: usize,
        step: f32,
    ) -> Plan {
        let ad = self.wm.encoder.device().autodiff();
        let predictor = self.ad_predictor.get_or_insert_with(|| {
            let shell = crate::world::predictor::ActionPredictor::new(
                &self.wm.config,
                self.wm.encoder.tokens(),
                self.wm.encoder.width(),
                &ad,
            );
            amity_shared::model::flat::load_flat(
                shell,
                &amity_shared::model::flat::to_flat(&self.wm.predictor),
            )
            .expect("the same layout")
        });
        let h = start.len();
        let [_, p, d] = z0.dims();
        let goal = Tensor::from_inner(self.goal.clone().expect("begin() sets the goal"));
        let blur = self.blur.clone().map(Tensor::from_inner);
        let history = self.wm.config.history();
        let mut actions: Vec<f32> = start.iter().flat_map(|a| *a).collect();
        // A fixed step can overshoot: the best iterate seen (the start included) is kept.
        let mut best = (f32::INFINITY, actions.clone());
        for _ in 0..steps {
            let a = Tensor::<3>::from_data(TensorData::new(actions.clone(), [1, h, 2]), &ad)
                .require_grad();
            // Each action held for the frameskip: the predictor's action is it repeated.
            let held = a.clone().repeat_dim(2, self.wm.config.frameskip.max(1));
            let mut z = Tensor::from_inner(z0.clone()).unsqueeze_dim::<4>(1);
            let mut s = Tensor::<3>::from_data(TensorData::new(s0.to_vec(), [1, 1, 4]), &ad);
            for _ in 0..h {
                let (zn, sn) = predictor.next_step(history, z.clone(), s.clone(), held.clone());
                z = Tensor::cat(vec![z, zn], 1);
                s = Tensor::cat(vec![s, sn], 1);
            }
            let fin: Tensor<3> = z.narrow(1, h, 1).reshape([1, p, d]);
            let loss = latent_distance(fin, goal.clone(), blur.clone(), self.energy.metric).sum();
            let value: f32 = loss.clone().inner().into_scalar();
            if value < best.0 {
                best = (value, actions.clone());
            }
            let grads = loss.backward();
            let Some(g) = a.grad(&grads) else { break };
            let g = host_f32(g);
            let top = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            for (x, gi) in actions.iter_mut().zip(&g) {
                *x = (*x - step * gi / top).clamp(-1.0, 1.0);
            }
        }
        let to_plan =
            |v: &[f32]| -> Vec<Action> { v.chunks_exact(2).map(|c| [c[0], c[1]]).collect() };
        let (last, kept) = (to_plan(&actions), to_plan(&best.1));
        let scored = self.energies(z0, s0, &[last.clone(), kept.clone()]).0;
        let (plan, energy) = if scored[0] <= scored[1] {
            (last, scored[0])
        } else {
            (kept, scored[1])
        };
        if energy >= FORBIDDEN {
            return Plan {
                actions: vec![[0.0, 0.0]; h],
                energy,
            };
        }
        Plan {
            actions: plan,
            energy,
        }
    }

    /// Plans from the current frame: the plan and the probe's expected agent path.
    pub fn plan(&mut self, env: &dyn Env) -> Plan {
        let frame = env.render();
        let z0 = self.wm.encoder.encode(&[&frame]);
        let s0 = env.proprio();
        if let (Some(high), Some(target)) = (self.waypoints, self.goal_object)
            && let Some(objects) = self.wm.object_positions(&host_f32(z0.clone()))
        {
            self.goal_position = high.waypoint(proprio_position(&s0), objects[0], target);
        }
        let warm = self.warm.take();
        if self.method == Method::Gd {
            let start = warm.unwrap_or_else(|| vec![[0.0, 0.0]; self.cfg.horizon]);
            let plan = self.descend(&z0, s0, start, 20, 0.15);
            self.path = self
                .energies(&z0, s0, std::slice::from_ref(&plan.actions))
                .1
                .remove(0);
            self.warm = Some(shift(&plan.actions));
            return plan;
        }
        let mut rng = std::mem::replace(&mut self.rng, Rng::new(0));
        let plan = {
            let me = &*self;
            let mut energy = |c: &[Vec<Action>]| me.energies(&z0, s0, c).0;
            search(
                self.method,
                &self.cfg,
                warm.as_deref(),
                &mut rng,
                &mut energy,
            )
        };
        self.rng = rng;
        self.path = self
            .energies(&z0, s0, std::slice::from_ref(&plan.actions))
            .1
            .remove(0);
        self.warm = Some(shift(&plan.actions));
        plan
    }
}

impl Policy for LatentPlanner<'_> {
    fn begin(&mut self, env: &dyn Env) {
        let goal = self.wm.encoder.encode(&[&env.goal_frame()]);
        let host = host_f32(goal.clone());
        self.goal_position = self.wm.probe_positions(&host)[0];
        self.goal_object = self.wm.object_positions(&host).map(|o| o[0]);
        self.goal = Some(goal);
        self.zones = env.forbidden().to_vec();
        self.warm = None;
        self.queue.clear();
    }

    fn act(&mut self, env: &dyn Env) -> Action {
        if self.queue.is_empty() {
            let first = self.plan(env).actions[0];
            let steps = self
                .replan_every
                .unwrap_or(self.hold())
                .clamp(1, self.hold());
            self.queue = vec![first; steps];
        }
        self.queue.remove(0)
    }

    fn expected_path(&self) -> Vec<[f32; 2]> {
        self.path.clone()
    }
}

/// The same search on the true simulator: the ceiling for any world model.
pub struct OraclePlanner {
    method: Method,
    cfg: SearchConfig,
    hold: usize,
    warm: Option<Vec<Action>>,
    queue: Vec<Action>,
    rng: Rng,
}

impl OraclePlanner {
    /// An oracle whose plans hold each action for `hold` steps (as the latent planner does
    /// with its world model's frameskip, so both search the same space).
    pub fn new(method: Method, cfg: SearchConfig, hold: usize, seed: u64) -> Self {
        OraclePlanner {
            method,
            cfg,
            hold: hold.max(1),
            warm: None,
            queue: Vec::new(),
            rng: Rng::new(seed),
        }
    }
}

impl Policy for OraclePlanner {
    fn begin(&mut self, _env: &dyn Env) {
        self.warm = None;
        self.queue.clear();
    }

    fn act(&mut self, env: &dyn Env) -> Action {
        if !self.queue.is_empty() {
            return self.queue.remove(0);
        }
        let hold = self.hold;
        let state = env.state();
        let mut sim = env.boxed_clone();
        let mut energy = |cands: &[Vec<Action>]| -> Vec<f32> {
            cands
                .iter()
                .map(|c| {
                    sim.set_state(&state);
                    let mut bad = false;
                    // The latent planner's stage cost, on the true state: the goal distance
                    // after every held action, averaged over the plan.
                    let mut to_goal = 0.0;
                    for a in c {
                        for _ in 0..hold {
                            sim.step(*a);
                            bad |= sim.forbidden().iter().any(|z| z.contains(sim.agent(), 0.0));
                        }
                        to_goal += sim.goal_distance();
                    }
                    to_goal / c.len().max(1) as f32 + if bad { FORBIDDEN } else { 0.0 }
                })
                .collect()
        };
        let plan = search(
            self.method,
            &self.cfg,
            self.warm.as_deref(),
            &mut self.rng,
            &mut energy,
        );
        self.warm = Some(shift(&plan.actions));
        self.queue = vec![plan.actions[0]; hold - 1];
        plan.actions[0]
    }
}

/// Uniform random actions.
pub struct RandomPolicy {
    rng: Rng,
}

impl RandomPolicy {
    /// A seeded random policy.
    pub fn new(seed: u64) -> Self {
        RandomPolicy {
            rng: Rng::new(seed),
        }
    }
}

impl Policy for RandomPolicy {
    fn begin(&mut self, _env: &dyn Env) {}

    fn act(&mut self, _env: &dyn Env) -> Action {
        let mut u = || (self.rng.uniform() * 2.0 - 1.0) as f32;
        clamp_action([u(), u()])
    }
}

/// How an episode went.
#[derive(Debug, Clone)]
pub struct Episode {
    /// Whether the task was done within the step limit.
    pub success: bool,
    /// Actions taken.
    pub steps: usize,
    /// Mean wall-clock milliseconds to choose an action.
    pub ms_per_action: f64,
    /// Whether the agent was ever inside a forbidden zone (true simulator).
    pub entered_forbidden: bool,
    /// The real frames, first to last.
    pub frames: Vec<Vec<u8>>,
    /// The agent path the policy expected at each step (empty for policies without a model).
    pub expected: Vec<Vec<[f32; 2]>>,
}

/// Runs one episode of `env` (seeded) under `policy` for at most `max_steps` actions.
pub fn run_episode(
    env: &mut dyn Env,
    seed: u64,
    policy: &mut dyn Policy,
    max_steps: usize,
    keep_frames: bool,
) -> Episode {
    env.reset(seed);
    run_from(env, policy, max_steps, keep_frames)
}

/// [`run_episode`] from the environment's current state (for hand-made situations).
pub fn run_from(
    env: &mut dyn Env,
    policy: &mut dyn Policy,
    max_steps: usize,
    keep_frames: bool,
) -> Episode {
    policy.begin(env);
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    if keep_frames {
        frames.push(env.render());
    }
    let mut thinking = 0.0;
    let mut steps = 0;
    let mut entered = false;
    while steps < max_steps && !env.success() {
        let t = Instant::now();
        let a = policy.act(env);
        thinking += t.elapsed().as_secs_f64();
        env.step(a);
        steps += 1;
        entered |= env.forbidden().iter().any(|z| z.contains(env.agent(), 0.0));
        if keep_frames {
            frames.push(env.render());
            expected.push(policy.expected_path());
        }
    }
    Episode {
        success: env.success(),
        steps,
        ms_per_action: 1000.0 * thinking / steps.max(1) as f64,
        entered_forbidden: entered,
        frames,
        expected,
    }
}

#[cfg(test)]
mod tests;
