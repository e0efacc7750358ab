//! The messages, one enum per direction, and their codec.
//!
//! A message on the wire is `"AMTY" | version (u32 LE) | rkyv archive of the enum`. The version
//! comes first and outside the archive so that a peer speaking another version gets a clear
//! error, never a parse failure of bytes it cannot understand. The archive is validated
//! (bytecheck) before any field is read, then checked for sane values by [`Validate`].

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::PROTOCOL_VERSION;
use crate::id::BlobId;

/// First bytes of every encoded message.
pub const MESSAGE_MAGIC: &[u8; 4] = b"AMTY";

/// What a worker reports about itself when it registers.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Capabilities {
    /// Compute backend (`flex`, `cuda`, `wgpu`, ...).
    pub backend: String,
    /// Measured training throughput, clips per second.
    pub samples_per_s: f32,
    /// Shards the worker already holds (its institution's own corpus), with their clip counts.
    pub local_shards: Vec<LocalShard>,
}

/// A shard of an institution's own corpus, announced at registration. The coordinator never
/// sees its bytes; it schedules it to its owner and counts its clips in the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LocalShard {
    /// The shard's blob id.
    pub id: BlobId,
    /// Clips in it (from the corpus manifest), `1..=MAX_SHARD_CLIPS`.
    pub clips: u64,
}

/// The most clips a shard may claim: a bound on how far one peer can skew epoch accounting.
pub const MAX_SHARD_CLIPS: u64 = 1 << 24;

/// Loss statistics of a worker's local steps: what its round reports, on the wire and in the
/// coordinator's log alike.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Default,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct LossStats {
    /// Mean loss over the round.
    #[serde(deserialize_with = "f32_or_nan")]
    pub mean: f32,
    /// Loss at the first local step.
    #[serde(deserialize_with = "f32_or_nan")]
    pub first: f32,
    /// Loss at the last local step.
    #[serde(deserialize_with = "f32_or_nan")]
    pub last: f32,
    /// Mean over the round of what predicting every masked token by the batch's mean target
    /// would score (what a collapsed predictor gets). `mean / baseline` is the share of the
    /// target's spread the predictor has not explained: it keeps falling while the predictor
    /// learns, even where the loss rises because the EMA target grows richer. NaN in logs
    /// written before it was reported.
    #[serde(default = "nan", deserialize_with = "f32_or_nan")]
    pub baseline: f32,
}

fn nan() -> f32 {
    f32::NAN
}

/// Reads an `f32` that JSON may hold as `null`: serde_json writes NaN and infinities as `null`
/// (a round whose every step diverged), and such a log must still read back.
fn f32_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// Why a request failed, machine-readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    VersionMismatch = 1,
    /// A frame exceeded its kind's maximum.
    FrameTooLarge = 2,
    /// Bytes that do not decode to a message.
    Malformed = 3,
    /// The peer's certificate name is revoked.
    Revoked = 4,
    /// A message arrived that the state does not allow.
    Unexpected = 5,
    /// A blob's bytes did not hash to its id.
    HashMismatch = 6,
    /// A blob, round or release that does not exist.
    NotFound = 7,
    /// The peer is shutting down.
    ShuttingDown = 8,
    /// Anything else.
    Internal = 9,
    /// Training is over: the run reached its planned end. A worker told this leaves for good
    /// instead of reconnecting.
    Finished = 10,
    /// This coordinator replica does not lead: the message is the leader's worker address as
    /// `name@host:port` (its certificate name and address), or empty while none is known. The
    /// worker connects there (or to its next replica) instead.
    NotLeader = 11,
}

impl ErrorCode {
    /// The code numbered `v` on the wire (a QUIC application close or stream reset code).
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            VersionMismatch,
            FrameTooLarge,
            Malformed,
            Revoked,
            Unexpected,
            HashMismatch,
            NotFound,
            ShuttingDown,
            Internal,
            Finished,
            NotLeader,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

/// Worker (or downstream client) to coordinator.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClientMsg {
    /// First message on the control stream.
    Hello {
        /// The protocol version the client speaks.
        protocol: u32,
        /// Software name and version, for logs.
        software: String,
    },
    /// Join training with these capabilities.
    Register(Capabilities),
    /// Still alive; `seq` increases.
    Heartbeat {
        /// Sequence number.
        seq: u64,
    },
    /// A round's update follows on its own stream as blob `blob`.
    UpdateHeader {
        /// The round trained.
        round: u64,
        /// The compressed pseudo-gradient's blob id.
        blob: BlobId,
        /// Its length in bytes.
        bytes: u64,
        /// Clips processed.
        samples: u64,
        /// Local optimiser steps.
        steps: u64,
        /// Loss statistics.
        loss: LossStats,
    },
    /// Asks for a blob (shard, global state, checkpoint), from `offset` on.
    FetchBlob {
        /// The blob.
        id: BlobId,
        /// First byte wanted (for resuming).
        offset: u64,
    },
    /// Asks for a release's manifest by name (`latest` for the newest).
    ReleaseQuery {
        /// The release name.
        name: String,
    },
    /// Asks for the coordinator's state (`amity coordinator status`; certificate holders
    /// only), answered with [`ServerMsg::Status`]. A replica answers once its state holds every
    /// command committed before the question (a Raft read index), whichever replica is asked.
    StatusQuery,
    /// Changes a replicated coordinator's membership (`amity coordinator members`; operator
    /// certificates only), one replica at a time. Answered with [`ServerMsg::Status`] once the
    /// change is committed, or [`ErrorCode::NotLeader`] from a replica that does not lead.
    ChangeMembership(MembershipChange),
    /// The client leaves cleanly.
    Goodbye,
}

/// One membership change of a replicated coordinator.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum MembershipChange {
    /// Add a replica as a learner: it receives the log (from a snapshot) but does not vote,
    /// so the group's quorum is unchanged while it catches up. It must be running, configured
    /// to join, with a replica certificate named `name`.
    Add {
        /// Its Raft id (not 0, unused in the group).
        id: u64,
        /// The name on its replica certificate.
        name: String,
        /// Where the other replicas reach it (`host:port`, its Raft port).
        peer: String,
        /// Where workers reach it (`host:port`).
        workers: String,
    },
    /// Make a learner a voter (once it has caught up).
    Promote {
        /// Its Raft id.
        id: u64,
    },
    /// Remove a replica from the group.
    Remove {
        /// Its Raft id.
        id: u64,
    },
}

/// The coordinator's state, as [`ServerMsg::Status`] reports it.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CoordinatorStatus {
    /// The round under way (or next to run).
    pub round: u64,
    /// Rounds closed.
    pub closed: u64,
    /// Parameters hash of the current global state.
    pub params: BlobId,
    /// Whether the run reached its planned end.
    pub finished: bool,
    /// Worker sessions.
    pub workers: u32,
    /// A replica's place in its group; `None` for a single coordinator.
    pub replica: Option<ReplicaState>,
}

/// One replica's view of its Raft group.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ReplicaState {
    /// Its Raft id.
    pub id: u64,
    /// The current term.
    pub term: u64,
    /// The leader it knows of (0: none).
    pub leader: u64,
    /// The highest log index known committed.
    pub commit: u64,
    /// The last index applied to its core.
    pub applied: u64,
    /// The voters.
    pub voters: Vec<u64>,
    /// The learners: replicas added that do not vote yet.
    pub learners: Vec<u64>,
    /// On the leader: (replica id, log entries it is behind the commit index).
    pub lag: Vec<(u64, u64)>,
}

/// A global state as a delta from an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StateDelta {
    /// Parameters hash of the state the delta applies to.
    pub base: BlobId,
    /// Blob id of the encoded delta.
    pub blob: BlobId,
    /// `None`: the delta covers the model and the target encoder. `Some(m)` (the
    /// coordinator-EMA policy): it covers the model only, and the target then takes one EMA
    /// step `target = m * target + (1 - m) * encoder` on both ends, bit-identically
    /// (`GlobalParams::ema_target`), so the target is never sent.
    pub target_momentum: Option<f32>,
}

/// What a round starts from and how long it lasts: the announcement a worker keeps for the
/// whole round.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RoundAnnounce {
    /// Round number.
    pub round: u64,
    /// Blob id of the global state to start from (a safetensors checkpoint).
    pub state: BlobId,
    /// BlobId of the state's parameters (`GlobalParams::hash`), to check a reconstruction.
    pub params: BlobId,
    /// The same state as a compressed delta from the previous one, for workers holding it.
    pub delta: Option<StateDelta>,
    /// Milliseconds of local training (time budget; 0: none).
    pub budget_ms: u64,
    /// Local steps at most (step budget; 0: none). With both budgets, the worker stops at
    /// whichever runs out first.
    pub steps: u64,
    /// Rounds planned for the run (0: no planned end). With `round`, this is the run's
    /// global progress, which every worker's learning-rate, weight-decay and EMA schedules
    /// follow whatever its speed.
    pub planned_rounds: u64,
    /// Send this round's update densely (no top-k), error-feedback residual included: the
    /// coordinator is about to checkpoint or finish, and what it saves must hold every
    /// step that was trained.
    pub flush: bool,
}

/// Coordinator to worker (or downstream client).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ServerMsg {
    /// Answer to `Hello`.
    Welcome {
        /// The protocol version the server speaks.
        protocol: u32,
        /// The peer's identity as the server sees it (its certificate name).
        identity: String,
        /// The server's wall clock when it answered, milliseconds since the Unix epoch (what
        /// `amity doctor` measures a clock offset against).
        time_ms: u64,
    },
    /// Registration accepted.
    Registered {
        /// The worker's id for this session.
        worker: u64,
        /// The run's config (model shape and inner recipe) as TOML.
        run: String,
        /// The codec updates must be compressed with (`amity_shared::federated::codec` names).
        codec: String,
        /// The target-encoder policy (`coordinator-ema` or `local-ema`).
        target_policy: String,
    },
    /// A round starts.
    RoundAnnounce(RoundAnnounce),
    /// The shards a worker trains on this round.
    ShardAssignment {
        /// Round number.
        round: u64,
        /// Shard ids.
        shards: Vec<BlobId>,
    },
    /// A message or upload was accepted.
    Ack {
        /// What was accepted (round number, heartbeat sequence, ...).
        of: u64,
    },
    /// A blob follows on a stream the server opens: `len` bytes in total, sent from `offset`.
    BlobHeader {
        /// The blob.
        id: BlobId,
        /// Total length.
        len: u64,
        /// First byte sent.
        offset: u64,
    },
    /// A release: its manifest (`manifest.json`) is blob `manifest`, signed by `signature`.
    ReleaseInfo {
        /// Release name.
        name: String,
        /// Blob id of its manifest.
        manifest: BlobId,
        /// The manifest's Ed25519 signature (64 bytes).
        signature: Vec<u8>,
    },
    /// Answer to [`ClientMsg::StatusQuery`].
    Status(CoordinatorStatus),
    /// A request failed.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Why bytes were not accepted as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Too short or the wrong magic: not an Amity message.
    #[error("not an Amity message ({0})")]
    NotAMessage(&'static str),
    /// Another protocol version.
    #[error("peer speaks protocol version {theirs}, this build speaks {ours}")]
    Version {
        /// The peer's version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The archive failed validation.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Valid bytes, insane values.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Value checks after structural validation.
pub trait Validate {
    /// Refuses values no honest peer sends.
    fn validate(&self) -> Result<(), DecodeError>;
}

/// The longest text field a message may carry (error messages, names).
pub const MAX_STRING: usize = 4096;

/// At most `max` bytes of `text` (cut at a character boundary), with how much was cut: for log
/// lines and error texts that may hold what a peer sent (a message's `Debug` can be megabytes).
pub fn brief(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}
const MAX_LIST: usize = 1 << 20;
const MAX_RUN_CONFIG: usize = 64 << 10;

fn check_str(what: &str, s: &str) -> Result<(), DecodeError> {
    if s.len() > MAX_STRING {
        return Err(DecodeError::Invalid(format!(
            "{what} is {} bytes (at most {MAX_STRING})",
            s.len()
        )));
    }
    Ok(())
}

fn check_list<T>(what: &str, v: &[T]) -> Result<(), DecodeError> {
    if v.len() > MAX_LIST {
        return Err(DecodeError::Invalid(format!(
            "{what} has {} entries (at most {MAX_LIST})",
            v.len()
        )));
    }
    Ok(())
}

impl Validate for ClientMsg {
    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            ClientMsg::Hello { software, .. } => check_str("software", software),
            ClientMsg::Register(c) => {
                check_str("backend", &c.backend)?;
                check_list("local shards", &c.local_shards)?;
                if let Some(s) = c
                    .local_shards
                    .iter()
                    .find(|s| !(1..=MAX_SHARD_CLIPS).contains(&s.clips))
                {
                    return Err(DecodeError::Invalid(format!(
                        "local shard {} claims {} clips (1..={MAX_SHARD_CLIPS})",
                        s.id, s.clips
                    )));
                }
                if !(c.samples_per_s.is_finite() && c.samples_per_s >= 0.0) {
                    return Err(DecodeError::Invalid(format!(
                        "throughput {} samples/s",
                        c.samples_per_s
                    )));
                }
                Ok(())
            }
            ClientMsg::UpdateHeader { loss, steps, .. } => {
                if *steps == 0 {
                    return Err(DecodeError::Invalid("an update of zero steps".into()));
                }
                let finite =
                    loss.mean.is_finite() && loss.first.is_finite() && loss.last.is_finite();
                if !finite {
                    return Err(DecodeError::Invalid("non-finite loss statistics".into()));
                }
                Ok(())
            }
            ClientMsg::ReleaseQuery { name } => check_str("release name", name),
            ClientMsg::ChangeMembership(MembershipChange::Add {
                id,
                name,
                peer,
                workers,
            }) => {
                if *id == 0 {
                    return Err(DecodeError::Invalid("replica id 0".into()));
                }
                check_str("replica name", name)?;
                for (what, addr) in [("peer address", peer), ("worker address", workers)] {
                    if addr.parse::<std::net::SocketAddr>().is_err() {
                        return Err(DecodeError::Invalid(format!(
                            "{what} `{}` is not host:port",
                            brief(addr, 64)
                        )));
                    }
                }
                Ok(())
            }
            ClientMsg::ChangeMembership(
                MembershipChange::Remove { id } | MembershipChange::Promote { id },
            ) => {
                if *id == 0 {
                    return Err(DecodeError::Invalid("replica id 0".into()));
                }
                Ok(())
            }
            ClientMsg::Heartbeat { .. }
            | ClientMsg::FetchBlob { .. }
            | ClientMsg::StatusQuery
            | ClientMsg::Goodbye => Ok(()),
        }
    }
}

impl Validate for ServerMsg {
    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            ServerMsg::Welcome { identity, .. } => check_str("identity", identity),
            ServerMsg::Registered {
                run,
                codec,
                target_policy,
                ..
            } => {
                if run.len() > MAX_RUN_CONFIG {
                    return Err(DecodeError::Invalid(format!(
                        "run config is {} bytes (at most {MAX_RUN_CONFIG})",
                        run.len()
                    )));
                }
                check_str("codec", codec)?;
                check_str("target policy", target_policy)
            }
            ServerMsg::RoundAnnounce(RoundAnnounce {
                delta:
                    Some(StateDelta {
                        target_momentum: Some(m),
                        ..
                    }),
                ..
            }) if !(0.0..=1.0).contains(m) => Err(DecodeError::Invalid(format!(
                "target momentum {m} outside [0, 1]"
            ))),
            ServerMsg::ShardAssignment { shards, .. } => check_list("shards", shards),
            ServerMsg::BlobHeader { len, offset, .. } if offset > len => Err(DecodeError::Invalid(
                format!("blob offset {offset} past its length {len}"),
            )),
            ServerMsg::ReleaseInfo {
                name, signature, ..
            } => {
                check_str("release name", name)?;
                if signature.len() != 64 {
                    return Err(DecodeError::Invalid(format!(
                        "release signature of {} bytes (Ed25519: 64)",
                        signature.len()
                    )));
                }
                Ok(())
            }
            ServerMsg::Error { message, .. } => check_str("error message", message),
            ServerMsg::Status(CoordinatorStatus {
                replica: Some(r), ..
            }) => {
                check_list("voters", &r.voters)?;
                check_list("learners", &r.learners)?;
                check_list("replica lags", &r.lag)
            }
            _ => Ok(()),
        }
    }
}

/// Encodes a message with the magic and this build's protocol version.
pub fn encode<T>(msg: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    let body = rkyv::to_bytes::<rancor::Error>(msg).expect("messages always archive");
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(MESSAGE_MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes and validates a message; never panics, whatever the bytes.
pub fn decode<T>(bytes: &[u8]) -> Result<T, DecodeError>
where
    T: rkyv::Archive + Validate,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    if bytes.len() < 8 {
        return Err(DecodeError::NotAMessage("shorter than its header"));
    }
    if &bytes[..4] != MESSAGE_MAGIC {
        return Err(DecodeError::NotAMessage("wrong magic bytes"));
    }
    let theirs = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if theirs != PROTOCOL_VERSION {
        return Err(DecodeError::Version {
            theirs,
            ours: PROTOCOL_VERSION,
        });
    }
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len() - 8);
    aligned.extend_from_slice(&bytes[8..]);
    let msg = rkyv::from_bytes::<T, rancor::Error>(&aligned)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    msg.validate()?;
    Ok(msg)
}

/// One of the protocol's two message enums: what a stream can send and receive.
pub trait Message: Sized + Validate {
    /// [`encode`] for this type.
    fn to_wire(&self) -> Vec<u8>;
    /// [`decode`] for this type.
    fn from_wire(bytes: &[u8]) -> Result<Self, DecodeError>;
}

impl Message for ClientMsg {
    fn to_wire(&self) -> Vec<u8> {
        encode(self)
    }
    fn from_wire(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }
}

impl Message for ServerMsg {
    fn to_wire(&self) -> Vec<u8> {
        encode(self)
    }
    fn from_wire(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_texts_are_cut_at_a_character_boundary() {
        assert_eq!(brief("short", 10), "short");
        let long = "é".repeat(100);
        let b = brief(&long, 11);
        assert!(b.starts_with("ééééé..."), "{b}");
        assert!(b.ends_with("(200 bytes in all)"), "{b}");
    }
    use proptest::prelude::*;

    fn hash() -> impl Strategy<Value = BlobId> {
        any::<[u8; 32]>().prop_map(BlobId)
    }

    fn client_msg() -> impl Strategy<Value = ClientMsg> {
        prop_oneof![
            (any::<u32>(), ".{0,40}")
                .prop_map(|(protocol, software)| ClientMsg::Hello { protocol, software }),
            (
                "[a-z]{1,8}",
                0.0f32..1e6,
                prop::collection::vec(
                    (hash(), 1..=MAX_SHARD_CLIPS).prop_map(|(id, clips)| LocalShard { id, clips }),
                    0..5
                )
            )
                .prop_map(|(backend, samples_per_s, local_shards)| {
                    ClientMsg::Register(Capabilities {
                        backend,
                        samples_per_s,
                        local_shards,
                    })
                }),
            any::<u64>().prop_map(|seq| ClientMsg::Heartbeat { seq }),
            (
                any::<u64>(),
                hash(),
                any::<u64>(),
                any::<u64>(),
                1u64..,
                -1e3f32..1e3
            )
                .prop_map(|(round, blob, bytes, samples, steps, l)| {
                    ClientMsg::UpdateHeader {
                        round,
                        blob,
                        bytes,
                        samples,
                        steps,
                        loss: LossStats {
                            mean: l,
                            first: l + 1.0,
                            last: l - 1.0,
                            baseline: l + 0.5,
                        },
                    }
                }),
            (hash(), any::<u64>()).prop_map(|(id, offset)| ClientMsg::FetchBlob { id, offset }),
            ".{0,20}".prop_map(|name| ClientMsg::ReleaseQuery { name }),
            Just(ClientMsg::StatusQuery),
            (1u64.., "[a-z]{1,10}", 1u16..).prop_map(|(id, name, port)| {
                ClientMsg::ChangeMembership(MembershipChange::Add {
                    id,
                    name,
                    peer: format!("10.0.0.1:{port}"),
                    workers: format!("10.0.0.1:{}", port.wrapping_add(1).max(1)),
                })
            }),
            (1u64..).prop_map(|id| ClientMsg::ChangeMembership(MembershipChange::Remove { id })),
            (1u64..).prop_map(|id| ClientMsg::ChangeMembership(MembershipChange::Promote { id })),
            Just(ClientMsg::Goodbye),
        ]
    }

    fn server_msg() -> impl Strategy<Value = ServerMsg> {
        prop_oneof![
            (any::<u32>(), ".{0,30}", any::<u64>()).prop_map(|(protocol, identity, time_ms)| {
                ServerMsg::Welcome {
                    protocol,
                    identity,
                    time_ms,
                }
            }),
            (any::<u64>(), ".{0,200}", ".{0,20}").prop_map(|(worker, run, codec)| {
                ServerMsg::Registered {
                    worker,
                    run,
                    codec,
                    target_policy: "local-ema".into(),
                }
            }),
            (
                any::<u64>(),
                hash(),
                hash(),
                prop::option::of((hash(), hash(), prop::option::of(0.0f32..=1.0))),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(
                    |(round, state, params, delta, budget_ms, steps, planned_rounds, flush)| {
                        ServerMsg::RoundAnnounce(RoundAnnounce {
                            round,
                            state,
                            params,
                            delta: delta.map(|(base, blob, target_momentum)| StateDelta {
                                base,
                                blob,
                                target_momentum,
                            }),
                            budget_ms,
                            steps,
                            planned_rounds,
                            flush,
                        })
                    }
                ),
            (
                any::<u64>(),
                hash(),
                any::<bool>(),
                prop::option::of((
                    any::<u64>(),
                    any::<u64>(),
                    prop::collection::vec(any::<u64>(), 0..6),
                    prop::collection::vec((any::<u64>(), any::<u64>()), 0..6)
                ))
            )
                .prop_map(|(round, params, finished, replica)| {
                    ServerMsg::Status(CoordinatorStatus {
                        round,
                        closed: round / 2,
                        params,
                        finished,
                        workers: 3,
                        replica: replica.map(|(term, commit, voters, lag)| ReplicaState {
                            id: 1,
                            term,
                            leader: 2,
                            commit,
                            applied: commit / 2,
                            learners: voters.iter().map(|v| v + 1).collect(),
                            voters,
                            lag,
                        }),
                    })
                }),
            (any::<u64>(), prop::collection::vec(hash(), 0..20))
                .prop_map(|(round, shards)| ServerMsg::ShardAssignment { round, shards }),
            any::<u64>().prop_map(|of| ServerMsg::Ack { of }),
            (hash(), any::<u64>())
                .prop_flat_map(|(id, len)| (Just(id), Just(len), 0..=len))
                .prop_map(|(id, len, offset)| ServerMsg::BlobHeader { id, len, offset }),
            (
                ".{0,20}",
                hash(),
                prop::collection::vec(any::<u8>(), 64..=64)
            )
                .prop_map(|(name, manifest, signature)| ServerMsg::ReleaseInfo {
                    name,
                    manifest,
                    signature
                }),
            ".{0,60}".prop_map(|message| ServerMsg::Error {
                code: ErrorCode::Malformed,
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn client_messages_round_trip(m in client_msg()) {
            prop_assert_eq!(decode::<ClientMsg>(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn server_messages_round_trip(m in server_msg()) {
            prop_assert_eq!(decode::<ServerMsg>(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<ClientMsg>(&bytes);
            let _ = decode::<ServerMsg>(&bytes);
            let mut framed = MESSAGE_MAGIC.to_vec();
            framed.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode::<ClientMsg>(&framed);
            let _ = decode::<ServerMsg>(&framed);
        }

        #[test]
        fn mutated_messages_never_panic(
            m in client_msg(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..6),
        ) {
            let mut bytes = encode(&m);
            for (i, x) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            let _ = decode::<ClientMsg>(&bytes);
            let _ = decode::<ClientMsg>(&bytes[..bytes.len() / 2]);
        }
    }

    /// Logs written before the predict-the-mean baseline was reported still read, and their
    /// baseline reads as not measured (NaN), never as a measured 0.
    #[test]
    fn loss_stats_from_older_logs_read_without_a_baseline() {
        let old: LossStats =
            serde_json::from_str(r#"{"mean":0.5,"first":null,"last":0.25}"#).unwrap();
        assert_eq!((old.mean, old.last), (0.5, 0.25));
        assert!(old.first.is_nan() && old.baseline.is_nan());
        let now: LossStats =
            serde_json::from_str(r#"{"mean":0.5,"first":1,"last":0.25,"baseline":0.75}"#).unwrap();
        assert_eq!(now.baseline, 0.75);
    }

    #[test]
    fn another_version_is_a_clear_error() {
        let theirs = PROTOCOL_VERSION + 1;
        let mut bytes = encode(&ClientMsg::Goodbye);
        bytes[4..8].copy_from_slice(&theirs.to_le_bytes());
        let err = decode::<ClientMsg>(&bytes).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Version {
                theirs,
                ours: PROTOCOL_VERSION
            }
        );
        assert!(
            err.to_string().contains(&format!("version {theirs}")),
            "{err}"
        );
        assert!(matches!(
            decode::<ClientMsg>(b"GET / HTTP/1.1"),
            Err(DecodeError::NotAMessage(_))
        ));
        let bad = ClientMsg::Register(Capabilities {
            backend: "flex".into(),
            samples_per_s: f32::NAN,
            local_shards: vec![],
        });
        assert!(matches!(
            decode::<ClientMsg>(&encode(&bad)),
            Err(DecodeError::Invalid(_))
        ));
    }
}
