//! The bundled environments: deterministic 2-D physics (rapier2d) rendered to RGB frames
//! (tiny-skia) at the encoder's resolution.
//!
//! Both live in a 10 x 10 arena (physics units; y up) walled on every side. The agent is a disc
//! pushed by a 2-D action in `[-1, 1]^2`: a force held for [`ACTION_SECONDS`] of simulated
//! time (a "frame skip", as DINO-WM plans), against damping that stands in for floor friction,
//! so the agent has momentum. Everything random (starts, goals) comes from the episode seed.

pub mod pointmaze;
pub mod pushblock;
pub mod render;

use rapier2d::prelude::*;

pub use pointmaze::PointMaze;
pub use pushblock::PushBlock;

/// Side of the square arena, physics units.
pub const ARENA: f32 = 10.0;
/// Simulated seconds one action is held for.
pub const ACTION_SECONDS: f32 = 0.25;
/// Physics steps per action.
pub const SUBSTEPS: usize = 10;

/// An action: a force direction and strength, each component in `[-1, 1]`.
pub type Action = [f32; 2];

/// Clamps an action to the bounds every environment enforces (a hard guardrail).
pub fn clamp_action(a: Action) -> Action {
    [a[0].clamp(-1.0, 1.0), a[1].clamp(-1.0, 1.0)]
}

/// An axis-aligned rectangle in arena coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Zone {
    /// Lower-left corner.
    pub min: [f32; 2],
    /// Upper-right corner.
    pub max: [f32; 2],
}

impl Zone {
    /// Whether `p` lies inside, grown by `margin` on every side.
    pub fn contains(&self, p: [f32; 2], margin: f32) -> bool {
        (0..2).all(|i| p[i] >= self.min[i] - margin && p[i] <= self.max[i] + margin)
    }
}

/// The environments by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// A point agent with momentum navigating around walls to a goal.
    PointMaze,
    /// An agent pushing a block with mass and friction onto a target pad.
    PushBlock,
}

impl std::str::FromStr for EnvKind {
    type Err = amity_shared::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pointmaze" => Ok(EnvKind::PointMaze),
            "pushblock" => Ok(EnvKind::PushBlock),
            other => Err(amity_shared::UnknownName {
                what: "environment",
                got: other.to_owned(),
                expected: &["pointmaze", "pushblock"],
            }),
        }
    }
}

/// A task's contact rule, the high level of a two-level plan
/// ([`crate::plan::LatentPlanner::with_waypoints`]): from the agent's position, the task
/// object's and the object's target (arena units), where the agent should head next.
pub type WaypointRule = fn(agent: [f32; 2], object: [f32; 2], target: [f32; 2]) -> [f32; 2];

impl EnvKind {
    /// The environment's contact rule for a two-level plan, if its task moves an object
    /// (PushBlock: [`pushblock::push_waypoint`]).
    pub fn waypoint_rule(self) -> Option<WaypointRule> {
        match self {
            EnvKind::PointMaze => None,
            EnvKind::PushBlock => Some(pushblock::push_waypoint),
        }
    }
}

impl std::fmt::Display for EnvKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EnvKind::PointMaze => "pointmaze",
            EnvKind::PushBlock => "pushblock",
        })
    }
}

/// What every environment offers the planner, the data collector and the tests.
pub trait Env: Send {
    /// Starts episode `seed`: a new start state and goal.
    fn reset(&mut self, seed: u64);
    /// Applies `action` (clamped to the bounds) for [`ACTION_SECONDS`].
    fn step(&mut self, action: Action);
    /// The current frame, `size x size x 3` RGB bytes.
    fn render(&self) -> Vec<u8>;
    /// The goal as an image: the scene as it looks when the task is done.
    fn goal_frame(&self) -> Vec<u8>;
    /// Whether the task is done, judged on the true state.
    fn success(&self) -> bool;
    /// Distance of the true state from done (0 when done): what the oracle planner minimises.
    fn goal_distance(&self) -> f32;
    /// The agent's position.
    fn agent(&self) -> [f32; 2];
    /// The position of the object the task is about moving (PushBlock's block), if any.
    fn object(&self) -> Option<[f32; 2]> {
        None
    }
    /// Proprioception, the predictor's state token: agent position and velocity, scaled to
    /// about `[-1, 1]`.
    fn proprio(&self) -> [f32; 4];
    /// The full physical state (to copy an environment for the oracle planner).
    fn state(&self) -> Vec<f32>;
    /// Restores a state from [`Env::state`] (same episode).
    fn set_state(&mut self, state: &[f32]);
    /// Areas the agent must never enter (guardrails).
    fn forbidden(&self) -> &[Zone];
    /// A copy of this environment in its current state.
    fn boxed_clone(&self) -> Box<dyn Env>;
    /// A scripted, noisy action that makes progress on the task (for data collection).
    fn scripted_action(&self, noise: [f32; 2]) -> Action;
}

/// Builds an environment rendering at `size` pixels.
pub fn make(kind: EnvKind, size: usize) -> Box<dyn Env> {
    match kind {
        EnvKind::PointMaze => Box::new(PointMaze::new(size)),
        EnvKind::PushBlock => Box::new(PushBlock::new(size)),
    }
}

/// A rapier world with the arena's walls: the shared part of both environments.
pub struct World {
    pub(crate) physics: PhysicsWorld,
}

impl World {
    /// An empty arena walled on all four sides, plus `walls` (centre, half extents).
    pub fn new(walls: &[([f32; 2], [f32; 2])]) -> Self {
        let mut physics = PhysicsWorld::new();
        physics.gravity = Vector::ZERO;
        physics.integration_parameters.dt = ACTION_SECONDS / SUBSTEPS as f32;
        let t = 0.5;
        let border = [
            ([ARENA / 2.0, -t], [ARENA / 2.0 + t, t]),
            ([ARENA / 2.0, ARENA + t], [ARENA / 2.0 + t, t]),
            ([-t, ARENA / 2.0], [t, ARENA / 2.0 + t]),
            ([ARENA + t, ARENA / 2.0], [t, ARENA / 2.0 + t]),
        ];
        for (c, h) in border.iter().chain(walls) {
            physics.colliders.insert(
                ColliderBuilder::cuboid(h[0], h[1])
                    .translation(Vector::new(c[0], c[1]))
                    .friction(0.3)
                    .build(),
            );
        }
        World { physics }
    }

    /// Adds a dynamic body with one collider; returns its handle.
    pub fn add_body(
        &mut self,
        at: [f32; 2],
        damping: (f32, f32),
        collider: ColliderBuilder,
    ) -> RigidBodyHandle {
        let body = RigidBodyBuilder::dynamic()
            .translation(Vector::new(at[0], at[1]))
            .linear_damping(damping.0)
            .angular_damping(damping.1)
            .can_sleep(false)
            .build();
        let h = self.physics.bodies.insert(body);
        let p = &mut self.physics;
        p.colliders
            .insert_with_parent(collider.build(), h, &mut p.bodies);
        h
    }

    /// Holds `force` on `agent` for one action.
    pub fn act(&mut self, agent: RigidBodyHandle, force: [f32; 2]) {
        for _ in 0..SUBSTEPS {
            if let Some(b) = self.physics.bodies.get_mut(agent) {
                b.reset_forces(true);
                b.add_force(Vector::new(force[0], force[1]), true);
            }
            self.physics.step();
        }
    }

    /// Position, rotation, velocity and angular velocity of a body.
    pub fn body_state(&self, h: RigidBodyHandle) -> [f32; 6] {
        let b = &self.physics.bodies[h];
        let (p, v) = (b.translation(), b.linvel());
        [p.x, p.y, b.rotation().angle(), v.x, v.y, b.angvel()]
    }

    /// A body's position.
    pub fn position(&self, h: RigidBodyHandle) -> [f32; 2] {
        let s = self.body_state(h);
        [s[0], s[1]]
    }

    /// A body's proprioception: position and velocity scaled to about `[-1, 1]` (undo the
    /// position's scaling with [`proprio_position`]).
    pub fn proprio(&self, h: RigidBodyHandle) -> [f32; 4] {
        let s = self.body_state(h);
        let c = ARENA / 2.0;
        [(s[0] - c) / c, (s[1] - c) / c, s[3] / 8.0, s[4] / 8.0]
    }

    /// Sets what [`World::body_state`] returns.
    pub fn set_body_state(&mut self, h: RigidBodyHandle, s: &[f32]) {
        let b = &mut self.physics.bodies[h];
        b.set_translation(Vector::new(s[0], s[1]), true);
        b.set_rotation(Rotation::new(s[2]), true);
        b.set_linvel(Vector::new(s[3], s[4]), true);
        b.set_angvel(s[5], true);
        b.reset_forces(true);
    }
}

/// A seeded draw of a point in the arena at least `margin` from the border.
pub(crate) fn random_point(rng: &mut amity_shared::rng::Rng, margin: f32) -> [f32; 2] {
    let span = ARENA - 2.0 * margin;
    [
        margin + rng.uniform() as f32 * span,
        margin + rng.uniform() as f32 * span,
    ]
}

/// The position (arena units) in a proprioception vector of [`World::proprio`] (or a predicted
/// one), the inverse of its scaling.
pub fn proprio_position(s: &[f32]) -> [f32; 2] {
    let c = ARENA / 2.0;
    [s[0] * c + c, s[1] * c + c]
}

pub(crate) fn dist(a: [f32; 2], b: [f32; 2]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roll(kind: EnvKind, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut env = make(kind, 32);
        env.reset(seed);
        for i in 0..12 {
            let t = i as f32 * 0.7;
            env.step([t.sin(), t.cos()]);
        }
        (env.render(), env.state())
    }

    #[test]
    fn episodes_are_deterministic_from_the_seed() {
        for kind in [EnvKind::PointMaze, EnvKind::PushBlock] {
            assert_eq!(roll(kind, 5), roll(kind, 5), "{kind}");
            assert_ne!(roll(kind, 5).1, roll(kind, 6).1, "{kind}");
        }
    }

    #[test]
    fn set_state_reproduces_the_future() {
        for kind in [EnvKind::PointMaze, EnvKind::PushBlock] {
            let mut a = make(kind, 32);
            a.reset(3);
            a.step([1.0, 0.3]);
            let mut b = a.boxed_clone();
            for _ in 0..5 {
                a.step([-0.4, 0.9]);
                b.step([-0.4, 0.9]);
            }
            let (sa, sb) = (a.state(), b.state());
            for (x, y) in sa.iter().zip(&sb) {
                assert!((x - y).abs() < 1e-3, "{kind}: {sa:?} vs {sb:?}");
            }
        }
    }

    #[test]
    fn scripted_policies_reach_their_goals() {
        // PushBlock's scripted policy follows its contact rule, the two-level planner's high
        // level, on the true state: within the bench's 40 actions it must solve the bench's
        // episodes, or no planner built on the rule can.
        for (kind, seeds, steps, least) in [
            (EnvKind::PointMaze, 0..10u64, 60, 8),
            (EnvKind::PushBlock, 900_000..900_020, 40, 19),
        ] {
            let (mut wins, n) = (0, seeds.end - seeds.start);
            for seed in seeds {
                let mut env = make(kind, 32);
                env.reset(seed);
                for _ in 0..steps {
                    if env.success() {
                        break;
                    }
                    let a = env.scripted_action([0.0, 0.0]);
                    env.step(a);
                }
                wins += env.success() as usize;
            }
            assert!(
                wins >= least,
                "{kind}: scripted policy succeeded {wins}/{n}"
            );
        }
    }

    #[test]
    fn walls_stop_the_agent() {
        let mut env = make(EnvKind::PointMaze, 32);
        env.reset(1);
        for _ in 0..40 {
            env.step([1.0, 1.0]);
        }
        let p = env.agent();
        assert!(p[0] < ARENA && p[1] < ARENA, "{p:?}");
    }
}
