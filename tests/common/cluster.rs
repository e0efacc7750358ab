//! A federation on loopback: corpus, CA, run config, coordinator config, and the processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amity_shared::config::Config;
use serde_json::Value;

use super::{amity, ok, s, scratch};

/// A free UDP port on loopback.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed (and reaped) when dropped still running: a failed assertion
/// must not leave a coordinator or workers training in the background (one such run slowed the
/// next CI run to a crawl). It dereferences to its [`Child`].
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A federation's files and port.
pub struct Cluster {
    /// Its folder.
    pub dir: PathBuf,
    /// The coordinator's UDP port.
    pub port: u16,
    /// `coordinator.toml`.
    pub config: PathBuf,
}

/// `n` synthetic videos of 24 frames (from `seed`) written to `videos`, then ingested into a
/// shard store at `store` in 0.1 MiB shards.
pub fn synthetic_store(videos: &Path, store: &Path, n: usize, seed: u64) {
    let (n, seed) = (n.to_string(), seed.to_string());
    ok(&amity(&[
        "corpus",
        "synth",
        "--out",
        s(videos),
        "--videos",
        &n,
        "--frames",
        "24",
        "--seed",
        &seed,
    ]));
    ok(&amity(&[
        "corpus",
        "ingest",
        s(videos),
        "--store",
        s(store),
        "--decoder",
        "builtin",
        "--shard-mib",
        "0.1",
    ]));
}

/// What every federation in the tests starts from, in `dir`: a synthetic corpus (`corpus/`), a
/// CA (`ca/`) with a certificate for each of `workers`, and the run config (`run.toml`: the
/// tiny preset, batch 8, 60 steps). Returns the CA folder.
pub fn federation_files(dir: &Path, workers: &[&str]) -> PathBuf {
    synthetic_store(&dir.join("videos"), &dir.join("corpus"), 12, 3);
    let ca = dir.join("ca");
    ok(&amity(&["ca", "init", "--dir", s(&ca)]));
    for w in workers {
        ok(&amity(&["ca", "issue", "--dir", s(&ca), "--name", w]));
    }
    let mut run = Config::preset("tiny").unwrap();
    run.train.batch = 8;
    run.train.steps = 60;
    run.train.warmup = 5;
    std::fs::write(dir.join("run.toml"), run.to_toml()).unwrap();
    ca
}

/// A corpus, a CA with the workers' certificates, a run config and a coordinator config.
pub fn cluster(name: &str, workers: &[&str], rounds: u64, extra: &str) -> Cluster {
    let dir = scratch(name);
    let ca = federation_files(&dir, workers);
    ok(&amity(&[
        "ca",
        "issue",
        "--dir",
        s(&ca),
        "--name",
        "coordinator",
        "--host",
        "localhost",
    ]));
    let port = free_port();
    let config = dir.join("coordinator.toml");
    // A checkpoint every round unless the test sets its own interval.
    let checkpoints = if extra.contains("checkpoint_every") {
        ""
    } else {
        "checkpoint_every = 1\n"
    };
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\ncorpus = \"corpus\"\n\
             ca_dir = \"ca\"\nrun_config = \"run.toml\"\n{checkpoints}{extra}\n\
             [rounds]\nsteps = 4\ngrace_ms = 60000\nmin_workers = {}\nmax_rounds = {rounds}\n\
             heartbeat_timeout_ms = 4000\nshards_per_round = 4\n",
            workers.len()
        ),
    )
    .unwrap();
    Cluster { dir, port, config }
}

impl Cluster {
    pub fn coordinator(&self, exit_when_finished: bool) -> Proc {
        self.coordinator_with(exit_when_finished, &[])
    }

    /// [`Cluster::coordinator`] with `extra` arguments.
    pub fn coordinator_with(&self, exit_when_finished: bool, extra: &[&str]) -> Proc {
        let mut c = Command::new(env!("CARGO_BIN_EXE_amity"));
        c.args(["coordinator", "--config", s(&self.config)])
            .args(extra);
        if exit_when_finished {
            c.arg("--exit-when-finished");
        }
        let log = std::fs::File::create(self.dir.join("coordinator.log")).unwrap();
        Proc(c.stdout(Stdio::null()).stderr(log).spawn().unwrap())
    }

    pub fn worker(&self, name: &str, extra: &[&str]) -> Proc {
        let ca = self.dir.join("ca");
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_amity"))
            .args([
                "worker",
                "--coordinator",
                &format!("127.0.0.1:{}", self.port),
                "--cert",
                s(&ca.join(format!("{name}.crt"))),
                "--ca",
                s(&ca.join("ca.crt")),
                "--cache",
                s(&self.dir.join(format!("cache-{name}"))),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    pub fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.join("state/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until the status shows `round` or more closed rounds.
    pub fn wait_rounds(&self, rounds: usize, limit: Duration) -> Value {
        let closed = |st: &Value| st["history"].as_array().map_or(0, |h| h.len()) >= rounds;
        self.wait_for(&format!("{rounds} rounds"), limit, || {
            self.status().is_some_and(|st| closed(&st))
        });
        self.status().expect("status.json")
    }

    /// Waits until `done` holds, failing with `what` and the coordinator's log after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < limit,
                "{what}: not after {limit:?}; coordinator log:\n{}",
                self.log("coordinator")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Sends `child` SIGINT, as Ctrl-C in its terminal would.
pub fn interrupt(child: &Child) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

pub fn wait(child: &mut Child, limit: Duration, what: &str, log: &dyn Fn() -> String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what} exited with {status}:\n{}", log());
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} still running after {limit:?}:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
