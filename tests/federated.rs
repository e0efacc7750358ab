//! Federated training as operators run it: a real `amity coordinator` process and real
//! `amity worker` processes over loopback QUIC with mTLS certificates from `amity ca`.
//!
//! Rounds are step-budgeted here (a few local steps each) so that the tests are quick and do not
//! depend on how fast the machine is; the demo and the bench use time budgets.

use crate::common::cluster::{Proc, cluster, interrupt, synthetic_store, wait};
use crate::common::{amity, ok, s};

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

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
    // One checkpoint, after the last round: rounds 0 and 1 go compressed, round 2 flushes.
    let c = cluster("three", &workers, 3, "checkpoint_every = 3");
    let mut coord = c.coordinator(true);
    let mut ws: Vec<Proc> = workers.iter().map(|w| c.worker(w, &[])).collect();
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    for (w, name) in ws.iter_mut().zip(workers) {
        wait(w, Duration::from_secs(30), name, &|| c.log(name));
    }
    // Logs written to a file carry no terminal colour codes.
    for name in ["coordinator", "uni-a"] {
        let log = c.log(name);
        assert!(
            log.contains("INFO") && !log.contains('\x1b'),
            "{name}: {log}"
        );
    }
    let st = c.status().unwrap();
    let l = losses(&st);
    assert_eq!(l.len(), 3);
    assert!(l[2] < l[0], "loss did not fall: {l:?}");
    let history = st["history"].as_array().unwrap();
    for (r, round) in history.iter().enumerate() {
        assert_eq!(names(round, "accepted").len(), 3, "{round}");
        let (up, dense) = (
            round["bytes_up"].as_u64().unwrap(),
            round["dense_bytes"].as_u64().unwrap(),
        );
        // The last round (before the checkpoint) flushes every residual densely: int8, a
        // quarter of fp32 at most. The others are compressed: a sparseloco update is far
        // below dense fp32 traffic.
        let last = r + 1 == history.len();
        assert_eq!(round["flush"], last, "{round}");
        if last {
            assert!(up * 4 < dense, "{round}");
        } else {
            assert!(up * 100 < dense, "{round}");
        }
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

/// `--log-format json` for log collectors: every line a coordinator and a worker write on
/// stderr over a round is one JSON object with a timestamp, a level and a message, the
/// worker's progress lines included.
#[test]
fn json_logs_are_one_object_per_line() {
    let c = cluster("json-logs", &["uni-a"], 1, "");
    let mut coord = c.coordinator_with(true, &["--log-format", "json"]);
    let mut w = c.worker("uni-a", &["--log-format", "json"]);
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    wait(&mut w, Duration::from_secs(30), "uni-a", &|| c.log("uni-a"));
    for name in ["coordinator", "uni-a"] {
        let log = c.log(name);
        let lines: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
            .collect();
        assert!(lines.len() > 3, "{name}: {log}");
        for l in &lines {
            assert!(
                l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(),
                "{name}: {l}"
            );
        }
        if name == "uni-a" {
            let said = |m: &str| lines.iter().any(|l| l["message"] == m);
            assert!(said("round 0 acknowledged"), "{log}");
        }
    }
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
    assert!(log.contains("NaN") && log.contains("reference"), "{log}");
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
    let mut ws: Vec<Proc> = workers.iter().map(|w| c.worker(w, &[])).collect();
    // After the first round closes, the next is under way: kill one worker (SIGKILL).
    c.wait_rounds(1, Duration::from_secs(240));
    ws[2].kill().unwrap();
    ws[2].wait().unwrap();
    let killed_at = Instant::now();
    // An institution asks the running coordinator for its state.
    let ca = c.dir.join("ca");
    let asked = amity(&[
        "coordinator",
        "status",
        "--coordinator",
        &format!("127.0.0.1:{}", c.port),
        "--cert",
        s(&ca.join("uni-a.crt")),
        "--ca",
        s(&ca.join("ca.crt")),
    ]);
    let text = ok(&asked);
    assert!(
        text.contains(": round ") && text.contains("closed") && !text.contains("replica"),
        "{text}"
    );
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
    let mut ws: Vec<Proc> = workers.iter().map(|w| c.worker(w, &[])).collect();
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

/// A certificate refusal is not a network hiccup: the worker must stop at once and say which
/// side refused what, not retry with back-off forever.
#[test]
fn a_refused_certificate_stops_the_worker_with_the_reason() {
    use crate::common::{amity, ok, s};
    use std::process::{Command, Stdio};
    let c = cluster(
        "refused",
        &["uni-a", "old-lab"],
        1,
        "revoked = [\"old-lab\"]",
    );
    let mut coord = c.coordinator(false);
    let other = c.dir.join("other-ca");
    ok(&amity(&["ca", "init", "--dir", s(&other)]));
    ok(&amity(&[
        "ca",
        "issue",
        "--dir",
        s(&other),
        "--name",
        "stranger",
    ]));
    let ca = c.dir.join("ca");
    let cases = [
        // Revoked in the coordinator's config.
        (
            "old-lab",
            ca.join("old-lab.crt"),
            ca.join("ca.crt"),
            "refused this worker's certificate",
            "certificate revoked",
        ),
        // Issued by another CA (of the same default name, so the signature is what fails).
        (
            "stranger",
            other.join("stranger.crt"),
            ca.join("ca.crt"),
            "refused this worker's certificate",
            "bad signature",
        ),
        // A good certificate, but the worker trusts another CA than the coordinator's.
        (
            "uni-a",
            ca.join("uni-a.crt"),
            other.join("ca.crt"),
            "this worker refused the coordinator's certificate",
            "check --ca",
        ),
    ];
    for (name, cert, trust, who, why) in cases {
        let started = Instant::now();
        let mut w = Command::new(env!("CARGO_BIN_EXE_amity"))
            .args(["worker", "--coordinator", &format!("127.0.0.1:{}", c.port)])
            .args(["--cert", s(&cert), "--ca", s(&trust)])
            .args(["--cache", s(&c.dir.join(format!("cache-{name}")))])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(status) = w.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                w.kill().unwrap();
                panic!("{name}: worker still retrying after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{name}: exited with {status}");
        assert!(err.contains(who) && err.contains(why), "{name}: {err}");
        assert!(!err.contains("retrying in"), "{name}: {err}");
    }
    coord.kill().unwrap();
    coord.wait().unwrap();
    std::fs::remove_dir_all(&c.dir).unwrap();
}

/// An institution that keeps its corpus at home (`amity worker --corpus`): its shards are
/// scheduled to it alone, trained, and their clips counted in the run's corpus.
#[test]
fn an_institutions_own_corpus_is_trained_and_counted() {
    use crate::common::s;
    use amity_shared::corpus::manifest::Manifest;
    let workers = ["uni-a", "hospital"];
    let c = cluster("local-corpus", &workers, 3, "");
    let private = c.dir.join("private");
    synthetic_store(&c.dir.join("private-videos"), &private, 4, 9);
    let public = Manifest::load(&c.dir.join("corpus")).unwrap();
    let own = Manifest::load(&private).unwrap();
    let clips = |m: &Manifest| m.shards.iter().map(|s| s.clips).sum::<u64>();
    let mut coord = c.coordinator(true);
    let mut ws = [
        c.worker("uni-a", &[]),
        c.worker("hospital", &["--corpus", s(&private)]),
    ];
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    for (w, name) in ws.iter_mut().zip(workers) {
        wait(w, Duration::from_secs(30), name, &|| c.log(name));
    }
    let st = c.status().unwrap();
    assert_eq!(
        st["shards"].as_u64().unwrap() as usize,
        public.shards.len() + own.shards.len(),
        "{st}"
    );
    assert_eq!(
        st["clips"].as_u64().unwrap(),
        clips(&public) + clips(&own),
        "{st}"
    );
    assert!(st["covered_clips"].as_u64().unwrap() > 0, "{st}");
    assert!(
        st["provenance"]["hospital"]["shards"].as_u64().unwrap() > 0,
        "{st}"
    );
    // The private shards reached neither the coordinator's store nor the other worker.
    let elsewhere: Vec<_> = [c.dir.join("state"), c.dir.join("cache-uni-a")]
        .iter()
        .flat_map(|d| walk(d))
        .collect();
    assert!(
        elsewhere.len() > 1,
        "the walk sees the stores: {elsewhere:?}"
    );
    for shard in &own.shards {
        let hex = shard.id.to_hex();
        let leaked = elsewhere
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == hex));
        assert!(!leaked, "private shard {hex} left the hospital");
    }
    std::fs::remove_dir_all(&c.dir).unwrap();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Ctrl-C on a worker: it abandons the round, says goodbye and exits cleanly; the coordinator
/// hears it leave at once (not by the heartbeat timeout) and finishes the run without it.
#[test]
fn a_worker_stopped_with_ctrl_c_leaves_cleanly() {
    let workers = ["uni-a", "uni-b", "leaver"];
    let c = cluster("ctrl-c", &workers, 3, "");
    let mut coord = c.coordinator(true);
    let mut ws: Vec<Proc> = workers.iter().map(|w| c.worker(w, &[])).collect();
    c.wait_rounds(1, Duration::from_secs(240));
    interrupt(&ws[2]);
    wait(&mut ws[2], Duration::from_secs(30), "leaver", &|| {
        c.log("leaver")
    });
    let log = c.log("leaver");
    assert!(
        log.contains("Ctrl-C: abandoning") && log.contains("worker done"),
        "{log}"
    );
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    let coordinator = c.log("coordinator");
    assert!(
        coordinator
            .lines()
            .any(|l| l.contains("leaver") && l.contains("worker left")),
        "{coordinator}"
    );
    let st = c.status().unwrap();
    let history = st["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(!names(&history[2], "accepted").contains(&"leaver".to_string()));
    for w in &mut ws[..2] {
        wait(w, Duration::from_secs(30), "worker", &|| c.log("uni-a"));
    }
    std::fs::remove_dir_all(&c.dir).unwrap();
}

/// Revoking an institution while it trains (its name added to `revoked` in `coordinator.toml`,
/// then SIGHUP) cuts it off at once and keeps it out, without a restart; the others train on.
#[test]
fn an_institution_revoked_while_running_is_cut_off_without_a_restart() {
    let c = cluster("revoke", &["uni-a", "uni-b"], 5, "revoked = []");
    let mut coord = c.coordinator(true);
    let mut a = c.worker("uni-a", &[]);
    let mut b = c.worker("uni-b", &[]);
    c.wait_rounds(1, Duration::from_secs(240));
    let config = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(
        &c.config,
        config.replace("revoked = []", "revoked = [\"uni-b\"]"),
    )
    .unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &coord.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = b.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "uni-b still running:\n{}",
            c.log("uni-b")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{}", c.log("uni-b"));
    let log_b = c.log("uni-b");
    assert!(log_b.contains("certificate revoked"), "{log_b}");
    let log = c.log("coordinator");
    assert!(log.contains("revocation list reloaded"), "{log}");
    assert!(log.contains("closing its connection"), "{log}");
    // The run finishes with uni-a alone after the revocation.
    wait(&mut coord, Duration::from_secs(300), "coordinator", &|| {
        c.log("coordinator")
    });
    wait(&mut a, Duration::from_secs(30), "worker", &|| {
        c.log("uni-a")
    });
    let st = c.status().unwrap();
    let history = st["history"].as_array().unwrap();
    assert_eq!(history.len(), 5);
    let last = names(history.last().unwrap(), "accepted");
    assert_eq!(last, ["uni-a"], "{st}");
    std::fs::remove_dir_all(&c.dir).unwrap();
}
