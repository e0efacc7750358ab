//! What an operator decides while the run goes on: pause and resume rounds, revoke an
//! institution or reinstate it.
//!
//! These decisions are core state, not shell state, so that they are durable and replicated the
//! way everything else is: an [`Event::Operator`](super::Event::Operator) is journalled (a
//! single coordinator, [`LogEntry::Operator`]) or logged through Raft (a replica), lands in every
//! snapshot, and survives a restart or a change of leader. The shell learns the result from
//! [`Action::Operator`] and applies it where the core cannot (refusing revoked names at the TLS
//! handshake and closing their connections).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{Action, Core, LogEntry, Phase, trained_shards};

/// One operator decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAction {
    /// Start no new round (the one under way closes as usual).
    Pause,
    /// Start rounds again.
    Resume,
    /// Refuse an institution's certificate name from now on: its sessions end, an update of it
    /// not yet aggregated is dropped.
    Revoke {
        /// The certificate name.
        name: String,
    },
    /// Take a name off the revoked list again.
    Reinstate {
        /// The certificate name.
        name: String,
    },
}

impl std::fmt::Display for OperatorAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OperatorAction::Pause => write!(f, "pause"),
            OperatorAction::Resume => write!(f, "resume"),
            OperatorAction::Revoke { name } => write!(f, "revoke {name}"),
            OperatorAction::Reinstate { name } => write!(f, "reinstate {name}"),
        }
    }
}

/// The operator's standing decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorState {
    /// No new round starts while set.
    pub paused: bool,
    /// Certificate names revoked by an operator while running (the config file's `revoked`
    /// list comes on top of these).
    pub revoked: BTreeSet<String>,
}

impl Core {
    /// The operator's standing decisions.
    pub fn operator(&self) -> &OperatorState {
        &self.operator
    }

    /// Carries out an operator decision: journalled first, then applied; the shell is told the
    /// new state.
    pub(super) fn on_operator(&mut self, action: OperatorAction, out: &mut Vec<Action>) {
        if self.cfg.journal {
            out.push(Action::Persist(LogEntry::Operator(action.clone())));
        }
        self.apply_operator(&action);
        tracing::info!(%action, "operator decision");
        out.push(Action::Operator(self.operator.clone()));
    }

    /// Applies an operator decision read back from the journal on a restart.
    pub fn replay_operator(&mut self, action: &OperatorAction) {
        self.apply_operator(action);
    }

    fn apply_operator(&mut self, action: &OperatorAction) {
        match action {
            OperatorAction::Pause => self.operator.paused = true,
            OperatorAction::Resume => self.operator.paused = false,
            OperatorAction::Revoke { name } => {
                self.operator.revoked.insert(name.clone());
                self.drop_institution(name);
            }
            OperatorAction::Reinstate { name } => {
                self.operator.revoked.remove(name);
            }
        }
    }

    /// Ends every session of `name` and drops its update of the open round, if any (its shards
    /// go back to the queue).
    fn drop_institution(&mut self, name: &str) {
        let (dropped, kept) = std::mem::take(&mut self.received)
            .into_iter()
            .partition::<Vec<_>, _>(|p| p.from == name);
        self.received = kept;
        let trained = trained_shards(&self.received);
        for p in dropped {
            self.plan.requeue(p.shards, &trained);
        }
        self.refused.retain(|(n, _)| n != name);
        if let Phase::Running { announced, .. } = &mut self.phase {
            announced.retain(|n| n != name);
        }
        let sessions: Vec<_> = self
            .workers
            .iter()
            .filter(|(_, w)| w.info.name == name)
            .map(|(id, _)| *id)
            .collect();
        for id in sessions {
            self.on_leave(id, "revoked by an operator");
        }
    }
}
