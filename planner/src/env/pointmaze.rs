//! PointMaze: a disc with momentum steers around a wall to a goal; an invisible no-go zone
//! (a guardrail) sits on one of the two ways around.

use amity_shared::rng::Rng;
use rapier2d::prelude::*;

use super::render::{AGENT, Canvas, WALL};
use super::{Action, Env, World, Zone, clamp_action, dist, random_point};

/// Agent radius.
pub const RADIUS: f32 = 0.9;
/// Force at full action.
const FORCE: f32 = 22.0;
/// Velocity damping (floor friction).
const DAMPING: f32 = 3.0;
/// Done within this distance of the goal.
pub const SUCCESS_RADIUS: f32 = 1.0;
/// The wall in the middle: centre and half extents.
const WALL_AT: ([f32; 2], [f32; 2]) = ([5.0, 5.0], [2.2, 0.45]);
/// The no-go zone: above the middle of the wall, where the straight way between the two
/// upper corners runs (the agent must go round below the wall or squeeze past the zone).
pub const NO_GO: Zone = Zone {
    min: [4.2, 6.6],
    max: [5.8, 10.0],
};

/// The environment.
pub struct PointMaze {
    size: usize,
    world: World,
    agent: RigidBodyHandle,
    goal: [f32; 2],
    zones: [Zone; 1],
}

impl PointMaze {
    /// An environment rendering `size x size` frames (call [`Env::reset`] first).
    pub fn new(size: usize) -> Self {
        let mut world = World::new(&[WALL_AT]);
        let agent = world.add_body(
            [2.0, 2.0],
            (DAMPING, 0.0),
            ColliderBuilder::ball(RADIUS).density(1.0).friction(0.0),
        );
        PointMaze {
            size,
            world,
            agent,
            goal: [8.0, 8.0],
            zones: [NO_GO],
        }
    }

    fn free(p: [f32; 2]) -> bool {
        let (c, h) = WALL_AT;
        let clear = RADIUS + 0.3;
        let off_wall = (p[0] - c[0]).abs() > h[0] + clear || (p[1] - c[1]).abs() > h[1] + clear;
        off_wall && !NO_GO.contains(p, RADIUS + 0.3)
    }

    fn draw(&self, agent: [f32; 2]) -> Vec<u8> {
        let mut c = Canvas::new(self.size);
        c.rect(WALL_AT.0, WALL_AT.1, WALL);
        c.disc(agent, RADIUS, AGENT);
        c.into_rgb()
    }
}

impl Env for PointMaze {
    fn reset(&mut self, seed: u64) {
        let mut rng = Rng::derive(seed, &[0x9e11]);
        let draw = |rng: &mut Rng| loop {
            let p = random_point(rng, RADIUS + 0.2);
            if Self::free(p) {
                return p;
            }
        };
        // Start and goal on opposite sides of the wall half of the time.
        let start = draw(&mut rng);
        let goal = loop {
            let g = draw(&mut rng);
            if dist(g, start) > 4.0 {
                break g;
            }
        };
        self.goal = goal;
        self.world
            .set_body_state(self.agent, &[start[0], start[1], 0.0, 0.0, 0.0, 0.0]);
    }

    fn step(&mut self, action: Action) {
        let a = clamp_action(action);
        self.world.act(self.agent, [a[0] * FORCE, a[1] * FORCE]);
    }

    fn render(&self) -> Vec<u8> {
        self.draw(self.agent())
    }

    fn goal_frame(&self) -> Vec<u8> {
        self.draw(self.goal)
    }

    fn success(&self) -> bool {
        self.goal_distance() == 0.0
    }

    fn goal_distance(&self) -> f32 {
        (dist(self.agent(), self.goal) - SUCCESS_RADIUS).max(0.0)
    }

    fn agent(&self) -> [f32; 2] {
        self.world.position(self.agent)
    }

    fn proprio(&self) -> [f32; 4] {
        self.world.proprio(self.agent)
    }

    fn state(&self) -> Vec<f32> {
        let mut s = self.world.body_state(self.agent).to_vec();
        s.extend(self.goal);
        s
    }

    fn set_state(&mut self, state: &[f32]) {
        self.world.set_body_state(self.agent, &state[..6]);
        self.goal = [state[6], state[7]];
    }

    fn forbidden(&self) -> &[Zone] {
        &self.zones
    }

    fn boxed_clone(&self) -> Box<dyn Env> {
        let mut e = PointMaze::new(self.size);
        e.set_state(&self.state());
        Box::new(e)
    }

    fn scripted_action(&self, noise: [f32; 2]) -> Action {
        // Head for the goal; when the wall is in the way, go round its left end: left along our
        // side, then past the end. (The scripted policy ignores the no-go zone: the collected
        // data shows the agent there too, which the position probe needs.)
        let p = self.agent();
        let (c, h) = WALL_AT;
        let left_x = c[0] - h[0] - RADIUS - 0.5;
        let across = (p[1] > c[1]) != (self.goal[1] > c[1]);
        let target = if !across {
            self.goal
        } else if p[0] > left_x + 0.3 {
            [left_x, p[1]]
        } else {
            [left_x, self.goal[1]]
        };
        let v = self.world.body_state(self.agent);
        let d = [target[0] - p[0], target[1] - p[1]];
        // A PD controller: towards the target, braking with the velocity.
        let a = [
            0.6 * d[0] - 0.35 * v[3] + noise[0],
            0.6 * d[1] - 0.35 * v[4] + noise[1],
        ];
        clamp_action(a)
    }
}
