//! Storage faults: a full disk under the coordinator and under an ingest, and a crash while the
//! disk is full. Nothing already accepted may be lost, the previous good checkpoint, snapshot and
//! manifest must stay readable, and the programs must say what happened.
//!
//! The small disk is a tmpfs mounted in a mount namespace the test makes itself (`unshare`),
//! held open by a sleeping process; the programs under test join it with `nsenter`, and the test
//! reads and fills it through `/proc/<holder>/root`. Where the machine allows no namespaces the
//! tests say so and return.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, cluster, synthetic_store, wait};
use crate::common::{amity, s, scratch};
use amity_shared::store::BlobId;
use serde_json::Value;

/// A tmpfs of a few MiB mounted over a folder in a private mount namespace.
struct SmallDisk {
    holder: Child,
}

impl SmallDisk {
    /// Mounts `mib` MiB over `at` (which must exist); `None` where namespaces are not allowed.
    fn mount(at: &Path, mib: u64) -> Option<Self> {
        let spawned = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o size={mib}m amity-test \"$0\" && echo mounted && exec sleep 3600"
            ))
            .arg(at)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut holder) = spawned else {
            eprintln!("skipped: `unshare` is not installed");
            return None;
        };
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped");
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "mounted" {
            let _ = holder.kill();
            let out = holder.wait_with_output().expect("holder ends");
            eprintln!(
                "skipped: this machine allows no private mount namespace ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallDisk { holder })
    }

    /// Where `path` (as the programs inside see it) is from outside.
    fn outside(&self, path: &Path) -> PathBuf {
        let inner = path.strip_prefix("/").expect("absolute path");
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(inner)
    }

    /// `amity` with `args`, run inside the namespace.
    fn amity(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            &self.holder.id().to_string(),
            "--user",
            "--mount",
            "--preserve-credentials",
            "--",
            env!("CARGO_BIN_EXE_amity"),
        ]);
        c.args(args);
        c
    }

    /// Writes a file at `path` (inside) until the disk is full; returns the bytes it holds.
    fn fill(&self, path: &Path) -> u64 {
        let mut f = std::fs::File::create(self.outside(path)).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        let mut written = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC: {e}");
                    break;
                }
            }
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn wait_for(what: &str, limit: Duration, log: &dyn Fn() -> String, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what}: not after {limit:?}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(disk: &SmallDisk, c: &Cluster) -> Option<Value> {
    let text = std::fs::read_to_string(disk.outside(&c.dir.join("state/status.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

fn closed_rounds(st: &Option<Value>) -> usize {
    st.as_ref()
        .and_then(|st| st["history"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// The latest checkpoint is whole: its bytes are exactly one of the global states the
/// coordinator stored (whose id is their hash), never a half-written copy.
fn assert_checkpoint_whole(disk: &SmallDisk, c: &Cluster) {
    let state = c.dir.join("state");
    let bytes = std::fs::read(disk.outside(&state.join("checkpoints/latest.safetensors")))
        .expect("a checkpoint was written");
    let id = BlobId::of(&bytes).to_hex();
    let blob = disk.outside(&state.join("blobs").join(&id[..2]).join(&id));
    assert!(
        blob.exists(),
        "latest.safetensors ({} bytes) is no stored state",
        bytes.len()
    );
}

/// Blobs in a content store folder (`<root>/ab/ab12...`).
fn blobs_in(root: &Path) -> usize {
    std::fs::read_dir(root)
        .map(|dirs| {
            dirs.flatten()
                .filter(|d| d.file_name().len() == 2)
                .map(|d| std::fs::read_dir(d.path()).map_or(0, |f| f.count()))
                .sum()
        })
        .unwrap_or(0)
}

fn spawn_coordinator(disk: &SmallDisk, c: &Cluster, exit_when_finished: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.join("coordinator.log"))
        .unwrap();
    let mut args = vec!["coordinator", "--config", s(&c.config)];
    if exit_when_finished {
        args.push("--exit-when-finished");
    }
    disk.amity(&args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// The coordinator's disk fills up twice during a run. The first time it waits, says why, keeps
/// the last checkpoint whole and carries on by itself once space is freed; the second time it is
/// killed while full, and a restart resumes from the last closed round and finishes the run.
#[test]
fn a_full_disk_and_a_crash_while_full_lose_nothing_the_coordinator_acknowledged() {
    const ROUNDS: usize = 8;
    let c = cluster(
        "storage",
        &["uni-a"],
        ROUNDS as u64,
        "\n[retention]\nrounds = 2\n",
    );
    let state = c.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let Some(disk) = SmallDisk::mount(&state, 48) else {
        return;
    };
    let log = || c.log("coordinator");
    let mut coord = spawn_coordinator(&disk, &c, false);
    let mut worker = c.worker("uni-a", &[]);
    wait_for("two rounds", Duration::from_secs(240), &log, || {
        closed_rounds(&status(&disk, &c)) >= 2
    });

    // 1. Full: writes fail and are retried, the coordinator says so and stays up.
    let filler = state.join("filler");
    let faults_before = log().matches("No space left on device").count();
    let held = disk.fill(&filler);
    assert!(held > 0);
    wait_for("a storage fault", Duration::from_secs(120), &log, || {
        log().matches("No space left on device").count() > faults_before
    });
    assert!(coord.try_wait().unwrap().is_none(), "{}", log());
    assert_checkpoint_whole(&disk, &c);
    let round_when_full = closed_rounds(&status(&disk, &c));

    // 2. Space freed: the retried writes go through, the fault is counted, rounds go on.
    std::fs::remove_file(disk.outside(&filler)).unwrap();
    wait_for("recovery", Duration::from_secs(180), &log, || {
        let st = status(&disk, &c);
        closed_rounds(&st) > round_when_full
            && st.as_ref().is_some_and(|st| {
                st["defence"]["storage_faults"].as_u64() >= Some(1)
                    && st["defence"]["storage_error"].is_null()
            })
    });
    assert_checkpoint_whole(&disk, &c);

    // 3. Full again, and the coordinator is killed in the middle of failing writes.
    let before_crash = status(&disk, &c).unwrap();
    if closed_rounds(&Some(before_crash.clone())) < ROUNDS - 1 {
        let faults = log().matches("No space left on device").count();
        disk.fill(&filler);
        wait_for(
            "a second storage fault",
            Duration::from_secs(120),
            &log,
            || log().matches("No space left on device").count() > faults,
        );
    }
    coord.kill().unwrap();
    coord.wait().unwrap();
    let _ = std::fs::remove_file(disk.outside(&filler));
    assert_checkpoint_whole(&disk, &c);

    // 4. Restarted: it resumes from the log and snapshot and finishes the run.
    let mut coord = spawn_coordinator(&disk, &c, true);
    wait(&mut coord, Duration::from_secs(300), "coordinator", &log);
    let st = status(&disk, &c).unwrap();
    let history = st["history"].as_array().unwrap();
    assert_eq!(history.len(), ROUNDS, "{}", log());
    // The rounds acknowledged before the crash are the same rounds.
    for (i, round) in before_crash["history"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(history[i]["params"], round["params"], "round {i}");
    }
    assert_checkpoint_whole(&disk, &c);
    // Retention kept the store to a few rounds' worth.
    let blobs = st["storage"]["blobs"].as_u64().unwrap();
    assert!(blobs <= 12, "{blobs} blobs kept with retention of 2 rounds");
    assert!(st["storage"]["removed_blobs"].as_u64().unwrap() > 0);
    wait(&mut worker, Duration::from_secs(60), "worker", &|| {
        c.log("uni-a")
    });
    // The worker's cache keeps the shards and the blobs of the last two rounds, not all eight.
    let shards = blobs_in(&c.dir.join("corpus/blobs"));
    let cached = blobs_in(&c.dir.join("cache-uni-a/blobs"));
    assert!(
        shards > 0 && cached <= shards + 6,
        "{cached} blobs cached for {shards} shards"
    );
    drop(disk);
    std::fs::remove_dir_all(&c.dir).unwrap();
}

/// An ingest that runs out of space fails naming the file and the cause, and leaves the store's
/// previous manifest and every shard it lists intact.
#[test]
fn an_ingest_onto_a_full_disk_fails_clearly_and_keeps_the_previous_corpus() {
    let dir = scratch("storage-ingest");
    let (small, big) = (dir.join("small"), dir.join("big"));
    let disk_dir = dir.join("disk");
    std::fs::create_dir_all(&disk_dir).unwrap();
    // Both sets of videos live outside the small disk; the store lives on it.
    synthetic_store(&small, &dir.join("unused-a"), 4, 1);
    let videos = amity(&[
        "corpus",
        "synth",
        "--out",
        s(&big),
        "--videos",
        "40",
        "--frames",
        "48",
        "--seed",
        "2",
    ]);
    assert!(videos.status.success());
    let Some(disk) = SmallDisk::mount(&disk_dir, 2) else {
        return;
    };
    let store = disk_dir.join("store");
    let ingest = |videos: &Path| {
        disk.amity(&[
            "corpus",
            "ingest",
            s(videos),
            "--store",
            s(&store),
            "--decoder",
            "builtin",
            "--shard-mib",
            "0.1",
        ])
        .output()
        .unwrap()
    };
    let first = ingest(&small);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let manifest = std::fs::read(disk.outside(&store.join("manifest.json"))).unwrap();

    let second = ingest(&big);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "40 videos fit on 2 MiB?\n{err}");
    assert!(
        err.contains("No space left on device") && err.contains(s(&store)),
        "the error names the file and the cause:\n{err}"
    );
    // The previous corpus is untouched: same manifest, every shard verifies.
    assert_eq!(
        std::fs::read(disk.outside(&store.join("manifest.json"))).unwrap(),
        manifest
    );
    let verify = disk
        .amity(&["corpus", "verify", "--store", s(&store)])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    drop(disk);
    std::fs::remove_dir_all(&dir).unwrap();
}
