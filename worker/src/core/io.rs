//! What goes into the worker's core and what comes out: [`Input`]s the shell feeds it and
//! [`WorkerAction`]s it asks the shell to carry out.

use std::sync::Arc;
use std::time::Duration;

use amity_protocol::conn::HandshakeRefusal;
use amity_protocol::message::{ClientMsg, ErrorCode, ServerMsg};
use amity_shared::config::Config;
use amity_shared::federated::{GlobalParams, LocalRoundOptions, LocalUpdate};
use amity_shared::store::BlobId;

use super::WorkerError;

/// What the core is told.
#[derive(Debug)]
pub enum Input {
    /// The connection to the coordinator is up (TLS done, control stream open).
    Connected,
    /// The connection failed, dropped or was closed, or the shell could not carry out an action.
    Lost(Disconnect),
    /// A message from the coordinator.
    Message(ServerMsg),
    /// Answer to [`WorkerAction::MeasureThroughput`]: clips per second.
    Throughput(f32),
    /// Answer to [`WorkerAction::Fetch`]: the blob's verified bytes, and how many of them came
    /// over the network (0 when the cache held it).
    Fetched {
        /// The blob.
        id: BlobId,
        /// Its bytes.
        bytes: Vec<u8>,
        /// Bytes downloaded.
        downloaded: u64,
    },
    /// Answer to [`WorkerAction::PrepareShards`]: every shard is local now.
    ShardsReady {
        /// Bytes downloaded.
        downloaded: u64,
    },
    /// Answer to [`WorkerAction::Train`]: the local round's pseudo-gradient, or why it failed.
    Trained(Result<LocalUpdate, String>),
    /// The heartbeat timer fired (every [`HEARTBEAT`](super::HEARTBEAT)).
    Tick,
    /// Ctrl-C: leave cleanly (a round under way is abandoned once its job returns).
    Stop,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Disconnect {
    /// It dropped or was closed: reconnect after a back-off, unless `code` says the run is over.
    Lost {
        /// What happened, for the log.
        why: String,
        /// The application code the coordinator closed the connection with, if it did.
        code: Option<ErrorCode>,
    },
    /// A side's TLS refused the other's certificate: reconnecting cannot mend it.
    Refused {
        /// Which side refused, and with which alert.
        refusal: HandshakeRefusal,
        /// The error as the transport reported it.
        detail: String,
    },
}

impl Disconnect {
    /// A connection lost for `why`, with no close code.
    pub fn lost(why: impl Into<String>) -> Self {
        Disconnect::Lost {
            why: why.into(),
            code: None,
        }
    }
}

/// What the core asks the shell to do.
#[derive(Debug)]
pub enum WorkerAction {
    /// Connect to the coordinator now, then answer [`Input::Connected`] or [`Input::Lost`].
    Connect,
    /// Connect after waiting this long (the back-off after a lost connection).
    ConnectAfter(Duration),
    /// Close the connection (and stop serving blobs on it).
    Disconnect,
    /// The coordinator replica does not lead: connect next to the one named
    /// (`name@host:port`), or to the next address given when none is known.
    Redirect(Option<String>),
    /// Send a message on the control stream.
    Send(ClientMsg),
    /// Measure this machine's clips/s on the run's model and answer [`Input::Throughput`].
    MeasureThroughput(Box<Config>),
    /// Make a fresh trainer (fresh inner optimiser) for this run. Not asked when a reconnect
    /// registers into the same run: the trainer and its AdamW state are kept.
    NewTrainer(Box<Config>),
    /// Fetch blob `id` (from the cache, else from the coordinator, at most `max_len` bytes) and
    /// answer [`Input::Fetched`].
    Fetch {
        /// The blob.
        id: BlobId,
        /// The most bytes it may have.
        max_len: u64,
    },
    /// Make every shard local (the institution's own store, the cache, else fetched, each at
    /// most [`MAX_SHARD_BYTES`](super::MAX_SHARD_BYTES)) and answer [`Input::ShardsReady`].
    PrepareShards(Vec<BlobId>),
    /// Run a local round on a blocking thread and answer [`Input::Trained`].
    Train(TrainJob),
    /// Put this update into the cache, from where the coordinator pulls it.
    StoreUpdate(Vec<u8>),
    /// Delete these blobs from the cache (states, deltas and updates of rounds long gone).
    Forget(Vec<BlobId>),
    /// A progress line for the operator (only with `progress` on).
    Report(String),
    /// Stop: the run is over, Ctrl-C, or an error reconnecting cannot mend. The shell closes
    /// the connection and returns [`WorkerCore::summary`](super::WorkerCore::summary) or the error.
    Finish(Result<(), WorkerError>),
}

/// A local round for the shell to run.
#[derive(Debug)]
pub struct TrainJob {
    /// The round.
    pub round: u64,
    /// The global state it starts from.
    pub start: Arc<GlobalParams>,
    /// The shards to draw clips from (empty: the synthetic stream).
    pub shards: Vec<BlobId>,
    /// Budget, policy, seeds and schedule position.
    pub options: LocalRoundOptions,
}
