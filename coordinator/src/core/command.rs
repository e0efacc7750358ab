//! The core's inputs as a log holds them: a [`Command`] is an [`Event`] with the time it was
//! handled at, whose update is named by its blob instead of carrying the decoded values.
//!
//! The core is a deterministic function of its inputs: no clock, no randomness but its seeds, no
//! hash-map order. A replicated coordinator (the Raft issue) therefore puts these commands, not
//! the core's outputs, in its log: each replica applies the committed commands in log order to its
//! own core and computes the same parameters, bit for bit, reading only the time written in the
//! command, never its own clock. An update's values come from its encoded blob through the one
//! decoder. In a Raft entry ([`Command::to_entry`]) the encoded update travels with the command,
//! so that an update is committed (and acknowledged) only once a quorum holds its bytes, not just
//! its name: a leader that dies right after acknowledging cannot take the only copy with it.

use serde::{Deserialize, Serialize};

use super::{ArrivedUpdate, Event, JoinInfo, UpdateValues, WorkerId};
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
    /// [`Event::Operator`].
    Operator(super::OperatorAction),
    /// [`Event::Tick`].
    Tick,
}

/// An [`ArrivedUpdate`] without its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRef {
    /// The encoded update (the bytes of `blob`) when the command came from or goes into a Raft
    /// entry; `None` in the journal, whose updates live in the content store.
    #[serde(skip)]
    pub encoded: Option<Vec<u8>>,
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
pub enum BadCommand {
    /// The JSON part.
    #[error("command log entry does not parse")]
    Json(#[from] serde_json::Error),
    /// Bytes after a command that carries none.
    #[error("command log entry has bytes after a command that is not an update")]
    Trailing,
}

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
                    encoded: None,
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
            Event::Operator(action) => LoggedEvent::Operator(action.clone()),
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
        values: impl FnOnce(&UpdateRef) -> Result<UpdateValues, E>,
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
            LoggedEvent::Operator(action) => Event::Operator(action),
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

    /// The command as a Raft entry's data: its JSON, then (for an update that carries its
    /// encoded bytes) a zero byte and those bytes. JSON never holds a raw zero byte.
    pub fn to_entry(&self) -> Vec<u8> {
        let mut data = self.to_bytes();
        if let LoggedEvent::Update { update, .. } = &self.event
            && let Some(encoded) = &update.encoded
        {
            data.reserve(1 + encoded.len());
            data.push(0);
            data.extend_from_slice(encoded);
        }
        data
    }

    /// A command from a Raft entry's data ([`Command::to_entry`]).
    pub fn from_entry(data: &[u8]) -> Result<Self, BadCommand> {
        let (json, encoded) = match data.iter().position(|&b| b == 0) {
            Some(at) => (&data[..at], Some(&data[at + 1..])),
            None => (data, None),
        };
        let mut cmd = Command::from_bytes(json)?;
        match (&mut cmd.event, encoded) {
            (LoggedEvent::Update { update, .. }, Some(bytes)) => {
                update.encoded = Some(bytes.to_vec());
            }
            (_, None) => {}
            (_, Some(_)) => return Err(BadCommand::Trailing),
        }
        Ok(cmd)
    }
}
