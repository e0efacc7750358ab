//! The deployment files in `deploy/` are what an operator installs, so they are checked as the
//! tools that read them check them: the example config loads as the coordinator loads it, the
//! systemd units pass `systemd-analyze verify` (with this build's binary in `ExecStart`), and the
//! SLURM script passes `shellcheck` (both installed by `scripts/install-deps`).

use std::path::{Path, PathBuf};
use std::process::Command;

use amity_coordinator::config::CoordinatorConfig;

use super::common::scratch;

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
fn the_slurm_script_passes_shellcheck() {
    let script = deploy().join("slurm/amity-worker.sbatch");
    let out = run("shellcheck", &[script.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
