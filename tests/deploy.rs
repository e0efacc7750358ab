//! The deployment files in `deploy/` are what an operator installs, so they are checked as the
//! tools that read them check them: the example config loads as the coordinator loads it, the
//! systemd units pass `systemd-analyze verify` (with this build's binary in `ExecStart`), and the
//! SLURM script passes `shellcheck` (both installed by `scripts/install-deps`), and where a Docker
//! engine runs, the container images build and the compose testnet trains.

use std::path::{Path, PathBuf};
use std::process::Command;

use amity_coordinator::config::CoordinatorConfig;
use amity_worker::config::WorkerConfig;

use super::common::{http, python_venv, scratch, try_http};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn run(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (scripts/install-deps installs it)"))
}

/// Every key of the example, at its documented default, loads; its defaults are the built-in
/// ones (so the comments cannot drift from the code unnoticed).
#[test]
fn the_example_coordinator_config_loads_with_the_built_in_defaults() {
    let cfg = CoordinatorConfig::load(&deploy().join("coordinator.toml")).unwrap();
    let text = "listen = \"0.0.0.0:7700\"\nstate_dir = \"/var/lib/amity/coordinator\"\n\
                ca_dir = \"/etc/amity/ca\"\npreset = \"tiny\"\n[http]\n";
    let dir = scratch("deploy-config");
    std::fs::write(dir.join("minimal.toml"), text).unwrap();
    let minimal = CoordinatorConfig::load(&dir.join("minimal.toml")).unwrap();
    assert_eq!(
        cfg, minimal,
        "deploy/coordinator.toml strays from the defaults"
    );
}

/// The example worker config loads, and a flag given on the command line wins over it.
#[test]
fn the_example_worker_config_loads_and_flags_win_over_it() {
    let file = deploy().join("worker.toml");
    let cfg = WorkerConfig::load(&file).unwrap();
    assert_eq!(cfg.coordinator.len(), 3);
    assert_eq!(cfg.backend.as_deref(), Some("flex"));
    assert_eq!(cfg.cache, Some(PathBuf::from("/var/cache/amity/worker")));
    assert_eq!(cfg.key, None, "the key defaults to the certificate's path");
    // The file's coordinators do not resolve here and its certificate does not exist: the
    // flags' are the ones used.
    let out = super::common::amity(&[
        "worker",
        "--config",
        file.to_str().unwrap(),
        "--coordinator",
        "127.0.0.1:7700",
        "--cert",
        "/nonexistent/from-the-flag.crt",
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("from-the-flag.crt"), "{said}");
}

#[test]
fn the_systemd_units_verify() {
    let dir = scratch("deploy-units");
    let mut units = Vec::new();
    for name in ["amity-coordinator.service", "amity-worker.service"] {
        let text = std::fs::read_to_string(deploy().join("systemd").join(name)).unwrap();
        assert!(text.contains("/usr/local/bin/amity "), "{name}");
        let unit = dir.join(name);
        let text = text.replace(
            "/usr/local/bin/amity ",
            &format!("{} ", env!("CARGO_BIN_EXE_amity")),
        );
        std::fs::write(&unit, text).unwrap();
        units.push(unit);
    }
    let args: Vec<&str> = units.iter().map(|u| u.to_str().unwrap()).collect();
    let out = run("systemd-analyze", &[&["verify"], &args[..]].concat());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_slurm_and_image_scripts_pass_shellcheck() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for script in [
        deploy().join("slurm/amity-worker.sbatch"),
        root.join("scripts/docker-images"),
    ] {
        let out = run("shellcheck", &[script.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// The container images build from a debootstrap base (no registry needed) and the compose
/// testnet (an init step making every certificate, three replicas, three workers) trains: two
/// rounds closed, every replica agreeing on the leader. Skipped, saying so, where no Docker
/// engine runs.
#[test]
fn the_container_testnet_trains() {
    if !run("docker", &["info"]).status.success() {
        eprintln!("no Docker engine here: the container testnet is not checked");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = Command::new(root.join("scripts/docker-images"))
        .arg(env!("CARGO_BIN_EXE_amity"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/docker-images: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let testnet = Testnet::up();
    let start = std::time::Instant::now();
    loop {
        let st: serde_json::Value = match try_http(9461, "GET", "/status.json", None) {
            Ok((200, body)) => serde_json::from_str(&body).unwrap(),
            _ => serde_json::Value::Null,
        };
        if st["history"].as_array().is_some_and(|h| h.len() >= 2) {
            // Each institution is listed; after a leader change its old session stays listed
            // (silent) beside the new one until the heartbeat timeout, so count names.
            let names: std::collections::BTreeSet<&str> = st["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|w| w["name"].as_str())
                .collect();
            assert_eq!(
                names,
                ["uni-a", "uni-b", "uni-c"].into_iter().collect(),
                "{st}"
            );
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(240),
            "no two rounds in the testnet:\n{}",
            testnet.logs()
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let leaders: Vec<serde_json::Value> = [9461, 9462, 9463]
        .iter()
        .map(|&port| {
            let (_, body) = http(port, "GET", "/status.json", None);
            let st: serde_json::Value = serde_json::from_str(&body).unwrap();
            st["replica"]["leader"].clone()
        })
        .collect();
    assert!(
        leaders[0].is_u64() && leaders.iter().all(|l| *l == leaders[0]),
        "{leaders:?}\n{}",
        testnet.logs()
    );
}

/// The compose testnet of `deploy/docker/testnet`, taken down (volumes too) when dropped.
struct Testnet;

impl Testnet {
    const PROJECT: &str = "amity-testnet-check";

    /// `docker compose`, or Debian's `docker-compose` where the plugin is missing.
    fn compose(args: &[&str]) -> std::process::Output {
        let file = deploy().join("docker/testnet/compose.yaml");
        let file = file.to_str().unwrap();
        let common = ["-p", Self::PROJECT, "-f", file];
        let plugin = run("docker", &["compose", "version"]).status.success();
        if plugin {
            run("docker", &[&["compose"], &common[..], args].concat())
        } else {
            run("docker-compose", &[&common[..], args].concat())
        }
    }

    fn up() -> Testnet {
        Self::compose(&["down", "-v"]);
        let out = Self::compose(&["up", "-d"]);
        assert!(
            out.status.success(),
            "compose up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Testnet
    }

    fn logs(&self) -> String {
        let out = Self::compose(&["logs", "--no-color", "--tail=30"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        Self::compose(&["down", "-v"]);
    }
}

/// The Helm chart renders (Debian packages no helm: `tests/helm_render.py` renders the chart's
/// subset of the template language and refuses anything else), its values pass its
/// `values.schema.json`, every object passes the Kubernetes 1.30 API schema (strict: no unknown
/// fields), and the coordinator.toml it renders loads.
#[test]
fn the_helm_chart_renders_to_valid_kubernetes_objects() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = python_venv("helm-check", &["kubernetes-validate"]);
    let out = Command::new(python)
        .arg(root.join("tests/helm_render.py"))
        .arg(deploy().join("helm/amity"))
        .arg("1.30.0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rendered["objects"],
        serde_json::json!([
            "ConfigMap/amity-coordinator",
            "Service/amity-coordinator",
            "StatefulSet/amity-coordinator",
            "Deployment/amity-worker"
        ])
    );
    // The config the chart renders is one the coordinator loads.
    let dir = scratch("helm-config");
    let file = dir.join("coordinator.toml");
    std::fs::write(&file, rendered["coordinator_toml"].as_str().unwrap()).unwrap();
    let cfg = CoordinatorConfig::load(&file).unwrap();
    assert!(cfg.http.is_some() && cfg.replication.is_none());
}
