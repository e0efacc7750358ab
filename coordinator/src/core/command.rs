//! The core's inputs as a log holds them: a [`Command`] is an [`Event`] with the time it was
//! handled at, whose update is named by its blob instead of carrying the decoded values.
//!
//! The core is a deterministic function of its inputs: no clock, no randomness but its seeds, no
//! hash-map order. A replicated coordinator (the Raft issue) therefore puts these commands, not
//! the core's outputs, in its log: each replica applies the committed commands in log order to its
//! own core and computes the same parameters, bit for bit, reading only the time written in the
//! command, never its own clock. An update's values come from its blob (which every replica
//! pulls by its BLAKE3 id) through the one decoder, so a log entry stays a few hundred bytes
//! whatever the model's size.

use serde::{Deserialize, Serialize};

use super::{ArrivedUpdate, Event, JoinInfo, WorkerId};
use amity_shared::federated::LossStats;
use amity_shared::store::BlobId;

/// One input of the core and when the leader handled it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The `now_ms` the core is handed with it.
    pub at_ms: u64,
    /// What happened.
    pub event: LoggedEvent,
}

/// An [`Event`] as the log holds it: an update by reference to its blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LoggedEvent {
    /// [`Event::Joined`].
    Joined {
        /// Session id.
        worker: WorkerId,
        /// What it declared.
        info: JoinInfo,
    },
    /// [`Event::Left`].
    Left {
        /// Session id.
        worker: WorkerId,
    },
    /// [`Event::Heartbeat`].
    Heartbeat {
        /// Session id.
        worker: WorkerId,
    },
    /// [`Event::Update`], its values in blob `update.blob`.
    Update {
        /// Session id.
        worker: WorkerId,
        /// The update without its values.
        update: UpdateRef,
    },
    /// [`Event::UpdateRefused`].
    UpdateRefused {
        /// Session id.
        worker: WorkerId,
        /// The round it was for.
        round: u64,
        /// Why.
        reason: String,
    },
    /// [`Event::Tick`].
    Tick,
}

/// An [`ArrivedUpdate`] without its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRef {
    /// The round the worker trained.
    pub round: u64,
    /// The blob holding the encoded pseudo-gradient.
    pub blob: BlobId,
    /// Its size on the wire.
    pub bytes: u64,
    /// Clips processed.
    pub samples: u64,
    /// Local steps.
    pub steps: u64,
    /// Loss statistics.
    pub loss: LossStats,
}

/// A command whose bytes do not parse.
#[derive(Debug, thiserror::Error)]
#[error("command log entry does not parse")]
pub struct BadCommand(#[from] serde_json::Error);

impl Command {
    /// The command recording `event`, handled at `at_ms`.
    pub fn of(event: &Event, at_ms: u64) -> Self {
        let logged = match event {
            Event::Joined { worker, info } => LoggedEvent::Joined {
                worker: *worker,
                info: info.clone(),
            },
            Event::Left { worker } => LoggedEvent::Left { worker: *worker },
            Event::Heartbeat { worker } => LoggedEvent::Heartbeat { worker: *worker },
            Event::Update { worker, update } => LoggedEvent::Update {
                worker: *worker,
                update: UpdateRef {
                    round: update.round,
                    blob: update.blob,
                    bytes: update.bytes,
                    samples: update.samples,
                    steps: update.steps,
                    loss: update.loss,
                },
            },
            Event::UpdateRefused {
                worker,
                round,
                reason,
            } => LoggedEvent::UpdateRefused {
                worker: *worker,
                round: *round,
                reason: reason.clone(),
            },
            Event::Tick => LoggedEvent::Tick,
        };
        Command {
            at_ms,
            event: logged,
        }
    }

    /// The event to hand the core, and its time. `values` decodes an update's blob (the shell's
    /// content store and codec); its error is returned as is.
    pub fn into_event<E>(
        self,
        values: impl FnOnce(&UpdateRef) -> Result<Vec<f32>, E>,
    ) -> Result<(Event, u64), E> {
        let event = match self.event {
            LoggedEvent::Joined { worker, info } => Event::Joined { worker, info },
            LoggedEvent::Left { worker } => Event::Left { worker },
            LoggedEvent::Heartbeat { worker } => Event::Heartbeat { worker },
            LoggedEvent::Update { worker, update } => {
                let values = values(&update)?;
                Event::Update {
                    worker,
                    update: ArrivedUpdate {
                        round: update.round,
                        blob: update.blob,
                        bytes: update.bytes,
                        samples: update.samples,
                        steps: update.steps,
                        loss: update.loss,
                        values,
                    },
                }
            }
            LoggedEvent::UpdateRefused {
                worker,
                round,
                reason,
            } => Event::UpdateRefused {
                worker,
                round,
                reason,
            },
            LoggedEvent::Tick => Event::Tick,
        };
        Ok((event, self.at_ms))
    }

    /// The command as a log entry's bytes (JSON; a NaN loss is written as `null` and read back).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command serialises")
    }

    /// A command from a log entry's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BadCommand> {
        Ok(serde_json::from_slice(bytes)?)
    }
}
