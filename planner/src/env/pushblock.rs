//! PushBlock: the agent pushes a heavy, rubbing block onto a target pad.

use amity_shared::rng::Rng;
use rapier2d::prelude::*;

use super::render::{AGENT, BLOCK, Canvas, PAD};
use super::{Action, Env, World, Zone, clamp_action, dist, random_point};

/// Agent radius.
pub const RADIUS: f32 = 0.8;
/// Half side of the block.
pub const HALF: f32 = 0.9;
/// Pad radius (drawn).
pub const PAD_RADIUS: f32 = 1.1;
/// Done when the block's centre is this close to the pad's.
pub const SUCCESS_RADIUS: f32 = 0.8;
const FORCE: f32 = 30.0;
const AGENT_DAMPING: f32 = 3.0;
/// Floor friction on the block, as damping (mass about 3.2 at density 1).
const BLOCK_DAMPING: (f32, f32) = (4.0, 4.0);

/// The environment.
pub struct PushBlock {
    size: usize,
    world: World,
    agent: RigidBodyHandle,
    block: RigidBodyHandle,
    pad: [f32; 2],
    /// Where the agent stands in the goal image (behind the block, along the push).
    goal_agent: [f32; 2],
}

impl PushBlock {
    /// An environment rendering `size x size` frames (call [`Env::reset`] first).
    pub fn new(size: usize) -> Self {
        let mut world = World::new(&[]);
        let agent = world.add_body(
            [2.0, 2.0],
            (AGENT_DAMPING, 0.0),
            ColliderBuilder::ball(RADIUS).density(1.0).friction(0.4),
        );
        let block = world.add_body(
            [5.0, 5.0],
            BLOCK_DAMPING,
            ColliderBuilder::cuboid(HALF, HALF)
                .density(2.0)
                .friction(0.4),
        );
        PushBlock {
            size,
            world,
            agent,
            block,
            pad: [7.0, 7.0],
            goal_agent: [6.0, 6.0],
        }
    }

    fn draw(&self, agent: [f32; 2], block: [f32; 2], angle: f32) -> Vec<u8> {
        let mut c = Canvas::new(self.size);
        c.disc(self.pad, PAD_RADIUS, PAD);
        c.square(block, HALF, angle, BLOCK);
        c.disc(agent, RADIUS, AGENT);
        c.into_rgb()
    }

    fn block(&self) -> [f32; 3] {
        let s = self.world.body_state(self.block);
        [s[0], s[1], s[2]]
    }
}

/// Where an agent at `agent` should head next to push the block at `block` onto `pad`: the
/// contact rule of PushBlock, from positions alone. Behind the block (opposite the pad) and
/// within its width of the push line, it heads through the block, at a point on the line just
/// past the block's far side; on the wrong side it goes round, keeping clear of the block;
/// otherwise it heads for the spot behind the block on the line.
///
/// The scripted policy of data collection follows it on the true positions; the latent
/// planner's high level ([`crate::plan::LatentPlanner::with_waypoints`]) follows it on the
/// positions its frozen probes read from the encoded frame and goal image.
pub fn push_waypoint(agent: [f32; 2], block: [f32; 2], pad: [f32; 2]) -> [f32; 2] {
    let (p, b) = (agent, block);
    let n = dist(pad, b).max(1e-3);
    let u = [(pad[0] - b[0]) / n, (pad[1] - b[1]) / n];
    let back = HALF * 1.5 + RADIUS + 0.2;
    // How far the agent is from the push line behind the block.
    let rel = [p[0] - b[0], p[1] - b[1]];
    let along = rel[0] * u[0] + rel[1] * u[1];
    let side = (rel[0] * -u[1] + rel[1] * u[0]).abs();
    if along < -HALF && side < HALF {
        // Behind and within the block's width: aim through the block, at a point on the push
        // line just past its far side rather than at the pad, so that an agent off the line
        // steers back onto it as it pushes.
        [b[0] + 1.5 * u[0], b[1] + 1.5 * u[1]]
    } else if along > -HALF {
        // On the wrong side: go round, keeping clear of the block, to a point beside and
        // behind it (reached from anywhere near, it is already behind).
        let perp = [-u[1], u[0]];
        let s = if rel[0] * perp[0] + rel[1] * perp[1] >= 0.0 {
            1.0
        } else {
            -1.0
        };
        [
            b[0] + (perp[0] * s - u[0]) * back,
            b[1] + (perp[1] * s - u[1]) * back,
        ]
    } else {
        [b[0] - u[0] * back, b[1] - u[1] * back]
    }
}

impl Env for PushBlock {
    fn reset(&mut self, seed: u64) {
        let mut rng = Rng::derive(seed, &[0xb10c]);
        let block = random_point(&mut rng, 3.0);
        let pad = loop {
            let p = random_point(&mut rng, 2.0);
            let d = dist(p, block);
            if (2.0..=3.5).contains(&d) {
                break p;
            }
        };
        let agent = loop {
            let p = random_point(&mut rng, RADIUS + 0.2);
            if dist(p, block) > HALF * 1.5 + RADIUS + 0.3 {
                break p;
            }
        };
        self.pad = pad;
        let dir = [pad[0] - block[0], pad[1] - block[1]];
        let n = dist(pad, block).max(1e-3);
        let back = HALF + RADIUS + 0.1;
        self.goal_agent = [pad[0] - dir[0] / n * back, pad[1] - dir[1] / n * back];
        self.world
            .set_body_state(self.block, &[block[0], block[1], 0.0, 0.0, 0.0, 0.0]);
        self.world
            .set_body_state(self.agent, &[agent[0], agent[1], 0.0, 0.0, 0.0, 0.0]);
    }

    fn step(&mut self, action: Action) {
        let a = clamp_action(action);
        self.world.act(self.agent, [a[0] * FORCE, a[1] * FORCE]);
    }

    fn render(&self) -> Vec<u8> {
        let b = self.block();
        self.draw(self.agent(), [b[0], b[1]], b[2])
    }

    fn goal_frame(&self) -> Vec<u8> {
        self.draw(self.goal_agent, self.pad, 0.0)
    }

    fn success(&self) -> bool {
        self.goal_distance() == 0.0
    }

    fn goal_distance(&self) -> f32 {
        let b = self.block();
        (dist([b[0], b[1]], self.pad) - SUCCESS_RADIUS).max(0.0)
    }

    fn agent(&self) -> [f32; 2] {
        self.world.position(self.agent)
    }

    fn object(&self) -> Option<[f32; 2]> {
        let b = self.block();
        Some([b[0], b[1]])
    }

    fn proprio(&self) -> [f32; 4] {
        self.world.proprio(self.agent)
    }

    fn state(&self) -> Vec<f32> {
        let mut s = self.world.body_state(self.agent).to_vec();
        s.extend(self.world.body_state(self.block));
        s.extend(self.pad);
        s.extend(self.goal_agent);
        s
    }

    fn set_state(&mut self, state: &[f32]) {
        self.world.set_body_state(self.agent, &state[..6]);
        self.world.set_body_state(self.block, &state[6..12]);
        self.pad = [state[12], state[13]];
        self.goal_agent = [state[14], state[15]];
    }

    fn forbidden(&self) -> &[Zone] {
        &[]
    }

    fn boxed_clone(&self) -> Box<dyn Env> {
        let mut e = PushBlock::new(self.size);
        e.set_state(&self.state());
        Box::new(e)
    }

    fn scripted_action(&self, noise: [f32; 2]) -> Action {
        let p = self.agent();
        let b = self.block();
        let target = push_waypoint(p, [b[0], b[1]], self.pad);
        let v = self.world.body_state(self.agent);
        let d = [target[0] - p[0], target[1] - p[1]];
        clamp_action([
            0.8 * d[0] - 0.3 * v[3] + noise[0],
            0.8 * d[1] - 0.3 * v[4] + noise[1],
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's clearance from the block's centre that no corner of the block can reach.
    const CLEAR: f32 = HALF * std::f32::consts::SQRT_2 + RADIUS;

    #[test]
    fn the_push_rule_pushes_from_behind_and_goes_round_from_the_front() {
        let (block, pad) = ([5.0, 5.0], [8.0, 5.0]);
        // Behind the block on the push line: head just past the block's centre, along the line.
        let w = push_waypoint([2.5, 5.3], block, pad);
        assert!(
            w[0] > block[0] && w[0] < pad[0] && (w[1] - 5.0).abs() < 1e-4,
            "{w:?}"
        );
        // Behind but off the line: the spot behind the block, on the line.
        let w = push_waypoint([2.0, 7.5], block, pad);
        assert!(
            w[0] < block[0] - HALF - RADIUS && (w[1] - 5.0).abs() < 1e-4,
            "{w:?}"
        );
        // In front (between block and pad): a point beside the block, on the agent's side and
        // clear of it, rather than through it.
        for agent in [[7.0, 5.5], [7.0, 4.5], [5.5, 8.0]] {
            let w = push_waypoint(agent, block, pad);
            assert!(dist(w, block) > CLEAR, "{agent:?} -> {w:?}");
            assert_eq!(w[1] > 5.0, agent[1] > 5.0, "{agent:?} -> {w:?}");
        }
    }
}
