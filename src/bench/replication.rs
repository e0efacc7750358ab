//! `amity bench replication`: what replicating the coordinator costs, and how fast it fails
//! over. Real processes on loopback (this binary as `amity coordinator` and `amity worker`):
//!
//! - the cost per round: the same run under a single coordinator (the baseline) and under
//!   three replicas, wall-clock seconds per round and bytes the replicas send each other;
//! - failover: the leader SIGKILLed `kills` times, each at a random moment of a round: the time
//!   from the kill until every worker has joined the new leader (which announces them the open
//!   round: the `worker joined` lines the replicas log), and until the next round closed; the
//!   killed replica is restarted and caught up before the next kill;
//! - snapshot transfer: a core snapshot of the tiny and small presets pulled from a peer over
//!   the replicas' own QUIC transport.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use std::net::SocketAddr;

use amity_coordinator::config::{
    CoordinatorConfig, CoreConfig, ReplicaEntry, ReplicationConfig, RoundPolicy,
};
use amity_coordinator::core::Core;
use amity_coordinator::replica::{PeerAddr, Transport};
use amity_protocol::tls::{CertRole, Identity, Revocations, init_ca, issue, issue_as};
use amity_shared::config::Config;
use amity_shared::federated::GlobalParams;
use amity_shared::rng::Rng;
use amity_shared::store::{BlobStore, LocalStore};

/// `amity bench replication`.
#[derive(Debug, Args)]
pub struct ReplicationBenchArgs {
    /// Leader kills to time.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Rounds of the cost comparison (single coordinator vs three replicas).
    #[arg(long, default_value_t = 12)]
    pub rounds: u64,
    /// Seed of the kill moments.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Working folder (kept, with every process's log).
    #[arg(long, default_value = "amity-bench-replication")]
    pub out: PathBuf,
}

const WORKERS: [&str; 2] = ["uni-a", "uni-b"];
const REPLICAS: u64 = 3;

/// Runs the bench; the last stdout line is its JSON.
pub fn run(args: ReplicationBenchArgs) -> Result<()> {
    let _ = std::fs::remove_dir_all(&args.out);
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let began = Instant::now();
    setup(&out)?;
    println!("set up in {:.1} s", began.elapsed().as_secs_f64());

    let single = cost(&out, "single", None, args.rounds)?;
    let replicated = cost(&out, "replicated", Some(REPLICAS), args.rounds)?;
    let ratio = replicated.secs_per_round / single.secs_per_round;
    println!(
        "per round: single {:.2} s, 3 replicas {:.2} s ({ratio:.2}x); updates {:.0} KB up per \
         round, replicas sent each other {:.0} KB per round",
        single.secs_per_round,
        replicated.secs_per_round,
        replicated.update_bytes_per_round / 1e3,
        replicated.replication_bytes_per_round / 1e3,
    );

    let (rejoined, closed) = failover(&out, args.kills, args.seed)?;
    let rejoin = Spread::of(rejoined);
    let next = Spread::of(closed);
    println!(
        "failover over {} kills: workers on the new leader after median {:.1} s (p90 {:.1}, \
         min {:.1}, max {:.1}); next round closed after median {:.1} s (p90 {:.1}, max {:.1})",
        args.kills,
        rejoin.median,
        rejoin.p90,
        rejoin.min,
        rejoin.max,
        next.median,
        next.p90,
        next.max
    );

    let snapshots = snapshot_transfers(&out)?;
    for (preset, (bytes, secs)) in &snapshots {
        println!(
            "snapshot {preset}: {:.1} MB pulled from a peer in {:.3} s ({:.0} MB/s)",
            *bytes as f64 / 1e6,
            secs,
            *bytes as f64 / 1e6 / secs
        );
    }
    let mut figures = json!({
        "bench": "replication",
        "replicas": REPLICAS,
        "rounds": args.rounds,
        "round_s_single": single.secs_per_round,
        "round_s_replicated": replicated.secs_per_round,
        "round_time_ratio": ratio,
        "update_bytes_per_round": replicated.update_bytes_per_round,
        "replication_bytes_per_round": replicated.replication_bytes_per_round,
        "kills": args.kills,
        "failover_s_median": rejoin.median,
        "failover_s_p90": rejoin.p90,
        "failover_s_min": rejoin.min,
        "failover_s_max": rejoin.max,
        "next_round_s_median": next.median,
        "next_round_s_p90": next.p90,
        "next_round_s_max": next.max,
    });
    for (preset, (bytes, secs)) in snapshots {
        figures[format!("snapshot_{preset}_bytes")] = json!(bytes);
        figures[format!("snapshot_{preset}_s")] = json!(secs);
    }
    println!("{figures}");
    Ok(())
}

/// Median, 90th percentile, min and max of some seconds.
struct Spread {
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Spread {
            median: at(0.5),
            p90: at(0.9),
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// Seconds since the Unix epoch now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Unix time of a log line's RFC 3339 UTC timestamp (`2026-12-05T00:02:55.190911Z ...`).
fn line_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// The CA, certificates, corpus and run config every part shares.
fn setup(out: &Path) -> Result<()> {
    let ca = out.join("ca");
    init_ca(&ca, "bench")?;
    let local = vec!["127.0.0.1".to_owned()];
    issue(&ca, "coordinator", &local)?;
    for id in 1..=REPLICAS {
        issue_as(&ca, &format!("coord-{id}"), &local, CertRole::Replica)?;
    }
    for w in WORKERS {
        issue(&ca, w, &[])?;
    }
    let (mut run, store, _) = crate::demo::corpus(out, 24, Instant::now())?;
    run.train.batch = 8;
    run.train.steps = 60;
    run.train.warmup = 5;
    std::fs::write(out.join("run.toml"), run.to_toml())?;
    if store != out.join("corpus") {
        bail!("corpus written to {}", store.display());
    }
    Ok(())
}

/// A single coordinator's config listening on `listen`: the coordinator's defaults, 4-step
/// rounds, `rounds` of them (0: no end), no checkpoints.
fn coordinator_config(out: &Path, listen: SocketAddr, rounds: u64) -> Result<CoordinatorConfig> {
    let run_path = out.join("run.toml");
    let default = CoreConfig::new(Config::from_toml_file(&run_path)?);
    Ok(CoordinatorConfig {
        listen,
        state_dir: "state".into(),
        corpus: Some(out.join("corpus")),
        ca_dir: out.join("ca"),
        name: "coordinator".into(),
        revoked: Vec::new(),
        preset: None,
        run_config: Some(run_path),
        inner_steps: 0,
        codec: default.codec,
        downlink_codec: default.downlink_codec,
        target_policy: default.target_policy,
        checkpoint_every: 0,
        rounds: RoundPolicy {
            steps: 4,
            grace_ms: 60_000,
            min_workers: WORKERS.len(),
            max_rounds: rounds,
            heartbeat_timeout_ms: 15_000,
            shards_per_round: 4,
            ..RoundPolicy::default()
        },
        outer: Default::default(),
        aggregation: Default::default(),
        retention: Default::default(),
        replication: None,
        http: None,
    })
}

/// A free UDP port on loopback.
fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One federation's processes: coordinators (or replicas) by id, workers.
struct Fleet {
    dir: PathBuf,
    /// (worker port, peer port) by replica id (id 1 alone for a single coordinator).
    ports: BTreeMap<u64, (u16, u16)>,
    replicated: bool,
    coordinators: BTreeMap<u64, Child>,
    workers: Vec<Child>,
}

impl Fleet {
    /// Writes the configs of `replicas` replicas (or one single coordinator) under `dir`.
    fn new(out: &Path, name: &str, replicas: Option<u64>, rounds: u64) -> Result<Fleet> {
        let dir = out.join(name);
        let mut ports = BTreeMap::new();
        for id in 1..=replicas.unwrap_or(1) {
            ports.insert(id, (free_port()?, free_port()?));
        }
        let entries: Vec<ReplicaEntry> = ports
            .iter()
            .map(|(&id, &(w, p))| ReplicaEntry {
                id,
                name: format!("coord-{id}"),
                peer: SocketAddr::from(([127, 0, 0, 1], p)),
                workers: SocketAddr::from(([127, 0, 0, 1], w)),
            })
            .collect();
        for e in &entries {
            let home = dir.join(format!("coordinator-{}", e.id));
            std::fs::create_dir_all(&home)?;
            let mut cfg = coordinator_config(out, e.workers, rounds)?;
            if replicas.is_some() {
                cfg.name = e.name.clone();
                cfg.replication = Some(ReplicationConfig {
                    id: e.id,
                    replicas: entries.clone(),
                    join: false,
                });
            }
            std::fs::write(home.join("coordinator.toml"), toml::to_string_pretty(&cfg)?)?;
        }
        Ok(Fleet {
            dir,
            ports,
            replicated: replicas.is_some(),
            coordinators: BTreeMap::new(),
            workers: Vec::new(),
        })
    }

    fn home(&self, id: u64) -> PathBuf {
        self.dir.join(format!("coordinator-{id}"))
    }

    fn start(&mut self, id: u64) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("coordinator-{id}.log")))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["coordinator", "--config"])
            .arg(self.home(id).join("coordinator.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.coordinators.insert(id, child);
        Ok(())
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.coordinators.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_workers(&mut self, out: &Path) -> Result<()> {
        let ca = out.join("ca");
        let list: Vec<String> = self
            .ports
            .iter()
            .map(|(id, (w, _))| match self.replicated {
                true => format!("coord-{id}@127.0.0.1:{w}"),
                false => format!("coordinator@127.0.0.1:{w}"),
            })
            .collect();
        for w in WORKERS {
            let log = std::fs::File::create(self.dir.join(format!("{w}.log")))?;
            let child = Command::new(std::env::current_exe()?)
                .args(["worker", "--coordinator", &list.join(",")])
                .arg("--cert")
                .arg(ca.join(format!("{w}.crt")))
                .arg("--ca")
                .arg(ca.join("ca.crt"))
                .arg("--cache")
                .arg(self.dir.join(format!("cache-{w}")))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?;
            self.workers.push(child);
        }
        Ok(())
    }

    fn status(&self, id: u64) -> Option<Value> {
        let text = std::fs::read_to_string(self.home(id).join("state/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn closed(&self, id: u64) -> usize {
        self.status(id)
            .and_then(|s| s["history"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// The live replica whose status says it leads, in the highest term any says (a status
    /// file may be older than the last election).
    fn leader(&self) -> Option<u64> {
        self.coordinators
            .keys()
            .filter_map(|&id| {
                let s = self.status(id)?;
                let term = s["replica"]["term"].as_u64()?;
                (s["replica"]["leader"].as_u64() == Some(id)).then_some((term, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&Fleet) -> bool) -> Result<()> {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > limit {
                bail!(
                    "{what}: not within {limit:?} (logs in {})",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self
            .workers
            .iter_mut()
            .chain(self.coordinators.values_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one run of `rounds` rounds cost.
struct Cost {
    secs_per_round: f64,
    update_bytes_per_round: f64,
    replication_bytes_per_round: f64,
}

/// Runs `rounds` rounds (single coordinator or `replicas` replicas) and times the rounds after
/// the first (which includes start-up).
fn cost(out: &Path, name: &str, replicas: Option<u64>, rounds: u64) -> Result<Cost> {
    let mut fleet = Fleet::new(out, name, replicas, rounds)?;
    for id in 1..=replicas.unwrap_or(1) {
        fleet.start(id)?;
    }
    fleet.start_workers(out)?;
    let watched = |f: &Fleet| match replicas {
        Some(_) => f.leader(),
        None => Some(1),
    };
    fleet.wait_for("a first round", Duration::from_secs(300), |f| {
        watched(f).is_some_and(|l| f.closed(l) >= 1)
    })?;
    let t0 = Instant::now();
    let leader = watched(&fleet).context("no leader")?;
    fleet.wait_for("every round", Duration::from_secs(600), |f| {
        f.closed(leader) >= rounds as usize
    })?;
    let secs = t0.elapsed().as_secs_f64() / (rounds - 1) as f64;
    let st = fleet.status(leader).context("no status")?;
    let history = st["history"].as_array().cloned().unwrap_or_default();
    let up: u64 = history.iter().filter_map(|r| r["bytes_up"].as_u64()).sum();
    let sent = st["replica"]["bytes_sent"].as_u64().unwrap_or(0);
    println!(
        "{name}: {rounds} rounds, {secs:.2} s per round after the first{}",
        if replicas.is_some() {
            format!(
                ", leader {leader} sent its peers {:.1} MB",
                sent as f64 / 1e6
            )
        } else {
            String::new()
        }
    );
    Ok(Cost {
        secs_per_round: secs,
        update_bytes_per_round: up as f64 / history.len().max(1) as f64,
        replication_bytes_per_round: sent as f64 / history.len().max(1) as f64,
    })
}

/// Kills the leader `kills` times; returns, per kill, the seconds until every worker joined
/// the new leader and until the next round closed.
fn failover(out: &Path, kills: usize, seed: u64) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut fleet = Fleet::new(out, "failover", Some(REPLICAS), 0)?;
    for id in 1..=REPLICAS {
        fleet.start(id)?;
    }
    fleet.start_workers(out)?;
    let mut rng = Rng::new(seed);
    let (mut rejoined, mut closed) = (Vec::new(), Vec::new());
    for k in 0..kills {
        fleet.wait_for(
            "a leader with a round closed",
            Duration::from_secs(300),
            |f| f.leader().is_some_and(|l| f.closed(l) >= 1),
        )?;
        let leader = fleet.leader().context("no leader")?;
        // A random moment of a round.
        let base = fleet.closed(leader);
        fleet.wait_for("the next round", Duration::from_secs(120), |f| {
            f.closed(leader) > base
        })?;
        std::thread::sleep(Duration::from_millis((rng.uniform() * 400.0) as u64));
        let at_kill = (1..=REPLICAS).map(|i| fleet.closed(i)).max().unwrap_or(0);
        fleet.kill(leader);
        let (t0, killed_at) = (Instant::now(), unix_now());
        fleet.wait_for("a round on the new leader", Duration::from_secs(120), |f| {
            f.coordinators.keys().any(|&i| f.closed(i) > at_kill)
        })?;
        let next = t0.elapsed().as_secs_f64();
        let back = fleet.wait_joined(killed_at, Duration::from_secs(60))?;
        println!(
            "kill {}/{kills}: replica {leader}; workers on the new leader {back:.1} s later, \
             next round closed {next:.1} s later",
            k + 1
        );
        rejoined.push(back);
        closed.push(next);
        fleet.start(leader)?;
        fleet.wait_for(
            "the restarted replica caught up",
            Duration::from_secs(120),
            |f| {
                let top = f
                    .coordinators
                    .keys()
                    .map(|&i| f.closed(i))
                    .max()
                    .unwrap_or(0);
                f.closed(leader) + 1 >= top
            },
        )?;
    }
    Ok((rejoined, closed))
}

impl Fleet {
    /// Seconds from `since` (Unix time) until every worker had joined again, as the live
    /// replicas' logs say (the earliest `worker joined` line of each after `since`).
    fn wait_joined(&self, since: f64, limit: Duration) -> Result<f64> {
        let start = Instant::now();
        loop {
            let mut last = Some(since);
            for w in WORKERS {
                let first = self
                    .coordinators
                    .keys()
                    .filter_map(|id| {
                        let log =
                            std::fs::read_to_string(self.dir.join(format!("coordinator-{id}.log")))
                                .ok()?;
                        log.lines()
                            .filter(|l| {
                                l.contains("worker joined") && l.contains(&format!("name={w}"))
                            })
                            .filter_map(line_time)
                            .find(|t| *t > since)
                    })
                    .min_by(f64::total_cmp);
                last = match (last, first) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            if let Some(t) = last {
                return Ok(t - since);
            }
            if start.elapsed() > limit {
                bail!("workers did not join again within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Pulls a fresh core's replica snapshot of the tiny and small presets from a peer replica over
/// the replicas' transport; (bytes, seconds) per preset.
fn snapshot_transfers(out: &Path) -> Result<BTreeMap<String, (u64, f64)>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ca = out.join("ca");
    let mut figures = BTreeMap::new();
    for preset in ["tiny", "small"] {
        let run = Config::preset(preset)?;
        let (core, _) = Core::new(
            CoreConfig::new(run.clone()),
            GlobalParams::seeded(&run),
            &[],
        );
        let bytes = core
            .replica_snapshot()
            .context("a fresh core has a snapshot")?
            .to_bytes();
        let store = LocalStore::open(&out.join(format!("snapshot-{preset}")))?;
        let id = store.put(&bytes)?.id;
        let part = out.join(format!("snapshot-{preset}.part"));
        let secs = rt.block_on(async {
            let peers: BTreeMap<u64, PeerAddr> = (1..=2u64)
                .map(|i| {
                    Ok((
                        i,
                        PeerAddr {
                            addr: format!("127.0.0.1:{}", free_port()?).parse()?,
                            name: format!("coord-{i}"),
                        },
                    ))
                })
                .collect::<Result<_>>()?;
            let mut nets = Vec::new();
            for i in 1..=2u64 {
                let identity = Identity::load_from_ca_dir(&ca, &format!("coord-{i}"))?;
                let held = store.clone();
                let locate: amity_coordinator::replica::Locate =
                    std::sync::Arc::new(move |b| held.contains(b).then(|| held.path(b)));
                nets.push(Transport::start(
                    peers[&i].addr,
                    &identity,
                    &Revocations::default(),
                    i,
                    &peers,
                    locate,
                    0,
                )?);
            }
            let t0 = Instant::now();
            nets[1].fetcher().fetch(1, id, &part, 16 << 30).await?;
            let secs = t0.elapsed().as_secs_f64();
            for n in &nets {
                n.close();
            }
            Ok::<_, anyhow::Error>(secs)
        })?;
        let got = std::fs::read(&part)?;
        if got != bytes {
            bail!("the pulled {preset} snapshot differs from the original");
        }
        figures.insert(preset.to_owned(), (bytes.len() as u64, secs));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::line_time;

    /// Log timestamps read as Unix time, leap days and all (against Python's datetime).
    #[test]
    fn log_timestamps_read_as_unix_time() {
        let t = line_time("2026-12-05T00:02:55.500000Z  INFO amity: worker joined").unwrap();
        assert!((t - 1_796_428_975.5).abs() < 1e-6, "{t}");
        let leap = line_time("2024-02-29T23:59:59Z x").unwrap();
        assert_eq!(leap, 1_709_251_199.0);
        assert_eq!(line_time("round 3 acknowledged"), None);
    }
}
