//! A replicated coordinator: three `amity coordinator` processes with `[replication]`, each its
//! own state folder and ports on loopback, and workers that know every replica.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amity_shared::config::Config;
use serde_json::Value;

use super::common::cluster::{free_port, synthetic_store, wait};
use super::common::{amity, ok, s, scratch};

const REPLICAS: u64 = 3;

/// Three replicas' files and processes.
struct Group {
    dir: PathBuf,
    /// (worker port, peer port) by replica id.
    ports: BTreeMap<u64, (u16, u16)>,
    procs: BTreeMap<u64, Child>,
}

impl Group {
    /// A corpus, a CA with replica and worker certificates, and one config per replica.
    fn new(name: &str, workers: &[&str], rounds: u64) -> Group {
        let dir = scratch(name);
        synthetic_store(&dir.join("videos"), &dir.join("corpus"), 12, 3);
        let ca = dir.join("ca");
        ok(&amity(&["ca", "init", "--dir", s(&ca)]));
        for id in 1..=REPLICAS {
            ok(&amity(&[
                "ca",
                "issue",
                "--dir",
                s(&ca),
                "--name",
                &format!("coord-{id}"),
                "--host",
                "127.0.0.1",
                "--role",
                "replica",
            ]));
        }
        for w in workers {
            ok(&amity(&["ca", "issue", "--dir", s(&ca), "--name", w]));
        }
        let mut run = Config::preset("tiny").unwrap();
        run.train.batch = 8;
        run.train.steps = 60;
        run.train.warmup = 5;
        std::fs::write(dir.join("run.toml"), run.to_toml()).unwrap();
        let ports: BTreeMap<u64, (u16, u16)> = (1..=REPLICAS)
            .map(|id| (id, (free_port(), free_port())))
            .collect();
        let replicas: Vec<String> = ports
            .iter()
            .map(|(id, (w, p))| {
                format!(
                    "  {{ id = {id}, name = \"coord-{id}\", peer = \"127.0.0.1:{p}\", \
                     workers = \"127.0.0.1:{w}\" }},"
                )
            })
            .collect();
        for (id, (w, _)) in &ports {
            let home = dir.join(format!("replica-{id}"));
            std::fs::create_dir_all(&home).unwrap();
            std::fs::write(
                home.join("coordinator.toml"),
                format!(
                    "listen = \"127.0.0.1:{w}\"\nstate_dir = \"state\"\ncorpus = \"../corpus\"\n\
                     ca_dir = \"../ca\"\nname = \"coord-{id}\"\nrun_config = \"../run.toml\"\n\
                     checkpoint_every = 2\n\
                     [rounds]\nsteps = 4\ngrace_ms = 60000\nmin_workers = {}\n\
                     max_rounds = {rounds}\nheartbeat_timeout_ms = 15000\nshards_per_round = 4\n\
                     [replication]\nid = {id}\nreplicas = [\n{}\n]\n",
                    workers.len(),
                    replicas.join("\n")
                ),
            )
            .unwrap();
        }
        Group {
            dir,
            ports,
            procs: BTreeMap::new(),
        }
    }

    fn home(&self, id: u64) -> PathBuf {
        self.dir.join(format!("replica-{id}"))
    }

    /// Starts (or restarts) replica `id`, its log appended to `replica-<id>.log`.
    fn start(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("replica-{id}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_amity"))
            .args(["coordinator", "--config"])
            .arg(self.home(id).join("coordinator.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.insert(id, child);
    }

    /// SIGKILL: no goodbye, no flush.
    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every replica's address, as a worker's `--coordinator` takes them.
    fn addresses(&self) -> String {
        self.ports
            .iter()
            .map(|(id, (w, _))| format!("coord-{id}@127.0.0.1:{w}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn worker(&self, name: &str) -> Child {
        let ca = self.dir.join("ca");
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_amity"))
            .args(["worker", "--coordinator", &self.addresses()])
            .args(["--cert", s(&ca.join(format!("{name}.crt")))])
            .args(["--ca", s(&ca.join("ca.crt"))])
            .args(["--cache", s(&self.dir.join(format!("cache-{name}")))])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn status(&self, id: u64) -> Option<Value> {
        let text = std::fs::read_to_string(self.home(id).join("state/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn rounds(&self, id: u64) -> usize {
        self.status(id)
            .and_then(|s| s["history"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                all += &format!("--- {}\n", p.display());
                for l in tail.into_iter().rev() {
                    all += l;
                    all.push('\n');
                }
            }
        }
        all
    }

    /// Waits until `check` holds, or fails with every log.
    fn wait_for(&self, what: &str, limit: Duration, check: impl Fn(&Group) -> bool) {
        let start = Instant::now();
        while !check(self) {
            assert!(
                start.elapsed() < limit,
                "{what}: not after {limit:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The leader as the live replicas' status files say (the one that says it is).
    fn leader(&self) -> Option<u64> {
        self.procs.keys().copied().find(|&id| {
            self.status(id)
                .is_some_and(|s| s["replica"]["leader"].as_u64() == Some(id))
        })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// `(worker, round)` for every "round N acknowledged" line in the worker's log.
fn acknowledged(g: &Group, worker: &str) -> BTreeSet<(String, u64)> {
    let log = std::fs::read_to_string(g.dir.join(format!("{worker}.log"))).unwrap_or_default();
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("round ")?;
            let n = rest.strip_suffix(" acknowledged")?;
            Some((worker.to_owned(), n.parse().ok()?))
        })
        .collect()
}

/// `(institution, round)` of every update in the closed rounds of a status.
fn accepted(status: &Value) -> BTreeSet<(String, u64)> {
    let mut out = BTreeSet::new();
    for r in status["history"].as_array().into_iter().flatten() {
        let round = r["round"].as_u64().unwrap();
        for name in r["accepted"].as_array().into_iter().flatten() {
            out.insert((name.as_str().unwrap().to_owned(), round));
        }
    }
    out
}

/// The failover test: three replicas, two workers that know them all. The leader is
/// killed (SIGKILL) while a round runs; a follower takes over, the workers find it, and the run
/// finishes. Every acknowledged update is in the history every replica agrees on, the survivors
/// end on the same parameters, and the killed replica, restarted, catches up to the same hash.
#[test]
fn the_leader_killed_mid_round_loses_no_acknowledged_update() {
    const ROUNDS: u64 = 8;
    let workers = ["uni-a", "uni-b"];
    let mut g = Group::new("replicated-failover", &workers, ROUNDS);
    for id in 1..=REPLICAS {
        g.start(id);
    }
    let mut procs: Vec<Child> = workers.iter().map(|w| g.worker(w)).collect();
    g.wait_for("two rounds on a leader", Duration::from_secs(240), |g| {
        g.leader().is_some_and(|l| g.rounds(l) >= 2)
    });
    let old = g.leader().unwrap();
    // Inside the next round: its announce is out, updates are coming in.
    std::thread::sleep(Duration::from_millis(700));
    g.kill(old);
    let killed_at = Instant::now();
    let closed_at_kill = (1..=REPLICAS).map(|i| g.rounds(i)).max().unwrap();
    g.wait_for("a new leader", Duration::from_secs(30), |g| {
        g.leader().is_some_and(|l| l != old)
    });
    let new = g.leader().unwrap();
    g.wait_for(
        "the open round closed by the new leader",
        Duration::from_secs(120),
        |g| g.rounds(new) > closed_at_kill,
    );
    eprintln!(
        "failover: replica {old} killed with {closed_at_kill} rounds closed; replica {new} \
         closed the open round {:.1} s later",
        killed_at.elapsed().as_secs_f64()
    );
    for (w, p) in workers.iter().zip(&mut procs) {
        wait(p, Duration::from_secs(300), w, &|| g.logs());
    }
    let survivors: Vec<u64> = (1..=REPLICAS).filter(|&i| i != old).collect();
    g.wait_for("every survivor finished", Duration::from_secs(30), |g| {
        survivors.iter().all(|&i| g.rounds(i) == ROUNDS as usize)
    });
    let st: Vec<Value> = survivors.iter().map(|&i| g.status(i).unwrap()).collect();
    assert_eq!(st[0]["params"], st[1]["params"], "survivors disagree");
    assert_eq!(st[0]["history"], st[1]["history"], "survivors disagree");
    let agreed = accepted(&st[0]);
    // Every round closed with both workers' updates, the one under way at the kill included:
    // the new leader announced it to their new sessions, and each offered again what it had
    // not had acknowledged.
    for r in st[0]["history"].as_array().unwrap() {
        assert_eq!(
            r["accepted"].as_array().map(Vec::len),
            Some(2),
            "{r}\n{}",
            g.logs()
        );
    }
    for w in workers {
        let acks = acknowledged(&g, w);
        assert!(!acks.is_empty(), "{w} has no acknowledged update");
        let missing: Vec<_> = acks.difference(&agreed).collect();
        assert!(
            missing.is_empty(),
            "acknowledged but not in the history: {missing:?}\n{}",
            g.logs()
        );
    }
    // The killed replica comes back and replays or is sent the state to the same hash.
    g.start(old);
    g.wait_for(
        "the restarted replica caught up",
        Duration::from_secs(60),
        |g| {
            g.status(old)
                .is_some_and(|s| s["params"] == st[0]["params"] && s["history"] == st[0]["history"])
        },
    );
}
