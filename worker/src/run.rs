//! The worker's async shell: it carries out what [`WorkerCore`] decides and feeds it what
//! happens. It connects with mutual TLS, sends and receives control messages, fetches blobs into
//! the cache (verified, resumable), serves our updates to the coordinator (which pulls them),
//! and runs each local round on a blocking thread while heartbeats go on. Nothing here decides:
//! when to reconnect, what to fetch, what to train and what to send are the core's.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use amity_protocol::conn::{
    ConnError, HandshakeRefusal, MsgStream, OutboardCache, closed_with, fetch_blob_bytes,
    serve_blob_requests,
};
use amity_protocol::message::ServerMsg;
use amity_protocol::tls::{Identity, quic_client_config};
use amity_shared::config::Config;
use amity_shared::corpus::loader::ShardSet;
use amity_shared::corpus::manifest::{ClipShape, Manifest, open_blobs};
use amity_shared::data::ClipSource;
use amity_shared::device::{Backend, Device};
use amity_shared::federated::{LocalUpdate, local_round};
use amity_shared::store::{BlobId, BlobStore, LocalStore};
use amity_shared::train::Trainer;
use tokio::task::JoinHandle;

use crate::core::{
    CoreOptions, Disconnect, Fault, HEARTBEAT, Input, MAX_SHARD_BYTES, TrainJob, WorkerAction,
    WorkerCore, WorkerError, WorkerSummary, human,
};

/// Where a coordinator (or one replica of it) is reached, and the name on its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorAddr {
    /// Its worker port.
    pub addr: SocketAddr,
    /// The name its certificate must carry.
    pub name: String,
}

impl CoordinatorAddr {
    /// `host:port` (certificate name `default_name`) or `name@host:port`, the host resolved.
    pub fn parse(s: &str, default_name: &str) -> Result<Self, String> {
        let (name, host) = match s.split_once('@') {
            Some((n, h)) if !n.is_empty() => (n, h),
            Some(_) => return Err(format!("`{s}`: empty certificate name before `@`")),
            None => (default_name, s),
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
            .map_err(|e| format!("`{host}`: {e}"))?
            .next()
            .ok_or_else(|| format!("`{host}` resolves to no address"))?;
        Ok(CoordinatorAddr {
            addr,
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for CoordinatorAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// How to run a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator, or every replica of it (tried in turn; a replica that does not lead
    /// names the leader, which is tried next). Not empty.
    pub coordinators: Vec<CoordinatorAddr>,
    /// Compute backend.
    pub backend: Backend,
    /// Cache of fetched shards and outgoing updates.
    pub cache_dir: PathBuf,
    /// The institution's own shard store (`amity corpus ingest`), registered by id only.
    pub local_corpus: Option<PathBuf>,
    /// Step time multiplier standing in for slower hardware (demo and tests); 1 = full speed.
    pub slowdown: f64,
    /// Deliberate misbehaviour (tests only).
    pub fault: Option<Fault>,
    /// Where progress lines (steps, rounds) go.
    pub progress: Progress,
    /// TCP address to serve Prometheus `/metrics` on (`None`: no metrics server).
    pub metrics: Option<std::net::SocketAddr>,
}

/// Where a worker's progress lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nowhere (the caller shows its own).
    Off,
    /// Plain lines on stderr, for a person.
    Lines,
    /// INFO log events (target `amity_worker::progress`), for a log collector
    /// (`--log-format json`): every line on stderr is then one JSON object.
    Log,
}

impl Progress {
    /// Shows `line` where it goes.
    pub fn say(self, line: &str) {
        match self {
            Progress::Off => {}
            Progress::Lines => eprintln!("{line}"),
            Progress::Log => tracing::info!(target: "amity_worker::progress", "{line}"),
        }
    }
}

/// Runs a worker until the coordinator finishes training or `stop` is set (Ctrl-C).
pub async fn run(
    opts: WorkerOptions,
    identity: Identity,
    stop: Arc<AtomicBool>,
) -> Result<WorkerSummary, WorkerError> {
    fn setup<E: std::error::Error + Send + Sync + 'static>(
        what: &str,
    ) -> impl FnOnce(E) -> WorkerError + '_ {
        move |e| WorkerError::Setup {
            what: what.to_owned(),
            source: Box::new(e),
        }
    }
    // Before anything else: a GPU without a driver is a clear error here, not a worker that
    // registers with no throughput and fails at its first round.
    let device = opts.backend.device(0).map_err(setup("compute device"))?;
    let cache = LocalStore::open(&opts.cache_dir.join("blobs")).map_err(setup("blob cache"))?;
    let local = match &opts.local_corpus {
        Some(dir) => {
            let m = Manifest::load(dir).map_err(setup("local corpus"))?;
            let blobs = open_blobs(dir).map_err(setup("local corpus blobs"))?;
            Some((blobs, m.shards.iter().map(|s| (s.id, s.clips)).collect()))
        }
        None => None,
    };
    let client_cfg = quic_client_config(&identity).map_err(setup("TLS"))?;
    let target = opts
        .coordinators
        .first()
        .cloned()
        .ok_or(WorkerError::Setup {
            what: "coordinator address".into(),
            source: "no coordinator address given".into(),
        })?;
    let endpoint =
        amity_protocol::endpoint::client(target.addr, client_cfg).map_err(setup("UDP socket"))?;
    let (core, first) = WorkerCore::new(CoreOptions {
        backend: opts.backend.name().into(),
        local_shards: local
            .as_ref()
            .map(|(_, shards): &(LocalStore, Vec<(BlobId, u64)>)| shards.clone())
            .unwrap_or_default(),
        slowdown: opts.slowdown,
        fault: opts.fault,
        progress: opts.progress != Progress::Off,
    });
    let mut shell = Shell {
        opts,
        device,
        cache,
        local: local.map(|(store, _)| store),
        endpoint,
        target,
        next: 0,
        redirect: None,
        link: None,
        trainer: None,
        job: None,
        reconnect_at: None,
        stop,
        stop_told: false,
        clock: Instant::now(),
        outboards: OutboardCache::new(),
        result: None,
        core,
    };
    shell.carry_out(first).await;
    let board = crate::metrics::Board::new(shell.opts.backend.name());
    let metrics = match shell.opts.metrics {
        Some(addr) => {
            let what = format!("metrics on {addr}");
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(setup(&what))?;
            let bound = listener.local_addr().map_err(setup(&what))?;
            tracing::info!(url = %format!("http://{bound}/metrics"), "metrics listening");
            Some(crate::metrics::serve(listener, board.clone()))
        }
        None => None,
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    // The core decides when the worker is done. Its `Finish` carries the outcome; a `Finish`
    // dropped behind a failed goodbye (the coordinator closed first) is a clean end.
    while shell.result.is_none() && !shell.core.finished() {
        for input in shell.next_inputs(&mut heartbeat).await {
            let actions = shell.core.handle(input, shell.now_ms());
            shell.carry_out(actions).await;
        }
        board.set(shell.core.summary(), shell.core.gauges());
    }
    if let Some(m) = metrics {
        m.abort();
    }
    shell.close_link();
    shell.endpoint.wait_idle().await;
    let summary = shell.core.summary().clone();
    shell.result.unwrap_or(Ok(())).map(|()| summary)
}

/// A live connection: the control stream and the task serving our blobs on it.
struct Link {
    conn: quinn::Connection,
    control: MsgStream,
    server: JoinHandle<()>,
}

/// What a local round's blocking thread hands back: the trainer, and the update.
type JobResult = (Trainer, Result<LocalUpdate, String>);

/// The shell's resources; the decisions are `core`'s.
struct Shell {
    opts: WorkerOptions,
    /// The device this worker trains on, opened (and probed) once at start.
    device: Device,
    cache: LocalStore,
    /// The institution's own shard store.
    local: Option<LocalStore>,
    endpoint: quinn::Endpoint,
    /// The coordinator connected to (or last tried).
    target: CoordinatorAddr,
    /// Index in `opts.coordinators` of the next one to try.
    next: usize,
    /// The leader a replica named: tried next, before the list.
    redirect: Option<CoordinatorAddr>,
    link: Option<Link>,
    /// The trainer (model and AdamW state) between rounds; inside `job` while one runs.
    trainer: Option<Trainer>,
    job: Option<JoinHandle<JobResult>>,
    reconnect_at: Option<tokio::time::Instant>,
    stop: Arc<AtomicBool>,
    /// Whether the core was told of `stop`.
    stop_told: bool,
    clock: Instant,
    /// Outboards of the updates we served (a re-request after a dropped connection is not
    /// hashed again).
    outboards: OutboardCache,
    /// Set by [`WorkerAction::Finish`].
    result: Option<Result<(), WorkerError>>,
    core: WorkerCore,
}

impl Shell {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Ctrl-C, once, if it came since the core was last told.
    fn stop_news(&mut self) -> Option<Input> {
        let news = self.stop.load(Ordering::Relaxed) && !self.stop_told;
        self.stop_told |= news;
        news.then_some(Input::Stop)
    }

    /// Waits for the next thing that happens: a message, the end of a training job, the
    /// heartbeat timer, or the time to reconnect. Ctrl-C is told first when it came meanwhile
    /// (a job cut short by it is then abandoned, not uploaded).
    async fn next_inputs(&mut self, heartbeat: &mut tokio::time::Interval) -> Vec<Input> {
        let next = self.next_input(heartbeat).await;
        self.stop_news().into_iter().chain(next).collect()
    }

    async fn next_input(&mut self, heartbeat: &mut tokio::time::Interval) -> Option<Input> {
        let input = tokio::select! {
            msg = recv(&mut self.link) => match msg {
                Ok(Some(msg)) => Input::Message(msg),
                Ok(None) => {
                    self.close_link();
                    Input::Lost(Disconnect::lost("control stream closed"))
                }
                Err(e) => {
                    self.close_link();
                    Input::Lost(disconnect(&e))
                }
            },
            done = join(&mut self.job) => {
                self.job = None;
                match done {
                    Ok((trainer, result)) => {
                        // A new run's trainer may have replaced it meanwhile.
                        self.trainer.get_or_insert(trainer);
                        Input::Trained(result)
                    }
                    Err(e) => Input::Trained(Err(format!("training thread: {e}"))),
                }
            }
            _ = heartbeat.tick() => Input::Tick,
            _ = until(self.reconnect_at) => {
                self.reconnect_at = None;
                // None: a set-up error ended the worker (`result` holds it).
                return self.connect().await;
            }
        };
        Some(input)
    }

    /// Carries out `actions` in order, then the actions of the inputs they answer with. A
    /// failed action drops the rest of its batch and tells the core the connection is lost.
    async fn carry_out(&mut self, actions: Vec<WorkerAction>) {
        let mut batches = VecDeque::from([actions]);
        while let Some(batch) = batches.pop_front() {
            let mut answers = Vec::new();
            for action in batch {
                match self.perform(action).await {
                    Ok(Some(input)) => answers.push(input),
                    Ok(None) => {}
                    Err(d) => {
                        answers.push(Input::Lost(d));
                        break;
                    }
                }
            }
            for input in answers {
                let now = self.now_ms();
                batches.push_back(self.core.handle(input, now));
            }
        }
    }

    /// Carries out one action; a request's answer comes back as the input.
    async fn perform(&mut self, action: WorkerAction) -> Result<Option<Input>, Disconnect> {
        match action {
            WorkerAction::Connect => return Ok(self.connect().await),
            WorkerAction::ConnectAfter(wait) => {
                let to = match &self.redirect {
                    Some(leader) => leader.to_string(),
                    None if self.opts.coordinators.len() == 1 => self.target.to_string(),
                    None => "the next coordinator replica".to_owned(),
                };
                tracing::warn!("reconnecting to {to} in {wait:?}");
                self.reconnect_at = Some(tokio::time::Instant::now() + wait);
            }
            WorkerAction::Disconnect => self.close_link(),
            WorkerAction::Redirect(leader) => {
                let named = leader.and_then(|l| match CoordinatorAddr::parse(&l, "") {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!("the replica named an unusable leader {e}");
                        None
                    }
                });
                self.redirect = named;
            }
            WorkerAction::Send(msg) => {
                let link = self
                    .link
                    .as_mut()
                    .ok_or_else(|| Disconnect::lost("not connected"))?;
                link.control.send(&msg).await.map_err(|e| disconnect(&e))?;
            }
            WorkerAction::MeasureThroughput(run) => {
                let (device, slowdown) = (self.device.clone(), self.opts.slowdown);
                let rate = tokio::task::spawn_blocking(move || {
                    measure_throughput(&run, &device, slowdown)
                })
                .await
                .unwrap_or(0.0);
                return Ok(Some(Input::Throughput(rate)));
            }
            WorkerAction::NewTrainer(run) => {
                let device = self.device.clone();
                let trainer = tokio::task::spawn_blocking(move || Trainer::new(*run, &device))
                    .await
                    .map_err(|e| Disconnect::lost(format!("making the trainer: {e}")))?;
                self.trainer = Some(trainer);
            }
            WorkerAction::Fetch { id, max_len } => {
                let (bytes, downloaded) = self.fetch(id, max_len).await?;
                return Ok(Some(Input::Fetched {
                    id,
                    bytes,
                    downloaded,
                }));
            }
            WorkerAction::PrepareShards(ids) => {
                let mut downloaded = 0;
                for id in ids {
                    let local = self.local.as_ref().is_some_and(|s| s.contains(&id));
                    if !local && !self.cache.contains(&id) {
                        downloaded += self.fetch(id, MAX_SHARD_BYTES).await?.1;
                    }
                }
                return Ok(Some(Input::ShardsReady { downloaded }));
            }
            WorkerAction::Train(job) => {
                if let Err(why) = self.train(job) {
                    return Ok(Some(Input::Trained(Err(why))));
                }
            }
            WorkerAction::StoreUpdate(bytes) => {
                self.cache
                    .put(&bytes)
                    .map_err(|e| Disconnect::lost(format!("storing our update: {e}")))?;
            }
            WorkerAction::Forget(ids) => {
                for id in ids {
                    if let Err(e) = self.cache.remove(&id) {
                        tracing::warn!("cache: {e}");
                    }
                }
            }
            WorkerAction::Report(line) => self.opts.progress.say(&line),
            WorkerAction::Finish(result) => self.result = Some(result),
        }
        Ok(None)
    }

    /// The next address of the list is the one to try.
    fn advance(&mut self) {
        self.next = (self.next + 1) % self.opts.coordinators.len();
    }

    /// Connects (to the leader a replica named, else the next address of the list in turn),
    /// opens the control stream and starts serving our blobs on the connection. `None` when no
    /// retry can mend the failure (a bad address or server name): `result` holds it.
    async fn connect(&mut self) -> Option<Input> {
        self.target = match self.redirect.take() {
            Some(t) => t,
            None => {
                // Round robin, skipping the one just connected to: a live replica names the
                // leader, and one that just vanished is not waited for first.
                let mut t = self.opts.coordinators[self.next].clone();
                self.advance();
                if t == self.target && self.opts.coordinators.len() > 1 {
                    t = self.opts.coordinators[self.next].clone();
                    self.advance();
                }
                t
            }
        };
        self.connect_to().await
    }

    async fn connect_to(&mut self) -> Option<Input> {
        let (addr, name) = (self.target.addr, self.target.name.clone());
        let connecting = match self.endpoint.connect(addr, &name) {
            Ok(c) => c,
            Err(e) => {
                // A bad address or server name: no retry can mend it.
                let ended = Err(WorkerError::Setup {
                    what: format!("connecting to {addr}"),
                    source: Box::new(e),
                });
                self.result = Some(ended);
                return None;
            }
        };
        let conn = match connecting.await {
            Ok(conn) => conn,
            Err(e) => {
                return Some(Input::Lost(match HandshakeRefusal::of(&e) {
                    Some(refusal) => Disconnect::Refused {
                        refusal,
                        detail: format!("{addr}: {e}"),
                    },
                    None => Disconnect::Lost {
                        why: format!("{addr}: {e}"),
                        code: closed_with(&e),
                    },
                }));
            }
        };
        let control = match MsgStream::open(&conn, &name).await {
            Ok(s) => s,
            Err(e) => {
                conn.close(0u32.into(), b"bye");
                return Some(Input::Lost(disconnect(&e)));
            }
        };
        let cache = self.cache.clone();
        let server = tokio::spawn(serve_blob_requests(
            conn.clone(),
            name,
            self.outboards.clone(),
            move |id: &BlobId| cache.contains(id).then(|| cache.path(id)),
        ));
        self.link = Some(Link {
            conn,
            control,
            server,
        });
        Some(Input::Connected)
    }

    fn close_link(&mut self) {
        if let Some(link) = self.link.take() {
            link.server.abort();
            link.conn.close(0u32.into(), b"bye");
        }
    }

    /// Blob `id` (at most `max_len` bytes) from the cache, else fetched into it (verified,
    /// resumable); with the bytes downloaded.
    async fn fetch(&mut self, id: BlobId, max_len: u64) -> Result<(Vec<u8>, u64), Disconnect> {
        let store_err = |e: &dyn std::fmt::Display| Disconnect::lost(format!("cache: {e}"));
        if self.cache.contains(&id) {
            return Ok((self.cache.get(&id).map_err(|e| store_err(&e))?, 0));
        }
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| Disconnect::lost("not connected"))?;
        let part = self
            .cache
            .root()
            .join("tmp")
            .join(format!("{}.fetch", id.to_hex()));
        let bytes = fetch_blob_bytes(&link.conn, &self.target.name, id, &part, max_len)
            .await
            .map_err(|e| disconnect(&e))?;
        self.cache.put(&bytes).map_err(|e| store_err(&e))?;
        let n = bytes.len() as u64;
        Ok((bytes, n))
    }

    /// Starts `job` on a blocking thread; Ctrl-C is honoured between steps.
    fn train(&mut self, job: TrainJob) -> Result<(), String> {
        let trainer = self
            .trainer
            .take()
            .ok_or("no trainer: the run's config has not arrived")?;
        let run = trainer.config().clone();
        let source = if job.shards.is_empty() {
            ClipSource::synthetic(&run.model)
        } else {
            let mut stores: Vec<LocalStore> = self.local.iter().cloned().collect();
            stores.push(self.cache.clone());
            let shape = ClipShape::of(&run.model);
            match ShardSet::open_in(&stores, shape, &job.shards, &self.opts.cache_dir) {
                Ok(set) => ClipSource::Shards(Arc::new(set)),
                Err(e) => {
                    self.trainer = Some(trainer);
                    return Err(e.to_string());
                }
            }
        };
        let stop = self.stop.clone();
        let progress = self.opts.progress;
        let (up, down) = (self.core.summary().bytes_up, self.core.summary().bytes_down);
        self.job = Some(tokio::task::spawn_blocking(move || {
            let mut trainer = trainer;
            let t0 = Instant::now();
            let round = job.round;
            let mut on_step = |step: u64, loss: f64| {
                if progress != Progress::Off && step.is_multiple_of(5) {
                    let rate = (step * run.train.batch as u64) as f64 / t0.elapsed().as_secs_f64();
                    progress.say(&format!(
                        "round {round} step {step} loss {loss:.4} {rate:.1} clips/s up {} down {}",
                        human(up),
                        human(down)
                    ));
                }
            };
            let r = local_round(
                &mut trainer,
                &job.start,
                &source,
                &job.options,
                &mut on_step,
                || stop.load(Ordering::Relaxed),
            );
            (trainer, r.map_err(|e| e.to_string()))
        }));
        Ok(())
    }
}

/// How the connection behind `e` ended, for the core.
fn disconnect(e: &ConnError) -> Disconnect {
    match e.handshake_refusal() {
        Some(refusal) => Disconnect::Refused {
            refusal,
            detail: e.to_string(),
        },
        None => Disconnect::Lost {
            why: e.to_string(),
            code: e.closed_with(),
        },
    }
}

/// The next control message, or never when there is no connection.
async fn recv(link: &mut Option<Link>) -> Result<Option<ServerMsg>, ConnError> {
    match link {
        Some(link) => link.control.recv::<ServerMsg>().await,
        None => std::future::pending().await,
    }
}

/// The training job's end, or never when none runs.
async fn join(
    job: &mut Option<JoinHandle<JobResult>>,
) -> Result<JobResult, tokio::task::JoinError> {
    match job {
        Some(job) => job.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Measures clips/s of this machine on the run's model (a few steps, after one warm-up).
/// Training throughput of `run`'s model on `device`, clips per second (a few steps of a batch
/// of at most 8, after one to warm up), times `1 / slowdown`. What a worker registers with, and
/// what `amity doctor` reports.
pub fn measure_throughput(run: &Config, device: &Device, slowdown: f64) -> f32 {
    let mut cfg = run.clone();
    cfg.train.batch = cfg.train.batch.min(8);
    let mut t = Trainer::new(cfg.clone(), device);
    let source = ClipSource::synthetic(&cfg.model);
    let batch = source.batch(0, 0, cfg.train.batch, &cfg.model);
    t.step(&batch);
    let start = Instant::now();
    for _ in 0..2 {
        t.step(&batch);
    }
    let secs = start.elapsed().as_secs_f64() * slowdown.max(1.0);
    (2.0 * cfg.train.batch as f64 / secs) as f32
}
