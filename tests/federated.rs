//! Federated training as operators run it: a real `amity coordinator` process and real
//! `amity worker` processes over loopback QUIC with mTLS certificates from `amity ca`.
//!
//! Rounds are step-budgeted here (a few local steps each) so that the tests are quick and do not
//! depend on how fast the machine is; the demo and the bench use time budgets.

mod common;
use common::{amity, ok, s, scratch};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amity_shared::config::Config;
use serde_json::Value;

/// A free UDP port on loopback.
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    dir: PathBuf,
    port: u16,
    config: PathBuf,
}

/// A corpus, a CA with the workers' certificates, a run config and a coordinator config.
fn cluster(name: &str, workers: &[&str], rounds: u64, extra: &str) -> Cluster {
    let dir = scratch(name);
    let videos = dir.join("videos");
    ok(&amity(&[
        "corpus",
        "synth",
        "--out",
        s(&videos),
        "--videos",
        "12",
        "--frames",
        "24",
        "--seed",
        "3",
    ]));
    ok(&amity(&[
        "corpus",
        "ingest",
        s(&videos),
        "--store",
        s(&dir.join("corpus")),
        "--decoder",
        "builtin",
        "--shard-mib",
        "0.1",
    ]));
    let ca = dir.join("ca");
    ok(&amity(&["ca", "init", "--dir", s(&ca)]));
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
    for w in workers {
        ok(&amity(&["ca", "issue", "--dir", s(&ca), "--name", w]));
    }
    let mut run = Config::preset("tiny").unwrap();
    run.train.batch = 8;
    run.train.steps = 60;
    run.train.warmup = 5;
    std::fs::write(dir.join("run.toml"), run.to_toml()).unwrap();
    let port = free_port();
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\ncorpus = \"corpus\"\n\
             ca_dir = \"ca\"\nrun_config = \"run.toml\"\ncheckpoint_every = 1\n{extra}\n\
             [rounds]\nsteps = 4\ngrace_ms = 60000\nmin_workers = {}\nmax_rounds = {rounds}\n\
             heartbeat_timeout_ms = 4000\nshards_per_round = 4\n",
            workers.len()
        ),
    )
    .unwrap();
    Cluster { dir, port, config }
}

impl Cluster {
    fn coordinator(&self, exit_when_finished: bool) -> Child {
        let mut c = Command::new(env!("CARGO_BIN_EXE_amity"));
        c.args(["coordinator", "--config", s(&self.config)]);
        if exit_when_finished {
            c.arg("--exit-when-finished");
        }
        let log = std::fs::File::create(self.dir.join("coordinator.log")).unwrap();
        c.stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }

    fn worker(&self, name: &str, extra: &[&str]) -> Child {
        let ca = self.dir.join("ca");
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_amity"))
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
            .unwrap()
    }

    fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.join("state/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until the status shows `round` or more closed rounds.
    fn wait_rounds(&self, rounds: usize, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            if let Some(st) = self.status()
                && st["history"].as_array().map_or(0, |h| h.len()) >= rounds
            {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "no {rounds} rounds after {limit:?}; coordinator log:\n{}",
                self.log("coordinator")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn wait(child: &mut Child, limit: Duration, what: &str, log: &dyn Fn() -> String) {
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

fn losses(st: &Value) -> Vec<f64> {
    st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

fn names(round: &Value, key: &str) -> Vec<String> {
    round[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Array(a) => a[0].as_str().unwrap().to_owned(),
            other => panic!("{other}"),
        })
        .collect()
}

#[test]
fn three_workers_train_three_rounds_and_the_loss_falls() {
    let workers = ["uni-a", "uni-b", "uni-c"];
    let c = cluster("three", &workers, 3, "");
    let mut coord = c.coordinator(true);
    let mut ws: Vec<Child> = workers.iter().map(|w| c.worker(w, &[])).collect();
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    for (w, name) in ws.iter_mut().zip(workers) {
        wait(w, Duration::from_secs(30), name, &|| c.log(name));
    }
    let st = c.status().unwrap();
    let l = losses(&st);
    assert_eq!(l.len(), 3);
    assert!(l[2] < l[0], "loss did not fall: {l:?}");
    for round in st["history"].as_array().unwrap() {
        assert_eq!(names(round, "accepted").len(), 3, "{round}");
        // Compressed: a top-1% int8 update is far below the dense fp32 traffic.
        assert!(round["bytes_up"].as_u64().unwrap() * 100 < round["dense_bytes"].as_u64().unwrap());
    }
    // Every institution is accounted for; the shards were fetched and trained.
    for w in workers {
        assert_eq!(st["provenance"][w]["updates"], 3, "{st}");
    }
    assert!(st["covered"].as_u64().unwrap() > 0);
    // The checkpoint loads as the JEPA core's safetensors.
    let ckpt = st["checkpoint"].as_str().unwrap();
    let loaded = amity_shared::checkpoint::Checkpoint::load(Path::new(ckpt)).unwrap();
    assert_eq!(loaded.meta["round"], "3");
    assert!(loaded.model.iter().all(|v| v.is_finite()));
    std::fs::remove_dir_all(&c.dir).unwrap();
}

#[test]
fn poisoned_and_huge_updates_are_rejected_and_the_model_is_unharmed() {
    let workers = ["uni-a", "uni-b", "nan-lab", "loud-lab"];
    let c = cluster("faults", &workers, 2, "");
    let mut coord = c.coordinator(true);
    let mut ws = vec![
        c.worker("uni-a", &[]),
        c.worker("uni-b", &[]),
        c.worker("nan-lab", &["--fault", "nan"]),
        c.worker("loud-lab", &["--fault", "scale:100"]),
    ];
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    for w in &mut ws {
        let _ = w.kill();
        let _ = w.wait();
    }
    let st = c.status().unwrap();
    for round in st["history"].as_array().unwrap() {
        let mut accepted = names(round, "accepted");
        accepted.sort();
        assert_eq!(accepted, ["uni-a", "uni-b"], "{round}");
        let mut rejected = names(round, "rejected");
        rejected.sort();
        assert_eq!(rejected, ["loud-lab", "nan-lab"], "{round}");
    }
    let l = losses(&st);
    assert!(l.iter().all(|x| x.is_finite()) && l[1] < l[0], "{l:?}");
    let log = c.log("coordinator");
    assert!(log.contains("NaN") && log.contains("median"), "{log}");
    let ckpt =
        amity_shared::checkpoint::Checkpoint::load(Path::new(st["checkpoint"].as_str().unwrap()))
            .unwrap();
    let max = ckpt.model.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max.is_finite() && max < 10.0, "{max}");
    std::fs::remove_dir_all(&c.dir).unwrap();
}

#[test]
fn a_worker_killed_mid_round_does_not_stall_training() {
    let workers = ["uni-a", "uni-b", "doomed"];
    let c = cluster("sigkill", &workers, 3, "");
    let mut coord = c.coordinator(true);
    let mut ws: Vec<Child> = workers.iter().map(|w| c.worker(w, &[])).collect();
    // After the first round closes, the next is under way: kill one worker (SIGKILL).
    c.wait_rounds(1, Duration::from_secs(240));
    ws[2].kill().unwrap();
    ws[2].wait().unwrap();
    let killed_at = Instant::now();
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    // The heartbeat timeout (4 s), not the 60 s grace, closed the round without it.
    assert!(
        killed_at.elapsed() < Duration::from_secs(50),
        "{:?}",
        killed_at.elapsed()
    );
    let st = c.status().unwrap();
    let history = st["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    for round in &history[1..] {
        let accepted = names(round, "accepted");
        assert!(accepted.contains(&"uni-a".into()) && accepted.contains(&"uni-b".into()));
    }
    assert!(!names(&history[2], "accepted").contains(&"doomed".to_string()));
    let missed: Vec<String> = history[1..]
        .iter()
        .flat_map(|r| names(r, "missing"))
        .collect();
    assert!(missed.contains(&"doomed".to_string()), "{history:?}");
    for w in &mut ws[..2] {
        wait(w, Duration::from_secs(30), "worker", &|| c.log("uni-a"));
    }
    std::fs::remove_dir_all(&c.dir).unwrap();
}

#[test]
fn a_restarted_coordinator_resumes_at_the_last_completed_round() {
    let workers = ["uni-a", "uni-b"];
    let c = cluster("restart", &workers, 4, "");
    let mut coord = c.coordinator(false);
    let mut ws: Vec<Child> = workers.iter().map(|w| c.worker(w, &[])).collect();
    c.wait_rounds(2, Duration::from_secs(240));
    coord.kill().unwrap();
    coord.wait().unwrap();
    let before = c.status().unwrap();
    let (round, params) = (before["round"].clone(), before["params"].clone());
    std::fs::remove_file(c.dir.join("state/status.json")).unwrap();

    // The same config again: the command log and snapshot bring back the same state, and the
    // workers (retrying with back-off) reconnect and finish the run.
    let mut coord = c.coordinator(true);
    let start = Instant::now();
    let resumed = loop {
        if let Some(st) = c.status() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            c.log("coordinator")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(resumed["round"], round);
    assert_eq!(resumed["params"], params);
    assert!(
        c.log("coordinator")
            .contains("resumed from the command log")
    );
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    let st = c.status().unwrap();
    assert_eq!(st["history"].as_array().unwrap().len(), 4);
    // The rounds before the crash are the same rounds.
    assert_eq!(st["history"][0]["params"], before["history"][0]["params"]);
    for w in &mut ws {
        wait(w, Duration::from_secs(30), "worker", &|| c.log("uni-a"));
    }
    std::fs::remove_dir_all(&c.dir).unwrap();
}
