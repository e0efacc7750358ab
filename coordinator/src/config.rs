//! `coordinator.toml`: where the coordinator listens and keeps its state, who it trusts, and the
//! training policy its core runs.
//!
//! ```toml
//! listen = "127.0.0.1:7700"
//! state_dir = "coordinator-state"   # command log, snapshots, checkpoints, received updates
//! corpus = "corpus-store"           # a shard store from `amity corpus ingest` (optional)
//! ca_dir = "ca"                     # from `amity ca init`; the coordinator's certificate is
//! name = "coordinator"              #   issued there under this name
//! revoked = ["old-lab"]             # certificate names refused at the handshake
//! preset = "tiny"                   # or run_config = "run.toml"
//! codec = "sparseloco"              # uplink codec for pseudo-gradients
//! downlink_codec = "topk0.05/4096+int8"  # codec of the per-round state deltas
//! target_policy = "local-ema"       # or "coordinator-ema"
//! checkpoint_every = 5
//!
//! [rounds]
//! budget_ms = 10000                 # local training time per round, and/or ...
//! steps = 0                         # ... at most this many local steps per round (0: no cap);
//!                                   # with both, each worker stops at whichever comes first
//! max_rounds = 100                  # the schedules follow round / max_rounds on every worker;
//!                                   # 0 (no planned end) holds them constant after warm-up
//!
//! [retention]
//! rounds = 4                        # states, snapshots, updates and log entries of the last 4
//!                                   # rounds are kept; older ones are deleted after each round
//! checkpoints = 0                   # round-N checkpoint files kept (0: all of them)
//!
//! [http]                            # optional: dashboard, /status.json, /metrics, admin
//! listen = "127.0.0.1:9464"         #   (loopback: reach it through an SSH tunnel or a proxy)
//! admin_token_file = "admin-token"  #   bearer token for pause, resume, revoke (optional)
//! telemetry_clips = 64              #   held-out clips for RankMe and feature std per round
//!
//! [replication]                     # optional: one of 3 or 5 Raft replicas (without this
//! id = 1                            #   table, a single coordinator with its own journal)
//! replicas = [                      # every replica, this one included; `name` is its replica
//!   { id = 1, name = "coord-paris", peer = "10.0.0.1:7710", workers = "10.0.0.1:7700" },
//!   { id = 2, name = "coord-delft", peer = "10.0.0.2:7710", workers = "10.0.0.2:7700" },
//!   { id = 3, name = "coord-turin", peer = "10.0.0.3:7710", workers = "10.0.0.3:7700" },
//! ]                                 #   certificate (`amity ca issue --role replica`), and this
//!                                   #   replica's must be `name` above
//! ```
//!
//! The last round and every round before a checkpoint are *flush* rounds: workers send their
//! update densely with their error-feedback residual, and the state delta goes out densely, so
//! that a checkpoint (and any release made from it) holds every step that was trained.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use amity_shared::config::{Config, ConfigError, read_toml, relative_to};
use amity_shared::federated::TargetPolicy;
use amity_shared::federated::codec::CodecSpec;
use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregationConfig, OuterConfig};
use crate::retention::RetentionPolicy;

/// What to do with an update for a round that has already closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LatePolicy {
    /// Drop it (the default: its base is stale and the next round is already under way).
    Drop,
    /// Add it to the current round with its weight times `staleness_discount ^ rounds late`.
    Discount,
}

/// How rounds are run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundPolicy {
    /// Local training time per round. Unset: 10 s when `steps` is 0, no time limit when it is
    /// set (step-budgeted rounds). Set together with `steps`, each worker trains until either
    /// runs out: a fast worker stops at `steps`, so the run's local steps do not grow with the
    /// hardware, and a slow one at the deadline, delivering what it trained.
    pub budget_ms: Option<u64>,
    /// Local steps per round at most (0: no cap, the time budget alone).
    pub steps: u64,
    /// Extra time after the budget for fetching state and uploading, before a round closes
    /// without the missing updates. Rounds without a time budget wait `grace_ms` in all.
    pub grace_ms: u64,
    /// Workers needed before the first round starts (later rounds run with whoever is there).
    pub min_workers: usize,
    /// Stop after this many rounds (0: never).
    pub max_rounds: u64,
    /// Late updates.
    pub late: LatePolicy,
    /// Weight factor per round of staleness under [`LatePolicy::Discount`].
    pub staleness_discount: f64,
    /// A worker silent for this long is considered gone.
    pub heartbeat_timeout_ms: u64,
    /// Shards handed out per round in all, split in proportion to throughput (at least one each).
    pub shards_per_round: usize,
    /// Flush rounds: the last round and every round before a checkpoint go out dense, so the
    /// error-feedback residuals are delivered (false: they stay with the workers, and what is
    /// released misses them).
    pub flush: bool,
}

impl RoundPolicy {
    /// The time budget when `budget_ms` is unset and no step budget is set.
    pub const DEFAULT_BUDGET_MS: u64 = 10_000;

    /// Local training time per round in milliseconds; 0 when the rounds have no time limit.
    pub fn time_budget_ms(&self) -> u64 {
        match self.budget_ms {
            Some(ms) => ms,
            None if self.steps == 0 => Self::DEFAULT_BUDGET_MS,
            None => 0,
        }
    }
}

impl Default for RoundPolicy {
    fn default() -> Self {
        RoundPolicy {
            budget_ms: None,
            steps: 0,
            grace_ms: 20_000,
            min_workers: 1,
            max_rounds: 0,
            late: LatePolicy::Drop,
            staleness_discount: 0.5,
            heartbeat_timeout_ms: 15_000,
            shards_per_round: 6,
            flush: true,
        }
    }
}

/// The training policy of the core (everything but I/O).
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    /// The run: model shape and inner recipe (workers receive it at registration).
    pub run: Config,
    /// Round policy.
    pub rounds: RoundPolicy,
    /// Outer optimiser.
    pub outer: OuterConfig,
    /// Aggregation.
    pub aggregation: AggregationConfig,
    /// Uplink codec.
    pub codec: CodecSpec,
    /// Downlink (state delta) codec.
    pub downlink_codec: CodecSpec,
    /// Target-encoder policy.
    pub target_policy: TargetPolicy,
    /// Checkpoint every this many rounds (0: never).
    pub checkpoint_every: u64,
    /// Whether the shell keeps a journal (a single coordinator): the core then emits its
    /// entries and the round snapshots they name. A replica keeps none (its Raft log and replica
    /// snapshots stand in), so its core makes neither.
    pub journal: bool,
}

impl CoreConfig {
    /// The defaults around a run config, measured by `amity bench federated`: outer lr 0.7
    /// with Nesterov momentum 0.5, SparseLoCo's codec up (64 of every 4096 values, 2 bits, error
    /// feedback), 5% of every 4096 values in int8 down, and the local-EMA target.
    pub fn new(run: Config) -> Self {
        CoreConfig {
            run,
            rounds: RoundPolicy::default(),
            outer: OuterConfig::default(),
            aggregation: AggregationConfig::default(),
            codec: default_codec(),
            downlink_codec: default_downlink(),
            target_policy: TargetPolicy::LocalEma,
            checkpoint_every: 5,
            journal: true,
        }
    }
}

// Measured with `amity bench federated` (tiny preset, 3 workers x 300 local steps, H = 50, seed
// 0, local EMA, outer 0.7/0.5; central reference 0.383): fp32 both ways velocity R2 0.350 at 29x
// fewer bytes than DDP, dense int8 0.348 at 114x, sparseloco up with 5%-of-4096 int8 down 0.316
// at 651x, top-5% int8 up with top-10% int8 down 0.259 at 501x.
fn default_codec() -> CodecSpec {
    CodecSpec::SPARSELOCO
}
fn default_downlink() -> CodecSpec {
    "topk0.05/4096+int8".parse().expect("valid codec name")
}
fn default_name() -> String {
    "coordinator".into()
}
fn default_policy() -> TargetPolicy {
    TargetPolicy::LocalEma
}
fn default_checkpoint_every() -> u64 {
    5
}

/// The whole `coordinator.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Folder of the command log, snapshots, checkpoints and received updates.
    pub state_dir: PathBuf,
    /// Shard store the coordinator holds and serves (optional: workers may bring their own).
    #[serde(default)]
    pub corpus: Option<PathBuf>,
    /// CA folder (`amity ca init`).
    pub ca_dir: PathBuf,
    /// The coordinator's certificate name in `ca_dir`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Certificate names refused at the handshake.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Preset of the run (ignored when `run_config` is given).
    #[serde(default)]
    pub preset: Option<String>,
    /// A run config TOML file (`amity train --print-config` style).
    #[serde(default)]
    pub run_config: Option<PathBuf>,
    /// Overrides the run's `train.steps` (0 keeps it). Workers' schedules follow the run's
    /// global progress (round against `rounds.max_rounds`), not their own step counts, so
    /// `train.steps` only sets warm-up's share of the run (`train.warmup / train.steps`).
    /// A run without a planned end (`max_rounds = 0`) warms up over `train.warmup` local steps
    /// of each worker and then holds learning rate, weight decay and EMA momentum constant.
    #[serde(default)]
    pub inner_steps: u64,
    /// Uplink codec.
    #[serde(default = "default_codec")]
    pub codec: CodecSpec,
    /// Downlink codec.
    #[serde(default = "default_downlink")]
    pub downlink_codec: CodecSpec,
    /// Target-encoder policy.
    #[serde(default = "default_policy")]
    pub target_policy: TargetPolicy,
    /// Checkpoint interval in rounds. Each checkpoint is preceded by a flush round (dense int8
    /// updates and state delta, about one byte per parameter each way and worker), which also
    /// delivers every held-back residual at once: in short runs prefer one at the end.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Round policy.
    #[serde(default)]
    pub rounds: RoundPolicy,
    /// Outer optimiser.
    #[serde(default)]
    pub outer: OuterConfig,
    /// Aggregation.
    #[serde(default)]
    pub aggregation: AggregationConfig,
    /// What is kept on disk.
    #[serde(default)]
    pub retention: RetentionPolicy,
    /// This coordinator as one replica of several (Raft); absent for a single coordinator.
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
    /// The dashboard, `/metrics` and the admin actions over HTTP; absent: no HTTP server.
    #[serde(default)]
    pub http: Option<HttpConfig>,
}

/// `[http]`: the operator's web surface ([`crate::server`]'s dashboard, `/metrics`,
/// `/status.json` and the admin actions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// TCP address to serve on. Loopback by default: reach it through an SSH tunnel or a
    /// reverse proxy that adds TLS.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// A file holding the bearer token that admin actions (pause, resume, revoke) must present.
    /// Without it admin actions are refused. Over plain HTTP the token is only accepted on a
    /// loopback address (elsewhere it would cross the network in clear).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Held-out clips on which the target encoder's collapse telemetry (per-dimension std,
    /// RankMe) is measured after every round, for the dashboard and `/metrics` (0: off).
    #[serde(default = "default_telemetry_clips")]
    pub telemetry_clips: usize,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_telemetry_clips() -> usize {
    64
}

impl HttpConfig {
    /// The admin token, read from `admin_token_file` (surrounding whitespace trimmed).
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let token = token.trim().to_owned();
        if token.len() < 16 {
            return Err(ConfigError::Invalid(format!(
                "{}: an admin token needs at least 16 characters (e.g. `openssl rand -hex 32`)",
                path.display()
            )));
        }
        if !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "[http] listen = {}: admin actions over plain HTTP are only served on a loopback \
                 address, where the token does not cross the network; bind to 127.0.0.1 and put \
                 a TLS reverse proxy or an SSH tunnel in front, or drop admin_token_file",
                self.listen
            )));
        }
        Ok(Some(token))
    }
}

/// `[replication]`: who this replica is and where every replica is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This replica's Raft id (one of `replicas`).
    pub id: u64,
    /// Every replica, this one included. Read when the replica's Raft log is new; after that
    /// the log's record rules, which membership changes (`amity coordinator members`) keep
    /// up to date on every replica.
    pub replicas: Vec<ReplicaEntry>,
    /// This replica joins a running group: it starts with no vote and waits until the operator
    /// adds it (`amity coordinator members add`), then catches up from a snapshot. `replicas`
    /// lists the running group's replicas and this one.
    #[serde(default)]
    pub join: bool,
}

/// One replica of the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaEntry {
    /// Its Raft id (not 0, unique).
    pub id: u64,
    /// The name on its replica certificate (what workers and peers connect to).
    pub name: String,
    /// Where its peers reach it (the Raft port).
    pub peer: SocketAddr,
    /// Where workers reach it (its `listen` address as seen from outside).
    pub workers: SocketAddr,
}

impl ReplicationConfig {
    /// This replica's entry.
    pub fn me(&self) -> Option<&ReplicaEntry> {
        self.replicas.iter().find(|r| r.id == self.id)
    }

    /// Checks the table against the coordinator's certificate `name`.
    pub fn check(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("[replication]: {m}")));
        let mut ids = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for r in &self.replicas {
            if r.id == 0 || !ids.insert(r.id) {
                return bad(format!("replica id {} is 0 or listed twice", r.id));
            }
            if !names.insert(r.name.as_str()) {
                return bad(format!("replica name `{}` listed twice", r.name));
            }
        }
        match self.me() {
            None => bad(format!("id = {} is not one of `replicas`", self.id)),
            Some(me) if me.name != name => bad(format!(
                "this replica's entry is named `{}` but the coordinator's `name` is `{name}`",
                me.name
            )),
            Some(_) if self.replicas.len() < 2 => bad(
                "list at least 2 replicas (3 or 5 survive a loss; omit the table for one)".into(),
            ),
            Some(_) => Ok(()),
        }
    }
}

impl CoordinatorConfig {
    /// Reads and checks a config file; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: CoordinatorConfig = read_toml(path)?;
        relative_to(
            path,
            [&mut cfg.state_dir, &mut cfg.ca_dir]
                .into_iter()
                .chain(cfg.corpus.as_mut())
                .chain(cfg.run_config.as_mut())
                .chain(cfg.http.as_mut().and_then(|h| h.admin_token_file.as_mut())),
        );
        let replication = match &cfg.replication {
            Some(r) => r.check(&cfg.name),
            None => Ok(()),
        };
        let http = match &cfg.http {
            Some(h) => h.admin_token().map(drop),
            None => Ok(()),
        };
        replication
            .and(http)
            .and_then(|()| cfg.core())
            .map_err(|e| match e {
                ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
                other => other,
            })?;
        Ok(cfg)
    }

    /// The core's part, with the run config resolved.
    pub fn core(&self) -> Result<CoreConfig, ConfigError> {
        let mut run = match (&self.run_config, &self.preset) {
            (Some(file), _) => Config::from_toml_file(file)?,
            (None, Some(p)) => Config::preset(p)?,
            (None, None) => {
                return Err(ConfigError::Invalid("set `preset` or `run_config`".into()));
            }
        };
        if self.inner_steps > 0 {
            run.train.steps = self.inner_steps;
            run.train.warmup = run.train.warmup.min(self.inner_steps / 4).max(1);
        }
        run.validate()?;
        let r = &self.rounds;
        if r.steps == 0 && r.time_budget_ms() == 0 {
            return Err(ConfigError::Invalid(
                "rounds: set budget_ms (time budget), steps (step budget) or both".into(),
            ));
        }
        if !(0.0..=1.0).contains(&r.staleness_discount) || self.aggregation.reject_ratio <= 1.0 {
            return Err(ConfigError::Invalid(
                "staleness_discount must lie in [0, 1] and reject_ratio above 1".into(),
            ));
        }
        Ok(CoreConfig {
            run,
            rounds: self.rounds,
            outer: self.outer,
            aggregation: self.aggregation,
            codec: self.codec,
            downlink_codec: self.downlink_codec,
            target_policy: self.target_policy,
            checkpoint_every: self.checkpoint_every,
            journal: self.replication.is_none(),
        })
    }
}
