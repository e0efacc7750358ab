//! What operators see of the core beyond its summaries: the worker sessions and the phase
//! (`status.json`, the dashboard, `/metrics`).

use serde::Serialize;

use super::{Core, Phase, WorkerId};

/// A worker session as operators see it (`status.json`, the dashboard).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionView {
    /// Session id.
    pub id: WorkerId,
    /// Certificate name (the institution).
    pub name: String,
    /// Compute backend it declared.
    pub backend: String,
    /// Training throughput it measured and declared, clips per second.
    pub samples_per_s: f64,
    /// Milliseconds since it was last heard from.
    pub silent_ms: u64,
    /// Shards of its current assignment.
    pub shards: usize,
}

impl Core {
    /// The worker sessions present, as operators see them.
    pub fn sessions(&self) -> Vec<SessionView> {
        self.workers
            .iter()
            .map(|(id, w)| SessionView {
                id: *id,
                name: w.info.name.clone(),
                backend: w.info.backend.clone(),
                samples_per_s: w.info.samples_per_s,
                silent_ms: self.now_ms.saturating_sub(w.last_seen_ms),
                shards: w.assigned.len(),
            })
            .collect()
    }

    /// Whether a round is under way.
    pub fn running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }
}
