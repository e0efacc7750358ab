//! A replicated coordinator: three `amity coordinator` processes with `[replication]`, each on
//! a host of its own (a network namespace, `common::netns`) with its own state folder, and
//! workers on hosts of their own that know every replica. Hosts are killed (SIGKILL), cut off
//! and healed (their link taken down and up).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::cluster::{federation_files, wait};
use super::common::netns::Net;
use super::common::{amity, ok, s, scratch};

mod web;

const REPLICAS: u64 = 3;
/// Every replica listens for workers on this port and for its peers on the next, each on its
/// own host's address.
const WORKER_PORT: u16 = 7700;
const PEER_PORT: u16 = 7710;

/// Three replicas' files and processes, and the network of their hosts: replica `id` on host
/// `id - 1`, spare replicas (configured to join) after them, then worker `i`.
struct Group {
    dir: PathBuf,
    net: Net,
    workers: Vec<String>,
    /// Replicas configured to join the group later, ids `REPLICAS + 1 ..`.
    spares: u64,
    /// Replicas run with libfaketime, their wall clocks offset by what `clock-<id>` holds
    /// (monotonic clocks untouched), so that a test can make them jump.
    fake_clocks: bool,
    procs: BTreeMap<u64, Child>,
}

/// The operator's bearer token for every replica's admin actions (`[http]` on each replica's
/// loopback, reached with curl inside its network namespace).
const ADMIN_TOKEN: &str = "replicated-admin-token-0123456789";

/// Where Debian's libfaketime puts its multi-threaded library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

impl Group {
    /// A corpus, a CA with replica, worker and operator certificates, and one config per
    /// replica.
    fn new(name: &str, workers: &[&str], rounds: u64) -> Group {
        Group::with_spares(name, workers, rounds, 0)
    }

    /// [`Group::new`] with `spares` replicas more, configured to join a running group.
    fn with_spares(name: &str, workers: &[&str], rounds: u64, spares: u64) -> Group {
        let all = REPLICAS + spares;
        let net = Net::new(all as usize + workers.len());
        let dir = scratch(name);
        let ca = federation_files(&dir, workers);
        ok(&amity(&[
            "ca",
            "issue",
            "--dir",
            s(&ca),
            "--name",
            "operator",
            "--role",
            "operator",
        ]));
        for id in 1..=all {
            ok(&amity(&[
                "ca",
                "issue",
                "--dir",
                s(&ca),
                "--name",
                &format!("coord-{id}"),
                "--host",
                &net.addr(id as usize - 1).to_string(),
                "--role",
                "replica",
            ]));
        }
        let host = |id: u64| net.addr(id as usize - 1);
        let replicas: Vec<String> = (1..=all)
            .map(|id| {
                let h = host(id);
                format!(
                    "  {{ id = {id}, name = \"coord-{id}\", peer = \"{h}:{PEER_PORT}\", \
                     workers = \"{h}:{WORKER_PORT}\" }},"
                )
            })
            .collect();
        for id in 1..=all {
            let home = dir.join(format!("replica-{id}"));
            std::fs::create_dir_all(&home).unwrap();
            // The group's replicas list themselves; a spare lists them and itself, and joins.
            let listed = if id <= REPLICAS {
                &replicas[..REPLICAS as usize]
            } else {
                &replicas[..]
            };
            std::fs::write(
                home.join("coordinator.toml"),
                format!(
                    "listen = \"{}:{WORKER_PORT}\"\nstate_dir = \"state\"\n\
                     corpus = \"../corpus\"\nca_dir = \"../ca\"\nname = \"coord-{id}\"\n\
                     run_config = \"../run.toml\"\ncheckpoint_every = 2\n\
                     [rounds]\nsteps = 4\ngrace_ms = 60000\nmin_workers = {}\n\
                     max_rounds = {rounds}\nheartbeat_timeout_ms = 15000\nshards_per_round = 4\n\
                     [http]\nadmin_token_file = \"../admin-token\"\ntelemetry_clips = 0\n\
                     [replication]\nid = {id}\njoin = {}\nreplicas = [\n{}\n]\n",
                    host(id),
                    workers.len(),
                    id > REPLICAS,
                    listed.join("\n")
                ),
            )
            .unwrap();
        }
        std::fs::write(dir.join("admin-token"), ADMIN_TOKEN).unwrap();
        Group {
            dir,
            net,
            workers: workers.iter().map(|w| w.to_string()).collect(),
            spares,
            fake_clocks: false,
            procs: BTreeMap::new(),
        }
    }

    /// Sets replica `id`'s wall clock `offset_s` seconds off the true time (the replica reads
    /// it within a second; see [`Group::fake_clocks`]).
    fn set_clock(&self, id: u64, offset_s: i64) {
        let file = self.dir.join(format!("clock-{id}"));
        std::fs::write(file, format!("{offset_s:+}s\n")).unwrap();
    }

    /// The host of worker `i`.
    fn worker_host(&self, i: usize) -> usize {
        (REPLICAS + self.spares) as usize + i
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
        let mut cmd = self
            .net
            .command(id as usize - 1, env!("CARGO_BIN_EXE_amity"));
        if self.fake_clocks {
            assert!(
                std::path::Path::new(LIBFAKETIME).exists(),
                "{LIBFAKETIME} is missing: run scripts/install-deps"
            );
            let file = self.dir.join(format!("clock-{id}"));
            if !file.exists() {
                self.set_clock(id, 0);
            }
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", &file)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd
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

    /// Starts the group's replicas, then every worker (the workers' processes).
    fn start_all(&mut self) -> Vec<Child> {
        for id in 1..=REPLICAS {
            self.start(id);
        }
        self.workers()
    }

    /// Waits for every worker to finish its run (within 300 s), failing with every log.
    fn wait_workers(&self, procs: &mut [Child]) {
        for (w, p) in self.workers.iter().zip(procs) {
            wait(p, Duration::from_secs(300), w, &|| self.logs());
        }
    }

    /// Every replica's address, as a worker's `--coordinator` takes them.
    fn addresses(&self) -> String {
        self.addresses_of(&(1..=REPLICAS).collect::<Vec<_>>())
    }

    /// Replicas `ids`' addresses, as `--coordinator` takes them.
    fn addresses_of(&self, ids: &[u64]) -> String {
        ids.iter()
            .map(|&id| {
                let h = self.net.addr(id as usize - 1);
                format!("coord-{id}@{h}:{WORKER_PORT}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts every worker, each on its own host.
    fn workers(&self) -> Vec<Child> {
        (0..self.workers.len()).map(|i| self.worker(i)).collect()
    }

    fn worker(&self, i: usize) -> Child {
        let name = &self.workers[i];
        let ca = self.dir.join("ca");
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        self.net
            .command(self.worker_host(i), env!("CARGO_BIN_EXE_amity"))
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

    /// The leader as the live replicas' status files say: the one that says it leads, in the
    /// highest term any says (a restarted replica's file may predate the last election).
    fn leader(&self) -> Option<u64> {
        self.procs
            .keys()
            .filter_map(|&id| {
                let s = self.status(id)?;
                let term = s["replica"]["term"].as_u64()?;
                (s["replica"]["leader"].as_u64() == Some(id)).then_some((term, id))
            })
            .max()
            .map(|(_, id)| id)
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
    let mut procs = g.start_all();
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
    g.wait_workers(&mut procs);
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

impl Group {
    /// The history and parameters every replica in `ids` agrees on, once they all show
    /// `rounds` closed rounds with the same parameters.
    fn wait_agreed(&self, ids: &[u64], rounds: usize, limit: Duration) -> Value {
        self.wait_for("replicas agreeing", limit, |g| {
            let st: Vec<Option<Value>> = ids.iter().map(|&i| g.status(i)).collect();
            st.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s["history"].as_array().map(Vec::len) == Some(rounds)
                        && s["params"] == st[0].as_ref().unwrap()["params"]
                        && s["history"] == st[0].as_ref().unwrap()["history"]
                })
            })
        });
        self.status(ids[0]).unwrap()
    }

    /// `amity coordinator status --json` run on worker 0's host against every replica, as
    /// that institution: one answer per replica.
    fn status_cli(&self) -> Vec<Value> {
        self.status_cli_of(&(1..=REPLICAS).collect::<Vec<_>>())
    }

    /// [`Group::status_cli`] asking replicas `ids`.
    fn status_cli_of(&self, ids: &[u64]) -> Vec<Value> {
        let ca = self.dir.join("ca");
        let out = self
            .net
            .command(self.worker_host(0), env!("CARGO_BIN_EXE_amity"))
            .args(["coordinator", "status", "--json"])
            .args(["--coordinator", &self.addresses_of(ids)])
            .args(["--cert", s(&ca.join(format!("{}.crt", self.workers[0])))])
            .args(["--ca", s(&ca.join("ca.crt"))])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.join(format!("replica-{id}.log"))).unwrap_or_default()
    }
}

/// A follower cut off the network for several rounds (each closed round compacts the log, so
/// what it missed is gone from the leader's log) catches up when healed: it is sent a Raft
/// snapshot, pulls the core snapshot it names from a peer, and ends on the others' parameters.
#[test]
fn a_partitioned_follower_catches_up_by_snapshot() {
    const ROUNDS: u64 = 8;
    let mut g = Group::new("replicated-partition", &["uni-a", "uni-b"], ROUNDS);
    let mut procs = g.start_all();
    g.wait_for("a round on a leader", Duration::from_secs(240), |g| {
        g.leader().is_some_and(|l| g.rounds(l) >= 1)
    });
    let leader = g.leader().unwrap();
    let cut = (1..=REPLICAS).find(|&i| i != leader).unwrap();
    let at_cut = g.rounds(cut);
    g.net.cut(cut as usize - 1);
    // Longer than QUIC's idle timeout (10 s): a shorter cut is bridged by QUIC itself, which
    // delivers what it held once the path is back, so the follower would never miss an entry.
    g.wait_for("rounds closed without it", Duration::from_secs(120), |g| {
        g.rounds(leader) >= at_cut + 3
    });
    std::thread::sleep(Duration::from_secs(12));
    assert!(g.rounds(cut) <= at_cut + 1, "a cut-off replica went on");
    g.net.heal(cut as usize - 1);
    g.wait_workers(&mut procs);
    let all: Vec<u64> = (1..=REPLICAS).collect();
    g.wait_agreed(&all, ROUNDS as usize, Duration::from_secs(60));
    assert!(
        g.log(cut).contains("restored from a peer's snapshot"),
        "replica {cut} caught up without a snapshot:\n{}",
        g.logs()
    );
    // `amity coordinator status`, asked of every replica: one answer each (linearizable), all
    // at the last round, one term and leader, and the leader reports each replica's lag.
    let answers = g.status_cli();
    assert_eq!(answers.len(), REPLICAS as usize, "{answers:?}");
    for a in &answers {
        assert_eq!(a["closed"], ROUNDS, "{a}");
        assert_eq!(a["params"], answers[0]["params"], "{answers:?}");
        assert_eq!(a["replica"]["leader"], answers[0]["replica"]["leader"]);
    }
    let leader = answers[0]["replica"]["leader"].as_u64().unwrap();
    let lag = &answers[leader as usize - 1]["replica"]["lag"];
    assert_eq!(
        lag.as_object().map(|m| m.len()),
        Some(REPLICAS as usize),
        "{answers:?}"
    );
    web::the_web_surface_knows_its_replica(&g, leader);
}

impl Group {
    /// `amity coordinator members <change>` run on worker 0's host against the first three
    /// replicas, with certificate `cert` (`operator` for the operator's).
    fn members_cli(&self, cert: &str, change: &[&str]) -> std::process::Output {
        let ca = self.dir.join("ca");
        self.net
            .command(self.worker_host(0), env!("CARGO_BIN_EXE_amity"))
            .args(["coordinator", "members"])
            .args(["--coordinator", &self.addresses()])
            .args(["--cert", s(&ca.join(format!("{cert}.crt")))])
            .args(["--ca", s(&ca.join("ca.crt"))])
            .args(change)
            .output()
            .unwrap()
    }
}

/// Membership by CLI while two workers train: the operator replaces the leader by a fourth
/// replica (started to join). The fourth is added, catches up from a snapshot, the leader hands
/// over and is removed; the run finishes on the new group, whose three replicas agree, and the
/// status every one of them gives lists the new voters. An institution's certificate may not
/// change membership.
#[test]
fn the_operator_replaces_the_leader_by_a_new_replica() {
    const ROUNDS: u64 = 10;
    let workers = ["uni-a", "uni-b"];
    let mut g = Group::with_spares("replicated-members", &workers, ROUNDS, 1);
    let mut procs = g.start_all();
    g.wait_for("two rounds on a leader", Duration::from_secs(240), |g| {
        g.leader().is_some_and(|l| g.rounds(l) >= 2)
    });
    let new = REPLICAS + 1;
    g.start(new);
    let refused = g.members_cli("uni-a", &["remove", "--id", "1"]);
    assert!(
        !refused.status.success(),
        "an institution changed membership"
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("operator certificate"), "{said}");

    let old = g.leader().unwrap();
    let h = g.net.addr(new as usize - 1);
    let (peer, at) = (format!("{h}:{PEER_PORT}"), format!("{h}:{WORKER_PORT}"));
    let out = g.members_cli(
        "operator",
        &[
            "replace",
            "--old",
            &old.to_string(),
            "--id",
            &new.to_string(),
            "--name",
            &format!("coord-{new}"),
            "--peer",
            &peer,
            "--workers",
            &at,
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{text}
{}",
        g.logs()
    );
    assert!(text.contains(&format!("replica {old} removed")), "{text}");
    g.kill(old);
    g.wait_workers(&mut procs);
    let group: Vec<u64> = (1..=new).filter(|&i| i != old).collect();
    let end = g.wait_agreed(&group, ROUNDS as usize, Duration::from_secs(60));
    let agreed = accepted(&end);
    for w in workers {
        let missing: Vec<_> = acknowledged(&g, w).difference(&agreed).cloned().collect();
        assert!(
            missing.is_empty(),
            "acknowledged, not in the history: {missing:?}"
        );
    }
    assert!(
        g.log(new).contains("restored from a peer's snapshot"),
        "replica {new} joined without a snapshot:
{}",
        g.logs()
    );
    let answers = g.status_cli_of(&group);
    assert_eq!(answers.len(), group.len(), "{answers:?}");
    for a in &answers {
        assert_eq!(a["replica"]["voters"], serde_json::json!(group), "{a}");
        assert_eq!(a["closed"], ROUNDS, "{a}");
    }
}

/// Releases belong to the group: one published on a follower (`amity release --config` on its
/// state folder) is committed, copied to every replica, and fetched verified from the leader; a
/// replica that was down when it was published copies it once back. A name no replica
/// published is refused by each.
#[test]
fn a_release_published_on_one_replica_is_served_by_every_one() {
    const ROUNDS: u64 = 4;
    let workers = ["uni-a", "uni-b"];
    let mut g = Group::new("replicated-release", &workers, ROUNDS);
    let mut procs = g.start_all();
    g.wait_workers(&mut procs);
    let all: Vec<u64> = (1..=REPLICAS).collect();
    g.wait_agreed(&all, ROUNDS as usize, Duration::from_secs(60));
    let leader = g.leader().unwrap();
    let mut followers = (1..=REPLICAS).filter(|&i| i != leader);
    let (publisher, down) = (followers.next().unwrap(), followers.next().unwrap());
    g.kill(down);
    let ca = g.dir.join("ca");
    ok(&amity(&["ca", "release-key", "--dir", s(&ca)]));
    let config = g.home(publisher).join("coordinator.toml");
    ok(&amity(&[
        "release",
        "--config",
        s(&config),
        "--name",
        "r1",
        "--probe-videos",
        "0",
    ]));
    let homes: Vec<PathBuf> = (1..=REPLICAS).map(|id| g.home(id)).collect();
    let manifest = |id: u64| {
        std::fs::read(homes[id as usize - 1].join("state/releases/r1/manifest.json")).ok()
    };
    g.wait_for(
        "the leader copied the release",
        Duration::from_secs(60),
        |_| manifest(leader).is_some(),
    );
    assert_eq!(manifest(leader), manifest(publisher));
    // Fetched from the leader by an institution, as anyone fetches a release.
    let fetch = |g: &Group, from: u64, name: &str, out: &std::path::Path| {
        let h = g.net.addr(from as usize - 1);
        g.net
            .command(g.worker_host(0), env!("CARGO_BIN_EXE_amity"))
            .args(["fetch", &format!("{h}:{WORKER_PORT}"), name])
            .args(["--out", s(out), "--key", s(&ca.join("release.pub"))])
            .args(["--ca", s(&ca.join("ca.crt"))])
            .args(["--server-name", &format!("coord-{from}")])
            .output()
            .unwrap()
    };
    let got = fetch(&g, leader, "latest", &g.dir.join("got-leader"));
    let said =
        String::from_utf8_lossy(&got.stdout).into_owned() + &String::from_utf8_lossy(&got.stderr);
    assert!(
        got.status.success(),
        "{said}
{}",
        g.logs()
    );
    assert!(said.contains("fetched release `r1`"), "{said}");
    assert_eq!(
        std::fs::read(g.dir.join("got-leader/manifest.json")).ok(),
        manifest(publisher)
    );
    // The replica that was down catches up with the log, then copies the release.
    g.start(down);
    g.wait_for(
        "the restarted replica copied the release",
        Duration::from_secs(60),
        |_| manifest(down).is_some(),
    );
    assert_eq!(manifest(down), manifest(publisher));
    let missing = fetch(&g, down, "r2", &g.dir.join("got-r2"));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success(), "{said}");
    assert!(
        said.contains("no release `r2`") && said.contains("r1"),
        "{said}"
    );
}

/// Every replica killed at once mid-run, then all restarted: each rebuilds its core from its
/// own log (snapshot and the commands after it), the workers find the new leader, and training
/// resumes at the last committed round: the rounds closed before the crash are unchanged.
#[test]
fn all_replicas_restarted_at_once_resume_at_the_last_committed_round() {
    const ROUNDS: u64 = 8;
    let mut g = Group::new("replicated-restart", &["uni-a", "uni-b"], ROUNDS);
    let mut procs = g.start_all();
    g.wait_for("three rounds", Duration::from_secs(240), |g| {
        g.leader().is_some_and(|l| g.rounds(l) >= 3)
    });
    for id in 1..=REPLICAS {
        g.kill(id);
    }
    let before: Vec<Value> = (1..=REPLICAS).filter_map(|i| g.status(i)).collect();
    std::thread::sleep(Duration::from_secs(1));
    for id in 1..=REPLICAS {
        g.start(id);
    }
    g.wait_workers(&mut procs);
    let all: Vec<u64> = (1..=REPLICAS).collect();
    let end = g.wait_agreed(&all, ROUNDS as usize, Duration::from_secs(60));
    for st in before {
        let h = st["history"].as_array().unwrap();
        assert_eq!(
            &end["history"].as_array().unwrap()[..h.len()],
            &h[..],
            "a committed round changed across the restart"
        );
    }
}

/// What the randomized fault test saw: every status read, checked against the rest.
#[derive(Default)]
struct Observed {
    /// The leader each term had (a second one in the same term is a split brain).
    leaders: BTreeMap<u64, u64>,
    /// Closed rounds as first seen, by position: they never change.
    history: Vec<Value>,
    /// The parameters after n closed rounds: equal on every replica.
    params: BTreeMap<usize, Value>,
}

impl Observed {
    fn check(&mut self, g: &Group, step: usize) {
        for id in g.procs.keys().copied() {
            let Some(st) = g.status(id) else { continue };
            let r = &st["replica"];
            if let (Some(term), Some(leader)) = (r["term"].as_u64(), r["leader"].as_u64())
                && leader == id
            {
                let first = *self.leaders.entry(term).or_insert(leader);
                assert_eq!(first, leader, "step {step}: two leaders in term {term}");
            }
            let h = st["history"].as_array().cloned().unwrap_or_default();
            for (i, round) in h.iter().enumerate() {
                match self.history.get(i) {
                    Some(seen) => assert_eq!(
                        seen, round,
                        "step {step}: replica {id} shows round {i} otherwise"
                    ),
                    None => self.history.push(round.clone()),
                }
            }
            let p = self.params.entry(h.len()).or_insert(st["params"].clone());
            assert_eq!(
                *p,
                st["params"],
                "step {step}: replica {id} has other parameters after {} rounds",
                h.len()
            );
        }
    }
}

/// The randomized fault test: from a fixed seed, kills, restarts, partitions, heals and
/// clock jumps (a replica's wall clock set up to two minutes off, either way, with libfaketime)
/// at random moments while two workers train, one replica down or cut off at a time (so a
/// quorum stays); after every step: at most one leader per term, closed rounds never change, equal
/// parameters after equal rounds on every replica. At the end every acknowledged update is in
/// the agreed history and every replica holds the same state. Reproducible from the seed
/// (`AMITY_FAULT_SEED`), bounded in time.
#[test]
fn randomized_faults_keep_the_replicas_consistent() {
    const ROUNDS: u64 = 30;
    let seed: u64 = std::env::var("AMITY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(27);
    let mut rng = amity_shared::rng::Rng::new(seed);
    let workers = ["uni-a", "uni-b"];
    let mut g = Group::new("replicated-faults", &workers, ROUNDS);
    g.fake_clocks = true;
    for id in 1..=REPLICAS {
        g.start(id);
    }
    let mut offsets: BTreeMap<u64, i64> = (1..=REPLICAS).map(|id| (id, 0)).collect();
    let mut procs = g.workers();
    g.wait_for("a first round", Duration::from_secs(240), |g| {
        g.leader().is_some_and(|l| g.rounds(l) >= 1)
    });
    let mut seen = Observed::default();
    // At most one replica is down or cut off at a time.
    let mut down: Option<(u64, &str)> = None;
    let mut steps = Vec::new();
    let start = Instant::now();
    for step in 0..16 {
        if g.leader().is_some_and(|l| g.rounds(l) >= ROUNDS as usize) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500 + (rng.uniform() * 2500.0) as u64));
        let victim = 1 + (rng.uniform() * REPLICAS as f64) as u64 % REPLICAS;
        let leader_first = rng.uniform() < 0.5;
        if rng.uniform() < 0.3 {
            let id = match g.leader() {
                Some(l) if leader_first => l,
                _ => victim,
            };
            let by = [-90, -45, 45, 90][(rng.uniform() * 4.0) as usize % 4];
            let to = (offsets[&id] + by).clamp(-120, 120);
            offsets.insert(id, to);
            g.set_clock(id, to);
            steps.push(format!("clock {id} {to:+}s"));
            seen.check(&g, step);
            continue;
        }
        let what = match down.take() {
            Some((id, "killed")) => {
                g.start(id);
                format!("restart {id}")
            }
            Some((id, _)) => {
                g.net.heal(id as usize - 1);
                format!("heal {id}")
            }
            None => {
                let id = match g.leader() {
                    Some(l) if leader_first => l,
                    _ => victim,
                };
                if rng.uniform() < 0.5 {
                    g.kill(id);
                    down = Some((id, "killed"));
                    format!("kill {id}")
                } else {
                    g.net.cut(id as usize - 1);
                    down = Some((id, "cut"));
                    format!("cut {id}")
                }
            }
        };
        steps.push(what);
        seen.check(&g, step);
    }
    match down {
        Some((id, "killed")) => g.start(id),
        Some((id, _)) => g.net.heal(id as usize - 1),
        None => {}
    }
    eprintln!(
        "seed {seed}: {} in {:.0} s",
        steps.join(", "),
        start.elapsed().as_secs_f64()
    );
    for (w, p) in workers.iter().zip(&mut procs) {
        wait(p, Duration::from_secs(400), w, &|| {
            format!("seed {seed}: {steps:?}\n{}", g.logs())
        });
    }
    let all: Vec<u64> = (1..=REPLICAS).collect();
    let end = g.wait_agreed(&all, ROUNDS as usize, Duration::from_secs(90));
    seen.check(&g, usize::MAX);
    let agreed = accepted(&end);
    for w in workers {
        let missing: Vec<_> = acknowledged(&g, w).difference(&agreed).cloned().collect();
        assert!(
            missing.is_empty(),
            "seed {seed} ({steps:?}): acknowledged, not in the history: {missing:?}"
        );
    }
}
