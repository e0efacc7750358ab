//! The high level of a two-level plan ([`super::LatentPlanner::two_level`]).

use crate::env::WaypointRule;
use crate::world::subgoal::SubgoalModel;

/// The high level of a two-level plan: what picks the agent's next waypoint from its position,
/// where the object probe reads the task's object, and where it reads it in the goal image.
#[derive(Debug, Clone, Copy)]
pub enum HighLevel<'a> {
    /// The world model's subgoal proposer, learnt from its collected data
    /// ([`crate::world::subgoal`]).
    Learnt(&'a SubgoalModel),
    /// A task's hand-written contact rule (PushBlock's [`crate::env::pushblock::push_waypoint`]):
    /// the baseline the learnt one is measured against.
    Rule(WaypointRule),
}

impl HighLevel<'_> {
    /// The waypoint (arena units).
    pub fn waypoint(&self, agent: [f32; 2], object: [f32; 2], target: [f32; 2]) -> [f32; 2] {
        match self {
            HighLevel::Learnt(m) => m.waypoint(agent, object, target),
            HighLevel::Rule(rule) => rule(agent, object, target),
        }
    }
}
